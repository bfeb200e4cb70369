"""A readable summary of a model folder: parts, inputs, precision, size on disk."""

from __future__ import annotations

from pathlib import Path

import onnxruntime as ort

from sdonnx.runtime import parts, providers
from sdonnx.runtime.errors import ModelFolderError, install_hint
from sdonnx.runtime.pipeline import check_model_folder, image_sizes
from sdonnx.runtime.schedules import SchedulerConfig

_PRECISION = {"tensor(float)": "fp32", "tensor(float16)": "fp16", "tensor(bfloat16)": "bf16"}


def folder_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())


def _human(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError


def describe(path: Path) -> str:
    """What `sdonnx info` prints: where the folder came from, its parts and their precision."""
    check_model_folder(path)
    record_file = path / parts.RECORD
    return _describe(path, _checked_record(record_file))


def _checked_record(record_file: Path) -> dict:
    """sdonnx.json ({} when absent), or a ModelFolderError when a field `info` reads is not as
    sdonnx writes it."""
    record = parts.read_json(record_file)
    bad = [key for key in ("source", "defaults", "parts", "quantization")
           if key in record and not isinstance(record[key], dict)]
    if not bad:
        bad = [f"parts.{name}" for name, entry in record.get("parts", {}).items() if not isinstance(entry, dict)]
        quantization = record.get("quantization", {})
        bad += [f"quantization.{key}" for key in ("mode", "source", "check", "psnr", "ssim", "min_psnr", "parts")
                if quantization and key not in quantization]
    if bad:
        raise ModelFolderError(f"{record_file}: {', '.join(bad)} not as sdonnx writes it; "
                               "export or quantize the model again")
    return record


def _describe(path: Path, record: dict) -> str:
    scheduler = SchedulerConfig.from_file(path / parts.SCHEDULER_CONFIG)
    lines = [f"model folder: {path.resolve()}"]
    if record:
        source = record.get("source", {})
        lines.append(f"made by: sdonnx from {source.get('path', '?')} (opset {record.get('opset')}, "
                     f"{record.get('created', '?')})")
        if source.get("format") == "single-file":
            lines.append(f"single file: {source.get('description', '?')}"
                         + (" (its EMA weights)" if source.get("ema") else "")
                         + (f", VAE from {source['vae']}" if source.get("vae") else ""))
    else:
        lines.append("made by: another exporter (no sdonnx.json)")
    lines.append(f"prediction: {scheduler.prediction_type}, beta schedule {scheduler.beta_schedule}, "
                 f"{scheduler.num_train_timesteps} training timesteps")
    native, multiple = image_sizes(path)
    lines.append(f"size: {native}x{native} native; width and height in multiples of {multiple} pixels")
    if record.get("defaults"):
        lines.append("recommended: " + ", ".join(f"{k} {v}" for k, v in record["defaults"].items())
                     + " (used when a generation does not say)")
    total = 0
    for part in parts.PARTS + tuple(p for p in (*parts.TINY_PARTS, parts.SAFETY_CHECKER, parts.DEPTH_ESTIMATOR)
                                    if p.file(path)):
        model_file = part.file(path)
        if model_file is None:
            lines.append(f"{part.name}: absent")
            continue
        size = folder_bytes(model_file.parent)
        total += size
        inputs, outputs = _signature(part, model_file)
        recorded = record.get("parts", {}).get(part.name, {})
        # The text encoder's input is token ids; its output type tells its precision.
        tensor = outputs[0] if part is parts.TEXT_ENCODER else inputs[0]
        precision = recorded.get("precision") or _PRECISION.get(tensor[1], "fp32")
        form = " (OpenVINO IR)" if model_file.name == parts.IR_FILE else ""
        lines.append(f"{part.name}: {precision}{form}, {_human(size)}")
        lines += [f"    in  {name}: {kind} {shape}" for name, kind, shape in inputs]
        lines += [f"    out {name}: {kind} {shape}" for name, kind, shape in outputs]
        if "parity" in recorded:
            lines.append(f"    parity vs torch: max abs diff {recorded['parity']['max_abs_diff']:.2e}")
        if part in (parts.UNET, parts.TEXT_ENCODER):
            lines.append("    LoRAs/embeddings: " + _adapter_support(model_file, recorded))
        if part in (parts.VAE_DECODER, parts.VAE_ENCODER):
            lines.append("    tiles: " + _tiling(model_file.parent))
        if part is parts.UNET:
            lines.append("    --low-memory: " + _unet_stages(model_file))
            lines.append("    --cache-interval: " + _deep_cache(model_file))
        checked = record.get("quantization", {}).get("parts", {}).get(part.name)
        if checked:
            verdict = " -> kept in fp32" if checked.get("kept_float") else ""
            lines.append(f"    {record['quantization']['mode']} check: PSNR {checked['psnr']:.1f} dB, "
                         f"SSIM {checked['ssim']:.3f}{verdict}")
            if checked.get("float_nodes"):
                lines.append(f"    kept float: {', '.join(checked['float_nodes'])}")
    lines.append(f"total: {_human(total)}")
    if "quantization" in record:
        q = record["quantization"]
        check = q["check"]
        lines.append(f"quantized: {q['mode']} from {q['source']}; against it on {len(check['prompts'])} "
                     f"prompts x {check['steps']} steps at {check['size']} px: PSNR {q['psnr']:.1f} dB, "
                     f"SSIM {q['ssim']:.3f} (parts below {q['min_psnr']:g} dB stay fp32)")
    lines.append(runtime_choice())
    return "\n".join(lines)


def _tiling(folder: Path) -> str:
    """How a VAE part decodes or encodes in pieces (runtime/vae.py): through its stages, or in
    blended tiles, and why."""
    from sdonnx.runtime.vae import StagedVae

    try:
        plan = StagedVae.read_plan(folder)
    except ModelFolderError:
        return f"blended ({parts.VAE_STAGES} is damaged: export again for stages)"
    if plan is not None:
        return f"{len(plan['stages'])} stages, the one-piece picture"
    if (folder / parts.VAE_STAGES).is_file():
        return "blended (its stages were cut from other weights: export again)"
    return "blended, as diffusers' enable_tiling() (no stages: export with sdonnx for them)"


def _unet_stages(model_file: Path) -> str:
    """How low_memory runs the UNet (runtime/unet_stages.py): its stages one at a time, or whole."""
    from sdonnx.runtime.unet_stages import read_plan

    plan = read_plan(model_file.parent) if model_file.name == parts.ONNX_FILE else None
    if plan is not None:
        largest = max((stage.get("weight_bytes", 0) for stage in plan["stages"]), default=0)
        return (f"{len(plan['stages'])} stages of at most {_human(largest)} of weights, loaded one at a time "
                "(on cpu with a cache folder, without LoRAs)")
    if (model_file.parent / parts.UNET_STAGES).is_file():
        return ("the whole UNet (its stage plan is damaged or was cut from another graph: export or "
                "quantize again)")
    return "the whole UNet (no stages: it fits in one, or was not exported by this sdonnx)"


def _deep_cache(model_file: Path) -> str:
    """Whether --cache-interval can run on this UNet (runtime/deep_cache.py), and its shallow share."""
    from sdonnx.runtime.deep_cache import read_plan

    plan = read_plan(model_file.parent) if model_file.name == parts.ONNX_FILE else None
    if plan is not None:
        share = plan.get("shallow_weight_bytes", 0) / max(plan.get("weight_bytes", 1), 1)
        return f"yes (DeepCache graphs; the shallow branch holds {share:.1%} of the weights)"
    if (model_file.parent / parts.DEEP_CACHE_PLAN).is_file():
        return "no (its DeepCache plan is damaged or was cut from another graph: export or quantize again)"
    return "no (no DeepCache graphs: export or quantize with this sdonnx)"


def _adapter_support(model_file: Path, recorded: dict) -> str:
    """Whether LoRAs (and embeddings) can patch this part, and through what (runtime/adapters.py)."""
    from sdonnx.runtime.adapters import WEIGHT_MAP_FILE

    if model_file.name == parts.IR_FILE or "int8" in str(recorded.get("precision", "")):
        return "no (int8 weights; use the float folder)"
    if (model_file.parent / WEIGHT_MAP_FILE).is_file():
        return f"yes ({WEIGHT_MAP_FILE})"
    return "yes, the weight map derived from the graph at first use (needs the onnx package)"


def _signature(part: parts.Part, model_file: Path) -> tuple[list[tuple], list[tuple]]:
    """(name, type, shape) of a part's inputs and outputs, read without compiling it."""
    if model_file.name == parts.IR_FILE:
        try:
            import openvino as ov
        except ImportError:
            raise ModelFolderError(f"{model_file} is OpenVINO IR: {install_hint('openvino')} to read it") from None
        model = ov.Core().read_model(str(model_file))
        return tuple([(port.get_any_name(), f"tensor({port.get_element_type().get_type_name()})",
                       str(port.get_partial_shape())) for port in ports]
                     for ports in (model.inputs, model.outputs))
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    try:
        session = ort.InferenceSession(str(model_file), options, providers=["CPUExecutionProvider"])
    except Exception as e:
        raise ModelFolderError(f"{part.name}: cannot load {model_file}: {e}") from e
    return tuple([(t.name, t.type, t.shape) for t in tensors]
                 for tensors in (session.get_inputs(), session.get_outputs()))


def runtime_choice() -> str:
    """Which providers this machine has, and what `auto` would run with."""
    available = [name for name, p in providers.PROVIDERS.items() if p.available()]
    chosen = providers.resolve("auto")
    precision = providers.resolve_precision(chosen, "auto")
    bf16 = "yes" if providers.cpu_has_bf16() else "no"
    return (f"providers here: {', '.join(available)}; auto runs {chosen} in {precision} "
            f"(CPU computes bf16: {bf16})")
