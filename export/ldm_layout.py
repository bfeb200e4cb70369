"""A diffusers SD 1.x folder as the single file the original (CompVis/LDM) code saves.

The key layout of `v1-5-pruned-emaonly.safetensors` and the fine-tunes built on it:
`model.diffusion_model.*` (the UNet, numbered `input_blocks` / `middle_block` /
`output_blocks`), `first_stage_model.*` (the KL autoencoder, `encoder.down.N.block.M` ...),
`cond_stage_model.transformer.*` (the transformers CLIP text model; SD 2.x: OpenCLIP's
`cond_stage_model.model.*`). Written for tests and
benchmarks, which need such files and cannot download one: the mapping is the inverse of the
one diffusers' `convert_ldm_*_checkpoint` apply when they read the original layout, and the
tests check the round trip through them tensor for tensor.
"""

from __future__ import annotations

import re
from pathlib import Path

UNET_PREFIX = "model.diffusion_model."
EMA_PREFIX = "model_ema."
VAE_PREFIX = "first_stage_model."
TEXT_PREFIX = "cond_stage_model.transformer."

_RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
           "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}
_VAE_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def _rename(key: str, table: dict[str, str]) -> str:
    head, _, tail = key.rpartition(".")  # tail: weight or bias
    for old, new in table.items():
        if head == old or head.startswith(old + "."):
            return new + head[len(old):] + "." + tail
    return key


def unet_to_ldm(state: dict, config: dict) -> dict:
    """diffusers UNet2DConditionModel weights -> `diffusion_model.*` names (without the prefix)."""
    levels = len(config["block_out_channels"])
    per = config["layers_per_block"]
    names: dict[str, str] = {
        "time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
        "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2",
        "mid_block.resnets.0": "middle_block.0", "mid_block.attentions.0": "middle_block.1",
        "mid_block.resnets.1": "middle_block.2",
        "class_embedding": "label_emb",  # the x4 upscaler's noise-level embedding (num_class_embeds)
    }
    for i in range(levels):
        for j in range(per):
            block = 1 + i * (per + 1) + j
            names[f"down_blocks.{i}.resnets.{j}"] = f"input_blocks.{block}.0"
            names[f"down_blocks.{i}.attentions.{j}"] = f"input_blocks.{block}.1"
        if i < levels - 1:
            names[f"down_blocks.{i}.downsamplers.0.conv"] = f"input_blocks.{1 + i * (per + 1) + per}.0.op"
        attention = config["up_block_types"][i].startswith("CrossAttn")
        for j in range(per + 1):
            block = i * (per + 1) + j
            names[f"up_blocks.{i}.resnets.{j}"] = f"output_blocks.{block}.0"
            names[f"up_blocks.{i}.attentions.{j}"] = f"output_blocks.{block}.1"
        if i < levels - 1:
            names[f"up_blocks.{i}.upsamplers.0.conv"] = f"output_blocks.{i * (per + 1) + per}.{2 if attention else 1}.conv"
    out = {}
    for key, value in state.items():
        resnet = re.fullmatch(r"(.*\.resnets\.\d+)\.(\w+)\.(weight|bias)", key)
        if resnet:
            block, layer, tail = resnet.groups()
            out[f"{names[block]}.{_RESNET[layer]}.{tail}"] = value
        else:
            out[_rename(key, names)] = value
    return out


def vae_to_ldm(state: dict, config: dict) -> dict:
    """diffusers AutoencoderKL weights -> `first_stage_model.*` names (without the prefix)."""
    levels = len(config["block_out_channels"])
    out = {}
    for key, value in state.items():
        new = key
        for side in ("encoder", "decoder"):
            new = new.replace(f"{side}.mid_block.resnets.0.", f"{side}.mid.block_1.")
            new = new.replace(f"{side}.mid_block.resnets.1.", f"{side}.mid.block_2.")
            new = new.replace(f"{side}.mid_block.attentions.0.", f"{side}.mid.attn_1.")
            new = new.replace(f"{side}.conv_norm_out.", f"{side}.norm_out.")
        for i in range(levels):
            new = new.replace(f"encoder.down_blocks.{i}.resnets.", f"encoder.down.{i}.block.")
            new = new.replace(f"encoder.down_blocks.{i}.downsamplers.0.", f"encoder.down.{i}.downsample.")
            # the decoder's up blocks run in the opposite order of the original's numbering
            new = new.replace(f"decoder.up_blocks.{i}.resnets.", f"decoder.up.{levels - 1 - i}.block.")
            new = new.replace(f"decoder.up_blocks.{i}.upsamplers.0.", f"decoder.up.{levels - 1 - i}.upsample.")
        new = new.replace(".conv_shortcut.", ".nin_shortcut.")
        if ".mid.attn_1." in new:
            new = _rename(new, {p + k: p + v for k, v in _VAE_ATTENTION.items()
                                for p in ("encoder.mid.attn_1.", "decoder.mid.attn_1.")})
            if new.endswith("weight") and value.ndim == 2:  # linear in diffusers, 1x1 conv in LDM
                value = value[:, :, None, None]
        out[new] = value
    return out


