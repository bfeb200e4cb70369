"""The memory policy: fused attention in the export, parts loaded on use and released, file pages
given back. Peak figures at SD 1.5 size are measured by tests/benchmarks/memory.py."""

from __future__ import annotations

import mmap
import sys
from pathlib import Path

import numpy as np
import pytest

from sdonnx.runtime import parts
from sdonnx.runtime import pipeline as pipeline_module
from sdonnx.runtime.memory import release_file_pages, trim_heap

linux = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc and madvise are Linux's")


def test_export_fuses_every_attention(tiny_onnx):
    """No Softmax left in the UNet or the VAE (the text encoder's causal attention stays as
    exported); the record counts the fused nodes. Parity with diffusers of the fused graphs is
    what test_parity.py checks."""
    import json

    import onnx

    record = json.loads((tiny_onnx / parts.RECORD).read_text())
    for part in ("unet", "vae_decoder", "vae_encoder"):
        ops = [n.op_type for n in onnx.load(str(tiny_onnx / part / "model.onnx"), load_external_data=False).graph.node]
        assert "Softmax" not in ops, part
        assert ops.count("MultiHeadAttention") == record["parts"][part]["fused_attention"] > 0, part
        assert (tiny_onnx / part / parts.EXTERNAL_DATA_FILE).is_file(), part


def test_a_graph_without_the_pattern_is_left_alone(tiny_onnx, tmp_path):
    """The negative control of the fusion: the text encoder's masked attention does not match."""
    import shutil

    from sdonnx.export.attention import fuse_attention

    for name in ("model.onnx", parts.EXTERNAL_DATA_FILE):
        shutil.copy(tiny_onnx / "text_encoder" / name, tmp_path / name)
    before = (tmp_path / "model.onnx").read_bytes()
    assert fuse_attention(tmp_path / "model.onnx") == 0
    assert (tmp_path / "model.onnx").read_bytes() == before


def rss_file_kb() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssFile:"):
            return int(line.split()[1])
    raise AssertionError("no RssFile in /proc/self/status")


