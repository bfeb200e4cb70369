"""Noise schedules computed from a model's scheduler config, in k-diffusion's sigma space.

A latent at training timestep t is x_t = sqrt(a_t) x0 + sqrt(1 - a_t) eps, with a_t the
cumulative product of (1 - beta). Samplers work on x = x_t / sqrt(a_t) = x0 + sigma eps with
sigma_t = sqrt((1 - a_t) / a_t), so one sampler loop serves every scheduler. Timestep choices
(`timestep_spacing`, `steps_offset`, the final alpha) follow diffusers' schedulers exactly, so
that the same config gives the same picture.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from pathlib import Path

import numpy as np

from sdonnx.runtime.checks import is_int, is_number, shown
from sdonnx.runtime.errors import InputError, ModelFolderError
from sdonnx.runtime.parts import read_json

SPACINGS = ("leading", "trailing", "linspace")
PREDICTION_TYPES = ("epsilon", "v_prediction")


def _valid_field(name: str, value, default) -> bool:
    """Whether a scheduler_config.json value has the type of SchedulerConfig's field."""
    if name == "trained_betas":
        return isinstance(value, list) and all(is_number(b) and 0 <= b < 1 for b in value)
    if name == "timestep_spacing" or isinstance(default, str):
        return isinstance(value, str)
    if isinstance(default, bool):
        return isinstance(value, bool)
    if isinstance(default, int):
        return is_int(value)
    return is_number(value)


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
    rescale_betas_zero_snr: bool = False
    original_inference_steps: int = 50  # LCM: the distillation schedule's length

    @classmethod
    def from_file(cls, path: str | Path) -> "SchedulerConfig":
        path = Path(path)
        if not path.is_file():
            raise ModelFolderError(f"scheduler config missing: {path}")
        raw = read_json(path)
        known = {f.name: f.default for f in fields(cls)}
        values = {k: v for k, v in raw.items() if k in known and v is not None}
        for name, value in values.items():
            if not _valid_field(name, value, known[name]):
                raise ModelFolderError(f"{path}: {name} {value!r} is not a valid value; repair the file "
                                       "or export the model again")
        if "trained_betas" in values:
            values["trained_betas"] = tuple(values["trained_betas"])
        config = cls(**values)
        ranges = {
            "num_train_timesteps": 2 <= config.num_train_timesteps <= 100_000,
            "steps_offset": 0 <= config.steps_offset < config.num_train_timesteps,
            "original_inference_steps": 1 <= config.original_inference_steps <= config.num_train_timesteps,
            "beta_start and beta_end": 0 < config.beta_start <= config.beta_end < 1,
            "trained_betas": config.trained_betas is None or len(config.trained_betas) == config.num_train_timesteps,
        }
        for name, ok in ranges.items():
            if not ok:
                raise ModelFolderError(f"{path}: {name} out of range (betas in (0, 1), start <= end, one trained "
                                       "beta per training timestep); repair the file or export the model again")
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


def _rescale_zero_terminal_snr(b: np.ndarray) -> np.ndarray:
    """Lin et al. (2023), algorithm 1: shift and scale sqrt(alpha_bar) so the last one is 0."""
    root = np.sqrt(np.cumprod(1.0 - b))
    first, last = root[0], root[-1]
    root = (root - last) * first / (first - last)
    alpha_bar = root**2
    return 1.0 - np.concatenate([alpha_bar[:1], alpha_bar[1:] / alpha_bar[:-1]])


def alphas_cumprod(config: SchedulerConfig) -> np.ndarray:
    # diffusers computes the table in float32; the last bits matter for exact parity.
    b = betas(config).astype(np.float32)
    if config.rescale_betas_zero_snr:
        b = _rescale_zero_terminal_snr(b.astype(np.float64)).astype(np.float32)
    ac = np.cumprod(1.0 - b, dtype=np.float32)
    if config.rescale_betas_zero_snr:
        # A zero terminal SNR is an infinite sigma; diffusers' sigma-based schedulers use
        # 2^-24 instead, and so does every sampler here.
        ac[-1] = 2.0**-24
    return ac


def sigma_of_alpha(alpha_bar):
    return ((1 - alpha_bar) / alpha_bar) ** 0.5


