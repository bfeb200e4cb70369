"""Tiny Stable Diffusion models built once per test session, offline.

`tiny_source` is a randomly initialised diffusers pipeline with the SD 1.x architecture and
the real CLIP vocabulary; its UNet output is scaled up (see export/synthetic.py) so samplers
and guidance scales give clearly different pictures. `tiny_onnx` is sdonnx's export of it.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

# A random UNet's output barely depends on its input and timestep; these gains make schedule,
# sampler and guidance errors visible (see test_parity.py's negative controls).
OUTPUT_GAIN = 10.0
TIME_GAIN = 5.0


@pytest.fixture(scope="session")
def tiny_source(tmp_path_factory) -> Path:
    from sdonnx.export.synthetic import build_random_pipeline

    return build_random_pipeline(tmp_path_factory.mktemp("tiny") / "diffusers", output_gain=OUTPUT_GAIN,
                                 time_gain=TIME_GAIN)


@pytest.fixture(scope="session")
def tiny_onnx(tiny_source, tmp_path_factory) -> Path:
    from sdonnx.export.exporter import ExportConfig, export

    out = tmp_path_factory.mktemp("tiny-export") / "onnx"
    export(ExportConfig(tiny_source, out))
    return out


@pytest.fixture(scope="session")
def reference_pipe(tiny_source):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(tiny_source, safety_checker=None)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="session")
def tiny_pipeline(tiny_onnx):
    from sdonnx import Pipeline

    return Pipeline.load(tiny_onnx, provider="cpu")


def psnr(a, b) -> float:
    """Peak signal-to-noise ratio of two 8-bit images, in dB (inf when identical)."""
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    mse = np.mean((a - b) ** 2)
    return float("inf") if mse == 0 else float(10 * np.log10(255.0**2 / mse))
