"""Quantization: int8 and fp16 weights, the check against the float model, per-part fallback."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper
from PIL import Image, ImageFilter

from sdonnx import Pipeline
from sdonnx.export import quantize as q
from sdonnx.export import weights
from sdonnx.export.quality import compare, psnr, ssim
from sdonnx.runtime import parts, providers
from sdonnx.runtime.info import describe, folder_bytes
from sdonnx.runtime.pipeline import default_model_path

DEFAULT = default_model_path()


def _sdonnx(*args):
    return subprocess.run([sys.executable, "-m", "sdonnx.cli.app", *map(str, args)],
                          capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def int8_default(tmp_path_factory) -> tuple[Path, q.QuantizeResult]:
    out = tmp_path_factory.mktemp("int8") / "default-int8"
    return out, q.quantize(q.QuantizeConfig(DEFAULT, out, "int8"))


def _ops(path: Path) -> dict[str, int]:
    model = onnx.load(str(path), load_external_data=False)
    counts: dict[str, int] = {}
    for node in model.graph.node:
        counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return counts


def test_int8_quantizes_every_part_and_records_the_check(int8_default):
    out, result = int8_default
    record = json.loads((out / parts.RECORD).read_text())
    precisions = {name: entry["precision"] for name, entry in record["parts"].items()}
    assert precisions == {"text_encoder": "int8 weights", "unet": "int8 weights and activations",
                          "vae_decoder": "int8 weights", "vae_encoder": "int8 weights"}
    # The UNet runs quantized convolutions and products; the others dequantize stored weights.
    unet_ops = _ops(out / parts.UNET.onnx_path)
    assert unet_ops["QuantizeLinear"] > 50 and unet_ops["DequantizeLinear"] > 100
    assert "QuantizeLinear" not in _ops(out / parts.VAE_DECODER.onnx_path)
    check = record["quantization"]
    assert check["mode"] == "int8" and check["min_psnr"] == q.DEFAULT_MIN_PSNR["int8"]
    assert set(check["parts"]) == {p.name for p in parts.PARTS}
    for name, figures in check["parts"].items():
        assert figures["psnr"] >= check["min_psnr"] and 0 < figures["ssim"] <= 1, name
        assert not figures.get("kept_float")
    assert check["psnr"] == round(result.psnr, 2) and result.psnr >= check["min_psnr"]
    # Sizes: the UNet's int8 file is about a quarter of its fp32 one.
    assert folder_bytes(out / "unet") < 0.4 * folder_bytes(DEFAULT / "unet")
    assert folder_bytes(out) < 0.5 * folder_bytes(DEFAULT)


def test_int8_keeps_the_sensitive_unet_nodes_float(int8_default):
    out, _ = int8_default
    model = onnx.load(str(out / parts.UNET.onnx_path))
    produced_by = {o: n for n in model.graph.node for o in n.output}
    initializers = {i.name for i in model.graph.initializer}
    for name in ("/conv_in/Conv", "/conv_out/Conv", "/time_embedding/linear_1/Gemm"):
        node = next(n for n in model.graph.node if n.name == name)
        assert node.input[1] in initializers, f"{name}'s weight should stay a float initializer"
        assert produced_by.get(node.input[0], node).op_type != "DequantizeLinear", name
    quantized = [n for n in model.graph.node if n.name == "/down_blocks.0/resnets.0/conv1/Conv"]
    assert produced_by[quantized[0].input[1]].op_type == "DequantizeLinear"
    recorded = json.loads((out / parts.RECORD).read_text())["quantization"]["parts"]["unet"]["float_nodes"]
    assert "/conv_in/Conv" in recorded and "/conv_out/Conv" in recorded


@pytest.mark.parametrize("provider", ["cpu", "openvino"])
def test_int8_folder_generates_close_to_float(int8_default, provider):
    if not providers.PROVIDERS[provider].available():
        pytest.skip(f"{provider} not installed")
    out, _ = int8_default
    prompt = "a blue square on a white background"
    float_image = Pipeline.load(DEFAULT, provider="cpu").generate(prompt, steps=8, seed=3)[0]
    image = Pipeline.load(out, provider=provider).generate(prompt, steps=8, seed=3)[0]
    close, _ = compare([np.asarray(float_image)], [np.asarray(image)])
    # The check's own floor; a garbage calibration falls below it (next test).
    assert close > q.DEFAULT_MIN_PSNR["int8"], close


def test_check_rejects_garbage_calibration_and_keeps_that_part_float(tmp_path, monkeypatch):
    """Ranges calibrated on inputs 1000 times too small clip every real activation: the check
    must see the damage, copy the float UNet back and say so, and still quantize the rest."""
    real = q.calibration_data

    def garbage(pipe, config):
        return [{k: (v if k == "timestep" else v * np.float32(1e-3)) for k, v in call.items()}
                for call in real(pipe, config)]

    monkeypatch.setattr(q, "calibration_data", garbage)
    out = tmp_path / "bad"
    result = q.quantize(q.QuantizeConfig(DEFAULT, out, "int8"))
    by_part = {r.part: r for r in result.parts}
    assert by_part["unet"].kept_float and by_part["unet"].psnr < q.DEFAULT_MIN_PSNR["int8"]
    assert (out / parts.UNET.onnx_path).read_bytes() == (DEFAULT / parts.UNET.onnx_path).read_bytes()
    assert not by_part["vae_decoder"].kept_float
    record = json.loads((out / parts.RECORD).read_text())
    assert record["parts"]["unet"]["precision"] == "fp32"
    assert record["quantization"]["parts"]["unet"]["kept_float"] is True
    assert "unet: fp32" in describe(out) and "kept in fp32" in describe(out)


def test_nothing_is_written_when_every_part_fails(tmp_path):
    out = tmp_path / "never"
    with pytest.raises(q.QuantizeFailed, match="nothing was written"):
        q.quantize(q.QuantizeConfig(DEFAULT, out, "int8", min_psnr=1000, check_prompts=1, check_steps=2,
                                    calibration_prompts=1, calibration_steps=2))
    assert list(tmp_path.iterdir()) == []


def test_fp16_weights_halve_the_files_and_run_on_cpu(tiny_onnx, tmp_path):
    """The tiny random model has fp32 weights (the embedded model's are fp16-exact already)."""
    out = tmp_path / "fp16"
    result = q.quantize(q.QuantizeConfig(tiny_onnx, out, "fp16", check_prompts=1, check_steps=4))
    for part in parts.PARTS:
        weight_bytes = [sum(f.stat().st_size for f in parts.model_files(folder / part.onnx_path))
                        for folder in (out, tiny_onnx)]
        ratio = weight_bytes[0] / weight_bytes[1]
        assert 0.45 < ratio < 0.6, (part.name, ratio)
        session = ort.InferenceSession(str(out / part.onnx_path), providers=["CPUExecutionProvider"])
        assert all(i.type != "tensor(float16)" for i in session.get_inputs() + session.get_outputs())
    assert result.psnr > 35
    reference = Pipeline.load(tiny_onnx, provider="cpu").generate("a cat", steps=3, width=64, height=64)[0]
    for provider in ("cpu", "openvino"):
        if providers.PROVIDERS[provider].available():
            # fp32 compute: `auto` would pick bf16 for OpenVINO on a CPU with AVX512-BF16 or AMX,
            # which is its own, lower bar (test_providers.py).
            image = Pipeline.load(out, provider=provider, precision="fp32").generate(
                "a cat", steps=3, width=64, height=64)[0]
            assert compare([np.asarray(reference)], [np.asarray(image)])[0] > 35, provider


def _graph_with_every_weight_kind() -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
    rng = np.random.default_rng(0)
    w = {
        "table": rng.standard_normal((50, 8)).astype(np.float32),
        "conv_w": (rng.standard_normal((6, 3, 3, 3)) * np.arange(1, 7).reshape(6, 1, 1, 1)).astype(np.float32),
        "mat_w": rng.standard_normal((8, 5)).astype(np.float32),
        "gemm_w": rng.standard_normal((4, 8)).astype(np.float32),
    }
    nodes = [
        helper.make_node("Gather", ["table", "ids"], ["emb"], name="gather"),
        helper.make_node("MatMul", ["emb", "mat_w"], ["mm"], name="matmul"),
        helper.make_node("Gemm", ["x2", "gemm_w"], ["gm"], name="gemm", transB=1),
        helper.make_node("Conv", ["img", "conv_w"], ["cv"], name="conv", pads=[1, 1, 1, 1]),
    ]
    graph = helper.make_graph(
        nodes, "weights",
        [helper.make_tensor_value_info("ids", TensorProto.INT64, [3]),
         helper.make_tensor_value_info("x2", TensorProto.FLOAT, [2, 8]),
         helper.make_tensor_value_info("img", TensorProto.FLOAT, [1, 3, 5, 5])],
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, shape)
         for n, shape in (("mm", [3, 5]), ("gm", [2, 4]), ("cv", [1, 6, 5, 5]))],
        [numpy_helper.from_array(v, k) for k, v in w.items()],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), w


