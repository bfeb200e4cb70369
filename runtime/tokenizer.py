"""CLIP's byte-level BPE tokenizer, giving the same ids as transformers' CLIPTokenizer.

Text is normalised as transformers does when ftfy is not installed (control characters
dropped, whitespace collapsed, CJK characters spaced, NFC, lower case), split with CLIP's
regular expression, mapped to printable byte characters and merged by rank.
"""

from __future__ import annotations

import unicodedata
from functools import lru_cache
from pathlib import Path

import numpy as np
import regex

from sdonnx.runtime.errors import ModelFolderError
from sdonnx.runtime.parts import read_json

SPECIAL_TOKENS = ("<|startoftext|>", "<|endoftext|>")
_SPECIAL = regex.compile("(" + "|".join(regex.escape(t) for t in SPECIAL_TOKENS) + ")")
_WORDS = regex.compile(
    r"""'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""", regex.IGNORECASE
)


@lru_cache(maxsize=1)
def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from bytes to printable characters (no spaces or controls)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1)]
    printable += range(ord("®"), ord("ÿ") + 1)
    chars = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, map(chr, chars)))


def _is_cjk(cp: int) -> bool:
    return (
        0x4E00 <= cp <= 0x9FFF
        or 0x3400 <= cp <= 0x4DBF
        or 0x20000 <= cp <= 0x2A6DF
        or 0x2A700 <= cp <= 0x2B73F
        or 0x2B740 <= cp <= 0x2B81F
        or 0x2B820 <= cp <= 0x2CEAF
        or 0xF900 <= cp <= 0xFAFF
        or 0x2F800 <= cp <= 0x2FA1F
    )


def normalize(text: str) -> str:
    """transformers' BasicTokenizer(strip_accents=False, do_split_on_punc=False), joined."""
    out = []
    for char in text:
        cp = ord(char)
        category = unicodedata.category(char)
        if char in " \t\n\r" or category == "Zs":
            out.append(" ")
        elif cp == 0 or cp == 0xFFFD or category.startswith("C"):
            continue
        elif _is_cjk(cp):
            out.append(f" {char} ")
        else:
            out.append(char)
    return " ".join(unicodedata.normalize("NFC", "".join(out)).lower().split())


class CLIPTokenizer:
    """Prompt -> fixed-length id windows, as Stable Diffusion's text encoder expects."""

    def __init__(self, vocab: dict[str, int], merges: list[tuple[str, str]], *,
                 max_length: int = 77, pad_token: str = "<|endoftext|>"):
        self.encoder = vocab
        self.ranks = {pair: i for i, pair in enumerate(merges)}
        self.max_length = max_length
        self.bos_id = vocab["<|startoftext|>"]
        self.eos_id = vocab["<|endoftext|>"]
        self.pad_id = vocab[pad_token]
        self._byte_chars = bytes_to_unicode()
        self._cache: dict[str, list[int]] = {}

    @classmethod
    def from_dir(cls, path: str | Path) -> "CLIPTokenizer":
        path = Path(path)
        vocab_file, merges_file = path / "vocab.json", path / "merges.txt"
        for f in (vocab_file, merges_file):
            if not f.is_file():
                raise ModelFolderError(f"tokenizer file missing: {f}")
        vocab = read_json(vocab_file)
        lines = merges_file.read_text(encoding="utf-8").split("\n")
        merges = [tuple(line.split()) for line in lines if line and not line.startswith("#version")]
        config = read_json(path / "tokenizer_config.json")
        pad = config.get("pad_token", "<|endoftext|>")
        if isinstance(pad, dict):
            pad = pad.get("content", "<|endoftext|>")
        max_length = config.get("model_max_length", 77)
        if not isinstance(max_length, int) or max_length > 1024:
            max_length = 77
        return cls(vocab, merges, max_length=max_length, pad_token=pad)

    def _bpe(self, word: str) -> list[int]:
        cached = self._cache.get(word)
        if cached is not None:
            return cached
        parts = [*word[:-1], word[-1] + "</w>"]
        while len(parts) > 1:
            pairs = zip(parts, parts[1:])
            best = min(pairs, key=lambda p: self.ranks.get(p, float("inf")))
            if best not in self.ranks:
                break
            merged, i = [], 0
            while i < len(parts):
                if i < len(parts) - 1 and (parts[i], parts[i + 1]) == best:
                    merged.append(parts[i] + parts[i + 1])
                    i += 2
                else:
                    merged.append(parts[i])
                    i += 1
            parts = merged
        ids = [self.encoder[p] for p in parts]
        self._cache[word] = ids
        return ids

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`, without start/end tokens or padding."""
        ids: list[int] = []
        for chunk in _SPECIAL.split(text):
            if chunk in SPECIAL_TOKENS:
                ids.append(self.encoder[chunk])
                continue
            for word in _WORDS.findall(normalize(chunk)):
                ids += self._bpe("".join(self._byte_chars[b] for b in word.encode("utf-8")))
        return ids

    def _window(self, tokens: list[int]) -> list[int]:
        ids = [self.bos_id, *tokens, self.eos_id]
        return ids + [self.pad_id] * (self.max_length - len(ids))

    def __call__(self, texts: list[str]) -> np.ndarray:
        """Pad or truncate each text to one window: (len(texts), max_length) int64 ids."""
        body = self.max_length - 2
        return np.array([self._window(self.encode(text)[:body]) for text in texts], dtype=np.int64)

    def window_ids(self, text: str, windows: int = 1) -> np.ndarray:
        """A prompt of any length as (k, max_length) int64 ids, AUTOMATIC1111's 75-token windows.

        The tokens are cut into consecutive runs of max_length - 2, each framed by start and
        end tokens and padded as `__call__` pads; the text encoder sees every window alone and
        the embeddings are concatenated. Empty windows are added up to `windows`, so a prompt
        and its negative prompt can share one length; a prompt is never truncated. Up to 75
        tokens this is exactly `self([text])`.

        The web UI also moves a window's end back to the last comma among its final 20 tokens
        (its `comma_padding_backtrack` setting) to keep a phrase whole; this plain split does
        not, so the windows depend only on the token count.
        """
        body = self.max_length - 2
        tokens = self.encode(text)
        chunks = [tokens[i:i + body] for i in range(0, len(tokens), body)] or [[]]
        chunks += [[]] * (windows - len(chunks))
        return np.array([self._window(chunk) for chunk in chunks], dtype=np.int64)
