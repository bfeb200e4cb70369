"""Text-to-image from a folder of ONNX models: short steps composed, no torch."""

from __future__ import annotations

import importlib.util
import json
import os
import random
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image

from sdonnx.runtime import parts, providers
from sdonnx.runtime.denoiser import Denoiser
from sdonnx.runtime.errors import InputError, ModelFolderError
from sdonnx.runtime.infotext import infotext
from sdonnx.runtime.onnx_model import OnnxModel
from sdonnx.runtime.samplers import sample_euler, sample_plms
from sdonnx.runtime.schedules import (
    SchedulerConfig,
    check_steps,
    discrete_schedule,
    euler_schedule,
)
from sdonnx.runtime.tokenizer import CLIPTokenizer


@dataclass(frozen=True)
class Sampler:
    label: str  # the name AUTOMATIC1111's web UI gives it, for the PNG parameters
    sample: Callable
    schedule: Callable


SAMPLERS = {
    "euler": Sampler("Euler", sample_euler, euler_schedule),
    # DDIM with eta = 0 is the Euler method on DDIM's timesteps (Karras et al. 2022, sec. 3).
    "ddim": Sampler("DDIM", sample_euler, discrete_schedule),
    "plms": Sampler("PLMS", sample_plms, discrete_schedule),
}


@dataclass(frozen=True)
class LoadConfig:
    """How a model folder is loaded: fixed for the life of a Pipeline."""

    path: Path
    provider: str = "cpu"
    threads: int | None = None


