"""What a LoRA costs at SD 1.5 size: time to apply, switch and drop one against a full load of
the UNet, and the memory it adds. Not a test: each phase loads a 3.3 GB UNet.

Two LoRA files with random weights are written first, shaped as people's files are:
- `lcm-lora-shaped`: LCM-LoRA for SD 1.5's layout (kohya keys, rank 64, alpha 8, fp16) on the
  layers its training script targets (attention projections, feed-forwards, proj_in/out,
  resnet convs and time projections, shortcuts, down/upsamplers): 67 M parameters.
- `style`: a kohya style LoRA (rank 16, alpha 8) on the attention projections of the UNet
  and the text encoder's attention and MLP.

One process per provider: load (a second start, from the cache of optimized/compiled
graphs), then apply the LCM-LoRA, switch its scale, add the style LoRA, keep only the style
LoRA, drop them, and load the UNet afresh without the cache, each followed by one 512x512 UNet
call (OpenVINO compiles on a part's first call), against a steady UNet call; seconds per phase
(the patch arithmetic apart), resident memory after it, and the phase's peak (VmHWM reset
per phase).

    python tests/benchmarks/adapters.py [--providers cpu openvino] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
CACHE = HERE / "cache"
MODEL = CACHE / "sd15-random-onnx"
LCM_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2",
               "conv1", "conv2", "conv_shortcut", "downsamplers.0.conv", "upsamplers.0.conv", "time_emb_proj")


def gib(kb: int) -> float:
    return kb / 2**20


def status(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    return 0


def write_loras(folder: Path) -> dict[str, Path]:
    """The two LoRA files, from the model's weight maps (no torch)."""
    from safetensors.numpy import save_file

    from sdonnx.runtime.adapters import WeightMap

    folder.mkdir(parents=True, exist_ok=True)
    unet = WeightMap.load(MODEL / "unet" / "model.onnx").modules
    text = WeightMap.load(MODEL / "text_encoder" / "model.onnx").modules
    rng = np.random.default_rng(0)

    def pairs(modules, names, prefix, rank, alpha):
        out = {}
        for name in names:
            shape = modules[name].torch_shape
            key = prefix + name.replace(".", "_")
            out[f"{key}.lora_down.weight"] = (rng.standard_normal((rank, *shape[1:]), dtype=np.float32) * 0.01).astype(np.float16)
            up = (shape[0], rank, *([1, 1] if len(shape) == 4 else []))
            out[f"{key}.lora_up.weight"] = (rng.standard_normal(up, dtype=np.float32) * 0.01).astype(np.float16)
            out[f"{key}.alpha"] = np.array(alpha, dtype=np.float16)
        return out

    lcm = [m for m in unet if m.endswith(LCM_TARGETS) and unet[m].layout != "table"]
    attention = [m for m in unet if m.endswith(("to_q", "to_k", "to_v", "to_out.0"))]
    text_layers = [m for m in text if m.endswith(("_proj", "fc1", "fc2")) and "embeddings" not in m]
    files = {"lcm-lora-shaped": folder / "lcm-lora-shaped.safetensors", "style": folder / "style.safetensors"}
    save_file(pairs(unet, lcm, "lora_unet_", 64, 8.0), files["lcm-lora-shaped"])
    save_file({**pairs(unet, attention, "lora_unet_", 16, 8.0), **pairs(text, text_layers, "lora_te_", 16, 8.0)},
              files["style"])
    return files


