"""sdonnx against its peers on one model, in one run: seconds per UNet step and per image,
cold start and peak RSS. Not a test: at SD 1.5 size it takes tens of minutes.

Contestants, each in a fresh process, in turn (round-robin over --rounds, medians reported):
  diffusers       StableDiffusionPipeline, torch fp32
  optimum-ort     optimum's ORTStableDiffusionPipeline on the same ONNX files sdonnx uses
  optimum-ov:Q    optimum-intel's OVStableDiffusionPipeline (static shapes, compiled), on OpenVINO
                  IR written from those ONNX files (optimum-cli's own OpenVINO export fails with
                  torch 2.13): fp32, bf16 (where the CPU computes it), and int8: the UNet IR
                  that `sdonnx quantize --mode int8-openvino` writes with NNCF as optimum-intel's
                  hybrid mode does (int8 convolutions and matmuls), the rest in bf16 where the
                  CPU has it (OpenVINO's default there), else fp32
  genai:Q         openvino.genai's Text2ImagePipeline (torch-free, C++; reshape + compile for
                  static shapes) on the same IR: fp32, bf16, int8 as above
  sdonnx:P:Q:F    sdonnx on provider P in precision Q on folder F: fp32 (the export), int8 (`sdonnx
                  quantize --mode int8`, onnxruntime QDQ), int8-openvino (the NNCF IR); a
                  fourth field dcN runs DeepCache with --cache-interval N

Fp32 contestants are the slow ones (4-15 s per UNet step here): `--slow-rounds` (default 1)
limits their rounds so that a 3-round run of the rest fits in an hour.

The model is SD 1.5's architecture with random weights (speed does not depend on the values),
built offline from diffusers' configs and cached under tests/benchmarks/cache/ with its sdonnx
export (or the tests' tiny model with --preset tiny, to check this script in seconds).
A "UNet step" is one sampler step: the UNet on a CFG pair plus the sampler arithmetic.
Each sdonnx run starts with an empty cache folder (a first start, as for the peers);
second_start.py measures what the cache saves.

    python tests/benchmarks/peers.py [--preset sd15|tiny] [--steps 20] [--size 512] [--rounds 3]

Writes peers.md (the table, with date, CPU and its flags) and peers.png (a bar chart of seconds
per image) to --out (default tests/benchmarks/results/). "s per image" is prompt to PNG: the
generation and the PNG's encoding, after a 2-step warm-up image in the same process.
"""

from __future__ import annotations

import argparse
import io
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
    """The folders: diffusers, the sdonnx export (onnx), its IR for the peers (openvino), the
    sdonnx quantized folders (int8, int8-openvino) and the peers' IR with the int8 UNet."""
    found = {kind: CACHE / f"{preset}-random-{kind}" for kind in ("diffusers", "onnx", "openvino", "openvino-int8")}
    return found | {"fp32": found["onnx"], "int8": CACHE / f"{preset}-int8",
                    "int8-openvino": CACHE / f"{preset}-int8-openvino"}


def prepare(preset: str, quantized: bool = False) -> dict[str, Path]:
    """The cached diffusers model, its sdonnx export, OpenVINO IR of that export, and with
    `quantized` the quantized folders (`sdonnx quantize` at 256x256, one calibration prompt: the
    speed does not depend on the calibration) and the peers' IR with the NNCF int8 UNet."""
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
    for mode in ("int8", "int8-openvino") if quantized else ():
        if not (p[mode] / "model_index.json").is_file():
            from sdonnx.export.quantize import QuantizeConfig, quantize

            quantize(QuantizeConfig(p["onnx"], p[mode], mode=mode, size=256 if preset == "sd15" else 64,
                                    calibration_prompts=1, check_prompts=1, check_steps=4, force=True))
    if quantized and not (p["openvino-int8"] / "model_index.json").is_file():
        write_int8_ir(p["openvino"], p["int8-openvino"], p["openvino-int8"])
    return p


