"""Stable Diffusion's x4 upscaler (diffusers' StableDiffusionUpscalePipeline) -> ONNX parts.

optimum has no exporter for it, so its three parts go through torch's ONNX exporter here, in
the layout of every sdonnx folder (runtime/parts.py): text_encoder (input_ids ->
last_hidden_state), unet (sample of 7 channels: latents + the noised low-resolution image,
timestep, encoder_hidden_states, class_labels: the noise level), vae_decoder (latent_sample
-> sample; 3 levels, so 4x, scaling factor 0.08333). Each is checked against torch on random
input as export/parity.py checks the others. The folder also keeps low_res_scheduler/ (the
DDPM schedule that noises the low-resolution image) and model_index.json (max_noise_level).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Callable

import numpy as np

from sdonnx.export.parity import PartParity, _compare
from sdonnx.export.torch_parts import export_module, run_exported
from sdonnx.runtime import parts
from sdonnx.runtime.upscale import LOW_RES_SCHEDULER

# The check's sizes: latents of CHECK_SIDE (a multiple of the UNet's 8), two rows (a CFG pair).
CHECK_SIDE = 16


def _check(name: str, module, example: dict, target: Path) -> PartParity:
    import torch

    with torch.no_grad():
        reference = module(*(torch.from_numpy(v) for v in example.values())).numpy()
    return _compare(name, reference, run_exported(target, example)[0], next(iter(example.values())).shape)


def _modules(source: Path):
    """(part, torch module, example inputs, dynamic axes, config) for each part, loaded one at
    a time (the previous one is released when the caller moves on)."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel

    rng = np.random.default_rng(0)

    class Wrapped(torch.nn.Module):
        def __init__(self, model, call):
            super().__init__()
            self.model, self.call = model, call

        def forward(self, *inputs):
            return self.call(self.model, *inputs)

    text_encoder = CLIPTextModel.from_pretrained(source / "text_encoder", local_files_only=True).float().eval()
    width = text_encoder.config.hidden_size
    ids = {"input_ids": rng.integers(0, text_encoder.config.vocab_size, (2, 77)).astype(np.int64)}
    yield (parts.TEXT_ENCODER, Wrapped(text_encoder, lambda m, i: m(i).last_hidden_state).eval(), ids,
           {"input_ids": {0: "batch"}}, text_encoder.config.to_dict())
    del text_encoder

    unet = UNet2DConditionModel.from_pretrained(source / "unet", local_files_only=True).float().eval()
    example = {
        "sample": rng.standard_normal((2, unet.config.in_channels, CHECK_SIDE, CHECK_SIDE), dtype=np.float32),
        "timestep": np.full((2,), 501.0, dtype=np.float32),
        "encoder_hidden_states": rng.standard_normal((2, 77, width), dtype=np.float32),
        "class_labels": np.full((2,), 20, dtype=np.int64),
    }
    spatial = {0: "batch", 2: "height", 3: "width"}
    yield (parts.UNET, Wrapped(unet, lambda m, x, t, c, k: m(x, t, c, class_labels=k).sample).eval(), example,
           {"sample": spatial, "timestep": {0: "batch"}, "encoder_hidden_states": {0: "batch"},
            "class_labels": {0: "batch"}}, dict(unet.config))
    del unet

    vae = AutoencoderKL.from_pretrained(source / "vae", local_files_only=True).float().eval()
    latents = {"latent_sample": rng.standard_normal((1, vae.config.latent_channels, CHECK_SIDE, CHECK_SIDE),
                                                    dtype=np.float32)}
    yield (parts.VAE_DECODER, Wrapped(vae, lambda m, z: m.decode(z).sample).eval(), latents,
           {"latent_sample": spatial}, dict(vae.config))


def export_upscaler(source: Path, tmp: Path, opset: int | None = None,
                    log: Callable[[str], None] = lambda msg: None) -> None:
    """Write the upscaler's parts (text_encoder, unet, vae_decoder), their configs, the
    tokenizer and both schedulers from the diffusers folder `source` into `tmp` (the folder
    the exporter checks with check_upscaler and renames into place)."""
    for part, module, example, dynamic, config in _modules(source):
        target = tmp / part.onnx_path
        export_module(module, example, target, [part.output],
                      {**dynamic, part.output: dynamic[next(iter(example))]}, opset)
        (target.parent / "config.json").write_text(json.dumps(config, indent=2, default=str) + "\n")
        log(f"  wrote {part.name}")
    for sub in ("tokenizer", "scheduler", LOW_RES_SCHEDULER):
        shutil.copytree(source / sub, tmp / sub)
    shutil.copyfile(source / "model_index.json", tmp / "model_index.json")


def check_upscaler(source: Path, folder: Path) -> list[PartParity]:
    """Max abs difference per part, torch (source) against ONNX Runtime (the exported
    `folder`), on random inputs: CHECK_SIDE latents, a CFG pair."""
    return [_check(part.name, module, example, folder / part.onnx_path)
            for part, module, example, _, _ in _modules(source)]
