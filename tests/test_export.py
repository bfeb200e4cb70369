"""The export stage: layout, record, parity refusal, atomic writes, clear errors."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from sdonnx.export import exporter
from sdonnx.export.exporter import ExportConfig, ExportFailed, export
from sdonnx.export.torch_memory import weights_released_after_export
from sdonnx.export.parity import PartParity
from sdonnx.runtime import ModelFolderError, parts
from sdonnx.runtime.errors import InputError

OPTIMUM_LAYOUT = [
    "model_index.json",
    "text_encoder/model.onnx",
    "unet/model.onnx",
    "vae_decoder/model.onnx",
    "vae_encoder/model.onnx",
    "tokenizer/vocab.json",
    "tokenizer/merges.txt",
    "scheduler/scheduler_config.json",
]


def test_layout_and_record(tiny_onnx):
    for name in OPTIMUM_LAYOUT:
        assert (tiny_onnx / name).is_file(), name
    record = json.loads((tiny_onnx / parts.RECORD).read_text())
    assert record["opset"] >= 14
    assert {"torch", "diffusers", "onnxruntime", "optimum-onnx"} <= set(record["versions"])
    for part in ("text_encoder", "unet", "vae_decoder", "vae_encoder"):
        parity = record["parts"][part]["parity"]
        assert 0 <= parity["max_abs_diff"] <= parity["tolerance"], part
        assert record["parts"][part]["precision"] == "fp32"
    # No temporary folders left beside the export.
    assert [p.name for p in tiny_onnx.parent.iterdir()] == [tiny_onnx.name]


def test_existing_out_is_not_overwritten(tiny_source, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(InputError, match="already exists.*--force"):
        export(ExportConfig(tiny_source, out))
    assert (out / "keep.txt").read_text() == "mine"


def test_force_replaces_out(tiny_source, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    export(ExportConfig(tiny_source, out, force=True, check=False))
    assert (out / "unet" / "model.onnx").is_file() and not (out / "old.txt").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_recommended_settings_are_recorded_and_checked_first(tiny_source, tmp_path):
    out = tmp_path / "turbo"
    export(ExportConfig(tiny_source, out, check=False, defaults={"steps": 4, "guidance": 1.0, "sampler": "lcm"}))
    assert json.loads((out / parts.RECORD).read_text())["defaults"] == {"steps": 4, "guidance": 1.0, "sampler": "lcm"}
    for bad, message in [({"sampler": "foo"}, "unknown sampler 'foo'"), ({"steps": 0}, "steps"),
                         ({"guidance": -1.0}, "guidance must be a finite number from 0 to 100"), ({"size": 3}, "unknown defaults size")]:
        with pytest.raises(InputError, match=message):
            export(ExportConfig(tiny_source, tmp_path / "bad", defaults=bad))
        assert not (tmp_path / "bad").exists()


def test_parity_failure_writes_nothing(tiny_source, tmp_path, monkeypatch):
    bad = PartParity("unet", max_abs_diff=0.5, reference_max=1.0, tolerance=2e-3, input_shape=(2, 4, 8, 8))
    monkeypatch.setattr(exporter, "check_parts", lambda source, exported: [bad])
    out = tmp_path / "out"
    with pytest.raises(ExportFailed, match="unet max abs diff 0.5"):
        export(ExportConfig(tiny_source, out))
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("missing", ["unet/config.json", "tokenizer/merges.txt", "model_index.json"])
def test_incomplete_source_names_the_missing_file(tiny_source, tmp_path, missing):
    source = tmp_path / "src"
    shutil.copytree(tiny_source, source)
    (source / missing).unlink()
    with pytest.raises(ModelFolderError, match=f"missing: {missing}"):
        export(ExportConfig(source, tmp_path / "out"))
    assert not (tmp_path / "out").exists()


def test_missing_weights_and_non_folders(tiny_source, tmp_path):
    source = tmp_path / "src"
    shutil.copytree(tiny_source, source)
    (source / "vae" / "diffusion_pytorch_model.safetensors").unlink()
    with pytest.raises(ModelFolderError, match="vae/ weights"):
        export(ExportConfig(source, tmp_path / "out"))
    with pytest.raises(ModelFolderError, match="not found"):
        export(ExportConfig(tmp_path / "nope", tmp_path / "out"))
    single = tmp_path / "model.safetensors"
    single.write_bytes(b"x")  # a single file now: read as one, and refused as one
    with pytest.raises(ModelFolderError, match="is not a readable safetensors file"):
        export(ExportConfig(single, tmp_path / "out"))
    other = tmp_path / "notes.txt"
    other.write_text("x")
    with pytest.raises(ModelFolderError, match="neither a diffusers-format folder .* nor a single-file checkpoint"):
        export(ExportConfig(other, tmp_path / "out"))


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_interrupted_export_leaves_no_folder(tiny_source, tmp_path, sig):
    out = tmp_path / "out"
    proc = subprocess.Popen(
        [sys.executable, "-m", "sdonnx.cli.app", "export", str(tiny_source), str(out)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    deadline = time.monotonic() + 120
    while not any(p.name.startswith(".out.sdonnx-tmp") for p in tmp_path.iterdir()):
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "the export never started writing"
        time.sleep(0.05)
    proc.send_signal(sig)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode != 0
    assert "Traceback" not in stderr
    assert list(tmp_path.iterdir()) == [], "an interrupted export left files behind"


def test_each_parts_torch_weights_are_freed_once_its_graph_is_written(tmp_path):
    """optimum gathers a large part's external data while holding the pipeline: sdonnx frees each
    module's weights as soon as torch.onnx.export returns (the SD 1.5 export's peak went from
    8.4 to 5.7 GB, tests/benchmarks/README.md "Export"), and puts torch.onnx.export back after,
    also when an export fails."""
    import onnxruntime as ort
    import torch

    original = torch.onnx.export
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.BatchNorm1d(8)).eval()
    x = torch.randn(2, 4)
    expected = model(x).detach().numpy()
    with weights_released_after_export():
        torch.onnx.export(model, (x,), str(tmp_path / "m.onnx"), dynamo=False)
        with pytest.raises(TypeError):
            torch.onnx.export(torch.nn.Linear(2, 2), "not a tensor", str(tmp_path / "bad.onnx"), dynamo=False)
    assert torch.onnx.export is original
    # The graph holds the weights; the module no longer does, yet its dtype can still be read.
    session = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    assert abs(session.run(None, {session.get_inputs()[0].name: x.numpy()})[0] - expected).max() < 1e-5
    assert all(p.numel() == 0 for p in model.parameters()) and all(b.numel() == 0 for b in model.buffers())
    assert next(model.parameters()).dtype == torch.float32


def test_the_weight_map_check_reads_fp16_and_bf16_sources_and_skips_other_dtypes(tmp_path):
    """The export's weight-map check reads the source .safetensors one tensor at a time: fp16 and
    bf16 widened exactly to the float32 the ONNX file holds; integer and unknown dtypes are not
    compared (readable() False)."""
    import numpy as np
    import torch
    from safetensors.torch import save_file

    from sdonnx.export.weights import _SafetensorsReader

    values = torch.randn(3, 5)
    save_file({"a.weight": values.half(), "b.weight": values.bfloat16(), "c.weight": values,
               "ids": torch.arange(4), "f8.weight": values.to(torch.float8_e4m3fn)}, str(tmp_path / "w.safetensors"))
    reader = _SafetensorsReader(tmp_path / "w.safetensors")
    for name, dtype in (("a.weight", torch.float16), ("b.weight", torch.bfloat16), ("c.weight", torch.float32)):
        assert reader.readable(name)
        got = reader.read(name)
        assert got.dtype == np.float32 and np.array_equal(got, values.to(dtype).float().numpy())
    assert not reader.readable("ids") and not reader.readable("f8.weight") and not reader.readable("missing")
    assert not np.array_equal(reader.read("a.weight"), values.numpy())  # fp16 rounding is seen
