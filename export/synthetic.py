"""Randomly initialised Stable Diffusion pipelines, built offline for tests and benchmarks.

The parts are the SD 1.x classes (CLIP text encoder, cross-attention UNet, KL autoencoder with
a latent downscale of 8), saved in diffusers format so the export stage treats them exactly
like a real checkpoint. `tiny` has about 2.7 M parameters; `sd15` is the exact SD 1.5
architecture (860 M-parameter UNet) and `sd21` SD 2.1's (865 M, SD-Turbo's too) for memory
and speed measurements.
"""

from __future__ import annotations

import json
from pathlib import Path

from sdonnx.export.clip_vocab import write_tokenizer_files

# Stable Diffusion 1.5's scheduler configuration.
SD15_SCHEDULER = dict(
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    num_train_timesteps=1000,
    set_alpha_to_one=False,
    skip_prk_steps=True,
    steps_offset=1,
)


# Architecture of each preset: (UNet, VAE, CLIP text encoder) keyword arguments.
PRESETS = {
    "tiny": (
        dict(
            block_out_channels=(32, 64),
            layers_per_block=1,
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=32,
            attention_head_dim=8,
            norm_num_groups=16,
        ),
        dict(block_out_channels=(16, 16, 32, 32), layers_per_block=1, norm_num_groups=8),
        dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
             projection_dim=32),
    ),
    "sd15": (
        dict(
            block_out_channels=(320, 640, 1280, 1280),
            layers_per_block=2,
            down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
            up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
            cross_attention_dim=768,
            attention_head_dim=8,
            norm_num_groups=32,
        ),
        dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2, norm_num_groups=32),
        dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
             num_attention_heads=12, projection_dim=768),
    ),
    # SD 2.1 (and SD-Turbo, distilled from it): linear attention projections, per-level head
    # widths, OpenCLIP ViT-H's text tower (1024 wide, 23 layers as SD 2 uses it).
    "sd21": (
        dict(
            block_out_channels=(320, 640, 1280, 1280),
            layers_per_block=2,
            down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
            up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
            cross_attention_dim=1024,
            attention_head_dim=(5, 10, 20, 20),
            use_linear_projection=True,
            norm_num_groups=32,
        ),
        dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2, norm_num_groups=32),
        dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=23,
             num_attention_heads=16, projection_dim=512, hidden_act="gelu"),
    ),
}


def build_random_pipeline(
    out_dir: str | Path,
    *,
    preset: str = "tiny",
    seed: int = 0,
    prediction_type: str = "epsilon",
    timestep_spacing: str | None = None,
    output_gain: float = 1.0,
    time_gain: float = 1.0,
    sample_size: int | None = None,
    in_channels: int = 4,
    time_cond_proj_dim: int | None = None,
) -> Path:
    """Write a randomly initialised SD pipeline to `out_dir` (diffusers format).

    A random UNet's prediction barely depends on its input or timestep; `output_gain` scales
    its output convolution and `time_gain` its timestep embedding, so that a wrong timestep,
    sampler or guidance scale visibly changes the image.
    `sample_size` is the image side in pixels (64 for tiny, 512 for sd15 by default).
    `in_channels=9` makes an inpainting model (latents + mask + masked-image latents).
    `time_cond_proj_dim` makes an LCM-distilled model (a guidance-embedding input,
    LatentConsistencyModelPipeline with LCMScheduler, as latent-consistency/lcm-lora's models are).
    """
    import torch
    from diffusers import (
        AutoencoderKL,
        PNDMScheduler,
        StableDiffusionPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    out_dir = Path(out_dir)
    torch.manual_seed(seed)
    unet_args, vae_args, text_args = PRESETS[preset]
    sample_size = sample_size or (64 if preset == "tiny" else 512)
    unet = UNet2DConditionModel(sample_size=sample_size // 8, in_channels=in_channels, out_channels=4,
                                time_cond_proj_dim=time_cond_proj_dim, **unet_args)
    with torch.no_grad():
        unet.conv_out.weight.mul_(output_gain)
        unet.conv_out.bias.mul_(output_gain)
        unet.time_embedding.linear_2.weight.mul_(time_gain)
        unet.time_embedding.linear_2.bias.mul_(time_gain)
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        latent_channels=4,
        sample_size=sample_size,
        **vae_args,
    )
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=49408,
            max_position_embeddings=77,
            bos_token_id=49406,
            eos_token_id=49407,
            pad_token_id=49407,
            **{"hidden_act": "quick_gelu", **text_args},
        )
    )
    tokenizer_dir = out_dir / "tokenizer"
    write_tokenizer_files(tokenizer_dir)
    tokenizer = CLIPTokenizer(
        tokenizer_dir / "vocab.json",
        tokenizer_dir / "merges.txt",
        pad_token="<|endoftext|>",
        model_max_length=77,
    )
    scheduler_config = dict(SD15_SCHEDULER, prediction_type=prediction_type)
    if timestep_spacing is not None:
        scheduler_config["timestep_spacing"] = timestep_spacing
    scheduler = PNDMScheduler(**scheduler_config)
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    if time_cond_proj_dim is not None:
        from diffusers import LatentConsistencyModelPipeline, LCMScheduler

        pipe = LatentConsistencyModelPipeline(
            vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
            scheduler=LCMScheduler.from_config(scheduler.config), safety_checker=None, feature_extractor=None,
            requires_safety_checker=False,
        )
    pipe.save_pretrained(out_dir)
    # PNDMScheduler does not take SD 1.5's `clip_sample: false`, but DDIMScheduler reads it
    # (and defaults to True), so write it as real checkpoints carry it.
    config_file = out_dir / "scheduler" / "scheduler_config.json"
    config = json.loads(config_file.read_text())
    config["clip_sample"] = False
    config_file.write_text(json.dumps(config, indent=2))
    return out_dir


