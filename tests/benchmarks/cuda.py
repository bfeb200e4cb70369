"""The cuda provider against the CPU, and what IO binding saves: runs with the runtime alone.

On a machine with onnxruntime-gpu and a GPU, loads an exported model (default: the embedded
one) three ways: `cpu`, `cuda` (IO binding: the text context is uploaded once per image and
the UNet's outputs stay on the GPU until the sampler reads them) and `cuda` with IO binding off
(numpy in, numpy out at every call). Each makes a warm-up image, then timed images, in rounds,
alternating. Reports load time, seconds per UNet step (CFG pair), seconds per image and the
picture's PSNR against the CPU's on the same seed.

    python tests/benchmarks/cuda.py [--model DIR] [--size 512] [--steps 20] [--rounds 3]

Writes cuda.md to --out (default tests/benchmarks/results/).
"""

from __future__ import annotations

import argparse
import dataclasses
import platform
import statistics
import subprocess
import time
from datetime import date
from pathlib import Path

import numpy as np
import onnxruntime as ort

from sdonnx import Pipeline
from sdonnx.export.quality import psnr  # numpy only, like this script
from sdonnx.runtime import providers
from sdonnx.runtime.errors import ProviderError

HERE = Path(__file__).resolve().parent


def gpu_name() -> str:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=30)
        return out.stdout.strip() or "unknown GPU"
    except (OSError, subprocess.SubprocessError):
        return "unknown GPU"


def load(name: str, model: Path | None) -> tuple[Pipeline, float]:
    start = time.perf_counter()
    pipe = Pipeline.load(model, provider=name, precision="fp32")
    return pipe, time.perf_counter() - start


def timed_image(pipe: Pipeline, settings: dict) -> tuple[np.ndarray, float, float]:
    """The image, the median seconds per sampler step after the first, and seconds per image."""
    ticks = []
    start = time.perf_counter()
    image = pipe.generate("a red circle", callback=lambda step, total: ticks.append(time.perf_counter()),
                          **settings)[0]
    total = time.perf_counter() - start
    steps = np.diff(ticks)
    return np.asarray(image), float(np.median(steps)) if len(steps) else total, total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", type=Path, default=None, help="ONNX model folder (default: the embedded one)")
    parser.add_argument("--size", type=int, default=None, help="default: the model's native size")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", type=Path, default=HERE / "results")
    args = parser.parse_args()
    try:
        providers.resolve("cuda")
    except ProviderError as e:
        raise SystemExit(str(e)) from e
    # The cuda provider with IO binding switched off.
    providers.PROVIDERS["cuda-unbound"] = dataclasses.replace(providers.PROVIDERS["cuda"], bind_device=None)
    names = ["cpu", "cuda", "cuda-unbound"]
    pipes, load_s = {}, {}
    for name in names:
        pipes[name], load_s[name] = load(name, args.model)
    size = args.size or pipes["cpu"].native_size
    settings = dict(steps=args.steps, guidance=7.5, seed=0, width=size, height=size, sampler="euler")
    for pipe in pipes.values():  # warm-up: first-call allocations, cuDNN algorithm search
        pipe.generate("a red circle", **{**settings, "steps": 2})
    runs: dict[str, list[tuple[float, float]]] = {name: [] for name in names}
    images = {}
    for _ in range(args.rounds):
        for name in names:
            images[name], step_s, image_s = timed_image(pipes[name], settings)
            runs[name].append((step_s, image_s))
            print(name, f"{step_s:.4f} s/step", f"{image_s:.3f} s/image", flush=True)

    model = args.model or "the embedded default model"
    lines = [f"{date.today()}, {gpu_name()}, {platform.processor() or platform.machine()}, onnxruntime "
             f"{ort.__version__}; {model}, {size}x{size}, {args.steps} steps euler, guidance 7.5, "
             f"{args.rounds} round(s) alternating, medians",
             "",
             "| provider | load s | s per UNet step (CFG pair) | vs cpu | s per image | PSNR vs cpu dB |",
             "|---|---|---|---|---|---|"]
    cpu_step = statistics.median(s for s, _ in runs["cpu"])
    for name in names:
        step = statistics.median(s for s, _ in runs[name])
        image = statistics.median(i for _, i in runs[name])
        label = {"cuda": "cuda (IO binding)", "cuda-unbound": "cuda, IO binding off"}.get(name, name)
        lines.append(f"| {label} | {load_s[name]:.2f} | {step:.4f} | {cpu_step / step:.1f}x | {image:.3f} | "
                     f"{psnr(images[name], images['cpu']):.1f} |")
    text = "\n".join(lines)
    args.out.mkdir(parents=True, exist_ok=True)
    tmp = args.out / "cuda.md.tmp"
    tmp.write_text(text + "\n")
    tmp.replace(args.out / "cuda.md")
    print(text)


if __name__ == "__main__":
    main()