OPEN_CLIP_PREFIX = "cond_stage_model.model."
_OPEN_CLIP_LAYER = {"layer_norm1": "ln_1", "layer_norm2": "ln_2", "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj",
                    "self_attn.out_proj": "attn.out_proj"}


def text_to_open_clip(state: dict) -> dict:
    """transformers CLIPTextModel weights -> OpenCLIP's names (SD 2.x's `cond_stage_model.model.*`,
    without the prefix): q, k and v projections concatenated into one in_proj per layer."""
    import torch

    out = {"token_embedding.weight": state["text_model.embeddings.token_embedding.weight"],
           "positional_embedding": state["text_model.embeddings.position_embedding.weight"],
           "ln_final.weight": state["text_model.final_layer_norm.weight"],
           "ln_final.bias": state["text_model.final_layer_norm.bias"]}
    layers = sorted({int(k.split(".")[3]) for k in state if k.startswith("text_model.encoder.layers.")})
    for i in layers:
        hf, oc = f"text_model.encoder.layers.{i}.", f"transformer.resblocks.{i}."
        for kind in ("weight", "bias"):
            out[oc + f"attn.in_proj_{kind}"] = torch.cat([state[hf + f"self_attn.{p}_proj.{kind}"] for p in "qkv"])
            for old, new in _OPEN_CLIP_LAYER.items():
                out[oc + f"{new}.{kind}"] = state[hf + f"{old}.{kind}"]
    return out


def write_single_file(folder: str | Path, path: str | Path, *, dtype: str = "fp32", ema: str = "none",
                      include_vae: bool = True, text_encoder: str = "clip") -> Path:
    """Write the diffusers SD 1.x pipeline in `folder` as one LDM-layout checkpoint at `path`.

    `path` ending in .safetensors or .ckpt (a torch pickle of {"state_dict": ...}, as the
    original training saved it); `dtype` fp32 or fp16; `ema` "none", "only" (the EMA weights
    stored as the model's, as in *-emaonly files) or "both" (`model_ema.*` holds a second copy,
    here the UNet's weights times 0.5 so that the two differ); `include_vae` False leaves the
    autoencoder out (a separate VAE file then); `text_encoder` "open_clip" stores the text
    encoder in OpenCLIP's layout, as SD 2.x checkpoints do. Returns `path`.
    """
    import json

    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel

    folder, path = Path(folder), Path(path)
    unet = UNet2DConditionModel.from_pretrained(folder / "unet")
    state = {UNET_PREFIX + k: v for k, v in unet_to_ldm(unet.state_dict(), dict(unet.config)).items()}
    if ema == "both":
        # The original's EMA names drop the dots after `model_ema.`: diffusion_modelinput_blocks00weight.
        state.update({EMA_PREFIX + k[len("model."):].replace(".", ""): v * 0.5
                      for k, v in list(state.items())})
    if include_vae:
        vae = AutoencoderKL.from_pretrained(folder / "vae")
        state.update({VAE_PREFIX + k: v for k, v in vae_to_ldm(vae.state_dict(), dict(vae.config)).items()})
    text = CLIPTextModel.from_pretrained(folder / "text_encoder").state_dict()
    if text_encoder == "open_clip":
        state.update({OPEN_CLIP_PREFIX + k: v for k, v in text_to_open_clip(text).items()})
    else:
        state.update({TEXT_PREFIX + k: v for k, v in text.items() if "position_ids" not in k})
    torch_dtype = {"fp32": torch.float32, "fp16": torch.float16}[dtype]
    state = {k: v.detach().to(torch_dtype).contiguous() for k, v in state.items()}
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file(state, str(path), metadata={"format": "pt", "made_by": json.dumps("sdonnx ldm_layout")})
    else:
        torch.save({"state_dict": state, "global_step": 0}, path)
    return path


def write_vae_file(folder: str | Path, path: str | Path) -> Path:
    """The autoencoder of `folder` alone, in LDM names without a prefix, as VAE files such as
    vae-ft-mse-840000-ema-pruned.safetensors store it."""
    from diffusers import AutoencoderKL
    from safetensors.torch import save_file

    vae = AutoencoderKL.from_pretrained(Path(folder) / "vae")
    save_file({k: v.contiguous() for k, v in vae_to_ldm(vae.state_dict(), dict(vae.config)).items()}, str(path))
    return Path(path)
