"""Depth-to-image at run time: the depth estimator's input, and the depth map the UNet takes.

As diffusers' StableDiffusionDepth2ImgPipeline.prepare_depth_map: the init image goes through
DPT's image processor (resize to the estimator's fixed size with PIL, scaled to [0, 1],
normalized) into the depth_estimator part (export/depth.py), or the user gives a depth map;
the map is resized to the latents' size with torch's bicubic interpolation (written out below
in numpy: Keys' cubic convolution with a = -0.75, half-pixel centres, edge clamping), scaled
to [-1, 1] by its own minimum and maximum, and becomes the UNet's fifth input channel.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from sdonnx.runtime import parts
from sdonnx.runtime.errors import InputError

DEPTH_PIPELINE = "StableDiffusionDepth2ImgPipeline"  # model_index.json's _class_name
PREPROCESSOR_CONFIG = "preprocessor_config.json"
DPT_SIDE = 384  # DPT-Hybrid's input side, when a file does not say
CUBIC_A = -0.75  # torch's (and OpenCV's) bicubic coefficient


def _size(value, default: int) -> tuple[int, int]:
    if isinstance(value, dict):
        return int(value.get("height", default)), int(value.get("width", default))
    return (int(value), int(value)) if value is not None else (default, default)


def input_size(config: dict) -> tuple[int, int]:
    """(height, width) the feature extractor resizes to (DPTImageProcessor's `size`)."""
    return _size(config.get("size"), DPT_SIDE)


def _multiple(value: float, multiple: int) -> int:
    """DPT's constrain_to_multiple_of: the nearest multiple (up when that would be 0)."""
    x = round(value / multiple) * multiple
    return x if x >= multiple else math.ceil(value / multiple) * multiple


def estimator_input(image: Image.Image, folder: Path) -> np.ndarray:
    """`image` as the depth estimator's pixel_values (1, 3, H, W) float32, as transformers'
    DPTImageProcessor makes it with the settings in `folder`'s preprocessor_config.json:
    resized with PIL (bicubic unless the file says otherwise; keeping the aspect ratio and
    rounding to a multiple when the file asks), scaled by 1/255, normalized."""
    config = parts.read_json(folder / PREPROCESSOR_CONFIG)
    image = image.convert("RGB")
    if config.get("do_resize", True):
        height, width = input_size(config)
        scale_h, scale_w = height / image.height, width / image.width
        if config.get("keep_aspect_ratio", False):
            if abs(1 - scale_w) < abs(1 - scale_h):
                scale_h = scale_w
            else:
                scale_w = scale_h
        multiple = int(config.get("ensure_multiple_of", 1))
        size = (_multiple(scale_w * image.width, multiple), _multiple(scale_h * image.height, multiple))
        image = image.resize(size, Image.Resampling(int(config.get("resample", Image.Resampling.BICUBIC))))
    pixels = np.asarray(image).astype(np.float32).transpose(2, 0, 1)
    if config.get("do_rescale", True):
        pixels = pixels * np.float32(config.get("rescale_factor", 1 / 255))
    if config.get("do_normalize", True):
        mean = np.array(config.get("image_mean", [0.5] * 3), dtype=np.float32)[:, None, None]
        std = np.array(config.get("image_std", [0.5] * 3), dtype=np.float32)[:, None, None]
        pixels = (pixels - mean) / std
    return pixels[None].astype(np.float32)


def _cubic_matrix(size_in: int, size_out: int) -> np.ndarray:
    """(size_out, size_in) weights of torch's bicubic resize along one axis (align_corners
    False: source x = (i + 0.5) * in / out - 0.5, not clamped; taps at floor(x) - 1 .. + 2
    clamped to the edge)."""
    a = CUBIC_A
    x = (np.arange(size_out) + 0.5) * (size_in / size_out) - 0.5
    base = np.floor(x)
    t = x - base
    weights = [
        ((a * (t + 1) - 5 * a) * (t + 1) + 8 * a) * (t + 1) - 4 * a,
        ((a + 2) * t - (a + 3)) * t * t + 1,
        ((a + 2) * (1 - t) - (a + 3)) * (1 - t) * (1 - t) + 1,
        ((a * (2 - t) - 5 * a) * (2 - t) + 8 * a) * (2 - t) - 4 * a,
    ]
    matrix = np.zeros((size_out, size_in))
    rows = np.arange(size_out)
    for offset, w in zip((-1, 0, 1, 2), weights):
        np.add.at(matrix, (rows, np.clip(base.astype(int) + offset, 0, size_in - 1)), w)
    return matrix


def resize_bicubic(depth: np.ndarray, height: int, width: int) -> np.ndarray:
    """A (H, W) map resized to (height, width) as torch.nn.functional.interpolate(mode="bicubic",
    align_corners=False) does (no antialiasing): float64."""
    return _cubic_matrix(depth.shape[0], height) @ depth.astype(np.float64) @ _cubic_matrix(depth.shape[1], width).T


def conditioning(depth: np.ndarray, latent_height: int, latent_width: int) -> np.ndarray:
    """The UNet's depth channel (1, 1, h, w) float32 from a depth map (H, W) of any scale:
    resized to the latents (resize_bicubic) and scaled to [-1, 1] by its minimum and maximum.
    InputError for a flat map (no depth to follow)."""
    resized = resize_bicubic(depth, latent_height, latent_width)
    low, high = resized.min(), resized.max()
    if not high > low:
        raise InputError("the depth map is flat (one value everywhere): there is no depth to follow; "
                         "give a depth map with near and far parts")
    return (2 * (resized - low) / (high - low) - 1)[None, None].astype(np.float32)


def load_depth_map(path: str | Path | Image.Image) -> np.ndarray:
    """A depth map image as (H, W) float32: 8-bit grey or colour (taken as luminance), or 16-bit
    / 32-bit grey read at full precision; the EXIF orientation applied. Brighter = nearer, as
    MiDaS and DPT draw them (only the order matters: the map is scaled to [-1, 1])."""
    try:
        image = path if isinstance(path, Image.Image) else Image.open(path)
        image.load()
    except FileNotFoundError:
        raise InputError(f"depth map not found: {path}") from None
    except (UnidentifiedImageError, OSError) as e:
        raise InputError(f"depth map {path} cannot be read as an image ({e})") from None
    image = ImageOps.exif_transpose(image)
    if image.mode in ("I", "I;16", "I;16B", "I;16L", "F"):
        return np.asarray(image).astype(np.float32)
    return np.asarray(image.convert("L")).astype(np.float32)
