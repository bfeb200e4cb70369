"""Which edits the invisible watermark survives (runtime/watermark.py), on generated pictures.

Generates pictures with the embedded model (and random colour texture, the method's best case),
embeds Stable Diffusion 1.x's 136-bit text, then checks whether `watermark.find` still reads it
after each edit: none, JPEG at quality 90 and 75, a 0.5x resize, crops. Prints a markdown table
of the share of pictures read exactly. Not a test: the method's reliability is a property of
the pictures, measured here.

    python tests/benchmarks/watermark.py [--images 20] [--size 512]
"""

from __future__ import annotations

import argparse
import io
import platform
import subprocess
from datetime import date

import numpy as np
from PIL import Image

from sdonnx.runtime import Pipeline, watermark

EDITS = {
    "none": lambda im: im,
    "JPEG q90": lambda im: _jpeg(im, 90),
    "JPEG q75": lambda im: _jpeg(im, 75),
    "resize 0.5x": lambda im: im.resize((im.width // 2, im.height // 2), Image.Resampling.LANCZOS),
    "crop bottom 25%": lambda im: im.crop((0, 0, im.width, im.height * 3 // 4)),
    "crop 8 px off left and top": lambda im: im.crop((8, 8, im.width, im.height)),
}


def _jpeg(image: Image.Image, quality: int) -> Image.Image:
    data = io.BytesIO()
    image.save(data, "JPEG", quality=quality)
    return Image.open(io.BytesIO(data.getvalue())).convert("RGB")


def _reads(image: Image.Image) -> bool:
    try:
        return watermark.find(image, 8 * len(watermark.SD1_MESSAGE)).text == watermark.SD1_MESSAGE
    except Exception:
        return False


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--images", type=int, default=20)
    parser.add_argument("--size", type=int, default=512)
    args = parser.parse_args()
    pipe = Pipeline.load(provider="cpu")
    prompts = ["a lighthouse on a cliff", "a bowl of fruit", "a city street at night", "a portrait of a woman",
               "a forest in autumn"]
    sets = {
        "embedded model": [pipe.generate(prompts[i % len(prompts)], steps=12, seed=i, width=args.size,
                                         height=args.size)[0] for i in range(args.images)],
        "random texture": [Image.fromarray(np.random.default_rng(i).integers(40, 216, (args.size, args.size, 3))
                                           .astype(np.uint8)) for i in range(args.images)],
    }
    cpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    model = next((line.split(":", 1)[1].strip() for line in cpu.splitlines() if line.startswith("Model name")),
                 platform.processor())
    print(f"{date.today()}, {model}; {args.images} pictures of {args.size}x{args.size} per row, "
          f"'{watermark.SD1_MESSAGE}' (136 bits): share read exactly\n")
    print("| pictures | " + " | ".join(EDITS) + " |")
    print("|---" * (len(EDITS) + 1) + "|")
    embedders = {"sdonnx": lambda im: watermark.embed(im, watermark.SD1_MESSAGE)}
    try:  # the reference package, where installed (the test extra has it): does its own mark fare better?
        from imwatermark import WatermarkEncoder

        encoder = WatermarkEncoder()
        encoder.set_watermark("bytes", watermark.SD1_MESSAGE.encode())
        embedders["invisible-watermark"] = lambda im: Image.fromarray(
            encoder.encode(np.ascontiguousarray(np.asarray(im)[:, :, ::-1]), "dwtDct")[:, :, ::-1])
    except ImportError:
        pass
    for name, images in sets.items():
        for who, embed in embedders.items():
            marked = [embed(im) for im in images]
            shares = [np.mean([_reads(edit(im)) for im in marked]) for edit in EDITS.values()]
            print(f"| {name}, marked by {who} | " + " | ".join(f"{s:.0%}" for s in shares) + " |")
    false = np.mean([not _reads(im) for im in sets["embedded model"]])
    print(f"\nunmarked pictures of the embedded model not taken for marked: {false:.0%}")


if __name__ == "__main__":
    main()
