"""sdonnx against diffusers' StableDiffusionPipeline in torch on the same tiny models.

Every sampler is checked against the diffusers scheduler it reproduces, on an epsilon model
(SD 1.x config) and a v-prediction model with trailing spacing (SD 2.x style). Same prompt,
negative prompt and initial latents; deterministic samplers' decoded 8-bit images must agree
to at least 45 dB PSNR (fp32 ONNX against torch reaches 75-90 dB here). The negative
controls show the check is sharp enough to catch a schedule off by one step or a wrong
guidance scale. Stochastic samplers draw their noise from numpy, not torch, so they are
checked for reproducibility and for the statistics of their pictures over several seeds.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from sdonnx.runtime import pipeline as pipeline_module

from conftest import psnr

PARITY_DB = 45.0
STEPS = 6
SIZE = (64, 64)
PROMPT, NEGATIVE = "a red circle on a white background", "blurry, low quality"
MODELS = {"epsilon": ("tiny_pipeline", "reference_pipe"), "v": ("vpred_pipeline", "vpred_reference")}

# (sampler, schedule) -> the diffusers scheduler and the config it needs.
DETERMINISTIC = {
    ("euler", "default"): ("EulerDiscreteScheduler", {}),
    ("euler", "karras"): ("EulerDiscreteScheduler", {"use_karras_sigmas": True}),
    ("heun", "default"): ("HeunDiscreteScheduler", {}),
    ("heun", "karras"): ("HeunDiscreteScheduler", {"use_karras_sigmas": True}),
    ("lms", "default"): ("LMSDiscreteScheduler", {}),
    ("lms", "karras"): ("LMSDiscreteScheduler", {"use_karras_sigmas": True}),
    ("ddim", "default"): ("DDIMScheduler", {}),
    ("plms", "default"): ("PNDMScheduler", {"skip_prk_steps": True}),
    ("dpmpp_2m", "default"): ("DPMSolverMultistepScheduler", {}),
    ("dpmpp_2m", "karras"): ("DPMSolverMultistepScheduler", {"use_karras_sigmas": True}),
    ("unipc", "default"): ("UniPCMultistepScheduler", {}),
    ("unipc", "karras"): ("UniPCMultistepScheduler", {"use_karras_sigmas": True}),
}
STOCHASTIC = {
    ("euler_a", "default", None): ("EulerAncestralDiscreteScheduler", {}),
    ("dpmpp_2m_sde", "default", None): ("DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++"}),
    ("dpmpp_2m_sde", "karras", None): ("DPMSolverMultistepScheduler",
                                       {"algorithm_type": "sde-dpmsolver++", "use_karras_sigmas": True}),
    ("ddim", "default", 1.0): ("DDIMScheduler", {}),
    ("lcm", "default", None): ("LCMScheduler", {}),
}


def unit_latents(n: int = 1, seed: int = 0) -> np.ndarray:
    h, w = SIZE[1] // 8, SIZE[0] // 8
    return np.random.default_rng(seed).standard_normal((n, 4, h, w), dtype=np.float32)


def use_scheduler(pipe, name: str, overrides: dict) -> None:
    import diffusers

    pipe.scheduler = getattr(diffusers, name).from_config({**pipe.base_scheduler_config, **overrides})


def reference_images(pipe, latents: np.ndarray, guidance: float = 7.5, steps: int = STEPS,
                     seed: int | None = None, eta: float | None = None):
    extra = {} if eta is None else {"eta": eta}
    out = pipe(
        [PROMPT] * len(latents),
        negative_prompt=[NEGATIVE] * len(latents) if guidance > 1 else None,
        num_inference_steps=steps,
        guidance_scale=guidance,
        width=SIZE[0],
        height=SIZE[1],
        latents=torch.from_numpy(latents),
        generator=None if seed is None else torch.Generator().manual_seed(seed),
        output_type="np",
        **extra,
    ).images
    return [(im * 255).round().astype(np.uint8) for im in out]


def ours(pipe, sampler: str, latents: np.ndarray, guidance: float = 7.5, steps: int = STEPS,
         schedule: str = "default", seed: int = 0, eta: float | None = None):
    images = pipe.generate(PROMPT, negative_prompt=NEGATIVE, steps=steps, guidance=guidance,
                           width=SIZE[0], height=SIZE[1], sampler=sampler, n=len(latents),
                           latents=latents, schedule=schedule, seed=seed, eta=eta)
    return [np.asarray(im) for im in images]


@pytest.fixture(params=list(MODELS))
def model(request):
    """(sdonnx pipeline, diffusers pipeline) for one prediction type."""
    ours_name, reference_name = MODELS[request.param]
    return request.getfixturevalue(ours_name), request.getfixturevalue(reference_name)


@pytest.mark.parametrize("sampler,schedule", list(DETERMINISTIC))
def test_sampler_matches_diffusers(model, sampler, schedule):
    pipe, reference_pipe = model
    use_scheduler(reference_pipe, *DETERMINISTIC[sampler, schedule])
    latents = unit_latents()
    reference = reference_images(reference_pipe, latents)[0]
    assert reference.std() > 10, "the reference image is flat; the test model is too weak"
    assert psnr(ours(pipe, sampler, latents, schedule=schedule)[0], reference) >= PARITY_DB


@pytest.mark.parametrize("sampler", ["euler", "ddim", "plms", "dpmpp_2m"])
def test_without_guidance_matches_diffusers(tiny_pipeline, reference_pipe, sampler):
    use_scheduler(reference_pipe, *DETERMINISTIC[sampler, "default"])
    latents = unit_latents(seed=1)
    reference = reference_images(reference_pipe, latents, guidance=1.0)[0]
    assert psnr(ours(tiny_pipeline, sampler, latents, guidance=1.0)[0], reference) >= PARITY_DB


def test_batch_of_images_matches_diffusers(tiny_pipeline, reference_pipe):
    use_scheduler(reference_pipe, *DETERMINISTIC["euler", "default"])
    latents = unit_latents(n=3, seed=2)
    reference = reference_images(reference_pipe, latents)
    for got, want in zip(ours(tiny_pipeline, "euler", latents), reference):
        assert psnr(got, want) >= PARITY_DB


def test_samplers_give_different_pictures(tiny_pipeline):
    """Without this, a sampler bug could hide behind a model that ignores its input.

    Each higher-order method must differ from the Euler method. (DDIM with eta 0 is the Euler
    method on other timesteps, and Karras sigmas change this model's pictures too little to
    tell apart at 6 steps; the shifted-schedule control below covers them.)
    """
    latents = unit_latents()
    euler = ours(tiny_pipeline, "euler", latents)[0]
    for sampler in ("heun", "lms", "plms", "dpmpp_2m", "unipc"):
        assert psnr(ours(tiny_pipeline, sampler, latents)[0], euler) < PARITY_DB, sampler


@pytest.mark.parametrize("sampler,schedule", list(DETERMINISTIC))
def test_schedule_shifted_by_one_step_fails_parity(model, sampler, schedule, monkeypatch):
    """Tell the UNet the timestep of the next step (a classic off-by-one): parity must fail."""
    pipe, reference_pipe = model
    original = pipeline_module.SAMPLERS[sampler]
    step = 1000 // STEPS

    def shifted(config, steps, karras=False):
        schedule_ = original.schedule(config, steps, karras)
        return dataclasses.replace(schedule_, timesteps=np.maximum(schedule_.timesteps - step, 0))

    monkeypatch.setitem(pipeline_module.SAMPLERS, sampler, dataclasses.replace(original, schedule=shifted))
    use_scheduler(reference_pipe, *DETERMINISTIC[sampler, schedule])
    latents = unit_latents()
    reference = reference_images(reference_pipe, latents)[0]
    assert psnr(ours(pipe, sampler, latents, schedule=schedule)[0], reference) < PARITY_DB


def test_one_step_more_fails_parity(tiny_pipeline, reference_pipe):
    use_scheduler(reference_pipe, *DETERMINISTIC["euler", "default"])
    latents = unit_latents()
    reference = reference_images(reference_pipe, latents)[0]
    assert psnr(ours(tiny_pipeline, "euler", latents, steps=STEPS + 1)[0], reference) < PARITY_DB


@pytest.mark.parametrize("wrong", [6.5, 1.0])
def test_wrong_guidance_scale_fails_parity(tiny_pipeline, reference_pipe, wrong):
    """Guidance off by one (g - 1, a common slip) or ignored: parity must fail."""
    use_scheduler(reference_pipe, *DETERMINISTIC["euler", "default"])
    latents = unit_latents()
    reference = reference_images(reference_pipe, latents, guidance=7.5)[0]
    assert psnr(ours(tiny_pipeline, "euler", latents, guidance=wrong)[0], reference) < PARITY_DB


@pytest.mark.parametrize("sampler,schedule,eta", list(STOCHASTIC))
def test_stochastic_sampler_repeats_with_the_same_seed(tiny_pipeline, sampler, schedule, eta):
    latents = unit_latents()
    first = ours(tiny_pipeline, sampler, latents, schedule=schedule, seed=3, eta=eta)[0]
    again = ours(tiny_pipeline, sampler, latents, schedule=schedule, seed=3, eta=eta)[0]
    other = ours(tiny_pipeline, sampler, latents, schedule=schedule, seed=4, eta=eta)[0]
    assert np.array_equal(first, again)
    assert not np.array_equal(first, other), "the seed does not reach the sampler's noise"


NOISE_SEEDS = range(6)


def noise_spread(images) -> float:
    """How far the step noise moves the picture: per-pixel std over noise seeds, averaged."""
    return float(np.stack(images).astype(np.float64).std(axis=0).mean())


def stochastic_spreads(pipe, reference_pipe, sampler, schedule, eta, our_eta):
    use_scheduler(reference_pipe, *STOCHASTIC[sampler, schedule, eta])
    latents = unit_latents()
    got = [ours(pipe, sampler, latents, schedule=schedule, seed=seed, eta=our_eta)[0] for seed in NOISE_SEEDS]
    want = [reference_images(reference_pipe, latents, seed=100 + seed, eta=eta)[0] for seed in NOISE_SEEDS]
    return noise_spread(got), noise_spread(want)


@pytest.mark.parametrize("sampler,schedule,eta", list(STOCHASTIC))
def test_stochastic_sampler_statistics_match_diffusers(model, sampler, schedule, eta):
    """Same initial latents, 6 noise seeds each (numpy here, torch there): the spread the step
    noise adds to the picture must match diffusers'.

    Measured ratios are 0.97-1.00 for every sampler; half the noise (eta 0.5 instead of 1)
    gives 0.66 and no noise 0 (see the control below), so 0.85-1.18 separates them.
    """
    pipe, reference_pipe = model
    got, want = stochastic_spreads(pipe, reference_pipe, sampler, schedule, eta, eta)
    assert want > 1.0, "the step noise does not show in the reference pictures; the model is too weak"
    assert 0.85 <= got / want <= 1.18, (got, want)


@pytest.mark.parametrize("sampler,eta", [("euler_a", 0.5), ("ddim", 0.0)])
def test_wrong_amount_of_noise_fails_statistics(tiny_pipeline, reference_pipe, sampler, eta):
    reference_eta = 1.0 if sampler == "ddim" else None
    got, want = stochastic_spreads(tiny_pipeline, reference_pipe, sampler, "default", reference_eta, eta)
    assert not 0.85 <= got / want <= 1.18, (got, want)
