"""Text-to-image from a folder of ONNX models: short steps composed, no torch."""

from __future__ import annotations

import gc
import importlib.util
import inspect
import json
import os
import random
from contextlib import contextmanager
from functools import partial
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np
from PIL import Image

from sdonnx.runtime import adapters, cache, parts, prompts, providers
from sdonnx.runtime.denoiser import Denoiser
from sdonnx.runtime.checks import MAX_GUIDANCE, MAX_THREADS, check_number, check_size, is_int, is_number, shown
from sdonnx.runtime.errors import InputError, ModelFolderError, ProviderError
from sdonnx.runtime.images import MASK_BACKGROUND, default_size, fit, load_image, to_mask, to_pixels
from sdonnx.runtime.infotext import infotext
from sdonnx.runtime.memory import trim_heap
from sdonnx.runtime.onnx_model import OnnxModel, PartModel
from sdonnx.runtime.precision import precise_sigmas
from sdonnx.runtime import deep_cache, samplers, unet_stages, vae
from sdonnx.runtime import safety_checker as safety_checker_
from sdonnx.runtime import upscale as upscale_
from sdonnx.runtime import depth as depth_
from sdonnx.runtime import watermark as watermark_
from sdonnx.runtime.schedules import (
    Schedule,
    SchedulerConfig,
    check_steps,
    discrete_schedule,
    euler_schedule,
    lcm_schedule,
    multistep_schedule,
)
from sdonnx.runtime.tokenizer import CLIPTokenizer


@dataclass(frozen=True)
class Sampler:
    label: str  # the name AUTOMATIC1111's web UI gives it, for the PNG parameters
    sample: Callable
    schedule: Callable  # (SchedulerConfig, steps, karras) -> Schedule
    reference: str  # the diffusers scheduler it reproduces

    @property
    def options(self) -> set[str]:
        return set(inspect.signature(self.sample).parameters)


SAMPLERS = {
    "euler": Sampler("Euler", samplers.sample_euler, euler_schedule, "EulerDiscreteScheduler"),
    "euler_a": Sampler("Euler a", samplers.sample_euler_ancestral, euler_schedule,
                       "EulerAncestralDiscreteScheduler"),
    "heun": Sampler("Heun", samplers.sample_heun, euler_schedule, "HeunDiscreteScheduler"),
    "lms": Sampler("LMS", samplers.sample_lms, euler_schedule, "LMSDiscreteScheduler"),
    "ddim": Sampler("DDIM", samplers.sample_ddim, discrete_schedule, "DDIMScheduler"),
    "plms": Sampler("PLMS", samplers.sample_plms, discrete_schedule, "PNDMScheduler"),
    "dpmpp_2m": Sampler("DPM++ 2M", samplers.sample_dpmpp_2m, multistep_schedule,
                        "DPMSolverMultistepScheduler"),
    "dpmpp_2m_sde": Sampler("DPM++ 2M SDE", samplers.sample_dpmpp_2m_sde, multistep_schedule,
                            "DPMSolverMultistepScheduler"),
    "unipc": Sampler("UniPC", samplers.sample_unipc, multistep_schedule, "UniPCMultistepScheduler"),
    "lcm": Sampler("LCM", samplers.sample_lcm, lcm_schedule, "LCMScheduler"),
}
SCHEDULES = ("default", "karras")


def find_sampler(name: str) -> tuple[str, bool]:
    """(sampler key, Karras?) from an A1111 sampler name ("Euler a", "DPM++ 2M Karras") or
    sdonnx's ("euler_a"); ValueError naming the known ones for any other."""
    wanted = name.strip().lower()
    karras = wanted.endswith(" karras")
    if karras:
        wanted = wanted[: -len(" karras")]
    for key, sampler in SAMPLERS.items():
        if wanted in (key, sampler.label.lower()):
            return key, karras
    known = ", ".join(s.label for s in SAMPLERS.values())
    raise ValueError(f"unknown sampler {name!r}; choose one of: {known}")
# An LCM-distilled model's settings when its folder does not say (diffusers'
# LatentConsistencyModelPipeline defaults: 4 steps, guidance 8.5, its LCMScheduler).
LCM_DEFAULTS = {"sampler": "lcm", "steps": 4, "guidance": 8.5}
DECODERS = ("full", "tiny")
# vae_tiles="auto": one piece up to this side (pixels), or the VAE's own training size when
# larger (SD 2's 768), the fastest way; tiles of that side above it. Blended tiles (folders
# without stages) change the picture a little, so sizes a model was made for stay in one piece.
AUTO_TILE = 512
# vae_tiles="auto" on the cpu provider where the VAE has stages: pieces of this side (pixels),
# the one-piece picture in half the memory (Pipeline.vae_tile).
STAGED_AUTO_TILE = 256
# A part run once per generation (text encoder, VAE encoder) stays loaded below this size
# (model file and weights): reloading a small one costs more than it holds.
KEEP_BYTES = 64 * 2**20
# A model recommending this many steps or fewer (Turbo, LCM) keeps its text encoder loaded.
FEW_STEPS = 8
# The largest DeepCache interval (runtime/deep_cache.py) a generation takes: the paper goes to 20.
MAX_CACHE_INTERVAL = 20


def guidance_embedding(guidance: float, dim: int) -> np.ndarray:
    """(1, dim) float32: the sinusoidal embedding of (guidance - 1) * 1000 that an LCM-distilled
    UNet takes as `timestep_cond` (Luo et al. 2023; diffusers'
    LatentConsistencyModelPipeline.get_guidance_scale_embedding, after VDM's)."""
    half = dim // 2
    w = np.float32((guidance - 1.0) * 1000.0)
    frequencies = np.exp(np.arange(half, dtype=np.float32) * -(np.log(np.float32(10000.0)) / np.float32(half - 1)))
    angles = w * frequencies[None, :]
    embedding = np.concatenate([np.sin(angles), np.cos(angles)], axis=1)
    if dim % 2:
        embedding = np.pad(embedding, ((0, 0), (0, 1)))
    return embedding.astype(np.float32)


def random_seed() -> int:
    """A seed for "random" (None or -1): 32 bits, as AUTOMATIC1111 draws them."""
    return random.randrange(2**32 - 1)


@dataclass(frozen=True)
class LoadConfig:
    """How a model folder is loaded: fixed for the life of a Pipeline."""

    path: Path
    provider: str = "cpu"
    threads: int | None = None
    precision: str = "fp32"  # resolved: fp32 or bf16
    cache_root: Path | None = None  # compiled models and optimized graphs (runtime/cache.py); None: no cache
    static_shapes: bool = True  # OpenVINO: compile once per set of input shapes
    # Load each part only while it runs (text encoder -> UNet -> VAE), so the peak is the
    # largest part's, not their sum; every generation loads them again.
    low_memory: bool = False
    # Where <lora:NAME:...> in a prompt and embedding names are looked up (adapters.default_dir).
    lora_dir: Path | None = None
    embeddings_dir: Path | None = None