def run(provider: str, files: dict[str, Path]) -> list[dict]:
    from sdonnx import Pipeline
    from sdonnx.runtime import adapters, parts

    rows = []

    def phase(name: str, action) -> None:
        Path("/proc/self/clear_refs").write_text("5")
        start = time.perf_counter()
        detail = action() or {}
        rows.append({"phase": name, "seconds": round(time.perf_counter() - start, 2), **detail,
                     "rss_gb": round(gib(status("VmRSS")), 2), "anon_gb": round(gib(status("RssAnon")), 2),
                     "peak_gb": round(gib(status("VmHWM")), 2)})
        print(provider, rows[-1], flush=True)

    pipe = None
    context = np.zeros((2, 77, 768), dtype=np.float32)
    sample = np.random.default_rng(0).standard_normal((2, 4, 64, 64), dtype=np.float32)

    def load():
        nonlocal pipe
        pipe = Pipeline.load(MODEL, provider=provider, precision="fp32")
        pipe.unet  # noqa: B018  (loaded now)

    def call():
        pipe._unet(sample, 500.0, context)

    timed = {"patch_s": 0.0, "tensors": 0}
    overrides = adapters.Patcher.overrides

    def timed_overrides(self, *args):
        start = time.perf_counter()
        result = overrides(self, *args)
        if self.part == parts.UNET.name:
            timed.update(patch_s=round(time.perf_counter() - start, 2), tensors=len(result))
        return result

    adapters.Patcher.overrides = timed_overrides

    def apply(uses):
        def action():
            timed.update(patch_s=0.0, tensors=0)
            pipe.adapters.set(uses)
            pipe.unet  # noqa: B018  (the old UNet dropped, the patched one built, as a generation does)
            return dict(timed)
        return action

    def then_call(action):
        def both():
            detail = action() or {}
            call()
            return detail
        return both

    phase("load (second start) + first UNet call", then_call(load))
    phase("UNet call 512x512 (steady)", call)
    lcm = pipe.adapters.lora_use(files["lcm-lora-shaped"], 1.0)
    style = pipe.adapters.lora_use(files["style"], 0.8)
    phase("apply LCM-LoRA + first call", then_call(apply([lcm])))
    phase("UNet call 512x512 (steady)", call)
    phase("switch LCM-LoRA scale 1.0 -> 0.5 + first call",
          then_call(apply([pipe.adapters.lora_use(files["lcm-lora-shaped"], 0.5)])))
    phase("add style LoRA + first call", then_call(apply([pipe.adapters.lora_use(files["lcm-lora-shaped"], 0.5), style])))
    phase("switch to style LoRA alone + first call", then_call(apply([style])))
    phase("drop LoRAs + first call", then_call(apply([])))

    def full_load():
        nonlocal pipe
        pipe = None
        pipe = Pipeline.load(MODEL, provider=provider, precision="fp32", cache_dir=False)
        pipe.unet  # noqa: B018

    phase("full load without the cache + first call", then_call(full_load))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--providers", nargs="+", default=["cpu", "openvino"])
    parser.add_argument("--out", type=Path, default=HERE / "results")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    loras = CACHE / "loras"
    if args.worker:
        files = {p.stem: p for p in loras.glob("*.safetensors")}
        print("RESULT " + json.dumps(run(args.worker, files)))
        return
    if not MODEL.is_dir():
        sys.exit(f"{MODEL} is missing: build it with tests/benchmarks/peers.py's prepare first")
    from sdonnx.export.weights import write_weight_map

    for part in ("unet", "text_encoder"):
        start = time.perf_counter()
        modules = write_weight_map(MODEL / part / "model.onnx")
        print(f"weight map of {part}: {modules} modules in {time.perf_counter() - start:.1f} s")
    write_loras(loras)
    results = {}
    for provider in args.providers:
        # One warm-up process fills the caches; the measured one is a second start.
        for warm in (True, False):
            done = subprocess.run([sys.executable, __file__, "--worker", provider], capture_output=True, text=True,
                                  env={**os.environ})
            if done.returncode:
                sys.exit(done.stderr[-3000:])
        results[provider] = json.loads(done.stdout.split("RESULT ", 1)[1])
    from peers import machine_flags

    lines = [f"# LoRA apply and switch at SD 1.5 size ({date.today()}, {machine_flags()})", "",
             "| provider | phase | s | of which patch arithmetic | tensors | RSS after GB | anonymous GB | phase peak GB |",
             "|---|---|---|---|---|---|---|---|"]
    for provider, rows in results.items():
        for r in rows:
            lines.append(f"| {provider} | {r['phase']} | {r['seconds']} | {r.get('patch_s', '')} | "
                         f"{r.get('tensors', '')} | {r['rss_gb']} | {r['anon_gb']} | {r['peak_gb']} |")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "adapters.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
