"""Checkpoints as people download them -> the plain diffusers folder the export reads.

Single files (`.safetensors`, `.ckpt`), and hub folders with fp16-variant weights or a
tokenizer.json alone.

The file's family is read from its tensors (the text context width, the UNet's input
channels) and said before the heavy work; the configs the family needs ship beside this
module (export/configs/: SD 1.5's and SD 2.1's), so nothing is fetched. diffusers' own single-file loader
(`from_single_file`, with those configs as a local folder) maps the original CompVis/LDM keys
(OpenCLIP's for SD 2.x's text encoder);
the folder it saves is then exported like any diffusers folder.

A `.ckpt` is a pickle: it is read with torch's weights-only unpickler, and one that needs more
(code) is refused, never run. Supported here: SD 1.x and 2.x (epsilon or v-prediction) and
their inpainting models (9-channel UNet), fp32 or fp16, pruned or with EMA (`extract_ema` takes
the `model_ema.*` copy), with a VAE inside or a separate VAE file; other architectures with
`config` (a diffusers-format folder of configs, as the tests' tiny checkpoints need). SDXL and
later families are named and refused.
"""

from __future__ import annotations

import json
import shutil
import zipfile
from dataclasses import dataclass
from pathlib import Path

from sdonnx.export.ldm_layout import EMA_PREFIX, OPEN_CLIP_PREFIX, TEXT_PREFIX, UNET_PREFIX, VAE_PREFIX
from sdonnx.runtime import parts
from sdonnx.runtime.errors import InputError, ModelFolderError, SdonnxError
from sdonnx.runtime.pipeline import default_model_path
from sdonnx.runtime.schedules import PREDICTION_TYPES
from sdonnx.runtime.upscale import UPSCALE_PIPELINE

CONFIGS = Path(__file__).parent / "configs"
CONTEXT_KEY = UNET_PREFIX + "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"
CONV_IN_KEY = UNET_PREFIX + "input_blocks.0.0.weight"
# Keys that name what a file is when it is not an SD 1.x/2.x checkpoint.
OTHER_FAMILIES = (
    ("conditioner.embedders.", "an SDXL checkpoint (base or refiner)"),
    ("model.diffusion_model.joint_blocks.", "an SD 3 checkpoint"),
    ("double_blocks.", "a Flux checkpoint"),
    ("model.diffusion_model.double_blocks.", "a Flux checkpoint"),
)


@dataclass(frozen=True)
class Checkpoint:
    """What a single file holds, read from its tensors before anything heavy runs."""

    path: Path
    family: str  # "sd1", "sd2", "x4" (configs/<family>.json) or "custom" (configs from `config`)
    inpainting: bool  # a 9-channel UNet
    prediction_type: str | None  # None: the configs' own (custom)
    image_size: int | None  # native size in pixels; None: the configs' own
    description: str  # for the log and sdonnx.json: "SD 1.x, 768-d CLIP ViT-L text encoder, ..."
    has_vae: bool
    has_ema: bool


def read_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """{name: shape} of a single file's tensors: from a safetensors header alone (nothing of a
    2 GB file is read but the header), else from the tensors `read_tensors` loads."""
    if path.suffix == ".safetensors":
        from sdonnx.export.exporter import check_safetensors

        header = check_safetensors(path)
        return {k: tuple(t["shape"]) for k, t in header.items() if k != "__metadata__"}
    return {k: tuple(getattr(v, "shape", ())) for k, v in read_tensors(path).items()}


