"""A UNet cut into stages (export/unet_stages.py) and run one stage at a time under low_memory
(runtime/unet_stages.py): the whole UNet's picture, each stage opened once per UNet evaluation
and run one image at a time; damaged or stale plans fall back to the whole UNet. Peak memory
at SD 1.5 size: tests/benchmarks/memory.py."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
from PIL import Image

from sdonnx.export import unet_stages
from sdonnx.runtime import parts, providers
from sdonnx.runtime.info import describe
from sdonnx.runtime.onnx_model import OnnxModel
from sdonnx.runtime.unet_stages import StagedUnet, read_plan

from conftest import psnr


def _stage(folder: Path, stages: int = 4) -> dict:
    """Write stages of about 1/`stages` of the folder's UNet weights each."""
    path = folder / parts.UNET.onnx_path
    weights = sum(f.stat().st_size for f in parts.model_files(path))
    return unet_stages.write_stages(path, stage_bytes=weights // stages)


def _copy(folder: Path, to: Path) -> Path:
    shutil.copytree(folder, to)
    return to


@pytest.fixture(scope="module")
def staged_onnx(tiny_onnx, tmp_path_factory) -> tuple[Path, dict]:
    folder = _copy(tiny_onnx, tmp_path_factory.mktemp("staged") / "onnx")
    return folder, _stage(folder)


def _spy_calls(monkeypatch) -> list[tuple[str, int]]:
    """(part name, images) of every OnnxModel call from now on."""
    calls = []
    call = OnnxModel.__call__

    def spy(self, **inputs):
        sizes = [len(v) for v in inputs.values() if np.ndim(v) > 0]
        calls.append((self.part.name, len(inputs["sample"]) if "sample" in inputs else max(sizes)))
        return call(self, **inputs)

    monkeypatch.setattr(OnnxModel, "__call__", spy)
    return calls


def test_stages_chain_to_the_whole_unet_and_hold_its_weights_once(staged_onnx):
    folder, plan = staged_onnx
    assert len(plan["stages"]) >= 3 and plan["difference"] <= 1e-5
    assert {"sample", "encoder_hidden_states"} <= set(plan["batch_major"])
    assert all(stage["splits_batch"] for stage in plan["stages"])
    assert sum(stage["weight_bytes"] for stage in plan["stages"]) >= plan["weight_bytes"] * 0.99
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
    assert "stages of at most" in describe(folder)


@pytest.mark.parametrize("n", [1, 2])
def test_low_memory_runs_the_stages_one_image_at_a_time_and_draws_the_whole_unets_picture(
        staged_onnx, tiny_pipeline, monkeypatch, n):
    from sdonnx import Pipeline

    folder, plan = staged_onnx
    calls = _spy_calls(monkeypatch)
    small = Pipeline.load(folder, provider="cpu", low_memory=True)
    settings = dict(steps=3, seed=5, width=64, height=64, n=n)
    got = small.generate("a red circle", **settings)
    assert small._models == {}
    stage_calls = [c for c in calls if c[0].startswith("unet stage_")]
    # Euler: one evaluation per step; every stage runs each image of the CFG pair in turn.
    assert len(stage_calls) == 3 * len(plan["stages"]) * 2 * n
    assert {images for _, images in stage_calls} == {1}
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


def test_a_stage_that_cannot_split_the_batch_runs_it_whole(staged_onnx, tiny_pipeline, tmp_path, monkeypatch):
    """A plan with one stage marked splits_batch false: that stage gets all images, the others
    one at a time when given all (the denoiser then gives them one image per evaluation)."""
    folder = _copy(staged_onnx[0], tmp_path / "onnx")
    plan = json.loads((folder / "unet" / parts.UNET_STAGES).read_text())
    plan["stages"][1]["splits_batch"] = False
    (folder / "unet" / parts.UNET_STAGES).write_text(json.dumps(plan))
    staged = StagedUnet(folder / "unet", read_plan(folder / "unet"),
                        lambda file, part: OnnxModel(file, part, "cpu"), max_batch=1)
    assert not staged.splits_batch
    calls = _spy_calls(monkeypatch)
    rng = np.random.default_rng(0)
    feed = {"sample": rng.standard_normal((3, 4, 8, 8), dtype=np.float32),
            "timestep": np.array(400, np.float32) if staged.shape("timestep") == [] else np.full(3, 400, np.float32),
            "encoder_hidden_states": rng.standard_normal((3, 77, staged.shape("encoder_hidden_states")[2]),
                                                         dtype=np.float32)}
    got = staged(**feed)[plan["output"]]
    want = OnnxModel(folder / parts.UNET.onnx_path, parts.UNET, "cpu")(**feed)[plan["output"]]
    assert np.allclose(got, want, atol=1e-5)
    by_stage = {}
    for name, images in calls:
        by_stage.setdefault(name, set()).add(images)
    assert by_stage[f"unet {plan['stages'][1]['file']}"] == {3}
    assert by_stage[f"unet {plan['stages'][0]['file']}"] == {1}
    small = tiny_pipeline.__class__.load(folder, provider="cpu", low_memory=True)
    settings = dict(steps=2, seed=2, width=64, height=64)
    assert psnr(np.asarray(small.generate("a red circle", **settings)[0]),
                np.asarray(tiny_pipeline.generate("a red circle", **settings)[0])) >= 60


def test_an_inpainting_unet_in_stages_repaints_as_the_whole_one(inpaint_pipeline, tmp_path):
    from sdonnx import Pipeline

    folder = _copy(inpaint_pipeline.config.path, tmp_path / "inpaint")
    plan = _stage(folder)
    assert plan["inputs"]["sample"]["shape"][1] == 9 and plan["difference"] <= 1e-5
    init = Image.fromarray(np.random.default_rng(1).integers(0, 255, (64, 64, 3), dtype=np.uint8))
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (16, 16, 48, 48))
    settings = dict(steps=3, seed=4, width=64, height=64, init_image=init, mask_image=mask)
    small = Pipeline.load(folder, provider="cpu", low_memory=True)
    with small.using(parts.UNET) as unet:
        assert isinstance(unet, StagedUnet)
    assert psnr(np.asarray(small.generate("a red circle", **settings)[0]),
                np.asarray(inpaint_pipeline.generate("a red circle", **settings)[0])) >= 60


