"""Noise schedules computed from a model's scheduler config, in k-diffusion's sigma space.

A latent at training timestep t is x_t = sqrt(a_t) x0 + sqrt(1 - a_t) eps, with a_t the
cumulative product of (1 - beta). Samplers work on x = x_t / sqrt(a_t) = x0 + sigma eps with
sigma_t = sqrt((1 - a_t) / a_t), so one sampler loop serves every scheduler. Timestep choices
(`timestep_spacing`, `steps_offset`, the final alpha) follow diffusers' schedulers exactly, so
that the same config gives the same picture.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Callable

import numpy as np

from sdonnx.runtime.errors import InputError, ModelFolderError

SPACINGS = ("leading", "trailing", "linspace")
PREDICTION_TYPES = ("epsilon", "v_prediction")


@dataclass(frozen=True)
class SchedulerConfig:
    """The fields of a diffusers `scheduler_config.json` that define the noise schedule."""

    num_train_timesteps: int = 1000
    beta_start: float = 0.00085
    beta_end: float = 0.012
    beta_schedule: str = "scaled_linear"
    trained_betas: tuple[float, ...] | None = None
    prediction_type: str = "epsilon"
    # None: each sampler uses the default of its diffusers counterpart.
    timestep_spacing: str | None = None
    steps_offset: int = 0
    set_alpha_to_one: bool = False

    @classmethod
    def from_file(cls, path: str | Path) -> "SchedulerConfig":
        path = Path(path)
        if not path.is_file():
            raise ModelFolderError(f"scheduler config missing: {path}")
        raw = json.loads(path.read_text(encoding="utf-8"))
        known = {f.name for f in fields(cls)}
        values = {k: v for k, v in raw.items() if k in known and v is not None}
        if "trained_betas" in values:
            values["trained_betas"] = tuple(values["trained_betas"])
        config = cls(**values)
        if config.prediction_type not in PREDICTION_TYPES:
            raise ModelFolderError(
                f"{path}: prediction_type {config.prediction_type!r} is not supported "
                f"(supported: {', '.join(PREDICTION_TYPES)})"
            )
        if config.timestep_spacing not in (None, *SPACINGS):
            raise ModelFolderError(
                f"{path}: timestep_spacing {config.timestep_spacing!r} is not one of {SPACINGS}"
            )
        return config

    def spacing(self, default: str) -> str:
        return self.timestep_spacing or default


def betas(config: SchedulerConfig) -> np.ndarray:
    n = config.num_train_timesteps
    if config.trained_betas is not None:
        return np.asarray(config.trained_betas, dtype=np.float64)
    if config.beta_schedule == "linear":
        return np.linspace(config.beta_start, config.beta_end, n, dtype=np.float64)
    if config.beta_schedule == "scaled_linear":
        return np.linspace(config.beta_start**0.5, config.beta_end**0.5, n, dtype=np.float64) ** 2
    if config.beta_schedule == "squaredcos_cap_v2":
        # Nichol & Dhariwal (2021), cosine schedule.
        def alpha_bar(t):
            return np.cos((t + 0.008) / 1.008 * np.pi / 2) ** 2

        t = np.arange(n) / n
        return np.minimum(1 - alpha_bar(t + 1 / n) / alpha_bar(t), 0.999)
    raise ModelFolderError(f"beta_schedule {config.beta_schedule!r} is not supported")


def alphas_cumprod(config: SchedulerConfig) -> np.ndarray:
    # diffusers computes the table in float32; the last bits matter for exact parity.
    return np.cumprod(1.0 - betas(config).astype(np.float32), dtype=np.float32)


def sigma_of_alpha(alpha_bar):
    return ((1 - alpha_bar) / alpha_bar) ** 0.5


@dataclass(frozen=True)
class Schedule:
    """What a sampler run needs: the sigmas to visit and how to talk to the model."""

    sigmas: np.ndarray  # (steps + 1,), decreasing; the last is 0 or the final alpha's sigma
    noise_scale: float  # initial x = unit noise * noise_scale
    sigma_to_t: Callable[[float], float]  # the timestep the UNet is told for a sigma

    @property
    def steps(self) -> int:
        return len(self.sigmas) - 1

    def to_latents(self, x: np.ndarray) -> np.ndarray:
        """Back from sigma space to the VP latent the VAE decodes."""
        return x / np.sqrt(1.0 + float(self.sigmas[-1]) ** 2)


def _timesteps(spacing: str, n_train: int, steps: int, offset: int) -> np.ndarray:
    """diffusers' `set_timesteps` choices, decreasing, as float64."""
    if steps > n_train:
        raise InputError(f"steps must be at most the model's {n_train} training timesteps, got {steps}")
    if spacing == "linspace":
        ts = np.linspace(0, n_train - 1, steps)[::-1].copy()
    elif spacing == "leading":
        ts = (np.arange(steps) * (n_train // steps)).round()[::-1] + offset
    elif spacing == "trailing":
        # diffusers uses np.arange(n_train, 0, -n_train / steps), which float rounding makes one
        # element too long for some counts (121, 201 steps: a last timestep of -1); this is
        # the same values without the extra one.
        ts = (n_train - np.arange(steps) * (n_train / steps)).round() - 1
    else:
        raise InputError(f"unknown timestep spacing {spacing!r}")
    if ts.max() >= n_train:
        raise InputError(
            f"{steps} steps with steps_offset {offset} go past the model's {n_train} training "
            "timesteps; use fewer steps"
        )
    return ts


def _interp_sigma_to_t(table: np.ndarray) -> Callable[[float], float]:
    """Inverse of sigma(t) = interp(t, arange(T), table), the mapping diffusers uses."""
    ts = np.arange(len(table), dtype=np.float64)

    def sigma_to_t(sigma: float) -> float:
        return float(np.interp(float(sigma), table, ts))

    return sigma_to_t


def check_steps(steps: int) -> None:
    if not isinstance(steps, (int, np.integer)) or steps < 1:
        raise InputError(f"steps must be a whole number of at least 1, got {steps!r}")


def discrete_schedule(config: SchedulerConfig, steps: int) -> Schedule:
    """Integer timesteps as DDIMScheduler and PNDMScheduler pick them ("leading" default).

    The last step goes to the final alpha: 1 with `set_alpha_to_one`, else a_0 (so with
    steps_offset 0 the last step, from timestep 0 to a_0, changes nothing, as in diffusers).
    """
    check_steps(steps)
    ac = alphas_cumprod(config).astype(np.float64)
    n_train = config.num_train_timesteps
    ts = _timesteps(config.spacing("leading"), n_train, steps, config.steps_offset)
    ts = ts.round().astype(np.int64)
    final_alpha = 1.0 if config.set_alpha_to_one else ac[0]
    sigmas = np.append(sigma_of_alpha(ac[ts]), sigma_of_alpha(final_alpha))
    return Schedule(sigmas, float(np.sqrt(1.0 + sigmas[0] ** 2)), _interp_sigma_to_t(sigma_of_alpha(ac)))


def euler_schedule(config: SchedulerConfig, steps: int) -> Schedule:
    """Sigmas as EulerDiscreteScheduler picks them ("linspace" default), ending in 0."""
    check_steps(steps)
    table = sigma_of_alpha(alphas_cumprod(config).astype(np.float64))
    spacing = config.spacing("linspace")
    ts = _timesteps(spacing, config.num_train_timesteps, steps, config.steps_offset)
    sigmas = np.interp(ts, np.arange(len(table)), table)
    sigmas = np.append(sigmas, 0.0).astype(np.float32).astype(np.float64)
    sigma_max = float(sigmas[0])
    # diffusers scales the initial noise by sigma_max for these spacings, by the
    # variance-preserving sqrt(sigma_max^2 + 1) for "leading".
    noise_scale = sigma_max if spacing in ("linspace", "trailing") else (sigma_max**2 + 1) ** 0.5
    return Schedule(sigmas, noise_scale, _interp_sigma_to_t(table))
