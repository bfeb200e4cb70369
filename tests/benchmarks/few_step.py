"""Few-step generation at full size: an SD-Turbo-architecture model (SD 2.1's UNet and text
encoder, random weights, trailing timesteps, guidance 0) in 1 step, and an LCM-distilled
SD 1.5-architecture model (time_cond_proj_dim 256, as LCM_Dreamshaper_v7) in 4 steps at its
guidance 8.5, both at 512x512, decoded by TAESD and by the full VAE, on every sdonnx provider
and precision, beside two peers on OpenVINO IR written from the same ONNX files
(peers.write_openvino_ir): openvino.genai's Text2ImagePipeline and optimum-intel's
OVStableDiffusionPipeline / OVLatentConsistencyModelPipeline, each compiled for 512x512 (static
shapes, except optimum-intel's Turbo batch: see peer()) and given TAESD as its vae_decoder as FastSD CPU does. Not a test: the models are
exported once (minutes, 8-11 GB each) into tests/benchmarks/cache/.

Every contestant starts from sdonnx's initial noise for the seed (openvino.genai through a
Generator subclass, which also hands it sdonnx's LCM step noise; optimum-intel through `latents`,
its LCM steps draw their own noise), so the table gives each image's PSNR against sdonnx
onnxruntime fp32 with the same decoder: the peers draw the same picture, not just as fast.

Each contestant is a fresh process that loads the folder (a second start: a warm-up process
filled the caches), writes one PNG (prompt to file: the "first image"), then `--images` more;
reported: load seconds, first image, median seconds per image (prompt to PNG written), peak RSS.

    python tests/benchmarks/few_step.py [--images 3] [--only turbo-cpu-tiny lcm-cpu-tiny ...]
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
# name: (the export it quantizes, folder, sdonnx quantize --mode): `sdonnx quantize` of an export above
QUANTIZED = {"turbo-int8": ("turbo", CACHE / "sd21-turbo-int8-openvino", "int8-openvino")}
PROMPT = "a photo of a cat sitting on a windowsill"
# SD-Turbo's own scheduler (the peers run diffusers'/genai's schedulers; sdonnx reads the betas
# and the trailing spacing from the export's scheduler_config.json).
PEER_SCHEDULERS = {"turbo": {"_class_name": "EulerDiscreteScheduler", "beta_start": 0.00085, "beta_end": 0.012,
                             "beta_schedule": "scaled_linear", "num_train_timesteps": 1000,
                             "prediction_type": "epsilon", "steps_offset": 1, "timestep_spacing": "trailing",
                             "interpolation_type": "linear", "use_karras_sigmas": False},
                   "lcm": None}
CONTESTANTS = {  # name: (model, provider, precision, decoder); provider genai / optimum-ov are the peers
    "turbo-cpu-tiny": ("turbo", "cpu", "fp32", "tiny"),
    "turbo-cpu-full": ("turbo", "cpu", "fp32", "full"),
    "turbo-openvino-fp32-tiny": ("turbo", "openvino", "fp32", "tiny"),
    "turbo-openvino-bf16-tiny": ("turbo", "openvino", "bf16", "tiny"),
    "turbo-openvino-bf16-full": ("turbo", "openvino", "bf16", "full"),
    "turbo-int8-openvino-fp32-tiny": ("turbo-int8", "openvino", "fp32", "tiny"),
    "lcm-cpu-tiny": ("lcm", "cpu", "fp32", "tiny"),
    "lcm-openvino-bf16-tiny": ("lcm", "openvino", "bf16", "tiny"),
    "lcm-openvino-bf16-full": ("lcm", "openvino", "bf16", "full"),
    "turbo-genai-fp32-tiny": ("turbo", "genai", "fp32", "tiny"),
    "turbo-genai-bf16-tiny": ("turbo", "genai", "bf16", "tiny"),
    "turbo-genai-bf16-full": ("turbo", "genai", "bf16", "full"),
    "turbo-optimum-ov-bf16-tiny": ("turbo", "optimum-ov", "bf16", "tiny"),
    "lcm-genai-bf16-tiny": ("lcm", "genai", "bf16", "tiny"),
    "lcm-genai-bf16-full": ("lcm", "genai", "bf16", "full"),
    "lcm-optimum-ov-bf16-tiny": ("lcm", "optimum-ov", "bf16", "tiny"),
}
SIZE = 512
REFERENCE = {"tiny": "cpu-tiny", "full": "cpu-full"}  # PSNR against <model>-<this>


def folder_of(model: str) -> Path:
    return QUANTIZED[model][1] if model in QUANTIZED else MODELS[model][1]


def prepare(model: str) -> None:
    """The model's random source, a random TAESD, and their export (and quantized copy)."""
    if model in QUANTIZED:
        base, folder, mode = QUANTIZED[model]
        prepare(base)
        if not folder.is_dir():
            from sdonnx.export.quantize import QuantizeConfig, quantize

            start = time.perf_counter()
            quantize(QuantizeConfig(MODELS[base][1], folder, mode=mode), log=print)
            print(f"quantized {model} ({mode}) in {time.perf_counter() - start:.0f} s")
        return
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


