"""Single-file checkpoints (export/checkpoints.py): tiny checkpoints written in the original
LDM key layout are exported and compared with diffusers' `from_single_file` on the same file
and local configs; what is not a checkpoint, or would run code, is refused."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from conftest import psnr
from sdonnx.export import checkpoints
from sdonnx.export.exporter import ExportConfig, export
from sdonnx.export.ldm_layout import UNET_PREFIX, write_single_file, write_vae_file
from sdonnx.runtime.errors import InputError, ModelFolderError

PARITY_DB = 45.0
PROMPT, NEGATIVE = "a red circle on a white background", "blurry"


@pytest.fixture(scope="module")
def files(tiny_source, inpaint_source, tmp_path_factory):
    folder = tmp_path_factory.mktemp("single-files")
    return {
        "fp32": write_single_file(tiny_source, folder / "tiny.safetensors"),
        "fp16-ema": write_single_file(tiny_source, folder / "tiny-ema.ckpt", dtype="fp16", ema="both"),
        "no-vae": write_single_file(tiny_source, folder / "tiny-novae.safetensors", include_vae=False),
        "vae": write_vae_file(tiny_source, folder / "vae.safetensors"),
        "inpainting": write_single_file(inpaint_source, folder / "inpaint.safetensors", dtype="fp16"),
    }


def exported(path, out, config, **options):
    from sdonnx import Pipeline

    export(ExportConfig(path, out, config=config, **options))
    return Pipeline.load(out, provider="cpu")


def reference_pipe(path, config, cls="StableDiffusionPipeline", ema=False):
    """diffusers' own reading of the single file with the same local configs."""
    import diffusers

    pipe = getattr(diffusers, cls).from_single_file(str(path), config=str(config), local_files_only=True,
                                                    torch_dtype=torch.float32)
    if ema:  # write_single_file's EMA copy is the UNet's weights times 0.5
        pipe.unet.load_state_dict({k: v * 0.5 for k, v in pipe.unet.state_dict().items()})
    pipe.scheduler = diffusers.EulerDiscreteScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def latents(seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((1, 4, 8, 8), dtype=np.float32)


def reference_image(pipe, **images) -> np.ndarray:
    out = pipe(PROMPT, negative_prompt=NEGATIVE, num_inference_steps=6, guidance_scale=7.5, width=64, height=64,
               latents=torch.from_numpy(latents()), output_type="np", **images).images[0]
    return (out * 255).round().astype(np.uint8)


def ours(pipe, **images) -> np.ndarray:
    return np.asarray(pipe.generate(PROMPT, negative_prompt=NEGATIVE, steps=6, guidance=7.5, width=64, height=64,
                                    sampler="euler", latents=latents(), seed=0, **images)[0])


def test_an_fp32_safetensors_file_draws_what_diffusers_draws_from_it(files, tiny_source, tmp_path):
    pipe = exported(files["fp32"], tmp_path / "out", tiny_source)
    want = reference_image(reference_pipe(files["fp32"], tiny_source))
    assert want.std() > 10
    assert psnr(ours(pipe), want) >= PARITY_DB
    source = json.loads((tmp_path / "out" / "sdonnx.json").read_text())["source"]
    assert source["format"] == "single-file" and source["path"].endswith("tiny.safetensors")
    from sdonnx.runtime.info import describe

    assert "single file: UNet of 4 input channels, 32-d text context" in describe(tmp_path / "out")


def test_an_fp16_ckpt_with_ema_exports_the_weights_a1111_loads_or_the_ema_copy(files, tiny_source, tmp_path):
    """By default the `model.diffusion_model.*` weights (what AUTOMATIC1111 loads); with
    extract_ema the `model_ema.*` copy. Each is a negative control for the other."""
    main = exported(files["fp16-ema"], tmp_path / "main", tiny_source)
    ema = exported(files["fp16-ema"], tmp_path / "ema", tiny_source, extract_ema=True)
    want_main = reference_image(reference_pipe(files["fp16-ema"], tiny_source))
    want_ema = reference_image(reference_pipe(files["fp16-ema"], tiny_source, ema=True))
    assert psnr(ours(main), want_main) >= PARITY_DB
    assert psnr(ours(ema), want_ema) >= PARITY_DB
    assert psnr(ours(ema), want_main) < PARITY_DB
    assert psnr(ours(main), want_ema) < PARITY_DB


def test_a_checkpoint_without_a_vae_takes_a_separate_vae_file(files, tiny_source, tmp_path):
    with pytest.raises(InputError, match="holds no VAE .*--vae FILE"):
        export(ExportConfig(files["no-vae"], tmp_path / "refused", config=tiny_source))
    assert list(tmp_path.iterdir()) == [], "a temporary folder was left beside OUT"
    want = reference_image(reference_pipe(files["fp32"], tiny_source))
    pipe = exported(files["no-vae"], tmp_path / "out", tiny_source, vae=files["vae"])
    assert psnr(ours(pipe), want) >= PARITY_DB
    # The same VAE in diffusers' own keys (a VAE folder's weights file).
    diffusers_vae = tiny_source / "vae" / "diffusion_pytorch_model.safetensors"
    pipe = exported(files["no-vae"], tmp_path / "out2", tiny_source, vae=diffusers_vae)
    assert psnr(ours(pipe), want) >= PARITY_DB
    with pytest.raises(ModelFolderError, match="is not a VAE"):
        export(ExportConfig(files["no-vae"], tmp_path / "refused2", config=tiny_source, vae=files["no-vae"]))


def test_an_inpainting_checkpoint_exports_its_nine_channel_unet(files, inpaint_source, tmp_path,
                                                                 deterministic_reference):
    from PIL import Image

    pipe = exported(files["inpainting"], tmp_path / "out", inpaint_source)
    assert pipe.is_inpainting
    init = Image.fromarray(np.random.default_rng(1).integers(0, 256, (64, 64, 3), dtype=np.uint8))
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (16, 16, 48, 48))
    reference = reference_pipe(files["inpainting"], inpaint_source, cls="StableDiffusionInpaintPipeline")
    deterministic_reference["value"] = latents()
    want = reference_image(reference, image=init, mask_image=mask, strength=1.0)
    assert psnr(ours(pipe, init_image=init, mask_image=mask, strength=1.0), want) >= PARITY_DB


