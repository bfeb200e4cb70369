"""Diffusers folder -> ONNX model folder, checked against torch, written atomically.

optimum's exporter writes the parts in the layout `optimum-cli export onnx` uses; sdonnx then
runs each part in torch and in ONNX Runtime on the same inputs, refuses an export whose parts
disagree, records how the folder was made in `sdonnx.json`, and only then renames the
temporary folder into place.
"""

from __future__ import annotations

import gc
import glob
import importlib.util
import json
import os
import re
import shutil
import signal
import struct
import sys
import threading
import time
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Callable, Iterator

from sdonnx.export.attention import fuse_attention
from sdonnx.export.parity import PartParity, check_parts
from sdonnx.export.torch_memory import weights_released_after_export
from sdonnx.runtime import parts
from sdonnx.runtime.pipeline import LCM_DEFAULTS, Defaults
from sdonnx.runtime.schedules import PREDICTION_TYPES
from sdonnx.runtime.info import folder_bytes
from sdonnx.runtime.memory import trim_heap
from sdonnx.runtime.errors import InputError, ModelFolderError, SdonnxError, install_hint

# What a diffusers Stable Diffusion folder must hold for an export.
SOURCE_FILES = (
    "model_index.json",
    "text_encoder/config.json",
    "unet/config.json",
    "vae/config.json",
    "tokenizer/vocab.json",
    "tokenizer/merges.txt",
    "scheduler/scheduler_config.json",
)
WEIGHT_NAMES = ("model.safetensors", "diffusion_pytorch_model.safetensors",
                "pytorch_model.bin", "diffusion_pytorch_model.bin")
SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth")
SAFETENSORS_MAX_HEADER = 100 * 2**20  # bytes; the safetensors format's own limit
VERSIONED = ("torch", "diffusers", "transformers", "optimum-onnx", "onnx", "onnxruntime")
# Modules of the `export` extra; the base install (the runtime) has none of them.
EXPORT_MODULES = ("torch", "diffusers", "transformers", "optimum.exporters.onnx", "onnx")


class ExportFailed(SdonnxError):
    """The export ran but its result did not pass the checks."""


@dataclass(frozen=True)
class ExportConfig:
    source: Path
    out: Path
    force: bool = False
    opset: int | None = None
    check: bool = True
    # Recommended generation settings recorded for the runtime (runtime.pipeline.Defaults).
    defaults: dict = field(default_factory=dict)
    # Single-file sources (export/checkpoints.py): a diffusers folder of configs for families
    # sdonnx does not bundle, a separate VAE file, and the EMA copy instead of the weights.
    config: Path | None = None
    vae: Path | None = None
    extract_ema: bool = False
    # Diffusers folders: the weight variant to read ("fp16": model.fp16.safetensors ...); None
    # takes the plain files, or the fp16 ones when a folder has only those.
    variant: str | None = None
    # SD 2.x single files: what their weights cannot say (else a .yaml beside, else v at 768 px).
    prediction_type: str | None = None
    image_size: int | None = None


@dataclass
class ExportResult:
    out: Path
    seconds: float
    parity: list[PartParity] = field(default_factory=list)


def check_export_extra() -> None:
    def installed(name: str) -> bool:
        try:
            return importlib.util.find_spec(name) is not None
        except ImportError:  # a parent package is missing
            return False

    missing = [name.split(".")[0] for name in EXPORT_MODULES if not installed(name)]
    if missing:
        raise SdonnxError(
            f"the export stage needs {', '.join(missing)}, which the base install leaves out: "
            + install_hint("export")
        )


def weight_names(variant: str | None = None) -> list[str]:
    """The weight file names of a diffusers part folder: plain (model.safetensors ...) or of a
    variant (model.fp16.safetensors ... as hubs offer them)."""
    return [w.replace(".", f".{variant}.", 1) for w in WEIGHT_NAMES] if variant else list(WEIGHT_NAMES)


def weight_files(part: Path, variant: str | None = None) -> list[Path]:
    """The weight files a diffusers part folder holds (see weight_names)."""
    return [part / name for name in weight_names(variant) if (part / name).is_file()]


