"""Depth-to-image (export/depth.py, runtime/depth.py) against diffusers'
StableDiffusionDepth2ImgPipeline on a tiny random model with a tiny DPT-Hybrid estimator."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import OUTPUT_GAIN, TIME_GAIN, _export, psnr
from sdonnx.runtime import depth, parts
from sdonnx.runtime.errors import InputError

pytestmark = pytest.mark.slow
PROMPT = "a red circle on a white background"


@pytest.fixture(scope="module")
def depth_source(tmp_path_factory):
    from sdonnx.export.depth import build_random_depth2img

    return build_random_depth2img(tmp_path_factory.mktemp("depth") / "diffusers", output_gain=OUTPUT_GAIN,
                                  time_gain=TIME_GAIN)


@pytest.fixture(scope="module")
def depth_folder(depth_source, tmp_path_factory):
    return _export(depth_source, tmp_path_factory, "depth-export")


@pytest.fixture(scope="module")
def depth_pipeline(depth_folder):
    from sdonnx.runtime import Pipeline

    return Pipeline.load(depth_folder, provider="cpu")


@pytest.fixture(scope="module")
def reference(depth_source):
    from diffusers import EulerDiscreteScheduler, StableDiffusionDepth2ImgPipeline

    pipe = StableDiffusionDepth2ImgPipeline.from_pretrained(depth_source)
    pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture
def given_noise(monkeypatch):
    """diffusers' depth2img with the posterior mean and the given noise, as sdonnx's img2img."""
    from diffusers.pipelines.stable_diffusion import pipeline_stable_diffusion_depth2img as module

    noise = {}
    monkeypatch.setattr(module, "retrieve_latents", lambda out, generator=None, sample_mode="sample":
                        out.latent_dist.mean)
    monkeypatch.setattr(module, "randn_tensor", lambda shape, generator=None, device=None, dtype=None, layout=None:
                        torch.from_numpy(noise["value"]).to(dtype))
    return noise


def picture(seed: int, size: int = 64) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size // 4, size // 4, 3)).astype(np.uint8)).resize(
        (size, size), Image.Resampling.BICUBIC)


def test_depth_estimator_equals_transformers(depth_pipeline, reference):
    """The part on sdonnx's preprocessing against DPT on DPTImageProcessor's, on pictures of
    several sizes and aspect ratios: max abs diff <= 1e-3 of the depth's range."""
    for seed, size in enumerate([(64, 64), (96, 40), (33, 71)]):
        image = picture(seed).resize(size)
        pixels = reference.feature_extractor(images=[image], return_tensors="pt").pixel_values
        ours = depth.estimator_input(image, depth_pipeline.config.path / parts.DEPTH_ESTIMATOR.name)
        assert np.abs(ours - pixels.numpy()).max() <= 1e-5
        with torch.no_grad():
            expected = reference.depth_estimator(pixels).predicted_depth.numpy()
        with depth_pipeline.using(parts.DEPTH_ESTIMATOR) as estimator:
            got = estimator(pixel_values=ours)[parts.DEPTH_ESTIMATOR.output]
        assert np.abs(got - expected).max() <= 1e-3 * np.ptp(expected)


def test_bicubic_resize_equals_torch():
    rng = np.random.default_rng(0)
    for shape, size in [((32, 32), (8, 8)), ((30, 50), (13, 7)), ((5, 6), (16, 20))]:
        depth_map = rng.standard_normal(shape)
        expected = torch.nn.functional.interpolate(torch.from_numpy(depth_map)[None, None], size=size,
                                                   mode="bicubic", align_corners=False)[0, 0].numpy()
        assert np.abs(depth.resize_bicubic(depth_map, *size) - expected).max() <= 1e-9
    # negative control: PIL's bicubic (a = -0.5, antialiased) is another filter
    pil = np.asarray(Image.fromarray(depth_map.astype(np.float32), "F").resize(size[::-1], Image.Resampling.BICUBIC))
    assert np.abs(pil - expected).max() > 1e-3