def read_tensors(path: Path) -> dict:
    """{name: tensor} of a single file: safetensors loaded whole, pickles (`.ckpt`) through
    torch's weights-only unpickler (memory-mapped for torch's zip format); a `state_dict`
    wrapper is unwrapped.

    Raises ModelFolderError for a file that is not a checkpoint or would run code.
    """
    import pickle

    import torch

    if path.suffix.lower() == ".safetensors":
        if path.suffix != ".safetensors":  # diffusers reads files by their exact extension
            raise InputError(f"{path}: rename it to end in .safetensors (lower case) and export again")
        from safetensors.torch import load_file

        from sdonnx.export.exporter import check_safetensors

        check_safetensors(path)
        return load_file(str(path))
    with open(path, "rb") as f:
        head = f.read(64)
    if not (head.startswith(b"PK\x03\x04") or head[:1] == b"\x80"):  # torch's zip format, or a pickle
        hint = (" (a Git LFS pointer: fetch the real file)" if head.startswith(b"version https://git-lfs")
                else " (a web page or an error message saved in its place?)")
        raise ModelFolderError(f"{path} is not a checkpoint: neither safetensors, a torch zip nor a pickle"
                               f"{hint if head[:1].isascii() else ''}; download it again")
    try:
        # mmap reads tensors lazily, for files torch saved in its zip format (torch >= 1.6);
        # older pickles load whole.
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except pickle.UnpicklingError as e:
        lines = str(e).splitlines()
        detail = next((line.strip() for line in lines if "Unsupported global" in line), lines[0][:120])
        raise ModelFolderError(
            f"{path} is a pickle that needs more than tensors to load ({detail}); it could run code, so it was "
            "not loaded. Convert it to .safetensors where you trust it") from None
    except Exception as e:  # torch's readers raise many kinds for a damaged file
        raise ModelFolderError(f"{path} cannot be read as a torch checkpoint ({type(e).__name__}: "
                               f"{str(e).splitlines()[0][:160] if str(e) else ''}); is it truncated? "
                               "download it again") from None
    while isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise ModelFolderError(f"{path} holds a {type(state).__name__}, not a dictionary of tensors")
    return state


def _yaml_parameterization(path: Path) -> str | None:
    """The prediction type in the original config beside a checkpoint (`model.params.
    parameterization: "v"` in X.yaml for X.safetensors), as AUTOMATIC1111 reads it; None if none."""
    import yaml

    beside = path.with_suffix(".yaml")
    if not beside.is_file():
        return None
    try:
        params = (yaml.safe_load(beside.read_text()) or {}).get("model", {}).get("params", {})
    except (yaml.YAMLError, AttributeError) as e:
        raise ModelFolderError(f"{beside} is not a readable original config ({e})") from None
    return "v_prediction" if params.get("parameterization") == "v" else "epsilon"


