"""One picture of a whole run, as CompVis' scripts/txt2img.py saves beside the images."""

from __future__ import annotations

import numpy as np
from PIL import Image

from sdonnx.runtime.errors import InputError


def image_grid(images: list[Image.Image], columns: int) -> Image.Image:
    """Tile same-size images row by row, `columns` to a row; a short last row is left black."""
    if not images or columns < 1:
        raise InputError(f"a grid needs images and at least one column, got {len(images)} and {columns}")
    sizes = {im.size for im in images}
    if len(sizes) > 1:
        raise InputError(f"grid images must share one size, got {sorted(sizes)}")
    width, height = images[0].size
    rows = -(-len(images) // columns)
    grid = np.zeros((rows * height, columns * width, 3), dtype=np.uint8)
    for i, image in enumerate(images):
        row, col = divmod(i, columns)
        grid[row * height:(row + 1) * height, col * width:(col + 1) * width] = np.asarray(image.convert("RGB"))
    return Image.fromarray(grid)
