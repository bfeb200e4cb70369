"""The safety checker part against diffusers' StableDiffusionSafetyChecker on a tiny random one."""

from __future__ import annotations

import base64
import io
import json
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from conftest import _export
from sdonnx.runtime import parts
from sdonnx.runtime import safety_checker as runtime_checker
from sdonnx.runtime.errors import InputError, ModelFolderError

pytestmark = pytest.mark.slow
PROMPT = "a red circle on a white background"


def pictures(count: int, seed: int) -> list[Image.Image]:
    """Pictures of different sizes and aspect ratios, each a different mix of colour and texture."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(count):
        width, height = int(rng.integers(160, 700)), int(rng.integers(160, 700))
        base = rng.integers(0, 256, 3)
        texture = rng.normal(0, rng.uniform(5, 90), (height // 8 + 1, width // 8 + 1, 3))
        texture = np.asarray(Image.fromarray(np.clip(base + texture, 0, 255).astype(np.uint8)).resize(
            (width, height), Image.Resampling.BICUBIC))
        out.append(Image.fromarray(texture))
    return out


def reference(source, images):
    """diffusers' verdict: the feature extractor's clip_input, the checker's forward() flags,
    and the concept / special scores as its forward computes them (cosine_distance minus the
    thresholds, plus 0.01 after a special-care hit), unrounded."""
    import torch
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker, cosine_distance
    from transformers import CLIPImageProcessor

    checker = StableDiffusionSafetyChecker.from_pretrained(source / "safety_checker").eval()
    clip = CLIPImageProcessor.from_pretrained(source / "feature_extractor")(images, return_tensors="pt").pixel_values
    arrays = np.zeros((len(images), 8, 8, 3), np.float32)  # forward() returns them, blacked where flagged
    _, flags = checker(clip_input=clip, images=arrays)
    with torch.no_grad():
        embeds = checker.visual_projection(checker.vision_model(clip)[1])
        special = (cosine_distance(embeds, checker.special_care_embeds) - checker.special_care_embeds_weights).numpy()
        concept = (cosine_distance(embeds, checker.concept_embeds) - checker.concept_embeds_weights).numpy()
    concept = concept + 0.01 * (special > 0).any(axis=1, keepdims=True)
    return clip.numpy(), np.array(flags, dtype=bool), concept, special


GENERATED = dict(steps=2, width=64, height=64, n=6, seed=11)


@pytest.fixture(scope="module")
def checked_source(tmp_path_factory, tiny_pipeline):
    """The session's tiny pipeline (same weights: tiny_pipeline draws its pictures) with a
    random safety checker whose thresholds sit between the scores of the test pictures and of
    its generated ones, so that some are flagged and some not (diffusers' random init gives
    thresholds of 1: nothing is ever flagged)."""
    import torch
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker

    from sdonnx.export.safety_checker import add_random_safety_checker
    from sdonnx.export.synthetic import build_random_pipeline

    from conftest import OUTPUT_GAIN, TIME_GAIN

    source = build_random_pipeline(tmp_path_factory.mktemp("safety") / "diffusers", output_gain=OUTPUT_GAIN,
                                   time_gain=TIME_GAIN)
    add_random_safety_checker(source)
    _, _, concept, special = reference(source, pictures(20, 0))
    _, _, generated, _ = reference(source, tiny_pipeline.generate(PROMPT, **GENERATED))
    checker = StableDiffusionSafetyChecker.from_pretrained(source / "safety_checker")
    with torch.no_grad():
        # One concept flags part of the pictures and part of the generated ones, the others
        # nothing; special-care concept 0 is seen in the top 3 (their concepts then get +0.01).
        raw = np.concatenate([concept, generated]) + checker.concept_embeds_weights.numpy()
        weights, chosen = raw.max(axis=0) + 0.05, None
        for j in range(raw.shape[1]):
            values = np.sort(raw[:, j])
            for cut in (values[:-1] + values[1:]) / 2:
                if 5 <= (raw[:20, j] > cut).sum() <= 15 and 1 <= (raw[20:, j] > cut).sum() <= 5:
                    chosen = (j, cut)
        assert chosen is not None, "no concept of this random checker splits both sets of pictures"
        weights[chosen[0]] = chosen[1]
        checker.concept_embeds_weights.copy_(torch.from_numpy(weights))
        cos = np.sort(special + checker.special_care_embeds_weights.numpy(), axis=0)
        weights = cos[-1] + 0.05
        weights[0] = (cos[16, 0] + cos[17, 0]) / 2
        checker.special_care_embeds_weights.copy_(torch.from_numpy(weights))
    checker.save_pretrained(source / "safety_checker")
    return source


@pytest.fixture(scope="module")
def checked_folder(checked_source, tmp_path_factory):
    return _export(checked_source, tmp_path_factory, "safety-export")


@pytest.fixture(scope="module")
def checked_pipeline(checked_folder):
    from sdonnx.runtime import Pipeline

    return Pipeline.load(checked_folder, provider="cpu")


def test_export_writes_the_part_and_records_its_parity(checked_folder):
    assert parts.SAFETY_CHECKER.file(checked_folder) is not None
    assert (checked_folder / "safety_checker" / runtime_checker.PREPROCESSOR_CONFIG).is_file()
    record = json.loads((checked_folder / parts.RECORD).read_text())
    assert record["parts"]["safety_checker"]["parity"]["max_abs_diff"] <= 1e-4


def test_preprocessing_equals_clip_image_processor(checked_source, checked_folder):
    images = pictures(20, 1)
    clip, *_ = reference(checked_source, images)
    ours = runtime_checker.clip_input(images, checked_folder / "safety_checker")
    assert ours.shape == clip.shape == (20, 3, 224, 224)
    assert np.abs(ours - clip).max() <= 1e-5
    config = checked_folder / "safety_checker" / runtime_checker.PREPROCESSOR_CONFIG
    settings = json.loads(config.read_text())
    config.write_text(json.dumps({**settings, "resample": int(Image.Resampling.BILINEAR)}))
    try:  # negative control: another resampling filter is seen
        assert np.abs(runtime_checker.clip_input(images, config.parent) - clip).max() > 1e-2
    finally:
        config.write_text(json.dumps(settings))


def test_scores_and_flags_equal_diffusers_on_20_pictures(checked_source, checked_pipeline):
    images = pictures(20, 0)
    _, flags, concept, special = reference(checked_source, images)
    verdict = checked_pipeline.check_safety(images)
    assert 3 <= flags.sum() <= 19, "the fixture's thresholds should flag some pictures, not all"
    assert np.array_equal(verdict.flagged, flags)
    assert np.abs(verdict.concept_scores - concept).max() <= 1e-4
    assert np.abs(verdict.special_scores - special).max() <= 1e-4
    # negative control: other pictures get other flags and scores
    other = checked_pipeline.check_safety(pictures(20, 5))
    assert not np.array_equal(other.flagged, flags) and np.abs(other.concept_scores - concept).max() > 1e-2


def test_generate_blacks_out_exactly_what_diffusers_flags(checked_source, checked_pipeline):
    plain = checked_pipeline.generate(PROMPT, **GENERATED)
    checked = checked_pipeline.generate(PROMPT, safety_checker=True, **GENERATED)
    _, flags, _, _ = reference(checked_source, plain)
    assert 0 < flags.sum() < len(flags), "the fixture's thresholds should flag some generated pictures, not all"
    for before, after, flag in zip(plain, checked, flags):
        assert after.info["nsfw_content_detected"] == bool(flag)
        if flag:
            assert not np.asarray(after).any() and after.size == before.size
        else:
            assert after.tobytes() == before.tobytes()
    assert "nsfw_content_detected" not in plain[0].info


def test_refusals(tiny_pipeline, tmp_path):
    with pytest.raises(ModelFolderError, match="has no safety checker"):
        tiny_pipeline.generate(PROMPT, steps=1, safety_checker=True)
    run = subprocess.run([sys.executable, "-m", "sdonnx.cli.app", "generate", PROMPT, "--steps", "1",
                          "--safety-checker", "-o", str(tmp_path / "x.png")], capture_output=True, text=True)
    assert run.returncode == 2 and run.stderr.count("\n") == 1 and "has no safety checker" in run.stderr
    assert not (tmp_path / "x.png").exists()
    run = subprocess.run([sys.executable, "-m", "sdonnx.cli.app", "generate", PROMPT, "--steps", "1",
                          "--safety-checker", "--preview", str(tmp_path / "p.png"), "-o", str(tmp_path / "x.png")],
                         capture_output=True, text=True)
    assert run.returncode == 2 and "leave out --preview or --safety-checker" in run.stderr
    from sdonnx.cli.server import create_app

    with pytest.raises(InputError, match="no safety checker"):
        create_app(tiny_pipeline, safety_checker=True)


def test_cli_and_server_report_flags(checked_folder, checked_pipeline, tmp_path):
    pytest.importorskip("fastapi")
    from serving import Server

    flags = checked_pipeline.check_safety(checked_pipeline.generate(PROMPT, **GENERATED)).flagged
    run = subprocess.run([sys.executable, "-m", "sdonnx.cli.app", "generate", PROMPT, "--model", str(checked_folder),
                          "--steps", "2", "--size", "64x64", "-n", "6", "--seed", "11", "--safety-checker",
                          "-o", str(tmp_path)], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert run.stderr.count("the safety checker flagged") == flags.sum()
    server = Server("--model", str(checked_folder), "--provider", "cpu", "--safety-checker")
    try:
        reply = server.post("/sdapi/v1/txt2img", {"prompt": PROMPT, "steps": 2, "width": 64, "height": 64,
                                                  "batch_size": 6, "seed": 11})
        assert reply.status == 200, reply.text
        assert json.loads(reply.body["info"])["nsfw_content_detected"] == flags.tolist()
        for b64, flag in zip(reply.body["images"], flags):
            assert np.asarray(Image.open(io.BytesIO(base64.b64decode(b64)))).any() != flag
        reply = server.post("/v1/images/generations", {"prompt": PROMPT, "n": 6, "size": "64x64",
                                                       "steps": 2, "seed": 11})
        assert reply.status == 200, reply.text
        assert [d["nsfw_content_detected"] for d in reply.body["data"]] == flags.tolist()
    finally:
        server.stop()


def test_server_makes_no_preview_the_checker_has_not_seen(tiny_pipeline):
    pytest.importorskip("fastapi")
    from sdonnx.cli.server import Worker

    denoised = np.zeros((1, 4, 8, 8), np.float32)
    for options, expect_preview in (({}, True), ({"safety_checker": True}, False)):
        worker = Worker(tiny_pipeline, 1, options)
        worker.preview_wanted.set()
        worker._on_step(1, 4, denoised)
        assert (worker.preview is not None) == expect_preview
