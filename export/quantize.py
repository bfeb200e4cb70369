"""Quantize an exported model folder, prove the pictures survived, fall back part by part.

Modes
- `fp16`: every part's weights stored as float16 (export/weights.py), float32 arithmetic.
- `int8`: the UNet statically quantized for ONNX Runtime (QDQ, Conv/MatMul/Gemm with constant
  weights, per-channel weights, activation ranges calibrated by running the float pipeline over
  whole sampler trajectories on real prompts), keeping its first and last convolutions and its
  time embedding in float; the text encoder and the VAE get int8 weights only (their
  activations have outliers that static ranges clip). OpenVINO runs these files too.
- `int8-openvino`: OpenVINO IR made with NNCF, as optimum-intel's "hybrid" mode: the UNet's
  weighted MatMuls get int8 weights, its convolutions and the remaining operations int8
  weights and activations (same calibration data); the other parts int8 weights. Only the
  openvino provider runs the result.

The check ("doctor") generates the same prompts and seeds with the float folder and with each
quantized part swapped in alone, and compares the images (PSNR, SSIM). A part whose images fall
below `min_psnr` is copied back in float and the record says so; the kept combination is then
measured as a whole. Everything is written to a temporary folder and renamed into place.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from sdonnx.export import deep_cache, unet_stages, vae_stages, weights
from sdonnx.export.exporter import check_out, staged_folder
from sdonnx.export.quality import compare
from sdonnx.runtime import parts
from sdonnx.runtime.adapters import WEIGHT_MAP_FILE
from sdonnx.runtime.errors import InputError, SdonnxError, install_hint
from sdonnx.runtime.info import folder_bytes
from sdonnx.runtime.onnx_model import OnnxModel
from sdonnx.runtime.checks import check_number
from sdonnx.runtime.pipeline import Pipeline, check_model_folder
from sdonnx.runtime.schedules import MAX_STEPS

MODES = ("fp16", "int8", "int8-openvino")
DEFAULT_MIN_PSNR = {"fp16": 35.0, "int8": 22.0, "int8-openvino": 22.0}
NNCF_INSTALL = install_hint("openvino-int8")
# Prompts for calibration and for the check: different sets, so the check is not the data
# the ranges were fitted to. The shapes prompts exercise the embedded model.
CALIBRATION_PROMPTS = (
    "a photograph of an astronaut riding a horse",
    "a red circle on a white background",
    "a small blue square at the top left",
    "a watercolor painting of a lighthouse at dusk",
    "a large yellow star on a black background",
    "portrait of an old man, oil on canvas",
)
CHECK_PROMPTS = (
    "a green triangle at the bottom right on a gray background",
    "a cozy cabin in a snowy forest, warm light",
    "an orange circle on a black background",
    "a bowl of fruit on a wooden table",
)
# UNet nodes kept in float by int8: the input and output convolutions (they carry the latent
# image itself, whose precision shows directly in the picture) and the timestep embedding.
UNET_FLOAT_PREFIXES = ("/conv_in/", "/conv_out/", "/time_embedding/", "/time_proj")
MAX_CHECK_SIZE = 2048  # pixels per side of the check and calibration images


class QuantizeFailed(SdonnxError):
    """Quantization ran but left nothing worth writing."""


@dataclass(frozen=True)
class QuantizeConfig:
    source: Path
    out: Path
    mode: str = "int8"
    force: bool = False
    min_psnr: float | None = None  # default per mode: DEFAULT_MIN_PSNR
    check_prompts: int = 2
    check_steps: int = 10
    calibration_prompts: int = 6
    calibration_steps: int = 10
    size: int | None = None  # check and calibration image side (default: native, at most 256)

    @property
    def psnr_floor(self) -> float:
        return DEFAULT_MIN_PSNR[self.mode] if self.min_psnr is None else self.min_psnr

    def check(self) -> None:
        """InputError naming the first setting out of range (the command line's option names)."""
        check_mode(self.mode)
        if self.min_psnr is not None:
            check_number("--min-psnr", self.min_psnr, 0, 1000)  # identical images score 100 dB
        for name, value, most in (("--check-prompts", self.check_prompts, len(CHECK_PROMPTS)),
                                  ("--calibration-prompts", self.calibration_prompts, len(CALIBRATION_PROMPTS)),
                                  ("--check-steps", self.check_steps, MAX_STEPS),
                                  ("calibration steps", self.calibration_steps, MAX_STEPS),
                                  ("--size", self.size if self.size is not None else 8, MAX_CHECK_SIZE)):
            if not 1 <= value <= most:
                raise InputError(f"{name} must be from 1 to {most}, got {value}")


@dataclass
class PartReport:
    part: str
    precision: str
    psnr: float | None = None
    ssim: float | None = None
    kept_float: bool = False
    bytes: int = 0
    float_nodes: list[str] = field(default_factory=list)

    def as_dict(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k != "part" and v not in (None, [])}


@dataclass
class QuantizeResult:
    out: Path
    seconds: float
    parts: list[PartReport]
    psnr: float
    ssim: float


class Recorder:
    """A part model that remembers the inputs of every call (calibration data, latents)."""

    def __init__(self, model):
        self.model, self.calls = model, []

    def __getattr__(self, name):
        return getattr(self.model, name)

    def run(self, inputs: dict, precision: str | None = None):
        self.calls.append({k: np.array(v) for k, v in inputs.items()})
        return self.model.run(inputs, precision)

    def __call__(self, **inputs):
        return self.run(inputs)


def check_mode(mode: str) -> None:
    if mode not in MODES:
        raise InputError(f"unknown quantization mode {mode!r}; choose one of: {', '.join(MODES)}")
    if mode == "int8-openvino":
        import importlib.util

        missing = [name for name in ("openvino", "nncf") if importlib.util.find_spec(name) is None]
        if missing:
            raise SdonnxError(f"--mode int8-openvino needs {' and '.join(missing)}: {NNCF_INSTALL}")


def _load_onnx(path: Path):
    import onnx

    return onnx.load(str(path))


def _settings(pipe: Pipeline, config: QuantizeConfig) -> dict:
    size = config.size or min(pipe.native_size, 256)
    size = max(pipe.size_multiple, size // pipe.size_multiple * pipe.size_multiple)
    return {"width": size, "height": size}


def _images(pipe: Pipeline, prompts, steps: int, size: dict) -> list[np.ndarray]:
    return [np.asarray(pipe.generate(p, steps=steps, seed=i, **size)[0])
            for i, p in enumerate(prompts)]


def calibration_data(pipe: Pipeline, config: QuantizeConfig) -> list[dict[str, np.ndarray]]:
    """The UNet's inputs over whole sampler trajectories of the float pipeline on real prompts."""
    size = _settings(pipe, config)
    recorder = pipe.unet = Recorder(pipe.unet)
    try:
        for i, prompt in enumerate(CALIBRATION_PROMPTS[:config.calibration_prompts]):
            pipe.generate(prompt, steps=config.calibration_steps, seed=100 + i, **size)
    finally:
        pipe.unet = recorder.model
    return recorder.calls


class _Reader:
    """onnxruntime's CalibrationDataReader protocol over recorded inputs."""

    def __init__(self, calls):
        self.calls = iter(calls)

    def get_next(self):
        return next(self.calls, None)

    def rewind(self):  # pragma: no cover - the MinMax calibrator reads once
        pass


def unet_float_nodes(model) -> list[str]:
    return [n.name for n in model.graph.node
            if n.op_type in ("Conv", "MatMul", "Gemm") and n.name.startswith(UNET_FLOAT_PREFIXES)]


def quantize_unet_int8(source: Path, target: Path, calls: list[dict]) -> list[str]:
    """Static QDQ int8 of the UNet at `source` into `target`; returns the nodes kept in float."""
    import onnx

    model = onnx.load(str(source), load_external_data=False)
    keep = unet_float_nodes(model)
    products = activation_matmuls(model)
    del model
    external = (source.parent / parts.EXTERNAL_DATA_FILE).is_file()
    # onnxruntime logs advice (pre-processing) on the root logger; the run's own log says what
    # happened.
    root = logging.getLogger()
    level, root.level = root.level, logging.ERROR
    try:
        _quantize_static(source, target, calls, keep + products, external)
    finally:
        root.setLevel(level)
    return keep


def activation_matmuls(model) -> list[str]:
    """MatMuls of two activations (attention's Q x K^T and P x V).

    onnxruntime's QDQ quantizer ignores its MatMulConstBOnly option, so they are excluded by
    name. Quantized, they run as u8u8 QLinearMatMul, and the softmax between them becomes a
    QLinearSoftmax that is slower than the float one (profile at SD 1.5 size, 512 px: 4.2 s
    against 2.3 s of a 14 s UNet call), while uint8 attention probabilities cost accuracy.
    """
    constants = {i.name for i in model.graph.initializer}
    constants |= {o for n in model.graph.node if n.op_type == "Constant" for o in n.output}
    return [n.name for n in model.graph.node if n.op_type == "MatMul" and n.input[1] not in constants]


def _quantize_static(source: Path, target: Path, calls: list[dict], keep: list[str], external: bool) -> None:
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    quantize_static(
        str(source), str(target), _Reader(calls),
        quant_format=QuantFormat.QDQ,
        op_types_to_quantize=["Conv", "MatMul", "Gemm"],
        per_channel=True,
        activation_type=QuantType.QUInt8,
        weight_type=QuantType.QInt8,
        nodes_to_exclude=keep,
        calibrate_method=CalibrationMethod.MinMax,
        use_external_data_format=external,
        extra_options={
            # No CalibMaxIntermediateOutputs: onnxruntime 1.32's calibrator, on reaching that
            # count, clears what it collected instead of reducing it to ranges, so with 16 only
            # the last (calls mod 16) calls calibrated and a multiple of 16 failed ("No data is
            # collected"). What it keeps per call is one min and one max per tensor (its
            # augmented model reduces them in the graph), a few kB.
            "WeightSymmetric": True,
            "ActivationSymmetric": False,
        },
    )


def _weighted_matmuls(model) -> list[str]:
    """OpenVINO MatMuls with a constant operand (through Convert/Reshape), as optimum-intel finds them."""
    def constant(node) -> bool:
        while node.get_type_name() in ("Convert", "Reshape", "FakeQuantize"):
            node = node.input_value(0).get_node()
        return node.get_type_name() == "Constant"

    return [op.get_friendly_name() for op in model.get_ops() if op.get_type_name() == "MatMul"
            and any(constant(op.input_value(i).get_node()) for i in (0, 1))]


def quantize_openvino(part: parts.Part, source: Path, target: Path, calls: list[dict] | None) -> list[str]:
    """NNCF int8 of one ONNX part into OpenVINO IR at `target`; returns the UNet's float nodes."""
    import nncf
    import openvino as ov

    nncf.set_log_level(logging.ERROR)  # its tables and progress bars; the run's log says what happened
    model = ov.Core().read_model(str(source))
    keep: list[str] = []
    if part is parts.UNET:
        weighted = _weighted_matmuls(model)
        # OpenVINO names the ONNX Conv/Gemm's product ".../Conv/WithoutBiases" and so on.
        keep = [op.get_friendly_name() for op in model.get_ops()
                if op.get_type_name() in ("Convolution", "MatMul")
                and op.get_friendly_name().startswith(UNET_FLOAT_PREFIXES)]
        model = nncf.compress_weights(model, mode=nncf.CompressWeightsMode.INT8_ASYM,
                                      ignored_scope=nncf.IgnoredScope(types=["Convolution"]))
        advanced = nncf.AdvancedQuantizationParameters()
        advanced.smooth_quant_alphas.matmul = -1
        model = nncf.quantize(
            model, nncf.Dataset(calls), subset_size=len(calls), model_type=nncf.ModelType.TRANSFORMER,
            fast_bias_correction=True, advanced_parameters=advanced,
            ignored_scope=nncf.IgnoredScope(names=weighted + keep, validate=False),
        )
    else:
        model = nncf.compress_weights(model, mode=nncf.CompressWeightsMode.INT8_ASYM)
    ov.save_model(model, str(target), compress_to_fp16=False)
    return sorted(keep)


def _quantize_part(part: parts.Part, source: Path, tmp: Path, config: QuantizeConfig,
                   calls: list[dict] | None, log) -> PartReport:
    report = _quantize_weights(part, source, tmp, config, calls, log)
    if part in (parts.VAE_DECODER, parts.VAE_ENCODER) and (tmp / part.onnx_path).is_file():
        vae_stages.try_write_stages(tmp / part.onnx_path, log)  # the copied ones point into the old weights
    if part is parts.UNET:
        unet_stages.remove_stages(tmp / part.name)  # (IR has none: int8-openvino loads it whole)
        deep_cache.remove_deep_cache(tmp / part.name)
        if (tmp / part.onnx_path).is_file():
            unet_stages.try_write_stages(tmp / part.onnx_path, log)
            deep_cache.try_write_deep_cache(tmp / part.onnx_path, log)
    return report


def _quantize_weights(part: parts.Part, source: Path, tmp: Path, config: QuantizeConfig,
                      calls: list[dict] | None, log) -> PartReport:
    src, dst = source / part.onnx_path, tmp / part.onnx_path
    if config.mode == "fp16":
        model = _load_onnx(src)
        weights.to_fp16(model)
        weights.save_part(model, dst)
        weights.write_weight_map(dst)
        return PartReport(part.name, "fp16 weights")
    if config.mode == "int8-openvino":
        keep = quantize_openvino(part, src, tmp / part.ir_path, calls)
        for stale in dst.parent.glob("model.onnx*"):
            stale.unlink()
        vae_stages.remove_stages(dst.parent)  # (they run the ONNX file)
        kind = "int8 weights and activations" if part is parts.UNET else "int8 weights"
        return PartReport(part.name, kind, float_nodes=keep)
    if part is parts.UNET:
        with tempfile.TemporaryDirectory(dir=tmp) as scratch:
            staged = Path(scratch) / parts.ONNX_FILE
            keep = quantize_unet_int8(src, staged, calls)
            weights.save_part(_load_onnx(staged), dst)
        return PartReport(part.name, "int8 weights and activations", float_nodes=keep)
    model = _load_onnx(src)
    done = weights.to_int8_weights(model)
    weights.save_part(model, dst)
    log(f"  {part.name}: int8 weights for {len(done)} nodes")
    return PartReport(part.name, "int8 weights")


def _part_model(path: Path, part: parts.Part):
    """ONNX files run in ONNX Runtime's CPU provider, IR in OpenVINO (fp32 arithmetic)."""
    if path.name == parts.IR_FILE:
        from sdonnx.runtime.openvino_model import OpenVinoModel

        return OpenVinoModel(path, part, "fp32")
    return OnnxModel(path, part, "cpu")


class Doctor:
    """Float reference images and latents, then each quantized part measured alone."""

    def __init__(self, source: Path, config: QuantizeConfig):
        self.config = config
        self.pipe = Pipeline.load(source, provider="cpu")
        self.size = _settings(self.pipe, config)
        self.prompts = CHECK_PROMPTS[:config.check_prompts]
        decoder = self.pipe.vae_decoder = Recorder(self.pipe.vae_decoder)
        self.reference = self.images()
        self.latents = [call["latent_sample"] for call in decoder.calls]
        self.pipe.vae_decoder = decoder.model

    def images(self) -> list[np.ndarray]:
        return _images(self.pipe, self.prompts, self.config.check_steps, self.size)

    def measure(self, part: parts.Part, path: Path) -> tuple[float, float]:
        """PSNR and SSIM of the images with `part` loaded from `path`, the others float.

        The VAE decoder decodes the float run's final latents; the VAE encoder is measured by a
        round trip of the reference images against the float encoder's round trip.
        """
        original = getattr(self.pipe, part.name)
        reference = self._round_trip() if part is parts.VAE_ENCODER else self.reference
        setattr(self.pipe, part.name, _part_model(path, part))
        try:
            if part is parts.VAE_DECODER:
                images = [self._decode(latent) for latent in self.latents]
            elif part is parts.VAE_ENCODER:
                images = self._round_trip()
            else:
                images = self.images()
        finally:
            setattr(self.pipe, part.name, original)
        return compare(reference, images)

    def measure_all(self, folder: Path) -> tuple[float, float]:
        provider = "openvino" if parts.ir_parts(folder) else "cpu"
        pipe = Pipeline.load(folder, provider=provider, precision="fp32")
        return compare(self.reference, _images(pipe, self.prompts, self.config.check_steps, self.size))

    def _decode(self, latent: np.ndarray) -> np.ndarray:
        out = self.pipe.vae_decoder(latent_sample=latent)[parts.VAE_DECODER.output][0]
        return (np.clip(out.transpose(1, 2, 0) / 2 + 0.5, 0, 1) * 255).round().astype(np.uint8)

    def _round_trip(self) -> list[np.ndarray]:
        images = []
        for image in self.reference:
            pixels = image.astype(np.float32).transpose(2, 0, 1)[None] / 127.5 - 1.0
            latent = self.pipe.encode_image(pixels) / self.pipe.vae_scaling_factor
            images.append(self._decode(latent.astype(np.float32)))
        return images


def quantize(config: QuantizeConfig, log: Callable[[str], None] = lambda msg: None) -> QuantizeResult:
    """Quantize `config.source` into `config.out`; nothing appears at OUT unless the check ran."""
    config.check()
    source, out = config.source, config.out
    check_model_folder(source)
    if source.resolve() == out.resolve():
        raise InputError("OUT must be a new folder, not the source folder itself")
    check_out(out, config.force)
    start = time.perf_counter()
    with staged_folder(out) as tmp:
        shutil.copytree(source, tmp)
        return _quantize_into(tmp, config, start, log)


def _quantize_into(tmp: Path, config: QuantizeConfig, start: float, log) -> QuantizeResult:
    source = config.source
    present = [p for p in parts.PARTS if (source / p.onnx_path).is_file()]
    log(f"checking against the float model: {config.check_prompts} prompts x {config.check_steps} steps")
    doctor = Doctor(source, config)
    calls = None
    if config.mode.startswith("int8"):
        log(f"calibrating: {config.calibration_prompts} prompts x {config.calibration_steps} steps")
        calls = calibration_data(doctor.pipe, config)
    reports = []
    for part in present:
        log(f"quantizing {part.name} ({config.mode})")
        report = _quantize_part(part, source, tmp, config, calls, log)
        report.psnr, report.ssim = doctor.measure(part, part.file(tmp))
        if report.psnr < config.psnr_floor:
            log(f"  {part.name}: PSNR {report.psnr:.1f} dB < {config.psnr_floor:g}: kept in float")
            shutil.rmtree(tmp / part.name)
            shutil.copytree(source / part.name, tmp / part.name)
            report.kept_float, report.precision = True, "fp32"
        else:
            log(f"  {part.name}: PSNR {report.psnr:.1f} dB, SSIM {report.ssim:.3f}")
        if config.mode != "fp16" and not report.kept_float:  # int8 weights: no LoRAs (runtime/adapters.py)
            (tmp / part.name / WEIGHT_MAP_FILE).unlink(missing_ok=True)
        report.bytes = folder_bytes(tmp / part.name)
        reports.append(report)
    if all(r.kept_float for r in reports):
        raise QuantizeFailed(
            f"every part lost more than the {config.psnr_floor:g} dB floor to {config.mode}; nothing "
            "was written. Lower --min-psnr to accept it, or keep the float model."
        )
    psnr, ssim = doctor.measure_all(tmp)
    log(f"whole model: PSNR {psnr:.1f} dB, SSIM {ssim:.3f}")
    seconds = time.perf_counter() - start
    _record(tmp, config, reports, psnr, ssim, seconds, doctor)
    return QuantizeResult(config.out, seconds, reports, psnr, ssim)


def _record(tmp: Path, config: QuantizeConfig, reports: list[PartReport], psnr: float, ssim: float,
            seconds: float, doctor: Doctor) -> None:
    record_file = tmp / parts.RECORD
    record = json.loads(record_file.read_text()) if record_file.is_file() else {"format": 1, "parts": {}}
    for report in reports:
        entry = record.setdefault("parts", {}).setdefault(report.part, {})
        entry["precision"] = report.precision
        if not report.kept_float:
            entry.pop("parity", None)  # the float export's check, no longer this file's
        entry["bytes"] = report.bytes
        entry["external_data"] = (tmp / report.part / parts.EXTERNAL_DATA_FILE).is_file()
        entry["format"] = "openvino" if (tmp / report.part / parts.IR_FILE).is_file() else "onnx"
    record["quantization"] = {
        "mode": config.mode,
        "source": str(config.source.resolve()),
        "min_psnr": config.psnr_floor,
        "check": {"prompts": list(doctor.prompts), "seeds": list(range(len(doctor.prompts))),
                  "steps": config.check_steps, "size": doctor.size["width"], "sampler": "euler"},
        "calibration": ({"prompts": config.calibration_prompts, "steps": config.calibration_steps}
                        if config.mode.startswith("int8") else None),
        "parts": {r.part: r.as_dict() for r in reports},
        "psnr": round(psnr, 2),
        "ssim": round(ssim, 4),
        "seconds": round(seconds, 1),
    }
    record_file.write_text(json.dumps(record, indent=2) + "\n")
