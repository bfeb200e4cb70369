"""Stable Diffusion's x4 upscaler: a low-resolution image in, four times its side out.

The data flow of diffusers' StableDiffusionUpscalePipeline, on the parts of an sdonnx folder
(export/upscaler.py): the image, in [-1, 1], is noised to `noise_level` with the low-resolution
DDPM schedule (low_res_scheduler/, at most max_noise_level = 350) and joins the latents as 3
more UNet input channels, unscaled; the noise level is the UNet's class label. Latents have the
low-resolution image's side (the VAE upsamples 4x: three levels, scaling factor 0.08333); the
sampler runs on them as for txt2img (runtime/denoiser.py), DDIM on v-prediction unless asked
otherwise.

Large images run the UNet in overlapping latent tiles at every step, blended with linear
ramps where tiles overlap (MultiDiffusion, Bar-Tal et al. 2023: the denoised estimate is the
weighted mean of the tiles'), and decode in the VAE's tiles (runtime/vae.py), so that a
512x512 -> 2048x2048 upscale needs a tile's activations, not the whole image's.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from functools import partial
from typing import TYPE_CHECKING, Callable

import numpy as np
from PIL import Image

from sdonnx.runtime import parts
from sdonnx.runtime.checks import MAX_SIDE, is_int, shown
from sdonnx.runtime.errors import InputError, ModelFolderError

if TYPE_CHECKING:
    from sdonnx.runtime.pipeline import Pipeline

UPSCALE_PIPELINE = "StableDiffusionUpscalePipeline"  # model_index.json's _class_name
LOW_RES_SCHEDULER = "low_res_scheduler"
SCALE = 4  # output side per input side
UNET_MULTIPLE = 8  # the UNet halves the latents three times: sides in multiples of 8
DEFAULT_MAX_NOISE_LEVEL = 350  # diffusers' default, when model_index.json does not say
# diffusers' defaults (StableDiffusionUpscalePipeline.__call__), steps excepted: 75 there; 20 is
# what the other samplers here default to and keeps a CPU upscale in minutes.
DEFAULT_NOISE_LEVEL = 20
DEFAULT_GUIDANCE = 9.0
DEFAULT_STEPS = 20
DEFAULT_SAMPLER = "ddim"
# The UNet's tile side in latent pixels (= input pixels), and the share of it neighbours
# overlap; 128 keeps the x4 UNet's activations for a CFG pair near 2 GB (tests/benchmarks/upscale.py).
DEFAULT_TILE = 128
MIN_TILE = 16
TILE_OVERLAP = 0.25


@dataclass(frozen=True)
class UpscaleConfig:
    """One upscale call's parameters (sizes in pixels of the low-resolution input)."""

    prompt: str = ""
    negative_prompt: str = ""
    noise_level: int = DEFAULT_NOISE_LEVEL
    steps: int = DEFAULT_STEPS
    guidance: float = DEFAULT_GUIDANCE
    seed: int = 0
    sampler: str = DEFAULT_SAMPLER
    tile: int | None = DEFAULT_TILE  # UNet tile side in latent pixels; None: one piece
    vae_tiles: int | str = "auto"

    def validate(self, max_noise_level: int) -> "UpscaleConfig":
        """This config with its seed drawn when None or -1; InputError for a value out of range
        (steps, guidance, sampler, seed and VAE tiles as GenerationConfig.validate checks them)."""
        from sdonnx.runtime.pipeline import GenerationConfig

        seed = GenerationConfig(self.prompt, self.negative_prompt, self.steps, self.guidance, self.seed,
                                sampler=self.sampler, vae_tiles=self.vae_tiles).validate().seed
        if not is_int(self.noise_level) or not 0 <= self.noise_level <= max_noise_level:
            raise InputError(f"noise level must be a whole number from 0 to {max_noise_level} (this model's "
                             f"max_noise_level), got {shown(self.noise_level)}")
        if self.tile is not None and (not is_int(self.tile) or self.tile % UNET_MULTIPLE
                                      or not MIN_TILE <= self.tile <= 4096):
            raise InputError(f"the UNet tile must be a multiple of {UNET_MULTIPLE} from {MIN_TILE} to 4096 "
                             f"input pixels, got {shown(self.tile)}")
        return replace(self, seed=seed)


def is_upscaler(folder) -> bool:
    """Whether a model folder (or the diffusers folder it is exported from) holds the x4
    upscaler: its model_index.json says so."""
    return parts.read_json(folder / "model_index.json").get("_class_name") == UPSCALE_PIPELINE


