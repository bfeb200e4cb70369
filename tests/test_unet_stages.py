"""A UNet cut into stages (export/unet_stages.py) and run one stage at a time under low_memory
(runtime/unet_stages.py): the whole UNet's picture, each stage opened once per UNet evaluation
and run one image at a time. Peak memory at SD 1.5 size: tests/benchmarks/memory.py."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest

from sdonnx.export import unet_stages
from sdonnx.runtime import parts
from sdonnx.runtime.onnx_model import OnnxModel
from sdonnx.runtime.unet_stages import StagedUnet, read_plan

from conftest import psnr


def _stage(folder: Path, stages: int | None = 4) -> dict:
    """Write stages of about 1/`stages` of the folder's UNet weights each."""
    path = folder / parts.UNET.onnx_path
    weights = sum(f.stat().st_size for f in parts.model_files(path))
    return unet_stages.write_stages(path, stage_bytes=weights // stages)


@pytest.fixture(scope="module")
def staged_onnx(tiny_onnx, tmp_path_factory) -> tuple[Path, dict]:
    folder = tmp_path_factory.mktemp("staged") / "onnx"
    shutil.copytree(tiny_onnx, folder)
    return folder, _stage(folder)


def test_stages_chain_to_the_whole_unet_and_hold_its_weights_once(staged_onnx):
    folder, plan = staged_onnx
    assert len(plan["stages"]) >= 3 and plan["difference"] <= 1e-6
    assert {"sample", "encoder_hidden_states"} <= set(plan["batch_major"])
    assert all(stage["rows"] for stage in plan["stages"])
    available = set(plan["inputs"])
    data = folder / "unet" / parts.EXTERNAL_DATA_FILE
    for stage in plan["stages"]:
        assert set(stage["inputs"]) <= available  # each stage reads what the UNet or earlier stages made
        available |= set(stage["outputs"])
        model = onnx.load(str(folder / "unet" / stage["file"]), load_external_data=False)
        # Weights are references into the part's own data file, not copies.
        for tensor in model.graph.initializer:
            if tensor.data_location == onnx.TensorProto.EXTERNAL:
                assert {e.key: e.value for e in tensor.external_data}["location"] == parts.EXTERNAL_DATA_FILE
            else:
                assert tensor.ByteSize() < 2048
        assert (folder / "unet" / stage["file"]).stat().st_size < data.stat().st_size / 10
    assert plan["output"] in available
    # The cache of optimized graphs stamps a stage with the weights it reads.
    assert data in parts.model_files(folder / "unet" / plan["stages"][0]["file"])
    assert read_plan(folder / "unet") == plan


@pytest.mark.parametrize("n", [1, 2])
def test_low_memory_runs_the_stages_one_image_at_a_time_and_draws_the_whole_unets_picture(
        staged_onnx, tiny_pipeline, monkeypatch, n):
    from sdonnx import Pipeline

    folder, plan = staged_onnx
    calls = []
    call = OnnxModel.__call__
    monkeypatch.setattr(OnnxModel, "__call__", lambda self, **inputs: calls.append(
        (self.part.name, len(inputs.get("sample", next(iter(inputs.values())))))) or call(self, **inputs))
    small = Pipeline.load(folder, provider="cpu", low_memory=True)
    settings = dict(steps=3, seed=5, width=64, height=64, n=n)
    got = small.generate("a red circle", **settings)
    assert small._models == {}
    stage_calls = [c for c in calls if c[0].startswith("unet stage_")]
    # Euler: one evaluation per step; every stage runs each image of the CFG pair in turn.
    assert len(stage_calls) == 3 * len(plan["stages"]) * 2 * n
    assert {rows for _, rows in stage_calls} == {1}
    assert "unet" not in {name for name, _ in calls}  # (the whole UNet never ran)
    want = tiny_pipeline.generate("a red circle", **settings)
    for a, b in zip(got, want):
        assert psnr(np.asarray(a), np.asarray(b)) >= 60


def test_each_stage_is_opened_once_per_unet_evaluation(staged_onnx, monkeypatch):
    from sdonnx import Pipeline

    folder, plan = staged_onnx
    opened = []
    small = Pipeline.load(folder, provider="cpu", low_memory=True)
    open_ = Pipeline._open
    monkeypatch.setattr(Pipeline, "_open", lambda self, file, part, **k: opened.append(file.name) or open_(
        self, file, part, **k))
    small.generate("a red circle", steps=2, seed=1, width=64, height=64, n=2)
    assert [name for name in opened if name.startswith(parts.STAGE_PREFIX)] == [
        s["file"] for s in plan["stages"]] * 2


def test_a_plan_for_other_weights_or_a_missing_stage_loads_the_whole_unet(staged_onnx, tmp_path):
    from sdonnx import Pipeline

    folder = tmp_path / "onnx"
    shutil.copytree(staged_onnx[0], folder)
    with Pipeline.load(folder, provider="cpu", low_memory=True).using(parts.UNET) as unet:
        assert isinstance(unet, StagedUnet)
    data = folder / "unet" / parts.EXTERNAL_DATA_FILE
    raw = bytearray(data.read_bytes())
    raw[-1] ^= 1
    data.write_bytes(bytes(raw))
    assert read_plan(folder / "unet") is None
    with Pipeline.load(folder, provider="cpu", low_memory=True).using(parts.UNET) as unet:
        assert isinstance(unet, OnnxModel)
    shutil.copytree(staged_onnx[0], folder, dirs_exist_ok=True)
    assert read_plan(folder / "unet") is not None
    (folder / "unet" / staged_onnx[1]["stages"][1]["file"]).unlink()
    assert read_plan(folder / "unet") is None
    # Without low_memory the whole UNet runs, stages or not.
    with Pipeline.load(staged_onnx[0], provider="cpu").using(parts.UNET) as unet:
        assert isinstance(unet, OnnxModel)


def test_the_proof_fails_when_a_stage_computes_something_else(staged_onnx, tmp_path):
    """The negative control of the chained-equals-whole check: one stage's output scaled by 1.01."""
    folder = tmp_path / "onnx"
    shutil.copytree(staged_onnx[0], folder)
    path = folder / parts.UNET.onnx_path
    record, structure = unet_stages.plan(path, stage_bytes=sum(f.stat().st_size for f in parts.model_files(path)) // 4)
    runs = unet_stages._probe(path, record)
    assert unet_stages.prove(folder / "unet", record, runs)[0] <= 1e-6
    stage = record["stages"][1]
    model = onnx.load(str(folder / "unet" / stage["file"]), load_external_data=False)
    name = stage["outputs"][0]
    for node in model.graph.node:
        node.output[:] = [f"{o}.raw" if o == name else o for o in node.output]
        node.input[:] = [f"{i}.raw" if i == name else i for i in node.input]
    model.graph.initializer.append(onnx.numpy_helper.from_array(np.array(1.01, np.float32), "gain"))
    model.graph.node.append(onnx.helper.make_node("Mul", [f"{name}.raw", "gain"], [name]))
    onnx.save(model, str(folder / "unet" / stage["file"]))
    with pytest.raises(ValueError, match="differ from the whole UNet"):
        unet_stages.prove(folder / "unet", record, runs)


def test_a_unet_within_one_stage_gets_no_stages(tiny_onnx, tmp_path):
    folder = tmp_path / "unet"
    shutil.copytree(tiny_onnx / "unet", folder)
    logged = []
    assert unet_stages.try_write_stages(folder / parts.ONNX_FILE, logged.append) == 0
    assert not (folder / parts.UNET_STAGES).exists() and not list(folder.glob("stage_*"))
