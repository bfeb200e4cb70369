"""sdonnx's CLIP tokenizer gives the ids transformers' CLIPTokenizer gives."""

from __future__ import annotations

import random

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sdonnx.runtime.tokenizer import CLIPTokenizer

WORDS = """a an the photo painting portrait of astronaut riding horse on mars red blue green
yellow circle square triangle star cat dog city night rain neon cyberpunk 4k 8K HDR
ultra-detailed trending artstation by greg rutkowski and alphonse mucha oil canvas
masterpiece best quality (highly detailed:1.2) [blurry] {castle} lowres bad_anatomy
don't it's we're you've I'm they'll she'd café naïve résumé Über Straße façade
東京 夜景 中文 한국어 русский Ελληνικά عربى हिन्दी 🐱 🔥 ✨ 3.14 2024 1girl 1080p
well-lit half-body f/1.8 50mm #art @user $100 50% a&b x+y=z <tag> "quoted" 'single'
""".split()
FIXED = [
    "", " ", "a", "A PHOTO OF A CAT", "  leading and trailing spaces  ", "tabs\tand\nnewlines\r\n",
    "multiple     spaces", "punctuation!!! ??? ... ,,, ;;", "emoji only 🐱🐶🦊", "<|startoftext|>",
    "text <|endoftext|> more", "zero\u200bwidth\u200djoiner", "control\x00\x07chars", "\ufeffbom",
    "ﬁ ligature", "Ǆ titlecase", "İstanbul", "ß ẞ", "ǅ", "e\u0301 combining", "x" * 400,
    "word " * 100, "a,b,c,d", "it's", "IT'S", "don't", "DON'T", "hello-world_foo.bar",
    "1234567890", "١٢٣ arabic digits", "full width ＡＢＣ１２３", "\u3000ideographic space",
    "mixed中文english", "日本語のテキスト", "한국어 텍스트", "(masterpiece:1.4), ((best quality))",
]


def varied_prompts(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    prompts = list(FIXED)
    while len(prompts) < n:
        words = rng.choices(WORDS, k=rng.randint(1, 40))
        sep = rng.choice([" ", ", ", " ", "  ", ",", " | "])
        prompts.append(sep.join(words))
    return prompts


@pytest.fixture(scope="module")
def tokenizers(tiny_onnx):
    from transformers import CLIPTokenizer as Reference

    return CLIPTokenizer.from_dir(tiny_onnx / "tokenizer"), Reference.from_pretrained(tiny_onnx / "tokenizer")


def reference_ids(reference, prompt: str) -> list[int]:
    return reference(prompt, padding="max_length", max_length=77, truncation=True).input_ids


def test_ids_equal_transformers_on_varied_prompts(tokenizers):
    ours, reference = tokenizers
    prompts = varied_prompts(300)
    assert len(prompts) >= 200
    mismatches = [p for p in prompts if ours([p])[0].tolist() != reference_ids(reference, p)]
    assert not mismatches, f"{len(mismatches)} prompts differ, first: {mismatches[0]!r}"


def test_unpadded_ids_equal_transformers(tokenizers):
    ours, reference = tokenizers
    for prompt in varied_prompts(60, seed=1):
        assert ours.encode(prompt) == reference(prompt, add_special_tokens=False).input_ids


@settings(max_examples=300, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.text(max_size=60))
def test_ids_equal_transformers_on_arbitrary_text(tokenizers, text):
    ours, reference = tokenizers
    assert ours([text])[0].tolist() == reference_ids(reference, text)


def test_window_shape_and_padding(tokenizers):
    ours, _ = tokenizers
    ids = ours(["a red circle", "x " * 200])
    assert ids.shape == (2, 77) and ids.dtype.name == "int64"
    assert ids[0, 0] == ours.bos_id and ids[1, -1] == ours.eos_id
    assert ids[0, -1] == ours.pad_id
