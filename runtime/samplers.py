"""Samplers as small pure functions in sigma space, after k-diffusion's `sampling.py`.

Every sampler has the signature `sample_x(denoise, x, sigmas, *, callback=None, ...)`, where
`denoise(x, sigma)` returns the model's estimate of the clean latent (see denoiser.py) and
`sigmas` decreases to the schedule's last sigma. x lives in sigma space: x = x0 + sigma * eps.
Stochastic samplers take `noise()`, which returns fresh unit noise shaped like x. Callbacks
receive (step, x, denoised).

Each sampler reproduces one diffusers scheduler step for step (named in its docstring); the
formulas are rewritten from diffusers' variance-preserving form into sigma space, where
x_vp = x / sqrt(1 + sigma^2), alpha_t = 1 / sqrt(1 + sigma^2) and lambda = -log(sigma).
"""

from __future__ import annotations

from typing import Callable

import numpy as np

Denoise = Callable[[np.ndarray, float], np.ndarray]
Callback = Callable[[int, np.ndarray, np.ndarray], None] | None
Noise = Callable[[], np.ndarray]


def to_d(x: np.ndarray, sigma: float, denoised: np.ndarray) -> np.ndarray:
    """The ODE derivative dx/dsigma, which is the predicted noise."""
    return (x - denoised) / sigma


def relabel(x: np.ndarray, sigma: float, new_sigma: float) -> np.ndarray:
    """The same variance-preserving latent, read at another noise level.

    Discrete schedulers step from timestep t to t - T/steps and then evaluate the model at
    the next timestep of their list, which can differ (see schedules.Schedule.targets).
    """
    if sigma == new_sigma:
        return x
    return x * np.sqrt((1.0 + new_sigma**2) / (1.0 + sigma**2))


def ancestral_step(sigma: float, sigma_next: float, eta: float = 1.0) -> tuple[float, float]:
    """(sigma_down, sigma_up): a deterministic step to sigma_down, then noise of sigma_up."""
    if not eta or not sigma_next:
        return sigma_next, 0.0
    up = min(sigma_next, eta * (sigma_next**2 * (sigma**2 - sigma_next**2) / sigma**2) ** 0.5)
    return (sigma_next**2 - up**2) ** 0.5, up


def sample_euler(denoise: Denoise, x: np.ndarray, sigmas: np.ndarray, *,
                 callback: Callback = None) -> np.ndarray:
    """Euler method, Algorithm 2 of Karras et al. (2022) without churn. EulerDiscreteScheduler."""
    for i in range(len(sigmas) - 1):
        denoised = denoise(x, sigmas[i])
        x = x + to_d(x, sigmas[i], denoised) * (sigmas[i + 1] - sigmas[i])
        if callback:
            callback(i, x, denoised)
    return x


def sample_euler_ancestral(denoise: Denoise, x: np.ndarray, sigmas: np.ndarray, *, noise: Noise,
                           eta: float = 1.0, callback: Callback = None) -> np.ndarray:
    """Euler steps to sigma_down plus fresh noise of sigma_up. EulerAncestralDiscreteScheduler."""
    for i in range(len(sigmas) - 1):
        denoised = denoise(x, sigmas[i])
        down, up = ancestral_step(sigmas[i], sigmas[i + 1], eta)
        x = x + to_d(x, sigmas[i], denoised) * (down - sigmas[i])
        if up:
            x = x + noise() * up
        if callback:
            callback(i, x, denoised)
    return x


