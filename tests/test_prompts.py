"""AUTOMATIC1111's prompt syntax (runtime/prompts.py) against token weights written by hand.

Each expectation below was worked out from the web UI's rules (modules/prompt_parser.py,
sd_hijack_clip.py), not produced by sdonnx: `(x)` x1.1, `((x))` x1.21, `[x]` /1.1, `(x:w)`,
nesting multiplies, an unclosed bracket runs to the end, `\\(` is a literal, BREAK starts a
window, an embedding's vectors stay in one window and take the weight around its name.
Every word used is a single CLIP token, so the expected ids are the words' own ids.
"""

from __future__ import annotations

import numpy as np
import pytest

from sdonnx.runtime import prompts
from sdonnx.runtime.pipeline import default_model_path
from sdonnx.runtime.tokenizer import CLIPTokenizer

R, S = 1.1, 1 / 1.1


@pytest.fixture(scope="module")
def tokenizer() -> CLIPTokenizer:
    return CLIPTokenizer.from_dir(default_model_path() / "tokenizer")


def windows(tokenizer, prompt, embeddings=None, count=1):
    t = tokenizer
    return prompts.tokenize_windows(prompt, t.encode, bos=t.bos_id, eos=t.eos_id, pad=t.pad_id,
                                    window=t.max_length, embeddings=embeddings, windows=count)


def expected(tokenizer, rows):
    """rows: per window, a list of (word, weight); -> (ids, weights) framed and padded."""
    ids, weights = [], []
    for row in rows:
        tokens = []
        for word, _ in row:
            (token,) = tokenizer.encode(word) if isinstance(word, str) else (word,)
            tokens.append(token)
        pad = tokenizer.max_length - 2 - len(tokens)
        ids.append([tokenizer.bos_id, *tokens, tokenizer.eos_id] + [tokenizer.pad_id] * pad)
        weights.append([1.0, *(w for _, w in row), 1.0] + [1.0] * pad)
    return np.array(ids), np.array(weights, dtype=np.float32)


CASES = {
    "a red circle": [[("a", 1), ("red", 1), ("circle", 1)]],
    "a (red) circle": [[("a", 1), ("red", R), ("circle", 1)]],
    "a ((red)) circle": [[("a", 1), ("red", R * R), ("circle", 1)]],
    "a [red] circle": [[("a", 1), ("red", S), ("circle", 1)]],
    "a [[red]] circle": [[("a", 1), ("red", S * S), ("circle", 1)]],
    "a (red:1.5) circle": [[("a", 1), ("red", 1.5), ("circle", 1)]],
    "a (red circle:0.5)": [[("a", 1), ("red", 0.5), ("circle", 0.5)]],
    "a ((red) circle:1.2)": [[("a", 1), ("red", R * 1.2), ("circle", 1.2)]],
    "a ([red]) circle": [[("a", 1), ("red", S * R), ("circle", 1)]],
    r"a \(red\) circle": [[("a", 1), ("(", 1), ("red", 1), (")", 1), ("circle", 1)]],
    "a (red circle": [[("a", 1), ("red", R), ("circle", R)]],
    "a [red circle": [[("a", 1), ("red", S), ("circle", S)]],
    "a (red:1.3) (blue:1.3) circle": [[("a", 1), ("red", 1.3), ("blue", 1.3), ("circle", 1)]],
    "a (red:-1) circle": [[("a", 1), ("red", -1.0), ("circle", 1)]],
    "red BREAK circle": [[("red", 1)], [("circle", 1)]],
    "BREAK circle": [[], [("circle", 1)]],
    "(red:1.2) BREAK [circle]": [[("red", 1.2)], [("circle", S)]],
    "a red circle)": [[("a", 1), ("red", 1), ("circle", 1), (")", 1)]],
    # sdonnx's one departure: the web UI would read this BREAK as the word "break" at -1.2.
    "(red BREAK circle:1.2)": [[("red", 1.2)], [("circle", 1.2)]],
    "": [[]],
}


@pytest.mark.parametrize("prompt", list(CASES))
def test_token_weights_follow_automatic1111(tokenizer, prompt):
    got = windows(tokenizer, prompt)
    ids, weights = expected(tokenizer, CASES[prompt])
    assert got.ids.tolist() == ids.tolist()
    np.testing.assert_allclose(got.weights, weights, rtol=1e-6)


