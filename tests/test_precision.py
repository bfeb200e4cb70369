"""Which UNet evaluations of a bf16 run go to fp32 (runtime/precision.py): pure numpy, any CPU."""

from __future__ import annotations

import numpy as np
import pytest

from sdonnx.runtime.denoiser import Denoiser
from sdonnx.runtime.pipeline import SAMPLERS
from sdonnx.runtime.precision import error_gains, precise_sigmas
from sdonnx.runtime.schedules import SchedulerConfig

SD = SchedulerConfig(steps_offset=1)


def plan(sampler: str, steps: int, schedule: str = "default") -> tuple[np.ndarray, frozenset[float]]:
    chosen = SAMPLERS[sampler]
    run = chosen.schedule(SD, steps, karras=schedule == "karras")
    options = {k: v for k, v in {**run.sampler_kwargs, "noise": None}.items() if k in chosen.options}
    return run.sigmas, precise_sigmas(chosen.sample, run.sigmas, options, guidance=5.0)


def test_euler_gains_are_the_weights_of_each_clean_estimate():
    """Euler's last step lands on the clean estimate: an output error there moves x by sigma;
    the gains of the Gaussian stand-in denoiser are checked against a hand-derived value."""
    sigmas = np.array([2.0, 1.0, 0.0])
    at, gains = error_gains(SAMPLERS["euler"].sample, sigmas, {})
    assert at.tolist() == [2.0, 1.0]
    # Step 0: x1 = x0 + (x0 - d0)/2 * (1 - 2) moves by +e*2/2 = e; step 1 (to 0): x = d1 = x1/2 + err.
    assert gains.tolist() == pytest.approx([0.5, 1.0])


@pytest.mark.parametrize("sampler, steps, schedule", [("euler", 20, "default"), ("dpmpp_2m", 20, "karras"),
                                                      ("euler_a", 100, "karras"), ("ddim", 4, "default")])
def test_runs_that_damp_the_error_stay_all_bf16(sampler, steps, schedule):
    assert plan(sampler, steps, schedule)[1] == frozenset()


def test_lms_karras_100_moves_its_last_extrapolation_to_fp32():
    sigmas, precise = plan("lms", 100, "karras")
    assert precise and min(precise) == pytest.approx(sigmas[-2])
    assert len(precise) <= 4  # the four outputs the last order-4 step weighs, no more


@pytest.mark.parametrize("sampler", ["dpmpp_2m", "unipc", "dpmpp_2m_sde"])
def test_one_karras_step_from_sigma_max_runs_in_fp32(sampler):
    sigmas, precise = plan(sampler, 1, "karras")
    assert precise == frozenset([float(sigmas[0])])


def test_the_denoiser_calls_the_precise_unet_at_those_sigmas_only():
    calls = []

    def unet(name):
        return lambda sample, t, context: calls.append((name, t)) or np.zeros_like(sample)

    denoise = Denoiser(unet("bf16"), np.zeros((1, 77, 8)), 1.0, "epsilon", lambda s: s * 100,
                       precise_unet=unet("fp32"), precise_sigmas=frozenset([2.0]))
    x = np.zeros((1, 4, 2, 2), np.float32)
    denoise(x, np.float64(2.0))
    denoise(x, 1.0)
    assert calls == [("fp32", 200.0), ("bf16", 100.0)]


def test_guidance_multiplies_the_error_so_more_runs_need_fp32():
    chosen = SAMPLERS["euler"]
    run = chosen.schedule(SD, 20)
    assert precise_sigmas(chosen.sample, run.sigmas, {}, guidance=5.0) == frozenset()
    assert float(run.sigmas[0]) in precise_sigmas(chosen.sample, run.sigmas, {}, guidance=15.0)
