"""The default model's training data: held-out prompts stay out, mislabeled captions are one word off."""

from __future__ import annotations

import numpy as np

from sdonnx.models import shapes


def test_training_scenes_never_include_held_out_ones():
    rng = np.random.default_rng(0)
    assert not any(shapes.random_scene(rng) in shapes.HELD_OUT for _ in range(5000))


def test_mislabel_swaps_exactly_the_colour_or_the_shape():
    rng = np.random.default_rng(1)
    swapped = {"color": 0, "shape": 0}
    for _ in range(2000):
        scene = shapes.random_scene(rng)
        wrong = shapes.mislabel(scene, rng)
        assert wrong not in shapes.HELD_OUT
        if wrong == scene:  # the swap would have named a held-out scene
            continue
        changed = [f for f in ("color", "shape", "size", "position", "background")
                   if getattr(wrong, f) != getattr(scene, f)]
        assert len(changed) == 1 and changed[0] in swapped, (scene, wrong)
        swapped[changed[0]] += 1
    assert 800 < swapped["color"] < 1200 and 800 < swapped["shape"] < 1200, swapped


def test_mislabeled_fraction_of_captions():
    pixels, clean = shapes.batch(np.random.default_rng(2), 400, 32)
    same_pixels, noisy = shapes.batch(np.random.default_rng(2), 400, 32, mislabeled=0.25)
    np.testing.assert_array_equal(pixels, same_pixels)
    def named(caption):
        return [w for w in caption.split() if w in shapes.COLORS or w in shapes.SHAPES]

    wrong = sum(named(a) != named(b) for a, b in zip(clean, noisy))
    assert 60 < wrong < 140, wrong  # ~100 of 400


def test_clean_batches_are_unchanged_by_the_option():
    # Replaying the recipe's earlier stages needs the same random stream with mislabeled=0.
    a = shapes.batch(np.random.default_rng(3), 16, 32)
    b = shapes.batch(np.random.default_rng(3), 16, 32, mislabeled=0.0)
    np.testing.assert_array_equal(a[0], b[0])
    assert a[1] == b[1]


def test_unrelated_captions_describe_other_training_scenes():
    rng = np.random.default_rng(4)
    scenes = [shapes.random_scene(rng) for _ in range(400)]
    some = shapes.captions(scenes, np.random.default_rng(5), unrelated=0.4)
    named = [[w for w in caption.split() if w in shapes.COLORS or w in shapes.SHAPES] for caption in some]
    wrong = sum(words != [scene.color, scene.shape] for words, scene in zip(named, scenes))
    assert 115 < wrong < 190, wrong  # ~153 of 400: 40%, less the 1 in 24 with the same colour and shape
    # With none, the random stream (so every earlier recipe) is unchanged.
    assert shapes.captions(scenes, np.random.default_rng(5)) == shapes.captions(
        scenes, np.random.default_rng(5), unrelated=0.0)
