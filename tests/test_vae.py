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


def test_blended_tiles_match_diffusers_tiled_vae(tiny_pipeline, diffusers_vae):
    """vae.tiled, the tiling of folders without stages (and of TAESD): same latents, same tile
    settings (16-latent tiles, diffusers' 0.25 overlap) on a 40x56 latent, against
    AutoencoderKL.enable_tiling() in torch, decode and encode."""
    import torch

    tile = 16
    diffusers_vae.enable_tiling()
    diffusers_vae.tile_latent_min_size, diffusers_vae.tile_sample_min_size = tile, tile * parts.VAE_SCALE
    latents = np.random.default_rng(0).standard_normal((1, 4, 40, 56), dtype=np.float32)
    with torch.no_grad():
        want = diffusers_vae.decode(torch.from_numpy(latents)).sample.numpy()
        diffusers_vae.disable_tiling()
        whole = diffusers_vae.decode(torch.from_numpy(latents)).sample.numpy()
    decoder = tiny_pipeline.vae_decoder
    run = lambda z: decoder(latent_sample=z.astype(np.float32))[parts.VAE_DECODER.output]  # noqa: E731
    got = vae.tiled(run, latents, tile, parts.VAE_SCALE)
    assert got.shape == (1, 3, 320, 448)
    match = psnr(to_image(got), to_image(want))
    # The negative controls: tiles differ from one piece by far more than sdonnx differs from
    # diffusers' tiles, so the match is not a property of any decode; and without the blend
    # (tiles edge to edge) the check fails too.
    control = psnr(to_image(whole), to_image(want))
    unblended = psnr(to_image(vae.tiled(run, latents, tile, parts.VAE_SCALE, overlap=0.0)), to_image(want))
    print(f"blended tiles vs diffusers tiled: {match:.1f} dB; diffusers untiled vs tiled: {control:.1f} dB; "
          f"tiles without overlap vs diffusers tiled: {unblended:.1f} dB")
    assert match >= 40
    assert control < 40 and unblended < 40

    pixels = np.random.default_rng(1).uniform(-1, 1, (1, 3, 320, 448)).astype(np.float32)
    diffusers_vae.enable_tiling()
    with torch.no_grad():
        mean = diffusers_vae.encode(torch.from_numpy(pixels)).latent_dist.mean.numpy()
    diffusers_vae.disable_tiling()
    encoder = tiny_pipeline.vae_encoder
    encode = lambda x: encoder(sample=x)[parts.VAE_ENCODER.output]  # noqa: E731
    encoded = vae.tiled(encode, pixels, tile * parts.VAE_SCALE, 1 / parts.VAE_SCALE)[:, :4]
    assert encoded.shape == mean.shape == (1, 4, 40, 56)
    assert np.abs(encoded - mean).max() <= 1e-3 * max(1.0, np.abs(mean).max())


def _staged(folder, part, halo=None):
    """The part's StagedVae on onnxruntime; `halo` replaces every band stage's halo (controls)."""
    from sdonnx.runtime.onnx_model import OnnxModel

    plan = vae.StagedVae.read_plan(folder / part.name)
    assert plan is not None, f"{folder / part.name} has no current stage plan"
    if halo is not None:
        plan = {**plan, "stages": [{**s, "halo": halo if s["halo"] is not None else None} for s in plan["stages"]]}
    return vae.StagedVae(plan, lambda s: OnnxModel(folder / part.name / s["file"],
                                                   parts.Part(s["file"], tuple(s["inputs"]), s["outputs"][0])))


