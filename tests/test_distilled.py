"""Few-step models against diffusers on tiny random models: an LCM-distilled UNet (guidance as
an embedding input, no unconditional pass) against LatentConsistencyModelPipeline, a Turbo-style
config (trailing timesteps, guidance 0) at 1 and 4 steps against StableDiffusionPipeline, and
TAESD decode and encode against AutoencoderTiny; cheap previews never run the full VAE.

LCM sampling adds fresh noise between steps; diffusers' LCMScheduler draws it with torch, so
the reference is given sdonnx's numpy noise stream for the image (Pipeline.sampler_noise).
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from sdonnx import Pipeline
from sdonnx.runtime import pipeline as pipeline_module
from sdonnx.runtime.errors import InputError

from conftest import OUTPUT_GAIN, TIME_GAIN, _export, psnr

PARITY_DB = 45.0
SIZE = 64
PROMPT = "a red circle on a white background"


def latents(seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((1, 4, SIZE // 8, SIZE // 8)).astype(np.float32)


def to_uint8(images) -> np.ndarray:
    return (images[0] * 255).round().astype(np.uint8)


@pytest.fixture(scope="module")
def lcm_source(tmp_path_factory):
    from sdonnx.export.synthetic import build_random_pipeline

    return build_random_pipeline(tmp_path_factory.mktemp("lcm") / "diffusers", seed=3, time_cond_proj_dim=32,
                                 output_gain=OUTPUT_GAIN, time_gain=TIME_GAIN)


@pytest.fixture(scope="module")
def lcm_pipeline(lcm_source, tmp_path_factory):
    return Pipeline.load(_export(lcm_source, tmp_path_factory, "lcm-export"), provider="cpu")


@pytest.fixture(scope="module")
def lcm_reference(lcm_source):
    import diffusers

    pipe = diffusers.LatentConsistencyModelPipeline.from_pretrained(lcm_source, safety_checker=None)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def reference_lcm(pipe, monkeypatch, steps: int, guidance: float, seed: int = 0) -> np.ndarray:
    from diffusers.schedulers import scheduling_lcm

    stream = np.random.default_rng([seed, 1])  # Pipeline.sampler_noise's stream for image 0

    def given_noise(shape, generator=None, device=None, dtype=None, layout=None):
        return torch.from_numpy(stream.standard_normal(shape[1:], dtype=np.float32)[None]).to(dtype)

    monkeypatch.setattr(scheduling_lcm, "randn_tensor", given_noise)
    out = pipe(PROMPT, num_inference_steps=steps, guidance_scale=guidance, width=SIZE, height=SIZE,
               latents=torch.from_numpy(latents()), output_type="np").images
    return to_uint8(out)


def ours(pipe, **options) -> np.ndarray:
    image = pipe.generate(PROMPT, width=SIZE, height=SIZE, latents=latents(), seed=0, **options)[0]
    return np.asarray(image)


def test_an_lcm_model_records_its_settings(lcm_pipeline):
    record = json.loads((lcm_pipeline.config.path / "sdonnx.json").read_text())
    assert record["defaults"] == {"sampler": "lcm", "steps": 4, "guidance": 8.5}
    assert lcm_pipeline.guidance_embedding_dim == 32
    assert "timestep_cond" in lcm_pipeline.unet.input_types


@pytest.mark.parametrize("steps,guidance", [(4, 8.0), (1, 8.0), (4, 2.0)])
def test_an_lcm_model_matches_diffusers(lcm_pipeline, lcm_reference, monkeypatch, steps, guidance):
    want = reference_lcm(lcm_reference, monkeypatch, steps, guidance)
    assert want.std() > 10, "the reference image is flat; the test model is too weak"
    assert psnr(ours(lcm_pipeline, steps=steps, guidance=guidance), want) >= PARITY_DB


def test_the_guidance_embedding_must_be_of_w_minus_1(lcm_pipeline, lcm_reference, monkeypatch):
    """Negative control: the embedding of w instead of w - 1 fails the bar."""
    want = reference_lcm(lcm_reference, monkeypatch, 4, 8.0)
    right = pipeline_module.guidance_embedding
    monkeypatch.setattr(pipeline_module, "guidance_embedding", lambda w, dim: right(w + 1.0, dim))
    assert psnr(ours(lcm_pipeline, steps=4, guidance=8.0), want) < PARITY_DB


def test_the_guidance_embedding_equals_diffusers(lcm_reference):
    """Both in float32; numpy's and torch's exp differ by an ulp, which the angles (up to
    (w - 1) x 1000 radians) scale up to ~1e-4 in their sines."""
    for w in (1.0, 2.5, 8.0, 15.0):
        want = lcm_reference.get_guidance_scale_embedding(torch.tensor([w - 1.0]), embedding_dim=32).numpy()
        assert np.abs(pipeline_module.guidance_embedding(w, 32) - want).max() <= 1e-3
    other = lcm_reference.get_guidance_scale_embedding(torch.tensor([7.0 + 0.01]), embedding_dim=32).numpy()
    assert np.abs(pipeline_module.guidance_embedding(8.0, 32) - other).max() > 1e-2  # the check can fail


def test_an_lcm_model_refuses_a_negative_prompt(lcm_pipeline):
    with pytest.raises(InputError, match="no negative prompt"):
        lcm_pipeline.generate(PROMPT, negative_prompt="blurry", steps=1, width=SIZE, height=SIZE)


# --- Turbo: trailing timesteps, 1-4 steps, no guidance -------------------------------------


@pytest.fixture(scope="module")
def turbo_source(tmp_path_factory):
    from sdonnx.export.synthetic import build_random_pipeline

    return build_random_pipeline(tmp_path_factory.mktemp("turbo") / "diffusers", seed=4, timestep_spacing="trailing",
                                 output_gain=OUTPUT_GAIN, time_gain=TIME_GAIN)


@pytest.fixture(scope="module")
def turbo_pipeline(turbo_source, tmp_path_factory):
    from sdonnx.export.exporter import ExportConfig, export

    out = tmp_path_factory.mktemp("turbo-export") / "onnx"
    export(ExportConfig(turbo_source, out, defaults={"steps": 1, "guidance": 0.0}))
    return Pipeline.load(out, provider="cpu")


@pytest.mark.parametrize("steps", [1, 2, 4])
def test_a_turbo_config_matches_diffusers(turbo_pipeline, turbo_source, steps):
    import diffusers

    reference = diffusers.StableDiffusionPipeline.from_pretrained(turbo_source, safety_checker=None)
    reference.set_progress_bar_config(disable=True)
    reference.scheduler = diffusers.EulerDiscreteScheduler.from_config(reference.scheduler.config)
    want = to_uint8(reference(PROMPT, num_inference_steps=steps, guidance_scale=0.0, width=SIZE, height=SIZE,
                              latents=torch.from_numpy(latents()), output_type="np").images)
    got = ours(turbo_pipeline, steps=steps)  # guidance 0 and euler: the folder's recorded settings
    assert turbo_pipeline.defaults.steps == 1 and turbo_pipeline.defaults.guidance == 0.0
    assert psnr(got, want) >= PARITY_DB
    if steps > 1:  # negative control: the leading spacing of SD 1.x draws another picture
        monkey = diffusers.EulerDiscreteScheduler.from_config({**reference.scheduler.config,
                                                              "timestep_spacing": "leading"})
        reference.scheduler = monkey
        other = to_uint8(reference(PROMPT, num_inference_steps=steps, guidance_scale=0.0, width=SIZE, height=SIZE,
                                   latents=torch.from_numpy(latents()), output_type="np").images)
        assert psnr(got, other) < PARITY_DB


# --- TAESD -----------------------------------------------------------------------------------


def _tiny_autoencoder(seed: int = 0, **config):
    import diffusers

    torch.manual_seed(seed)
    model = diffusers.AutoencoderTiny(**config).eval()
    with torch.no_grad():  # random weights decode to near-constant pictures; spread them
        for p in model.parameters():
            p.mul_(1.5)
    return model


@pytest.fixture(scope="module")
def taesd_folder(tiny_onnx, tmp_path_factory):
    """A copy of the tiny export with a small random TAESD added from a diffusers folder."""
    from sdonnx.export.tiny_vae import add_tiny_vae

    model = _tiny_autoencoder(encoder_block_out_channels=(16, 16, 16, 16),
                              decoder_block_out_channels=(16, 16, 16, 16))
    source = tmp_path_factory.mktemp("taesd") / "taesd"
    model.save_pretrained(source)
    folder = tmp_path_factory.mktemp("with-taesd") / "onnx"
    shutil.copytree(tiny_onnx, folder)
    add_tiny_vae(source, folder)
    return folder, model


def test_taesd_decode_and_encode_match_diffusers(taesd_folder):
    folder, model = taesd_folder
    pipe = Pipeline.load(folder, provider="cpu")
    rng = np.random.default_rng(0)
    latent = rng.standard_normal((1, 4, 8, 8), dtype=np.float32)
    with torch.no_grad():
        want = model.decode(torch.from_numpy(latent)).sample.numpy()
    got = pipe.tiny_vae_decoder(latent_sample=latent)["sample"]
    assert np.abs(got - want).max() <= 1e-3
    image = rng.uniform(-1, 1, (1, 3, 64, 64)).astype(np.float32)
    with torch.no_grad():
        want = model.encode(torch.from_numpy(image)).latents.numpy()
    assert np.abs(pipe.tiny_vae_encoder(sample=image)["latent_sample"] - want).max() <= 1e-3
    # Negative control: the full VAE's decode of the same latents is another picture.
    full = pipe.vae_decoder(latent_sample=latent / pipe.vae_scaling_factor)["sample"]
    assert np.abs(full - got).max() > 1e-2


def test_generation_with_the_tiny_decoder(taesd_folder):
    folder, model = taesd_folder
    pipe = Pipeline.load(folder, provider="cpu")
    captured = {}
    image = pipe.generate(PROMPT, steps=4, width=SIZE, height=SIZE, latents=latents(), decoder="tiny",
                          on_step=lambda i, n, denoised: captured.update(latents=denoised))[0]
    with torch.no_grad():
        want = model.decode(torch.from_numpy(captured["latents"].astype(np.float32))).sample.numpy()[0]
    want = (np.clip(want / 2 + 0.5, 0, 1).transpose(1, 2, 0) * 255).round().astype(np.uint8)
    assert psnr(np.asarray(image), want) >= PARITY_DB
    assert psnr(np.asarray(image), ours(pipe, steps=4)) < 30  # the full VAE draws otherwise


def _original_taesd():
    """The original repository's Encoder and Decoder (madebyollin/taesd, taesd.py), random."""
    from torch import nn

    def conv(n_in, n_out, **kwargs):
        return nn.Conv2d(n_in, n_out, 3, padding=1, **kwargs)

    class Clamp(nn.Module):
        def forward(self, x):
            return torch.tanh(x / 3) * 3

    class Block(nn.Module):
        def __init__(self, n_in, n_out):
            super().__init__()
            self.conv = nn.Sequential(conv(n_in, n_out), nn.ReLU(), conv(n_out, n_out), nn.ReLU(), conv(n_out, n_out))
            self.skip = nn.Conv2d(n_in, n_out, 1, bias=False) if n_in != n_out else nn.Identity()
            self.fuse = nn.ReLU()

        def forward(self, x):
            return self.fuse(self.conv(x) + self.skip(x))

    torch.manual_seed(5)
    encoder = nn.Sequential(conv(3, 64), Block(64, 64),
                            conv(64, 64, stride=2, bias=False), Block(64, 64), Block(64, 64), Block(64, 64),
                            conv(64, 64, stride=2, bias=False), Block(64, 64), Block(64, 64), Block(64, 64),
                            conv(64, 64, stride=2, bias=False), Block(64, 64), Block(64, 64), Block(64, 64),
                            conv(64, 4))
    decoder = nn.Sequential(Clamp(), conv(4, 64), nn.ReLU(),
                            Block(64, 64), Block(64, 64), Block(64, 64), nn.Upsample(scale_factor=2),
                            conv(64, 64, bias=False),
                            Block(64, 64), Block(64, 64), Block(64, 64), nn.Upsample(scale_factor=2),
                            conv(64, 64, bias=False),
                            Block(64, 64), Block(64, 64), Block(64, 64), nn.Upsample(scale_factor=2),
                            conv(64, 64, bias=False),
                            Block(64, 64), conv(64, 3))
    return encoder.eval(), decoder.eval()


