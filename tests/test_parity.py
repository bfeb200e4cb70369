"""sdonnx against diffusers' StableDiffusionPipeline in torch on the same tiny model.

Same prompt, negative prompt and initial latents; the decoded 8-bit images must agree to at
least 45 dB PSNR (fp32 ONNX against torch reaches about 80-90 dB here). The negative controls
show the check is sharp enough to catch a schedule off by one step or a wrong guidance scale.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from sdonnx.runtime import pipeline as pipeline_module
from sdonnx.runtime.schedules import Schedule

from conftest import psnr

PARITY_DB = 45.0
STEPS = 6
SIZE = (64, 64)
PROMPT, NEGATIVE = "a red circle on a white background", "blurry, low quality"
REFERENCE_SCHEDULERS = {
    "euler": "EulerDiscreteScheduler",
    "ddim": "DDIMScheduler",
    "plms": "PNDMScheduler",
}


def unit_latents(n: int = 1, seed: int = 0) -> np.ndarray:
    h, w = SIZE[1] // 8, SIZE[0] // 8
    return np.random.default_rng(seed).standard_normal((n, 4, h, w), dtype=np.float32)


def reference_images(pipe, sampler: str, latents: np.ndarray, guidance: float = 7.5,
                     steps: int = STEPS, prompt: str = PROMPT, negative: str = NEGATIVE):
    import diffusers

    scheduler_cls = getattr(diffusers, REFERENCE_SCHEDULERS[sampler])
    pipe.scheduler = scheduler_cls.from_config(pipe.scheduler.config)
    out = pipe(
        [prompt] * len(latents),
        negative_prompt=[negative] * len(latents) if guidance > 1 else None,
        num_inference_steps=steps,
        guidance_scale=guidance,
        width=SIZE[0],
        height=SIZE[1],
        latents=torch.from_numpy(latents),
        output_type="np",
    ).images
    return [(im * 255).round().astype(np.uint8) for im in out]


def ours(pipe, sampler: str, latents: np.ndarray, guidance: float = 7.5, steps: int = STEPS):
    images = pipe.generate(PROMPT, negative_prompt=NEGATIVE, steps=steps, guidance=guidance,
                           width=SIZE[0], height=SIZE[1], sampler=sampler, n=len(latents),
                           latents=latents)
    return [np.asarray(im) for im in images]


@pytest.mark.parametrize("sampler", list(REFERENCE_SCHEDULERS))
def test_sampler_matches_diffusers(tiny_pipeline, reference_pipe, sampler):
    latents = unit_latents()
    reference = reference_images(reference_pipe, sampler, latents)[0]
    assert reference.std() > 10, "the reference image is flat; the test model is too weak"
    assert psnr(ours(tiny_pipeline, sampler, latents)[0], reference) >= PARITY_DB


@pytest.mark.parametrize("sampler", list(REFERENCE_SCHEDULERS))
def test_without_guidance_matches_diffusers(tiny_pipeline, reference_pipe, sampler):
    latents = unit_latents(seed=1)
    reference = reference_images(reference_pipe, sampler, latents, guidance=1.0)[0]
    assert psnr(ours(tiny_pipeline, sampler, latents, guidance=1.0)[0], reference) >= PARITY_DB


def test_batch_of_images_matches_diffusers(tiny_pipeline, reference_pipe):
    latents = unit_latents(n=3, seed=2)
    reference = reference_images(reference_pipe, "euler", latents)
    for got, want in zip(ours(tiny_pipeline, "euler", latents), reference):
        assert psnr(got, want) >= PARITY_DB


def test_samplers_give_different_pictures(tiny_pipeline):
    """Without this, a sampler bug could hide behind a model that ignores its input.

    DDIM (eta 0) is the Euler method on other timesteps, so only PLMS is a different method.
    """
    latents = unit_latents()
    images = {s: ours(tiny_pipeline, s, latents)[0] for s in REFERENCE_SCHEDULERS}
    assert psnr(images["euler"], images["plms"]) < PARITY_DB
    assert psnr(images["ddim"], images["plms"]) < PARITY_DB


@pytest.mark.parametrize("sampler", list(REFERENCE_SCHEDULERS))
def test_schedule_shifted_by_one_step_fails_parity(tiny_pipeline, reference_pipe, sampler, monkeypatch):
    """Tell the UNet the timestep of the next step (a classic off-by-one): parity must fail."""
    original = pipeline_module.SAMPLERS[sampler]
    step = 1000 // STEPS

    def shifted(config, steps):
        schedule = original.schedule(config, steps)
        return Schedule(schedule.sigmas, schedule.noise_scale,
                        lambda sigma: max(schedule.sigma_to_t(sigma) - step, 0.0))

    monkeypatch.setitem(pipeline_module.SAMPLERS, sampler, dataclasses.replace(original, schedule=shifted))
    latents = unit_latents()
    reference = reference_images(reference_pipe, sampler, latents)[0]
    assert psnr(ours(tiny_pipeline, sampler, latents)[0], reference) < PARITY_DB


def test_one_step_more_fails_parity(tiny_pipeline, reference_pipe):
    latents = unit_latents()
    reference = reference_images(reference_pipe, "euler", latents)[0]
    assert psnr(ours(tiny_pipeline, "euler", latents, steps=STEPS + 1)[0], reference) < PARITY_DB


@pytest.mark.parametrize("wrong", [6.5, 1.0])
def test_wrong_guidance_scale_fails_parity(tiny_pipeline, reference_pipe, wrong):
    """Guidance off by one (g - 1, a common slip) or ignored: parity must fail."""
    latents = unit_latents()
    reference = reference_images(reference_pipe, "euler", latents, guidance=7.5)[0]
    assert psnr(ours(tiny_pipeline, "euler", latents, guidance=wrong)[0], reference) < PARITY_DB
