"""Schedules: the timesteps and sigmas diffusers' schedulers pick, and their invariants."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sdonnx.runtime.errors import InputError
from sdonnx.runtime.schedules import (
    SchedulerConfig,
    alphas_cumprod,
    discrete_schedule,
    euler_schedule,
    lcm_schedule,
    multistep_schedule,
    sigma_of_alpha,
)

SD15 = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
            num_train_timesteps=1000, steps_offset=1, set_alpha_to_one=False)
SPACINGS = ["leading", "trailing", "linspace"]


def config(**overrides) -> SchedulerConfig:
    return SchedulerConfig(**{**SD15, **overrides})


@pytest.mark.parametrize("spacing", SPACINGS)
@pytest.mark.parametrize("steps", [1, 2, 6, 20, 50, 999])
def test_euler_sigmas_match_diffusers(spacing, steps):
    from diffusers import EulerDiscreteScheduler

    reference = EulerDiscreteScheduler.from_config({**SD15, "timestep_spacing": spacing})
    reference.set_timesteps(steps)
    ours = euler_schedule(config(timestep_spacing=spacing), steps)
    np.testing.assert_allclose(ours.sigmas, reference.sigmas.numpy(), rtol=1e-5)
    assert ours.noise_scale == pytest.approx(float(reference.init_noise_sigma), rel=1e-5)
    ts = [ours.sigma_to_t(s) for s in ours.sigmas[:-1]]
    np.testing.assert_allclose(ts, reference.timesteps.numpy(), atol=2e-3)


@pytest.mark.parametrize("scheduler", ["DDIMScheduler", "PNDMScheduler"])
@pytest.mark.parametrize("spacing", ["leading"])
@pytest.mark.parametrize("steps", [1, 2, 6, 20, 50])
def test_discrete_timesteps_match_diffusers(scheduler, spacing, steps):
    import diffusers

    reference = getattr(diffusers, scheduler).from_config(
        {**SD15, "timestep_spacing": spacing, "skip_prk_steps": True})
    reference.set_timesteps(steps)
    ours = discrete_schedule(config(timestep_spacing=spacing), steps)
    expected = sorted(set(reference.timesteps.tolist()), reverse=True)
    ts = [round(ours.sigma_to_t(s)) for s in ours.sigmas[:-1]]
    assert ts == expected
    ac = reference.alphas_cumprod.numpy().astype(np.float64)
    np.testing.assert_allclose(ours.sigmas[:-1], sigma_of_alpha(ac[expected]), rtol=1e-5)
    assert ours.sigmas[-1] == pytest.approx(sigma_of_alpha(ac[0]), rel=1e-5)


def test_alphas_match_diffusers():
    from diffusers import DDIMScheduler

    for schedule in ("linear", "scaled_linear", "squaredcos_cap_v2"):
        reference = DDIMScheduler.from_config({**SD15, "beta_schedule": schedule})
        np.testing.assert_allclose(alphas_cumprod(config(beta_schedule=schedule)),
                                   reference.alphas_cumprod.numpy(), rtol=1e-5)


def fits(steps: int, spacing: str, offset: int) -> bool:
    """Whether diffusers accepts the combination: leading timesteps + offset stay below 1000."""
    return spacing != "leading" or (steps - 1) * (1000 // steps) + offset < 1000


@settings(max_examples=200, deadline=None)
@given(steps=st.integers(1, 1000), spacing=st.sampled_from(SPACINGS),
       offset=st.integers(0, 1), beta=st.sampled_from(["linear", "scaled_linear", "squaredcos_cap_v2"]))
def test_euler_sigmas_decrease_to_zero(steps, spacing, offset, beta):
    cfg = config(timestep_spacing=spacing, steps_offset=offset, beta_schedule=beta)
    if not fits(steps, spacing, offset):
        with pytest.raises(InputError, match="go past the model's 1000 training timesteps"):
            euler_schedule(cfg, steps)
        return
    schedule = euler_schedule(cfg, steps)
    sigmas = schedule.sigmas
    assert len(sigmas) == steps + 1 and sigmas[-1] == 0
    assert np.all(np.isfinite(sigmas)) and np.all(np.diff(sigmas) < 0)
    assert np.isfinite(schedule.noise_scale) and schedule.noise_scale > 0


@settings(max_examples=200, deadline=None)
@given(steps=st.integers(1, 1001), spacing=st.sampled_from(SPACINGS), offset=st.integers(0, 1))
def test_discrete_sigmas_decrease(steps, spacing, offset):
    cfg = config(timestep_spacing=spacing, steps_offset=offset)
    if steps > 1000 or not fits(steps, spacing, offset):
        with pytest.raises(InputError, match="training timesteps|steps must be a whole number from 1 to 1000"):
            discrete_schedule(cfg, steps)
        return
    sigmas = discrete_schedule(cfg, steps).sigmas
    assert len(sigmas) == steps + 1
    assert np.all(np.isfinite(sigmas)) and sigmas[-1] > 0
    assert np.all(np.diff(sigmas[:-1]) < 0)
    # The last step reaches a_0's sigma; from timestep 0 it is diffusers' no-op step.
    assert sigmas[-1] < sigmas[-2] or sigmas[-2] == sigmas[-1]


def test_config_errors_name_the_field(tmp_path):
    from sdonnx.runtime import ModelFolderError

    path = tmp_path / "scheduler_config.json"
    path.write_text('{"prediction_type": "sample"}')
    with pytest.raises(ModelFolderError, match="prediction_type 'sample' is not supported"):
        SchedulerConfig.from_file(path)
    with pytest.raises(ModelFolderError, match="scheduler config missing"):
        SchedulerConfig.from_file(tmp_path / "nope.json")


# Every schedule family, by the sampler names that use it.
FAMILIES = {
    "euler": euler_schedule,
    "dpmpp_2m": multistep_schedule,
    "ddim": discrete_schedule,
    "lcm": lcm_schedule,
}
KARRAS = ("euler", "dpmpp_2m")


@pytest.mark.parametrize("spacing", SPACINGS)
@pytest.mark.parametrize("steps", [1, 2, 6, 20, 50])
@pytest.mark.parametrize("scheduler", ["DPMSolverMultistepScheduler", "UniPCMultistepScheduler"])
@pytest.mark.parametrize("karras", [False, True])
def test_multistep_schedule_matches_diffusers(scheduler, spacing, steps, karras):
    import diffusers

    reference = getattr(diffusers, scheduler).from_config(
        {**SD15, "timestep_spacing": spacing, "use_karras_sigmas": karras})
    reference.set_timesteps(steps)
    ours = multistep_schedule(config(timestep_spacing=spacing), steps, karras=karras)
    np.testing.assert_allclose(ours.sigmas, reference.sigmas.numpy(), rtol=1e-5)
    np.testing.assert_array_equal(ours.timesteps, reference.timesteps.numpy())


@pytest.mark.parametrize("scheduler", ["EulerDiscreteScheduler", "HeunDiscreteScheduler", "LMSDiscreteScheduler"])
@pytest.mark.parametrize("spacing", SPACINGS)
@pytest.mark.parametrize("steps", [2, 6, 20])
def test_karras_sigmas_match_diffusers(scheduler, spacing, steps):
    import diffusers

    reference = getattr(diffusers, scheduler).from_config(
        {**SD15, "timestep_spacing": spacing, "use_karras_sigmas": True})
    reference.set_timesteps(steps)
    ours = euler_schedule(config(timestep_spacing=spacing), steps, karras=True)
    sigmas = reference.sigmas.numpy()
    if scheduler == "HeunDiscreteScheduler":  # interleaved: s0, s1, s1, s2, s2, ..., 0
        sigmas = np.append(sigmas[:-1:2], 0.0)
    np.testing.assert_allclose(ours.sigmas, sigmas, rtol=1e-5)
    np.testing.assert_allclose(ours.timesteps, np.unique(reference.timesteps.numpy())[::-1], atol=1e-3)


@pytest.mark.parametrize("steps", [1, 2, 4, 6, 8, 50])
def test_lcm_timesteps_match_diffusers(steps):
    from diffusers import LCMScheduler

    reference = LCMScheduler.from_config(SD15)
    reference.set_timesteps(steps)
    ours = lcm_schedule(config(), steps)
    np.testing.assert_array_equal(ours.timesteps, reference.timesteps.numpy())
    with pytest.raises(InputError, match="at most the model's original_inference_steps"):
        lcm_schedule(config(), 51)


@pytest.mark.parametrize("spacing", ["leading", "linspace", "trailing"])
def test_multistep_schedule_never_repeats_a_timestep(spacing):
    # DPM-Solver and UniPC place steps + 1 points: at 1000 steps of a 1000-timestep model,
    # diffusers' "leading" step ratio is 0 (every timestep 0) and "linspace" rounds two points to
    # one; a step of length 0 divides by 0, so such a count is refused.
    cfg = config(timestep_spacing=spacing)
    if spacing == "trailing":
        assert np.all(np.diff(multistep_schedule(cfg, 1000).sigmas) < 0)
    else:
        with pytest.raises(InputError, match="repeat timesteps.*use at most 999 steps"):
            multistep_schedule(cfg, 1000)
    assert np.all(np.diff(multistep_schedule(cfg, 998).sigmas) < 0)


@pytest.mark.parametrize("scheduler", ["EulerDiscreteScheduler", "DPMSolverMultistepScheduler"])
def test_zero_terminal_snr_matches_diffusers(scheduler):
    import diffusers

    settings_ = {**SD15, "rescale_betas_zero_snr": True, "timestep_spacing": "trailing",
                 "prediction_type": "v_prediction"}
    reference = getattr(diffusers, scheduler).from_config(settings_)
    np.testing.assert_allclose(alphas_cumprod(config(**settings_)), reference.alphas_cumprod.numpy(),
                               rtol=1e-5, atol=1e-9)
    reference.set_timesteps(10)
    family = euler_schedule if scheduler == "EulerDiscreteScheduler" else multistep_schedule
    ours = family(config(**settings_), 10)
    np.testing.assert_allclose(ours.sigmas, reference.sigmas.numpy(), rtol=1e-4)


@settings(max_examples=300, deadline=None)
@given(steps=st.integers(1, 1000), spacing=st.sampled_from(SPACINGS), offset=st.integers(0, 1),
       family=st.sampled_from(list(FAMILIES)), karras=st.booleans(),
       strength=st.one_of(st.none(), st.floats(0, 1)),
       beta=st.sampled_from(["linear", "scaled_linear", "squaredcos_cap_v2"]), zero_snr=st.booleans())
def test_every_schedule_decreases_with_the_right_length(steps, spacing, offset, family, karras, strength,
                                                        beta, zero_snr):
    """Strictly decreasing sigmas, finite, ending at 0 (or the final alpha's sigma for DDIM and
    PNDM), one timestep per step, and int(steps x strength) steps for img2img."""
    cfg = config(timestep_spacing=spacing, steps_offset=offset, beta_schedule=beta,
                 rescale_betas_zero_snr=zero_snr)
    karras = karras and family in KARRAS
    try:
        schedule = FAMILIES[family](cfg, steps, karras=karras)
    except InputError as e:
        # Only the documented refusals: too many steps for the model or for LCM's schedule.
        assert "training timesteps" in str(e) or "original_inference_steps" in str(e)
        return
    if strength is not None:
        expected = min(int(steps * strength), steps)
        schedule = schedule.tail(strength)
        assert schedule.steps == expected
        if expected == 0:
            return
    else:
        assert schedule.steps == steps
    sigmas = schedule.sigmas
    assert len(schedule.timesteps) == schedule.steps
    assert np.all(np.isfinite(sigmas)) and np.all(np.isfinite(schedule.timesteps))
    if family == "ddim":
        assert np.all(np.diff(sigmas[:-1]) < 0) and sigmas[-1] > 0
    else:
        assert sigmas[-1] == 0
        # Karras sigmas of many steps can repeat in float32 near sigma_min, as in diffusers.
        assert np.all(np.diff(sigmas) < 0) or (karras and np.all(np.diff(sigmas) <= 0))
