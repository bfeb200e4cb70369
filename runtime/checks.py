"""Values checked where they enter sdonnx (command line, API, server, model folders): each is a
finite number in its range, or an InputError naming it and the range."""

from __future__ import annotations

import math
import re

import numpy as np

from sdonnx.runtime.errors import InputError
from sdonnx.runtime.parts import VAE_SCALE

MAX_THREADS = 1024
MAX_SIDE = 8192  # pixels; a 512x512 SD 1.5 image already needs 3-11 GB
# AUTOMATIC1111's slider ends at 30; beyond a few hundred the picture is saturated noise.
MAX_GUIDANCE = 100.0


def parse_size(size, what: str = "--size") -> tuple[int, int]:
    """(width, height) in pixels from "WIDTHxHEIGHT" text; InputError naming `what` otherwise."""
    match = re.fullmatch(r"\s*(\d+)\s*[xX]\s*(\d+)\s*", size) if isinstance(size, str) else None
    if not match:
        raise InputError(f"{what} must look like 512x512 (width x height), got {size!r}")
    return int(match[1]), int(match[2])


def is_int(value) -> bool:
    """A Python or numpy integer, not a bool."""
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def is_number(value) -> bool:
    """A finite int or float (a 400-digit integer overflows a float: not finite either)."""
    if not (is_int(value) or isinstance(value, (float, np.floating))):
        return False
    try:
        return math.isfinite(float(value))
    except OverflowError:
        return False


def shown(value) -> str:
    """repr(value), cut to 40 characters for a one-line message."""
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def check_number(name: str, value, low: float, high: float) -> float:
    """`value` as a float, or an InputError unless it is a finite number in [low, high]."""
    if not is_number(value) or not low <= value <= high:
        raise InputError(f"{name} must be a finite number from {low:g} to {high:g}, got {shown(value)}")
    return float(value)


def check_size(width: int | None, height: int | None) -> None:
    """An InputError unless each given side is a multiple of 8 pixels from 8 to MAX_SIDE (a
    model may need a larger multiple: Pipeline.size_multiple)."""
    for name, size in (("width", width), ("height", height)):
        if size is not None and (not is_int(size) or not 0 < size <= MAX_SIDE or size % VAE_SCALE):
            raise InputError(f"{name} must be a positive multiple of {VAE_SCALE} up to {MAX_SIDE} pixels, "
                             f"got {shown(size)}")