def test_original_taesd_files_give_the_same_model(tmp_path, tiny_onnx):
    """taesd_decoder.pth / taesd_encoder.pth, saved from the original's nn.Sequential layout,
    decode and encode as the original does (it works in [0, 1] pixels, diffusers in [-1, 1])."""
    from sdonnx.export.tiny_vae import load_tiny_vae

    encoder, decoder = _original_taesd()
    torch.save(decoder.state_dict(), tmp_path / "taesd_decoder.pth")
    torch.save(encoder.state_dict(), tmp_path / "taesd_encoder.pth")
    loaded = load_tiny_vae(tmp_path / "taesd_decoder.pth")
    latent = torch.randn(1, 4, 8, 8)
    image = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.allclose(loaded.decode(latent).sample, decoder(latent) * 2 - 1, atol=1e-6)
        assert torch.allclose(loaded.encode(image * 2 - 1).latents, encoder(image), atol=1e-6)
    (tmp_path / "taesd_encoder.pth").unlink()
    torch.save({"0.weight": torch.zeros(3)}, tmp_path / "taesd_decoder.pth")
    with pytest.raises(InputError, match="not TAESD"):
        load_tiny_vae(tmp_path / "taesd_decoder.pth")


def test_the_cheap_preview_uses_automatic1111s_colours():
    from sdonnx.runtime.vae import cheap_rgb

    latent = np.zeros((4, 1, 2), dtype=np.float32)
    latent[0, 0, 0] = 1.0  # channel 0 alone: (0.298, 0.207, 0.208) in [-1, 1]
    latent[3, 0, 1] = 1.0  # channel 3 alone: (-0.184, -0.271, -0.473)
    assert cheap_rgb(latent).tolist() == [[[165, 154, 154], [104, 93, 67]]]