def genai_timestep(model) -> None:
    """Give an OpenVINO UNet model the `timestep` input openvino.genai sets, int64 of shape [1]
    (its stable_diffusion_pipeline.hpp), in place of optimum's float scalar: a new parameter,
    a Convert and a Squeeze feeding the old consumers (optimum-intel's pipeline reads the same
    IR: OpenVINO converts its float timestep at the call; fractional timesteps would be
    truncated, which the whole-number Euler-trailing and LCM schedules here never have)."""
    import numpy as np
    import openvino as ov

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


def write_int8_ir(ir: Path, int8_openvino: Path, out: Path) -> None:
    """The peers' IR folder `ir` (links) with the UNet of the sdonnx int8-openvino folder (NNCF's
    int8 IR) in its place, its timestep rewritten for openvino.genai."""
    import openvino as ov

    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    for entry in ir.iterdir():
        if entry.name != "unet":
            (tmp / entry.name).symlink_to(entry)
    (tmp / "unet").mkdir()
    shutil.copy(ir / "unet" / "config.json", tmp / "unet" / "config.json")
    model = ov.Core().read_model(str(int8_openvino / "unet" / "openvino_model.xml"))
    genai_timestep(model)
    ov.save_model(model, str(tmp / "unet" / "openvino_model.xml"), compress_to_fp16=False)
    tmp.rename(out)


def write_openvino_ir(onnx_dir: Path, out: Path, scheduler: dict | None = None) -> None:
    """The layout optimum-intel and openvino.genai both read: <part>/openvino_model.xml beside each
    part's config.json, tokenizer/openvino_tokenizer.xml, and (when the folder has TAESD) a
    tiny_vae_decoder/ in the vae_decoder layout, which `taesd_root` swaps in.

    The UNet's timestep becomes openvino.genai's int64 [1] input (genai_timestep). `scheduler`,
    when given, replaces scheduler_config.json (the peers' own scheduler for the model, e.g.
    SD-Turbo's EulerDiscreteScheduler with trailing timesteps). Weights are written as fp16
    (`ov.save_model`'s default, as optimum-cli writes them) and computed in the precision each
    contestant asks for.
    """
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
            genai_timestep(model)
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


# Contestants computing in fp32: 4-15 s per UNet step at SD 1.5 size here (--slow-rounds).
SLOW = ("diffusers", "optimum-ort", "optimum-ov:fp32", "genai:fp32", "sdonnx:cpu:fp32:fp32")


def contestants() -> list[str]:
    """Every peer's float and int8 paths and sdonnx's, those needing bf16 where the CPU has it."""
    from sdonnx.runtime import providers

    bf16 = providers.cpu_has_bf16()
    names = ["diffusers", "optimum-ort", "optimum-ov:fp32", *(["optimum-ov:bf16"] if bf16 else []), "optimum-ov:int8",
             "genai:fp32", *(["genai:bf16"] if bf16 else []), "genai:int8",
             "sdonnx:cpu:fp32:fp32", "sdonnx:cpu:fp32:int8", "sdonnx:cpu:fp32:int8:dc3"]
    if providers.PROVIDERS["openvino"].available():
        names += ["sdonnx:openvino:fp32:int8"]
        if bf16:
            names += ["sdonnx:openvino:bf16:fp32", "sdonnx:openvino:bf16:int8", "sdonnx:openvino:bf16:int8-openvino",
                      "sdonnx:openvino:bf16:int8:dc3"]
    return names