@pytest.mark.parametrize("damage", ["not json", "[]", "no inputs", "empty outputs", "outside file", "bad dtype",
                                    "other graph", "missing stage"])
def test_a_damaged_or_stale_plan_loads_the_whole_unet(staged_onnx, tiny_pipeline, tmp_path, damage):
    from sdonnx import Pipeline

    folder = _copy(staged_onnx[0], tmp_path / "onnx")
    path = folder / "unet" / parts.UNET_STAGES
    plan = json.loads(path.read_text())
    with Pipeline.load(folder, provider="cpu", low_memory=True).using(parts.UNET) as unet:
        assert isinstance(unet, StagedUnet)  # (before the damage)
    if damage == "not json":
        path.write_text("{")
    elif damage == "[]":
        path.write_text("[]")
    elif damage == "other graph":
        model = onnx.load(str(folder / parts.UNET.onnx_path), load_external_data=False)
        model.doc_string = "changed"
        onnx.save(model, str(folder / parts.UNET.onnx_path))
    elif damage == "missing stage":
        (folder / "unet" / plan["stages"][1]["file"]).unlink()
    else:
        if damage == "no inputs":
            del plan["inputs"]
        elif damage == "empty outputs":
            plan["stages"][0]["outputs"] = []
        elif damage == "outside file":
            plan["stages"][0]["file"] = "../text_encoder/model.onnx"
        elif damage == "bad dtype":
            plan["inputs"]["sample"]["dtype"] = "complex"
        path.write_text(json.dumps(plan))
    assert read_plan(folder / "unet") is None
    small = Pipeline.load(folder, provider="cpu", low_memory=True)
    with small.using(parts.UNET) as unet:
        assert isinstance(unet, OnnxModel)
    if damage != "other graph":  # (the changed graph is the same UNet; its picture is checked elsewhere)
        settings = dict(steps=2, seed=1, width=64, height=64)
        assert np.array_equal(np.asarray(small.generate("a red circle", **settings)[0]),
                              np.asarray(tiny_pipeline.generate("a red circle", **settings)[0]))
    assert "the whole UNet (its stage plan is damaged" in describe(folder)


def test_stages_run_only_on_the_cpu_with_a_cache_folder_and_not_without_low_memory(staged_onnx):
    from sdonnx import Pipeline

    folder = staged_onnx[0]
    for options, staged in ((dict(low_memory=True), True), (dict(low_memory=True, cache_dir=False), False),
                            (dict(), False)):
        with Pipeline.load(folder, provider="cpu", **options).using(parts.UNET) as unet:
            assert isinstance(unet, StagedUnet) is staged, options
    assert [name for name, p in providers.PROVIDERS.items() if p.stages] == ["cpu"]
    if providers.resolve("auto") == "openvino":  # auto + low_memory takes the small path: the stages on cpu
        assert Pipeline.load(folder, low_memory=True).config.provider == "cpu"
        assert Pipeline.load(folder).config.provider == "openvino"
        assert Pipeline.load(folder, low_memory=True, cache_dir=False).config.provider == "openvino"


def test_the_check_fails_when_a_stage_computes_something_else(staged_onnx, tmp_path):
    """The negative control of the stages-equal-the-whole check: one stage's output scaled by 1.01."""
    folder = _copy(staged_onnx[0], tmp_path / "onnx")
    path = folder / parts.UNET.onnx_path
    record = json.loads((folder / "unet" / parts.UNET_STAGES).read_text())
    runs = unet_stages._probe(path, record)
    assert unet_stages.verify(folder / "unet", record, runs) <= 1e-5
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
        unet_stages.verify(folder / "unet", record, runs)
    logged = []
    assert unet_stages.try_write_stages(path, logged.append, stage_bytes=10**12) == 0  # one stage: none
    assert not (folder / "unet" / parts.UNET_STAGES).exists() and not list((folder / "unet").glob("stage_*"))


def test_sessions_with_an_arena_share_one_that_grows_by_what_is_asked():
    assert providers.shared_cpu_arena()
    options = providers.session_options(arena=True)
    assert options.get_session_config_entry("session.use_env_allocators") == "1"
    assert not providers.session_options(arena=False).enable_cpu_mem_arena