def test_an_lcm_folder_from_elsewhere_gets_lcm_settings(lcm_pipeline, tmp_path):
    folder = tmp_path / "lcm"
    shutil.copytree(lcm_pipeline.config.path, folder)
    (folder / "sdonnx.json").unlink()
    defaults = Pipeline.load(folder, provider="cpu").defaults
    assert (defaults.sampler, defaults.steps, defaults.guidance) == ("lcm", 4, 8.5)


def test_a_folder_without_taesd_says_how_to_add_it(tiny_pipeline):
    from sdonnx.runtime.errors import ModelFolderError

    with pytest.raises(ModelFolderError, match="--tiny-vae"):
        tiny_pipeline.generate(PROMPT, steps=1, width=SIZE, height=SIZE, decoder="tiny")


def test_previews_never_run_the_full_vae(taesd_folder, tiny_onnx):
    """With TAESD: its decode; without: the linear map. Either way the VAE decoder stays idle."""
    calls = []
    for folder in (taesd_folder[0], tiny_onnx):
        pipe = Pipeline.load(folder, provider="cpu")
        decoder = pipe.vae_decoder

        def counting(**inputs):
            calls.append(folder)
            return decoder(**inputs)

        # The pipeline's VAE decoder, counting its calls.
        pipe.vae_decoder = type("Counted", (), {"__call__": staticmethod(counting), "dtype": decoder.dtype,
                                                "part": decoder.part})()
        previews = []
        pipe.generate(PROMPT, steps=4, width=SIZE, height=SIZE, latents=latents(),
                      on_step=lambda i, n, denoised: previews.append(pipe.preview(denoised)))
        assert len(previews) == 4 and len([c for c in calls if c == folder]) == 1  # the final decode only
        assert previews[0].size == (SIZE, SIZE)