def sample_ddim(denoise: Denoise, x: np.ndarray, sigmas: np.ndarray, *,
                targets: np.ndarray | None = None, eta: float = 0.0, noise: Noise | None = None,
                callback: Callback = None) -> np.ndarray:
    """DDIM, Song et al. (2021). DDIMScheduler.

    With eta = 0 it is the Euler method on DDIM's timesteps (Karras et al. 2022, sec. 3); with
    eta > 0 DDIM's sigma_t(eta) is exactly the ancestral step's sigma_up.
    """
    targets = sigmas[1:] if targets is None else targets
    for i in range(len(sigmas) - 1):
        denoised = denoise(x, sigmas[i])
        down, up = ancestral_step(sigmas[i], targets[i], eta)
        x = x + to_d(x, sigmas[i], denoised) * (down - sigmas[i])
        if up:
            x = x + noise() * up
        x = relabel(x, targets[i], sigmas[i + 1])
        if callback:
            callback(i, x, denoised)
    return x


def _plms_output(x: np.ndarray, sigma: float, denoised: np.ndarray, prediction_type: str) -> np.ndarray:
    """The model's raw output (noise, or v) recovered from its clean estimate."""
    if prediction_type == "v_prediction":
        return (x / (sigma**2 + 1) - denoised) * np.sqrt(sigma**2 + 1) / sigma
    return to_d(x, sigma, denoised)


def _plms_eps(output: np.ndarray, x: np.ndarray, sigma: float, prediction_type: str) -> np.ndarray:
    """Noise from a raw output, read against the current x and sigma, as PNDM converts it."""
    if prediction_type == "v_prediction":
        return output / np.sqrt(1 + sigma**2) + sigma * x / (1 + sigma**2)
    return output


def sample_plms(denoise: Denoise, x: np.ndarray, sigmas: np.ndarray, *,
                targets: np.ndarray | None = None, plms_source: float | None = None,
                prediction_type: str = "epsilon", callback: Callback = None) -> np.ndarray:
    """Pseudo linear multistep (PLMS), Liu et al. (2022). PNDMScheduler with skip_prk_steps.

    Linear multistep started with one second-order (Heun) step. As in PNDM, the multistep
    combination is taken of the model's raw outputs (v for v-prediction models) and only then
    converted to noise at the current step. `plms_source` is the noise level PNDM's first
    second-order step starts from (the first sigma, except for trailing and linspace spacings).
    """
    targets = sigmas[1:] if targets is None else targets
    history: list[np.ndarray] = []
    for i in range(len(sigmas) - 1):
        sigma = sigmas[i]
        denoised = denoise(x, sigma)
        out = _plms_output(x, sigma, denoised, prediction_type)
        if not history and len(sigmas) > 2:
            eps = _plms_eps(out, x, sigma, prediction_type)
            x_euler = relabel(x + eps * (targets[0] - sigma), targets[0], sigmas[1])
            out_2 = _plms_output(x_euler, sigmas[1], denoise(x_euler, sigmas[1]), prediction_type)
            source = sigma if plms_source is None else plms_source
            x_source = relabel(x, sigma, source)
            eps_prime = _plms_eps((out + out_2) / 2, x_source, source, prediction_type)
            x = x_source + eps_prime * (sigmas[1] - source)
            history = [out]
            if callback:
                callback(i, x, denoised)
            continue
        if len(history) <= 1:
            combined = out if not history else (3 * out - history[-1]) / 2
        elif len(history) == 2:
            combined = (23 * out - 16 * history[-1] + 5 * history[-2]) / 12
        else:
            combined = (55 * out - 59 * history[-1] + 37 * history[-2] - 9 * history[-3]) / 24
        history = [*history[-2:], out]
        eps_prime = _plms_eps(combined, x, sigma, prediction_type)
        x = relabel(x + eps_prime * (targets[i] - sigma), targets[i], sigmas[i + 1])
        if callback:
            callback(i, x, denoised)
    return x


