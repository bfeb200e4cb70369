"""DeepCache (export/deep_cache.py, runtime/deep_cache.py) against its reference, the DeepCache
package's DeepCacheSDHelper (cache branch 0, uniform) on diffusers' pipeline in torch: the same
picture, the full UNet every N-th evaluation and the shallow branch between; interval 1 is the
uncached picture; folders and loads that cannot run it say so. Its speed and its change to
the picture at SD 1.5 size: tests/benchmarks/deep_cache.py."""

from __future__ import annotations

import json
import shutil

import numpy as np
import onnx
import pytest
import torch

from sdonnx.export import deep_cache as export_deep_cache
from sdonnx.runtime import parts
from sdonnx.runtime.deep_cache import DeepCacheUnet, StepCache, read_plan
from sdonnx.runtime.errors import InputError
from sdonnx.runtime.onnx_model import OnnxModel

from conftest import psnr

PARITY_DB = 45.0
STEPS = 9
PROMPT, NEGATIVE = "a red circle on a white background", "blurry, low quality"


@pytest.fixture(scope="module")
def reference(tiny_source):
    """Its own diffusers pipeline (DeepCacheSDHelper patches its modules while enabled)."""
    import diffusers

    from conftest import _reference

    pipe = _reference(tiny_source)
    pipe.scheduler = diffusers.EulerDiscreteScheduler.from_config(pipe.base_scheduler_config)
    return pipe


@pytest.fixture(scope="module")
def cached_pipe(tiny_onnx):
    """Its own pipeline: a cached generation switches the UNet to DeepCache's graphs for good,
    which the session's shared tiny_pipeline must not carry into other modules' tests."""
    from sdonnx import Pipeline

    return Pipeline.load(tiny_onnx, provider="cpu")