def ov_hint(precision: str) -> str:
    """OpenVINO's INFERENCE_PRECISION_HINT for a peer's precision; int8: its float parts in bf16
    where the CPU computes it (OpenVINO's default there), else f32."""
    from sdonnx.runtime import providers

    if precision == "int8":
        return "bf16" if providers.cpu_has_bf16() else "f32"
    return {"fp32": "f32", "bf16": "bf16"}[precision]


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
    # None: each library's own default (onnxruntime and OpenVINO: the physical cores; torch: its
    # own). The 2026-11-26 Xeon run gave sdonnx os.cpu_count() threads and the peers their
    # defaults: on a CPU with two threads per core that oversubscribes sdonnx alone.
    threads = int(os.environ.get("SDONNX_BENCH_THREADS") or 0) or None
    ov_threads = {"INFERENCE_NUM_THREADS": threads} if threads else {}
    load_start = time.perf_counter()
    if name == "diffusers":
        import torch
        from diffusers import StableDiffusionPipeline

        if threads:
            torch.set_num_threads(threads)
        pipe = StableDiffusionPipeline.from_pretrained(p["diffusers"], torch_dtype=torch.float32,
                                                       safety_checker=None)
        pipe.set_progress_bar_config(disable=True)

        def generate(n_steps, clock=None):
            extra = diffusers_callback(clock) if clock else {}
            with torch.inference_mode():
                return pipe(PROMPT, negative_prompt=NEGATIVE, num_inference_steps=n_steps, width=size, height=size,
                            generator=torch.Generator().manual_seed(0), **extra).images[0]
    elif name == "optimum-ort":
        from optimum.onnxruntime import ORTStableDiffusionPipeline

        import torch

        import onnxruntime as ort

        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        pipe = ORTStableDiffusionPipeline.from_pretrained(p["onnx"], provider="CPUExecutionProvider",
                                                          session_options=options)
        pipe.set_progress_bar_config(disable=True)

        def generate(n_steps, clock=None):
            extra = diffusers_callback(clock) if clock else {}
            return pipe(PROMPT, negative_prompt=NEGATIVE, num_inference_steps=n_steps, width=size, height=size,
                        generator=torch.Generator().manual_seed(0), **extra).images[0]
    elif name.startswith("optimum-ov"):
        from optimum.intel import OVStableDiffusionPipeline

        precision = name.split(":")[1]
        pipe = OVStableDiffusionPipeline.from_pretrained(
            p["openvino-int8" if precision == "int8" else "openvino"], compile=False,
            ov_config={"INFERENCE_PRECISION_HINT": ov_hint(precision), **ov_threads})
        pipe.reshape(batch_size=1, height=size, width=size, num_images_per_prompt=1)
        pipe.compile()
        pipe.set_progress_bar_config(disable=True)

        def generate(n_steps, clock=None):
            extra = diffusers_callback(clock) if clock else {}
            return pipe(PROMPT, negative_prompt=NEGATIVE, num_inference_steps=n_steps, width=size, height=size,
                        generator=np.random.RandomState(0), **extra).images[0]
    elif name.startswith("genai"):
        import openvino_genai
        from PIL import Image

        precision = name.split(":")[1]
        pipe = openvino_genai.Text2ImagePipeline(str(p["openvino-int8" if precision == "int8" else "openvino"]))
        pipe.reshape(1, size, size, 7.5)
        pipe.compile("CPU", config={"INFERENCE_PRECISION_HINT": ov_hint(precision), **ov_threads})

        def generate(n_steps, clock=None):
            def on_step(step, num_steps, latent):
                clock.tick()
                return False  # (True would stop the generation)

            tensor = pipe.generate(PROMPT, negative_prompt=NEGATIVE, width=size, height=size,
                                   num_inference_steps=n_steps, guidance_scale=7.5,
                                   generator=openvino_genai.TorchGenerator(0), **({"callback": on_step} if clock else {}))
            return Image.fromarray(tensor.data[0])
    else:
        from sdonnx import Pipeline

        _, provider, precision, folder, *cached = name.split(":")
        interval = int(cached[0].removeprefix("dc")) if cached else 1
        pipe = Pipeline.load(p[folder], provider=provider, precision=precision, threads=threads)

        def generate(n_steps, clock=None):
            callback = (lambda step, total: clock.tick()) if clock else None
            return pipe.generate(PROMPT, negative_prompt=NEGATIVE, steps=n_steps, width=size, height=size, seed=0,
                                 callback=callback, cache_interval=interval)[0]
    load_s = time.perf_counter() - load_start
    # Cold start: from process start to the end of the first step of the warm-up image.
    warm = StepClock()
    warm_start = time.perf_counter()
    generate(2, warm)
    cold_start_s = warm.times[0] - START
    timed = StepClock()
    start = time.perf_counter()
    generate(steps, timed).save(io.BytesIO(), format="PNG")  # prompt to PNG
    image_s = time.perf_counter() - start
    step_times = timed.steps(start)
    return {
        "name": name,
        "load_s": load_s,
        "cold_start_s": cold_start_s,
        "warm_up_s": start - warm_start,
        "step_s": statistics.median(step_times[1:] or step_times),
        "mean_step_s": statistics.fmean(step_times),
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
    """The markdown table: medians over each contestant's rounds, image time against diffusers'."""
    def med(runs, key):
        return statistics.median(r[key] for r in runs)

    good = {name: [r for r in runs if "error" not in r] for name, runs in results.items()}
    baseline = med(good["diffusers"], "image_s") if good.get("diffusers") else None
    lines = [f"{date.today()}, {machine_flags()}, Python {platform.python_version()}; {args.preset} model, "
             f"{args.size}x{args.size}, {args.steps} steps (CFG, full VAE, prompt to PNG), contestants in turn, "
             f"{args.rounds} round(s) ({args.slow_rounds} for the fp32 ones), medians",
             "",
             "| contestant | s per image | vs diffusers | s per UNet step (median) | s per step (mean) | "
             "cold start s | load s | peak RSS GB | rounds |",
             "|---|---|---|---|---|---|---|---|---|"]
    for name, runs in results.items():
        if not runs:
            continue
        if not good[name]:
            lines.append(f"| {name} | failed: {runs[0]['error'][:80]} | | | | | | | |")
            continue
        runs = good[name]
        speedup = f"{baseline / med(runs, 'image_s'):.2f}x" if baseline else "-"
        lines.append(f"| {name} | {med(runs, 'image_s'):.1f} | {speedup} | {med(runs, 'step_s'):.3f} | "
                     f"{med(runs, 'mean_step_s'):.3f} | {med(runs, 'cold_start_s'):.1f} | {med(runs, 'load_s'):.1f} | "
                     f"{med(runs, 'peak_rss_gb'):.2f} | {len(runs)} |")
    return "\n".join(lines)


def chart(results: dict[str, list[dict]], out: Path) -> None:
    """A horizontal bar chart of seconds per image (medians), sdonnx in blue, drawn with PIL."""
    from PIL import Image, ImageDraw

    rows = [(name, statistics.median(r["image_s"] for r in runs if "error" not in r))
            for name, runs in results.items() if any("error" not in r for r in runs)]
    if not rows:
        return
    width, bar, left = 820, 26, 250
    image = Image.new("RGB", (width, 50 + bar * len(rows)), "white")
    pen = ImageDraw.Draw(image)
    pen.text((10, 10), f"seconds per image, prompt to PNG (lower is faster); {machine_flags()}", fill="black")
    top = max(s for _, s in rows)
    for i, (name, seconds) in enumerate(rows):
        y = 36 + i * bar
        length = int((width - left - 70) * seconds / top)
        pen.text((10, y + 6), name, fill="black")
        pen.rectangle([left, y + 3, left + length, y + bar - 5],
                      fill=(40, 110, 200) if name.startswith("sdonnx") else (150, 150, 150))
        pen.text((left + length + 6, y + 6), f"{seconds:.1f}", fill="black")
    image.save(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", choices=["sd15", "tiny"], default="sd15")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--size", type=int, default=None, help="default 512 (sd15), 64 (tiny)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--slow-rounds", type=int, default=1, help="rounds of the fp32 contestants (SLOW)")
    parser.add_argument("--only", nargs="+", help="contestant names (default: all)")
    parser.add_argument("--threads", type=int,
                        help="threads for every contestant (default: each library's own, the physical cores)")
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
    prepare(args.preset, quantized=True)
    names = args.only or contestants()
    results: dict[str, list[dict]] = {name: [] for name in names}
    for round_ in range(args.rounds):
        for name in names:
            if name in SLOW and round_ >= args.slow_rounds:
                continue
            with tempfile.TemporaryDirectory(prefix="sdonnx-cache-") as cache:
                os.environ["SDONNX_CACHE_DIR"] = cache
                result = in_child(name, args.preset, args.steps, args.size)
            results[name].append(result)
            print(json.dumps(result), flush=True)
            partial = report(results, args)  # (after every contestant: a cut-off run keeps its table)
            args.out.mkdir(parents=True, exist_ok=True)
            (args.out / "peers.md").write_text(partial + "\n")
    text = report(results, args)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "peers.md").write_text(text + "\n")
    chart(results, args.out / "peers.png")
    print(text)


if __name__ == "__main__":
    main()