# stabilityai/stable-diffusion-x4-upscaler's architecture, and a tiny one of the same shape
# (7 input channels: latents + the noised low-resolution image; the noise level as a class
# label; a VAE of three levels, 4x, scaling factor 0.08333): (UNet, VAE, text encoder).
UPSCALER_PRESETS = {
    "tiny": (
        dict(block_out_channels=(32, 32, 64), layers_per_block=1,
             down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
             up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
             cross_attention_dim=32, attention_head_dim=8, use_linear_projection=True,
             only_cross_attention=(True, True, False), num_class_embeds=100, norm_num_groups=16),
        dict(block_out_channels=(16, 16, 32), layers_per_block=1, norm_num_groups=8),
        PRESETS["tiny"][2],
    ),
    "x4": (
        dict(block_out_channels=(256, 512, 512, 1024), layers_per_block=2,
             down_block_types=("DownBlock2D",) + ("CrossAttnDownBlock2D",) * 3,
             up_block_types=("CrossAttnUpBlock2D",) * 3 + ("UpBlock2D",),
             cross_attention_dim=1024, attention_head_dim=8, use_linear_projection=True,
             only_cross_attention=(True, True, True, False), num_class_embeds=1000, norm_num_groups=32),
        dict(block_out_channels=(128, 256, 512), layers_per_block=2, norm_num_groups=32),
        PRESETS["sd21"][2],
    ),
}
# Its schedulers: DDIM on v-prediction for sampling, and the DDPM schedule whose noise level
# (0 to max_noise_level) noises the low-resolution image.
UPSCALER_SCHEDULER = dict(beta_start=0.0001, beta_end=0.02, beta_schedule="scaled_linear", num_train_timesteps=1000,
                          clip_sample=False, set_alpha_to_one=False, steps_offset=1, prediction_type="v_prediction")
UPSCALER_LOW_RES_SCHEDULER = dict(beta_start=0.0001, beta_end=0.02, beta_schedule="scaled_linear",
                                  num_train_timesteps=1000, clip_sample=False)


def build_random_upscaler(out_dir: str | Path, preset: str = "tiny", seed: int = 0, output_gain: float = 1.0) -> Path:
    """Write a randomly initialised StableDiffusionUpscalePipeline (diffusers format) with the
    architecture of `preset` (UPSCALER_PRESETS), the real CLIP vocabulary, max_noise_level
    350; `output_gain` scales the UNet's output (test models: see build_random_pipeline)."""
    import torch
    from diffusers import AutoencoderKL, DDIMScheduler, DDPMScheduler, StableDiffusionUpscalePipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    out_dir = Path(out_dir)
    torch.manual_seed(seed)
    unet_args, vae_args, text_args = UPSCALER_PRESETS[preset]
    unet = UNet2DConditionModel(sample_size=128 if preset == "x4" else 32, in_channels=7, out_channels=4, **unet_args)
    with torch.no_grad():
        unet.conv_out.weight.mul_(output_gain)
        unet.conv_out.bias.mul_(output_gain)
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, scaling_factor=0.08333,
                        down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
                        sample_size=256 if preset == "x4" else 64, **vae_args)
    text_encoder = CLIPTextModel(CLIPTextConfig(vocab_size=49408, max_position_embeddings=77, bos_token_id=49406,
                                                eos_token_id=49407, pad_token_id=49407,
                                                **{"hidden_act": "quick_gelu", **text_args}))
    tokenizer_dir = out_dir / "tokenizer"
    write_tokenizer_files(tokenizer_dir)
    tokenizer = CLIPTokenizer(tokenizer_dir / "vocab.json", tokenizer_dir / "merges.txt",
                              pad_token="<|endoftext|>", model_max_length=77)
    pipe = StableDiffusionUpscalePipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
        low_res_scheduler=DDPMScheduler(**UPSCALER_LOW_RES_SCHEDULER), scheduler=DDIMScheduler(**UPSCALER_SCHEDULER),
        max_noise_level=350)
    pipe.save_pretrained(out_dir)
    return out_dir


def main() -> None:
    import argparse

    parser = argparse.ArgumentParser(description="Write a randomly initialised SD pipeline (diffusers format).")
    parser.add_argument("out", type=Path)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="tiny")
    parser.add_argument("--upscaler", choices=sorted(UPSCALER_PRESETS),
                        help="Write an x4 upscaler (StableDiffusionUpscalePipeline) of this architecture instead.")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.out.exists():
        parser.error(f"{args.out} already exists")
    if args.upscaler:
        build_random_upscaler(args.out, preset=args.upscaler, seed=args.seed)
    else:
        build_random_pipeline(args.out, preset=args.preset, seed=args.seed)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