def only_variant(source: Path) -> str | None:
    """"fp16" when a diffusers folder holds only fp16-variant weights (nothing plain), else None."""
    folders = [source / sub for sub in ("text_encoder", "unet", "vae") if (source / sub).is_dir()]
    if folders and all(not weight_files(f) and weight_files(f, "fp16") for f in folders):
        return "fp16"
    return None


def fast_tokenizer_only(source: Path) -> bool:
    """Whether the folder's tokenizer is a tokenizer.json alone (no vocab.json / merges.txt)."""
    tokenizer = source / "tokenizer"
    return (tokenizer / "tokenizer.json").is_file() and not (
        (tokenizer / "vocab.json").is_file() and (tokenizer / "merges.txt").is_file())


def check_source(source: Path, variant: str | None = None) -> None:
    """Fail naming what is missing before any heavy work starts."""
    if not source.exists():
        raise ModelFolderError(f"source not found: {source}")
    if not source.is_dir():
        raise ModelFolderError(
            f"{source} is neither a diffusers-format folder (model_index.json, unet/, vae/, text_encoder/, "
            f"tokenizer/, scheduler/) nor a single-file checkpoint ({', '.join(SINGLE_FILE_SUFFIXES)})"
        )
    missing = [name for name in SOURCE_FILES if not (source / name).is_file()
               and not (name.startswith("tokenizer/") and fast_tokenizer_only(source))]
    for sub in ("text_encoder", "unet", "vae"):
        if (source / sub).is_dir() and not weight_files(source / sub, variant):
            missing.append(f"{sub}/ weights ({' or '.join(weight_names(variant)[:2])})")
    if missing:
        raise ModelFolderError(
            f"{source} is not a complete diffusers Stable Diffusion folder; missing: "
            + ", ".join(missing)
        )
    for name in SOURCE_FILES:
        if name.endswith(".json"):
            parts.read_json(source / name)
    for weights in sorted(source.glob("*/*.safetensors")):
        check_safetensors(weights)


def check_safetensors(path: Path) -> dict:
    """The JSON header of `path` ({name: {"dtype", "shape", "data_offsets"}, ...}), or a
    ModelFolderError unless it is a whole safetensors file: an 8-byte little-endian header
    length, a JSON header, then exactly the bytes its tensors' offsets cover (a download cut
    short fails here, before torch reads it)."""
    size = path.stat().st_size
    try:
        with open(path, "rb") as f:
            (length,) = struct.unpack("<Q", f.read(8))
            if not 2 <= length <= min(size - 8, SAFETENSORS_MAX_HEADER):
                raise ValueError(f"a header of {length} bytes in a file of {size}")
            header = json.loads(f.read(length))
        if not isinstance(header, dict):
            raise ValueError("the header is not a JSON object")
        offsets = [t["data_offsets"] for k, t in header.items() if k != "__metadata__"]
        if not all(isinstance(o, list) and len(o) == 2 and all(type(v) is int for v in o) for o in offsets):
            raise ValueError("a tensor's data_offsets are not two integers")
        end = max((o[1] for o in offsets), default=0)
    except (struct.error, ValueError, KeyError, TypeError, UnicodeDecodeError) as e:
        raise ModelFolderError(f"{path} is not a readable safetensors file ({e}); download it again") from None
    if size != 8 + length + end:
        raise ModelFolderError(f"{path} is truncated or damaged: its header describes {8 + length + end:,} bytes, "
                               f"the file has {size:,}; download it again")
    return header


def check_out(out: Path, force: bool) -> None:
    if out.exists() and not force:
        raise InputError(f"{out} already exists; choose another OUT or pass --force to replace it")
    if out.exists() and not out.is_dir():
        raise InputError(f"{out} exists and is not a folder; it will not be replaced")
    parent = out.parent if str(out.parent) else Path(".")
    if not parent.is_dir():
        raise InputError(f"the folder {parent} does not exist; create it first")
    if not os.access(parent, os.W_OK):
        raise InputError(f"cannot write in {parent} (permission denied)")


def _versions() -> dict[str, str]:
    out = {}
    for name in VERSIONED:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return out


def _opset(path: Path) -> int | None:
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)


