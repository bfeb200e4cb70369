"""Tiny Stable Diffusion models built once per test session, offline.

`tiny_source` is a randomly initialised diffusers pipeline with the SD 1.x architecture and
the real CLIP vocabulary; its UNet output is scaled up (see export/synthetic.py) so samplers
and guidance scales give clearly different pictures. `tiny_onnx` is sdonnx's export of it.
"""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pytest

# Compiled models and optimized graphs of this session's models stay out of ~/.cache (and the
# served or CLI subprocesses inherit this).
os.environ["SDONNX_CACHE_DIR"] = tempfile.mkdtemp(prefix="sdonnx-test-cache-")
atexit.register(shutil.rmtree, os.environ["SDONNX_CACHE_DIR"], ignore_errors=True)

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
def tiny_onnx(request, tmp_path_factory) -> Path:
    # A GPU machine's python may lack the export extra (torch, diffusers, optimum): export the
    # tiny model where it is installed and point SDONNX_TEST_TINY_ONNX at the folder, then the
    # runtime tests (test_providers.py's CUDA test among them) run with the runtime alone.
    if prebuilt := os.environ.get("SDONNX_TEST_TINY_ONNX"):
        return Path(prebuilt)
    from sdonnx.export.exporter import ExportConfig, export

    tiny_source = request.getfixturevalue("tiny_source")
    out = tmp_path_factory.mktemp("tiny-export") / "onnx"
    export(ExportConfig(tiny_source, out))
    return out


def _export(source: Path, tmp_path_factory, name: str) -> Path:
    from sdonnx.export.exporter import ExportConfig, export

    out = tmp_path_factory.mktemp(name) / "onnx"
    export(ExportConfig(source, out))
    return out


def _reference(source: Path, cls: str = "StableDiffusionPipeline"):
    import diffusers

    pipe = getattr(diffusers, cls).from_pretrained(source, safety_checker=None)
    pipe.set_progress_bar_config(disable=True)
    # Tests swap schedulers; each new one is built from the model's own config.
    pipe.base_scheduler_config = dict(pipe.scheduler.config)
    return pipe


@pytest.fixture(scope="session")
def vpred_source(tmp_path_factory) -> Path:
    """SD 2.x style: v-prediction with trailing timestep spacing."""
    from sdonnx.export.synthetic import build_random_pipeline

    return build_random_pipeline(tmp_path_factory.mktemp("vpred") / "diffusers", seed=1,
                                 prediction_type="v_prediction", timestep_spacing="trailing",
                                 output_gain=OUTPUT_GAIN, time_gain=TIME_GAIN)


@pytest.fixture(scope="session")
def vpred_pipeline(vpred_source, tmp_path_factory):
    from sdonnx import Pipeline

    return Pipeline.load(_export(vpred_source, tmp_path_factory, "vpred-export"), provider="cpu")


@pytest.fixture(scope="session")
def vpred_reference(vpred_source):
    return _reference(vpred_source)


@pytest.fixture(scope="session")
def inpaint_source(tmp_path_factory) -> Path:
    """An inpainting model: a 9-channel UNet."""
    from sdonnx.export.synthetic import build_random_pipeline

    return build_random_pipeline(tmp_path_factory.mktemp("inpaint") / "diffusers", seed=2, in_channels=9,
                                 output_gain=OUTPUT_GAIN, time_gain=TIME_GAIN)


@pytest.fixture(scope="session")
def inpaint_pipeline(inpaint_source, tmp_path_factory):
    from sdonnx import Pipeline

    return Pipeline.load(_export(inpaint_source, tmp_path_factory, "inpaint-export"), provider="cpu")


@pytest.fixture(scope="session")
def reference_pipe(tiny_source):
    return _reference(tiny_source)


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


@pytest.fixture
def deterministic_reference(monkeypatch):
    """Patch diffusers' img2img/inpaint modules: posterior mean, and the given noise."""
    import torch
    from diffusers.pipelines.stable_diffusion import (
        pipeline_stable_diffusion_img2img as img2img,
        pipeline_stable_diffusion_inpaint as inpaint,
    )

    noise = {}

    def mean(encoder_output, generator=None, sample_mode="sample"):
        return encoder_output.latent_dist.mean

    def given_noise(shape, generator=None, device=None, dtype=None, layout=None):
        return torch.from_numpy(noise["value"]).to(dtype)

    for module in (img2img, inpaint):
        monkeypatch.setattr(module, "retrieve_latents", mean)
        monkeypatch.setattr(module, "randn_tensor", given_noise)
    return noise