def test_the_command_line_adds_taesd_decodes_with_it_and_writes_previews(tiny_onnx, tmp_path):
    import subprocess
    import sys

    from PIL import Image

    def cli(*args, check=True):
        return subprocess.run([sys.executable, "-c", "from sdonnx.cli.app import main; main()", *args],
                              capture_output=True, text=True, check=check)

    folder = tmp_path / "onnx"
    shutil.copytree(tiny_onnx, folder)
    source = tmp_path / "taesd"
    _tiny_autoencoder(encoder_block_out_channels=(16,) * 4, decoder_block_out_channels=(16,) * 4).save_pretrained(source)
    added = cli("export", str(folder), "--tiny-vae", str(source))
    assert "tiny_vae_decoder: max abs diff" in added.stdout
    assert "LoRAs" in cli("info", str(folder)).stdout and "tiny_vae_decoder: fp32" in cli("info", str(folder)).stdout
    common = ["--model", str(folder), "--seed", "2", "--steps", "4", "--size", "64x64", "--provider", "cpu"]
    cli("generate", PROMPT, *common, "--decoder", "tiny", "--preview", str(tmp_path / "live.png"),
        "--preview-every", "2", "--out", str(tmp_path / "tiny.png"))
    want = Pipeline.load(folder, provider="cpu").generate(PROMPT, seed=2, steps=4, width=64, height=64,
                                                          decoder="tiny")[0]
    assert np.array_equal(np.asarray(Image.open(tmp_path / "tiny.png").convert("RGB")), np.asarray(want))
    assert Image.open(tmp_path / "live.png").size == (64, 64)  # TAESD's preview of the last step
    assert not list(tmp_path.glob(".sdonnx-*"))  # no temporary preview left behind
    bad = cli("generate", PROMPT, "--model", str(tiny_onnx), "--decoder", "tiny", "--steps", "1", "--size", "64x64",
              "--out", str(tmp_path / "x.png"), check=False)
    assert bad.returncode == 2 and "--tiny-vae" in bad.stderr and not (tmp_path / "x.png").exists()
