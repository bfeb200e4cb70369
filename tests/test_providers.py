"""Providers and precisions: choices, errors that say what to do, and the OpenVINO backend
giving the same pictures as onnxruntime's CPU provider."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest

from sdonnx.runtime import providers
from sdonnx.runtime.errors import ProviderError

from conftest import psnr

needs_openvino = pytest.mark.skipif(importlib.util.find_spec("openvino") is None,
                                    reason="the openvino extra is not installed")


def test_unknown_provider_lists_the_choices():
    with pytest.raises(ProviderError, match="unknown provider 'tpu'; choose one of: cpu, cuda, openvino"):
        providers.resolve("tpu")


def test_provider_not_installed_says_what_to_install(monkeypatch):
    monkeypatch.setattr(providers.Provider, "available", lambda self: self.name == "cpu")
    with pytest.raises(ProviderError, match=r"'openvino' is not installed.*pip install -e '.*\[openvino\]'"):
        providers.resolve("openvino")
    with pytest.raises(ProviderError, match=r"pip install 'onnxruntime-gpu\[cuda,cudnn\]'"):
        providers.resolve("cuda")
    assert providers.resolve("auto") == "cpu"


def test_precision_choices_and_errors(monkeypatch):
    with pytest.raises(ProviderError, match="unknown precision 'fp8'"):
        providers.resolve_precision("cpu", "fp8")
    with pytest.raises(ProviderError, match="'cpu' cannot run in bf16; .*a provider that can: openvino"):
        providers.resolve_precision("cpu", "bf16")
    monkeypatch.setattr(providers, "cpu_has_bf16", lambda: False)
    assert providers.resolve_precision("openvino", "auto") == "fp32"
    with pytest.raises(ProviderError, match="neither AVX512-BF16 nor AMX"):
        providers.resolve_precision("openvino", "bf16")
    monkeypatch.setattr(providers, "cpu_has_bf16", lambda: True)
    assert providers.resolve_precision("openvino", "auto") == "bf16"
    assert providers.resolve_precision("cpu", "auto") == "fp32"


def test_cpu_flags_are_read(tmp_path):
    info = tmp_path / "cpuinfo"
    info.write_text("processor : 0\nflags : fpu avx2 avx512f avx512_bf16\n")
    assert providers.cpu_has_bf16(info)
    info.write_text("processor : 0\nflags : fpu avx2 amx_bf16 amx_tile\n")
    assert providers.cpu_has_bf16(info)
    info.write_text("processor : 0\nflags : fpu avx2 avx512f\n")
    assert not providers.cpu_has_bf16(info)
    assert not providers.cpu_has_bf16(tmp_path / "missing")


@needs_openvino
@pytest.mark.parametrize("static_shapes", [True, False])
def test_openvino_gives_the_cpu_provider_picture(tiny_onnx, tiny_pipeline, tmp_path, static_shapes):
    from sdonnx import Pipeline

    pipe = Pipeline.load(tiny_onnx, provider="openvino", precision="fp32", cache_dir=tmp_path / "cache",
                         static_shapes=static_shapes)
    for kwargs in ({}, {"width": 96, "height": 64, "n": 2, "sampler": "dpmpp_2m"}):
        want = tiny_pipeline.generate("a red circle", steps=4, seed=1, **kwargs)
        got = pipe.generate("a red circle", steps=4, seed=1, **kwargs)
        for a, b in zip(got, want):
            assert psnr(np.asarray(a), np.asarray(b)) >= 45
    if static_shapes:
        assert any((tmp_path / "cache").iterdir()), "the compiled-model cache stayed empty"


@needs_openvino
@pytest.mark.skipif(not providers.cpu_has_bf16(), reason="this CPU does not compute bf16")
def test_bf16_stays_close_to_fp32(tmp_path):
    """On the trained default model: the tests' random tiny model multiplies its UNet output by
    10 (conftest.OUTPUT_GAIN), which magnifies bf16's rounding (29 dB there on a 16-core Xeon
    with AMX, against 51 dB for the default model at 20 steps)."""
    from sdonnx import Pipeline

    fp32 = Pipeline.load(provider="openvino", precision="fp32", cache_dir=tmp_path)
    bf16 = Pipeline.load(provider="openvino", precision="bf16", cache_dir=tmp_path)
    a = fp32.generate("a red circle", steps=20, seed=0)[0]
    b = bf16.generate("a red circle", steps=20, seed=0)[0]
    assert psnr(np.asarray(a), np.asarray(b)) >= 40


BF16_BAR_DB = 30
# LCM's 20-step run re-noises to a high sigma at every step, and on the default model (not
# LCM-distilled) its picture hangs on small differences: over 8 seeds x 2 prompts bf16 drew the
# fp32 picture to 7-52 dB (mean 35.6) with the attention as torch exports it and 7-52 dB (mean
# 35.5) with fused attention; seed 3 happened to give 32.4 dB before the fusion and 25.1 after.
# Measured and reported by the sweep, not held to the bar (tests/benchmarks/README.md).
SEED_FRAGILE = {("lcm", "default", 20)}


@pytest.fixture(scope="module")
def fp32_and_bf16_default_model(tmp_path_factory):
    from sdonnx import Pipeline

    cache = tmp_path_factory.mktemp("cache")
    return (Pipeline.load(provider="openvino", precision="fp32", cache_dir=cache),
            Pipeline.load(provider="openvino", precision="auto", cache_dir=cache))


@needs_openvino
@pytest.mark.skipif(not providers.cpu_has_bf16(), reason="this CPU does not compute bf16")
def test_every_sampler_schedule_and_step_count_draws_the_fp32_picture_in_bf16(fp32_and_bf16_default_model):
    """What `auto` runs on a bf16 CPU, against fp32 on the same backend: every sampler, both
    schedules, 1 to 100 steps (issue 18: LMS Karras 100 steps drew blotches at 17.5 dB, DPM++
    2M SDE Karras 4 steps 17.3 dB, every 1-step Karras run 24 dB, before runtime/precision.py).

    SEED_FRAGILE runs are reported, not held to the bar."""
    from sdonnx.runtime.errors import InputError
    from sdonnx.runtime.pipeline import SAMPLERS, SCHEDULES

    fp32, bf16 = fp32_and_bf16_default_model
    assert bf16.config.precision == "bf16"
    figures = {}
    for sampler in SAMPLERS:
        for schedule in SCHEDULES:
            for steps in (1, 4, 20, 100):
                settings = dict(steps=steps, seed=3, sampler=sampler, schedule=schedule)
                try:
                    want = fp32.generate("a red circle", **settings)[0]
                except InputError:  # ddim/plms/lcm take no Karras schedule, lcm at most 50 steps
                    continue
                got = bf16.generate("a red circle", **settings)[0]
                figures[sampler, schedule, steps] = psnr(np.asarray(got), np.asarray(want))
    held = {k: v for k, v in figures.items() if k not in SEED_FRAGILE}
    worst = min(held, key=held.get)
    print(f"worst: {worst} {held[worst]:.1f} dB of {len(held)} runs held to the bar; seed-fragile: "
          f"{ {k: round(figures[k], 1) for k in SEED_FRAGILE} }")
    assert len(figures) == 67  # 10 samplers x 2 schedules x 4 step counts, less what they refuse
    assert held[worst] >= BF16_BAR_DB, {k: round(v, 1) for k, v in held.items() if v < BF16_BAR_DB}


@needs_openvino
@pytest.mark.skipif(not providers.cpu_has_bf16(), reason="this CPU does not compute bf16")
def test_without_fp32_evaluations_lms_karras_falls_below_the_bar(fp32_and_bf16_default_model, monkeypatch):
    """The negative control of the sweep: the same bf16 pipeline with no evaluation moved to fp32."""
    from sdonnx.runtime import pipeline

    fp32, bf16 = fp32_and_bf16_default_model
    settings = dict(steps=100, seed=3, sampler="lms", schedule="karras")
    want = np.asarray(fp32.generate("a red circle", **settings)[0])
    monkeypatch.setattr(pipeline, "precise_sigmas", lambda *args: frozenset())
    assert psnr(np.asarray(bf16.generate("a red circle", **settings)[0]), want) < BF16_BAR_DB


def test_io_binding_draws_the_same_and_uploads_the_context_once(tiny_onnx, tiny_pipeline, monkeypatch):
    """The cuda provider's IO binding, exercised on the CPU (the same onnxruntime calls with
    device "cpu"): identical pictures, and the text context bound once for all steps."""
    import dataclasses

    import onnxruntime as ort

    from sdonnx import Pipeline

    monkeypatch.setitem(providers.PROVIDERS, "cpu", dataclasses.replace(providers.PROVIDERS["cpu"], bind_device="cpu"))
    uploads = []
    upload = ort.OrtValue.ortvalue_from_numpy
    monkeypatch.setattr(ort.OrtValue, "ortvalue_from_numpy",
                        staticmethod(lambda value, *a: uploads.append(value.shape) or upload(value, *a)))
    bound = Pipeline.load(tiny_onnx, provider="cpu", precision="fp32", cache_dir=False)
    assert bound.unet.bind_device == "cpu"
    settings = dict(steps=4, guidance=5.0, seed=3, width=64, height=64, negative_prompt="blurry")
    image = bound.generate("a red circle", **settings)[0]
    assert np.array_equal(np.asarray(image), np.asarray(tiny_pipeline.generate("a red circle", **settings)[0]))
    context_shape = (2, 77, bound.unet.shape("encoder_hidden_states")[2])
    sample_shape = (2, 4, 8, 8)
    assert uploads.count(context_shape) == 1, uploads
    assert uploads.count(sample_shape) == 4, uploads


def test_a_provider_that_does_not_start_is_an_error_not_a_silent_cpu_run(tiny_onnx, monkeypatch):
    """onnxruntime-gpu without its CUDA libraries lists CUDAExecutionProvider, then runs the
    session on the CPU with only a log line; sdonnx says so (here the CPU build plays that part)."""
    import onnxruntime as ort

    from sdonnx import Pipeline

    available = ort.get_available_providers()
    monkeypatch.setattr(providers.ort, "get_available_providers", lambda: [*available, "CUDAExecutionProvider"])
    if "CUDAExecutionProvider" in available:
        pytest.skip("CUDA really starts here")
    with pytest.raises(ProviderError, match=r"could not start CUDAExecutionProvider .*onnxruntime-gpu\[cuda,cudnn\]"):
        Pipeline.load(tiny_onnx, provider="cuda", precision="fp32")


@pytest.mark.skipif("CUDAExecutionProvider" not in __import__("onnxruntime").get_available_providers(),
                    reason="no CUDA: onnxruntime-gpu and a GPU are needed")
def test_cuda_draws_the_cpu_picture(tiny_onnx, tiny_pipeline):
    from sdonnx import Pipeline

    cuda = Pipeline.load(tiny_onnx, provider="cuda", precision="fp32")
    settings = dict(steps=6, guidance=5.0, seed=3, width=64, height=64)
    on_gpu = cuda.generate("a red circle", **settings)[0]
    on_cpu = tiny_pipeline.generate("a red circle", **settings)[0]
    assert psnr(np.asarray(on_gpu), np.asarray(on_cpu)) > 35


@needs_openvino
def test_openvino_keeps_only_the_last_compiled_shapes(tiny_onnx, monkeypatch):
    """Issue 18: every new image size compiled and kept another model forever (65 MB each on
    the embedded model); now the least recently used beyond MAX_COMPILED is dropped."""
    from sdonnx import Pipeline
    from sdonnx.runtime import openvino_model

    monkeypatch.setattr(openvino_model, "MAX_COMPILED", 2)
    pipe = Pipeline.load(tiny_onnx, provider="openvino", precision="fp32", cache_dir=False)
    for side in (32, 64, 96, 64):
        pipe.generate("a cat", steps=1, width=side, height=side, seed=0)
    kept = [dict(shapes)["sample"][2] * 8 for _, shapes in pipe.unet._compiled]
    assert kept == [96, 64], kept


@needs_openvino
def test_the_evaluations_precision_py_picks_run_on_an_fp32_compilation(tiny_onnx, monkeypatch):
    """On any CPU: a pipeline loaded for bf16 (OpenVINO computes it as fp32 where the CPU lacks
    bf16) compiles the UNet a second time in fp32 for the planned evaluations only."""
    from sdonnx.runtime import pipeline
    from sdonnx.runtime.pipeline import LoadConfig, Pipeline

    planned = []
    monkeypatch.setattr(pipeline, "precise_sigmas",
                        lambda sample, sigmas, *args: planned.append(float(sigmas[0])) or frozenset(planned))
    pipe = Pipeline(LoadConfig(tiny_onnx, "openvino", precision="bf16"))
    calls = []
    run = pipe.unet.run
    monkeypatch.setattr(pipe.unet, "run", lambda inputs, precision=None: calls.append(precision) or run(inputs, precision))
    pipe.generate("a cat", steps=3, width=32, height=32, seed=0)
    assert calls == ["fp32", None, None]
    assert sorted(precision for precision, _ in pipe.unet._compiled) == ["bf16", "fp32"]
    assert pipe.text_encoder.precision == "fp32"


@needs_openvino
def test_threads_out_of_range_is_one_clear_error_in_the_api(tiny_onnx):
    from sdonnx import Pipeline
    from sdonnx.runtime.errors import InputError

    for threads in (-1, 0, 10**6, 2.5):
        with pytest.raises(InputError, match="threads must be a whole number from 1 to 1024"):
            Pipeline.load(tiny_onnx, provider="openvino", threads=threads)


def test_a_failed_allocation_is_one_clear_error(tiny_pipeline, monkeypatch):
    """onnxruntime reports a buffer it cannot allocate (an 8192x8192 image of the tests' tiny
    model asked for 70 TB) as its own RuntimeException; sdonnx says what ran out and what to do."""
    from sdonnx.runtime.errors import OutOfMemory

    session = tiny_pipeline.unet.session

    class Failing:
        def __getattr__(self, name):
            return getattr(session, name)

        def run(self, *args):
            raise RuntimeError("[ONNXRuntimeError] : 1 : FAIL : Failed to allocate memory for requested buffer")

    monkeypatch.setattr(tiny_pipeline.unet, "session", Failing())
    with pytest.raises(OutOfMemory, match=r"unet: not enough memory for sample \(2, 4, 8, 8\).*smaller size or batch"):
        tiny_pipeline.generate("a cat", steps=1, width=64, height=64, guidance=5.0)