class RunsCode:
    def __reduce__(self):
        import os

        return os.system, ("touch ran-code",)


@pytest.mark.parametrize("form", ["zip", "legacy pickle"])
def test_a_pickle_that_would_run_code_is_refused_and_nothing_runs(tmp_path, monkeypatch, form):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "evil.ckpt"
    payload = {"state_dict": {"x": RunsCode()}}
    torch.save(payload, path, _use_new_zipfile_serialization=form == "zip")
    with pytest.raises(ModelFolderError, match="needs more than tensors .* it could run code, so it was not loaded"):
        export(ExportConfig(path, tmp_path / "out"))
    assert not (tmp_path / "ran-code").exists() and not (tmp_path / "out").exists()
    with pytest.raises(AssertionError):  # the control: unpickled in full, the file does run code
        torch.load(path, weights_only=False)
        assert not (tmp_path / "ran-code").exists()


def fake(shapes: dict) -> dict:
    """Names and shapes as read_shapes gives them, without a file."""
    return {key: tuple(shape) for key, shape in shapes.items()}


SD1 = {UNET_PREFIX + "input_blocks.0.0.weight": (320, 4, 3, 3),
       checkpoints.CONTEXT_KEY: (320, 768),
       "first_stage_model.encoder.conv_in.weight": (128, 3, 3, 3),
       "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight": (49408, 768)}


def test_families_are_read_from_the_tensors(tmp_path):
    found = checkpoints.inspect(tmp_path / "m.safetensors", fake(SD1))
    assert found.family == "sd1" and found.description.startswith("SD 1.x, 768-d CLIP ViT-L text encoder, epsilon")
    inpainting = fake({**SD1, UNET_PREFIX + "input_blocks.0.0.weight": (320, 9, 3, 3)})
    found = checkpoints.inspect(tmp_path / "m.safetensors", inpainting)
    assert found.family == "sd1" and found.inpainting
    folder = checkpoints.config_folder(found, tmp_path / "configs")
    from diffusers import UNet2DConditionModel

    assert UNet2DConditionModel.load_config(folder / "unet")["in_channels"] == 9
    assert (folder / "tokenizer" / "vocab.json").is_file()


SD2 = {**SD1, checkpoints.CONTEXT_KEY: (320, 1024), "cond_stage_model.model.token_embedding.weight": (49408, 1024)}
del SD2["cond_stage_model.transformer.text_model.embeddings.token_embedding.weight"]