def check_upscaler(folder) -> None:
    """InputError, saying what to export, unless `folder` holds the x4 upscaler."""
    if not is_upscaler(folder):
        raise InputError(f"{folder} is not an x4 upscaler (its model_index.json names "
                         f"{parts.read_json(folder / 'model_index.json').get('_class_name')!r}, not "
                         f"{UPSCALE_PIPELINE}); export stabilityai/stable-diffusion-x4-upscaler with "
                         "`sdonnx export` and pass that folder")


def tile_starts(size: int, tile: int, overlap: int) -> list[int]:
    """Offsets of the fewest tiles of side `tile` that cover `size` with neighbours sharing at
    least `overlap`, spread evenly (first at 0, last flush with the end) on multiples of 8, so
    that each tile's downsampling grid is the whole image's (off-grid tiles cost this test
    model 10 dB); [0] when one tile covers it. `size` and `tile`: multiples of 8."""
    if size <= tile:
        return [0]
    count = -(-(size - overlap) // (tile - overlap))
    return [round(i * (size - tile) / (count - 1) / UNET_MULTIPLE) * UNET_MULTIPLE for i in range(count)]


def _ramp(length: int, overlap: int) -> np.ndarray:
    """Weights along one side of a tile: rising linearly over `overlap` at both ends, 1 between."""
    i = np.arange(length, dtype=np.float32)
    return np.minimum(1.0, np.minimum(i + 1, length - i) / (overlap + 1))


def tiled_unet(unet: Callable, tile: int, overlap: int | None = None) -> Callable:
    """`unet(sample, t, context)` over `tile` x `tile` windows of the sample's last two axes
    that share at least `overlap` pixels (default: TILE_OVERLAP of the tile), blended by
    linear ramps (MultiDiffusion's weighted mean, Bar-Tal et al. 2023); one call when the
    sample fits one tile. Output channels as `unet`'s (4), float32."""
    overlap = max(UNET_MULTIPLE, int(tile * TILE_OVERLAP) if overlap is None else overlap)

    def run(sample: np.ndarray, t: float, context: np.ndarray) -> np.ndarray:
        height, width = sample.shape[2:]
        if max(height, width) <= tile:
            return unet(sample, t, context)
        out = weight = None
        rows, columns = tile_starts(height, tile, overlap), tile_starts(width, tile, overlap)
        # Ramps as wide as the least overlap the even spread gives (about `overlap` or more).
        shared = [tile - max(np.diff(starts)) if len(starts) > 1 else 0 for starts in (rows, columns)]
        for y in rows:
            for x in columns:
                window = sample[:, :, y:y + tile, x:x + tile]
                piece = unet(window, t, context).astype(np.float32)
                ramp = np.outer(_ramp(window.shape[2], shared[0]), _ramp(window.shape[3], shared[1]))
                if out is None:
                    out = np.zeros((len(sample), piece.shape[1], height, width), np.float32)
                    weight = np.zeros((height, width), np.float32)
                out[:, :, y:y + tile, x:x + tile] += piece * ramp
                weight[y:y + tile, x:x + tile] += ramp
        return out / weight

    return run


def low_res_noise_scale(pipe: "Pipeline", noise_level: int) -> tuple[float, float]:
    """(sqrt(alpha_bar), sqrt(1 - alpha_bar)) of the low-resolution schedule at `noise_level`:
    DDPMScheduler.add_noise's factors for the image and its noise."""
    from sdonnx.runtime.schedules import SchedulerConfig, alphas_cumprod

    file = pipe.config.path / LOW_RES_SCHEDULER / "scheduler_config.json"
    if not file.is_file():
        raise ModelFolderError(f"{pipe.config.path} lacks {LOW_RES_SCHEDULER}/scheduler_config.json, which the "
                               "upscaler needs; export the model again")
    alpha_bar = float(alphas_cumprod(SchedulerConfig.from_file(file))[noise_level])
    return float(np.sqrt(alpha_bar)), float(np.sqrt(1 - alpha_bar))


def max_noise_level(pipe: "Pipeline") -> int:
    """The model's max_noise_level (model_index.json; 350 when it does not say), at most its
    UNet's last class label (num_class_embeds - 1) and its low-resolution schedule's last step."""
    index = pipe.config.path / "model_index.json"
    level = parts.config_field(parts.read_json(index), "max_noise_level", DEFAULT_MAX_NOISE_LEVEL,
                               lambda v: is_int(v) and 0 <= v <= 1000, index, "a whole number from 0 to 1000")
    unet = pipe.config.path / parts.UNET.name / "config.json"
    labels = parts.config_field(parts.read_json(unet), "num_class_embeds", level + 1,
                                lambda v: is_int(v) and v > 0, unet, "a positive whole number")
    schedule = pipe.config.path / LOW_RES_SCHEDULER / "scheduler_config.json"
    steps = parts.config_field(parts.read_json(schedule), "num_train_timesteps", level + 1,
                               lambda v: is_int(v) and v > 0, schedule, "a positive whole number")
    return min(level, labels - 1, steps - 1)


def upscale(pipe: "Pipeline", image: Image.Image, config: UpscaleConfig,
            callback: Callable[[int, int], None] | None = None, latents: np.ndarray | None = None,
            noise: np.ndarray | None = None) -> Image.Image:
    """`image` (8-bit RGB, any size) upscaled 4x by the upscaler folder loaded in `pipe`:
    an (4 H, 4 W) RGB image with its parameters in info["parameters"]. Sides that are not
    multiples of 8 are padded (edge pixels repeated) and the result cropped. `latents` (1, 4,
    H', W') and `noise` (1, 3, H', W'), unit normal at the padded size H', W', replace the seeded
    ones (seed: latents; [seed, 2]: the low-resolution image's noise). Raises InputError for
    values out of range or a folder that is not an upscaler."""
    from sdonnx.runtime.denoiser import Denoiser
    from sdonnx.runtime.images import to_pixels
    from sdonnx.runtime.infotext import infotext
    from sdonnx.runtime.pipeline import SAMPLERS, GenerationConfig

    check_upscaler(pipe.config.path)
    config = config.validate(max_noise_level(pipe))
    width, height = image.size
    if max(width, height) * SCALE > MAX_SIDE:
        raise InputError(f"the image is {width}x{height}: upscaled 4x it would be over the {MAX_SIDE}-pixel side "
                         f"sdonnx draws; crop or scale it to {MAX_SIDE // SCALE} pixels a side or less first")
    padded_w, padded_h = -(-width // UNET_MULTIPLE) * UNET_MULTIPLE, -(-height // UNET_MULTIPLE) * UNET_MULTIPLE
    generation = GenerationConfig(config.prompt, config.negative_prompt, config.steps, config.guidance, config.seed,
                                  padded_w * SCALE, padded_h * SCALE, config.sampler).validate()
    low = np.pad(to_pixels(image.convert("RGB")), ((0, 0), (0, 0), (0, padded_h - height), (0, padded_w - width)),
                 mode="edge")
    shape = (1, parts.LATENT_CHANNELS, padded_h, padded_w)
    for given, name, expected in ((latents, "latents", shape), (noise, "noise", low.shape)):
        if given is not None and np.shape(given) != expected:
            raise InputError(f"{name} must have shape {expected} for a {width}x{height} image, got {np.shape(given)}")
    seed = generation.seed
    if latents is None:
        latents = np.random.default_rng(seed).standard_normal(shape[1:], dtype=np.float32)[None]
    if noise is None:
        noise = np.random.default_rng([seed, 2]).standard_normal(low.shape[1:], dtype=np.float32)[None]
    image_scale, noise_scale = low_res_noise_scale(pipe, config.noise_level)
    conditioning = (low * image_scale + noise * noise_scale).astype(np.float32)

    chosen = SAMPLERS[generation.sampler]
    schedule = chosen.schedule(pipe.scheduler, generation.steps)
    context = pipe.encode_context(generation)
    unet = partial(pipe._unet, class_labels=config.noise_level)
    if config.tile is not None:
        unet = tiled_unet(unet, config.tile)
    options = {**schedule.sampler_kwargs, "noise": pipe.sampler_noise(generation, latents.shape),
               "prediction_type": pipe.scheduler.prediction_type}
    options = {k: v for k, v in options.items() if k in chosen.options}

    def step(i: int, x: np.ndarray, denoised: np.ndarray) -> None:
        if callback:
            callback(i + 1, schedule.steps)

    with pipe.using(parts.UNET):
        denoise = Denoiser(unet, context, generation.guidance, pipe.scheduler.prediction_type, schedule.sigma_to_t,
                           conditioning)
        x = chosen.sample(denoise, np.asarray(latents, np.float32) * schedule.noise_scale, schedule.sigmas,
                          callback=step, **options)
    (result,) = pipe.decode(schedule.to_latents(x), config.vae_tiles)
    result = result.crop((0, 0, width * SCALE, height * SCALE))
    result.info["seed"] = seed
    result.info["parameters"] = infotext(
        replace(generation, width=width * SCALE, height=height * SCALE), seed=seed, sampler_label=chosen.label,
        model=pipe.name, extra={"Noise level": str(config.noise_level), "Upscaled from": f"{width}x{height}",
                                "UNet tile": str(config.tile) if config.tile else "off"})
    return result