def test_tiled_decode_and_encode_equal_the_untiled_ones(tiny_onnx, tiny_pipeline, diffusers_vae):
    """A 40x56 latent decoded in 128-px tiles (bands of 7 latent rows: six bands) through the
    stages `sdonnx export` wrote: equal to the untiled decode in sdonnx and in diffusers, where
    diffusers' own tiles differ by 23 dB. The same for the encoder. Negative controls: bands
    without their overlap rows, and with each band's own group-norm statistics."""
    import torch

    latents = np.random.default_rng(0).standard_normal((1, 4, 40, 56), dtype=np.float32)
    scaled = latents * tiny_pipeline.vae_scaling_factor
    tiled = np.asarray(tiny_pipeline.decode(scaled, tiles=128)[0])
    untiled = np.asarray(tiny_pipeline.decode(scaled, tiles="off")[0])
    with torch.no_grad():
        reference = to_image(diffusers_vae.decode(torch.from_numpy(latents)).sample.numpy())
    assert tiled.shape == (320, 448, 3)
    no_halo = to_image(_staged(tiny_onnx, parts.VAE_DECODER, halo=0)(latents, 7))
    print(f"staged tiles vs untiled: {psnr(tiled, untiled):.1f} dB, vs diffusers untiled "
          f"{psnr(tiled, reference):.1f} dB; without overlap rows {psnr(no_halo, untiled):.1f} dB")
    assert psnr(tiled, untiled) >= 60 and psnr(tiled, reference) >= 45
    assert psnr(no_halo, untiled) < 40

    # Each band normalized by its own statistics (what tiles without the stages do).
    staged = _staged(tiny_onnx, parts.VAE_DECODER)
    per_band = []
    for a in range(0, 40, 7):
        rows = vae.StagedVae(staged.plan, staged.open_stage)(latents[:, :, max(0, a - 6):a + 13], 100)
        per_band.append(rows[:, :, (a - max(0, a - 6)) * 8:(a - max(0, a - 6) + 7) * 8])
    own_stats = to_image(np.concatenate(per_band, axis=2))
    print(f"bands with their own group-norm statistics: {psnr(own_stats, untiled):.1f} dB")
    assert psnr(own_stats, untiled) < 40

    pixels = np.random.default_rng(1).uniform(-1, 1, (1, 3, 320, 448)).astype(np.float32)
    encoded = tiny_pipeline.encode_image(pixels, tiles=128)
    whole = tiny_pipeline.encode_image(pixels, tiles="off")
    with torch.no_grad():
        mean = diffusers_vae.encode(torch.from_numpy(pixels)).latent_dist.mean.numpy()
    assert np.abs(encoded - whole).max() <= 1e-5 * np.abs(whole).max()
    assert np.abs(encoded / tiny_pipeline.vae_scaling_factor - mean).max() <= 1e-4 * np.abs(mean).max()


def test_passed_tensors_spill_to_a_file_with_the_same_result(tiny_onnx, monkeypatch):
    """Tensors between stages over SPILL_BYTES go through a temporary file: same output."""
    latents = np.random.default_rng(2).standard_normal((1, 4, 24, 32), dtype=np.float32)
    staged = _staged(tiny_onnx, parts.VAE_DECODER)
    in_memory = staged(latents, 5)
    files = []
    real = vae._Rows.__init__

    def spy(self, *args):
        real(self, *args)
        files.append(self.file is not None)

    monkeypatch.setattr(vae, "SPILL_BYTES", 1024)
    monkeypatch.setattr(vae._Rows, "__init__", spy)
    spilled = staged(latents, 5)
    assert any(files) and np.array_equal(spilled, in_memory)


def test_attention_over_wide_bands_above_the_whole_size(tiny_onnx, monkeypatch):
    """Above WHOLE_LATENT_PIXELS the mid-block attention runs over bands with WIDE_HALO rows of
    context: close to one piece, not equal to it (the control that the bands were used)."""
    latents = np.random.default_rng(4).standard_normal((1, 4, 40, 56), dtype=np.float32)
    staged = _staged(tiny_onnx, parts.VAE_DECODER)
    whole = to_image(staged(latents, 5))
    monkeypatch.setattr(vae, "WHOLE_LATENT_PIXELS", 0)
    monkeypatch.setattr(vae, "WIDE_HALO", 4)
    banded = to_image(staged(latents, 5))
    print(f"mid-block attention over bands of 5 + 2 x 4 rows vs whole: {psnr(banded, whole):.1f} dB")
    assert 30 <= psnr(banded, whole) < 60


