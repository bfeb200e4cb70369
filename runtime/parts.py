"""The model folder contract shared by the export stage and the runtime.

The layout is the one `optimum-cli export onnx` writes for Stable Diffusion, so folders made
by either tool load in both. This module must import nothing heavier than the standard
library: the export stage (torch) and the runtime (numpy + onnxruntime) both import it.
"""

from __future__ import annotations

import functools
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from sdonnx.runtime.errors import ModelFolderError

RECORD = "sdonnx.json"
TOKENIZER_DIR = "tokenizer"
SCHEDULER_CONFIG = "scheduler/scheduler_config.json"
ONNX_FILE = "model.onnx"
# A part quantized for OpenVINO (sdonnx quantize --mode int8-openvino) is OpenVINO IR instead,
# named as optimum-intel names it; only the openvino provider runs it.
IR_FILE = "openvino_model.xml"
# A VAE part cut at its group norms (export/vae_stages.py): the plan, beside stage_NN.onnx files,
# that lets runtime/vae.py decode in tiles that equal the untiled decode.
VAE_STAGES = "stages.json"
VAE_STAGE_NORMS = "stages.npz"  # the group norms' parameters (numpy arrays)
# A UNet cut into stages of a few hundred MB of weights (export/unet_stages.py), which
# low_memory runs loaded one at a time (runtime/unet_stages.py): the plan, beside stage_NN.onnx
# (the VAE's plan has the same name; "kind" tells them apart).
UNET_STAGES = VAE_STAGES
# DeepCache (export/deep_cache.py, runtime/deep_cache.py): the UNet's graph again with its deep
# feature as a second output, and the shallow graph that takes that feature as an input; the
# plan names the cut. Both graphs keep their weights in the UNet's model.onnx_data.
DEEP_CACHE_PLAN = "deep_cache.json"
DEEP_CACHE_FULL = "deep_cache_full.onnx"
DEEP_CACHE_SHALLOW = "deep_cache_shallow.onnx"
DEEP_CACHE_FEATURE = "deep_cache_feature"
# Stage files keep their weights in the part's external data file (one copy on disk).
STAGE_PREFIX = "stage_"
# Models over ONNX's 2 GB protobuf limit keep their weights in this external data file.
EXTERNAL_DATA_FILE = "model.onnx_data"


@dataclass(frozen=True)
class Part:
    """One ONNX model of the pipeline: its folder, and the names of its inputs and outputs."""

    name: str
    inputs: tuple[str, ...]
    output: str
    required: bool = True

    @property
    def onnx_path(self) -> str:
        return f"{self.name}/{ONNX_FILE}"

    @property
    def ir_path(self) -> str:
        return f"{self.name}/{IR_FILE}"

    def file(self, folder: Path) -> Path | None:
        """The part's model file in `folder`: ONNX, else OpenVINO IR, else None."""
        for name in (self.onnx_path, self.ir_path):
            if (folder / name).is_file():
                return folder / name
        return None


TEXT_ENCODER = Part("text_encoder", ("input_ids",), "last_hidden_state")
UNET = Part("unet", ("sample", "timestep", "encoder_hidden_states"), "out_sample")
VAE_DECODER = Part("vae_decoder", ("latent_sample",), "sample")
# Needed only for img2img; optimum names its output latent_parameters (mean and log-variance),
# older exporters latent_sample.
VAE_ENCODER = Part("vae_encoder", ("sample",), "latent_parameters", required=False)

PARTS = (TEXT_ENCODER, UNET, VAE_DECODER, VAE_ENCODER)
# TAESD (diffusers' AutoencoderTiny, madebyollin/taesd), optional: scaled latents in and out
# (no scaling factor), pixels in [-1, 1]. `sdonnx export --tiny-vae` adds them; generation
# uses them with decoder="tiny", and previews whenever they are there.
TINY_VAE_DECODER = Part("tiny_vae_decoder", ("latent_sample",), "sample", required=False)
TINY_VAE_ENCODER = Part("tiny_vae_encoder", ("sample",), "latent_sample", required=False)
TINY_PARTS = (TINY_VAE_DECODER, TINY_VAE_ENCODER)
# The safety checker (export/safety_checker.py, runtime/safety_checker.py), optional: CLIP's
# preprocessed images in, a score per concept and a flag per image out; its folder also holds
# the source's feature extractor settings (preprocessor_config.json).
SAFETY_CHECKER = Part("safety_checker", ("clip_input",), "has_nsfw_concepts", required=False)
SAFETY_CHECKER_OUTPUTS = ("concept_scores", "special_scores", "has_nsfw_concepts")
# Depth-to-image's depth estimator (export/depth.py, runtime/depth.py), optional: DPT's
# preprocessed image in, relative inverse depth (1, H, W) out; its folder also holds the
# source's feature extractor settings.
DEPTH_ESTIMATOR = Part("depth_estimator", ("pixel_values",), "predicted_depth", required=False)


