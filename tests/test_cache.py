"""The optimized-graph cache: a second start reads onnxruntime's saved optimized graph, gives
the same pictures, and a changed model, onnxruntime or CPU, a damaged entry or an unusable
cache folder never gives a wrong or failed load."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
from typer.testing import CliRunner

from sdonnx.runtime import Pipeline, cache

GENERATE = dict(steps=3, guidance=5.0, seed=7, width=64, height=64)


@pytest.fixture
def every_part_cached(monkeypatch):
    """The tiny model's parts are far below the size worth caching; cache them anyway."""
    monkeypatch.setattr(cache, "MIN_BYTES", 0)


def _load(model, root):
    return Pipeline.load(model, provider="cpu", precision="fp32", cache_dir=root)


def _pixels(pipe):
    return np.asarray(pipe.generate("a red circle", **GENERATE)[0], dtype=np.int16)


def _entries(root):
    return sorted(p for p in (root / "onnxruntime").iterdir())


def test_second_load_reads_the_saved_graph_and_draws_the_same(tiny_onnx, tmp_path, every_part_cached):
    uncached = _pixels(_load(tiny_onnx, False))
    first = _load(tiny_onnx, tmp_path)
    first_pixels = _pixels(first)  # (the VAE decoder loads at its first decode)
    assert first.cache_use == {"text_encoder": "written", "unet": "written", "vae_decoder": "written",
                               "vae_encoder": "written"}
    entries = _entries(tmp_path)
    assert len(entries) == 4 and not any(".partial" in e.name for e in entries)
    stamp = json.loads((entries[0] / "stamp.json").read_text())
    assert set(stamp) == {"source", "files", "onnxruntime", "provider", "cpu"}
    second = _load(tiny_onnx, tmp_path)
    second_pixels = _pixels(second)
    assert set(second.cache_use.values()) == {"hit"}
    assert second.unet.session._model_path.startswith(str(tmp_path / "onnxruntime"))
    assert np.abs(first_pixels - uncached).max() == 0
    assert np.abs(second_pixels - uncached).max() <= 1


