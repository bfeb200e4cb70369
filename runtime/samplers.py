"""Samplers as small pure functions in sigma space, after k-diffusion's `sampling.py`.

Every sampler has the signature `sample_x(denoise, x, sigmas, *, callback=None, ...)`, where
`denoise(x, sigma)` returns the model's estimate of the clean latent (see denoiser.py) and
`sigmas` decreases to the schedule's last sigma. Callbacks receive (step, x, denoised).
"""

from __future__ import annotations

from typing import Callable

import numpy as np

Denoise = Callable[[np.ndarray, float], np.ndarray]
Callback = Callable[[int, np.ndarray, np.ndarray], None] | None


def to_d(x: np.ndarray, sigma: float, denoised: np.ndarray) -> np.ndarray:
    """The ODE derivative dx/dsigma, which is the predicted noise."""
    return (x - denoised) / sigma


def sample_euler(denoise: Denoise, x: np.ndarray, sigmas: np.ndarray, *,
                 callback: Callback = None) -> np.ndarray:
    """Euler method, Algorithm 2 of Karras et al. (2022) without churn."""
    for i in range(len(sigmas) - 1):
        denoised = denoise(x, sigmas[i])
        x = x + to_d(x, sigmas[i], denoised) * (sigmas[i + 1] - sigmas[i])
        if callback:
            callback(i, x, denoised)
    return x


def sample_plms(denoise: Denoise, x: np.ndarray, sigmas: np.ndarray, *,
                callback: Callback = None) -> np.ndarray:
    """Pseudo linear multistep (PLMS), Liu et al. (2022), as diffusers' PNDM with skip_prk_steps.

    Linear multistep on the predicted noise, started with one second-order (Heun) step.
    """
    history: list[np.ndarray] = []
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = denoise(x, sigma)
        eps = to_d(x, sigma, denoised)
        if not history:
            x_euler = x + eps * (sigma_next - sigma)
            eps_prime = (eps + to_d(x_euler, sigma_next, denoise(x_euler, sigma_next))) / 2
        elif len(history) == 1:
            eps_prime = (3 * eps - history[-1]) / 2
        elif len(history) == 2:
            eps_prime = (23 * eps - 16 * history[-1] + 5 * history[-2]) / 12
        else:
            eps_prime = (55 * eps - 59 * history[-1] + 37 * history[-2] - 9 * history[-3]) / 24
        history = [*history[-2:], eps]
        x = x + eps_prime * (sigma_next - sigma)
        if callback:
            callback(i, x, denoised)
    return x