def _feeds(seed: int) -> dict[str, np.ndarray]:
    """Inputs for `_graph_with_every_weight_kind`."""
    rng = np.random.default_rng(seed)
    return {"ids": np.array([0, 7, 49]), "x2": rng.standard_normal((2, 8)).astype(np.float32),
            "img": rng.standard_normal((1, 3, 5, 5)).astype(np.float32)}


def _run(model: onnx.ModelProto, feeds: dict) -> list[np.ndarray]:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, feeds)


def test_int8_weights_match_float_within_half_a_step_per_channel():
    model, w = _graph_with_every_weight_kind()
    feeds = _feeds(1)
    reference = _run(model, feeds)
    done = weights.to_int8_weights(model)
    assert sorted(done) == ["conv", "gather", "gemm", "matmul"]
    stored = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    for name, axis in (("conv_w", 0), ("mat_w", 1), ("gemm_w", 0), ("table", 0)):
        assert stored[f"{name}__int8"].dtype == np.int8
        scale = stored[f"{name}__scale"]
        shape = [1] * w[name].ndim
        shape[axis] = -1
        error = np.abs(stored[f"{name}__int8"] * scale.reshape(shape) - w[name])
        assert (error <= scale.reshape(shape) / 2 + 1e-7).all(), name
        assert scale.shape == (w[name].shape[axis],), name  # one scale per output channel / row
    onnx.checker.check_model(model)
    for got, want in zip(_run(model, feeds), reference):
        assert np.abs(got - want).max() < 0.03 * np.abs(want).max()


