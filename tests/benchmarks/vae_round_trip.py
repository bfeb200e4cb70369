"""How much of colour and shape survives the autoencoder alone? The ceiling for the whole model.

Encodes the held-out scenes' images with the VAE of a diffusers folder (torch), decodes the
posterior mean, and judges the result like a generated image.

    python tests/benchmarks/vae_round_trip.py models/default-diffusers
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from judge import judge  # noqa: E402

from sdonnx.models import shapes  # noqa: E402


def round_trip(folder: Path, jitters: int = 4) -> dict:
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(folder / "vae", torch_dtype=torch.float32).eval()
    hits = {"colour": 0, "shape": 0, "both": 0}
    by_size: dict[str, list[int]] = {}
    scenes = [s for s in shapes.held_out_scenes() for _ in range(jitters)]
    rng = np.random.default_rng(0)
    images = np.stack([np.asarray(shapes.draw(s, jitter=rng), dtype=np.float32) for s in scenes])
    with torch.no_grad():
        x = torch.from_numpy(images.transpose(0, 3, 1, 2) / 127.5 - 1.0)
        y = vae.decode(vae.encode(x).latent_dist.mean).sample
    pixels = ((y.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()
    for scene, image in zip(scenes, pixels):
        colour, shape = judge(Image.fromarray(image))
        hits["colour"] += colour == scene.color
        hits["shape"] += shape == scene.shape
        hits["both"] += (colour, shape) == (scene.color, scene.shape)
        counts = by_size.setdefault(scene.size, [0, 0])
        counts[0] += (colour, shape) == (scene.color, scene.shape)
        counts[1] += 1
    return {k: v / len(scenes) for k, v in hits.items()} | {"images": len(scenes), "by_size": by_size}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("model", type=Path, help="a diffusers folder")
    args = parser.parse_args()
    result = round_trip(args.model)
    print(f"{args.model}: colour {result['colour']:.0%} shape {result['shape']:.0%} "
          f"both {result['both']:.0%} ({result['images']} images); both right by size: "
          + ", ".join(f"{size} {right}/{n}" for size, (right, n) in result["by_size"].items()))


if __name__ == "__main__":
    main()
