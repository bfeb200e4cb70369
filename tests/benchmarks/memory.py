"""Peak memory of a generation: sdonnx's default, --vae-tiles 256, --low-memory, int8 and int8 +
--low-memory on cpu and openvino, beside diffusers (torch fp32), optimum's ONNX Runtime pipeline
and openvino.genai's Text2ImagePipeline (fp32, on OpenVINO IR of the same export) on the same
model, in one run. Not a test: at SD 1.5 size it takes tens of minutes.

Each contestant runs in a fresh process: load, then `--images` images of `--steps` steps (the
peak is reached within the first UNet call and the VAE decode; more steps only take longer).
Reported per contestant: peak RSS (VmHWM: anonymous memory and mapped file pages), the peak of
anonymous memory alone (sampled every 10 ms: what the kernel cannot reclaim from a process
without swap), the resident set after the last image, load seconds, and seconds per image with
its ratio to sdonnx's default on the same provider in the same run. sdonnx contestants run on a
cache folder a warm-up process filled (a second start, as people run it; second_start.py
measures the first one).

    python tests/benchmarks/memory.py [--size 512] [--steps 2] [--images 2] [--only NAME ...]
    python tests/benchmarks/memory.py --vae 512 1024 2048 [--vae-tiles 256]   # VAE decodes alone

The model: SD 1.5's architecture with random weights, exported by sdonnx (tests/benchmarks/
cache/sd15-random-onnx, built by peers.py's prepare) and quantized with `sdonnx quantize
--mode int8 --size 512` into cache/sd15-int8. Writes memory-SIZE.md and memory-SIZE.png
to --out.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from datetime import date
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
CACHE = HERE / "cache"
FOLDERS = {"fp32": CACHE / "sd15-random-onnx", "int8": CACHE / "sd15-int8"}
PROMPT, NEGATIVE = "a photo of an astronaut riding a horse on mars", "blurry, low quality"


class Memory:
    """Peak of RssAnon, sampled every 10 ms in a thread; VmHWM and VmRSS read from /proc."""

    def __init__(self):
        self.peak_anon = 0.0
        threading.Thread(target=self._watch, daemon=True).start()

    @staticmethod
    def read(key: str) -> float:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 2**20  # kB -> GB (2^30 bytes)
        return 0.0

    def _watch(self) -> None:
        while True:
            self.peak_anon = max(self.peak_anon, self.read("RssAnon"))
            time.sleep(0.01)


def contestants() -> list[str]:
    from sdonnx.runtime import providers

    names = ["diffusers", "optimum-ort", "openvino-genai"]
    for provider in ("cpu", "openvino"):
        if providers.PROVIDERS[provider].available():
            names += [f"sdonnx:{provider}:{mode}:{variant}" for variant in ("fp32", "int8")
                      for mode in ("default", "vae-tiles-256", "low-memory")]
    return names


def run_contestant(name: str, size: int, steps: int, images: int) -> dict:
    memory = Memory()
    threads = os.cpu_count() or 1
    start = time.perf_counter()
    if name == "diffusers":
        import torch
        from diffusers import StableDiffusionPipeline

        torch.set_num_threads(threads)
        pipe = StableDiffusionPipeline.from_pretrained(CACHE / "sd15-random-diffusers", torch_dtype=torch.float32,
                                                       safety_checker=None)
        pipe.set_progress_bar_config(disable=True)

        def generate():
            with torch.inference_mode():
                pipe(PROMPT, negative_prompt=NEGATIVE, num_inference_steps=steps, width=size, height=size,
                     generator=torch.Generator().manual_seed(0))
    elif name == "optimum-ort":
        import torch
        from optimum.onnxruntime import ORTStableDiffusionPipeline

        pipe = ORTStableDiffusionPipeline.from_pretrained(FOLDERS["fp32"], provider="CPUExecutionProvider")
        pipe.set_progress_bar_config(disable=True)

        def generate():
            pipe(PROMPT, negative_prompt=NEGATIVE, num_inference_steps=steps, width=size, height=size,
                 generator=torch.Generator().manual_seed(0))
    elif name == "openvino-genai":
        import openvino_genai

        # Its own pipeline on IR of the same export (peers.write_openvino_ir), static shapes, fp32.
        pipe = openvino_genai.Text2ImagePipeline(str(openvino_ir()))
        pipe.reshape(1, size, size, 7.5)
        pipe.compile("CPU", config={"INFERENCE_PRECISION_HINT": "f32", "INFERENCE_NUM_THREADS": threads})

        def generate():
            pipe.generate(PROMPT, negative_prompt=NEGATIVE, width=size, height=size, num_inference_steps=steps,
                          guidance_scale=7.5, generator=openvino_genai.TorchGenerator(0))
    else:
        from sdonnx import Pipeline

        _, provider, mode, variant = name.split(":")
        pipe = Pipeline.load(FOLDERS[variant], provider=provider, precision="fp32", threads=threads,
                             low_memory=mode == "low-memory")

        tiles = 256 if mode == "vae-tiles-256" else "auto"

        def generate():
            pipe.generate(PROMPT, negative_prompt=NEGATIVE, steps=steps, width=size, height=size, seed=0,
                          vae_tiles=tiles)
    load_s = time.perf_counter() - start
    seconds = []
    for _ in range(images):
        begin = time.perf_counter()
        generate()
        seconds.append(time.perf_counter() - begin)
    return {"name": name, "load_s": load_s, "first_image_s": seconds[0],
            "image_s": statistics.median(seconds[1:] or seconds), "peak_rss_gb": memory.read("VmHWM"),
            "peak_anon_gb": memory.peak_anon, "after_gb": memory.read("VmRSS")}


def openvino_ir() -> Path:
    """OpenVINO IR of the fp32 export in the layout openvino.genai reads (made once)."""
    from peers import write_openvino_ir

    ir = CACHE / "sd15-random-openvino"
    if not (ir / "model_index.json").is_file():
        write_openvino_ir(FOLDERS["fp32"], ir)
    return ir


def warm_up(provider: str, variant: str, size: int) -> None:
    """Fill the cache folder (optimized graphs, compiled models) as a first start would, for
    the whole UNet and for its stages (--low-memory)."""
    from sdonnx import Pipeline

    for low_memory in (False, True):
        Pipeline.load(FOLDERS[variant], provider=provider, precision="fp32", low_memory=low_memory).generate(
            PROMPT, steps=1, width=size, height=size, seed=0)


def vae_decode(size: int, way: str = "staged", tiles: int | str = "auto", provider: str = "cpu",
               save: str | None = None) -> dict:
    """A decode of a random SD 1.5 VAE (the fp32 export's decoder) at size x size: `way`
    "staged" (the stages sdonnx's export writes: equal to one piece), "blended" (diffusers-style
    blended tiles, what folders without stages get) or "off" (one piece); `save`: a .npy file
    for the decoded pixels (the PSNR between ways is taken by the parent)."""
    import numpy as np

    from sdonnx import Pipeline
    from sdonnx.runtime import parts, vae

    memory = Memory()
    pipe = Pipeline.load(FOLDERS["fp32"], provider=provider, precision="fp32", low_memory=True)
    if way == "blended":
        vae.StagedVae.read_plan = staticmethod(lambda folder: None)  # as a folder without stages
    latents = np.random.default_rng(0).standard_normal((1, 4, size // 8, size // 8), dtype=np.float32)
    start = time.perf_counter()
    image = pipe.decode(latents * pipe.vae_scaling_factor, tiles="off" if way == "off" else tiles)[0]
    seconds = time.perf_counter() - start
    if save:
        np.save(save, np.asarray(image))
    tile = pipe.vae_tile("off" if way == "off" else tiles, size // 8, size // 8)
    return {"name": f"VAE decode {image.width}x{image.height} {provider} {way}"
                    + (f", {tile * parts.VAE_SCALE}-px tiles" if tile else ""),
            "seconds": seconds, "peak_rss_gb": memory.read("VmHWM"), "peak_anon_gb": memory.peak_anon}


def vae_report(sizes: list[int], tiles: str, providers: list[str], out: Path, machine: str) -> str:
    """Each way of decoding at each size in its own process; PSNR of each against one piece
    (where one piece was measured: up to 1024)."""
    import numpy as np

    from sdonnx.export.quality import psnr

    lines = [f"{date.today()}, {machine}; SD 1.5 VAE decoder (random weights, fp32), --low-memory, "
             f"--vae-tiles {tiles}", "",
             "| decode | seconds | peak RSS GB | peak anonymous GB | PSNR vs one piece dB |", "|---|---|---|---|---|"]
    for size in sizes:
        for provider in providers:
            ways = ["off", "staged", "blended"] if size <= 1024 else ["staged"]
            results = {}
            for way in ways:
                save = f"/tmp/sdonnx-vae-{size}-{provider}-{way}.npy"
                results[way] = in_child({"kind": "vae", "size": size, "way": way, "tiles": tiles,
                                         "provider": provider, "save": save}), save
                print(json.dumps(results[way][0]), flush=True)
            for way, (r, save) in results.items():
                if "error" in r:
                    lines.append(f"| {r['name']} | failed: {r['error'][:80]} | | | |")
                    continue
                whole = results.get("off")
                db = (f"{psnr(np.load(save), np.load(whole[1])):.1f}" if whole and way != "off"
                      and "error" not in whole[0] else "-")
                lines.append(f"| {r['name']} | {r['seconds']:.1f} | {r['peak_rss_gb']:.2f} | "
                             f"{r['peak_anon_gb']:.2f} | {db} |")
            for _, save in results.values():
                Path(save).unlink(missing_ok=True)
    text = "\n".join(lines)
    (out / f"vae-tiles-{tiles}.md").write_text(text + "\n")
    return text


def in_child(job: dict) -> dict:
    done = subprocess.run([sys.executable, __file__, "--child", json.dumps(job)], capture_output=True, text=True)
    if done.returncode != 0:
        lines = done.stderr.strip().splitlines()
        return {"name": job.get("name", "?"), "error": lines[-1] if lines else f"exit {done.returncode}"}
    return json.loads(done.stdout.strip().splitlines()[-1])


def report(results: list[dict], args, machine: str) -> str:
    base = {r["name"].split(":")[1]: r["image_s"] for r in results
            if r["name"].startswith("sdonnx:") and ":default:fp32" in r["name"] and "error" not in r}
    lines = [f"{date.today()}, {machine}; SD 1.5 architecture (random weights), {args.size}x{args.size}, "
             f"{args.steps} steps per image, {args.images} image(s) per process after loading",
             "",
             "| contestant | peak RSS GB | peak anonymous GB | RSS after GB | load s | first image s | "
             "s per image | vs sdonnx default fp32 (same provider) |",
             "|---|---|---|---|---|---|---|---|"]
    for r in results:
        if "error" in r:
            lines.append(f"| {r['name']} | failed: {r['error'][:90]} | | | | | | |")
            continue
        provider = r["name"].split(":")[1] if r["name"].startswith("sdonnx:") else "cpu"
        ratio = f"{r['image_s'] / base[provider]:.2f}x" if provider in base else "-"
        lines.append(f"| {r['name']} | {r['peak_rss_gb']:.2f} | {r['peak_anon_gb']:.2f} | {r['after_gb']:.2f} | "
                     f"{r['load_s']:.1f} | {r['first_image_s']:.1f} | {r['image_s']:.1f} | {ratio} |")
    return "\n".join(lines)


def chart(results: list[dict], out: Path) -> None:
    """Bars of peak RSS (light) with the anonymous part (dark) per contestant, drawn with PIL."""
    from PIL import Image, ImageDraw

    rows = [r for r in results if "error" not in r]
    if not rows:
        return
    width, bar, left = 820, 26, 250
    image = Image.new("RGB", (width, 50 + bar * len(rows)), "white")
    pen = ImageDraw.Draw(image)
    pen.text((10, 10), "peak RSS, GB (dark: anonymous memory; light: mapped model files)", fill="black")
    top = max(r["peak_rss_gb"] for r in rows)
    for i, r in enumerate(rows):
        y = 36 + i * bar
        scale = (width - left - 60) / top
        pen.text((10, y + 6), r["name"], fill="black")
        pen.rectangle([left, y + 3, left + int(r["peak_rss_gb"] * scale), y + bar - 5], fill=(170, 200, 235))
        pen.rectangle([left, y + 3, left + int(min(r["peak_anon_gb"], r["peak_rss_gb"]) * scale), y + bar - 5],
                      fill=(40, 110, 200) if r["name"].startswith("sdonnx") else (120, 120, 120))
        pen.text((left + int(r["peak_rss_gb"] * scale) + 6, y + 6), f"{r['peak_rss_gb']:.2f}", fill="black")
    image.save(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--images", type=int, default=2)
    parser.add_argument("--only", nargs="+", help="contestant names (default: all)")
    parser.add_argument("--vae", type=int, nargs="+", help="measure VAE decodes of these sides alone: one piece, "
                        "staged tiles, blended tiles (vae-tiles-TILES.md)")
    parser.add_argument("--vae-tiles", default="auto", help="the tile side for --vae (default: auto)")
    parser.add_argument("--providers", nargs="+", default=["cpu"], help="providers for --vae")
    parser.add_argument("--out", type=Path, default=HERE / "results")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        job = json.loads(args.child)
        kind = job.pop("kind")
        result = {"run": run_contestant, "warm": warm_up, "vae": vae_decode}[kind](**job)
        print(json.dumps(result or {}))
        return
    from peers import machine

    os.environ.setdefault("SDONNX_CACHE_DIR", str(CACHE / "sdonnx-cache"))
    if args.vae:
        args.out.mkdir(parents=True, exist_ok=True)
        tiles = int(args.vae_tiles) if args.vae_tiles.isdecimal() else args.vae_tiles
        print(vae_report(args.vae, tiles, args.providers, args.out, machine()))
        return
    names = args.only or contestants()
    for provider, variant in sorted({tuple(n.split(":")[1:4:2]) for n in names if n.startswith("sdonnx:")}):
        print(json.dumps(in_child({"kind": "warm", "provider": provider, "variant": variant, "size": args.size})),
              flush=True)
    results = []
    for name in names:
        results.append(in_child({"kind": "run", "name": name, "size": args.size, "steps": args.steps,
                                 "images": args.images}))
        print(json.dumps(results[-1]), flush=True)
    text = report(results, args, machine())
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"memory-{args.size}.md").write_text(text + "\n")
    chart(results, args.out / f"memory-{args.size}.png")
    print(text)


if __name__ == "__main__":
    main()
