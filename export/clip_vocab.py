"""The CLIP BPE vocabulary, derived offline from the copy that ships inside open_clip_torch.

No model hub is reachable where sdonnx is built and tested, but tiny test models still need the
real tokenizer so prompts are split exactly as for real checkpoints. open_clip_torch carries
OpenAI's merges list; `vocab.json` and `merges.txt` in the Hugging Face layout follow from it.
Install it with `pip install --no-deps open_clip_torch` and read the file by path: importing
`open_clip` needs torchvision.
"""

from __future__ import annotations

import gzip
import json
from importlib import metadata
from pathlib import Path

from sdonnx.runtime.errors import SdonnxError
from sdonnx.runtime.tokenizer import bytes_to_unicode

BPE_FILE = "open_clip/bpe_simple_vocab_16e6.txt.gz"
# OpenAI's tokenizer uses the first 49152 - 256 - 2 merges of the file.
N_MERGES = 49152 - 256 - 2


class VocabularyNotFound(SdonnxError):
    pass


def bpe_merges_file() -> Path:
    try:
        path = Path(metadata.distribution("open_clip_torch").locate_file(BPE_FILE))
    except metadata.PackageNotFoundError:
        path = None
    if path is None or not path.is_file():
        raise VocabularyNotFound(
            "the CLIP BPE vocabulary was not found: install it with "
            "`pip install --no-deps open_clip_torch`"
        )
    return path


def write_tokenizer_files(out_dir: Path) -> None:
    """Write vocab.json and merges.txt (49408 tokens, as in every SD 1.x/2.x checkpoint)."""
    lines = gzip.open(bpe_merges_file()).read().decode("utf-8").split("\n")
    merges = [tuple(line.split()) for line in lines[1 : N_MERGES + 1]]
    byte_chars = list(bytes_to_unicode().values())
    tokens = byte_chars + [c + "</w>" for c in byte_chars] + ["".join(m) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "vocab.json").write_text(
        json.dumps({token: i for i, token in enumerate(tokens)}, ensure_ascii=False)
    )
    merges_text = "#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n"
    (out_dir / "merges.txt").write_text(merges_text, encoding="utf-8")
