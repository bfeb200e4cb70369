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
        with pytest.raises(InputError, match="training timesteps"):
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