def model_files(path: Path) -> list[Path]:
    """A part's model file and the weight files beside it: ONNX external data (model.onnx_data,
    as the exporter writes it, also for a graph cut from model.onnx: stage_NN.onnx, the
    DeepCache graphs) or OpenVINO IR's .bin."""
    siblings = sorted(p for p in path.parent.iterdir() if p != path and p.name.startswith(path.name))
    cut = path.name.startswith(STAGE_PREFIX) or path.name in (DEEP_CACHE_FULL, DEEP_CACHE_SHALLOW)
    if cut and (path.parent / EXTERNAL_DATA_FILE).is_file():
        siblings.append(path.parent / EXTERNAL_DATA_FILE)
    return [path, *siblings, *([path.with_suffix(".bin")] if path.suffix == ".xml" else [])]


@functools.lru_cache(maxsize=64)
def _file_digest(path: str, size: int, mtime_ns: int) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(2**22):
            digest.update(chunk)
    return digest.hexdigest()


def weights_digest(path: Path) -> str:
    """SHA-256 over a part's model file and its weight files (model_files), remembered per file
    version in this process (an SD 1.5 VAE decoder's 0.2 GB take about 0.3 s once)."""
    files = model_files(path)
    return hashlib.sha256("".join(
        _file_digest(str(f), f.stat().st_size, f.stat().st_mtime_ns) for f in files).encode()).hexdigest()


def graph_digest(path: Path) -> str:
    """SHA-256 over an ONNX file's bytes (its graph and where each weight lies in the data file)
    and the sizes of its weight files: what a plan of stages cut from its graph depends on, not
    the weights' values (a UNet's stage plan, runtime/unet_stages.py). Reads the graph file
    only (an SD 1.5 UNet's: 1-3 MB; once per file version, as weights_digest), where
    weights_digest reads the 3.4 GB beside it."""
    digest = hashlib.sha256(_file_digest(str(path), path.stat().st_size, path.stat().st_mtime_ns).encode())
    for weights in model_files(path)[1:]:
        digest.update(f"{weights.name}:{weights.stat().st_size}".encode())
    return digest.hexdigest()


def ir_parts(folder: Path) -> list[str]:
    """The parts of `folder` stored as OpenVINO IR (only the openvino provider runs them)."""
    return [p.name for p in PARTS if (f := p.file(folder)) is not None and f.name == IR_FILE]


# Stable Diffusion 1.x's VAE latent scaling, used when a folder's VAE config does not say.
DEFAULT_VAE_SCALING_FACTOR = 0.18215
LATENT_CHANNELS = 4
# Spatial downscale of the VAE: latents are (H/8, W/8).
VAE_SCALE = 8


def read_json(path: Path) -> dict:
    """The JSON object in a model folder's file, {} when the file is absent; a ModelFolderError
    naming the file and the place when it is not a readable JSON object."""
    if not path.is_file():
        return {}
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ModelFolderError(f"{path} is not valid JSON (line {e.lineno}, column {e.colno}: {e.msg}); "
                               "repair it or export the model again") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ModelFolderError(f"cannot read {path}: {e}") from None
    if not isinstance(value, dict):
        raise ModelFolderError(f"{path} must hold a JSON object, not {type(value).__name__}")
    return value


def config_field(config: dict, key: str, default, valid, path: Path, wanted: str):
    """config[key] (default when absent or null), or a ModelFolderError naming the file and the
    field when `valid(value)` is false; `wanted` says what it should be."""
    value = config.get(key)
    if value is None:
        return default
    if not valid(value):
        raise ModelFolderError(f"{path}: {key} must be {wanted}, got {value!r}; repair it or export the model again")
    return value