def prepare_ir(model: str) -> Path:
    """The peers' OpenVINO IR of the model's export (written once)."""
    ir = ir_folder(model)
    if not ir.is_dir():
        from peers import write_openvino_ir

        write_openvino_ir(MODELS[model][1], ir, scheduler=PEER_SCHEDULERS[model])
    return ir


def ir_folder(model: str) -> Path:
    return MODELS[model][1].with_name(MODELS[model][1].name.replace("-onnx", "-openvino"))


def peer(name: str):
    """(load seconds, generate(seed) -> PIL image) for an openvino.genai or optimum-intel contestant."""
    import numpy as np

    from sdonnx.runtime.pipeline import GenerationConfig, Pipeline

    model, provider, precision, decoder = CONTESTANTS[name]
    folder = MODELS[model][1]
    recorded = json.loads((folder / "sdonnx.json").read_text()).get("defaults", {})
    steps, guidance = recorded.get("steps", 4), recorded.get("guidance", 8.5)
    hint = {"fp32": "f32", "bf16": "bf16"}[precision]
    root = prepare_ir(model)
    if decoder == "tiny":
        from peers import taesd_root

        root = taesd_root(root)
    # sdonnx's noise for the seed: the same starting latents for every contestant.
    shape = (1, 4, SIZE // 8, SIZE // 8)

    def initial(seed: int) -> np.ndarray:
        return Pipeline.initial_noise(GenerationConfig(prompt="", seed=seed, width=SIZE, height=SIZE))

    start = time.perf_counter()
    if provider == "genai":
        import openvino as ov
        import openvino_genai

        class SdonnxNoise(openvino_genai.Generator):
            """The initial latents, then sdonnx's per-step stream (the LCM sampler's noise)."""

            def __init__(self, seed: int):
                super().__init__()
                self.first = initial(seed)
                self.stream = np.random.default_rng([seed, 1])

            def next(self) -> float:
                return float(self.stream.standard_normal())

            def randn_tensor(self, shape):
                if self.first is not None:
                    value, self.first = self.first, None
                else:
                    value = self.stream.standard_normal(tuple(shape), dtype=np.float32)
                return ov.Tensor(np.ascontiguousarray(value.reshape(tuple(shape))))

        pipe = openvino_genai.Text2ImagePipeline(str(root))
        pipe.reshape(1, SIZE, SIZE, guidance)
        pipe.compile("CPU", config={"INFERENCE_PRECISION_HINT": hint})

        def generate(seed: int):
            from PIL import Image

            out = pipe.generate(PROMPT, width=SIZE, height=SIZE, num_inference_steps=steps,
                                guidance_scale=guidance, generator=SdonnxNoise(seed))
            return Image.fromarray(out.data[0])
    else:
        import torch
        from optimum.intel import OVLatentConsistencyModelPipeline, OVStableDiffusionPipeline

        kind = OVLatentConsistencyModelPipeline if model == "lcm" else OVStableDiffusionPipeline
        pipe = kind.from_pretrained(root, compile=False, ov_config={"INFERENCE_PRECISION_HINT": hint})
        # optimum-intel's static UNet shape assumes a CFG pair unless the UNet is LCM-distilled, so
        # for guidance 0 (Turbo) only the image size is static and the batch stays dynamic.
        batch = 1 if model == "lcm" else -1
        pipe.reshape(batch_size=batch, height=SIZE, width=SIZE, num_images_per_prompt=batch)
        pipe.compile()
        pipe.set_progress_bar_config(disable=True)

        def generate(seed: int):
            latents = torch.from_numpy(initial(seed).reshape(shape))
            return pipe(PROMPT, num_inference_steps=steps, guidance_scale=guidance, width=SIZE, height=SIZE,
                        latents=latents).images[0]
    return time.perf_counter() - start, generate


def worker(name: str, images: int, keep: Path) -> dict:
    model, provider, precision, decoder = CONTESTANTS[name]
    if provider in ("genai", "optimum-ov"):
        load, generate = peer(name)
    else:
        from sdonnx import Pipeline

        start = time.perf_counter()
        pipe = Pipeline.load(folder_of(model), provider=provider, precision=precision)
        pipe.unet  # noqa: B018
        load = time.perf_counter() - start

        def generate(seed: int):
            return pipe.generate(PROMPT, seed=seed, width=SIZE, height=SIZE, decoder=decoder)[0]
    times = []
    with tempfile.TemporaryDirectory() as out:
        for i in range(images + 1):
            start = time.perf_counter()
            image = generate(i)
            image.save(Path(out) / f"{i}.png")
            times.append(time.perf_counter() - start)
            if i == 1:
                image.save(keep / f"{name}.png")
    from sdonnx.runtime.bench import peak_rss_gb

    return {"name": name, "load_s": round(load, 2), "first_s": round(times[0], 2),
            "image_s": round(statistics.median(times[1:]), 2), "peak_gb": round(peak_rss_gb(), 2)}


def psnr(a: Path, b: Path) -> float:
    """PSNR in dB of two PNGs, by the quantization check's own measure (export/quality.py)."""
    import numpy as np
    from PIL import Image

    from sdonnx.export.quality import psnr as measure

    return measure(*(np.asarray(Image.open(p).convert("RGB")) for p in (a, b)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=3)
    parser.add_argument("--only", nargs="+", choices=sorted(CONTESTANTS))
    parser.add_argument("--out", type=Path, default=HERE / "results")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--keep", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print("RESULT " + json.dumps(worker(args.worker, args.images, args.keep)))
        return
    chosen = args.only or list(CONTESTANTS)
    for model in sorted({CONTESTANTS[name][0] for name in chosen}):
        prepare(model)
        if any(CONTESTANTS[name][1] in ("genai", "optimum-ov") for name in chosen if CONTESTANTS[name][0] == model):
            prepare_ir(model)
    rows = []
    keep = Path(tempfile.mkdtemp(prefix="few-step-images-"))
    for name in chosen:
        for warm in (True, False):
            done = subprocess.run([sys.executable, __file__, "--worker", name, "--images", str(args.images),
                                   "--keep", str(keep)], capture_output=True, text=True)
            if done.returncode:
                print(f"{name}: failed\n{done.stderr[-2000:]}")
                break
        else:
            rows.append(json.loads(done.stdout.split("RESULT ", 1)[1]))
            print(rows[-1], flush=True)
    for row in rows:  # the image of seed 1 against sdonnx onnxruntime fp32's, same model and decoder
        model, _, _, decoder = CONTESTANTS[row["name"]]
        reference = keep / f"{QUANTIZED.get(model, [model])[0]}-{REFERENCE[decoder]}.png"
        row["psnr"] = f"{psnr(keep / (row['name'] + '.png'), reference):.1f}" if reference.is_file() else "-"
    shutil.rmtree(keep, ignore_errors=True)
    from peers import machine_flags

    lines = [f"# Few-step images, 512x512: SD-Turbo architecture 1 step, LCM SD 1.5 architecture 4 steps "
             f"({date.today()}, {machine_flags()})", "",
             "| contestant | load s | first image s | s per image (prompt to PNG) | peak RSS GB | PSNR dB vs cpu fp32 |",
             "|---|---|---|---|---|---|"]
    lines += [f"| {r['name']} | {r['load_s']} | {r['first_s']} | {r['image_s']} | {r['peak_gb']} | {r['psnr']} |"
              for r in rows]
    args.out.mkdir(parents=True, exist_ok=True)
    target = args.out / "few-step.md"
    kept = [line for line in target.read_text().splitlines()[4:] if line.startswith("| ")
            and line.split(" | ")[0][2:] not in {r["name"] for r in rows}] if target.is_file() else []
    order = list(CONTESTANTS)
    body = sorted(kept + lines[4:], key=lambda line: order.index(line.split(" | ")[0][2:])
                  if line.split(" | ")[0][2:] in order else len(order))
    target.write_text("\n".join(lines[:4] + body) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
