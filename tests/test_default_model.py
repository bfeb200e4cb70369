"""The embedded default model draws the colour and shape the prompt asks for."""

from __future__ import annotations

import subprocess
import sys

import pytest
from PIL import Image

from judge import accuracy, judge
from sdonnx import Pipeline
from sdonnx.models import shapes

# Measured on all 50 held-out prompts x 2 seeds (tests/benchmarks/default_model_accuracy.py,
# README): see MIN_ACCURACY's justification there. 8 prompts x 1 seed here.
MIN_ACCURACY = 0.75
CI_SCENES = shapes.held_out_scenes()[:8]


@pytest.fixture(scope="module")
def default_pipe():
    return Pipeline.load(provider="cpu")


def test_default_model_follows_prompts(default_pipe):
    result = accuracy(default_pipe, CI_SCENES, seeds=(0,))
    assert result["both"] >= MIN_ACCURACY, result


def test_cli_uses_the_default_model(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "sdonnx.cli.app", "generate", "a red circle on a white background",
                           "--size", "64x64", "--seed", "0", "--out", tmp_path],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    (written,) = tmp_path.glob("*.png")
    assert judge(Image.open(written)) == ("red", "circle")