def inspect(path: Path, shapes: dict[str, tuple[int, ...]], config: Path | None = None,
            prediction_type: str | None = None, image_size: int | None = None) -> Checkpoint:
    """The family of a checkpoint from its tensors' names and shapes (read_shapes), or a
    ModelFolderError saying what the file is.

    SD 2.x's weights do not tell epsilon (2.x-base, 512 px) from v-prediction (768 px):
    `prediction_type` and `image_size` when given, else a .yaml of the same name beside the
    file (as AUTOMATIC1111 reads it), else SD 2.1's v-prediction at 768 px. SD 2.x inpainting
    is epsilon, 512.
    """
    keys = list(shapes)
    if not keys:
        raise ModelFolderError(f"{path} holds no tensors")
    if any("lora_" in k or ".lora." in k or "_lora." in k for k in keys):
        raise ModelFolderError(f"{path} is a LoRA ({len(keys)} tensors), not a model; LoRA files are applied "
                               "to a model at generation, not exported")
    if {"string_to_param", "emb_params"} & set(keys) or set(keys) <= {"clip_l", "clip_g"}:
        raise ModelFolderError(f"{path} is a textual-inversion embedding, not a model")
    for prefix, what in OTHER_FAMILIES:
        if any(k.startswith(prefix) for k in keys):
            raise ModelFolderError(f"{path} is {what}; sdonnx exports SD 1.x and 2.x single files so far")
    if CONV_IN_KEY not in shapes:
        raise ModelFolderError(f"{path} is not a Stable Diffusion checkpoint: it has no {UNET_PREFIX}* UNet "
                               f"(a few of its {len(keys)} keys: {', '.join(keys[:3])})")
    if prediction_type not in (None, *PREDICTION_TYPES):
        raise InputError(f"--prediction-type must be one of {', '.join(PREDICTION_TYPES)}, got {prediction_type!r}")
    if image_size is not None and (image_size < 64 or image_size % 64):
        raise InputError(f"--image-size must be a multiple of 64 pixels (512, 768 ...), got {image_size}")
    channels = int(shapes[CONV_IN_KEY][1])
    # (The x4 upscaler's first level has no attention: its first cross-attention is further in.)
    context_key = CONTEXT_KEY if CONTEXT_KEY in shapes else next(
        (k for k in keys if k.startswith(UNET_PREFIX) and k.endswith("transformer_blocks.0.attn2.to_k.weight")), None)
    context = int(shapes[context_key][1]) if context_key else None
    has_vae = any(k.startswith(VAE_PREFIX) for k in keys)
    has_ema = EMA_PREFIX + CONV_IN_KEY[len("model."):].replace(".", "") in shapes  # not just model_ema.decay
    inpainting = channels == 9
    extras = ("a VAE" if has_vae else "no VAE") + (", EMA weights too" if has_ema else "")
    chosen = prediction_type or _yaml_parameterization(path)
    if config is not None:
        said = f", {chosen}" if chosen else ""
        return Checkpoint(path, "custom", inpainting, chosen, image_size,
                          f"UNet of {channels} input channels, {context}-d text context{said}, configs from "
                          f"{config}, {extras}", has_vae, has_ema)
    if context not in (768, 1024) or channels not in (4, 9) and (channels, context) != (7, 1024):
        raise ModelFolderError(
            f"{path}: a {context or 'missing'}-d text context and {channels} UNet input channels match no bundled family "
            "(SD 1.x: 768, SD 2.x: 1024; 4 channels, 9 for inpainting, 7 for SD 2's x4 upscaler); pass --config "
            "with a diffusers folder of its configs")
    text_prefix = TEXT_PREFIX if context == 768 else OPEN_CLIP_PREFIX
    if not any(k.startswith(text_prefix) for k in keys):
        raise ModelFolderError(f"{path} has no {text_prefix}* text encoder; it is not a whole checkpoint")
    if channels == 7:  # x4-upscaler-ema: its own configs, v-prediction, 128-pixel latents
        return Checkpoint(path, "x4", False, None, None,
                          f"SD x4 upscaler, 7-channel UNet, 1024-d OpenCLIP ViT-H text encoder, {extras}",
                          has_vae, has_ema)
    kind = "inpainting, " if inpainting else ""
    if context == 768:
        return Checkpoint(path, "sd1", inpainting, chosen or "epsilon", image_size or 512,
                          f"SD 1.x, {kind}768-d CLIP ViT-L text encoder, {chosen or 'epsilon'}, "
                          f"{image_size or 512} px, {extras}", has_vae, has_ema)
    if chosen is None:
        chosen = "epsilon" if inpainting else "v_prediction"
        how = "the default for SD 2.x" + ("" if inpainting else " (2.1; --prediction-type epsilon for 2.x-base)")
    else:
        how = "from --prediction-type" if prediction_type else f"from {path.with_suffix('.yaml').name}"
    size = image_size or (768 if chosen == "v_prediction" else 512)
    return Checkpoint(path, "sd2", inpainting, chosen, size,
                      f"SD 2.x, {kind}1024-d OpenCLIP ViT-H text encoder, {chosen} ({how}), {size} px, {extras}",
                      has_vae, has_ema)


def config_folder(checkpoint: Checkpoint, into: Path, config: Path | None = None) -> Path:
    """A diffusers folder of configs (no weights) for `checkpoint` at `into`: the bundled SD 1.5
    or 2.1 configs with CLIP's tokenizer (the same files as the embedded model's), or `config`'s;
    with the checkpoint's prediction type and size where it says them."""
    if config is not None:
        if not (config / "unet" / "config.json").is_file():
            raise InputError(f"--config {config} is not a diffusers folder (unet/config.json missing)")
        def weights(folder, names):  # configs only: a hub snapshot also holds gigabytes of weights
            return [n for n in names if not (Path(folder, n).is_dir() or n.endswith((".json", ".txt")))]

        shutil.copytree(config, into, ignore=weights)
        files = {}
    else:
        shutil.copytree(default_model_path() / "tokenizer", into / "tokenizer")
        files = json.loads((CONFIGS / f"{checkpoint.family}.json").read_text())
        files.pop("_comment")
    if checkpoint.inpainting:
        files.setdefault("unet/config.json", {})["in_channels"] = 9
        files.setdefault("model_index.json", {})["_class_name"] = "StableDiffusionInpaintPipeline"
    if checkpoint.prediction_type:
        files.setdefault("scheduler/scheduler_config.json", {})["prediction_type"] = checkpoint.prediction_type
        if checkpoint.family == "sd2" and checkpoint.prediction_type == "epsilon":
            files["unet/config.json"]["upcast_attention"] = False  # as 2.x-base's and 2.x inpainting's configs
    if checkpoint.image_size:
        files.setdefault("unet/config.json", {})["sample_size"] = checkpoint.image_size // 8
    for name, values in files.items():
        target = into / name
        merged = json.loads(target.read_text()) if target.is_file() else {}
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(json.dumps({**merged, **values}, indent=2))
    return into


