"""An automatic judge: the colour and shape of the main object in a generated image.

Deterministic image analysis, no model: the background is the median colour of the border,
the object is the largest connected region of pixels far from it, its colour is the nearest of
the training palette to the median colour of the object's inner half, and its outline is where
pixels are half-way from the background to that colour. A star is the one concave shape: its
region fills little of its convex hull (solidity 0.53-0.60 on clean drawings, at most 0.82
blurred, against 0.89 and more for the others). The convex shapes differ in how much of their
bounding box they fill (square 1, circle pi/4, triangle 1/2 on clean drawings, up to 0.68
blurred).
"""

from __future__ import annotations

import numpy as np
from PIL import Image

from sdonnx.models import shapes

MAX_STAR_SOLIDITY = 0.86
# Bounding-box fill boundaries between the convex shapes, between their clean and blurred values.
FILL_BOUNDS = ((0.72, "triangle"), (0.89, "circle"), (9.0, "square"))
MIN_DISTANCE = 80.0  # RGB distance from the background that counts as object
MIN_PIXELS = 12


def largest_region(mask: np.ndarray) -> np.ndarray:
    """The largest 4-connected region of a boolean mask (flood fill)."""
    seen = np.zeros_like(mask)
    best: list[tuple[int, int]] = []
    for start in zip(*np.nonzero(mask)):
        if seen[start]:
            continue
        seen[start] = True
        region, stack = [], [start]
        while stack:
            y, x = stack.pop()
            region.append((y, x))
            for ny, nx in ((y + 1, x), (y - 1, x), (y, x + 1), (y, x - 1)):
                if 0 <= ny < mask.shape[0] and 0 <= nx < mask.shape[1] and mask[ny, nx] and not seen[ny, nx]:
                    seen[ny, nx] = True
                    stack.append((ny, nx))
        if len(region) > len(best):
            best = region
    out = np.zeros_like(mask)
    if best:
        out[tuple(np.array(best).T)] = True
    return out


def hull_area(mask: np.ndarray) -> float:
    """Area of the convex hull of a region's pixel squares (monotone chain + shoelace)."""
    ys, xs = np.nonzero(mask)
    corners = np.concatenate([np.stack([xs + dx, ys + dy], 1) for dx in (0, 1) for dy in (0, 1)])
    points = sorted(set(map(tuple, corners.tolist())))

    def half(chain):
        hull: list[tuple[int, int]] = []
        for p in chain:
            while len(hull) >= 2 and ((hull[-1][0] - hull[-2][0]) * (p[1] - hull[-2][1])
                                      - (hull[-1][1] - hull[-2][1]) * (p[0] - hull[-2][0])) <= 0:
                hull.pop()
            hull.append(p)
        return hull[:-1]

    x, y = np.array(half(points) + half(points[::-1]), dtype=np.float64).T
    return 0.5 * abs(float(x @ np.roll(y, 1) - y @ np.roll(x, 1)))


def judge(image: Image.Image) -> tuple[str | None, str | None]:
    """(colour, shape) of the main object, or (None, None) when there is none."""
    pixels = np.asarray(image.convert("RGB"), dtype=np.float64)
    border = np.concatenate([pixels[0], pixels[-1], pixels[:, 0], pixels[:, -1]])
    background = np.median(border, axis=0)
    core = largest_region(np.linalg.norm(pixels - background, axis=-1) > MIN_DISTANCE)
    if core.sum() < MIN_PIXELS:
        return None, None
    # The object's colour from its inner half (farthest from the background): on a small, soft
    # object the edge pixels, mixed with the background, are the majority.
    distance = np.linalg.norm(pixels[core] - background, axis=-1)
    median = np.median(pixels[core][distance >= np.median(distance)], axis=0)
    # The outline lies where a pixel is half-way from the background to the object's colour,
    # so a soft (decoded) edge neither grows nor shrinks the shape.
    contrast = median - background
    share = (pixels - background) @ contrast / max(float(contrast @ contrast), 1e-9)
    mask = largest_region(share > 0.5)
    ys, xs = np.nonzero(mask)
    if mask.sum() / hull_area(mask) < MAX_STAR_SOLIDITY:
        shape = "star"
    else:
        fill = mask.sum() / ((ys.max() - ys.min() + 1) * (xs.max() - xs.min() + 1))
        shape = next(name for bound, name in FILL_BOUNDS if fill < bound)
    palette = {name: np.array(rgb, dtype=np.float64) for name, rgb in shapes.COLORS.items()}
    color = min(palette, key=lambda name: np.linalg.norm(palette[name] - median))
    return color, shape


def accuracy(pipe, scenes, *, seeds=(0, 1), sampler="euler", guidance=None, steps=20, prompt=None) -> dict:
    """Share of images whose judged colour, shape and both match the prompt's scene
    (`guidance` None: the model's recommended one). With `prompt` given, every image is made
    from it instead of the scene's caption, still judged against the scene: `prompt=""` gives
    the chance level of an unconditional model."""
    hits = {"colour": 0, "shape": 0, "both": 0}
    total = 0
    for scene in scenes:
        for seed in seeds:
            text = scene.caption(0) if prompt is None else prompt
            image = pipe.generate(text, steps=steps, guidance=guidance, seed=seed,
                                  width=shapes.IMAGE_SIZE, height=shapes.IMAGE_SIZE, sampler=sampler)[0]
            colour, shape = judge(image)
            hits["colour"] += colour == scene.color
            hits["shape"] += shape == scene.shape
            hits["both"] += (colour, shape) == (scene.color, scene.shape)
            total += 1
    return {k: v / total for k, v in hits.items()} | {"images": total}