def test_fp16_weights_keep_float32_inputs_and_outputs():
    model, _ = _graph_with_every_weight_kind()
    feeds = _feeds(2)
    reference = _run(model, feeds)
    assert weights.to_fp16(model) == 4
    onnx.checker.check_model(model)
    for got, want in zip(_run(model, feeds), reference):
        assert got.dtype == np.float32 and np.abs(got - want).max() < 2e-3 * np.abs(want).max()


def test_ssim_and_psnr_agree_with_scikit_image():
    from skimage.metrics import peak_signal_noise_ratio, structural_similarity

    rng = np.random.default_rng(0)
    a = (rng.random((48, 40, 3)) * 255).astype(np.uint8)
    for radius in (0.7, 2.0):
        b = np.asarray(Image.fromarray(a).filter(ImageFilter.GaussianBlur(radius)))
        reference = structural_similarity(a, b, channel_axis=2, gaussian_weights=True, sigma=1.5,
                                          use_sample_covariance=False, data_range=255)
        assert ssim(a, b) == pytest.approx(reference, abs=1e-9)
        assert psnr(a, b) == pytest.approx(peak_signal_noise_ratio(a, b, data_range=255))
    assert ssim(a, a) == pytest.approx(1.0) and psnr(a, a) == 100.0


@pytest.mark.parametrize("args, message", [
    (["--mode", "int3"], "unknown quantization mode 'int3'; choose one of: fp16, int8"),
    (["--check-prompts", "9"], "--check-prompts must be from 1 to 4"),
])
def test_cli_rejects_bad_options(tmp_path, args, message):
    proc = _sdonnx("quantize", DEFAULT, tmp_path / "out", *args)
    assert proc.returncode == 2 and message in proc.stderr, proc.stderr
    assert not (tmp_path / "out").exists()


def test_cli_refuses_an_existing_out_and_the_source_itself(tmp_path):
    (tmp_path / "out").mkdir()
    proc = _sdonnx("quantize", DEFAULT, tmp_path / "out", "--mode", "fp16")
    assert proc.returncode == 2 and "already exists" in proc.stderr
    proc = _sdonnx("quantize", DEFAULT, DEFAULT, "--mode", "fp16")
    assert proc.returncode == 2 and "not the source folder" in proc.stderr


@pytest.fixture(scope="module")
def openvino_int8_default(tmp_path_factory) -> Path:
    pytest.importorskip("nncf")
    out = tmp_path_factory.mktemp("ov") / "default-int8-openvino"
    q.quantize(q.QuantizeConfig(DEFAULT, out, "int8-openvino"))
    return out


def test_openvino_int8_writes_ir_that_only_the_openvino_provider_runs(openvino_int8_default):
    out = openvino_int8_default
    record = json.loads((out / parts.RECORD).read_text())
    for part in parts.PARTS:
        assert part.file(out) == out / part.ir_path and not (out / part.onnx_path).exists(), part.name
        assert record["parts"][part.name]["format"] == "openvino"
    check = record["quantization"]
    assert check["mode"] == "int8-openvino" and check["psnr"] >= check["min_psnr"]
    # The output convolution is the one whose quantization ruins the picture: it stays float.
    assert "/conv_out/Conv/WithoutBiases" in check["parts"]["unet"]["float_nodes"]
    image = Pipeline.load(out, provider="openvino").generate("a red star on a white background", steps=8)[0]
    reference = Pipeline.load(DEFAULT, provider="cpu").generate("a red star on a white background", steps=8)[0]
    assert compare([np.asarray(reference)], [np.asarray(image)])[0] > q.DEFAULT_MIN_PSNR["int8-openvino"]
    with pytest.raises(providers.ProviderError, match="use --provider openvino"):
        Pipeline.load(out, provider="cpu")
    assert "unet: int8 weights and activations (OpenVINO IR)" in describe(out)


