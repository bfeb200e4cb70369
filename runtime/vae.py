"""Tiled VAE decode and encode: any image size in bounded memory.

The VAE decoder's activations grow with the image (an SD 1.5 decode at 512x512 holds about
0.8 GB, at 2048x2048 about 16 times that), so large images are decoded in overlapping tiles
whose seams are blended linearly, as diffusers' `AutoencoderKL.enable_tiling()` does
(`tiled_decode` / `_tiled_encode`): tiles of `tile` latent pixels start every
tile x (1 - overlap), each tile's decoded edges are cross-faded over tile x overlap pixels with
the tile above and the tile to the left, and each tile keeps its first tile x (1 - overlap)
pixels. The result equals diffusers' tiled decode of the same latents; it differs from an
untiled decode only because the decoder's group norms and mid-block attention see one tile
instead of the whole image (tests/test_vae.py measures how much).
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from sdonnx.runtime import parts
from sdonnx.runtime.checks import is_int, shown
from sdonnx.runtime.errors import InputError

OVERLAP = 0.25  # diffusers' tile_overlap_factor
# Tile sides are whole multiples of this many latent pixels (32 image pixels): then a tile's
# stride (3/4 of it) and its blend (1/4) are whole latent pixels and the tiles add up to the
# image exactly; it is also the smallest tile.
TILE_STEP = 4


def _blend_rows(above: np.ndarray, tile: np.ndarray, extent: int) -> None:
    """Cross-fade the first `extent` rows of `tile` from the last ones of `above`, in place."""
    extent = min(above.shape[2], tile.shape[2], extent)
    if extent:
        weight = (np.arange(extent, dtype=np.float32) / extent)[:, None]
        tile[:, :, :extent, :] = above[:, :, -extent:, :] * (1 - weight) + tile[:, :, :extent, :] * weight


def _blend_columns(left: np.ndarray, tile: np.ndarray, extent: int) -> None:
    """Cross-fade the first `extent` columns of `tile` from the last ones of `left`, in place."""
    extent = min(left.shape[3], tile.shape[3], extent)
    if extent:
        weight = np.arange(extent, dtype=np.float32) / extent
        tile[:, :, :, :extent] = left[:, :, :, -extent:] * (1 - weight) + tile[:, :, :, :extent] * weight


def tiled(fn: Callable[[np.ndarray], np.ndarray], x: np.ndarray, tile: int, scale: float,
          overlap: float = OVERLAP) -> np.ndarray:
    """fn applied to overlapping `tile` x `tile` windows of x (N, C, H, W), blended.

    `scale`: fn's output side per input side (8 for a decoder, 1/8 for an encoder).
    Returns (N, C_out, H * scale, W * scale) float32.
    """
    stride = int(tile * (1 - overlap))
    tile_out = int(tile * scale)
    extent = int(tile_out * overlap)
    keep = tile_out - extent
    rows = [[fn(x[:, :, i:i + tile, j:j + tile]).astype(np.float32)
             for j in range(0, x.shape[3], stride)]
            for i in range(0, x.shape[2], stride)]
    out_rows = []
    for i, row in enumerate(rows):
        kept = []
        for j, t in enumerate(row):
            if i > 0:
                _blend_rows(rows[i - 1][j], t, extent)
            if j > 0:
                _blend_columns(row[j - 1], t, extent)
            kept.append(t[:, :, :keep, :keep])
        out_rows.append(np.concatenate(kept, axis=3))
    return np.concatenate(out_rows, axis=2)


def check_tiles(value) -> int | str:
    """`vae_tiles` as given: "auto", "off", or a tile side in pixels (a multiple of
    TILE_STEP x 8 = 32); an InputError names what is wrong."""
    if value in ("auto", "off"):
        return value
    if isinstance(value, str) and value.isascii() and value.isdecimal():
        value = int(value)
    step = TILE_STEP * parts.VAE_SCALE
    if not is_int(value) or value % step or value < step:
        raise InputError(f"vae tiles must be auto, off, or a tile side in pixels (a multiple of {step}); "
                         f"got {shown(value)}")
    return int(value)


def tile_latent(tiles: int | str, default_tile: int, height: int, width: int) -> int | None:
    """The tile side in latent pixels for a (height, width) latent, or None for one piece:
    "auto" tiles above `default_tile` (the VAE's training size, diffusers' rule), "off" never,
    a number of pixels always when the latent is larger than one tile."""
    if tiles == "off":
        return None
    size = default_tile if tiles == "auto" else int(tiles) // parts.VAE_SCALE
    return size if max(height, width) > size else None


# AUTOMATIC1111's "Approx cheap" preview (modules/sd_vae_approx.py, cheap_approximation):
# RGB in [-1, 1] as a linear map of SD 1.x/2.x's four scaled latent channels.
CHEAP_RGB = np.array([[0.298, 0.207, 0.208],
                      [0.187, 0.286, 0.173],
                      [-0.158, 0.189, 0.264],
                      [-0.184, -0.271, -0.473]], dtype=np.float32)


def cheap_rgb(latent: np.ndarray) -> np.ndarray:
    """A preview of scaled latents (4, h, w), float32, as 8-bit RGB (h, w, 3) at latent
    resolution (1/8 of the image's side): a 4x3 linear map, microseconds where a VAE decode
    takes seconds. Colours and layout only; no detail."""
    rgb = np.einsum("chw,cr->hwr", latent.astype(np.float32), CHEAP_RGB)
    return (np.clip((rgb + 1) / 2, 0, 1) * 255).round().astype(np.uint8)
