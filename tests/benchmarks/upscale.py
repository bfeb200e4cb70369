"""Time and peak memory of a 512x512 -> 2048x2048 x4 upscale (runtime/upscale.py).

Builds stabilityai/stable-diffusion-x4-upscaler's architecture with random weights (the
real one cannot be downloaded here), exports it once (cached under tests/benchmarks/cache/),
then runs `sdonnx upscale` on a 512x512 picture in a child process per setting and reports
wall time and the child's peak RSS. Random weights draw noise, not detail: the figures are
speed and memory only.

    python tests/benchmarks/upscale.py [--steps 4] [--tile 128] [--size 512]
"""

from __future__ import annotations

import argparse
import platform
import resource
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

import numpy as np
from PIL import Image

CACHE = Path(__file__).parent / "cache"


def prepare() -> Path:
    """The exported random x4 upscaler folder, built and exported on first use."""
    folder = CACHE / "x4-random-onnx"
    if folder.is_dir():
        return folder
    source = CACHE / "x4-random-diffusers"
    if not source.is_dir():
        from sdonnx.export.synthetic import build_random_upscaler

        build_random_upscaler(source, preset="x4")
    from sdonnx.export.exporter import ExportConfig, export

    start = time.perf_counter()
    export(ExportConfig(source, folder), log=print)
    print(f"exported in {time.perf_counter() - start:.0f} s")
    return folder


def run(folder: Path, image: Path, out: Path, args, tile: str) -> tuple[float, float]:
    """(seconds, peak RSS in GB) of one `sdonnx upscale` child process."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "sdonnx.cli.app", "upscale", str(image), "--model", str(folder),
                    "--prompt", "a photo of a harbour", "--steps", str(args.steps), "--seed", "1", "--tile", tile,
                    "--provider", "cpu", "-v", "-o", str(out)], check=True)
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    if peak <= before:
        print("(peak RSS of this child not above an earlier one's: the figure is a lower bound)")
    return seconds, peak * 1024 / 1e9


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--tile", default="128")
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--out", type=Path, default=Path("/tmp/sdonnx-upscale-bench"))
    args = parser.parse_args()
    folder = prepare()
    args.out.mkdir(parents=True, exist_ok=True)
    image = args.out / "low.png"
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (args.size // 8, args.size // 8, 3)).astype(np.uint8)).resize(
        (args.size, args.size), Image.Resampling.BICUBIC).save(image)
    out = args.out / f"x4-{args.size}-{args.steps}-{args.tile}-{int(time.time())}.png"
    seconds, peak = run(folder, image, out, args, args.tile)
    flags = [f for f in subprocess.run(["lscpu"], capture_output=True, text=True).stdout.split()
             if f in ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile")]
    print(f"{date.today()}, {platform.machine()} {' '.join(flags)}: x4 upscale {args.size}x{args.size} -> "
          f"{4 * args.size}x{4 * args.size}, {args.steps} steps, UNet tile {args.tile}, CFG: "
          f"{seconds:.1f} s, peak RSS {peak:.2f} GB ({Image.open(out).size})")


if __name__ == "__main__":
    main()