@pytest.mark.parametrize("strength, guidance", [(0.8, 7.5), (1.0, 1.0)])
def test_generate_equals_diffusers(depth_pipeline, reference, given_noise, strength, guidance):
    image = picture(7)
    noise = np.random.default_rng(1).standard_normal((1, 4, 8, 8), dtype=np.float32)
    given_noise["value"] = noise
    expected = reference(PROMPT, image=image, strength=strength, num_inference_steps=6,
                         guidance_scale=guidance).images[0]
    ours = depth_pipeline.generate(PROMPT, init_image=image, strength=strength, steps=6, guidance=guidance,
                                   latents=noise, sampler="euler")[0]
    assert psnr(np.asarray(ours, np.float64), np.asarray(expected, np.float64)) >= 45


def test_given_depth_map_equals_diffusers_and_matters(depth_pipeline, reference, given_noise, tmp_path):
    image = picture(7)  # (the tiny random DPT's ReLU head estimates some pictures as flat: all 0)
    noise = np.random.default_rng(2).standard_normal((1, 4, 8, 8), dtype=np.float32)
    given_noise["value"] = noise
    depth_map = (np.random.default_rng(3).random((8, 8)) * 65535).astype(np.uint16)
    depth_file = tmp_path / "depth.png"
    Image.fromarray(depth_map).resize((64, 64), Image.Resampling.BICUBIC).save(depth_file)  # 16-bit grey
    values = np.asarray(Image.open(depth_file)).astype(np.float32)
    expected = reference(PROMPT, image=image, depth_map=torch.from_numpy(values)[None], strength=0.9,
                         num_inference_steps=5).images[0]
    ours = depth_pipeline.generate(PROMPT, init_image=image, depth_map=depth_file, strength=0.9, steps=5,
                                   latents=noise, sampler="euler")[0]
    assert psnr(np.asarray(ours, np.float64), np.asarray(expected, np.float64)) >= 45
    estimated = depth_pipeline.generate(PROMPT, init_image=image, strength=0.9, steps=5, latents=noise,
                                        sampler="euler")[0]
    assert psnr(np.asarray(estimated, np.float64), np.asarray(expected, np.float64)) < 40  # the map is used


def test_refusals(depth_pipeline, tiny_pipeline, tmp_path):
    with pytest.raises(InputError, match="needs an init image"):
        depth_pipeline.generate(PROMPT, steps=2)
    Image.new("L", (32, 64)).save(tmp_path / "wrong.png")
    with pytest.raises(InputError, match="the depth map is 32x64 but the init image is 64x64"):
        depth_pipeline.generate(PROMPT, init_image=picture(1), depth_map=tmp_path / "wrong.png", steps=2)
    Image.new("L", (64, 64), 90).save(tmp_path / "flat.png")
    with pytest.raises(InputError, match="flat"):
        depth_pipeline.generate(PROMPT, init_image=picture(1), depth_map=tmp_path / "flat.png", steps=2)
    with pytest.raises(InputError, match="needs a depth-to-image model"):
        tiny_pipeline.generate(PROMPT, init_image=picture(1), depth_map=tmp_path / "flat.png", steps=2)


def test_cli_depth_map_equals_api(depth_folder, depth_pipeline, tmp_path):
    picture(9).save(tmp_path / "init.png")
    depth_map = np.linspace(0, 255, 64 * 64).reshape(64, 64).astype(np.uint8)
    Image.fromarray(depth_map).save(tmp_path / "depth.png")
    run = subprocess.run([sys.executable, "-m", "sdonnx.cli.app", "generate", PROMPT, "--model", str(depth_folder),
                          "--init-image", str(tmp_path / "init.png"), "--depth-map", str(tmp_path / "depth.png"),
                          "--steps", "4", "--seed", "3", "--provider", "cpu", "-o", str(tmp_path / "out.png")],
                         capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    api = depth_pipeline.generate(PROMPT, init_image=tmp_path / "init.png", depth_map=tmp_path / "depth.png",
                                  steps=4, seed=3)[0]
    assert np.array_equal(np.asarray(Image.open(tmp_path / "out.png")), np.asarray(api))
    run = subprocess.run([sys.executable, "-m", "sdonnx.cli.app", "generate", PROMPT, "--depth-map",
                          str(tmp_path / "depth.png"), "-o", str(tmp_path / "x.png")], capture_output=True, text=True)
    assert run.returncode == 2 and "--depth-map needs --init-image" in run.stderr