@dataclass(frozen=True)
class GenerationConfig:
    """One generate() call's parameters."""

    prompt: str
    negative_prompt: str = ""
    steps: int = 20
    guidance: float = 7.5
    seed: int | None = 0
    width: int | None = None  # None: the model's native size
    height: int | None = None
    sampler: str = "euler"
    n: int = 1

    def validate(self) -> "GenerationConfig":
        if not isinstance(self.prompt, str) or not isinstance(self.negative_prompt, str):
            raise InputError("prompt and negative prompt must be text")
        check_steps(self.steps)
        for name, size in (("width", self.width), ("height", self.height)):
            if size is None:
                continue
            if not isinstance(size, (int, np.integer)) or size < parts.VAE_SCALE or size % parts.VAE_SCALE:
                raise InputError(
                    f"{name} must be a positive multiple of {parts.VAE_SCALE}, got {size!r}"
                )
        if self.sampler not in SAMPLERS:
            raise InputError(
                f"unknown sampler {self.sampler!r}; choose one of: {', '.join(SAMPLERS)}"
            )
        if not isinstance(self.n, (int, np.integer)) or self.n < 1:
            raise InputError(f"n (images per call) must be at least 1, got {self.n!r}")
        if self.seed is not None and not (0 <= self.seed < 2**63):
            raise InputError(f"seed must be a non-negative integer, got {self.seed!r}")
        if self.guidance < 0:
            raise InputError(f"guidance must be >= 0, got {self.guidance!r}")
        return self if self.seed is not None else replace(self, seed=random.randrange(2**32))

    @property
    def latent_shape(self) -> tuple[int, int, int, int]:
        return (self.n, parts.LATENT_CHANNELS, self.height // parts.VAE_SCALE, self.width // parts.VAE_SCALE)


def check_model_folder(path: Path) -> None:
    """Fail naming every file a Stable Diffusion ONNX folder needs but lacks."""
    if not path.is_dir():
        raise ModelFolderError(f"model folder not found: {path}")
    needed = [p.onnx_path for p in parts.PARTS if p.required]
    needed += [f"{parts.TOKENIZER_DIR}/vocab.json", f"{parts.TOKENIZER_DIR}/merges.txt"]
    needed.append(parts.SCHEDULER_CONFIG)
    missing = [name for name in needed if not (path / name).is_file()]
    if missing:
        raise ModelFolderError(
            f"{path} is not a complete Stable Diffusion ONNX folder; missing: {', '.join(missing)}. "
            "Export one with `sdonnx export SOURCE OUT`."
        )


def default_model_path() -> Path:
    """$SDONNX_MODEL, else the embedded default model (the folder models/default)."""
    if os.environ.get("SDONNX_MODEL"):
        return Path(os.environ["SDONNX_MODEL"])
    spec = importlib.util.find_spec("sdonnx.models")
    if spec is None or not spec.submodule_search_locations:
        raise ModelFolderError("no default model is installed; pass a model folder")
    return Path(next(iter(spec.submodule_search_locations))) / "default"


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


class Pipeline:
    """A loaded model folder. `generate` turns a prompt into PIL images (info: "parameters", "seed")."""

    def __init__(self, config: LoadConfig):
        path = config.path
        check_model_folder(path)
        self.config = config
        self.tokenizer = CLIPTokenizer.from_dir(path / parts.TOKENIZER_DIR)
        self.scheduler = SchedulerConfig.from_file(path / parts.SCHEDULER_CONFIG)
        vae_config = _read_json(path / parts.VAE_DECODER.name / "config.json")
        self.vae_scaling_factor = vae_config.get("scaling_factor", parts.DEFAULT_VAE_SCALING_FACTOR)
        # The size the UNet was trained at, as diffusers defaults to it (SD 1.x: 512).
        latent_size = _read_json(path / parts.UNET.name / "config.json").get("sample_size", 64)
        self.native_size = int(latent_size) * parts.VAE_SCALE

        def load(part: parts.Part) -> OnnxModel:
            return OnnxModel(path / part.onnx_path, part, config.provider, config.threads)

        self.text_encoder = load(parts.TEXT_ENCODER)
        self.unet = load(parts.UNET)
        self.vae_decoder = load(parts.VAE_DECODER)

    @classmethod
    def load(cls, path: str | Path | None = None, provider: str = "auto",
             threads: int | None = None) -> "Pipeline":
        """Load a model folder (default: the embedded model, or $SDONNX_MODEL)."""
        if path is None:
            path = default_model_path()
            if not path.is_dir():
                raise ModelFolderError(
                    f"the embedded default model is missing ({path}); pass a model folder, "
                    "or set SDONNX_MODEL"
                )
        return cls(LoadConfig(Path(path), providers.resolve(provider), threads))

    @property
    def name(self) -> str:
        return self.config.path.resolve().name

    def encode_prompt(self, prompt: str) -> np.ndarray:
        ids = self.tokenizer([prompt]).astype(self.text_encoder.dtype("input_ids"))
        return self.text_encoder(input_ids=ids)[parts.TEXT_ENCODER.output]

    def _unet(self, sample: np.ndarray, t: float, context: np.ndarray) -> np.ndarray:
        dtype = self.unet.dtype("timestep")
        t = round(t) if np.issubdtype(dtype, np.integer) else t
        rank = len(self.unet.shape("timestep"))
        timestep = np.full((len(sample),) * rank, t, dtype=dtype)
        sample_dtype = self.unet.dtype("sample")
        out = self.unet(
            sample=sample.astype(sample_dtype),
            timestep=timestep,
            encoder_hidden_states=context.astype(self.unet.dtype("encoder_hidden_states")),
        )[parts.UNET.output]
        return out.astype(np.float32)

    def decode(self, latents: np.ndarray) -> list[Image.Image]:
        """VAE-decode one latent at a time (bounded memory) into 8-bit RGB images."""
        images = []
        dtype = self.vae_decoder.dtype("latent_sample")
        for latent in latents:
            scaled = (latent[None] / self.vae_scaling_factor).astype(dtype)
            pixels = self.vae_decoder(latent_sample=scaled)[parts.VAE_DECODER.output][0]
            pixels = np.clip(pixels.astype(np.float32) / 2 + 0.5, 0, 1)
            images.append(Image.fromarray((pixels.transpose(1, 2, 0) * 255).round().astype(np.uint8)))
        return images

    def initial_noise(self, config: GenerationConfig) -> np.ndarray:
        """Unit normal noise; image i uses seed + i so any image of a batch can be redone alone."""
        _, c, h, w = config.latent_shape
        return np.stack([
            np.random.default_rng(config.seed + i).standard_normal((c, h, w), dtype=np.float32)
            for i in range(config.n)
        ])

    def generate(self, prompt: str, negative_prompt: str = "", steps: int = 20,
                 guidance: float = 7.5, seed: int | None = 0, width: int | None = None,
                 height: int | None = None,
                 sampler: str = "euler", n: int = 1, latents: np.ndarray | None = None,
                 callback: Callable[[int, int], None] | None = None) -> list[Image.Image]:
        """Generate `n` images; `latents` (n, 4, H/8, W/8) of unit noise replaces the seeded noise.

        Width and height default to the model's native size (512 for SD 1.x).
        `callback(step, total_steps)` is called after every sampler step.
        """
        width = width or self.native_size
        height = height or self.native_size
        config = GenerationConfig(prompt, negative_prompt, steps, guidance, seed, width, height,
                                  sampler, n).validate()
        if latents is None:
            latents = self.initial_noise(config)
        elif np.shape(latents) != config.latent_shape:
            raise InputError(
                f"latents must have shape {config.latent_shape} for n={n}, {width}x{height}; "
                f"got {np.shape(latents)}"
            )
        chosen = SAMPLERS[config.sampler]
        schedule = chosen.schedule(self.scheduler, config.steps)
        context = np.repeat(self.encode_prompt(config.prompt), config.n, axis=0)
        if config.guidance > 1.0:
            negative = np.repeat(self.encode_prompt(config.negative_prompt), config.n, axis=0)
            context = np.concatenate([negative, context])
        denoise = Denoiser(self._unet, context, config.guidance, self.scheduler.prediction_type,
                           schedule.sigma_to_t)
        x = np.asarray(latents, dtype=np.float32) * schedule.noise_scale
        step = (lambda i, x, denoised: callback(i + 1, schedule.steps)) if callback else None
        x = chosen.sample(denoise, x, schedule.sigmas, callback=step)
        images = self.decode(schedule.to_latents(x))
        for i, image in enumerate(images):
            image.info["seed"] = config.seed + i
            image.info["parameters"] = infotext(
                config, seed=config.seed + i, sampler_label=chosen.label, model=self.name
            )
        return images