def test_calibration_sees_every_call(tiny_onnx, tmp_path, monkeypatch):
    """The activation ranges come from all calibration calls, the first included (onnxruntime
    1.32 dropped the calls it had collected whenever CalibMaxIntermediateOutputs was reached:
    with 16, only the last calls mod 16 calibrated). Call 0 holds the largest sample by far;
    the range of the UNet's `sample` input must reach it."""
    from onnxruntime.quantization import calibrate

    unet = Pipeline.load(tiny_onnx, provider="cpu").unet
    rng = np.random.default_rng(0)
    calls = []
    for i in range(20):
        scale = 50.0 if i == 0 else 1.0
        calls.append({
            "sample": (scale * rng.standard_normal((2, 4, 8, 8))).astype(unet.dtype("sample")),
            "timestep": np.full([2] * len(unet.shape("timestep")), 500, dtype=unet.dtype("timestep")),
            "encoder_hidden_states": rng.standard_normal(
                (2, 77, unet.shape("encoder_hidden_states")[2])).astype(np.float32),
        })
    seen = []
    compute = calibrate.MinMaxCalibrater.compute_data

    def recording(self):
        ranges = compute(self)
        seen.append({name: tuple(float(np.asarray(v).reshape(-1)[0]) for v in ranges[name].range_value)
                     for name in ranges.data})
        return ranges

    monkeypatch.setattr(calibrate.MinMaxCalibrater, "compute_data", recording)
    q.quantize_unet_int8(tiny_onnx / parts.UNET.onnx_path, tmp_path / "unet.onnx", calls)
    low, high = seen[-1]["sample"]
    assert high >= float(calls[0]["sample"].max()) * 0.999 and low <= float(calls[0]["sample"].min()) * 0.999


def test_an_int8_unet_in_stages_draws_the_whole_int8_unets_picture(int8_default, tmp_path):
    """--low-memory on an int8 folder runs the UNet's stages (quantize writes them for a UNet over
    unet_stages.STAGE_BYTES; here smaller stages of the embedded model's): cuts avoid quantized
    tensors, so every stage keeps onnxruntime's int8 kernels and the picture is the whole int8
    UNet's."""
    import shutil

    from sdonnx.export import unet_stages

    folder = tmp_path / "int8"
    shutil.copytree(int8_default[0], folder)
    path = folder / parts.UNET.onnx_path
    plan = unet_stages.write_stages(path, stage_bytes=sum(f.stat().st_size for f in parts.model_files(path)) // 3)
    assert len(plan["stages"]) >= 2 and plan["difference"] <= 1e-5
    for stage in plan["stages"]:  # every tensor passed between stages is float: no cut inside a QDQ pair
        model = onnx.load(str(folder / "unet" / stage["file"]), load_external_data=False)
        assert {v.type.tensor_type.elem_type for v in [*model.graph.input, *model.graph.output]
                if v.name not in plan["inputs"]} == {TensorProto.FLOAT}
    settings = dict(steps=4, seed=3)
    whole = Pipeline.load(folder, provider="cpu").generate("a blue square", **settings)[0]
    staged = Pipeline.load(folder, provider="cpu", low_memory=True)
    with staged.using(parts.UNET) as unet:
        assert type(unet).__name__ == "StagedUnet"
    assert psnr(np.asarray(staged.generate("a blue square", **settings)[0]), np.asarray(whole)) >= 45


def test_int8_writes_deep_cache_graphs_and_int8_openvino_says_it_has_none(int8_default, openvino_int8_default):
    """quantize writes the int8 UNet's DeepCache graphs (the cut is a float tensor: the shallow
    branch keeps onnxruntime's int8 kernels); the IR of int8-openvino has none and says so."""
    from sdonnx.runtime.deep_cache import read_plan
    from sdonnx.runtime.errors import InputError

    folder = int8_default[0]
    plan = read_plan(folder / "unet")
    assert plan is not None and plan["difference"] <= 1e-5
    shallow = onnx.load(str(folder / "unet" / parts.DEEP_CACHE_SHALLOW), load_external_data=False)
    assert any(n.op_type == "QuantizeLinear" for n in shallow.graph.node)
    pipe = Pipeline.load(folder, provider="cpu")
    settings = dict(steps=9, seed=3)
    cached = pipe.generate("a blue square", cache_interval=3, **settings)[0]
    assert 20 <= psnr(np.asarray(cached), np.asarray(pipe.generate("a blue square", **settings)[0])) < 60
    with pytest.raises(InputError, match="OpenVINO IR .* quantize with --mode int8"):
        Pipeline.load(openvino_int8_default, provider="openvino").generate("a blue square", steps=2, cache_interval=2)