def latents(seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((1, 4, 8, 8), dtype=np.float32)


def theirs(reference, interval: int, branch: int = 0, seed: int = 0) -> np.ndarray:
    from DeepCache import DeepCacheSDHelper

    helper = None
    if interval > 1:
        helper = DeepCacheSDHelper(pipe=reference)
        helper.set_params(cache_interval=interval, cache_branch_id=branch)
        helper.enable()
    try:
        image = reference(PROMPT, negative_prompt=NEGATIVE, num_inference_steps=STEPS, width=64, height=64,
                          latents=torch.from_numpy(latents(seed)), output_type="np").images[0]
    finally:
        if helper:
            helper.disable()
    return (image * 255).round().astype(np.uint8)


def ours(pipe, interval: int, seed: int = 0, **options) -> np.ndarray:
    return np.asarray(pipe.generate(PROMPT, negative_prompt=NEGATIVE, steps=STEPS, width=64, height=64,
                                    latents=latents(seed), cache_interval=interval, **options)[0])


def test_the_export_writes_a_shallow_branch_that_gives_the_full_output(tiny_onnx):
    plan = read_plan(tiny_onnx / "unet")
    assert plan is not None and plan["difference"] <= 1e-6
    assert 0 < plan["shallow_weight_bytes"] < 0.5 * plan["weight_bytes"]
    # The cut is the hidden state entering the up path's last layer (beside conv_in's output).
    assert plan["feature"].startswith("/up_blocks.") and plan["channels"] == 32


@pytest.mark.parametrize("interval", [2, 3])
def test_cached_images_match_the_deepcache_package(cached_pipe, reference, interval):
    want = theirs(reference, interval)
    uncached = theirs(reference, 1)
    assert psnr(want, uncached) < 40, "caching changes too little on the test model to test"
    assert psnr(ours(cached_pipe, interval), want) >= PARITY_DB
    # Negative controls: the uncached picture, and the reference's next cache branch (a deeper
    # cut), miss the bar.
    assert psnr(ours(cached_pipe, 1), want) < PARITY_DB
    assert psnr(ours(cached_pipe, interval), theirs(reference, interval, branch=1)) < PARITY_DB


def test_interval_one_is_the_uncached_image_and_is_recorded_only_when_on(tiny_onnx):
    from sdonnx import Pipeline

    pipe = Pipeline.load(tiny_onnx, provider="cpu")
    before = pipe.generate(PROMPT, steps=4, width=64, height=64)[0]
    cached = pipe.generate(PROMPT, steps=4, width=64, height=64, cache_interval=2)[0]
    with pipe.using(parts.UNET) as unet:
        assert isinstance(unet, DeepCacheUnet)  # (serving interval 1 from now on too)
    after = pipe.generate(PROMPT, steps=4, width=64, height=64)[0]
    assert np.array_equal(np.asarray(before), np.asarray(after))
    assert not np.array_equal(np.asarray(before), np.asarray(cached))
    assert "DeepCache interval: 2" in cached.info["parameters"]
    assert "DeepCache" not in after.info["parameters"]


def test_the_full_unet_runs_every_nth_evaluation(tiny_onnx, monkeypatch):
    from sdonnx import Pipeline

    runs = []
    for name in ("run", "run_shallow"):
        original = getattr(DeepCacheUnet, name)
        monkeypatch.setattr(DeepCacheUnet, name, lambda self, *a, _o=original, _n=name, **k:
                            runs.append((_n, len(a[0]["sample"]))) or _o(self, *a, **k))
    pipe = Pipeline.load(tiny_onnx, provider="cpu")
    pipe.generate(PROMPT, steps=7, width=64, height=64, cache_interval=3)
    assert [r[0] for r in runs] == ["run", "run_shallow", "run_shallow"] * 2 + ["run"]
    runs.clear()
    # low_memory without stages runs the CFG pair as one-image calls: each keeps its own feature.
    small = Pipeline.load(tiny_onnx, provider="cpu", low_memory=True, cache_dir=False)
    image = small.generate(PROMPT, steps=7, width=64, height=64, cache_interval=3)[0]
    assert runs == [("run", 1)] * 2 + [("run_shallow", 1)] * 4 + [("run", 1)] * 2 + [("run_shallow", 1)] * 4 + \
        [("run", 1)] * 2
    assert psnr(np.asarray(image), np.asarray(pipe.generate(PROMPT, steps=7, width=64, height=64,
                                                            cache_interval=3)[0])) >= 60


def test_step_cache_without_a_feature_of_the_batch_runs_whole():
    class Unet:
        def run(self, inputs, precision=None):
            return {"out_sample": inputs["sample"], parts.DEEP_CACHE_FEATURE: inputs["sample"] * 2}

        def run_shallow(self, inputs, feature, precision=None):
            return {"out_sample": feature}

    cache = StepCache(2)
    one, two = np.ones((1, 4, 2, 2), np.float32), np.ones((2, 4, 2, 2), np.float32)
    cache.begin()
    assert np.array_equal(cache.run(Unet(), {"sample": one})["out_sample"], one)
    cache.begin()
    assert np.array_equal(cache.run(Unet(), {"sample": one})["out_sample"], one * 2)  # the kept feature
    assert np.array_equal(cache.run(Unet(), {"sample": two})["out_sample"], two)  # no feature for call 1
    with pytest.raises(InputError, match="cache interval"):
        StepCache(0)


def test_openvino_runs_the_same_cached_image(tiny_onnx, cached_pipe):
    pytest.importorskip("openvino")
    from sdonnx import Pipeline

    pipe = Pipeline.load(tiny_onnx, provider="openvino", precision="fp32")
    assert psnr(ours(pipe, 3), ours(cached_pipe, 3)) >= PARITY_DB


def test_folders_and_loads_that_cannot_cache_say_so(tiny_onnx, tmp_path):
    from sdonnx import Pipeline

    folder = shutil.copytree(tiny_onnx, tmp_path / "onnx")
    export_deep_cache.remove_deep_cache(folder / "unet")
    with pytest.raises(InputError, match="no DeepCache graphs .* export or quantize it again"):
        Pipeline.load(folder, provider="cpu").generate(PROMPT, steps=2, width=64, height=64, cache_interval=2)
    for bad in (0, 21, 2.5):
        with pytest.raises(InputError, match="cache interval must be a whole number from 1"):
            Pipeline.load(tiny_onnx, provider="cpu").generate(PROMPT, steps=2, width=64, height=64,
                                                               cache_interval=bad)


def test_cached_generation_refuses_the_staged_unet(tiny_onnx, tmp_path):
    from sdonnx import Pipeline
    from sdonnx.export import unet_stages

    folder = shutil.copytree(tiny_onnx, tmp_path / "onnx")
    path = folder / parts.UNET.onnx_path
    unet_stages.write_stages(path, stage_bytes=sum(f.stat().st_size for f in parts.model_files(path)) // 3)
    with pytest.raises(InputError, match="use one or the other"):
        Pipeline.load(folder, provider="cpu", low_memory=True).generate(PROMPT, steps=2, width=64, height=64,
                                                                         cache_interval=2)


@pytest.mark.parametrize("damage", ["not json", "other graph", "missing shallow", "bad kind"])
def test_a_damaged_or_stale_plan_is_not_used(tiny_onnx, tmp_path, damage):
    folder = shutil.copytree(tiny_onnx, tmp_path / "onnx")
    path = folder / "unet" / parts.DEEP_CACHE_PLAN
    assert read_plan(folder / "unet") is not None
    if damage == "not json":
        path.write_text("{")
    elif damage == "other graph":
        model = onnx.load(str(folder / parts.UNET.onnx_path), load_external_data=False)
        model.doc_string = "changed"
        onnx.save(model, str(folder / parts.UNET.onnx_path))
    elif damage == "missing shallow":
        (folder / "unet" / parts.DEEP_CACHE_SHALLOW).unlink()
    else:
        path.write_text(json.dumps({**json.loads(path.read_text()), "kind": "unet"}))
    assert read_plan(folder / "unet") is None


def test_the_check_fails_when_the_shallow_graph_computes_something_else(tiny_onnx, tmp_path, monkeypatch):
    """The negative control of the shallow-equals-full check: the shallow graph's output x 1.01."""
    folder = shutil.copytree(tiny_onnx, tmp_path / "onnx")
    shallow_model = export_deep_cache._shallow_model

    def scaled(*args, **kwargs):
        model = shallow_model(*args, **kwargs)
        name = model.graph.output[0].name
        for node in model.graph.node:
            node.output[:] = [f"{o}.raw" if o == name else o for o in node.output]
        model.graph.initializer.append(onnx.numpy_helper.from_array(np.array(1.01, np.float32), "gain"))
        model.graph.node.append(onnx.helper.make_node("Mul", [f"{name}.raw", "gain"], [name]))
        return model

    monkeypatch.setattr(export_deep_cache, "_shallow_model", scaled)
    with pytest.raises(ValueError, match="differs from the full UNet"):
        export_deep_cache.write_deep_cache(folder / parts.UNET.onnx_path)
    assert not [p for p in (folder / "unet").iterdir() if p.name.startswith(("deep_cache", ".deep_cache"))]
    logged = []
    assert not export_deep_cache.try_write_deep_cache(folder / parts.UNET.onnx_path, logged.append)
    assert "no DeepCache graphs" in logged[0]


def test_the_graphs_keep_their_weights_in_the_unets_data_file(tiny_onnx):
    folder = tiny_onnx / "unet"
    for name in (parts.DEEP_CACHE_FULL, parts.DEEP_CACHE_SHALLOW):
        model = onnx.load(str(folder / name), load_external_data=False)
        external = [t for t in model.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL]
        assert external and all(e.value == parts.EXTERNAL_DATA_FILE for t in external
                                for e in t.external_data if e.key == "location")
        assert (folder / name).stat().st_size < 0.1 * (folder / parts.EXTERNAL_DATA_FILE).stat().st_size
    # The session of each opens (its weights read from model.onnx_data).
    OnnxModel(folder / parts.DEEP_CACHE_FULL, parts.UNET, "cpu")


def _cli(*args):
    import subprocess
    import sys

    return subprocess.run([sys.executable, "-m", "sdonnx.cli.app", *map(str, args)], capture_output=True, text=True,
                          timeout=300)


def test_the_command_line_runs_the_cached_image_and_refuses_what_cannot(tiny_onnx, cached_pipe, tmp_path):
    from PIL import Image

    done = _cli("generate", PROMPT, "--model", tiny_onnx, "--negative", NEGATIVE, "--steps", STEPS, "--seed", 3,
                "--size", "64x64", "--provider", "cpu", "--cache-interval", 3, "--out", tmp_path / "a.png")
    assert done.returncode == 0, done.stderr
    with Image.open(tmp_path / "a.png") as image:
        assert "DeepCache interval: 3" in image.text["parameters"]
        assert np.array_equal(np.asarray(image.convert("RGB")), np.asarray(cached_pipe.generate(
            PROMPT, negative_prompt=NEGATIVE, steps=STEPS, seed=3, width=64, height=64, cache_interval=3)[0]))
    embedded = _cli("generate", PROMPT, "--steps", 2, "--cache-interval", 2, "--out", tmp_path / "b.png")
    assert embedded.returncode == 2 and "the embedded model ships without DeepCache graphs" in embedded.stderr
    bad = _cli("generate", PROMPT, "--model", tiny_onnx, "--cache-interval", 0, "--out", tmp_path / "c.png")
    assert bad.returncode == 2 and "Invalid value for '--cache-interval'" in bad.stderr
    assert "Traceback" not in embedded.stderr + bad.stderr


def test_the_server_runs_every_request_cached(tiny_onnx, cached_pipe):
    pytest.importorskip("fastapi")
    from serving import Server, png

    server = Server("--model", str(tiny_onnx), "--provider", "cpu", "--cache-interval", "3")
    try:
        reply = server.post("/v1/images/generations", {"prompt": PROMPT, "negative_prompt": NEGATIVE, "size": "64x64",
                                                       "seed": 5, "steps": STEPS, "response_format": "b64_json"})
        assert reply.status == 200, reply.message
        served = np.asarray(png(reply.body["data"][0]["b64_json"]).convert("RGB"))
    finally:
        server.stop()
    want = cached_pipe.generate(PROMPT, negative_prompt=NEGATIVE, steps=STEPS, seed=5, width=64, height=64,
                                  cache_interval=3)[0]
    assert np.array_equal(served, np.asarray(want))
    with pytest.raises(RuntimeError, match="the embedded model ships without DeepCache graphs"):
        Server("--provider", "cpu", "--cache-interval", "2")