# The web UI's own doctests of parse_prompt_attention (modules/prompt_parser.py), word for word.
A1111_DOCTESTS = [
    ("normal text", [["normal text", 1.0]]),
    ("an (important) word", [["an ", 1.0], ["important", 1.1], [" word", 1.0]]),
    ("(unbalanced", [["unbalanced", 1.1]]),
    ("\\(literal\\]", [["(literal]", 1.0]]),
    ("(unnecessary)(parens)", [["unnecessaryparens", 1.1]]),
    ("a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).",
     [["a ", 1.0], ["house", 1.5730000000000004], [" ", 1.1], ["on", 1.0], [" a ", 1.1], ["hill", 0.55],
      [", sun, ", 1.1], ["sky", 1.4641000000000006], [".", 1.1]]),
]


@pytest.mark.parametrize("prompt,want", A1111_DOCTESTS)
def test_parse_matches_the_web_uis_doctests(prompt, want):
    assert [list(run) for run in prompts.parse_attention(prompt)] == want


def test_a_weight_that_is_not_a_number_is_one_clear_error(tokenizer):
    from sdonnx.runtime.errors import InputError

    with pytest.raises(InputError, match="not a number"):
        windows(tokenizer, "a (red:1.2.3) circle")


def test_weights_cross_a_window_edge(tokenizer):
    """80 single-token words, words 74-77 weighted: the weight follows its tokens into window 2."""
    words = ["cat"] * 73 + ["(red dog blue bird:1.4)"] + ["cat"] * 3
    got = windows(tokenizer, " ".join(words))
    row1 = [("cat", 1)] * 73 + [("red", 1.4), ("dog", 1.4)]
    row2 = [("blue", 1.4), ("bird", 1.4)] + [("cat", 1)] * 3
    ids, weights = expected(tokenizer, [row1, row2])
    assert got.ids.tolist() == ids.tolist()
    np.testing.assert_allclose(got.weights, weights, rtol=1e-6)


def test_an_embedding_takes_its_vectors_weight_and_stays_in_one_window(tokenizer):
    name = tuple(tokenizer.encode("sparkly"))
    embeddings = {name: [49408, 49409]}
    got = windows(tokenizer, "a (sparkly:1.2) circle", embeddings)
    ids, weights = expected(tokenizer, [[("a", 1), (49408, 1.2), (49409, 1.2), ("circle", 1)]])
    assert got.ids.tolist() == ids.tolist()
    np.testing.assert_allclose(got.weights, weights, rtol=1e-6)
    # 74 tokens before it: its 2 vectors do not fit the first window's last place.
    got = windows(tokenizer, " ".join(["cat"] * 74 + ["sparkly"]), embeddings)
    ids, _ = expected(tokenizer, [[("cat", 1)] * 74, [(49408, 1), (49409, 1)]])
    assert got.ids.tolist() == ids.tolist()


@pytest.mark.parametrize("prompt", [
    "a red circle on a white background",
    "a photo: of a cat, 4k; highly detailed!",
    " ".join(["word"] * 160),
    "",
])
def test_a_plain_prompt_gives_the_ids_it_gave_before(tokenizer, prompt):
    got = windows(tokenizer, prompt, count=3)
    assert np.array_equal(got.ids, tokenizer.window_ids(prompt, 3))
    assert not got.weighted


def test_the_check_can_fail(tokenizer):
    """Negative control: a weight off by one bracket level is caught."""
    got = windows(tokenizer, "a ((red)) circle")
    _, weights = expected(tokenizer, CASES["a (red) circle"])
    assert not np.allclose(got.weights, weights, rtol=1e-6)


def test_extra_networks_are_cut_out():
    text, tags = prompts.extract_networks("a cat <lora:style_v2:0.8> on grass <lora:detail:0.5:1>")
    assert text == "a cat  on grass "
    assert [(t.kind, t.name, t.args) for t in tags] == [("lora", "style_v2", ("0.8",)),
                                                        ("lora", "detail", ("0.5", "1"))]


def test_weights_scale_tokens_and_restore_the_mean():
    rng = np.random.default_rng(0)
    hidden = rng.standard_normal((2, 77, 8)).astype(np.float32) + 0.5
    weights = np.ones((2, 77), dtype=np.float32)
    weights[0, 3] = 1.5
    out = prompts.apply_weights(hidden, weights)
    scaled = hidden[0] * weights[0][:, None]
    np.testing.assert_allclose(out[0], scaled * (hidden[0].mean() / scaled.mean()), rtol=1e-5)
    assert np.array_equal(out[1], hidden[1])  # a window without weights is left exactly alone