@dataclass(frozen=True)
class Schedule:
    """What a sampler run needs: the sigmas to visit and what to tell the model at each.

    `timesteps[i]` is the UNet timestep for `sigmas[i]`. Discrete schedulers (DDIM, PNDM) step
    from timestep t to t - T/steps, which is not always the next timestep they evaluate
    (trailing and linspace spacings): `targets[i]` is the sigma step i lands on, and the
    sampler carries the latent over to `sigmas[i + 1]` unchanged in diffusers' variance-
    preserving space (see samplers.relabel). `plms_source` is the sigma PNDM's first
    second-order step starts from (t_1 + T/steps).
    """

    sigmas: np.ndarray  # (steps + 1,), decreasing; the last is 0 or the final alpha's sigma
    timesteps: np.ndarray  # (steps,)
    noise_scale: float  # initial x = unit noise * noise_scale
    targets: np.ndarray | None = None
    plms_source: float | None = None

    @property
    def steps(self) -> int:
        return len(self.sigmas) - 1

    def sigma_to_t(self, sigma: float) -> float:
        """The timestep the UNet is told for one of this schedule's sigmas."""
        i = int(np.argmin(np.abs(self.sigmas[:-1] - float(sigma))))
        if not np.isclose(self.sigmas[i], sigma, rtol=1e-6, atol=0):
            raise ValueError(f"sigma {sigma} is not on this schedule")
        return float(self.timesteps[i])

    def to_latents(self, x: np.ndarray) -> np.ndarray:
        """Back from sigma space to the VP latent the VAE decodes."""
        return x / np.sqrt(1.0 + float(self.sigmas[-1]) ** 2)

    def tail(self, strength: float) -> "Schedule":
        """The last steps, for img2img: diffusers' int(steps * strength) of them (at least 0)."""
        start = self.steps - min(int(self.steps * strength), self.steps)
        return replace(
            self,
            sigmas=self.sigmas[start:],
            timesteps=self.timesteps[start:],
            targets=None if self.targets is None else self.targets[start:],
            plms_source=self.plms_source if start == 0 else None,
        )

    @property
    def sampler_kwargs(self) -> dict:
        extra = {"timesteps": self.timesteps}
        if self.targets is not None:
            extra["targets"] = self.targets
        if self.plms_source is not None:
            extra["plms_source"] = self.plms_source
        return extra


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
    _check_range(ts, n_train, steps, offset)
    return ts


