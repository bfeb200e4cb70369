"""Single-file checkpoints (`.safetensors`, `.ckpt`) as people download them -> a diffusers folder.

The file's family is read from its tensors (the text context width, the UNet's input
channels) and said before the heavy work; the configs the family needs ship beside this
module (export/configs/sd1.json, SD 1.5's), so nothing is fetched. diffusers' own single-file loader
(`from_single_file`, with those configs as a local folder) maps the original CompVis/LDM keys;
the folder it saves is then exported like any diffusers folder.

A `.ckpt` is a pickle: it is read with torch's weights-only unpickler, and one that needs more
(code) is refused, never run. Supported here: SD 1.x and SD 1.x inpainting (9-channel UNet),
fp32 or fp16, pruned or with EMA (`extract_ema` takes the `model_ema.*` copy), with a VAE
inside or a separate VAE file; other architectures with `config` (a diffusers-format folder of
configs, as the tests' tiny checkpoints need). SD 2.x, SDXL and later families are named and
refused.
"""

from __future__ import annotations

import json
import shutil
import zipfile
from dataclasses import dataclass
from pathlib import Path

from sdonnx.export.ldm_layout import EMA_PREFIX, TEXT_PREFIX, UNET_PREFIX, VAE_PREFIX
from sdonnx.runtime.errors import InputError, ModelFolderError
from sdonnx.runtime.pipeline import default_model_path

CONFIGS = Path(__file__).parent / "configs"
CONTEXT_KEY = UNET_PREFIX + "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"
CONV_IN_KEY = UNET_PREFIX + "input_blocks.0.0.weight"
# Keys that name what a file is when it is not an SD 1.x/2.x checkpoint.
OTHER_FAMILIES = (
    ("conditioner.embedders.1.", "an SDXL checkpoint"),
    ("model.diffusion_model.joint_blocks.", "an SD 3 checkpoint"),
    ("double_blocks.", "a Flux checkpoint"),
    ("model.diffusion_model.double_blocks.", "a Flux checkpoint"),
)


@dataclass(frozen=True)
class Checkpoint:
    """What a single file holds, read from its tensors before anything heavy runs."""

    path: Path
    family: str  # "sd1", "sd1-inpainting", or "custom" (configs from `config`)
    description: str  # for the log and sdonnx.json: "SD 1.x, 768-d CLIP text encoder, ..."
    has_vae: bool
    has_ema: bool


def read_tensors(path: Path) -> dict:
    """{name: tensor} of a single file, lazily for safetensors (memory-mapped), through torch's
    weights-only unpickler for pickles (`.ckpt`); a `state_dict` wrapper is unwrapped.

    Raises ModelFolderError for a file that is not a checkpoint or would run code.
    """
    import pickle

    import torch

    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        from sdonnx.export.exporter import check_safetensors

        check_safetensors(path)
        return load_file(str(path))
    try:
        # mmap reads tensors lazily, for files torch saved in its zip format (torch >= 1.6);
        # older pickles load whole.
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except pickle.UnpicklingError as e:
        raise ModelFolderError(
            f"{path} is a pickle that needs more than tensors to load ({str(e).splitlines()[0][:160]}); "
            "it could run code, so it was not loaded. Convert it to .safetensors where you trust it") from None
    except (RuntimeError, EOFError, OSError, ValueError) as e:
        raise ModelFolderError(f"{path} cannot be read as a torch checkpoint ({str(e).splitlines()[0][:160]}); "
                               "is it truncated? download it again") from None
    while isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise ModelFolderError(f"{path} holds a {type(state).__name__}, not a dictionary of tensors")
    return state


def inspect(path: Path, tensors: dict, config: Path | None = None) -> Checkpoint:
    """The family of a checkpoint's tensors, or a ModelFolderError saying what the file is."""
    keys = list(tensors)
    if any("lora_" in k or ".lora." in k for k in keys):
        raise ModelFolderError(f"{path} is a LoRA ({len(keys)} tensors), not a model; LoRA files are applied "
                               "to a model at generation, not exported")
    if {"string_to_param", "emb_params"} & set(keys) or set(keys) <= {"clip_l", "clip_g"}:
        raise ModelFolderError(f"{path} is a textual-inversion embedding, not a model")
    for prefix, what in OTHER_FAMILIES:
        if any(k.startswith(prefix) for k in keys):
            raise ModelFolderError(f"{path} is {what}; sdonnx exports SD 1.x models from single files so far")
    if CONV_IN_KEY not in tensors:
        raise ModelFolderError(f"{path} is not a Stable Diffusion checkpoint: it has no {UNET_PREFIX}* UNet "
                               f"(a few of its {len(keys)} keys: {', '.join(keys[:3])})")
    channels = int(tensors[CONV_IN_KEY].shape[1])
    context = int(tensors[CONTEXT_KEY].shape[1]) if CONTEXT_KEY in tensors else None
    has_vae = any(k.startswith(VAE_PREFIX) for k in keys)
    has_ema = any(k.startswith(EMA_PREFIX) for k in keys)
    extras = ("a VAE" if has_vae else "no VAE") + (", EMA weights too" if has_ema else "")
    if config is not None:
        return Checkpoint(path, "custom", f"UNet of {channels} input channels, {context}-d text context, "
                                          f"configs from {config}, {extras}", has_vae, has_ema)
    if context == 1024:
        raise ModelFolderError(f"{path} is an SD 2.x checkpoint (1024-d OpenCLIP text encoder), which sdonnx "
                               "does not export from a single file yet; export its diffusers folder instead")
    if context != 768 or channels not in (4, 9):
        raise ModelFolderError(
            f"{path}: a {context}-d text context and {channels} UNet input channels match no bundled family "
            "(SD 1.x: 768 and 4, or 9 for inpainting); pass --config with a diffusers folder of its configs")
    if not any(k.startswith(TEXT_PREFIX) for k in keys):
        raise ModelFolderError(f"{path} has no {TEXT_PREFIX}* text encoder; it is not a whole SD 1.x checkpoint")
    family = "sd1" if channels == 4 else "sd1-inpainting"
    kind = "inpainting, " if channels == 9 else ""
    return Checkpoint(path, family, f"SD 1.x, {kind}768-d CLIP ViT-L text encoder, epsilon, 512 px, {extras}",
                      has_vae, has_ema)