def quiet_libraries() -> None:
    """Keep diffusers/transformers loading chatter (accelerate hints, tracer notes) off the console."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    diffusers_logging.set_verbosity_error()
    diffusers_logging.disable_progress_bar()
    transformers_logging.set_verbosity_error()


def _run_optimum(source: Path, tmp: Path, opset: int | None) -> None:
    from optimum.exporters.onnx import main_export

    with warnings.catch_warnings(), weights_released_after_export():
        warnings.simplefilter("ignore")
        main_export(
            str(source),
            str(tmp),
            task="text-to-image",
            opset=opset,
            library_name="diffusers",
            local_files_only=True,
            # sdonnx runs its own, stricter check below and records the figures.
            do_validation=False,
        )
    gc.collect()  # the pipeline optimum loaded holds reference cycles
    trim_heap()


def _recommended(folder: Path, given: dict) -> dict:
    """The settings recorded as the model's defaults: those given, over LCM_DEFAULTS for a
    UNet with a guidance-embedding input (time_cond_proj_dim)."""
    unet_config = parts.read_json(folder / parts.UNET.name / "config.json")
    return {**(LCM_DEFAULTS if unet_config.get("time_cond_proj_dim") else {}), **given}


def _write_record(tmp: Path, config: ExportConfig, seconds: float, parity: list[PartParity],
                  source_record: dict | None = None, fused: dict[str, int] | None = None,
                  mapped: dict[str, int] | None = None, extra_parity: dict[str, dict] | None = None) -> None:
    by_part = {p.part: p.as_dict() for p in parity} | (extra_parity or {})
    record = {
        "format": 1,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "source": source_record or {"path": str(config.source.resolve()), "format": "diffusers"},
        "opset": _opset(tmp / parts.UNET.onnx_path),
        "versions": {"sdonnx": "0.1.0", **_versions()},
        "export_seconds": round(seconds, 1),
        **({"defaults": defaults} if (defaults := _recommended(tmp, config.defaults)) else {}),
        "parts": {
            part.name: {
                "precision": "fp32",
                "bytes": folder_bytes(tmp / part.name),
                "external_data": (tmp / part.name / parts.EXTERNAL_DATA_FILE).is_file(),
                "fused_attention": (fused or {}).get(part.name, 0),
                **({"weight_map": mapped[part.name]} if part.name in (mapped or {}) else {}),
                **({"parity": by_part[part.name]} if part.name in by_part else {}),
            }
            for part in (*parts.PARTS, parts.SAFETY_CHECKER, parts.DEPTH_ESTIMATOR)
            if (tmp / part.onnx_path).is_file()
        },
    }
    (tmp / parts.RECORD).write_text(json.dumps(record, indent=2) + "\n")


def _swap_into_place(tmp: Path, out: Path) -> None:
    """Rename the finished folder to OUT; a replaced OUT is removed only after that."""
    old = out.with_name(f".{out.name}.sdonnx-old-{os.getpid()}")
    if out.exists():
        out.rename(old)
    tmp.rename(out)
    if old.exists():
        shutil.rmtree(old)


@contextmanager
def _interruptible():
    """Turn SIGINT/SIGTERM into KeyboardInterrupt, and remember them.

    Torch's exporter and the libraries it loads run finalizers and C code in which a
    KeyboardInterrupt can be swallowed ("Exception ignored in ..."), so the flag is checked
    again before anything is renamed; Python's report of such a swallowed interrupt (a
    traceback on stderr, from a `regex` object's __del__ for instance) is left out, since the
    interrupt is not lost: the flag holds it.
    """
    received: list[int] = []
    if threading.current_thread() is not threading.main_thread():
        yield received
        return

    def handler(signum, frame):
        received.append(signum)
        raise KeyboardInterrupt

    def unraisable(report) -> None:
        if not (received and isinstance(report.exc_value, KeyboardInterrupt)):
            hook(report)

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    hook, sys.unraisablehook = sys.unraisablehook, unraisable
    try:
        yield received
    finally:
        sys.unraisablehook = hook
        for sig, old in previous.items():
            signal.signal(sig, old)


def _sweep_stale(out: Path) -> None:
    """Remove what killed runs left beside OUT (.OUT.sdonnx-tmp-PID...): their process is gone."""
    prefix = f".{out.name}.sdonnx-tmp-"
    for left in out.parent.glob(glob.escape(prefix) + "*"):
        pid = left.name[len(prefix):].split("-")[0]
        if not pid.isdigit():
            continue
        if int(pid) != os.getpid():
            try:
                os.kill(int(pid), 0)
                continue  # another export of the same OUT is running
            except ProcessLookupError:
                pass
            except PermissionError:
                continue
        shutil.rmtree(left, ignore_errors=True)


@contextmanager
def staged_folder(out: Path) -> Iterator[Path]:
    """A temporary path beside OUT (not yet created) that becomes OUT when the block ends.

    On any exception, SIGINT or SIGTERM the temporary folder is removed and OUT is untouched; a
    replaced OUT is removed only after the new one is in place.
    """
    tmp = out.with_name(f".{out.name}.sdonnx-tmp-{os.getpid()}")
    _sweep_stale(out)
    with _interruptible() as interrupted:
        try:
            yield tmp
            if interrupted:
                raise KeyboardInterrupt
            _swap_into_place(tmp, out)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise


def export(config: ExportConfig, log: Callable[[str], None] = lambda msg: None) -> ExportResult:
    """Export `config.source` to `config.out`; nothing appears at OUT unless all checks pass."""
    source, out = config.source, config.out
    Defaults.checked(config.defaults)  # refuse what the runtime would refuse, before any work
    if config.prediction_type not in (None, *PREDICTION_TYPES):
        raise InputError(f"--prediction-type must be one of {', '.join(PREDICTION_TYPES)}, "
                         f"got {config.prediction_type!r}")
    if config.variant is not None and not re.fullmatch(r"\w+", config.variant):
        raise InputError(f"--variant must name a weight variant such as fp16, got {config.variant!r}")
    if config.vae is not None and not config.vae.is_file():
        raise InputError(f"--vae {config.vae}: no such file")
    if config.config is not None and not (config.config / "unet" / "config.json").is_file():
        raise InputError(f"--config {config.config} is not a diffusers folder of configs (unet/config.json missing)")
    if not source.exists():
        raise ModelFolderError(f"source not found: {source}")
    check_export_extra()
    single_file = source.is_file() and source.suffix.lower() in SINGLE_FILE_SUFFIXES
    variant = None
    if single_file and config.variant:
        raise InputError("--variant applies to diffusers folders; a single file holds one set of weights")
    if not single_file:
        if config.config or config.vae or config.extract_ema or config.prediction_type or config.image_size:
            raise InputError("--config, --vae, --extract-ema, --prediction-type and --image-size apply to "
                             "single-file checkpoints (.safetensors, .ckpt), not to a diffusers folder")
        variant = config.variant or (only_variant(source) if source.is_dir() else None)
        check_source(source, variant)
    check_out(out, config.force)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    quiet_libraries()
    start = time.perf_counter()
    with staged_folder(out) as tmp:
        if not single_file and variant is None and not fast_tokenizer_only(source):
            return _export_into(tmp, config, start, log)
        from sdonnx.export import checkpoints

        # optimum reads plain diffusers folders: convert into one beside OUT first (float32).
        converted = tmp.with_name(tmp.name + "-diffusers")
        try:
            record = checkpoints.prepare(config, single_file, variant, converted, log)
            return _export_into(tmp, replace(config, source=converted), start, log, record)
        finally:
            shutil.rmtree(converted, ignore_errors=True)


def _torch_weights(folder: Path) -> Path | None:
    """A source part's fp32 weights file (the one a weight map is checked against), if it has one."""
    for name in ("diffusion_pytorch_model.safetensors", "model.safetensors"):
        if (folder / name).is_file():
            return folder / name
    return None