def test_a_changed_model_file_is_optimized_again(tiny_onnx, tmp_path, every_part_cached):
    _pixels(_load(tiny_onnx, tmp_path))
    unet = tiny_onnx / "unet" / "model.onnx"
    stat = unet.stat()
    os.utime(unet, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    try:
        assert _load(tiny_onnx, tmp_path).cache_use["unet"] == "written"
        assert _load(tiny_onnx, tmp_path).cache_use["unet"] == "hit"
    finally:
        os.utime(unet, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert len(_entries(tmp_path)) == 4, "one entry per part, replaced rather than added"


def test_another_cpu_or_onnxruntime_does_not_use_the_saved_graph(tiny_onnx, tmp_path, every_part_cached,
                                                                  monkeypatch):
    _load(tiny_onnx, tmp_path)
    monkeypatch.setattr(cache, "_cpu_fingerprint", lambda: "another-cpu")
    assert set(_load(tiny_onnx, tmp_path).cache_use.values()) == {"written"}
    monkeypatch.setattr(cache.ort, "__version__", "0.0.1")
    assert set(_load(tiny_onnx, tmp_path).cache_use.values()) == {"written"}


def test_a_damaged_entry_is_rebuilt(tiny_onnx, tmp_path, every_part_cached):
    pipe = _load(tiny_onnx, tmp_path)
    expected = _pixels(pipe)
    for entry in _entries(tmp_path):
        (entry / cache.OPTIMIZED_FILE).write_bytes(b"not a model")
    again = _load(tiny_onnx, tmp_path)
    assert set(again.cache_use.values()) == {"written"}
    assert np.abs(_pixels(again) - expected).max() <= 1


def test_an_unusable_cache_folder_loads_without_a_cache(tiny_onnx, tmp_path, every_part_cached):
    not_a_folder = tmp_path / "file"
    not_a_folder.write_text("")
    pipe = _load(tiny_onnx, not_a_folder)
    assert pipe.cache_use == {}
    assert _pixels(pipe).shape == (64, 64, 3)


def test_small_parts_and_no_cache_write_nothing(tiny_onnx, tmp_path, monkeypatch):
    assert _load(tiny_onnx, tmp_path).cache_use == {}  # the tiny model is below MIN_BYTES
    assert not (tmp_path / "onnxruntime").exists()
    monkeypatch.setattr(cache, "MIN_BYTES", 0)
    monkeypatch.setenv("SDONNX_CACHE_DIR", "off")
    assert Pipeline.load(tiny_onnx, provider="cpu", precision="fp32").cache_use == {}
    monkeypatch.setenv("SDONNX_CACHE_DIR", str(tmp_path / "env"))
    assert set(Pipeline.load(tiny_onnx, provider="cpu", precision="fp32").cache_use.values()) == {"written"}
    assert (tmp_path / "env" / "onnxruntime").is_dir()


def test_verbose_generate_says_what_the_cache_did(tiny_onnx, tmp_path, every_part_cached, monkeypatch):
    from sdonnx.cli.app import app

    monkeypatch.setenv("SDONNX_CACHE_DIR", str(tmp_path / "cache"))
    args = ["generate", "a red circle", "--model", str(tiny_onnx), "--steps", "2", "--provider", "cpu",
            "--verbose", "--out"]
    first = CliRunner().invoke(app, args + [str(tmp_path / "1.png")])
    assert first.exit_code == 0, first.output
    # (The VAE decoder loads at its first decode, after this line.)
    assert "(optimized-graph cache: text_encoder written, unet written, vae_encoder written)" in first.output
    second = CliRunner().invoke(app, args + [str(tmp_path / "2.png")])
    assert "unet hit" in second.output


def test_writing_an_entry_removes_those_of_deleted_models_and_dead_writers(tiny_onnx, tmp_path, every_part_cached):
    import shutil
    import subprocess

    gone, kept, root = tmp_path / "gone", tmp_path / "kept", tmp_path / "cache"
    shutil.copytree(tiny_onnx, gone)
    shutil.copytree(tiny_onnx, kept)
    _pixels(_load(gone, root))
    _pixels(_load(kept, root))
    assert len(_entries(root)) == 8
    finished = subprocess.Popen(["true"])
    finished.wait()
    dead, alive = (root / "onnxruntime" / f"0123456789abcdef.partial-{pid}" for pid in (finished.pid, os.getpid()))
    fresh = root / "onnxruntime" / f"fedcba9876543210.partial-{finished.pid}"
    for folder in (dead, alive, fresh):
        folder.mkdir()
    for folder in (dead, alive):  # older than an hour; `fresh` may be a writer's in another PID namespace
        os.utime(folder, (folder.stat().st_atime, folder.stat().st_mtime - 2 * cache.STALE_SECONDS))
    shutil.rmtree(gone)
    assert _load(kept, root).cache_use["unet"] == "hit"  # reading writes nothing, removes nothing
    assert len(_entries(root)) == 11
    unet = kept / "unet" / "model.onnx"
    os.utime(unet, ns=(unet.stat().st_atime_ns, unet.stat().st_mtime_ns + 10**9))
    assert _load(kept, root).cache_use["unet"] == "written"
    left = _entries(root)
    assert alive in left and fresh in left and dead not in left
    assert sorted(json.loads((e / "stamp.json").read_text())["source"] for e in left
                  if ".partial-" not in e.name) == sorted(
        str((kept / part / "model.onnx").resolve()) for part in ("text_encoder", "unet", "vae_decoder", "vae_encoder"))


def test_openvino_compiles_into_a_shared_cache_one_process_at_a_time(tiny_onnx, tmp_path):
    """Two processes compiling into one OpenVINO cache raced (issue 25: two Ray workers on a
    node failed with "cannot set permissions ... .blob"); a compile now waits for the lock."""
    import fcntl
    import subprocess
    import sys
    import time

    pytest.importorskip("openvino")
    code = ("import sys; from sdonnx.runtime import Pipeline; "
            "Pipeline.load(sys.argv[1], provider='openvino', precision='fp32', cache_dir=sys.argv[2])"
            ".generate('a red circle', steps=1, width=64, height=64); print('drawn')")
    (tmp_path / "openvino").mkdir()
    with open(tmp_path / "openvino" / ".lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # as another process compiling
        child = subprocess.Popen([sys.executable, "-c", code, str(tiny_onnx), str(tmp_path)],
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        time.sleep(8)
        assert child.poll() is None, child.communicate()  # waiting for the lock, not compiling
        fcntl.flock(lock, fcntl.LOCK_UN)
    out, err = child.communicate(timeout=120)
    assert child.returncode == 0 and "drawn" in out, err
    assert any((tmp_path / "openvino").glob("*.blob"))
