"""DeepCache (--cache-interval N): what it costs the picture and what it saves. Not a test.

Quality, on the embedded default model (the only model here whose pictures mean something):
50 held-out prompts x 2 seeds, euler, the model's guidance, 20 steps, judged by tests/judge.py,
for each interval, in fp32 and in int8 (`sdonnx quantize --mode int8` of the embedded model);
and the PSNR of every cached image against the uncached image of the same prompt and seed. The
embedded model ships without DeepCache graphs (its UNet takes milliseconds), so a copy gets
them here (export/deep_cache.py).

Speed, at SD 1.5 size with random weights (tests/benchmarks/cache/sd15-int8, peers.py builds
it): seconds per 512x512 image of 20 steps with CFG and the full VAE, per interval, for
sdonnx's onnxruntime int8 path and OpenVINO's int8 + bf16 path, each interval a fresh process,
in turn over --rounds (medians), and the shallow call's share of a full one.

    python tests/benchmarks/deep_cache.py [--quality] [--speed] [--intervals 1 2 3 5] [--rounds 2]

Prints markdown tables; writes deep-cache.md to --out (default tests/benchmarks/results/).
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))
from peers import CACHE, machine_flags  # noqa: E402

PROMPT, NEGATIVE = "a photo of an astronaut riding a horse on mars", "blurry, low quality"
SPEED_PATHS = {"cpu int8": ("cpu", "fp32"), "openvino int8 + bf16": ("openvino", "bf16")}


def embedded_copies(root: Path) -> dict[str, Path]:
    """The embedded model with DeepCache graphs, and its int8 quantization (which writes them)."""
    from sdonnx.export.deep_cache import write_deep_cache
    from sdonnx.export.quantize import QuantizeConfig, quantize
    from sdonnx.runtime import parts
    from sdonnx.runtime.pipeline import default_model_path

    fp32 = root / "fp32"
    shutil.copytree(default_model_path(), fp32)
    write_deep_cache(fp32 / parts.UNET.onnx_path)
    int8 = root / "int8"
    quantize(QuantizeConfig(fp32, int8, mode="int8"))
    return {"fp32": fp32, "int8": int8}


# (weights, provider, precision): the fp32 model, and the int8 folder on both int8 paths.
QUALITY_PATHS = (("fp32", "cpu", "fp32"), ("int8", "cpu", "fp32"), ("int8", "openvino", "bf16"))


def quality(intervals: list[int], seeds: int) -> list[str]:
    """Judge accuracy and PSNR against the uncached image per path and interval (all intervals
    for fp32, 1 and 3 for the int8 paths)."""
    from judge import judge

    from sdonnx import Pipeline
    from sdonnx.export.quality import psnr  # (identical images count as its MAX_PSNR, 100 dB)
    from sdonnx.models import shapes
    from sdonnx.runtime import providers

    scenes = shapes.held_out_scenes()
    rows = ["| weights | provider, precision | interval | colour | shape | both | PSNR vs interval 1, mean dB | "
            "min dB | s |", "|---|---|---|---|---|---|---|---|---|"]
    with tempfile.TemporaryDirectory(prefix="sdonnx-deep-cache-") as tmp:
        folders = embedded_copies(Path(tmp))
        for weights, provider, precision in QUALITY_PATHS:
            if not providers.PROVIDERS[provider].available() or (precision == "bf16" and not providers.cpu_has_bf16()):
                continue
            pipe = Pipeline.load(folders[weights], provider=provider, precision=precision)
            uncached: dict[tuple, np.ndarray] = {}
            for interval in intervals if weights == "fp32" else [i for i in intervals if i in (1, 3)]:
                hits, values, start = {"colour": 0, "shape": 0, "both": 0}, [], time.perf_counter()
                for scene in scenes:
                    for seed in range(seeds):
                        image = pipe.generate(scene.caption(0), seed=seed, width=shapes.IMAGE_SIZE,
                                              height=shapes.IMAGE_SIZE, sampler="euler", steps=20,
                                              cache_interval=interval)[0]
                        colour, shape = judge(image)
                        hits["colour"] += colour == scene.color
                        hits["shape"] += shape == scene.shape
                        hits["both"] += (colour, shape) == (scene.color, scene.shape)
                        pixels = np.asarray(image)
                        key = (scene.caption(0), seed)
                        if interval == 1:
                            uncached[key] = pixels
                        elif key in uncached:
                            values.append(psnr(pixels, uncached[key]))
                total = len(scenes) * seeds
                shown = f"{statistics.fmean(values):.1f} | {min(values):.1f}" if values else "- | -"
                row = (f"| {weights} | {provider}, {precision} | {interval} | {hits['colour'] / total:.0%} | {hits['shape'] / total:.0%} | "
                       f"{hits['both'] / total:.0%} | {shown} | {time.perf_counter() - start:.0f} |")
                rows.append(row)
                print(row, flush=True)
    return rows


CHILD = """
import json, sys, time
from sdonnx import Pipeline
from sdonnx.runtime.bench import peak_rss_gb
folder, provider, precision, interval = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
pipe = Pipeline.load(folder, provider=provider, precision=precision)
args = dict(negative_prompt=sys.argv[6], width=512, height=512, seed=0, cache_interval=interval)
pipe.generate(sys.argv[5], steps=2, **args)  # warm-up: compiles, optimized graphs
ticks = []
start = time.perf_counter()
pipe.generate(sys.argv[5], steps=20, callback=lambda step, total: ticks.append(time.perf_counter()), **args)
image_s = time.perf_counter() - start
steps = [b - a for a, b in zip([start] + ticks, ticks)]
print(json.dumps({"image_s": image_s, "unet_s": sum(steps), "peak_rss_gb": peak_rss_gb()}))
"""


def speed(intervals: list[int], rounds: int) -> list[str]:
    folder = CACHE / "sd15-int8"
    if not (folder / "unet" / "deep_cache.json").is_file():
        raise SystemExit(f"{folder} has no DeepCache graphs: quantize it again (peers.py's prepare)")
    results: dict[tuple[str, int], list[dict]] = {}
    for _ in range(rounds):
        for path, (provider, precision) in SPEED_PATHS.items():
            for interval in intervals:
                done = subprocess.run([sys.executable, "-c", CHILD, str(folder), provider, precision, str(interval),
                                       PROMPT, NEGATIVE], capture_output=True, text=True)
                if done.returncode:
                    raise RuntimeError(done.stderr[-2000:])
                result = json.loads(done.stdout.strip().splitlines()[-1])
                results.setdefault((path, interval), []).append(result)
                print(json.dumps({"path": path, "interval": interval, **result}), flush=True)
    rows = ["| path | interval | s per image | sampling s | vs interval 1 | peak RSS GB |", "|---|---|---|---|---|---|"]
    for (path, interval), runs in results.items():
        image = statistics.median(r["image_s"] for r in runs)
        base = statistics.median(r["image_s"] for r in results[path, 1]) if (path, 1) in results else None
        ratio = f"{base / image:.2f}x" if base else "-"
        rows.append(f"| {path} | {interval} | {image:.1f} | {statistics.median(r['unet_s'] for r in runs):.1f} | "
                    f"{ratio} | {statistics.median(r['peak_rss_gb'] for r in runs):.2f} |")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quality", action="store_true")
    parser.add_argument("--speed", action="store_true")
    parser.add_argument("--intervals", nargs="+", type=int, default=[1, 2, 3, 5])
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--out", type=Path, default=HERE / "results")
    args = parser.parse_args()
    if 1 not in args.intervals:
        args.intervals = [1, *args.intervals]  # the reference of the PSNR and the ratio
    text = [f"{date.today()}, {machine_flags()}", ""]
    if args.quality or not args.speed:
        text += ["Quality, the embedded model (euler, its guidance, 20 steps, 50 held-out prompts x "
                 f"{args.seeds} seeds):", "", *quality(args.intervals, args.seeds), ""]
    if args.speed or not args.quality:
        text += [f"Speed, SD 1.5 architecture (random weights), 512x512, 20 steps, CFG, full VAE, {args.rounds} "
                 "round(s), medians:", "", *speed(args.intervals, args.rounds), ""]
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "deep-cache.md").write_text("\n".join(text))
    print("\n".join(text))


if __name__ == "__main__":
    main()