def sample_heun(denoise: Denoise, x: np.ndarray, sigmas: np.ndarray, *,
                callback: Callback = None) -> np.ndarray:
    """Heun's method, Algorithm 1 of Karras et al. (2022) without churn; Euler onto sigma 0.
    HeunDiscreteScheduler."""
    for i in range(len(sigmas) - 1):
        denoised = denoise(x, sigmas[i])
        d = to_d(x, sigmas[i], denoised)
        dt = sigmas[i + 1] - sigmas[i]
        if sigmas[i + 1] == 0:
            x = x + d * dt
        else:
            x_2 = x + d * dt
            d_2 = to_d(x_2, sigmas[i + 1], denoise(x_2, sigmas[i + 1]))
            x = x + (d + d_2) / 2 * dt
        if callback:
            callback(i, x, denoised)
    return x


_GAUSS_NODES, _GAUSS_WEIGHTS = np.polynomial.legendre.leggauss(4)  # exact up to degree 7


def lms_coefficient(sigmas: np.ndarray, i: int, order: int, j: int) -> float:
    """Integral over [sigma_i, sigma_i+1] of the Lagrange basis polynomial of sigma_(i-j).

    The basis has degree order - 1 <= 3, so 4-point Gauss-Legendre quadrature is exact
    (diffusers integrates numerically with scipy to the same value).
    """
    a, b = float(sigmas[i]), float(sigmas[i + 1])
    tau = (b - a) / 2 * _GAUSS_NODES + (a + b) / 2
    basis = np.ones_like(tau)
    for k in range(order):
        if k != j:
            basis *= (tau - sigmas[i - k]) / (sigmas[i - j] - sigmas[i - k])
    return float((b - a) / 2 * np.dot(_GAUSS_WEIGHTS, basis))


def sample_lms(denoise: Denoise, x: np.ndarray, sigmas: np.ndarray, *, order: int = 4,
               callback: Callback = None) -> np.ndarray:
    """Linear multistep on the derivative, exact polynomial integration. LMSDiscreteScheduler."""
    history: list[np.ndarray] = []
    for i in range(len(sigmas) - 1):
        denoised = denoise(x, sigmas[i])
        history = [*history[-(order - 1):], to_d(x, sigmas[i], denoised)]
        current = len(history)
        x = x + sum(lms_coefficient(sigmas, i, current, j) * d
                    for j, d in enumerate(reversed(history)))
        if callback:
            callback(i, x, denoised)
    return x


def sample_dpmpp_2m(denoise: Denoise, x: np.ndarray, sigmas: np.ndarray, *,
                    callback: Callback = None) -> np.ndarray:
    """DPM-Solver++(2M), Lu et al. (2022); first order onto sigma 0.
    DPMSolverMultistepScheduler (dpmsolver++, midpoint)."""
    return sample_dpmpp_2m_sde(denoise, x, sigmas, eta=0.0, callback=callback)


def sample_dpmpp_2m_sde(denoise: Denoise, x: np.ndarray, sigmas: np.ndarray, *, noise: Noise | None = None,
                        eta: float = 1.0, callback: Callback = None) -> np.ndarray:
    """DPM-Solver++(2M) SDE, Lu et al. (2022). DPMSolverMultistepScheduler (sde-dpmsolver++).

    eta = 0 removes the noise and is exactly the (ODE) 2M solver.
    """
    old_denoised = None
    for i in range(len(sigmas) - 1):
        denoised = denoise(x, sigmas[i])
        if sigmas[i + 1] == 0:
            x = denoised
        else:
            h = np.log(sigmas[i] / sigmas[i + 1])
            eta_h = eta * h
            d = denoised
            if old_denoised is not None:
                r = np.log(sigmas[i - 1] / sigmas[i]) / h
                d = denoised + (denoised - old_denoised) / (2 * r)
            x = (sigmas[i + 1] / sigmas[i]) * np.exp(-eta_h) * x - np.expm1(-h - eta_h) * d
            if eta:
                x = x + sigmas[i + 1] * np.sqrt(-np.expm1(-2 * eta_h)) * noise()
        old_denoised = denoised
        if callback:
            callback(i, x, denoised)
    return x