def test_stages_of_changed_weights_are_not_used(tiny_onnx, tmp_path):
    """A part whose weights changed after its stages were written (another VAE's files copied
    in, even of the same size) tiles by blending instead of running stale stages; a damaged
    plan is named."""
    import shutil

    from sdonnx.runtime.errors import ModelFolderError

    folder = tmp_path / "vae_decoder"
    shutil.copytree(tiny_onnx / "vae_decoder", folder)
    assert vae.StagedVae.read_plan(folder) is not None
    data = folder / parts.EXTERNAL_DATA_FILE
    values = np.fromfile(data, np.uint8)
    values[-1] ^= 1  # one bit of the last weight, same size
    values.tofile(data)
    assert vae.StagedVae.read_plan(folder) is None
    (folder / parts.VAE_STAGES).write_text('{"format": 1, "stages": [{"file": "missing.onnx"}]}')
    with pytest.raises(ModelFolderError, match="not a stage plan sdonnx can read; export the model again"):
        vae.StagedVae.read_plan(folder)


@pytest.mark.parametrize("provider", ["cpu", "openvino"])
def test_the_embedded_models_vae_tiles_at_512_equal_one_piece(provider):
    """The issue's figure on the embedded model: 512x512 in 256-px tiles against one piece,
    on onnxruntime (fp32) and OpenVINO (its default precision: bf16 where the CPU has it,
    whose rounding differs between the stages and the whole graph)."""
    from sdonnx.runtime.pipeline import Pipeline

    pipe = Pipeline.load(provider=provider)
    latents = np.random.default_rng(3).standard_normal((1, 4, 64, 64), dtype=np.float32)
    tiled = np.asarray(pipe.decode(latents, tiles=256)[0])
    whole = np.asarray(pipe.decode(latents, tiles="off")[0])
    print(f"embedded model, {provider} {pipe.config.precision}, 512x512, 256-px tiles vs one piece: "
          f"{psnr(tiled, whole):.1f} dB")
    assert psnr(tiled, whole) >= (60 if pipe.config.precision == "fp32" else 40)


def test_auto_tiles_in_256_pixel_stages_on_onnxruntime_else_only_above_the_vae_size(tiny_onnx, tmp_path):
    """auto: a VAE with stages on onnxruntime runs in 256-pixel pieces above 256 pixels (the
    one-piece picture, half the memory); without stages (or on OpenVINO, or TAESD) in one piece
    up to the VAE's size and in pieces of that size above it."""
    import shutil

    from sdonnx.export import vae_stages
    from sdonnx.runtime import pipeline as pipeline_module
    from sdonnx.runtime.pipeline import Pipeline

    staged = Pipeline.load(tiny_onnx, provider="cpu")
    assert staged.vae_tile_size == 512
    assert staged.vae_tile("auto", 32, 32) is None
    assert staged.vae_tile("auto", 64, 64) == staged.vae_tile("auto", 33, 20) == 32
    assert staged.vae_tile("auto", 64, 64, parts.VAE_ENCODER) == 32
    assert staged.vae_tile("auto", 64, 64, parts.TINY_VAE_DECODER) is None  # (TAESD has no stages)
    folder = tmp_path / "onnx"
    shutil.copytree(tiny_onnx, folder)
    vae_stages.remove_stages(folder / "vae_decoder")
    plain = Pipeline.load(folder, provider="cpu")
    assert plain.vae_tile("auto", 64, 64) is None
    assert plain.vae_tile("auto", 64, 65) == 64
    assert plain.vae_tile("auto", 64, 64, parts.VAE_ENCODER) == 32  # (the encoder kept its stages)
    if pipeline_module.providers.PROVIDERS["openvino"].available():
        assert Pipeline.load(tiny_onnx, provider="openvino").vae_tile("auto", 64, 64) is None
    for pipe in (staged, plain):
        assert pipe.vae_tile("off", 1000, 1000) is None
        assert pipe.vae_tile(128, 64, 64) == 16
        assert pipe.vae_tile(128, 16, 16) is None


@pytest.mark.parametrize("bad", [0, 7, 100, -8, "big", 2.5, True])
def test_bad_tile_sizes_are_named(tiny_pipeline, bad):
    with pytest.raises(InputError, match="vae tiles must be auto, off, or a tile side"):
        tiny_pipeline.generate("x", steps=1, vae_tiles=bad)