def config_folder(checkpoint: Checkpoint, into: Path, config: Path | None = None) -> Path:
    """A diffusers folder of configs (no weights) for `checkpoint` at `into`: the bundled SD 1.5
    configs with CLIP's tokenizer (the same files as the embedded model's), or `config`'s."""
    if config is not None:
        if not (config / "unet" / "config.json").is_file():
            raise InputError(f"--config {config} is not a diffusers folder (unet/config.json missing)")
        shutil.copytree(config, into, ignore=shutil.ignore_patterns("*.safetensors", "*.bin", "*.onnx*"))
        return into
    files = json.loads((CONFIGS / "sd1.json").read_text())
    files.pop("_comment")
    if checkpoint.family == "sd1-inpainting":
        files["unet/config.json"]["in_channels"] = 9
        files["model_index.json"]["_class_name"] = "StableDiffusionInpaintPipeline"
    for name, data in files.items():
        (into / name).parent.mkdir(parents=True, exist_ok=True)
        (into / name).write_text(json.dumps(data, indent=2))
    shutil.copytree(default_model_path() / "tokenizer", into / "tokenizer")
    return into


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
                 extract_ema: bool = False, log=lambda msg: None) -> Checkpoint:
    """Convert the single file `path` into a diffusers folder at `out` (float32 weights).

    By default the weights AUTOMATIC1111 and the reference scripts load (`model.diffusion_model.*`);
    `extract_ema` takes the EMA copy; `vae` (a file in LDM or diffusers keys) replaces or supplies
    the autoencoder. Raises ModelFolderError/InputError naming what is wrong.
    """
    import torch
    from diffusers import AutoencoderKL, StableDiffusionInpaintPipeline, StableDiffusionPipeline, UNet2DConditionModel

    tensors = read_tensors(path)
    checkpoint = inspect(path, tensors, config)
    log(f"{path.name}: {checkpoint.description}")
    if extract_ema and not checkpoint.has_ema:
        raise InputError(f"--extract-ema: {path} holds no EMA weights (model_ema.*); leave the option out")
    if not checkpoint.has_vae and vae is None:
        raise InputError(f"{path} holds no VAE (first_stage_model.*); pass one with --vae FILE")
    configs = config_folder(checkpoint, out.with_name(out.name + "-configs"), config)
    try:
        inpainting = json.loads((configs / "unet" / "config.json").read_text()).get("in_channels") == 9
        pipeline_class = StableDiffusionInpaintPipeline if inpainting else StableDiffusionPipeline
        components = {}
        if extract_ema:
            unet_tensors = {k: v for k, v in _ema_as_model(tensors).items() if k.startswith(UNET_PREFIX)}
            components["unet"] = UNet2DConditionModel.from_single_file(
                unet_tensors, config=str(configs), subfolder="unet", local_files_only=True)
        if vae is not None:
            vae_tensors = read_tensors(vae)
            if not any(k.startswith(VAE_PREFIX) for k in vae_tensors):
                vae_tensors = {VAE_PREFIX + k: v for k, v in vae_tensors.items()}
            components["vae"] = AutoencoderKL.from_single_file(
                vae_tensors, config=str(configs), subfolder="vae", local_files_only=True)
        try:
            pipe = pipeline_class.from_single_file(str(path), config=str(configs), local_files_only=True,
                                                   torch_dtype=torch.float32, **components)
        except (KeyError, RuntimeError, ValueError) as e:
            raise ModelFolderError(f"{path} does not fit the {checkpoint.family} configs "
                                   f"({type(e).__name__}: {str(e).splitlines()[0][:200]})") from None
        pipe.save_pretrained(out, safe_serialization=True)
        del pipe
    finally:
        shutil.rmtree(configs, ignore_errors=True)
    return checkpoint


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
