"""img2img and inpainting against diffusers' StableDiffusionImg2ImgPipeline and
StableDiffusionInpaintPipeline on tiny models, at a non-square size (96x64).

diffusers samples the VAE posterior and draws the starting noise from torch; sdonnx encodes
to the posterior mean and takes numpy noise. The reference is patched to do the same (mean,
and our noise), so the rest of the path, from strength to schedule tail to the inpainting
UNet's extra channels, is compared exactly.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from conftest import _reference, psnr
from test_parity import NEGATIVE, PARITY_DB, PROMPT, use_scheduler

WIDTH, HEIGHT = 96, 64
STEPS = 6
SCHEDULERS = {
    "euler": ("EulerDiscreteScheduler", {}),
    "heun": ("HeunDiscreteScheduler", {}),
    "ddim": ("DDIMScheduler", {}),
    "dpmpp_2m": ("DPMSolverMultistepScheduler", {}),
    "unipc": ("UniPCMultistepScheduler", {}),
}
STRENGTHS = [0.3, 0.75, 1.0]


def init_image() -> Image.Image:
    x = np.linspace(0, 255, WIDTH)[None, :, None]
    y = np.linspace(0, 255, HEIGHT)[:, None, None]
    pixels = np.concatenate([np.broadcast_to(x, (HEIGHT, WIDTH, 1)), np.broadcast_to(y, (HEIGHT, WIDTH, 1)),
                             np.full((HEIGHT, WIDTH, 1), 90.0)], axis=2)
    image = Image.fromarray(pixels.astype(np.uint8))
    ImageDraw.Draw(image).ellipse([30, 10, 70, 50], fill=(220, 30, 30))
    return image


def mask_image() -> Image.Image:
    mask = Image.new("L", (WIDTH, HEIGHT), 0)
    ImageDraw.Draw(mask).rectangle([24, 8, 71, 47], fill=255)
    return mask


def unit_noise(seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((1, 4, HEIGHT // 8, WIDTH // 8), dtype=np.float32)


@pytest.fixture(scope="module")
def img2img_reference(tiny_source):
    return _reference(tiny_source, "StableDiffusionImg2ImgPipeline")


@pytest.fixture(scope="module")
def inpaint_reference(inpaint_source):
    return _reference(inpaint_source, "StableDiffusionInpaintPipeline")


def reference(pipe, noise_holder, noise, sampler, strength, **images):
    use_scheduler(pipe, *SCHEDULERS[sampler])
    noise_holder["value"] = noise
    out = pipe(PROMPT, negative_prompt=NEGATIVE, num_inference_steps=STEPS, guidance_scale=7.5,
               strength=strength, output_type="np", **images).images[0]
    return (out * 255).round().astype(np.uint8)


def ours(pipe, noise, sampler, strength, **images):
    return np.asarray(pipe.generate(PROMPT, negative_prompt=NEGATIVE, steps=STEPS, sampler=sampler,
                                    latents=noise, strength=strength, **images)[0])


@pytest.mark.parametrize("strength", STRENGTHS)
@pytest.mark.parametrize("sampler", list(SCHEDULERS))
def test_img2img_matches_diffusers(tiny_pipeline, img2img_reference, deterministic_reference,
                                   sampler, strength):
    noise = unit_noise()
    want = reference(img2img_reference, deterministic_reference, noise, sampler, strength, image=init_image())
    got = ours(tiny_pipeline, noise, sampler, strength, init_image=init_image())
    assert got.shape == (HEIGHT, WIDTH, 3)
    assert psnr(got, want) >= PARITY_DB


@pytest.mark.parametrize("strength", STRENGTHS)
@pytest.mark.parametrize("sampler", ["euler", "ddim", "dpmpp_2m"])
def test_inpainting_matches_diffusers(inpaint_pipeline, inpaint_reference, deterministic_reference,
                                      sampler, strength):
    noise = unit_noise(1)
    want = reference(inpaint_reference, deterministic_reference, noise, sampler, strength,
                     image=init_image(), mask_image=mask_image(), width=WIDTH, height=HEIGHT)
    got = ours(inpaint_pipeline, noise, sampler, strength, init_image=init_image(), mask_image=mask_image())
    assert psnr(got, want) >= PARITY_DB


def test_strength_and_image_change_the_picture(tiny_pipeline):
    """Controls: another strength, or another init image (at low strength, where the image
    dominates this random model's picture), must fail parity."""
    noise = unit_noise()
    base = ours(tiny_pipeline, noise, "euler", 0.3, init_image=init_image())
    stronger = ours(tiny_pipeline, noise, "euler", 0.75, init_image=init_image())
    flipped = init_image().transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    other = ours(tiny_pipeline, noise, "euler", 0.3, init_image=flipped)
    assert psnr(base, stronger) < PARITY_DB
    assert psnr(base, other) < PARITY_DB


def test_mask_changes_the_inpainting(inpaint_pipeline):
    noise = unit_noise(1)
    base = ours(inpaint_pipeline, noise, "euler", 1.0, init_image=init_image(), mask_image=mask_image())
    inverted = mask_image().point(lambda v: 255 - v)
    other = ours(inpaint_pipeline, noise, "euler", 1.0, init_image=init_image(), mask_image=inverted)
    assert psnr(base, other) < PARITY_DB


def test_init_image_of_another_size_is_cropped_to_cover(tiny_pipeline):
    """The size rule: scale to cover, crop the centre; the default size is the image's own."""
    wide = init_image().resize((WIDTH * 2, HEIGHT))
    image = tiny_pipeline.generate(PROMPT, steps=2, init_image=wide, width=64, height=64)[0]
    assert image.size == (64, 64)
    odd = init_image().crop((0, 0, 90, 61))
    # The tiny UNet has two levels: sizes in multiples of 16.
    assert tiny_pipeline.generate(PROMPT, steps=2, init_image=odd)[0].size == (80, 48)


def test_init_image_from_a_path(tiny_pipeline, tmp_path):
    path = tmp_path / "init.png"
    init_image().save(path)
    noise = unit_noise()
    assert np.array_equal(ours(tiny_pipeline, noise, "euler", 0.5, init_image=path),
                          ours(tiny_pipeline, noise, "euler", 0.5, init_image=init_image()))


@pytest.mark.parametrize("kwargs, message", [
    ({"strength": 1.5}, "strength must be a finite number from 0 to 1"),
    ({"strength": -0.1}, "strength must be a finite number from 0 to 1"),
    ({"strength": 0.1}, "runs no step"),
])
def test_bad_strength_is_a_clear_error(tiny_pipeline, kwargs, message):
    from sdonnx.runtime.errors import InputError

    with pytest.raises(InputError, match=message):
        tiny_pipeline.generate(PROMPT, steps=STEPS, init_image=init_image(), **kwargs)


def test_unreadable_init_image_is_a_clear_error(tiny_pipeline, tmp_path):
    from sdonnx.runtime.errors import InputError

    with pytest.raises(InputError, match="init image not found"):
        tiny_pipeline.generate(PROMPT, init_image=tmp_path / "missing.png")
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not an image")
    with pytest.raises(InputError, match="cannot be read as an image"):
        tiny_pipeline.generate(PROMPT, init_image=broken)


def test_mask_errors_name_the_problem(tiny_pipeline, inpaint_pipeline):
    from sdonnx.runtime.errors import InputError

    with pytest.raises(InputError, match="mask is 32x32 but the init image is 96x64"):
        inpaint_pipeline.generate(PROMPT, init_image=init_image(), mask_image=Image.new("L", (32, 32)))
    with pytest.raises(InputError, match="needs an inpainting model"):
        tiny_pipeline.generate(PROMPT, init_image=init_image(), mask_image=mask_image())
    with pytest.raises(InputError, match="is an inpainting model: it needs an init image and a mask"):
        inpaint_pipeline.generate(PROMPT)
    with pytest.raises(InputError, match="mask_image needs an init_image"):
        inpaint_pipeline.generate(PROMPT, mask_image=mask_image())


def test_size_the_unet_cannot_halve_is_a_clear_error(tiny_pipeline):
    from sdonnx.runtime.errors import InputError

    with pytest.raises(InputError, match="multiples of 16"):
        tiny_pipeline.generate(PROMPT, width=72, height=64)


def test_img2img_without_a_vae_encoder_says_what_to_do(tiny_onnx, tmp_path):
    """A sampler need the model cannot meet: an export without the VAE encoder."""
    import shutil

    from sdonnx import Pipeline
    from sdonnx.runtime.errors import ModelFolderError

    folder = tmp_path / "no-encoder"
    shutil.copytree(tiny_onnx, folder, ignore=shutil.ignore_patterns("vae_encoder"))
    pipe = Pipeline.load(folder, provider="cpu")
    assert pipe.generate(PROMPT, steps=2)[0].size == (64, 64)  # txt2img does not need it
    with pytest.raises(ModelFolderError, match="img2img and inpainting need vae_encoder/model.onnx"):
        pipe.generate(PROMPT, steps=2, init_image=init_image())
