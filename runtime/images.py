"""Input images for img2img and inpainting: reading, the size rule, pixel and mask arrays."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from sdonnx.runtime import parts
from sdonnx.runtime.errors import InputError


INIT_BACKGROUND = (255, 255, 255)
MASK_BACKGROUND = (0, 0, 0)
_SIXTEEN_BIT = ("I;16", "I;16L", "I;16B", "I;16N")


def load_image(image: Image.Image | str | Path | bytes, what: str = "init image",
               background: tuple[int, int, int] = INIT_BACKGROUND, max_pixels: int | None = None) -> Image.Image:
    """The 8-bit RGB picture a person sees in an image file, its bytes, or a PIL image.

    Read fully, so a bad file fails here with an InputError naming `what`. The EXIF
    orientation is applied (a phone's portrait JPEG is stored sideways); 16-bit and 32-bit
    grey are scaled to 8 bits, not clipped (a 16-bit PNG would turn white); transparency is
    flattened onto `background`: white for init images, as AUTOMATIC1111 does by default
    (its img2img_background_color), black for masks (MASK_BACKGROUND), so a mask painted on a
    transparent layer repaints only what was painted. A file of more than `max_pixels` pixels
    is refused before it is decoded.
    """
    if isinstance(image, Image.Image):
        return as_seen(image, background)
    if isinstance(image, (bytes, bytearray)):
        source, name = io.BytesIO(image), "data"
    elif isinstance(image, (str, Path)):
        source, name = image, str(image)
    else:
        raise InputError(f"{what} must be a PIL image or a path to an image file, got {type(image).__name__}")
    try:
        with Image.open(source) as opened:
            if max_pixels is not None and opened.width * opened.height > max_pixels:
                raise InputError(f"{what} is {opened.width}x{opened.height}, over the {max_pixels:,} pixels "
                                 "accepted here; scale it down first")
            opened.load()
            return as_seen(opened, background)
    except InputError:
        raise
    except FileNotFoundError:
        raise InputError(f"{what} not found: {image}") from None
    except IsADirectoryError:
        raise InputError(f"{what} {image} is a folder, not an image file") from None
    except UnidentifiedImageError:
        raise InputError(f"{what} {name} cannot be read as an image (not a format PIL reads: PNG, JPEG, "
                         "WebP ...)") from None
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        raise InputError(f"{what} {name} cannot be read as an image ({e})") from None


def as_seen(image: Image.Image, background: tuple[int, int, int] = INIT_BACKGROUND) -> Image.Image:
    """`image` upright, in 8-bit RGB, transparency flattened onto `background` (see load_image)."""
    image = ImageOps.exif_transpose(image)
    if image.mode in (*_SIXTEEN_BIT, "I", "F"):
        values = np.asarray(image, dtype=np.float64)
        top = values.max(initial=0)
        if image.mode == "F":
            scale = 255.0 if top <= 1.0 else 1.0  # 0..1 floats, else 0..255
        else:  # mode I holds 16-bit data as PIL reads 16-bit PNGs and TIFFs; 8-bit data stays as it is
            scale = 1 / 257 if image.mode in _SIXTEEN_BIT or top > 255 else 1.0
        image = Image.fromarray(np.clip(values * scale, 0, 255).round().astype(np.uint8), "L")
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info) \
            or (image.mode in ("RGB", "L") and "transparency" in image.info):
        rgba = image.convert("RGBA")
        flat = Image.new("RGBA", rgba.size, (*background, 255))
        flat.alpha_composite(rgba)
        return flat.convert("RGB")
    return image.convert("RGB") if image.mode != "RGB" else image


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
