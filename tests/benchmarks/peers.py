"""sdonnx against its peers on one model, in one run: seconds per UNet step and per image,
cold start and peak RSS. Not a test: at SD 1.5 size it takes tens of minutes.

Contestants, each in a fresh process, in turn (round-robin over --rounds, medians reported):
  diffusers     StableDiffusionPipeline, torch fp32
  optimum-ort   optimum's ORTStableDiffusionPipeline on the same ONNX files sdonnx uses
  optimum-ov    optimum-intel's OVStableDiffusionPipeline (static shapes, compiled), on OpenVINO
                IR written from those ONNX files (optimum-cli's own OpenVINO export fails with
                torch 2.13), fp32 and, where the CPU computes it, bf16
  sdonnx:P:Q    sdonnx on every provider P and precision Q available here

The model is SD 1.5's architecture with random weights (speed does not depend on the values),
built offline from diffusers' configs and cached under tests/benchmarks/cache/ with its sdonnx
export (or the tests' tiny model with --preset tiny, to check this script in seconds).
A "UNet step" is one sampler step: the UNet on a CFG pair plus the sampler arithmetic.
Each sdonnx run starts with an empty cache folder (a first start, as for the peers);
second_start.py measures what the cache saves.

    python tests/benchmarks/peers.py [--preset sd15|tiny] [--steps 20] [--size 512] [--rounds 1]

Writes peers.md (the table, with date and machine) and peers.png (a bar chart of seconds per
UNet step) to --out (default tests/benchmarks/results/).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

START = time.perf_counter()
HERE = Path(__file__).resolve().parent
CACHE = HERE / "cache"
PROMPT, NEGATIVE = "a photo of an astronaut riding a horse on mars", "blurry, low quality"


def paths(preset: str) -> dict[str, Path]:
    return {kind: CACHE / f"{preset}-random-{kind}" for kind in ("diffusers", "onnx", "openvino")}


def prepare(preset: str) -> dict[str, Path]:
    """The cached diffusers model, its sdonnx export and OpenVINO IR of that export."""
    p = paths(preset)
    CACHE.mkdir(exist_ok=True)
    if not (p["diffusers"] / "model_index.json").is_file():
        from sdonnx.export.synthetic import build_random_pipeline

        build_random_pipeline(p["diffusers"], preset=preset)
    if not (p["onnx"] / "model_index.json").is_file():
        from sdonnx.export.exporter import ExportConfig, export

        export(ExportConfig(p["diffusers"], p["onnx"], force=True))
    if not (p["openvino"] / "model_index.json").is_file():
        write_openvino_ir(p["onnx"], p["openvino"])
    return p


def write_openvino_ir(onnx_dir: Path, out: Path, scheduler: dict | None = None) -> None:
    """The layout optimum-intel and openvino.genai both read: <part>/openvino_model.xml beside each
    part's config.json, tokenizer/openvino_tokenizer.xml, and (when the folder has TAESD) a
    tiny_vae_decoder/ in the vae_decoder layout, which `taesd_root` swaps in.

    openvino.genai sets the UNet's `timestep` as int64 of shape [1] (its
    stable_diffusion_pipeline.hpp); optimum's ONNX export has a float scalar, so the IR gets a new
    int64 [1] parameter, a Convert and a Squeeze feeding the old consumers (optimum-intel's
    pipeline reads the same IR: OpenVINO converts its float timestep at the call; fractional
    timesteps would be truncated, which the whole-number Euler-trailing and LCM schedules here
    never have). `scheduler`,
    when given, replaces scheduler_config.json (the peers' own scheduler for the model, e.g.
    SD-Turbo's EulerDiscreteScheduler with trailing timesteps). Weights are written as fp16
    (`ov.save_model`'s default, as optimum-cli writes them) and computed in the precision each
    contestant asks for.
    """
    import numpy as np
    import openvino as ov
    from openvino_tokenizers import convert_tokenizer
    from transformers import CLIPTokenizerFast

    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(onnx_dir, tmp, ignore=shutil.ignore_patterns("*.onnx", "*.onnx_data", "sdonnx*.json"))
    core = ov.Core()
    for part in ("text_encoder", "unet", "vae_decoder", "vae_encoder", "tiny_vae_decoder"):
        if not (onnx_dir / part / "model.onnx").is_file():
            continue
        model = core.read_model(str(onnx_dir / part / "model.onnx"))
        if part == "unet":
            old = next(p for p in model.get_parameters() if "timestep" in p.output(0).get_names())
            old.output(0).set_names(set())
            new = ov.opset13.parameter([1], ov.Type.i64, name="timestep")
            new.output(0).set_names({"timestep"})
            scalar = ov.opset13.squeeze(ov.opset13.convert(new, old.get_element_type()),
                                        ov.opset13.constant(np.array([0], np.int64)))
            for target in list(old.output(0).get_target_inputs()):
                target.replace_source_output(scalar.output(0))
            model.remove_parameter(old)
            model.add_parameters([new])
            model.validate_nodes_and_infer_types()
        ov.save_model(model, str(tmp / part / "openvino_model.xml"))
    if (tmp / "tiny_vae_decoder").is_dir():
        # Read as an AutoencoderKL decoder: 8x upsampling (2^(len - 1)), latents taken as they are.
        (tmp / "tiny_vae_decoder" / "config.json").write_text(json.dumps({
            "_class_name": "AutoencoderKL", "block_out_channels": [64] * 4, "latent_channels": 4,
            "scaling_factor": 1.0, "in_channels": 3, "out_channels": 3}))
    shutil.rmtree(tmp / "tiny_vae_encoder", ignore_errors=True)
    tokenizer, detokenizer = convert_tokenizer(CLIPTokenizerFast.from_pretrained(onnx_dir / "tokenizer"),
                                               with_detokenizer=True)
    ov.save_model(tokenizer, str(tmp / "tokenizer" / "openvino_tokenizer.xml"))
    ov.save_model(detokenizer, str(tmp / "tokenizer" / "openvino_detokenizer.xml"))
    if scheduler:  # diffusers (optimum-intel) takes the class from model_index.json, genai from the config
        (tmp / "scheduler" / "scheduler_config.json").write_text(json.dumps(scheduler, indent=1))
        index = json.loads((tmp / "model_index.json").read_text())
        index["scheduler"] = ["diffusers", scheduler["_class_name"]]
        (tmp / "model_index.json").write_text(json.dumps(index, indent=1))
    tmp.rename(out)


def taesd_root(ir: Path) -> Path:
    """A sibling of the IR folder whose vae_decoder is TAESD (links, no copies): how FastSD CPU
    gives optimum-intel and openvino.genai the tiny decoder."""
    root = ir.with_name(ir.name + "-taesd")
    if not root.is_dir():
        tmp = root.with_name(root.name + ".partial")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        for entry in ir.iterdir():
            if entry.name not in ("vae_decoder", "tiny_vae_decoder"):
                (tmp / entry.name).symlink_to(entry)
        (tmp / "vae_decoder").symlink_to(ir / "tiny_vae_decoder")
        tmp.rename(root)
    return root


def contestants() -> list[str]:
    from sdonnx.runtime.bench import combinations

    names = ["diffusers", "optimum-ort", "optimum-ov:fp32"]
    from sdonnx.runtime import providers

    if providers.cpu_has_bf16():
        names.append("optimum-ov:bf16")
    return names + [f"sdonnx:{p}:{q}" for p, q in combinations()]


class StepClock:
    """Timestamps of the end of every sampler step, for per-step times."""

    def __init__(self):
        self.times: list[float] = []

    def tick(self) -> None:
        self.times.append(time.perf_counter())

    def steps(self, start: float) -> list[float]:
        marks = [start, *self.times]
        return [b - a for a, b in zip(marks, marks[1:])]


def diffusers_callback(clock: StepClock):
    def on_step_end(pipe, step, timestep, callback_kwargs):
        clock.tick()
        return callback_kwargs

    return {"callback_on_step_end": on_step_end}


def run_contestant(name: str, preset: str, steps: int, size: int) -> dict:
    """In a child process: load, a 2-step warm-up image, then the timed image."""
    import numpy as np

    p = paths(preset)
    threads = int(os.environ.get("SDONNX_BENCH_THREADS") or 0) or os.cpu_count() or 1
    load_start = time.perf_counter()
    if name == "diffusers":
        import torch
        from diffusers import StableDiffusionPipeline

        torch.set_num_threads(threads)
        pipe = StableDiffusionPipeline.from_pretrained(p["diffusers"], torch_dtype=torch.float32,
                                                       safety_checker=None)
        pipe.set_progress_bar_config(disable=True)

        def generate(n_steps, clock=None):
            extra = diffusers_callback(clock) if clock else {}
            with torch.inference_mode():
                pipe(PROMPT, negative_prompt=NEGATIVE, num_inference_steps=n_steps, width=size, height=size,
                     generator=torch.Generator().manual_seed(0), **extra)
    elif name == "optimum-ort":
        from optimum.onnxruntime import ORTStableDiffusionPipeline

        import torch

        pipe = ORTStableDiffusionPipeline.from_pretrained(p["onnx"], provider="CPUExecutionProvider")
        pipe.set_progress_bar_config(disable=True)

        def generate(n_steps, clock=None):
            extra = diffusers_callback(clock) if clock else {}
            pipe(PROMPT, negative_prompt=NEGATIVE, num_inference_steps=n_steps, width=size, height=size,
                 generator=torch.Generator().manual_seed(0), **extra)
    elif name.startswith("optimum-ov"):
        from optimum.intel import OVStableDiffusionPipeline

        hint = {"fp32": "f32", "bf16": "bf16"}[name.split(":")[1]]
        pipe = OVStableDiffusionPipeline.from_pretrained(p["openvino"], compile=False,
                                                         ov_config={"INFERENCE_PRECISION_HINT": hint})
        pipe.reshape(batch_size=1, height=size, width=size, num_images_per_prompt=1)
        pipe.compile()
        pipe.set_progress_bar_config(disable=True)

        def generate(n_steps, clock=None):
            extra = diffusers_callback(clock) if clock else {}
            pipe(PROMPT, negative_prompt=NEGATIVE, num_inference_steps=n_steps, width=size, height=size,
                 generator=np.random.RandomState(0), **extra)
    else:
        from sdonnx import Pipeline

        _, provider, precision = name.split(":")
        pipe = Pipeline.load(p["onnx"], provider=provider, precision=precision, threads=threads)

        def generate(n_steps, clock=None):
            callback = (lambda step, total: clock.tick()) if clock else None
            pipe.generate(PROMPT, negative_prompt=NEGATIVE, steps=n_steps, width=size, height=size, seed=0,
                          callback=callback)
    load_s = time.perf_counter() - load_start
    # Cold start: from process start to the end of the first step of the warm-up image.
    warm = StepClock()
    warm_start = time.perf_counter()
    generate(2, warm)
    cold_start_s = warm.times[0] - START
    timed = StepClock()
    start = time.perf_counter()
    generate(steps, timed)
    image_s = time.perf_counter() - start
    step_times = timed.steps(start)
    return {
        "name": name,
        "load_s": load_s,
        "cold_start_s": cold_start_s,
        "warm_up_s": start - warm_start,
        "step_s": statistics.median(step_times[1:] or step_times),
        "image_s": image_s,
        "peak_rss_gb": peak_rss_gb(),
    }


def peak_rss_gb() -> float:
    from sdonnx.runtime.bench import peak_rss_gb as peak

    return peak()


def in_child(name: str, preset: str, steps: int, size: int) -> dict:
    args = json.dumps({"name": name, "preset": preset, "steps": steps, "size": size})
    done = subprocess.run([sys.executable, __file__, "--child", args], capture_output=True, text=True)
    if done.returncode != 0:
        return {"name": name, "error": done.stderr.strip().splitlines()[-1] if done.stderr.strip() else "failed"}
    return json.loads(done.stdout.strip().splitlines()[-1])


def machine() -> str:
    model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("model name")), platform.processor())
    from sdonnx.runtime import providers

    bf16 = "with" if providers.cpu_has_bf16() else "without"
    return f"{model}, {os.cpu_count()} cores ({bf16} bf16), {platform.python_version()}"


def machine_flags() -> str:
    """The CPU's model, cores and the lscpu flags that decide sdonnx's speed, for a result's title."""
    flags = set(Path("/proc/cpuinfo").read_text().split())
    shown = " ".join(f for f in ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16") if f in flags)
    model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("model name")), platform.processor())
    return f"{model}, {os.cpu_count()} cores, {shown}"


def report(results: dict[str, list[dict]], args) -> str:
    baseline = statistics.median(r["step_s"] for r in results["diffusers"]) if "diffusers" in results and \
        all("step_s" in r for r in results["diffusers"]) else None
    lines = [f"{date.today()}, {machine()}; {args.preset} model, {args.size}x{args.size}, "
             f"{args.steps} steps, {args.rounds} round(s), medians",
             "",
             "| contestant | s per UNet step | vs diffusers | s per image | cold start s | load s | peak RSS GB |",
             "|---|---|---|---|---|---|---|"]
    for name, runs in results.items():
        good = [r for r in runs if "error" not in r]
        if not good:
            lines.append(f"| {name} | failed: {runs[0]['error'][:80]} | | | | | |")
            continue

        def med(key):
            return statistics.median(r[key] for r in good)

        speedup = f"{baseline / med('step_s'):.2f}x" if baseline else "-"
        lines.append(f"| {name} | {med('step_s'):.3f} | {speedup} | {med('image_s'):.2f} | "
                     f"{med('cold_start_s'):.2f} | {med('load_s'):.2f} | {med('peak_rss_gb'):.2f} |")
    return "\n".join(lines)


def chart(results: dict[str, list[dict]], out: Path) -> None:
    """A horizontal bar chart of seconds per UNet step, drawn with PIL."""
    from PIL import Image, ImageDraw

    rows = [(name, statistics.median(r["step_s"] for r in runs if "error" not in r))
            for name, runs in results.items() if any("error" not in r for r in runs)]
    if not rows:
        return
    width, bar, left = 760, 26, 170
    image = Image.new("RGB", (width, 50 + bar * len(rows)), "white")
    pen = ImageDraw.Draw(image)
    pen.text((10, 10), "seconds per UNet step (lower is faster)", fill="black")
    top = max(s for _, s in rows)
    for i, (name, seconds) in enumerate(rows):
        y = 36 + i * bar
        length = int((width - left - 80) * seconds / top)
        pen.text((10, y + 6), name, fill="black")
        pen.rectangle([left, y + 3, left + length, y + bar - 5],
                      fill=(40, 110, 200) if name.startswith("sdonnx") else (150, 150, 150))
        pen.text((left + length + 6, y + 6), f"{seconds:.3f}", fill="black")
    image.save(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", choices=["sd15", "tiny"], default="sd15")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--size", type=int, default=None, help="default 512 (sd15), 64 (tiny)")
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--only", nargs="+", help="contestant names (default: all)")
    parser.add_argument("--threads", type=int, help="threads per contestant (default: all cores)")
    parser.add_argument("--out", type=Path, default=HERE / "results")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        options = json.loads(args.child)
        print(json.dumps(run_contestant(**options)))
        return
    args.size = args.size or (512 if args.preset == "sd15" else 64)
    if args.threads:
        os.environ["SDONNX_BENCH_THREADS"] = str(args.threads)
    prepare(args.preset)
    names = args.only or contestants()
    results: dict[str, list[dict]] = {name: [] for name in names}
    for _ in range(args.rounds):
        for name in names:
            with tempfile.TemporaryDirectory(prefix="sdonnx-cache-") as cache:
                os.environ["SDONNX_CACHE_DIR"] = cache
                result = in_child(name, args.preset, args.steps, args.size)
            results[name].append(result)
            print(json.dumps(result), flush=True)
    text = report(results, args)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "peers.md").write_text(text + "\n")
    chart(results, args.out / "peers.png")
    print(text)


if __name__ == "__main__":
    main()
