"""Tiled VAE decode and encode (runtime/vae.py) against diffusers' tiled VAE and untiled decodes."""

from __future__ import annotations

import numpy as np
import pytest

from sdonnx.runtime import parts, vae
from sdonnx.runtime.errors import InputError

from conftest import psnr


def to_image(pixels: np.ndarray) -> np.ndarray:
    """(1, 3, H, W) decoder output in [-1, 1] -> (H, W, 3) uint8, as the pipeline rounds it."""
    return (np.clip(pixels[0].transpose(1, 2, 0) / 2 + 0.5, 0, 1) * 255).round().astype(np.uint8)


@pytest.fixture(scope="module")
def diffusers_vae(tiny_source):
    import torch
    from diffusers import AutoencoderKL

    model = AutoencoderKL.from_pretrained(tiny_source / "vae").eval()
    torch.manual_seed(0)
    return model


def test_tiled_decode_and_encode_match_diffusers_tiled_vae(tiny_pipeline, diffusers_vae):
    """Same latents, same tile settings (16-latent tiles, diffusers' 0.25 overlap) on a 40x56
    latent: sdonnx's tiles on onnxruntime against AutoencoderKL.enable_tiling() in torch.
    (Against an untiled decode tiles differ more: each tile's group norms and the decoder's
    mid-block attention see the tile alone; tests/benchmarks/README.md "Tiled VAE".)"""
    import torch

    tile = 16
    diffusers_vae.enable_tiling()
    diffusers_vae.tile_latent_min_size, diffusers_vae.tile_sample_min_size = tile, tile * parts.VAE_SCALE
    latents = np.random.default_rng(0).standard_normal((1, 4, 40, 56), dtype=np.float32)
    with torch.no_grad():
        want = diffusers_vae.decode(torch.from_numpy(latents)).sample.numpy()
        diffusers_vae.disable_tiling()
        whole = diffusers_vae.decode(torch.from_numpy(latents)).sample.numpy()
    scaled = latents * tiny_pipeline.vae_scaling_factor
    got = np.asarray(tiny_pipeline.decode(scaled, tiles=tile * parts.VAE_SCALE)[0])
    assert got.shape == (320, 448, 3)
    match = psnr(got, to_image(want))
    # The negative control: tiles differ from one piece by far more than sdonnx differs from
    # diffusers' tiles, so the match is not a property of any decode.
    control = psnr(to_image(whole), to_image(want))
    # And without the blend (tiles edge to edge) the check fails too.
    decoder = tiny_pipeline.vae_decoder
    run = lambda z: decoder(latent_sample=z.astype(np.float32))[parts.VAE_DECODER.output]  # noqa: E731
    unblended = psnr(to_image(vae.tiled(run, latents, tile, parts.VAE_SCALE, overlap=0.0)), to_image(want))
    print(f"tiled decode vs diffusers tiled: {match:.1f} dB; diffusers untiled vs tiled: {control:.1f} dB; "
          f"tiles without overlap vs diffusers tiled: {unblended:.1f} dB")
    assert match >= 40
    assert control < 40 and unblended < 40

    pixels = np.random.default_rng(1).uniform(-1, 1, (1, 3, 320, 448)).astype(np.float32)
    diffusers_vae.enable_tiling()
    diffusers_vae.tile_latent_min_size, diffusers_vae.tile_sample_min_size = tile, tile * parts.VAE_SCALE
    with torch.no_grad():
        mean = diffusers_vae.encode(torch.from_numpy(pixels)).latent_dist.mean.numpy()
    encoded = tiny_pipeline.encode_image(pixels, tiles=tile * parts.VAE_SCALE) / tiny_pipeline.vae_scaling_factor
    assert encoded.shape == mean.shape == (1, 4, 40, 56)
    assert np.abs(encoded - mean).max() <= 1e-3 * max(1.0, np.abs(mean).max())


def test_auto_tiles_only_above_the_vae_size(tiny_pipeline):
    assert tiny_pipeline.vae_tile_size == 512
    assert tiny_pipeline.vae_tile("auto", 64, 64) is None
    assert tiny_pipeline.vae_tile("auto", 64, 65) == 64
    assert tiny_pipeline.vae_tile("off", 1000, 1000) is None
    assert tiny_pipeline.vae_tile(128, 64, 64) == 16
    assert tiny_pipeline.vae_tile(128, 16, 16) is None


@pytest.mark.parametrize("bad", [0, 7, 100, -8, "big", 2.5, True])
def test_bad_tile_sizes_are_named(tiny_pipeline, bad):
    with pytest.raises(InputError, match="vae tiles must be auto, off, or a tile side"):
        tiny_pipeline.generate("x", steps=1, vae_tiles=bad)
