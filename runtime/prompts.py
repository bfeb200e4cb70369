"""AUTOMATIC1111's prompt syntax, pure (no model): attention weights, BREAK, extra networks.

    a (red:1.3) circle, ((sharp)), [blurry], \\(literal\\) BREAK on grass <lora:style:0.8>

- `(text)` multiplies the weight of its tokens by 1.1, `[text]` divides it by 1.1, `(text:w)`
  sets the factor to w; they nest (`((a))` = 1.21); an unclosed bracket applies to the end of
  the prompt; `\\(`, `\\)`, `\\[`, `\\]` and `\\\\` are literal characters.
- `BREAK` (capitals, a word of its own) pads the current 75-token window and starts the next.
- `<kind:name:arg...>` (`<lora:name:0.8>`) names an extra network and is cut out of the text.
- A textual-inversion embedding is found by the tokens of its name and takes as many
  positions as it has vectors, all in one window.

The rules are those of the web UI's `modules/prompt_parser.py` (`parse_prompt_attention`),
`modules/extra_networks.py` (`parse_prompt`) and `modules/sd_hijack_clip.py`
(`tokenize_line`), except the latter's comma backtracking: a window always holds 75 tokens
when more follow (as `CLIPTokenizer.window_ids`), so a plain prompt gives exactly the ids it
gave before this syntax existed.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable, Mapping, Sequence

import numpy as np

from sdonnx.runtime.errors import InputError

ROUND_FACTOR = 1.1
SQUARE_FACTOR = 1 / 1.1
BREAK = "BREAK"

_ATTENTION = re.compile(r"""
\\\(|\\\)|\\\[|\\]|\\\\|\\|\(|\[|:\s*([+-]?[.\d]+)\s*\)|\)|]|[^\\()\[\]:]+|:
""", re.X)
_BREAK = re.compile(r"\s*\bBREAK\b\s*", re.S)
_EXTRA_NETWORK = re.compile(r"<(\w+):([^>]+)>")


@dataclass(frozen=True)
class NetworkTag:
    """`<kind:name:arg...>` as written in a prompt (`<lora:name:0.8>`: kind "lora", args ("0.8",))."""

    kind: str
    name: str
    args: tuple[str, ...]
    text: str


def extract_networks(prompt: str) -> tuple[str, list[NetworkTag]]:
    """The prompt without its `<kind:name:args>` tags, and the tags in order of appearance."""
    tags: list[NetworkTag] = []

    def cut(match: re.Match) -> str:
        name, *args = match.group(2).split(":")
        tags.append(NetworkTag(match.group(1), name, tuple(args), match.group(0)))
        return ""

    return _EXTRA_NETWORK.sub(cut, prompt), tags


def lora_scales(tag: NetworkTag) -> tuple[float, float]:
    """(text encoder, UNet) scales of a `<lora:NAME[:TE[:UNET]]>` tag, also `te=`/`unet=`
    (AUTOMATIC1111's Lora extension: one number is both, none is 1); InputError otherwise."""
    if tag.kind != "lora":
        raise InputError(f"{tag.text}: sdonnx applies only <lora:...> networks, not {tag.kind}")
    positional = [a for a in tag.args if "=" not in a]
    named = dict(a.split("=", 1) for a in tag.args if "=" in a)
    try:
        te = float(named.get("te", positional[0] if positional else 1.0))
        unet = float(named.get("unet", positional[1] if len(positional) > 1 else te))
    except ValueError:
        raise InputError(f"{tag.text}: the scale must be a number, as in <lora:{tag.name}:0.8>") from None
    return te, unet


def parse_attention(text: str) -> list[tuple[str, float]]:
    """Runs of text with their weights; a BREAK is the pair ("BREAK", -1). Neighbouring runs
    of equal weight are merged; an empty prompt is [("", 1.0)]. Unlike the web UI, a BREAK
    inside brackets still breaks (the web UI multiplies its marker and then reads it as the
    word "break"). InputError for a weight that is not a number (`(a:1.2.3)`)."""
    runs: list[list] = []
    round_open: list[int] = []
    square_open: list[int] = []

    def multiply(start: int, factor: float) -> None:
        for run in runs[start:]:
            if run[1] != -1 or run[0] != BREAK:
                run[1] *= factor

    for match in _ATTENTION.finditer(text):
        token, weight = match.group(0), match.group(1)
        if token.startswith("\\"):
            runs.append([token[1:], 1.0])
        elif token == "(":
            round_open.append(len(runs))
        elif token == "[":
            square_open.append(len(runs))
        elif weight is not None and round_open:
            try:
                factor = float(weight)
            except ValueError:
                raise InputError(f"prompt weight {weight!r} is not a number; write it as (text:1.2)") from None
            multiply(round_open.pop(), factor)
        elif token == ")" and round_open:
            multiply(round_open.pop(), ROUND_FACTOR)
        elif token == "]" and square_open:
            multiply(square_open.pop(), SQUARE_FACTOR)
        else:
            for i, part in enumerate(_BREAK.split(token)):
                if i:
                    runs.append([BREAK, -1])
                runs.append([part, 1.0])
    for start in round_open:
        multiply(start, ROUND_FACTOR)
    for start in square_open:
        multiply(start, SQUARE_FACTOR)
    if not runs:
        return [("", 1.0)]
    merged = [runs[0]]
    for run in runs[1:]:
        if run[1] == merged[-1][1]:
            merged[-1][0] += run[0]
        else:
            merged.append(run)
    return [(text, weight) for text, weight in merged]


@dataclass(frozen=True)
class Windows:
    """A prompt as the text encoder's input: `ids` (k, window) int64 and `weights` (k, window)
    float32, one row per window of `window - 2` tokens framed by start and end tokens."""

    ids: np.ndarray
    weights: np.ndarray

    @property
    def weighted(self) -> bool:
        """Whether any token's weight differs from 1."""
        return bool((self.weights != 1.0).any())


def tokenize_windows(prompt: str, tokenize: Callable[[str], list[int]], *, bos: int, eos: int, pad: int,
                     window: int = 77, embeddings: Mapping[tuple[int, ...], Sequence[int]] | None = None,
                     windows: int = 1) -> Windows:
    """The prompt's windows with per-token weights (sd_hijack_clip.tokenize_line).

    `embeddings` maps the token ids of an embedding's name to the ids its vectors take in the
    text encoder's extended table; the longest name matching at a position wins, and an
    embedding that does not fit in the current window starts the next one. Empty windows
    are added up to `windows`. An embedding longer than a window is the caller's to refuse
    (adapters.MAX_VECTORS).
    """
    body = window - 2
    embeddings = embeddings or {}
    by_first: dict[int, list[tuple[tuple[int, ...], Sequence[int]]]] = {}
    for name_ids, vector_ids in sorted(embeddings.items(), key=lambda kv: -len(kv[0])):
        by_first.setdefault(name_ids[0], []).append((name_ids, vector_ids))
    chunks: list[tuple[list[int], list[float]]] = []
    tokens: list[int] = []
    weights: list[float] = []

    def close() -> None:
        nonlocal tokens, weights
        chunks.append((tokens, weights))
        tokens, weights = [], []

    for text, weight in parse_attention(prompt):
        if text == BREAK and weight == -1:
            close()
            continue
        ids = tokenize(text)
        position = 0
        while position < len(ids):
            if len(tokens) == body:
                close()
            match = next(((n, v) for n, v in by_first.get(ids[position], ())
                          if tuple(ids[position:position + len(n)]) == n), None)
            if match is None:
                tokens.append(ids[position])
                weights.append(weight)
                position += 1
                continue
            name_ids, vector_ids = match
            if len(tokens) + len(vector_ids) > body:
                close()
            tokens += list(vector_ids)
            weights += [weight] * len(vector_ids)
            position += len(name_ids)
    if tokens or not chunks:
        close()
    chunks += [([], [])] * (windows - len(chunks))
    rows = [[bos, *t, eos] + [pad] * (window - 2 - len(t)) for t, _ in chunks]
    row_weights = [[1.0, *w, 1.0] + [1.0] * (window - 2 - len(w)) for _, w in chunks]
    return Windows(np.array(rows, dtype=np.int64), np.array(row_weights, dtype=np.float32))


def apply_weights(hidden: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Per-token `weights` (k, window) on the text encoder's output `hidden` (k, window, d),
    float32, each window's mean restored after scaling, as the web UI does
    (sd_hijack_clip.process_tokens). A window whose weighted mean is 0 (weights that cancel
    it exactly) is left scaled but not renormalised, where the web UI would divide by zero."""
    out = hidden.astype(np.float32, copy=True)
    for i in range(len(out)):
        if (weights[i] == 1.0).all():
            continue
        mean = out[i].mean()
        out[i] *= weights[i][:, None]
        scaled = out[i].mean()
        if scaled != 0:
            out[i] *= mean / scaled
    return out