def _unipc_update(x: np.ndarray, sigma: float, sigma_next: float, m0: np.ndarray,
                  earlier: tuple[float, np.ndarray] | None, rho: float | None,
                  m_next: np.ndarray | None = None) -> np.ndarray:
    """One UniPC (bh2, data prediction) update from sigma to sigma_next.

    Predictor: m_next None, `earlier` = (sigma, x0 estimate) of the step before (order 2).
    Corrector: m_next is the model's estimate at sigma_next; the coefficients solve the
    order conditions of Zhao et al. (2023), eq. 8.
    """
    if sigma_next == 0:
        return m0
    h = np.log(sigma / sigma_next)
    hh = -h
    h_phi_1 = np.expm1(hh)
    b_h = np.expm1(hh)
    rks, d1s = [], []
    if earlier is not None:
        rk = np.log(sigma / earlier[0]) / h
        rks.append(rk)
        d1s.append((earlier[1] - m0) / rk)
    rks.append(1.0)
    order = len(rks) if m_next is not None else len(d1s) + 1
    r_mat, b = [], []
    h_phi_k, factorial = h_phi_1 / hh - 1, 1
    for k in range(1, order + 1):
        r_mat.append(np.power(rks, k - 1))
        b.append(h_phi_k * factorial / b_h)
        factorial *= k + 1
        h_phi_k = h_phi_k / hh - 1 / factorial
    x_next = (sigma_next / sigma) * x - h_phi_1 * m0
    if m_next is None:  # predictor
        return x_next - b_h * (rho * d1s[0]) if d1s else x_next
    rhos = np.array([0.5]) if order == 1 else np.linalg.solve(np.array(r_mat), np.array(b))
    correction = rhos[0] * d1s[0] if d1s else 0.0
    return x_next - b_h * (correction + rhos[-1] * (m_next - m0))


def sample_unipc(denoise: Denoise, x: np.ndarray, sigmas: np.ndarray, *,
                 callback: Callback = None) -> np.ndarray:
    """UniPC, Zhao et al. (2023): order-2 predictor, then a corrector reusing the next model
    evaluation; lower order at the start and the final step. UniPCMultistepScheduler (bh2)."""
    n = len(sigmas) - 1
    outputs: list[tuple[float, np.ndarray]] = []  # (sigma, x0 estimate), the last two
    x_last, order = None, 1
    for i in range(n):
        denoised = denoise(x, sigmas[i])
        if x_last is not None:
            earlier = outputs[-2] if order == 2 else None
            x = _unipc_update(x_last, sigmas[i - 1], sigmas[i], outputs[-1][1], earlier, None, denoised)
        outputs = [*outputs[-1:], (sigmas[i], denoised)]
        order = min(2, n - i, i + 1)
        x_last = x
        earlier = outputs[-2] if order == 2 else None
        x = _unipc_update(x, sigmas[i], sigmas[i + 1], denoised, earlier, 0.5)
        if callback:
            callback(i, x, denoised)
    return x


def sample_lcm(denoise: Denoise, x: np.ndarray, sigmas: np.ndarray, *, timesteps: np.ndarray,
               noise: Noise, timestep_scaling: float = 10.0, callback: Callback = None) -> np.ndarray:
    """Latent consistency sampling, Luo et al. (2023): the boundary-condition-scaled clean
    estimate, renoised to the next noise level. LCMScheduler."""
    sigma_data = 0.5
    for i in range(len(sigmas) - 1):
        denoised = denoise(x, sigmas[i])
        scaled_t = float(timesteps[i]) * timestep_scaling
        c_skip = sigma_data**2 / (scaled_t**2 + sigma_data**2)
        c_out = scaled_t / (scaled_t**2 + sigma_data**2) ** 0.5
        consistent = c_out * denoised + c_skip * x / np.sqrt(1.0 + sigmas[i] ** 2)
        x = consistent if sigmas[i + 1] == 0 else consistent + sigmas[i + 1] * noise()
        if callback:
            callback(i, x, consistent)
    return x
