"""Few-step generation at full size: an SD-Turbo-architecture model (SD 2.1's UNet and text
encoder, random weights, trailing timesteps, guidance 0) in 1 step, and an LCM-distilled
SD 1.5-architecture model (time_cond_proj_dim 256, as LCM_Dreamshaper_v7) in 4 steps at its
guidance 8.5, both at 512x512, decoded by TAESD and by the full VAE, on every sdonnx provider
and precision. Not a test: the models are exported once (minutes, 8-11 GB each) into
tests/benchmarks/cache/.

Each contestant is a fresh process that loads the folder (a second start: a warm-up process
filled the caches), writes one PNG (prompt to file: the "first image"), then `--images` more;
reported: load seconds, first image, median seconds per image (prompt to PNG written), peak RSS.

    python tests/benchmarks/few_step.py [--images 3] [--only turbo-cpu-tiny lcm-cpu-tiny ...]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

HERE = Path(__file__).resolve().parent
CACHE = HERE / "cache"
TAESD = CACHE / "taesd-random"
# name: (source folder, export folder, build_random_pipeline arguments, recorded defaults)
MODELS = {
    "turbo": (CACHE / "sd21-turbo-diffusers", CACHE / "sd21-turbo-onnx",
              dict(preset="sd21", timestep_spacing="trailing"), {"steps": 1, "guidance": 0.0}),
    "lcm": (CACHE / "sd15-lcm-diffusers", CACHE / "sd15-lcm-onnx",
            dict(preset="sd15", time_cond_proj_dim=256), {}),  # records lcm, 4 steps, 8.5 itself
}
PROMPT = "a photo of a cat sitting on a windowsill"
CONTESTANTS = {  # name: (model, provider, precision, decoder)
    "turbo-cpu-tiny": ("turbo", "cpu", "fp32", "tiny"),
    "turbo-cpu-full": ("turbo", "cpu", "fp32", "full"),
    "turbo-openvino-fp32-tiny": ("turbo", "openvino", "fp32", "tiny"),
    "turbo-openvino-bf16-tiny": ("turbo", "openvino", "bf16", "tiny"),
    "turbo-openvino-bf16-full": ("turbo", "openvino", "bf16", "full"),
    "lcm-cpu-tiny": ("lcm", "cpu", "fp32", "tiny"),
    "lcm-openvino-bf16-tiny": ("lcm", "openvino", "bf16", "tiny"),
    "lcm-openvino-bf16-full": ("lcm", "openvino", "bf16", "full"),
}


def prepare(model: str) -> None:
    """The model's random source, a random TAESD, and their export."""
    source, folder, build, defaults = MODELS[model]
    if folder.is_dir():
        return
    if not source.is_dir():
        from sdonnx.export.synthetic import build_random_pipeline

        build_random_pipeline(source, **build)
    if not TAESD.is_dir():
        import diffusers
        import torch

        torch.manual_seed(0)
        diffusers.AutoencoderTiny().save_pretrained(TAESD)
    from sdonnx.export.exporter import ExportConfig, export
    from sdonnx.export.tiny_vae import add_tiny_vae

    start = time.perf_counter()
    export(ExportConfig(source, folder, defaults=defaults), log=print)
    add_tiny_vae(TAESD, folder, log=print)
    print(f"exported {model} in {time.perf_counter() - start:.0f} s")


def worker(name: str, images: int) -> dict:
    from sdonnx import Pipeline

    model, provider, precision, decoder = CONTESTANTS[name]
    start = time.perf_counter()
    pipe = Pipeline.load(MODELS[model][1], provider=provider, precision=precision)
    pipe.unet  # noqa: B018
    load = time.perf_counter() - start
    times = []
    with tempfile.TemporaryDirectory() as out:
        for i in range(images + 1):
            start = time.perf_counter()
            image = pipe.generate(PROMPT, seed=i, decoder=decoder)[0]
            image.save(Path(out) / f"{i}.png", pnginfo=None)
            times.append(time.perf_counter() - start)
    peak = int(next(line.split()[1] for line in Path("/proc/self/status").read_text().splitlines()
                    if line.startswith("VmHWM:"))) / 2**20
    return {"name": name, "load_s": round(load, 2), "first_s": round(times[0], 2),
            "image_s": round(statistics.median(times[1:]), 2), "peak_gb": round(peak, 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=3)
    parser.add_argument("--only", nargs="+", choices=sorted(CONTESTANTS))
    parser.add_argument("--out", type=Path, default=HERE / "results")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print("RESULT " + json.dumps(worker(args.worker, args.images)))
        return
    chosen = args.only or list(CONTESTANTS)
    for model in sorted({CONTESTANTS[name][0] for name in chosen}):
        prepare(model)
    rows = []
    for name in chosen:
        for warm in (True, False):
            done = subprocess.run([sys.executable, __file__, "--worker", name, "--images", str(args.images)],
                                  capture_output=True, text=True)
            if done.returncode:
                print(f"{name}: failed\n{done.stderr[-2000:]}")
                break
        else:
            rows.append(json.loads(done.stdout.split("RESULT ", 1)[1]))
            print(rows[-1], flush=True)
    from peers import machine_flags

    lines = [f"# Few-step images, 512x512: SD-Turbo architecture 1 step, LCM SD 1.5 architecture 4 steps "
             f"({date.today()}, {machine_flags()})", "",
             "| contestant | load s | first image s | s per image (prompt to PNG) | peak RSS GB |",
             "|---|---|---|---|---|"]
    lines += [f"| {r['name']} | {r['load_s']} | {r['first_s']} | {r['image_s']} | {r['peak_gb']} |" for r in rows]
    args.out.mkdir(parents=True, exist_ok=True)
    target = args.out / "few-step.md"
    kept = [line for line in target.read_text().splitlines()[4:] if line.startswith("| ")
            and line.split(" | ")[0][2:] not in {r["name"] for r in rows}] if target.is_file() else []
    target.write_text("\n".join(lines[:4] + kept + lines[4:]) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
