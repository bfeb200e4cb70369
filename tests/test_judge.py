"""The judge itself, tested on the data generator's clean and blurred images."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image, ImageFilter

from judge import judge
from sdonnx.models import shapes


def test_judge_reads_generated_scenes():
    rng = np.random.default_rng(123)
    scenes = [shapes.random_scene(rng) for _ in range(400)]
    wrong = [s for s in scenes if judge(shapes.draw(s, jitter=rng)) != (s.color, s.shape)]
    assert len(wrong) <= 4, wrong[:5]


@pytest.mark.parametrize("radius", [1.0, 1.5])
def test_judge_reads_blurred_scenes(radius):
    """Decoded images have soft edges; a blur as wide as a decoder's must not change the verdict
    (`radius` in pixels of a 64-pixel image, scaled to the generator's size)."""
    rng = np.random.default_rng(int(radius * 10))
    scenes = [shapes.random_scene(rng) for _ in range(200)]
    blur = ImageFilter.GaussianBlur(radius * shapes.IMAGE_SIZE / 64)
    wrong = [s for s in scenes if judge(shapes.draw(s, jitter=rng).filter(blur)) != (s.color, s.shape)]
    assert len(wrong) <= 2, wrong[:5]


def test_every_colour_and_shape_on_every_background():
    for background in shapes.BACKGROUNDS:
        for color in shapes.COLORS:
            for shape in shapes.SHAPES:
                scene = shapes.Scene(color, shape, "small", "at the top left", background)
                assert judge(shapes.draw(scene)) == (color, shape), scene


def test_blank_image_has_no_object():
    assert judge(Image.new("RGB", (64, 64), (255, 255, 255))) == (None, None)
