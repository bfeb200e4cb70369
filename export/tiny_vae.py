"""TAESD, the tiny autoencoder (madebyollin/taesd; diffusers' AutoencoderTiny), as two optional
parts of a model folder: tiny_vae_decoder and tiny_vae_encoder (runtime/parts.py).

TAESD works on Stable Diffusion's *scaled* latents (scaling factor 1), so its decoder takes the
sampler's latents as they are and returns pixels in [-1, 1]; its encoder does the reverse. A
decode costs a small fraction of the full VAE's (about 1.2 M parameters against 49 M), with
softer detail: the decoder people choose for previews and for 1-4 step models.

Sources: a diffusers AutoencoderTiny folder (config.json + weights), or the original single
files `taesd_decoder.pth` / `taesd_encoder.pth` (or .safetensors), given as the decoder file or
the folder holding both. Their keys are nn.Sequential indices; diffusers' DecoderTiny drops the
original's leading Clamp module (it applies tanh(x / 3) * 3 in forward), so decoder index i is
`decoder.layers.{i - 1}` and encoder index i is `encoder.layers.{i}`.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Callable

import numpy as np

from sdonnx.runtime import parts
from sdonnx.runtime.errors import InputError, ModelFolderError

ORIGINAL_NAMES = ("taesd_decoder", "taesd_encoder")
TOLERANCE = 1e-3  # max abs difference against torch, in pixel values of [-1, 1] / latent units


def _original_files(source: Path) -> tuple[Path, Path | None] | None:
    """(decoder, encoder or None) of the original single files, or None for another source."""
    folder = source if source.is_dir() else source.parent
    found = {}
    for name in ORIGINAL_NAMES:
        for suffix in (".safetensors", ".pth", ".pt"):
            if (folder / f"{name}{suffix}").is_file():
                found[name] = folder / f"{name}{suffix}"
                break
    if source.is_file() and not source.stem.startswith("taesd_decoder"):
        return None
    if "taesd_decoder" not in found:
        return None
    return found["taesd_decoder"], found.get("taesd_encoder")


def load_tiny_vae(source: Path):
    """diffusers' AutoencoderTiny from a diffusers folder or the original taesd files, eval mode;
    InputError when the source is neither (naming what was looked for)."""
    from diffusers import AutoencoderTiny

    from sdonnx.export.checkpoints import read_tensors

    source = Path(source)
    if not source.exists():
        raise InputError(f"TAESD source not found: {source}")
    if source.is_dir() and (source / "config.json").is_file():
        config = parts.read_json(source / "config.json")
        if config.get("_class_name") != "AutoencoderTiny":
            raise InputError(f"{source} is a {config.get('_class_name')} folder, not TAESD (AutoencoderTiny)")
        if config.get("latent_channels", 4) != 4 or config.get("scaling_factor", 1.0) != 1.0 \
                or config.get("shift_factor", 0.0) not in (0, 0.0, None):
            raise InputError(f"{source} is a TAESD for other latents (taesd3/taef1: 16 channels or a scaling); "
                             "SD 1.x/2.x take madebyollin/taesd (taesdxl is for SDXL and draws wrong colours)")
        try:
            return AutoencoderTiny.from_pretrained(source).eval()
        except (OSError, ValueError, RuntimeError) as e:
            raise InputError(f"{source}: cannot read its AutoencoderTiny weights ({str(e).splitlines()[0][:160]})") from None
    originals = _original_files(source)
    if originals is None:
        raise InputError(f"{source} is neither a diffusers AutoencoderTiny folder nor TAESD's original files "
                         f"({', '.join(n + '.pth' for n in ORIGINAL_NAMES)})")
    model = AutoencoderTiny()
    state = {}
    for path, prefix, shift in ((originals[0], "decoder.layers", -1), (originals[1], "encoder.layers", 0)):
        if path is None:
            continue
        for key, value in read_tensors(path).items():
            index, _, rest = key.partition(".")
            if not index.isdigit() or not rest:
                raise InputError(f"{path}: key {key!r} is not TAESD's layout (index.layer...); "
                                 "give the original taesd_decoder.pth or a diffusers AutoencoderTiny folder")
            state[f"{prefix}.{int(index) + shift}.{rest}"] = value
    own = model.state_dict()
    wanted = {k for k in own if originals[1] is not None or k.startswith("decoder.")}
    missing, unknown = sorted(wanted - set(state)), sorted(set(state) - set(own))
    wrong = [k for k in state if k in own and tuple(state[k].shape) != tuple(own[k].shape)]
    if missing or unknown or wrong:
        raise InputError(f"{source}: not TAESD for SD 1.x/2.x latents (missing {missing[:2]}, unexpected "
                         f"{unknown[:2]}, other shapes {wrong[:2]})")
    model.load_state_dict({**own, **state})
    if originals[1] is None:
        model.encoder = None  # no encoder file beside the decoder: the decoder alone
    return model.eval()


def _wrappers(model):
    """torch modules with the parts' contract: Decoder(latent_sample) -> pixels in [-1, 1],
    Encoder(sample) -> scaled latents (None without an encoder)."""
    import torch

    class Decoder(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.vae = model

        def forward(self, latent_sample):
            return self.vae.decode(latent_sample).sample

    class Encoder(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.vae = model

        def forward(self, sample):
            return self.vae.encode(sample).latents

    return Decoder().eval(), (Encoder().eval() if model.encoder is not None else None)


def add_tiny_vae(source: Path, folder: Path, log: Callable[[str], None] = lambda msg: None) -> dict:
    """Export TAESD from `source` into the model folder `folder` as tiny_vae_decoder (and
    tiny_vae_encoder when the source has an encoder), each checked against torch on random
    input (max abs diff <= TOLERANCE) and moved into place only then; an existing tiny VAE
    is replaced. Returns the parity figures recorded in sdonnx.json. Raises InputError for a
    bad source, ModelFolderError when the export disagrees with torch."""
    import onnx
    import onnxruntime as ort
    import torch

    from sdonnx.export.exporter import staged_folder
    from sdonnx.export.weights import save_part

    folder = Path(folder)
    model = load_tiny_vae(source)
    decoder, encoder = _wrappers(model)
    rng = np.random.default_rng(0)
    side = 8
    checks = {
        parts.TINY_VAE_DECODER: (decoder, rng.standard_normal((1, 4, side, side), dtype=np.float32)),
        parts.TINY_VAE_ENCODER: (encoder, rng.uniform(-1, 1, (1, 3, side * 8, side * 8)).astype(np.float32)),
    }
    figures = {}
    for part, (module, example) in checks.items():
        if module is None:
            continue
        (input_name,) = part.inputs
        with staged_folder(folder / part.name) as tmp:
            tmp.mkdir()
            target = tmp / parts.ONNX_FILE
            with torch.inference_mode():
                torch.onnx.export(module, (torch.from_numpy(example),), str(target), input_names=[input_name],
                                  output_names=[part.output], opset_version=17, dynamo=False,
                                  dynamic_axes={input_name: {0: "batch", 2: "height", 3: "width"},
                                                part.output: {0: "batch", 2: "height", 3: "width"}})
                reference = module(torch.from_numpy(example)).numpy()
            save_part(onnx.load(str(target)), target)
            ours = ort.InferenceSession(str(target), providers=["CPUExecutionProvider"]).run(
                None, {input_name: example})[0]
            diff = float(np.abs(ours - reference).max())
            if not diff <= TOLERANCE:
                raise ModelFolderError(f"TAESD's {part.name} disagrees with torch: max abs diff {diff:.3g} > "
                                       f"{TOLERANCE}; nothing was written")
            (tmp / "config.json").write_text(json.dumps(dict(model.config), indent=2, default=str) + "\n")
            figures[part.name] = {"max_abs_diff": diff, "input_shape": list(example.shape)}
            log(f"  {part.name}: max abs diff against torch {diff:.2e}")
    if encoder is None and parts.TINY_VAE_ENCODER.file(folder):
        shutil.rmtree(folder / parts.TINY_VAE_ENCODER.name)  # no longer matches the decoder
    record_file = folder / parts.RECORD
    record = parts.read_json(record_file)
    if record:  # a folder from another exporter keeps having no sdonnx.json
        recorded = record.setdefault("parts", {})
        recorded.pop(parts.TINY_VAE_ENCODER.name, None)
        recorded.update({name: {"precision": "fp32", "parity": f, "source": str(Path(source).resolve())}
                         for name, f in figures.items()})
        staged = record_file.with_name(f".{record_file.name}.tmp")
        staged.write_text(json.dumps(record, indent=2) + "\n")
        staged.replace(record_file)
    return figures