@linux
def test_release_file_pages_drops_a_mapped_file_and_keeps_its_contents(tmp_path):
    path = tmp_path / "weights.bin"
    data = np.arange(16 * 2**20 // 4, dtype=np.float32)  # 16 MB
    data.tofile(path)
    with open(path, "rb") as f:
        mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        view = np.frombuffer(mapped, dtype=np.float32)
        assert float(view.sum()) == float(data.sum())  # touches every page
        touched = rss_file_kb()
        released = release_file_pages([path])
        assert released >= data.nbytes
        assert rss_file_kb() <= touched - 12 * 1024
        assert np.array_equal(view, data)  # read back from the file
        assert release_file_pages([tmp_path / "other.bin"]) == 0
        del view
        mapped.close()
    trim_heap()  # callable anywhere; nothing to assert beyond not failing


def test_low_memory_draws_the_same_picture_and_holds_no_part(tiny_onnx, tiny_pipeline, monkeypatch):
    """low_memory loads parts per use and runs the UNet one image at a time (the CFG pair as two
    calls): the same picture, to the bit on onnxruntime's CPU kernels."""
    from sdonnx import Pipeline

    small = Pipeline.load(tiny_onnx, provider="cpu", low_memory=True)
    assert small._models == {}
    batches = []
    unet = Pipeline._unet
    monkeypatch.setattr(Pipeline, "_unet", lambda self, sample, *a, **k: batches.append(len(sample)) or unet(
        self, sample, *a, **k))
    settings = dict(steps=3, seed=5, width=64, height=64)
    want = np.asarray(tiny_pipeline.generate("a red circle", **settings)[0])
    assert set(batches) == {2}
    batches.clear()
    assert np.array_equal(np.asarray(small.generate("a red circle", **settings)[0]), want)
    assert set(batches) == {1} and len(batches) == 6
    assert small._models == {}
    init = small.generate("a red circle", **settings)[0]
    assert np.array_equal(np.asarray(small.generate("a red circle", init_image=init, strength=0.5, **settings)[0]),
                          np.asarray(tiny_pipeline.generate("a red circle", init_image=init, strength=0.5, **settings)[0]))
    assert small._models == {}


def test_large_once_per_generation_parts_are_released_by_default(tiny_onnx, tiny_pipeline, monkeypatch):
    """Over KEEP_BYTES the text encoder and VAE encoder are loaded for their one call; the UNet
    and the VAE decoder stay (the decoder loaded at its first untiled decode). Under it (the
    tiny model) they stay loaded."""
    from sdonnx import Pipeline

    assert set(tiny_pipeline._models) >= {"text_encoder", "unet", "vae_decoder"}
    monkeypatch.setattr(pipeline_module, "KEEP_BYTES", 0)
    pipe = Pipeline.load(tiny_onnx, provider="cpu")
    assert set(pipe._models) == {"unet"}
    settings = dict(steps=2, seed=1, width=64, height=64)
    image = pipe.generate("a red circle", **settings)[0]
    assert np.array_equal(np.asarray(image), np.asarray(tiny_pipeline.generate("a red circle", **settings)[0]))
    assert set(pipe._models) == {"unet", "vae_decoder"}


@pytest.mark.parametrize("guidance", [7.5, 1.0])
@pytest.mark.parametrize("inpainting", [False, True])
def test_one_row_per_unet_call_pairs_each_sample_with_its_own_context(guidance, inpainting):
    """Denoiser.max_batch=1 (low_memory) gives what one call of all rows gives, for two images,
    with and without guidance, with an inpainting UNet's extra channels: each row's sample meets
    its own context row. A UNet that mixes rows (a batch mean) shows the check can fail."""
    from sdonnx.runtime.denoiser import Denoiser

    rng = np.random.default_rng(0)
    images, channels = 2, 9 if inpainting else 4
    rows = images * (2 if guidance > 1 else 1)
    context = rng.standard_normal((rows, 77, 8)).astype(np.float32)
    conditioning = rng.standard_normal((images, 5, 8, 8)).astype(np.float32) if inpainting else None
    weights = rng.standard_normal((channels, 4)).astype(np.float32)

    def unet(sample, t, ctx):  # per row: a function of that row's sample and context only
        assert len(sample) == len(ctx) and sample.shape[1] == channels
        return np.einsum("bchw,cd->bdhw", sample, weights) * t + ctx.mean(axis=(1, 2))[:, None, None, None]

    def mixing(sample, t, ctx):
        return unet(sample, t, ctx) + sample.mean()

    x = rng.standard_normal((images, 4, 8, 8)).astype(np.float32)
    for fn, same in ((unet, True), (mixing, False)):
        whole, split = (Denoiser(fn, context, guidance, "epsilon", lambda s: s * 10, conditioning, max_batch=m)
                        for m in (None, 1))
        assert np.allclose(whole(x, 2.0), split(x, 2.0), rtol=1e-6, atol=1e-6) is same


def test_low_memory_releases_each_part_before_the_next_runs(tiny_onnx, monkeypatch):
    """No reference to a low_memory part outlives its use: when the VAE decodes, the text
    encoder's and the UNet's models are gone (a local name still holding the UNet kept an SD 1.5
    int8 UNet's 1.1 GB under OpenVINO's decode, 2.49 GB against 1.40)."""
    import weakref

    from sdonnx import Pipeline

    small = Pipeline.load(tiny_onnx, provider="cpu", low_memory=True)
    loaded = []
    load, decode = Pipeline._load, Pipeline.decode

    def spy_load(self, part):
        model = load(self, part)
        loaded.append((part.name, weakref.ref(model)))
        return model

    alive = []
    monkeypatch.setattr(Pipeline, "_load", spy_load)
    monkeypatch.setattr(Pipeline, "decode", lambda self, *a, **k: alive.append(
        sorted(name for name, ref in loaded if ref() is not None)) or decode(self, *a, **k))
    small.generate("a red circle", steps=2, seed=1, width=64, height=64)
    assert {name for name, _ in loaded} >= {"text_encoder", "unet"}
    assert alive == [[]]
