"""Folders written by optimum-cli load and generate like sdonnx's own; wrappers check inputs."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from sdonnx import Pipeline
from sdonnx.runtime import InputError, ModelFolderError, parts
from sdonnx.runtime.onnx_model import OnnxModel

from conftest import psnr


@pytest.fixture(scope="module")
def optimum_folder(tiny_source, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("optimum") / "onnx"
    cli = Path(sys.executable).parent / "optimum-cli"
    proc = subprocess.run([str(cli), "export", "onnx", "--model", str(tiny_source),
                           "--task", "text-to-image", str(out)],
                          capture_output=True, text=True, timeout=600, env={"HF_HUB_OFFLINE": "1", "PATH": ""})
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


def test_optimum_cli_folder_generates_the_same_image(optimum_folder, tiny_pipeline):
    assert not (optimum_folder / parts.RECORD).exists()
    theirs = Pipeline.load(optimum_folder, provider="cpu")
    args = dict(steps=4, width=64, height=64, seed=3, sampler="ddim")
    a = np.asarray(theirs.generate("a blue square", **args)[0])
    b = np.asarray(tiny_pipeline.generate("a blue square", **args)[0])
    assert psnr(a, b) >= 60


def test_wrapper_names_the_offending_input(tiny_onnx):
    unet = OnnxModel(tiny_onnx / parts.UNET.onnx_path, parts.UNET)
    good = dict(sample=np.zeros((1, 4, 8, 8), np.float32), timestep=np.array(1.0, np.float32),
                encoder_hidden_states=np.zeros((1, 77, 32), np.float32))
    unet(**good)
    with pytest.raises(InputError, match="unet input 'sample': dtype float64 given"):
        unet(**{**good, "sample": good["sample"].astype(np.float64)})
    with pytest.raises(InputError, match="unet input 'sample': size 3 on axis 1"):
        unet(**{**good, "sample": np.zeros((1, 3, 8, 8), np.float32)})
    with pytest.raises(InputError, match="unet input 'encoder_hidden_states': shape .* 3 dimensions"):
        unet(**{**good, "encoder_hidden_states": np.zeros((77, 32), np.float32)})
    with pytest.raises(InputError, match="missing input.*timestep"):
        unet(sample=good["sample"], encoder_hidden_states=good["encoder_hidden_states"])


def test_wrong_part_in_a_folder_is_named(tiny_onnx, tmp_path):
    model = tmp_path / "model"
    shutil.copytree(tiny_onnx, model)
    shutil.copy(model / "vae_decoder" / "model.onnx", model / "unet" / "model.onnx")
    with pytest.raises(ModelFolderError, match="is not a unet model: it lacks the input"):
        Pipeline.load(model, provider="cpu")


def test_latents_of_wrong_shape_are_refused(tiny_pipeline):
    with pytest.raises(InputError, match=r"latents must have shape \(2, 4, 8, 8\)"):
        tiny_pipeline.generate("x", width=64, height=64, n=2, latents=np.zeros((1, 4, 8, 8), np.float32))
