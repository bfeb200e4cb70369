"""The safety checker at run time: CLIP's image preprocessing and the part's verdict.

A filter, not a guarantee: the part (export/safety_checker.py) compares a CLIP embedding of
each image with 17 concept embeddings that Stable Diffusion's authors chose, as diffusers'
StableDiffusionSafetyChecker does; it misses some images and flags some harmless ones.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from sdonnx.runtime import parts

PREPROCESSOR_CONFIG = "preprocessor_config.json"  # the source's feature_extractor/ settings
# transformers' CLIPImageProcessor defaults (OpenAI CLIP's normalization), for keys a file lacks.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
CLIP_SIDE = 224


@dataclass(frozen=True)
class Verdict:
    """The checker's outcome for a batch of n images: `flagged` (n,) bool; `concept_scores`
    (n, 17) and `special_scores` (n, 3) float32, cosine similarity minus each concept's
    threshold (above 0: the concept is seen)."""

    flagged: np.ndarray
    concept_scores: np.ndarray
    special_scores: np.ndarray


def _side(value, key: str) -> int:
    """A size entry of a preprocessor config: an int, or a dict with `key` (transformers writes both)."""
    return int(value[key] if isinstance(value, dict) else value)


def clip_input(images: list[Image.Image], folder: Path) -> np.ndarray:
    """`images` as the safety checker's input (n, 3, S, S) float32, as transformers'
    CLIPImageProcessor makes it from PIL images with the settings in `folder`'s
    preprocessor_config.json: shortest side resized to S with PIL (bicubic unless the file says
    otherwise), centre crop S x S, scaled to [0, 1], normalized by CLIP's mean and std."""
    config = parts.read_json(folder / PREPROCESSOR_CONFIG)
    short = _side(config.get("size", CLIP_SIDE), "shortest_edge")
    crop = config.get("crop_size", CLIP_SIDE)
    crop_h, crop_w = _side(crop, "height"), _side(crop, "width")
    resample = Image.Resampling(int(config.get("resample", Image.Resampling.BICUBIC)))
    scale = float(config.get("rescale_factor", 1 / 255))
    mean = np.array(config.get("image_mean", CLIP_MEAN), dtype=np.float64)[:, None, None]
    std = np.array(config.get("image_std", CLIP_STD), dtype=np.float64)[:, None, None]
    batch = []
    for image in images:
        image = image.convert("RGB")
        if config.get("do_resize", True):
            width, height = image.size
            if width <= height:
                size = (short, int(short * height / width))
            else:
                size = (int(short * width / height), short)
            image = image.resize(size, resample=resample)
        pixels = np.asarray(image).astype(np.float64)
        if config.get("do_center_crop", True):
            top, left = (pixels.shape[0] - crop_h) // 2, (pixels.shape[1] - crop_w) // 2
            pixels = pixels[top:top + crop_h, left:left + crop_w]
        pixels = pixels.transpose(2, 0, 1).astype(np.float32) * np.float32(scale)
        if config.get("do_normalize", True):
            pixels = ((pixels - mean) / std).astype(np.float32)
        batch.append(pixels)
    return np.stack(batch)


def check(model, images: list[Image.Image], folder: Path) -> Verdict:
    """The verdict of the safety checker `model` (a loaded SAFETY_CHECKER part) on `images`."""
    name = parts.SAFETY_CHECKER.inputs[0]
    out = model(**{name: clip_input(images, folder).astype(model.dtype(name))})
    concept, special, flagged = (out[key] for key in parts.SAFETY_CHECKER_OUTPUTS)
    return Verdict(np.asarray(flagged, dtype=bool), concept.astype(np.float32), special.astype(np.float32))


def blacked_out(image: Image.Image) -> Image.Image:
    """A black image of `image`'s size and mode, its info kept (what diffusers returns for a
    flagged image: zeros)."""
    black = Image.new(image.mode, image.size)
    black.info = dict(image.info)
    return black
