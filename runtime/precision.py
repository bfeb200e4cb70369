"""Mixed precision for a sampler run: which UNet evaluations a bf16 run must do in fp32.

bf16 keeps 8 significant bits, so the UNet's raw output (noise or v) carries a relative error
of about 0.4% (measured on the embedded model: 0.38% rms at timestep 999). Most sampler runs
damp that error: a 20-step Euler run in bf16 draws the fp32 picture to 52 dB. Some runs amplify
it, and then bf16 draws another picture:

- a step from a high sigma with little left to correct it: the clean estimate is
  x - sigma * eps, so at sigma_max = 14.6 (SD's schedule) the error of eps is multiplied by
  14.6 (1-step runs on Karras or LCM schedules: 24 dB; DPM++ 2M SDE Karras, 4 steps: 17 dB);
- a multistep extrapolation over a long interval: LMS's last step of a 100-step Karras
  schedule integrates a cubic fitted over sigmas 0.004 apart out to 0.041 away, with weights
  of -3.6, 8.8, -7.3, 2.0 on the last four outputs (17.5 dB).

Every sampler is linear in the model's outputs for a given schedule and noise, so how far an
error in one evaluation moves the final latent does not depend on the picture. `error_gains`
measures it once per run by replaying the sampler (a few microseconds of numpy per step) with
the exact denoiser of unit-variance Gaussian data, D(x, sigma) = x / (1 + sigma^2), in place of
the UNet, and a unit error injected into one evaluation per lane. Classifier-free guidance
multiplies the error once more: uncond + g (cond - uncond) carried about g times the error of
one half in bf16 (measured at sigmas 14.6, 1 and 0.1: 2.6-3.0x at g = 3, 4.5-5.2x at g = 5,
14-17x at g = 15; the halves' errors are partly correlated, so less than the independent
sqrt(g^2 + (g - 1)^2)). `precise_sigmas` then picks the evaluations with the largest gains for
fp32 until what is left stays within the budget.

The budget was set on the embedded model at its guidance 5, where all runs of total gain up to
9.5 (1.9 before guidance) drew the fp32 picture to >= 35 dB in bf16 and all from 38 (7.6) up
fell below 35 dB; with it, the worst of the 67 runs that tests/test_providers.py sweeps (every
sampler, both schedules, 1 to 100 steps; LCM 20 aside, whose picture hangs on small
differences whatever the precision) is PLMS with 4 steps at 31.5 dB (seed 3), where even
fp32 draws a shape that is not the prompt's (that run's result hangs on small differences).
"""

from __future__ import annotations

from typing import Callable

import numpy as np

# sqrt(sum of squared gains) that bf16 evaluations may carry, guidance included (see above).
GAIN_BUDGET = 10.0


def output_scale(sigma: float, prediction_type: str) -> float:
    """d(denoised)/d(model output) at sigma: sigma for epsilon, sigma / sqrt(1 + sigma^2) for v."""
    if prediction_type == "v_prediction":
        return sigma / (1.0 + sigma**2) ** 0.5
    return sigma


def error_gains(sample: Callable, sigmas: np.ndarray, options: dict,
                prediction_type: str = "epsilon") -> tuple[np.ndarray, np.ndarray]:
    """(sigma_k, gain_k) for each model evaluation k of `sample(denoise, x, sigmas, **options)`.

    gain_k: the change of the final latent per unit error in the model's raw output at
    evaluation k, float64 arrays of shape (evaluations,). Stochastic samplers run without their
    noise (it adds to the result and does not change the gains).
    """
    options = dict(options)
    sigmas = np.asarray(sigmas, dtype=np.float64)

    def run(lanes: int, inject: bool) -> tuple[np.ndarray, list[float]]:
        seen: list[float] = []

        def denoise(x: np.ndarray, sigma: float) -> np.ndarray:
            sigma = float(sigma)
            denoised = x / (1.0 + sigma**2)
            if inject and len(seen) + 1 < lanes:
                denoised = denoised.copy()
                denoised[len(seen) + 1] += output_scale(sigma, prediction_type)
            seen.append(sigma)
            return denoised

        if "noise" in options:
            options["noise"] = lambda: np.zeros(lanes)
        return sample(denoise, np.zeros(lanes), sigmas, **options), seen

    _, seen = run(1, inject=False)
    x, _ = run(len(seen) + 1, inject=True)
    return np.array(seen), np.abs(x[1:] - x[0])


def precise_sigmas(sample: Callable, sigmas: np.ndarray, options: dict, prediction_type: str = "epsilon",
                   guidance: float = 1.0, budget: float = GAIN_BUDGET) -> frozenset[float]:
    """The sigmas whose UNet evaluations must run in fp32 so that the others' total gain,
    sqrt(sum gain_k^2) times the guidance scale (when above 1), stays within `budget` (empty
    for most runs)."""
    at, gains = error_gains(sample, sigmas, options, prediction_type)
    gains = gains * max(float(guidance), 1.0)
    left = float(np.sum(gains**2))
    chosen: set[float] = set()
    for k in np.argsort(gains)[::-1]:
        if left <= budget**2:
            break
        if float(at[k]) in chosen:
            continue
        # Every evaluation at that sigma runs precisely (Heun evaluates some sigmas twice).
        chosen.add(float(at[k]))
        left -= float(np.sum(gains[at == at[k]] ** 2))
    return frozenset(chosen)