@pytest.mark.parametrize("yaml, flags, prediction, size", [
    (None, {}, "v_prediction", 768),  # SD 2.1's, the default
    ('model:\n  params:\n    parameterization: "v"\n', {}, "v_prediction", 768),
    ("model:\n  params:\n    linear_start: 0.00085\n", {}, "epsilon", 512),  # 2.x-base's yaml
    (None, {"prediction_type": "epsilon"}, "epsilon", 512),
    ('model:\n  params:\n    parameterization: "v"\n', {"prediction_type": "epsilon", "image_size": 640},
     "epsilon", 640),  # the options win over the yaml
])
def test_sd2_prediction_type_comes_from_the_yaml_beside_then_the_options(tmp_path, yaml, flags, prediction, size):
    path = tmp_path / "v2-1_768-ema-pruned.safetensors"
    if yaml:
        path.with_suffix(".yaml").write_text(yaml)
    found = checkpoints.inspect(path, fake(SD2), **flags)
    assert (found.family, found.prediction_type, found.image_size) == ("sd2", prediction, size)
    assert found.description.startswith(f"SD 2.x, 1024-d OpenCLIP ViT-H text encoder, {prediction}")
    folder = checkpoints.config_folder(found, tmp_path / "configs")
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.load_config(folder / "unet")
    assert (unet["cross_attention_dim"], unet["sample_size"]) == (1024, size // 8)
    scheduler = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
    assert scheduler["prediction_type"] == prediction
    tokenizer = json.loads((folder / "tokenizer" / "tokenizer_config.json").read_text())
    assert tokenizer["pad_token"] == "!" and tokenizer["model_max_length"] == 77


@pytest.mark.parametrize("shapes, message", [
    ({**SD1, checkpoints.CONTEXT_KEY: (320, 1024)}, "has no cond_stage_model.model.. text encoder"),
    ({**SD1, "conditioner.embedders.1.model.ln_final.weight": (1280,)}, "is an SDXL checkpoint"),
    ({"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": (4, 320)}, r"is a LoRA \(1 tensors\)"),
    ({"string_to_param": (1, 768)}, "is a textual-inversion embedding"),
    ({"fc.weight": (10, 10)}, "is not a Stable Diffusion checkpoint"),
    ({**SD1, checkpoints.CONTEXT_KEY: (320, 32)}, "pass --config"),
])
def test_what_is_not_an_sd1_checkpoint_is_named(tmp_path, shapes, message):
    with pytest.raises(ModelFolderError, match=message):
        checkpoints.inspect(tmp_path / "m.safetensors", fake(shapes))


def test_a_truncated_single_file_is_refused_before_torch_reads_it(files, tmp_path):
    import os
    import shutil

    broken = tmp_path / "broken.safetensors"
    shutil.copy(files["fp32"], broken)
    os.truncate(broken, broken.stat().st_size - 100)
    with pytest.raises(ModelFolderError, match="is truncated or damaged"):
        export(ExportConfig(broken, tmp_path / "out"))
    assert not (tmp_path / "out").exists()


@pytest.fixture(scope="module")
def variant_folders(tiny_source, tmp_path_factory):
    """A hub-style folder: plain weights plus an fp16 variant whose UNet output is halved (so the
    two draw different pictures), and a folder of the fp16 variant alone."""
    import shutil

    import diffusers

    both = tmp_path_factory.mktemp("variants") / "both"
    shutil.copytree(tiny_source, both)
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(tiny_source, safety_checker=None)
    with torch.no_grad():
        pipe.unet.conv_out.weight.mul_(0.5)
        pipe.unet.conv_out.bias.mul_(0.5)
    pipe.to(torch.float16).save_pretrained(both, variant="fp16")
    only = both.with_name("fp16-only")
    pipe.save_pretrained(only, variant="fp16")
    return both, only


def variant_reference(folder, variant=None):
    import diffusers

    pipe = diffusers.StableDiffusionPipeline.from_pretrained(folder, variant=variant, torch_dtype=torch.float32,
                                                             safety_checker=None)
    pipe.scheduler = diffusers.EulerDiscreteScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return reference_image(pipe)


def test_fp16_variant_folders_export_the_weights_asked_for(variant_folders, tmp_path):
    from sdonnx import Pipeline

    both, only = variant_folders
    export(ExportConfig(both, tmp_path / "plain"))
    export(ExportConfig(both, tmp_path / "fp16", variant="fp16"))
    export(ExportConfig(only, tmp_path / "only"))  # no plain weights: the fp16 ones, unasked
    plain, fp16, alone = (Pipeline.load(tmp_path / name, provider="cpu") for name in ("plain", "fp16", "only"))
    want_plain, want_fp16 = variant_reference(both), variant_reference(both, "fp16")
    assert psnr(ours(plain), want_plain) >= PARITY_DB and psnr(ours(fp16), want_fp16) >= PARITY_DB
    assert psnr(ours(alone), want_fp16) >= PARITY_DB
    assert psnr(ours(plain), want_fp16) < PARITY_DB and psnr(ours(fp16), want_plain) < PARITY_DB
    with pytest.raises(ModelFolderError, match=r"unet/ weights \(model.bf16.safetensors"):
        export(ExportConfig(both, tmp_path / "refused", variant="bf16"))


def test_a_folder_whose_tokenizer_is_only_tokenizer_json_exports_the_same_model(tiny_source, tiny_onnx, tmp_path):
    """As some hub folders come: tokenizer/tokenizer.json without vocab.json and merges.txt."""
    import shutil

    from transformers import CLIPTokenizerFast

    from sdonnx import Pipeline

    folder = tmp_path / "fast"
    shutil.copytree(tiny_source, folder, ignore=shutil.ignore_patterns("tokenizer"))
    CLIPTokenizerFast.from_pretrained(tiny_source / "tokenizer").save_pretrained(folder / "tokenizer",
                                                                               legacy_format=False)
    assert not (folder / "tokenizer" / "vocab.json").exists()
    export(ExportConfig(folder, tmp_path / "out"))
    assert not (folder / "tokenizer" / "vocab.json").exists(), "the source folder was written to"
    got = Pipeline.load(tmp_path / "out", provider="cpu")
    assert np.array_equal(ours(got), ours(Pipeline.load(tiny_onnx, provider="cpu")))


@pytest.fixture(scope="module")
def open_clip_file(vpred_source, tmp_path_factory):
    """SD 2.x style: a v-prediction model whose text encoder is stored in OpenCLIP's layout."""
    return write_single_file(vpred_source, tmp_path_factory.mktemp("sd2-style") / "v.safetensors",
                             text_encoder="open_clip")


def test_an_open_clip_v_prediction_file_draws_what_diffusers_draws_and_a_wrong_type_does_not(
        open_clip_file, vpred_source, tmp_path):
    right = exported(open_clip_file, tmp_path / "right", vpred_source)
    wrong = exported(open_clip_file, tmp_path / "wrong", vpred_source, prediction_type="epsilon")
    want = reference_image(reference_pipe(open_clip_file, vpred_source))
    assert want.std() > 10
    assert psnr(ours(right), want) >= PARITY_DB
    assert psnr(ours(wrong), want) < PARITY_DB  # the negative control the issue asks for


@pytest.mark.parametrize("text_encoder", ["clip", "open_clip"])
def test_the_ldm_layout_round_trips_through_diffusers_tensor_for_tensor(tiny_source, tmp_path, text_encoder):
    """What write_single_file writes, diffusers' converters read back to the very same weights,
    so a mapping that swapped two same-shaped tensors would fail here."""
    import diffusers

    path = write_single_file(tiny_source, tmp_path / "t.safetensors", text_encoder=text_encoder)
    read = diffusers.StableDiffusionPipeline.from_single_file(str(path), config=str(tiny_source),
                                                             local_files_only=True)
    original = diffusers.StableDiffusionPipeline.from_pretrained(tiny_source, safety_checker=None)
    for part in ("unet", "vae", "text_encoder"):
        want, got = getattr(original, part).state_dict(), getattr(read, part).state_dict()
        assert set(want) == set(got), part
        assert all(torch.equal(want[k], got[k]) for k in want), part


@pytest.mark.parametrize("content, message", [
    (b"version https://git-lfs.github.com/spec/v1\noid sha256:abc\nsize 2132625894\n", "a Git LFS pointer"),
    (b"<!DOCTYPE html><html>Entry not found</html>", "not a checkpoint"),
    (b"hello, not a model at all", "not a checkpoint"),
])
def test_a_file_that_is_not_a_checkpoint_says_so(tmp_path, content, message):
    path = tmp_path / "model.ckpt"
    path.write_bytes(content)
    with pytest.raises(ModelFolderError, match=message):
        export(ExportConfig(path, tmp_path / "out"))
    assert [p.name for p in tmp_path.iterdir()] == ["model.ckpt"], "something was left beside OUT"


def test_pruned_files_keeping_only_the_ema_decay_have_no_ema_weights(tmp_path):
    found = checkpoints.inspect(tmp_path / "m.safetensors", fake({**SD1, "model_ema.decay": (), "model_ema.num_updates": ()}))
    assert not found.has_ema and "EMA" not in found.description


def test_a_safetensors_file_beside_the_ckpt_is_read_instead(files, tiny_source, tmp_path, monkeypatch):
    """Two forms of the same checkpoint: the one that cannot run code is the one read."""
    import shutil

    shutil.copy(files["fp32"], tmp_path / "model.safetensors")
    (tmp_path / "model.ckpt").write_bytes(b"\x80 a pickle that would not load")
    export(ExportConfig(tmp_path / "model.ckpt", tmp_path / "out", config=tiny_source))
    source = json.loads((tmp_path / "out" / "sdonnx.json").read_text())["source"]
    assert source["path"].endswith("model.safetensors")