def _export_into(tmp: Path, config: ExportConfig, start: float, log: Callable[[str], None],
                 source_record: dict | None = None) -> ExportResult:
    """Export, check and record into `tmp` (renamed to OUT by `staged_folder`)."""
    source, out = config.source, config.out
    extra_parity: dict[str, dict] = {}  # optional parts exported and checked by their own module
    gc.collect()  # what converting a single file left in reference cycles, before the peak
    trim_heap()
    from sdonnx.export import upscaler
    from sdonnx.runtime.upscale import is_upscaler

    upscale = is_upscaler(source)  # (its model_index.json names the pipeline, in the source as in the export)
    if upscale:  # optimum has no exporter for it; check_upscaler checks its parts below
        log(f"exporting the x4 upscaler {source} with torch's ONNX exporter")
        upscaler.export_upscaler(source, tmp, config.opset, log)
    else:
        log(f"exporting {source} with optimum's ONNX exporter")
        _run_optimum(source, tmp, config.opset)
    missing = [p.onnx_path for p in parts.PARTS if p.required and not (tmp / p.onnx_path).is_file()]
    if missing:
        raise ExportFailed(f"the exporter did not write {', '.join(missing)}")
    fused = {part.name: fuse_attention(tmp / part.onnx_path) for part in parts.PARTS if (tmp / part.onnx_path).is_file()}
    if any(fused.values()):
        log("fused attention: " + ", ".join(f"{name} {count}" for name, count in fused.items() if count))
    from sdonnx.export.weights import store_externally, write_weight_map  # onnx: the export extra

    mapped = {}
    for part in parts.PARTS:
        if (tmp / part.onnx_path).is_file():
            store_externally(tmp / part.onnx_path)
    for part in (parts.UNET, parts.TEXT_ENCODER) if not upscale else ():  # (LoRAs do not target upscalers)
        if (tmp / part.onnx_path).is_file():
            mapped[part.name] = write_weight_map(tmp / part.onnx_path, _torch_weights(source / part.name))
    from sdonnx.export import deep_cache, unet_stages, vae_stages

    # Tiles that equal the whole decode (runtime/vae.py); not for the x4 upscaler, whose VAE's
    # mid-block attends over the whole latent (262,144 positions for a 2048x2048 output): its
    # stages would compute that exactly and take the better part of an hour on a CPU, where
    # blended tiles attend within each tile (tests/benchmarks/upscale.py).
    for part in (parts.VAE_DECODER, parts.VAE_ENCODER) if not upscale else ():
        if (tmp / part.onnx_path).is_file():
            vae_stages.try_write_stages(tmp / part.onnx_path, log)
    if (tmp / parts.UNET.onnx_path).is_file() and not upscale:  # for --low-memory (runtime/unet_stages.py)
        unet_stages.try_write_stages(tmp / parts.UNET.onnx_path, log)
        deep_cache.try_write_deep_cache(tmp / parts.UNET.onnx_path, log)  # for --cache-interval
    parity = []
    if config.check:
        log("checking each part against torch on the same inputs")
        parity = upscaler.check_upscaler(source, tmp) if upscale else check_parts(source, tmp)
        for p in parity:
            log(f"  {p.part}: max abs diff {p.max_abs_diff:.2e} (tolerance {p.tolerance:.1e})")
    bad = [p for p in parity if not p.ok]
    if bad:
        raise ExportFailed(
            "ONNX output disagrees with torch: "
            + "; ".join(f"{p.part} max abs diff {p.max_abs_diff:.3g} > {p.tolerance:.3g}" for p in bad)
            + ". The export was not written."
        )
    from sdonnx.export import safety_checker

    if safety_checker.has_safety_checker(source):  # optional (sdonnx generate --safety-checker)
        extra_parity[parts.SAFETY_CHECKER.name] = safety_checker.export_safety_checker(source, tmp, config.opset, log)
    from sdonnx.export import depth

    if depth.is_depth_source(source) and depth.fixed_size(source):  # depth-to-image: the init image's depth
        extra_parity[parts.DEPTH_ESTIMATOR.name] = depth.export_depth_estimator(source, tmp, config.opset, log)
    elif depth.is_depth_source(source):
        log("  depth_estimator: not exported (its feature extractor keeps each image's aspect ratio, and sdonnx "
            "exports DPT at one size); give --depth-map when generating")
    seconds = time.perf_counter() - start
    _write_record(tmp, config, seconds, parity, source_record, fused, mapped, extra_parity)
    return ExportResult(out, seconds, parity)