def _multistep_timesteps(spacing: str, n_train: int, steps: int, offset: int) -> np.ndarray:
    """DPMSolverMultistep's and UniPC's integer timesteps: steps + 1 points, the last dropped."""
    if steps > n_train:
        raise InputError(f"steps must be at most the model's {n_train} training timesteps, got {steps}")
    if spacing == "linspace":
        ts = np.linspace(0, n_train - 1, steps + 1).round()[::-1][:-1].copy()
    elif spacing == "leading":
        ts = (np.arange(steps + 1) * (n_train // (steps + 1))).round()[::-1][:-1] + offset
    else:
        return _timesteps(spacing, n_train, steps, offset).round()
    if np.any(np.diff(ts) >= 0):
        # As diffusers computes them: with steps >= n_train, "leading"'s step ratio is 0 (every
        # timestep 0) and "linspace" rounds two points to one; a step of length 0 divides by 0.
        raise InputError(f"{steps} steps with {spacing!r} spacing repeat timesteps: this sampler places "
                         f"steps + 1 points among the model's {n_train} training timesteps; "
                         f"use at most {n_train - 1} steps")
    _check_range(ts, n_train, steps, offset)
    return ts


def _check_range(ts: np.ndarray, n_train: int, steps: int, offset: int) -> None:
    if ts.max() >= n_train:
        raise InputError(
            f"{steps} steps with steps_offset {offset} go past the model's {n_train} training "
            "timesteps; use fewer steps"
        )


def _sigma_table(config: SchedulerConfig) -> np.ndarray:
    """sigma for every training timestep, computed in float32 like diffusers."""
    ac = alphas_cumprod(config)
    return (((1 - ac) / ac) ** 0.5).astype(np.float64)


def _log_sigma_to_t(sigmas: np.ndarray, table: np.ndarray) -> np.ndarray:
    """diffusers' `_sigma_to_t`: the timestep by linear interpolation in log sigma."""
    log_table = np.log(table)
    log_sigma = np.log(np.maximum(sigmas, 1e-10))
    low = np.clip(np.searchsorted(log_table, log_sigma, side="right") - 1, 0, len(table) - 2)
    w = np.clip((log_table[low] - log_sigma) / (log_table[low] - log_table[low + 1]), 0, 1)
    return (1 - w) * low + w * (low + 1)


def karras_sigmas(sigma_min: float, sigma_max: float, steps: int, rho: float = 7.0) -> np.ndarray:
    """Karras et al. (2022), eq. 5: sigmas evenly spaced in sigma^(1/rho)."""
    ramp = np.linspace(0, 1, steps)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return (hi + ramp * (lo - hi)) ** rho


MAX_STEPS = 1000  # SD's training timesteps; a model's own count may lower it (see _timesteps)


def check_steps(steps: int) -> None:
    if not is_int(steps) or not 1 <= steps <= MAX_STEPS:
        raise InputError(f"steps must be a whole number from 1 to {MAX_STEPS}, got {shown(steps)}")


def discrete_schedule(config: SchedulerConfig, steps: int, karras: bool = False) -> Schedule:
    """Integer timesteps as DDIMScheduler and PNDMScheduler pick them ("leading" default).

    Each step goes from timestep t to t - T/steps, or to the final alpha (1 with
    `set_alpha_to_one`, else a_0) past 0: with steps_offset 0 the last step, from timestep 0
    to a_0, changes nothing, as in diffusers.
    """
    check_steps(steps)
    if karras:
        raise InputError("Karras sigmas apply to the sigma-based samplers, not to ddim or plms; "
                         "use the default schedule with them")
    ac = alphas_cumprod(config).astype(np.float64)
    n_train = config.num_train_timesteps
    ts = _timesteps(config.spacing("leading"), n_train, steps, config.steps_offset).round().astype(np.int64)
    final_alpha = 1.0 if config.set_alpha_to_one else ac[0]

    def sigma_at(t: int) -> float:
        return float(sigma_of_alpha(ac[t] if t >= 0 else final_alpha))

    ratio = n_train // steps
    sigmas = np.append(sigma_of_alpha(ac[ts]), sigma_of_alpha(final_alpha))
    targets = np.array([sigma_at(t - ratio) for t in ts])
    plms_source = sigma_at(int(ts[1]) + ratio) if steps > 1 else None
    return Schedule(sigmas, ts.astype(np.float64), float(np.sqrt(1.0 + sigmas[0] ** 2)),
                    targets=targets, plms_source=plms_source)


def euler_schedule(config: SchedulerConfig, steps: int, karras: bool = False) -> Schedule:
    """Sigmas as EulerDiscreteScheduler (and Euler ancestral, Heun, LMS) pick them, ending in 0.

    Default spacing "linspace"; Karras sigmas span the chosen timesteps' sigmas.
    """
    check_steps(steps)
    table = _sigma_table(config)
    spacing = config.spacing("linspace")
    ts = _timesteps(spacing, config.num_train_timesteps, steps, config.steps_offset)
    ts = ts.astype(np.float32).astype(np.float64)
    sigmas = np.interp(ts, np.arange(len(table)), table)
    if karras:
        sigmas = karras_sigmas(sigmas[-1], sigmas[0], steps)
        ts = _log_sigma_to_t(sigmas, table)
    sigmas = np.append(sigmas, 0.0).astype(np.float32).astype(np.float64)
    sigma_max = float(sigmas[0])
    # diffusers scales the initial noise by sigma_max for these spacings, by the
    # variance-preserving sqrt(sigma_max^2 + 1) for "leading".
    noise_scale = sigma_max if spacing in ("linspace", "trailing") else (sigma_max**2 + 1) ** 0.5
    return Schedule(sigmas, ts.astype(np.float32).astype(np.float64), noise_scale)


def multistep_schedule(config: SchedulerConfig, steps: int, karras: bool = False) -> Schedule:
    """Integer timesteps as DPMSolverMultistepScheduler and UniPCMultistepScheduler pick them.

    Default spacing "linspace" (steps + 1 points, the last dropped); Karras sigmas span the
    whole training range; the last sigma is 0; unit noise in variance-preserving space.
    """
    check_steps(steps)
    table = _sigma_table(config)
    n_train = config.num_train_timesteps
    ts = _multistep_timesteps(config.spacing("linspace"), n_train, steps, config.steps_offset)
    if karras:
        sigmas = karras_sigmas(table[0], table[-1], steps)
        ts = _log_sigma_to_t(sigmas, table).round()
    else:
        sigmas = np.interp(ts, np.arange(len(table)), table)
    sigmas = np.append(sigmas, 0.0).astype(np.float32).astype(np.float64)
    return Schedule(sigmas, ts.astype(np.float64), float(np.sqrt(1.0 + sigmas[0] ** 2)))


def lcm_schedule(config: SchedulerConfig, steps: int, karras: bool = False) -> Schedule:
    """LCMScheduler's timesteps: evenly spaced picks from the distillation schedule."""
    check_steps(steps)
    if karras:
        raise InputError("Karras sigmas do not apply to lcm; use the default schedule with it")
    original = config.original_inference_steps
    if steps > original:
        raise InputError(f"lcm takes at most the model's original_inference_steps ({original}) steps, got {steps}")
    k = config.num_train_timesteps // original
    origin = (np.arange(1, original + 1) * k - 1)[::-1]
    ts = origin[np.floor(np.linspace(0, len(origin), num=steps, endpoint=False)).astype(np.int64)]
    ac = alphas_cumprod(config).astype(np.float64)
    sigmas = np.append(sigma_of_alpha(ac[ts]), 0.0)
    return Schedule(sigmas, ts.astype(np.float64), float(np.sqrt(1.0 + sigmas[0] ** 2)))
