"""Prompts over 75 tokens: AUTOMATIC1111's 75-token windows, checked against transformers and
diffusers (given the same window-wise embeddings) on the tiny model; no text is dropped.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

from conftest import psnr

PARITY_DB = 45.0
STEPS = 6
SIZE = (64, 64)
WINDOW = 75  # tokens per window, between the start and end tokens
# Every word is one CLIP token, so "the first 75 words" is the 77-token truncation.
WORDS = ("a red circle on white background with blue green yellow star cat dog city at night "
         "in rain neon light oil painting of castle by the sea under moon").split()
SHORT, SHORT_NEGATIVE = "a red circle on a white background", "blurry, low quality"


def words(count: int, start: int = 0) -> str:
    return " ".join(WORDS[(start + i) % len(WORDS)] for i in range(count))


LONG = words(120)  # 2 windows
LONGER = words(200, start=5)  # 3 windows


def reference_windows(tokenizer, text: str, windows: int = 1) -> list[list[int]]:
    """The window convention written out with transformers' tokenizer."""
    tokens = tokenizer(text, add_special_tokens=False).input_ids
    chunks = [tokens[i:i + WINDOW] for i in range(0, len(tokens), WINDOW)] or [[]]
    chunks += [[]] * (windows - len(chunks))
    return [[tokenizer.bos_token_id, *c, tokenizer.eos_token_id]
            + [tokenizer.pad_token_id] * (WINDOW - len(c)) for c in chunks]


def reference_embeddings(reference_pipe, text: str, windows: int) -> torch.Tensor:
    """transformers' CLIPTextModel on each window alone, concatenated along the sequence."""
    ids = reference_windows(reference_pipe.tokenizer, text, windows)
    with torch.no_grad():
        return torch.cat([reference_pipe.text_encoder(torch.tensor([w]))[0] for w in ids], dim=1)


def unit_latents(seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((1, 4, SIZE[1] // 8, SIZE[0] // 8), dtype=np.float32)


def ours(pipe, prompt: str, negative: str, latents: np.ndarray, guidance: float = 7.5) -> np.ndarray:
    image = pipe.generate(prompt, negative_prompt=negative, steps=STEPS, guidance=guidance,
                          width=SIZE[0], height=SIZE[1], latents=latents)[0]
    return np.asarray(image)


def test_windows_equal_transformers(tiny_pipeline, reference_pipe):
    tokenizer, reference = tiny_pipeline.tokenizer, reference_pipe.tokenizer
    for text, windows in [("", 1), (SHORT, 1), (words(75), 1), (words(76), 2), (LONG, 2), (LONGER, 3),
                          (SHORT, 3), (LONG, 1)]:
        ids = tokenizer.window_ids(text, windows)
        expected = reference_windows(reference, text, windows)
        assert ids.shape == (len(expected), 77) and ids.dtype == np.int64
        assert ids.tolist() == expected, text
        # The first window is the ordinary truncated encoding.
        truncated = reference(text, padding="max_length", max_length=77, truncation=True).input_ids
        assert ids[0].tolist() == truncated


def test_short_prompt_is_one_window_as_before(tiny_pipeline):
    tokenizer = tiny_pipeline.tokenizer
    for text in ["", SHORT, words(75)]:
        assert np.array_equal(tokenizer.window_ids(text), tokenizer([text]))


@pytest.mark.parametrize("text, windows", [(SHORT, 1), (LONG, 2), (LONGER, 3), ("", 2)])
def test_embeddings_equal_transformers_per_window(tiny_pipeline, reference_pipe, text, windows):
    got = tiny_pipeline.encode_prompt(text, windows)
    want = reference_embeddings(reference_pipe, text, windows).numpy()
    assert got.shape == want.shape == (1, 77 * windows, want.shape[-1])
    assert np.abs(got - want).max() < 1e-4


@pytest.mark.parametrize("prompt, negative, guidance", [
    (LONG, SHORT_NEGATIVE, 7.5),  # negative padded with an empty window
    (SHORT, LONG, 7.5),  # prompt padded
    (LONG, LONGER, 7.5),  # 2 against 3 windows
    (LONGER, "", 1.0),  # no guidance, no negative
])
def test_long_prompt_image_matches_diffusers(tiny_pipeline, reference_pipe, prompt, negative, guidance):
    from diffusers import EulerDiscreteScheduler

    latents = unit_latents()
    windows = max(len(tiny_pipeline.tokenizer.window_ids(t)) for t in (prompt, negative))
    if guidance <= 1:
        windows = len(tiny_pipeline.tokenizer.window_ids(prompt))
    reference_pipe.scheduler = EulerDiscreteScheduler.from_config(reference_pipe.scheduler.config)
    want = reference_pipe(
        prompt_embeds=reference_embeddings(reference_pipe, prompt, windows),
        negative_prompt_embeds=reference_embeddings(reference_pipe, negative, windows) if guidance > 1 else None,
        num_inference_steps=STEPS, guidance_scale=guidance, width=SIZE[0], height=SIZE[1],
        latents=torch.from_numpy(latents), output_type="np",
    ).images[0]
    want = (want * 255).round().astype(np.uint8)
    assert want.std() > 10, "the reference image is flat; the test model is too weak"
    assert psnr(ours(tiny_pipeline, prompt, negative, latents, guidance), want) >= PARITY_DB


@pytest.mark.parametrize("prompt, negative", [(LONG, SHORT_NEGATIVE), (SHORT, LONG)])
def test_text_past_75_tokens_changes_the_image(tiny_pipeline, prompt, negative):
    """Against the 77-token truncation: if the second window were dropped, these would agree."""
    tokenizer = tiny_pipeline.tokenizer

    def truncate(text: str) -> str:
        cut = " ".join(text.split()[:WINDOW])
        assert tokenizer.encode(cut) == tokenizer.encode(text)[:WINDOW]
        return cut

    latents = unit_latents(seed=3)
    full = ours(tiny_pipeline, prompt, negative, latents)
    cut = ours(tiny_pipeline, truncate(prompt), truncate(negative), latents)
    assert psnr(full, cut) < PARITY_DB


def test_context_length_follows_the_longer_prompt(tiny_pipeline):
    from sdonnx.runtime import GenerationConfig

    for prompt, negative, windows in [(LONG, "", 2), ("", LONGER, 3), (SHORT, SHORT_NEGATIVE, 1)]:
        config = GenerationConfig(prompt, negative, n=2)
        context = tiny_pipeline.encode_context(config)
        assert context.shape[:2] == (4, 77 * windows)


def test_long_prompts_raise_and_print_nothing(tiny_pipeline, capfd):
    capfd.readouterr()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        images = tiny_pipeline.generate(LONGER, negative_prompt=LONG, steps=2, width=64, height=64, n=2)
    assert len(images) == 2
    assert capfd.readouterr() == ("", "")
