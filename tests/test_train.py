"""models/train.py: a recipe budgeted in steps gives the same model on every run."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

TRAIN = Path(__file__).resolve().parent.parent / "models" / "train.py"
# A few steps of every stage at 32 pixels: the autoencoder (joint, then its decoder), then the
# UNet and text encoder from a latent bank.
TINY = ["--image-size", "32", "--vae-steps", "2", "--decoder-steps", "1", "--unet-steps", "2",
        "--latent-bank", "16", "--seed", "3", "--threads", "1"]


def train(out: Path, *args: str) -> Path:
    subprocess.run([sys.executable, str(TRAIN), str(out), *args], check=True, capture_output=True, text=True)
    return out


def weights(folder: Path) -> dict:
    return {f"{part}.{name}": tensor for part in ("unet", "vae", "text_encoder")
            for name, tensor in load_file(next((folder / part).glob("*.safetensors"))).items()}


@pytest.mark.slow
def test_a_step_budget_gives_the_same_model_twice(tmp_path):
    first = weights(train(tmp_path / "a", *TINY))
    second = weights(train(tmp_path / "b", *TINY))
    assert first.keys() == second.keys()
    assert all((first[name] == second[name]).all() for name in first)
    record = json.loads((tmp_path / "a" / "training.json").read_text())
    assert [e["part"] for e in record["loss"]] == ["vae", "vae_decoder", "unet"]
    assert record["command"].endswith(" ".join(TINY))
    # A different seed is a different model: the comparison above can fail.
    other = weights(train(tmp_path / "c", *TINY[:-4], "--seed", "4", "--threads", "1"))
    assert any(not (first[name] == other[name]).all() for name in first)


@pytest.mark.slow
def test_continuing_runs_keep_the_encoder_and_record_their_commands(tmp_path):
    base = train(tmp_path / "base", *TINY)
    decoder = train(tmp_path / "decoder", "--decoder-only", str(base), "--decoder-steps", "1", "--image-size", "32",
                    "--threads", "1")
    joined = train(tmp_path / "joined", "--unet-from", str(base), "--vae-from", str(decoder), "--unet-steps", "1",
                   "--latent-bank", "8", "--mislabeled", "0.2", "--unrelated", "0.3", "--caption-dropout", "0.3",
                   "--image-size", "32", "--threads", "1")
    before, after = weights(base), weights(joined)
    encoder = [name for name in before if name.startswith("vae.encoder.")]
    assert encoder and all((before[name] == after[name]).all() for name in encoder)
    assert any(not (before[name] == after[name]).all() for name in before if name.startswith("vae.decoder."))
    record = json.loads((joined / "training.json").read_text())
    assert record["unet_stages"][-1].startswith(f"train.py {joined} --unet-from {base}")
    assert record["stages"][-1].startswith(f"train.py {decoder} --decoder-only {base}")


def test_bad_options_are_refused_with_the_reason(tmp_path):
    result = subprocess.run([sys.executable, str(TRAIN), str(tmp_path / "x"), "--caption-dropout", "1.5"],
                            capture_output=True, text=True)
    assert result.returncode == 2 and "--caption-dropout 1.5" in result.stderr