def _vae_from_file(path: Path, configs: Path):
    """An AutoencoderKL from a separate VAE file: LDM keys with or without `first_stage_model.`
    (vae-ft-mse-840000-ema-pruned), or diffusers' own (a VAE folder's weights file)."""
    from diffusers import AutoencoderKL

    tensors = read_tensors(path)
    if any(k.startswith("encoder.down_blocks.") for k in tensors):
        vae = AutoencoderKL.from_config(AutoencoderKL.load_config(configs / "vae"))
        missing, unexpected = vae.load_state_dict(tensors, strict=False)
        if missing or unexpected:
            raise ModelFolderError(f"--vae {path} does not fit the VAE config (missing {', '.join(missing[:3])}; "
                                   f"unexpected {', '.join(unexpected[:3])})")
        return vae
    if not any(k.startswith(VAE_PREFIX) for k in tensors):
        tensors = {VAE_PREFIX + k: v for k, v in tensors.items()}
    if VAE_PREFIX + "encoder.conv_in.weight" not in tensors:
        raise ModelFolderError(f"--vae {path} is not a VAE (no encoder.conv_in weights)")
    return AutoencoderKL.from_single_file(tensors, config=str(configs), subfolder="vae", local_files_only=True)


def _ema_as_model(tensors: dict) -> dict:
    """The tensors with the `model_ema.*` copy of the UNet in place of `model.diffusion_model.*`
    (the original stores EMA names without their inner dots)."""
    out = dict(tensors)
    for key in [k for k in tensors if k.startswith(UNET_PREFIX)]:
        ema = EMA_PREFIX + key[len("model."):].replace(".", "")
        if ema not in tensors:
            raise ModelFolderError(f"--extract-ema: the EMA copy lacks {ema}")
        out[key] = tensors[ema]
    return out


def to_diffusers(path: Path, out: Path, *, config: Path | None = None, vae: Path | None = None,
                 extract_ema: bool = False, prediction_type: str | None = None, image_size: int | None = None,
                 log=lambda msg: None) -> Checkpoint:
    """Convert the single file `path` into a diffusers folder at `out` (float32 weights).

    By default the weights AUTOMATIC1111 and the reference scripts load (`model.diffusion_model.*`);
    `extract_ema` takes the EMA copy; `vae` (a file in LDM or diffusers keys) replaces or supplies
    the autoencoder. Raises ModelFolderError/InputError naming what is wrong.
    """
    import torch
    from diffusers import (StableDiffusionInpaintPipeline, StableDiffusionPipeline, StableDiffusionUpscalePipeline,
                           UNet2DConditionModel)

    checkpoint = inspect(path, read_shapes(path), config, prediction_type, image_size)
    log(f"{path.name}: {checkpoint.description}")
    if extract_ema and not checkpoint.has_ema:
        raise InputError(f"--extract-ema: {path} holds no EMA weights (model_ema.*); leave the option out")
    if not checkpoint.has_vae and vae is None:
        raise InputError(f"{path} holds no VAE (first_stage_model.*); pass one with --vae FILE")
    configs = out.with_name(out.name + "-configs")
    try:
        config_folder(checkpoint, configs, config)
        named = parts.read_json(configs / "model_index.json").get("_class_name")
        pipeline_class = (StableDiffusionUpscalePipeline if named == UPSCALE_PIPELINE
                          else StableDiffusionInpaintPipeline if checkpoint.inpainting else StableDiffusionPipeline)
        components = {}
        if extract_ema:
            unet_tensors = {k: v for k, v in _ema_as_model(read_tensors(path)).items() if k.startswith(UNET_PREFIX)}
            components["unet"] = UNet2DConditionModel.from_single_file(
                unet_tensors, config=str(configs), subfolder="unet", local_files_only=True)
        if vae is not None:
            components["vae"] = _vae_from_file(vae, configs)
        pipe = pipeline_class.from_single_file(str(path), config=str(configs), local_files_only=True,
                                               torch_dtype=torch.float32, **components)
        pipe.save_pretrained(out, safe_serialization=True)
        del pipe
    except SdonnxError:
        raise
    except (KeyError, RuntimeError, ValueError, OSError) as e:  # what diffusers raises for a mismatch
        raise ModelFolderError(f"{path} does not fit the {checkpoint.family} configs "
                               f"({type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''})") from None
    finally:
        shutil.rmtree(configs, ignore_errors=True)
    return checkpoint


