"""Input images for img2img and inpainting: reading, the size rule, pixel and mask arrays."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from sdonnx.runtime import parts
from sdonnx.runtime.errors import InputError


def load_image(image: Image.Image | str | Path, what: str = "init image") -> Image.Image:
    """A PIL image or a path to one, read fully so a bad file fails here, naming it."""
    if isinstance(image, Image.Image):
        return image
    if not isinstance(image, (str, Path)):
        raise InputError(f"{what} must be a PIL image or a path to an image file, got {type(image).__name__}")
    try:
        with Image.open(image) as opened:
            opened.load()
            return opened.copy()
    except FileNotFoundError:
        raise InputError(f"{what} not found: {image}") from None
    except (UnidentifiedImageError, OSError) as e:
        raise InputError(f"{what} {image} cannot be read as an image ({e})") from None


def default_size(image: Image.Image, multiple: int = parts.VAE_SCALE) -> tuple[int, int]:
    """The image's own size rounded down to a multiple the model takes (at least one)."""
    w, h = (max(multiple, side - side % multiple) for side in image.size)
    return w, h


def fit(image: Image.Image, width: int, height: int, resample=Image.Resampling.LANCZOS) -> Image.Image:
    """Scale to cover width x height keeping the aspect ratio, then crop the centre.

    An image already of that size is used as it is.
    """
    if image.size == (width, height):
        return image
    scale = max(width / image.width, height / image.height)
    w, h = max(width, round(image.width * scale)), max(height, round(image.height * scale))
    image = image.resize((w, h), resample=resample)
    left, top = (w - width) // 2, (h - height) // 2
    return image.crop((left, top, left + width, top + height))


def to_pixels(image: Image.Image) -> np.ndarray:
    """(1, 3, H, W) float32 in [-1, 1], the VAE encoder's input."""
    rgb = np.asarray(image.convert("RGB"), dtype=np.float32) / 127.5 - 1.0
    return rgb.transpose(2, 0, 1)[None]


def to_mask(mask: Image.Image) -> np.ndarray:
    """(1, 1, H, W) float32 of 0 and 1: white (>= half grey) is repainted."""
    grey = np.asarray(mask.convert("L"), dtype=np.float32) / 255.0
    return (grey >= 0.5).astype(np.float32)[None, None]
