"""Captioned images of simple scenes: the training data of the embedded default model.

One coloured shape (circle, square, triangle, star) of a given size and position on a plain
background, with a caption in the words the README lists, for example "a small blue square at
the top left" or "a red circle on a black background". Deterministic for a given seed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np
from PIL import Image, ImageDraw

IMAGE_SIZE = 128
COLORS = {
    "red": (220, 30, 30),
    "green": (30, 170, 50),
    "blue": (30, 60, 220),
    "yellow": (240, 220, 30),
    "purple": (140, 40, 180),
    "orange": (245, 130, 20),
}
SHAPES = ("circle", "square", "triangle", "star")
BACKGROUNDS = {"white": (255, 255, 255), "black": (0, 0, 0), "gray": (128, 128, 128)}
SIZES = {"small": 0.28, "medium": 0.42, "large": 0.6}  # shape extent / image side
POSITIONS = {
    "in the center": (0.5, 0.5),
    "at the top left": (0.3, 0.3),
    "at the top right": (0.7, 0.3),
    "at the bottom left": (0.3, 0.7),
    "at the bottom right": (0.7, 0.7),
}


@dataclass(frozen=True)
class Scene:
    color: str
    shape: str
    size: str = "medium"
    position: str = "in the center"
    background: str = "white"

    def caption(self, style: int = 0) -> str:
        """Several phrasings of the same scene; style 0 is the fullest."""
        size = "" if self.size == "medium" else f"{self.size} "
        where = "" if self.position == "in the center" else f" {self.position}"
        on = f" on a {self.background} background"
        phrases = [
            f"{size}{self.color} {self.shape}{where}{on}",
            f"{size}{self.color} {self.shape}{where}",
            f"{self.color} {self.shape}",
            f"{self.color} {self.shape}{on}",
        ]
        phrase = phrases[style]
        return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def _any_scene(rng: np.random.Generator) -> Scene:
    color = str(rng.choice(list(COLORS)))
    background = str(rng.choice(list(BACKGROUNDS)))
    size = str(rng.choice(list(SIZES)))
    # Large shapes only fit in the center.
    position = "in the center" if size == "large" else str(rng.choice(list(POSITIONS)))
    return Scene(color, str(rng.choice(SHAPES)), size, position, background)


def held_out_scenes(n: int = 50) -> list[Scene]:
    """Scenes never shown in training, in any phrasing: the evaluation prompts."""
    rng = np.random.default_rng(2026)
    scenes: list[Scene] = []
    while len(scenes) < n:
        scene = _any_scene(rng)
        if scene not in scenes:
            scenes.append(scene)
    return scenes


HELD_OUT = frozenset(held_out_scenes())


def random_scene(rng: np.random.Generator) -> Scene:
    """A training scene: any scene but the held-out ones."""
    while (scene := _any_scene(rng)) in HELD_OUT:
        pass
    return scene


def _star(cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    points = []
    for i in range(10):
        radius = r if i % 2 == 0 else r * 0.45
        angle = -math.pi / 2 + i * math.pi / 5
        points.append((cx + radius * math.cos(angle), cy + radius * math.sin(angle)))
    return points


def draw(scene: Scene, size: int = IMAGE_SIZE, jitter: np.random.Generator | None = None) -> Image.Image:
    """Render a scene; `jitter` moves and resizes the shape a little for training variety."""
    image = Image.new("RGB", (size, size), BACKGROUNDS[scene.background])
    pen = ImageDraw.Draw(image)
    fx, fy = POSITIONS[scene.position]
    extent = SIZES[scene.size]
    if jitter is not None:
        fx += jitter.uniform(-0.04, 0.04)
        fy += jitter.uniform(-0.04, 0.04)
        extent *= jitter.uniform(0.9, 1.1)
    cx, cy, r = fx * size, fy * size, extent * size / 2
    fill = COLORS[scene.color]
    if scene.shape == "circle":
        pen.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif scene.shape == "square":
        s = r * 0.9
        pen.rectangle([cx - s, cy - s, cx + s, cy + s], fill=fill)
    elif scene.shape == "triangle":
        pen.polygon([(cx, cy - r), (cx + r, cy + r * 0.8), (cx - r, cy + r * 0.8)], fill=fill)
    elif scene.shape == "star":
        pen.polygon(_star(cx, cy, r * 1.05), fill=fill)
    else:
        raise ValueError(f"unknown shape {scene.shape!r}")
    return image


def mislabel(scene: Scene, rng: np.random.Generator) -> Scene:
    """The scene with its colour or its shape (one of the two, at random) swapped for another;
    never a held-out scene, so no evaluation prompt is ever shown in training."""
    if rng.random() < 0.5:
        wrong = replace(scene, color=str(rng.choice([c for c in COLORS if c != scene.color])))
    else:
        wrong = replace(scene, shape=str(rng.choice([s for s in SHAPES if s != scene.shape])))
    return scene if wrong in HELD_OUT else wrong


def render(rng: np.random.Generator, n: int, size: int = IMAGE_SIZE) -> tuple[np.ndarray, list[Scene]]:
    """n random training scenes drawn at `size` pixels, as float32 (n, 3, size, size) in [-1, 1]."""
    scenes = [random_scene(rng) for _ in range(n)]
    images = [np.asarray(draw(s, size, jitter=rng), dtype=np.float32) for s in scenes]
    return np.stack(images).transpose(0, 3, 1, 2) / 127.5 - 1.0, scenes


def captions(scenes: list[Scene], rng: np.random.Generator, mislabeled: float = 0.0,
             unrelated: float = 0.0) -> list[str]:
    """A caption per scene in a random phrasing; a `mislabeled` fraction names a wrong colour or
    shape (see mislabel), an `unrelated` fraction describes another, random training scene."""
    if mislabeled:
        scenes = [mislabel(s, rng) if rng.random() < mislabeled else s for s in scenes]
    if unrelated:
        scenes = [random_scene(rng) if rng.random() < unrelated else s for s in scenes]
    return [s.caption(int(rng.integers(4))) for s in scenes]


def batch(rng: np.random.Generator, n: int, size: int = IMAGE_SIZE,
          mislabeled: float = 0.0) -> tuple[np.ndarray, list[str]]:
    """n random images of `size` pixels (see render) and their captions (see captions)."""
    pixels, scenes = render(rng, n, size)
    return pixels, captions(scenes, rng, mislabeled)