def prepare(config, single_file: bool, variant: str | None, out: Path, log=lambda msg: None) -> dict:
    """Write at `out` the plain diffusers folder optimum exports, from a single file, a folder's
    weight variant or a folder whose tokenizer is tokenizer.json alone; returns sdonnx.json's
    "source" record. `config` is the ExportConfig."""
    source = config.source
    if single_file:
        twin = source.with_suffix(".safetensors")
        if source.suffix.lower() != ".safetensors" and twin.is_file():
            # The same checkpoint as safetensors beside the pickle: read it (no pickle to trust).
            log(f"{twin.name} is beside {source.name}: reading it instead of the pickle")
            source = twin
        log(f"reading {source}")
        found = to_diffusers(source, out, config=config.config, vae=config.vae, extract_ema=config.extract_ema,
                             prediction_type=config.prediction_type, image_size=config.image_size, log=log)
        return {"path": str(source.resolve()), "format": "single-file", "family": found.family,
                "inpainting": found.inpainting, "description": found.description, "ema": config.extract_ema,
                **({"vae": str(config.vae.resolve())} if config.vae else {})}
    record = {"path": str(source.resolve()), "format": "diffusers"}
    if variant:
        log(f"reading the {variant} weights of {source}")
        variant_to_diffusers(source, variant, out)
        record["variant"] = variant
    else:
        link_folder(source, out)
    from sdonnx.export.exporter import fast_tokenizer_only

    if fast_tokenizer_only(out):
        write_vocab_files(out / "tokenizer")
    return record


def variant_to_diffusers(source: Path, variant: str, out: Path) -> None:
    """A diffusers folder's `variant` weights (model.fp16.safetensors ...) saved at `out` as a
    plain float32 folder; parts the export does not use (safety checker, feature extractor)
    are left out."""
    import torch
    from diffusers import DiffusionPipeline

    try:
        pipe = DiffusionPipeline.from_pretrained(source, variant=variant, torch_dtype=torch.float32,
                                                 safety_checker=None, feature_extractor=None,
                                                 requires_safety_checker=False, local_files_only=True)
    except (OSError, ValueError, KeyError) as e:
        raise ModelFolderError(f"{source}: cannot read its {variant} weights ({str(e).splitlines()[0][:200]})") from None
    pipe.save_pretrained(out, safe_serialization=True)


def link_folder(source: Path, out: Path) -> None:
    """`out` mirrors the diffusers folder `source` with symbolic links (no weight is copied),
    except its tokenizer/, which is copied so that files can be added to it."""
    out.mkdir()
    for entry in source.iterdir():
        if entry.name == "tokenizer":
            shutil.copytree(entry, out / entry.name)
        else:
            (out / entry.name).symlink_to(entry.resolve(), target_is_directory=entry.is_dir())


def write_vocab_files(tokenizer: Path) -> None:
    """vocab.json and merges.txt beside a tokenizer.json (the fast tokenizer's BPE model as the
    slow CLIPTokenizer and sdonnx's runtime read it)."""
    from tokenizers import Tokenizer

    try:
        Tokenizer.from_file(str(tokenizer / "tokenizer.json")).model.save(str(tokenizer))
    except Exception as e:  # the tokenizers library raises its own exception type
        raise ModelFolderError(f"{tokenizer / 'tokenizer.json'} cannot be read as a BPE tokenizer ({e})") from None