@dataclass(frozen=True)
class GenerationConfig:
    """One generate() call's parameters."""

    prompt: str
    negative_prompt: str = ""
    steps: int = 20
    guidance: float = 7.5
    seed: int | None = 0  # None or -1: a random seed (AUTOMATIC1111's -1)
    width: int | None = None  # None: the model's native size
    height: int | None = None
    sampler: str = "euler"
    n: int = 1
    schedule: str = "default"
    eta: float | None = None  # ddim, euler_a, dpmpp_2m_sde: the share of fresh noise per step
    strength: float | None = None  # img2img and inpainting only
    vae_tiles: int | str = "auto"  # "auto", "off" or a tile side in pixels (runtime/vae.py)
    decoder: str = "full"  # "full" VAE or "tiny" (TAESD, when the folder has it)
    # DeepCache (runtime/deep_cache.py): every cache_interval-th UNet evaluation runs whole,
    # those between only its shallow branch; 1 = off.
    cache_interval: int = 1

    def validate(self) -> "GenerationConfig":
        if not isinstance(self.prompt, str) or not isinstance(self.negative_prompt, str):
            raise InputError("prompt and negative prompt must be text")
        check_steps(self.steps)
        check_size(self.width, self.height)
        if self.sampler not in SAMPLERS:
            raise InputError(
                f"unknown sampler {self.sampler!r}; choose one of: {', '.join(SAMPLERS)}"
            )
        if self.schedule not in SCHEDULES:
            raise InputError(f"unknown schedule {self.schedule!r}; choose one of: {', '.join(SCHEDULES)}")
        check_number("guidance", self.guidance, 0, MAX_GUIDANCE)
        if self.eta is not None:
            if "eta" not in SAMPLERS[self.sampler].options:
                takes = [name for name, s in SAMPLERS.items() if "eta" in s.options]
                raise InputError(f"eta applies to the {', '.join(takes)} samplers, not {self.sampler}")
            check_number("eta", self.eta, 0, 1)
        if self.strength is not None:
            check_number("strength", self.strength, 0, 1)
        vae.check_tiles(self.vae_tiles)
        if self.decoder not in DECODERS:
            raise InputError(f"unknown decoder {self.decoder!r}; choose one of: {', '.join(DECODERS)}")
        if not is_int(self.cache_interval) or not 1 <= self.cache_interval <= MAX_CACHE_INTERVAL:
            raise InputError(f"cache interval must be a whole number from 1 (off) to {MAX_CACHE_INTERVAL}, "
                             f"got {shown(self.cache_interval)}")
        if not is_int(self.n) or self.n < 1:
            raise InputError(f"n (images per call) must be at least 1, got {shown(self.n)}")
        if self.seed is not None and (not is_int(self.seed) or not -1 <= self.seed < 2**63):
            raise InputError(f"seed must be a whole number from 0 to 2^63 - 1, or -1 for a random one; "
                             f"got {shown(self.seed)}")
        if self.seed is None or self.seed == -1:
            return replace(self, seed=random_seed())
        return self

    @property
    def latent_shape(self) -> tuple[int, int, int, int]:
        return (self.n, parts.LATENT_CHANNELS, self.height // parts.VAE_SCALE, self.width // parts.VAE_SCALE)

    def schedule_for(self, scheduler: SchedulerConfig) -> Schedule:
        """The sampler's schedule; for img2img its last int(steps * strength) steps."""
        schedule = SAMPLERS[self.sampler].schedule(scheduler, self.steps, karras=self.schedule == "karras")
        if self.strength is None:
            return schedule
        tail = schedule.tail(self.strength)
        if tail.steps == 0:
            raise InputError(
                f"strength {self.strength:g} with {self.steps} steps runs no step "
                f"(int(steps x strength) = 0); raise the strength or the steps"
            )
        return tail


@dataclass(frozen=True)
class Defaults:
    """What a generation uses where the caller does not say: SD's usual settings, or those the
    model folder recommends in sdonnx.json's "defaults" (`sdonnx export --default-guidance`...;
    a distilled Turbo/LCM model wants few steps and little guidance, the embedded default
    model draws best at guidance 5)."""

    steps: int = 20
    guidance: float = 7.5
    sampler: str = "euler"

    @classmethod
    def checked(cls, given: dict) -> "Defaults":
        """These settings, or an InputError naming what the runtime would refuse."""
        if not isinstance(given, dict):
            raise InputError(f"defaults must be a mapping of steps, guidance and sampler, got {given!r}")
        unknown = set(given) - {"steps", "guidance", "sampler"}
        if unknown:
            raise InputError(f"unknown defaults {', '.join(sorted(unknown))} (known: steps, guidance, sampler)")
        defaults = cls(**given)
        try:
            GenerationConfig("", steps=defaults.steps, guidance=defaults.guidance, sampler=defaults.sampler).validate()
        except TypeError as e:
            raise InputError(f"bad defaults: {e}") from e
        return defaults

    @classmethod
    def from_record(cls, record: dict, where: Path) -> "Defaults":
        try:
            return cls.checked(record.get("defaults") or {})
        except InputError as e:
            raise ModelFolderError(f"{where}: {e}") from e


def check_model_folder(path: Path) -> None:
    """Fail naming every file a Stable Diffusion ONNX folder needs but lacks."""
    if path.is_file():
        raise ModelFolderError(f"{path} is a file; a model is a folder (`sdonnx export` makes one)")
    if not path.is_dir():
        raise ModelFolderError(f"model folder not found: {path}")
    if path.name in {p.name for p in parts.PARTS} | {parts.TOKENIZER_DIR, "scheduler"} \
            and (path.parent / parts.UNET.name).is_dir():
        raise ModelFolderError(f"{path} is one part of a model folder; pass the folder itself: {path.parent}")
    missing = [p.onnx_path for p in parts.PARTS if p.required and p.file(path) is None]
    needed = [f"{parts.TOKENIZER_DIR}/vocab.json", f"{parts.TOKENIZER_DIR}/merges.txt", parts.SCHEDULER_CONFIG]
    missing += [name for name in needed if not (path / name).is_file()]
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


def image_sizes(path: Path) -> tuple[int, int]:
    """(native size, size multiple) in pixels from the UNet's config.json: the size it was
    trained at, as diffusers defaults to it (SD 1.x: 512), and the multiple every width and
    height must be (each UNet level but the last halves the latent: SD 64, the embedded model 32)."""
    unet_file = path / parts.UNET.name / "config.json"
    unet_config = parts.read_json(unet_file)
    sample_size = parts.config_field(unet_config, "sample_size", 64, lambda v: is_int(v) and 1 <= v <= 4096,
                                     unet_file, "a whole number of latent pixels")
    levels = len(parts.config_field(unet_config, "block_out_channels", (0,) * 4,
                                    lambda v: isinstance(v, list) and 1 <= len(v) <= 8, unet_file,
                                    "a list of 1 to 8 channel counts"))
    return sample_size * parts.VAE_SCALE, parts.VAE_SCALE * 2 ** max(levels - 1, 0)


def _unet_plan(path: Path, low_memory: bool, cache_root: Path | None) -> dict | None:
    """The UNet stage plan low_memory would run from the folder `path` (runtime/unet_stages.py),
    given a cache folder for the stages' optimized graphs; None: the whole UNet."""
    if not low_memory or cache_root is None:
        return None
    return unet_stages.read_plan(path / parts.UNET.name)


def _part_property(part: parts.Part) -> property:
    """pipe.unet and the like: the part's model, loaded on first access; assigning one puts
    it in place (it then stays until replaced)."""

    def get(self: "Pipeline") -> PartModel | None:
        return self._model(part)

    def put(self: "Pipeline", model: PartModel) -> None:
        self._models[part.name] = model
        self._assigned.add(part.name)
        self._carried[part.name] = self.adapters.wanted(part.name)  # taken as it is

    return property(get, put, doc=f"The {part.name} model (loaded on first access).")


class Pipeline:
    """A loaded model folder. `generate` turns a prompt into PIL images (info: "parameters", "seed")."""

    def __init__(self, config: LoadConfig):
        path = config.path
        check_model_folder(path)
        self.config = config
        self.tokenizer = CLIPTokenizer.from_dir(path / parts.TOKENIZER_DIR)
        self.scheduler = SchedulerConfig.from_file(path / parts.SCHEDULER_CONFIG)
        vae_file = path / parts.VAE_DECODER.name / "config.json"
        vae_config = parts.read_json(vae_file)
        self.vae_scaling_factor = float(parts.config_field(
            vae_config, "scaling_factor", parts.DEFAULT_VAE_SCALING_FACTOR,
            lambda v: is_number(v) and v > 0, vae_file, "a positive number"))
        self.native_size, self.size_multiple = image_sizes(path)
        # Pixels per latent pixel: 2 per VAE level after the first (8 for SD, 4 for the x4 upscaler's).
        levels = parts.config_field(vae_config, "block_out_channels", (0,) * 4,
                                    lambda v: isinstance(v, list) and 1 <= len(v) <= 8, vae_file, "a list of widths")
        self.vae_scale = 2 ** (len(levels) - 1)
        self.is_upscaler = upscale_.is_upscaler(path)  # x4: `upscale`, not `generate`
        vae_size = parts.config_field(vae_config, "sample_size", 0,
                                      lambda v: is_int(v) and 0 <= v <= 8192, vae_file, "a whole number of pixels")
        # Pixels per side decoded in one piece by vae_tiles="auto" (above: tiles of this side).
        step = vae.TILE_STEP * parts.VAE_SCALE
        self.vae_tile_size = max(AUTO_TILE, vae_size // step * step)
        # An LCM-distilled UNet takes the guidance scale as an embedding of this width.
        self.guidance_embedding_dim = parts.config_field(
            parts.read_json(path / parts.UNET.name / "config.json"), "time_cond_proj_dim", None,
            lambda v: is_int(v) and v > 0, path / parts.UNET.name / "config.json", "a whole number")
        record = parts.read_json(path / parts.RECORD)
        self.defaults = Defaults.from_record(record, path / parts.RECORD)
        if self.guidance_embedding_dim is not None and not record.get("defaults"):
            self.defaults = Defaults(**LCM_DEFAULTS)  # an LCM folder exported elsewhere

        openvino = providers.PROVIDERS[config.provider].backend == "openvino"
        ir_only = parts.ir_parts(path)
        if ir_only and not openvino:
            raise ProviderError(
                f"{path} holds OpenVINO IR for {', '.join(ir_only)} (quantized for OpenVINO), which "
                f"the {config.provider} provider cannot run; use --provider openvino"
            )

        self._openvino = openvino
        self._models: dict[str, PartModel] = {}
        # LoRAs and embeddings the parts should carry (adapters.py), and those each loaded one does.
        self.adapters = adapters.Adapters(path, self.tokenizer, config.lora_dir, config.embeddings_dir)
        self._carried: dict[str, tuple] = {}
        self._assigned: set[str] = set()  # parts given by assignment (pipe.unet = ...): never replaced
        self._unet_channels = parts.config_field(
            parts.read_json(path / parts.UNET.name / "config.json"), "in_channels", None,
            lambda v: is_int(v) and v > 0, path / parts.UNET.name / "config.json", "a whole number")
        # The UNet loads as DeepCache's two graphs once a generation asked for a cache interval
        # (they serve every generation after it: the full graph is the whole UNet).
        self._deep_cache = False
        # Parts that stay are loaded now, except the VAE decoder: on its first untiled decode (a
        # tiled one runs the VAE's stages, one at a time, and never needs it whole).
        for part in parts.PARTS:
            if self._keeps(part) and part is not parts.VAE_DECODER and part.file(path):
                self._load(part)

    def _keeps(self, part: parts.Part) -> bool:
        """Whether a part stays loaded between uses. With low_memory none does. Otherwise the
        UNet and the VAE decoder do; the text encoder and the VAE encoder, which run once per
        generation, are released after use when over KEEP_BYTES (SD 1.5's text encoder holds
        0.46 GB through a whole generation for one call at its start), except the text encoder
        of a few-step model (recommended steps <= FEW_STEPS), whose reload would cost as much
        as its sampling (an SD 2.1-size text encoder: 1-3 s against a 1-step image's 2-6 s).
        TAESD stays: it is small."""
        if self.config.low_memory:
            return False
        if part in (parts.UNET, parts.VAE_DECODER) or part is parts.TEXT_ENCODER and self.defaults.steps <= FEW_STEPS:
            return True
        file = part.file(self.config.path)
        return file is not None and sum(f.stat().st_size for f in parts.model_files(file)) < KEEP_BYTES

    def _open(self, file: Path, part: parts.Part, **options) -> PartModel:
        """A model file opened with this pipeline's provider, threads and precision; `options`:
        OnnxModel's beyond those (cache_root, arena, overrides ...), of which OpenVinoModel
        takes cache_root, overrides and static_shapes."""
        config = self.config
        if self._openvino:
            from sdonnx.runtime.openvino_model import OpenVinoModel

            # The text encoder runs once per generation, so bf16 saves next to nothing there,
            # while its rounding reaches every UNet call through the context and is
            # amplified like the UNet's own at high sigmas (precision.py): it stays fp32.
            precision = "fp32" if part is parts.TEXT_ENCODER else config.precision
            taken = {"cache_root": config.cache_root, "static_shapes": config.static_shapes,
                     **{k: v for k, v in options.items() if k in ("cache_root", "overrides", "static_shapes")}}
            return OpenVinoModel(file, part, precision, config.threads, **taken)
        options.pop("static_shapes", None)
        return OnnxModel(file, part, config.provider, config.threads, **{"cache_root": config.cache_root, **options})

    def _load(self, part: parts.Part) -> PartModel:
        path = self.config.path
        overrides = self.adapters.overrides(part.name)
        if part is parts.UNET and self._deep_cache:
            model = self._deep_cache_unet(overrides)
        elif self._openvino:
            model = self._open(part.file(path), part, overrides=overrides.tensors)
        elif part is parts.UNET and (staged := self._staged_unet(overrides)) is not None:
            model = staged
        else:
            # The VAE runs once per image on the largest activations (0.75-1 GB at 512x512 for
            # SD 1.5): without the arena's rounding-up they peak 0.25 GB lower. The text encoder
            # runs once per generation: onnxruntime's arena kept 0.16 GB of its call (SD 1.5
            # int8, from the cache), malloc 0.03. The UNet keeps the arena: without it an SD 1.5 int8
            # call took 50-80% longer and peaked 0.9 GB higher.
            model = self._open(path / part.onnx_path, part,
                               arena=part not in (parts.VAE_DECODER, parts.VAE_ENCODER, parts.TEXT_ENCODER),
                               overrides=overrides.tensors, resized=overrides.resized, inline=overrides.inline)
        self._models[part.name] = model
        self._carried[part.name] = self.adapters.wanted(part.name)
        if self.config.low_memory:
            # The patched weights live on in the loaded model only, and go with it.
            self.adapters.forget(part.name)
        return model

    def _deep_cache_unet(self, overrides) -> deep_cache.DeepCacheUnet:
        """The UNet as DeepCache's full and shallow graphs (runtime/deep_cache.py); the shallow
        one takes the LoRA patches of the weights it holds. Raises ModelFolderError when the
        folder's plan is gone or out of date."""
        folder = self.config.path / parts.UNET.name
        plan = deep_cache.read_plan(folder)
        if plan is None:
            raise ModelFolderError(f"{folder}: its DeepCache graphs ({parts.DEEP_CACHE_PLAN}) are missing or were cut "
                                   "from another graph; export or quantize the model again")

        def opened(file: Path, part: parts.Part, names: set[str]) -> PartModel:
            tensors = {n: v for n, v in overrides.tensors.items() if n in names}
            if self._openvino:
                return self._open(file, part, overrides=tensors)
            return self._open(file, part, overrides=tensors, resized=overrides.resized & names,
                              inline=overrides.inline & names)

        full = opened(folder / plan["full"], parts.UNET, set(overrides.tensors))
        return deep_cache.DeepCacheUnet(full, opened(folder / plan["shallow"], deep_cache.SHALLOW,
                                                     set(plan["shallow_initializers"])))

    def use_deep_cache(self) -> None:
        """Switch the UNet to DeepCache's graphs (generate does it for a cache interval above
        1; a server calls it at start), or raise InputError saying why this folder or load
        cannot run them."""
        folder = self.config.path / parts.UNET.name
        if parts.UNET.name in self._assigned:
            raise InputError("a cache interval above 1 needs the folder's own UNet, not one assigned to pipe.unet")
        if deep_cache.read_plan(folder) is None:
            if self.config.path == default_model_path():
                raise InputError("the embedded model ships without DeepCache graphs (its UNet takes milliseconds "
                                 "a step); a cache interval above 1 is for models exported with sdonnx export")
            if parts.UNET.name in parts.ir_parts(self.config.path):
                raise InputError(f"{self.name}'s UNet is OpenVINO IR (sdonnx quantize --mode int8-openvino), which "
                                 "has no DeepCache graphs; quantize with --mode int8 for a cache interval above 1")
            raise InputError(
                f"{self.name} has no DeepCache graphs (unet/{parts.DEEP_CACHE_PLAN}, which sdonnx export and "
                "sdonnx quantize --mode int8/fp16 write): export or quantize it again to use a cache interval above 1")
        config = self.config
        if providers.PROVIDERS[config.provider].stages and _unet_plan(config.path, config.low_memory,
                                                                       config.cache_root) is not None:
            raise InputError("a cache interval above 1 loads the whole UNet, which --low-memory runs as stages "
                             "here; use one or the other")
        self._deep_cache = True

    def _staged_unet(self, overrides) -> unet_stages.StagedUnet | None:
        """low_memory's UNet as its stages, one loaded at a time (runtime/unet_stages.py), where
        the folder has a plan for its graph, the provider runs stages (the CPU) and a cache folder
        keeps each stage's optimized graph (without one every stage would be optimized again at
        every step); None: the whole UNet. A UNet carrying LoRAs loads whole: the patched
        weights are the whole UNet's."""
        config = self.config
        if not providers.PROVIDERS[config.provider].stages or overrides.tensors:
            return None
        plan = _unet_plan(config.path, config.low_memory, config.cache_root)
        if plan is None:
            return None
        try:
            return unet_stages.StagedUnet(config.path / parts.UNET.name, plan,
                                          lambda file, stage: self._open(file, stage), max_batch=1)
        except ModelFolderError:  # a plan whose inputs are not a UNet's: the whole part says what is wrong
            return None

    def _model(self, part: parts.Part) -> PartModel | None:
        """The loaded part (loading it now if it is not, or again when the LoRAs and embeddings
        it should carry changed); None for an absent optional part."""
        if part.name not in self._models and not part.required and part.file(self.config.path) is None:
            return None
        stale = part is parts.UNET and part.name not in self._assigned and part.name in self._models and \
            isinstance(self._models[part.name], deep_cache.DeepCacheUnet) != self._deep_cache
        if part.name in self._models and (stale or self._carried.get(part.name, ()) != self.adapters.wanted(part.name)):
            del self._models[part.name]
            gc.collect()
            trim_heap()  # the old session's buffers, before the new one takes as much again
        return self._models.get(part.name) or self._load(part)

    @contextmanager
    def using(self, part: parts.Part) -> Iterator[PartModel | None]:
        """The part, loaded for the block and released after it unless it stays (_keeps)."""
        loaded = part.name in self._models
        try:
            yield self._model(part)
        finally:
            if not loaded and not self._keeps(part) and self._models.pop(part.name, None) is not None:
                gc.collect()
            elif hasattr(model := self._models.get(part.name), "release_memory"):
                model.release_memory()
            trim_heap()

    text_encoder = _part_property(parts.TEXT_ENCODER)
    unet = _part_property(parts.UNET)
    vae_decoder = _part_property(parts.VAE_DECODER)
    vae_encoder = _part_property(parts.VAE_ENCODER)
    tiny_vae_decoder = _part_property(parts.TINY_VAE_DECODER)
    tiny_vae_encoder = _part_property(parts.TINY_VAE_ENCODER)

    @classmethod
    def load(cls, path: str | Path | None = None, provider: str = "auto",
             threads: int | None = None, precision: str = "auto", cache_dir: str | Path | bool | None = None,
             static_shapes: bool = True, low_memory: bool = False, lora_dir: str | Path | None = None,
             embeddings_dir: str | Path | None = None) -> "Pipeline":
        """Load a model folder (default: the embedded model, or $SDONNX_MODEL).

        `precision` fp32, bf16 or auto (bf16 where the provider and the CPU both do it).
        `cache_dir`: where compiled models and optimized graphs are kept for the next start
        (default $SDONNX_CACHE_DIR or ~/.cache/sdonnx; False: no cache).
        `low_memory`: load each part only while it runs and release it after (the peak is the
        largest part's instead of their sum, at the cost of loading them for every generation),
        and run the UNet one image at a time (the negative prompt's and the prompt's rows of
        guidance in two calls: half its activations). On the CPU provider with a cache folder,
        a UNet that the export cut into stages (export/unet_stages.py; not one carrying LoRAs)
        runs as those stages, each loaded for its turn in every step (runtime/unet_stages.py):
        one stage's weights in memory instead of the whole UNet's, for a session load per stage
        per step; `provider` "auto", which would choose OpenVINO, then chooses the cpu provider.
        `lora_dir`, `embeddings_dir`: where `<lora:NAME>` and embedding names in prompts are
        looked up (default $SDONNX_LORA_DIR / $SDONNX_EMBEDDINGS_DIR, else
        ~/.local/share/sdonnx/loras and .../embeddings; adapters.default_dir).
        """
        if path is None:
            path = default_model_path()
            if not path.is_dir():
                raise ModelFolderError(
                    f"the embedded default model is missing ({path}); pass a model folder, "
                    "or set SDONNX_MODEL"
                )
        if threads is not None and (not is_int(threads) or not 1 <= threads <= MAX_THREADS):
            raise InputError(f"threads must be a whole number from 1 to {MAX_THREADS}, got {shown(threads)}")
        if (provider == "auto" and low_memory and providers.resolve("auto") == "openvino"
                and _unet_plan(Path(path), low_memory, cache.resolve_root(cache_dir)) is not None):
            # low_memory's small path is the UNet's stages, which run on the cpu provider
            # (SD 1.5 int8, 512x512: 0.64 GB there, 2.55 GB on OpenVINO with its bf16 default).
            provider = "cpu"
        provider = providers.resolve(provider)
        threads = None if threads is None else int(threads)
        return cls(LoadConfig(Path(path), provider, threads, providers.resolve_precision(provider, precision),
                              cache.resolve_root(cache_dir), static_shapes, bool(low_memory),
                              adapters.default_dir("loras", lora_dir),
                              adapters.default_dir("embeddings", embeddings_dir)))

    @property
    def name(self) -> str:
        return self.config.path.resolve().name

    @property
    def cache_use(self) -> dict[str, str]:
        """Per onnxruntime part loaded through the optimized-graph cache: "hit" or "written"."""
        return {m.part.name: m.cache for m in self._models.values() if getattr(m, "cache", None)}

    def prompt_windows(self, prompt: str, windows: int = 1) -> prompts.Windows:
        """The prompt's token windows and per-token weights in AUTOMATIC1111's syntax
        (runtime/prompts.py), `<lora:...>` tags cut out, the active embeddings' names replaced
        by their vectors' ids; at least `windows` windows."""
        text, _ = prompts.extract_networks(prompt)
        t = self.tokenizer
        return prompts.tokenize_windows(text, t.encode, bos=t.bos_id, eos=t.eos_id, pad=t.pad_id,
                                        window=t.max_length, embeddings=self.adapters.embedding_ids, windows=windows)

    def encode_prompt(self, prompt: str, windows: int = 1) -> np.ndarray:
        """(1, 77 k, d) embeddings: each of the prompt's k >= `windows` 75-token windows
        encoded alone, then concatenated along the sequence (AUTOMATIC1111's long prompts);
        weighted tokens scaled and each window's mean restored (prompts.apply_weights)."""
        chunks = self.prompt_windows(prompt, windows)
        hidden = self.text_encoder(input_ids=chunks.ids.astype(self.text_encoder.dtype("input_ids")))
        hidden = hidden[parts.TEXT_ENCODER.output]
        if chunks.weighted:
            hidden = prompts.apply_weights(hidden, chunks.weights)
        return hidden.reshape(1, -1, hidden.shape[-1])

    def encode_context(self, config: GenerationConfig) -> np.ndarray:
        """The UNet's text context for n images: negative rows first when guidance is on."""
        with self.using(parts.TEXT_ENCODER):
            return self._encode_context(config)

    def _encode_context(self, config: GenerationConfig) -> np.ndarray:
        texts = [config.prompt, config.negative_prompt] if config.guidance > 1.0 else [config.prompt]
        # Both halves of a guided batch must have the same length: pad with empty windows.
        windows = max(len(self.prompt_windows(text).ids) for text in texts)
        context = np.repeat(self.encode_prompt(config.prompt, windows), config.n, axis=0)
        if config.guidance <= 1.0:
            return context
        negative = np.repeat(self.encode_prompt(config.negative_prompt, windows), config.n, axis=0)
        return np.concatenate([negative, context])

    def _unet(self, sample: np.ndarray, t: float, context: np.ndarray, precise: bool = False,
              timestep_cond: np.ndarray | None = None, step_cache: deep_cache.StepCache | None = None,
              class_labels: int | None = None) -> np.ndarray:
        """The UNet's raw output, float32; `precise`: in fp32 whatever the loaded precision;
        `timestep_cond` (1, d): an LCM-distilled UNet's guidance embedding, for every row;
        `step_cache`: the generation's DeepCache state (the UNet loaded as DeepCacheUnet);
        `class_labels`: the x4 upscaler's noise level, for every row (runtime/upscale.py)."""
        dtype = self.unet.dtype("timestep")
        t = round(t) if np.issubdtype(dtype, np.integer) else t
        rank = len(self.unet.shape("timestep"))
        timestep = np.full((len(sample),) * rank, t, dtype=dtype)
        inputs = {
            "sample": sample.astype(self.unet.dtype("sample")),
            "timestep": timestep,
            # copy=False: the same context object every step (all rows in one call), which a bound
            # device keeps; one-row calls (low_memory) pass slices, bound at each call.
            "encoder_hidden_states": context.astype(self.unet.dtype("encoder_hidden_states"), copy=False),
        }
        if timestep_cond is not None:
            inputs["timestep_cond"] = np.repeat(timestep_cond, len(sample), axis=0).astype(
                self.unet.dtype("timestep_cond"))
        if class_labels is not None:
            inputs["class_labels"] = np.full((len(sample),), class_labels, dtype=self.unet.dtype("class_labels"))
        precision = "fp32" if precise else None
        out = self.unet.run(inputs, precision) if step_cache is None else step_cache.run(self.unet, inputs, precision)
        return out[parts.UNET.output].astype(np.float32)

    def _precise_unet(self, sample: np.ndarray, t: float, context: np.ndarray,
                      timestep_cond: np.ndarray | None = None,
                      step_cache: deep_cache.StepCache | None = None) -> np.ndarray:
        return self._unet(sample, t, context, precise=True, timestep_cond=timestep_cond, step_cache=step_cache)

    def vae_tile(self, tiles: int | str, height: int, width: int, part: parts.Part = parts.VAE_DECODER) -> int | None:
        """The tile side in latent pixels for running the VAE `part` on a (height, width)
        latent, None for one piece. "auto": where the provider runs stages (cpu:
        providers.Provider.stages) and the part has them (the one-piece picture), pieces of
        STAGED_AUTO_TILE pixels above that side; elsewhere one piece up to vae_tile_size pixels a
        side and tiles of that size above it, since blended tiles change the picture a little,
        OpenVINO compiles every stage (256-pixel pieces took it 35% longer at 512x512) and a GPU
        builds every stage's session. At 512x512 the decode is the generation's memory peak on
        every sdonnx variant: in 256-pixel pieces the SD 1.5 int8 decode takes +0.40 GB instead
        of +0.80 GB, 12.7 s instead of 9.8 s, and at 1024x1024 such pieces are faster than
        512-pixel ones (tests/benchmarks/README.md "Memory"). `tiles`: "auto", "off" or a side in
        pixels (vae.check_tiles raises InputError otherwise)."""
        tiles = vae.check_tiles(tiles)
        if tiles == "auto" and providers.PROVIDERS[self.config.provider].stages and part.name not in self._assigned:
            try:
                staged = vae.StagedVae.read_plan(self.config.path / part.name) is not None
            except ModelFolderError:
                staged = False  # (a damaged plan: the rule below, and _vae names the damage if it tiles)
            if staged:
                return vae.tile_latent(STAGED_AUTO_TILE, 0, height, width, self.vae_scale)
        return vae.tile_latent(tiles, self.vae_tile_size // self.vae_scale, height, width, self.vae_scale)

    @property
    def has_tiny_vae(self) -> bool:
        """Whether the folder has the TAESD decoder (`sdonnx export --tiny-vae`)."""
        return parts.TINY_VAE_DECODER.file(self.config.path) is not None

    def _decoder_part(self, decoder: str) -> parts.Part:
        """The part that decodes for `decoder` ("full" or "tiny"); ModelFolderError saying how
        to add TAESD to a folder without it."""
        if decoder == "tiny":
            if not self.has_tiny_vae:
                folder = self.config.path
                embedded = folder.resolve() == Path(__file__).resolve().parent.parent / "models" / "default"
                how = (f"copy {folder} elsewhere and run `sdonnx export COPY --tiny-vae TAESD_SOURCE`"
                       if embedded or folder.resolve() == default_model_path().resolve() else
                       f"`sdonnx export {folder} --tiny-vae TAESD_SOURCE` adds it")
                raise ModelFolderError(f"decoder \"tiny\" needs TAESD, which {folder} lacks; {how}")
            return parts.TINY_VAE_DECODER
        return parts.VAE_DECODER

    @contextmanager
    def _vae(self, part: parts.Part, tile: int | None) -> Iterator[Callable[[np.ndarray], np.ndarray]]:
        """A function running the VAE part on x (1, C, H, W) (latents for a decoder, pixels in
        [-1, 1] for an encoder), returning the part's output: whole when `tile` (latent
        pixels) is None; else over bands of about tile x tile latent pixels through the part's
        stages, equal to the whole decode (vae.StagedVae: folders sdonnx exported), or in
        blended tiles (vae.tiled: other folders, TAESD)."""
        per_latent = parts.VAE_SCALE if part in (parts.VAE_ENCODER, parts.TINY_VAE_ENCODER) else 1
        assigned = part.name in self._assigned  # (a model put in place runs, not the folder's stages)
        plan = None if tile is None or assigned else vae.StagedVae.read_plan(self.config.path / part.name)
        if plan is not None:
            folder = self.config.path / part.name

            def open_stage(stage: dict) -> PartModel:
                # Stages are small: onnxruntime optimizes each in milliseconds (no cache of
                # optimized graphs); OpenVINO's compiled ones go to its cache as usual.
                return self._open(folder / stage["file"], parts.Part(f"{part.name} {stage['file']}",
                                                                    tuple(stage["inputs"]), stage["outputs"][0]),
                                  cache_root=None if not self._openvino else self.config.cache_root, arena=False,
                                  static_shapes=False)

            staged = vae.StagedVae(plan, open_stage)
            yield lambda x: staged(x, max(1, tile * tile * per_latent // x.shape[3]))
            return
        with self.using(part) as model:
            name = part.inputs[0]
            dtype = model.dtype(name)

            def run(x: np.ndarray) -> np.ndarray:
                return model(**{name: x.astype(dtype)})[part.output]

            scale = self.vae_scale if per_latent == 1 else 1 / self.vae_scale
            yield run if tile is None else (lambda x: vae.tiled(run, x, tile * per_latent, scale))

    def decode(self, latents: np.ndarray, tiles: int | str = "auto", decoder: str = "full") -> list[Image.Image]:
        """Decode latents (n, 4, H/8, W/8), one at a time, into n 8-bit RGB images with the
        full VAE or ("tiny") TAESD, which takes the scaled latents as they are;
        `tiles` "auto", "off" or a tile side in pixels (vae_tile, runtime/vae.py)."""
        images = []
        part = self._decoder_part(decoder)
        scale = 1.0 if part is parts.TINY_VAE_DECODER else self.vae_scaling_factor
        with self._vae(part, self.vae_tile(tiles, *latents.shape[2:], part)) as run:
            for latent in latents:
                pixels = run(latent[None] / scale)[0]
                pixels = np.clip(pixels.astype(np.float32) / 2 + 0.5, 0, 1)
                images.append(Image.fromarray((pixels.transpose(1, 2, 0) * 255).round().astype(np.uint8)))
        return images

    def preview(self, latents: np.ndarray) -> Image.Image:
        """A cheap picture of the first of `latents` (n, 4, H/8, W/8), the sampler's current
        estimate, at the image's size: TAESD's decode when the folder has it, else
        AUTOMATIC1111's "Approx cheap" linear map (vae.cheap_rgb), each latent pixel an 8x8
        block. Never the full VAE."""
        if self.has_tiny_vae and not self.config.low_memory:  # (low_memory: no part loaded for it)
            return self.decode(latents[:1], "off", "tiny")[0]
        rgb = vae.cheap_rgb(latents[0])
        return Image.fromarray(rgb.repeat(parts.VAE_SCALE, axis=0).repeat(parts.VAE_SCALE, axis=1))

    @staticmethod
    def initial_noise(config: GenerationConfig) -> np.ndarray:
        """Unit normal noise (n, 4, height / 8, width / 8) float32; image i uses seed + i so any
        image of a batch can be redone alone."""
        _, c, h, w = config.latent_shape
        return np.stack([
            np.random.default_rng(config.seed + i).standard_normal((c, h, w), dtype=np.float32)
            for i in range(config.n)
        ])

    def upscale(self, image: Image.Image | str | Path, prompt: str = "", negative_prompt: str = "",
                noise_level: int = upscale_.DEFAULT_NOISE_LEVEL, steps: int = upscale_.DEFAULT_STEPS,
                guidance: float = upscale_.DEFAULT_GUIDANCE, seed: int | None = 0,
                sampler: str = upscale_.DEFAULT_SAMPLER, tile: int | None = upscale_.DEFAULT_TILE,
                vae_tiles: int | str = "auto", callback: Callable[[int, int], None] | None = None,
                latents: np.ndarray | None = None, noise: np.ndarray | None = None) -> Image.Image:
        """Enlarge `image` 4x with an x4 upscaler folder (runtime/upscale.py; diffusers'
        StableDiffusionUpscalePipeline): the prompt describes the picture, `noise_level` (0 to
        the model's max_noise_level, 350) how much of the input's detail the model may redraw,
        `tile` the UNet's tile side in input pixels (None: one piece). Returns a (4 W, 4 H) RGB
        image with its parameters in info["parameters"]. InputError for a folder that is not an
        upscaler or values out of range."""
        config = upscale_.UpscaleConfig(prompt, negative_prompt, noise_level, steps, guidance, seed, sampler, tile,
                                       vae_tiles)
        return upscale_.upscale(self, load_image(image, "image"), config, callback, latents, noise)

    @property
    def has_safety_checker(self) -> bool:
        """Whether the folder has the safety checker part (export/safety_checker.py)."""
        return parts.SAFETY_CHECKER.file(self.config.path) is not None

    def check_safety(self, images: list[Image.Image]) -> safety_checker_.Verdict:
        """The safety checker's verdict on `images` (PIL, any size): flags and concept scores
        (runtime/safety_checker.py). ModelFolderError when the folder has no safety checker."""
        if not self.has_safety_checker:
            raise ModelFolderError(f"{self.name} has no safety checker ({parts.SAFETY_CHECKER.onnx_path})")
        with self.using(parts.SAFETY_CHECKER) as model:
            return safety_checker_.check(model, images, self.config.path / parts.SAFETY_CHECKER.name)

    def watermark_text(self, watermark: bool | str | None) -> str | None:
        """The text a `watermark` option asks for: None for False or None, the family's
        `watermark_message` for True, else the text itself. InputError for an empty text,
        SdonnxError with the install command when PyWavelets is missing."""
        if watermark is False or watermark is None:
            return None
        text = self.watermark_message if watermark is True else watermark
        watermark_.require()
        watermark_.message_bits(text)
        return text

    @property
    def watermark_message(self) -> str:
        """The invisible watermark text Stable Diffusion's reference scripts embed for this
        model's family: "SDV2" for a UNet attending to 1024-wide text features (SD 2.x),
        else "StableDiffusionV1"."""
        unet = parts.read_json(self.config.path / parts.UNET.name / "config.json")
        return watermark_.SD2_MESSAGE if unet.get("cross_attention_dim") == 1024 else watermark_.SD1_MESSAGE

    @property
    def is_depth(self) -> bool:
        """Depth-to-image UNets take 5 channels: latents and the depth map."""
        return self.unet_channels == parts.LATENT_CHANNELS + 1

    @property
    def is_inpainting(self) -> bool:
        """Inpainting UNets take 9 channels: latents, mask, masked-image latents."""
        return self.unet_channels == parts.LATENT_CHANNELS * 2 + 1

    @property
    def unet_channels(self) -> int:
        """The UNet's input channels: from its config.json, else from the model."""
        return self._unet_channels or self.unet.shape("sample")[1]

    def encode_image(self, pixels: np.ndarray, tiles: int | str = "auto", decoder: str = "full") -> np.ndarray:
        """VAE-encode (1, 3, H, W) pixels in [-1, 1] to scaled latents (1, 4, H/8, W/8): the
        posterior mean; `tiles` as for decode. With decoder "tiny" and TAESD's encoder in the
        folder, TAESD encodes (its latents are already scaled), as diffusers does with
        AutoencoderTiny."""
        tiny = decoder == "tiny" and parts.TINY_VAE_ENCODER.file(self.config.path) is not None
        part = parts.TINY_VAE_ENCODER if tiny else parts.VAE_ENCODER
        if part.file(self.config.path) is None:
            raise ModelFolderError(
                f"img2img and inpainting need {parts.VAE_ENCODER.onnx_path} (or its OpenVINO IR), which "
                f"{self.config.path} lacks; export the model again with `sdonnx export`"
            )
        tile = self.vae_tile(tiles, pixels.shape[2] // parts.VAE_SCALE, pixels.shape[3] // parts.VAE_SCALE, part)
        with self._vae(part, tile) as run:
            moments = run(pixels)
        # The full VAE gives mean and log-variance, unscaled; TAESD its scaled latents.
        return moments[:, : parts.LATENT_CHANNELS].astype(np.float32) * (1.0 if tiny else self.vae_scaling_factor)

    def sampler_noise(self, config: GenerationConfig, shape: tuple[int, ...]) -> Callable[[], np.ndarray]:
        """Fresh unit noise per step for stochastic samplers, one stream per image (seed + i)."""
        streams = [np.random.default_rng([config.seed + i, 1]) for i in range(config.n)]
        return lambda: np.stack([g.standard_normal(shape[1:], dtype=np.float32) for g in streams])

    def generate(self, prompt: str, negative_prompt: str = "", steps: int | None = None,
                 guidance: float | None = None, seed: int | None = 0, width: int | None = None,
                 height: int | None = None,
                 sampler: str | None = None, n: int = 1, latents: np.ndarray | None = None,
                 callback: Callable[[int, int], None] | None = None, *,
                 schedule: str = "default", eta: float | None = None,
                 init_image: Image.Image | str | Path | None = None, strength: float = 0.75,
                 mask_image: Image.Image | str | Path | None = None,
                 on_step: Callable[[int, int, np.ndarray], None] | None = None,
                 vae_tiles: int | str = "auto", loras: Sequence = (), decoder: str = "full",
                 cache_interval: int = 1, watermark: bool | str = False,
                 safety_checker: bool = False, depth_map: Image.Image | str | Path | None = None) -> list[Image.Image]:
        """Generate `n` images; `latents` (n, 4, H/8, W/8) of unit noise replaces the seeded noise.

        Steps, guidance and sampler default to the model's `defaults` (20, 7.5, euler unless
        its sdonnx.json says otherwise). `seed` None or -1 draws a random one (reported in each
        image's info["seed"]); image i uses seed + i. Width and height (pixels) default to the
        model's native size (512 for SD 1.x), or with an `init_image` to its size rounded down to
        the model's `size_multiple`; an init image of another size is scaled to cover the
        requested size and centre-cropped. Images (paths, bytes or PIL) are read as a person sees
        them (images.load_image). In bf16 the UNet evaluations the sampler would amplify run in
        fp32 (precision.py). Raises InputError for values out of range, ModelFolderError for a
        model folder that lacks what the call needs. img2img runs the last
        int(steps x strength) steps from the encoded image noised to that level, as diffusers'
        StableDiffusionImg2ImgPipeline; with `mask_image` (white = repaint, the init image's
        size) an inpainting model repaints the masked part. `schedule="karras"` uses Karras
        sigmas; `eta` sets ddim's (default 0), euler_a's or dpmpp_2m_sde's (default 1) noise.
        `callback(step, total_steps)` is called after every sampler step; `on_step(step,
        total_steps, denoised)` too, with the current estimate of the clean latents (n, 4, H/8,
        W/8) for previews (`decode` turns them into images). An exception raised by either
        stops the generation there. `vae_tiles` "auto" (default) VAE-decodes and encodes in
        pieces of 256 pixels where the VAE has stages (sdonnx's export) and the provider is
        "cpu", else in one piece up to `vae_tile_size` pixels a side (512 for SD 1.x) and
        in pieces of that side above it (vae_tile); "off" never tiles, a number of pixels sets
        the piece's side. Pieces draw the one-piece picture where the VAE has stages; elsewhere
        they are blended tiles as diffusers' enable_tiling() makes them (runtime/vae.py).

        Prompts take AUTOMATIC1111's syntax (runtime/prompts.py): `(word:1.3)`, `((word))`,
        `[word]`, `BREAK`, `<lora:NAME:SCALE>` (NAME looked up in the load's `lora_dir`), and
        the names of the embeddings in its `embeddings_dir`. `decoder` "tiny" decodes with
        TAESD (the folder's tiny_vae_decoder: a fraction of the full VAE's time, softer
        detail). `cache_interval` N > 1 runs DeepCache (Ma et al. 2023; runtime/deep_cache.py):
        every N-th UNet evaluation whole, those between only its shallow branch on the kept deep
        feature (SD 1.5 int8 at 512x512, 20 steps, N = 3: see the README for the time saved and
        the change in the picture); the folder needs its DeepCache graphs (sdonnx export writes
        them), and it does not combine with --low-memory's staged UNet. `loras` adds LoRAs by path or name,
        each alone or as a (path, scale) pair; they are applied to the loaded model's weights
        (runtime/adapters.py) and recorded in the PNG parameters as the web UI records them.
        `watermark` True embeds Stable Diffusion's invisible watermark (runtime/watermark.py: the
        reference scripts' message for the model's family, `watermark_message`), a text embeds
        that text instead; images under 256x256 cannot carry one (InputError, before sampling).
        `safety_checker` True runs the folder's safety checker (runtime/safety_checker.py; a
        filter, not a guarantee) on every image, blacks out those it flags and sets each
        image's info["nsfw_content_detected"] (bool, diffusers' name); ModelFolderError before
        sampling when the folder has none. Marking follows checking, as in the reference script.
        A depth-to-image model (a UNet of 5 channels, StableDiffusionDepth2ImgPipeline) needs an
        `init_image` and follows its depth: estimated by the folder's depth_estimator, or
        `depth_map` (an image of the init image's size, brighter = nearer; runtime/depth.py).
        """
        if self.is_upscaler:
            raise InputError(f"{self.name} is the x4 upscaler: it enlarges an image (`sdonnx upscale IMAGE --model "
                             f"{self.config.path}`, Pipeline.upscale) and does not generate from a prompt alone")
        if mask_image is not None and init_image is None:
            raise InputError("mask_image needs an init_image to repaint")
        if mask_image is not None and not self.is_inpainting:
            raise InputError(
                "mask_image needs an inpainting model (a UNet taking 9 channels); "
                f"{self.name}'s UNet takes {self.unet_channels}"
            )
        if depth_map is not None and not self.is_depth:
            raise InputError(f"a depth map needs a depth-to-image model (a UNet taking 5 channels); "
                             f"{self.name}'s takes {self.unet_channels}")
        if self.is_depth and init_image is None:
            raise InputError(f"{self.name} is a depth-to-image model: it needs an init image, whose depth it "
                             "keeps (--init-image; init_image= in the API, init_images in A1111's img2img)")
        if self.is_depth and depth_map is None and parts.DEPTH_ESTIMATOR.file(self.config.path) is None:
            raise ModelFolderError(f"{self.name} has no depth estimator ({parts.DEPTH_ESTIMATOR.onnx_path}): give "
                                   "--depth-map, or export the model from a folder with depth_estimator/")
        if self.is_inpainting and (init_image is None or mask_image is None):
            raise InputError(f"{self.name} is an inpainting model: it needs an init image and a mask "
                             "(white = repaint)")
        if init_image is not None:
            init_image = load_image(init_image)
            own_width, own_height = default_size(init_image, self.size_multiple)
            width, height = width or own_width, height or own_height
        width = width or self.native_size
        height = height or self.native_size
        steps = self.defaults.steps if steps is None else steps
        guidance = self.defaults.guidance if guidance is None else guidance
        sampler = sampler or self.defaults.sampler
        config = GenerationConfig(
            prompt, negative_prompt, steps, guidance, seed, width, height, sampler, n, schedule, eta,
            None if init_image is None else strength, vae_tiles, decoder, cache_interval,
        ).validate()
        if width % self.size_multiple or height % self.size_multiple:
            raise InputError(
                f"{self.name} needs width and height in multiples of {self.size_multiple} (its UNet "
                f"halves the latent image at each level); got {width}x{height}"
            )
        if latents is None:
            latents = self.initial_noise(config)
        elif np.shape(latents) != config.latent_shape:
            raise InputError(
                f"latents must have shape {config.latent_shape} for n={n}, {width}x{height}; "
                f"got {np.shape(latents)}"
            )
        if config.cache_interval > 1:
            self.use_deep_cache()
        if safety_checker and not self.has_safety_checker:
            raise ModelFolderError(
                f"{self.name} has no safety checker ({parts.SAFETY_CHECKER.onnx_path}); sdonnx export writes one "
                "when the source folder has safety_checker/ and feature_extractor/")
        mark = self.watermark_text(watermark)
        if mark is not None:
            watermark_.check_fits(mark, width, height)
        if isinstance(loras, (str, Path, adapters.LoraUse)):
            loras = [loras]
        uses = self.adapters.prepare(prompt, negative_prompt, loras)
        # An LCM-distilled UNet gets the guidance as an input and runs no unconditional pass.
        distilled = self.guidance_embedding_dim is not None
        if distilled and negative_prompt:
            raise InputError(f"{self.name} is an LCM-distilled model: the guidance scale is an input of its UNet "
                             "and there is no unconditional pass, so it takes no negative prompt")
        steering = replace(config, guidance=1.0) if distilled else config
        self._decoder_part(config.decoder)  # a missing TAESD is said before sampling, not after
        chosen = SAMPLERS[config.sampler]
        schedule_, x, conditioning = self._start(config, np.asarray(latents, dtype=np.float32),
                                                 init_image, mask_image, depth_map)
        context = self.encode_context(steering)
        options = {**schedule_.sampler_kwargs, "noise": self.sampler_noise(config, x.shape),
                   "prediction_type": self.scheduler.prediction_type}
        if config.eta is not None:
            options["eta"] = config.eta
        options = {k: v for k, v in options.items() if k in chosen.options}
        precise = frozenset()
        if self.config.precision != "fp32":
            precise = precise_sigmas(chosen.sample, schedule_.sigmas, options, self.scheduler.prediction_type,
                                     steering.guidance)
        step_cache = deep_cache.StepCache(config.cache_interval) if config.cache_interval > 1 else None
        unet, precise_unet = partial(self._unet, step_cache=step_cache), partial(self._precise_unet, step_cache=step_cache)
        if distilled:
            cond = guidance_embedding(config.guidance, self.guidance_embedding_dim)
            unet, precise_unet = partial(unet, timestep_cond=cond), partial(precise_unet, timestep_cond=cond)

        def step(i: int, x: np.ndarray, denoised: np.ndarray) -> None:
            if callback:
                callback(i + 1, schedule_.steps)
            if on_step:
                on_step(i + 1, schedule_.steps, denoised)

        with self.using(parts.UNET) as loaded:
            # low_memory: one image per UNet call; a staged UNet that splits the batch itself
            # takes all of it and runs each stage over its images in turn (each stage opened
            # once per evaluation).
            whole_batch = isinstance(loaded, unet_stages.StagedUnet) and loaded.splits_batch
            del loaded  # (no reference may outlive the block: low_memory releases the UNet at its end)
            denoise = Denoiser(unet, context, steering.guidance, self.scheduler.prediction_type,
                               schedule_.sigma_to_t, conditioning, precise_unet, precise,
                               max_batch=1 if self.config.low_memory and not whole_batch else None,
                               before_evaluation=step_cache.begin if step_cache else None)
            x = chosen.sample(denoise, x, schedule_.sigmas, callback=step, **options)
        images = self.decode(schedule_.to_latents(x), config.vae_tiles, config.decoder)
        if safety_checker:
            flagged = self.check_safety(images).flagged
            images = [safety_checker_.blacked_out(im) if bad else im for im, bad in zip(images, flagged)]
            for image, bad in zip(images, flagged):
                image.info["nsfw_content_detected"] = bool(bad)
        if mark is not None:
            images = [watermark_.embed(image, mark) for image in images]
        recorded = replace(config, prompt=" ".join([config.prompt, *(u.tag for u in uses[:len(loras)])]))
        extra = {}
        if uses:
            extra["Lora hashes"] = ", ".join(f"{u.lora.name}: {u.lora.short_hash}" for u in uses)
        if config.cache_interval > 1:
            extra["DeepCache interval"] = str(config.cache_interval)
        if config.decoder == "tiny":
            extra["VAE"] = "TAESD"  # as the web UI names the VAE a picture was decoded with
        if self.adapters.embeddings:
            extra["TI hashes"] = ", ".join(f"{e.name}: {e.short_hash}" for e in self.adapters.embeddings)
        for i, image in enumerate(images):
            image.info["seed"] = config.seed + i
            image.info["parameters"] = infotext(
                recorded, seed=config.seed + i, sampler_label=chosen.label, model=self.name, extra=extra
            )
        return images

    def _start(self, config: GenerationConfig, noise: np.ndarray, init_image: Image.Image | None,
               mask_image, depth_map=None) -> tuple[Schedule, np.ndarray, np.ndarray | None]:
        """The schedule, the starting x in sigma space, and an inpainting UNet's extra channels.

        txt2img: scaled noise. img2img: the encoded image plus noise at the tail's first sigma
        (diffusers' add_noise). Inpainting, as StableDiffusionInpaintPipeline: the masked-out
        image is encoded, the mask taken at every 8th pixel, and strength 1 starts from noise.
        """
        schedule = config.schedule_for(self.scheduler)
        if init_image is None:
            return schedule, noise * schedule.noise_scale, None
        depth = self._depth(config, init_image, depth_map) if self.is_depth else None
        with self.using(parts.VAE_ENCODER):  # loaded once for both encodes of inpainting
            return self._start_from_image(config, schedule, noise, init_image, mask_image, depth)

    def _depth(self, config: GenerationConfig, init_image: Image.Image, depth_map) -> np.ndarray:
        """A depth model's fifth UNet channel (n, 1, H/8, W/8) for the init image as it is
        generated (scaled and cropped to the size asked): from `depth_map` (the init image's
        size, scaled and cropped the same way) or the folder's depth estimator."""
        if depth_map is None:
            fitted = fit(init_image, config.width, config.height)
            with self.using(parts.DEPTH_ESTIMATOR) as estimator:
                folder = self.config.path / parts.DEPTH_ESTIMATOR.name
                name = parts.DEPTH_ESTIMATOR.inputs[0]
                pixels = depth_.estimator_input(fitted, folder).astype(estimator.dtype(name))
                depth = estimator(**{name: pixels})[parts.DEPTH_ESTIMATOR.output][0]
        else:
            depth = depth_.load_depth_map(depth_map)
            if depth.shape != (init_image.height, init_image.width):
                raise InputError(f"the depth map is {depth.shape[1]}x{depth.shape[0]} but the init image is "
                                 f"{init_image.width}x{init_image.height}; they must be the same size")
            if (init_image.width, init_image.height) != (config.width, config.height):
                depth = np.asarray(fit(Image.fromarray(depth, "F"), config.width, config.height), np.float32)
        cond = depth_.conditioning(depth, config.height // parts.VAE_SCALE, config.width // parts.VAE_SCALE)
        return np.repeat(cond, config.n, axis=0)

    def _start_from_image(self, config: GenerationConfig, schedule: Schedule, noise: np.ndarray,
                          init_image: Image.Image, mask_image,
                          depth: np.ndarray | None = None) -> tuple[Schedule, np.ndarray, np.ndarray | None]:
        pixels = to_pixels(fit(init_image, config.width, config.height))
        if depth is not None:
            return schedule, self.encode_image(pixels, config.vae_tiles, config.decoder) + noise * schedule.sigmas[0], depth
        if mask_image is None:
            return schedule, self.encode_image(pixels, config.vae_tiles, config.decoder) + noise * schedule.sigmas[0], None
        mask_image = load_image(mask_image, "mask image", MASK_BACKGROUND)
        if mask_image.size != init_image.size:
            raise InputError(
                f"the mask is {mask_image.width}x{mask_image.height} but the init image is "
                f"{init_image.width}x{init_image.height}; they must be the same size"
            )
        mask = to_mask(fit(mask_image, config.width, config.height))
        masked = self.encode_image(pixels * (mask < 0.5), config.vae_tiles, config.decoder)
        latent_mask = mask[:, :, :: parts.VAE_SCALE, :: parts.VAE_SCALE]
        conditioning = np.repeat(np.concatenate([latent_mask, masked], axis=1), config.n, axis=0)
        if config.strength == 1.0:
            return schedule, noise * schedule.noise_scale, conditioning
        return schedule, self.encode_image(pixels, config.vae_tiles, config.decoder) + noise * schedule.sigmas[0], conditioning
