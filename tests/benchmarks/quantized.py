"""Quantized variants against fp32 at SD 1.5 size: seconds per UNet step, disk size, and where
ONNX Runtime's int8 UNet spends its time. Not a test: tens of minutes at SD 1.5 size.

Variants, each quantized once from the cached fp32 export (tests/benchmarks/peers.py builds it)
with `sdonnx quantize` (random weights make pictures meaningless, so --min-psnr 0: nothing falls
back; the figures are about speed and size):
  fp32            the export itself
  fp16            fp16 weights
  int8            static QDQ UNet (ONNX Runtime), int8 weights elsewhere
  int8-openvino   NNCF hybrid int8, OpenVINO IR
Each runs in a fresh process per provider that can run it, alternating over --rounds; the
table gives medians. With --profile, ONNX Runtime's profiler splits one fp32 and one int8 UNet
call by operator type.

    python tests/benchmarks/quantized.py [--preset sd15|tiny] [--size 512] [--rounds 1] [--profile]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
from collections import defaultdict
from datetime import date
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from peers import CACHE, machine, prepare  # noqa: E402

MODES = ("fp16", "int8", "int8-openvino")
RUNS = {  # variant -> the providers that run it
    "fp32": ("cpu", "openvino"),
    "fp16": ("cpu", "openvino"),
    "int8": ("cpu", "openvino"),
    "int8-openvino": ("openvino",),
}

QUANTIZE = """
import json, sys
from pathlib import Path
from sdonnx.export.quantize import QuantizeConfig, quantize
from sdonnx.runtime.bench import peak_rss_gb
source, out, mode, size = sys.argv[1:5]
result = quantize(QuantizeConfig(Path(source), Path(out), mode, min_psnr=0.0, check_prompts=1,
                                 check_steps=2, calibration_prompts=1, calibration_steps=4, size=int(size)))
print(json.dumps({"seconds": result.seconds, "peak_rss_gb": peak_rss_gb(), "psnr": result.psnr}))
"""

PROFILE = """
import json, sys, numpy as np, onnxruntime as ort
from collections import defaultdict
path, size = sys.argv[1], int(sys.argv[2])
options = ort.SessionOptions()
options.enable_profiling = True
session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
h = size // 8
rng = np.random.default_rng(0)
width = next(i for i in session.get_inputs() if i.name == "encoder_hidden_states").shape[-1]
inputs = {"sample": rng.standard_normal((2, 4, h, h), dtype=np.float32),
          "timestep": np.array(500.0, dtype=np.float32),
          "encoder_hidden_states": rng.standard_normal((2, 77, width), dtype=np.float32)}
session.run(None, inputs)
session.run(None, inputs)
trace = json.load(open(session.end_profiling()))
by_op = defaultdict(float)
runs = [e for e in trace if e.get("name") == "model_run"]
last_start = runs[-1]["ts"]
for e in trace:
    if e.get("cat") == "Node" and e["name"].endswith("_kernel_time") and e["ts"] >= last_start:
        by_op[e["args"]["op_name"]] += e["dur"] / 1e6
print(json.dumps({"total": runs[-1]["dur"] / 1e6, "by_op": by_op}))
"""


def quantized(preset: str, source: Path, size: int) -> dict[str, dict]:
    """Quantize each mode once (cached); returns how long it took and its peak memory."""
    made = {}
    for mode in MODES:
        out = CACHE / f"{preset}-random-{mode}"
        log = out.with_suffix(".json")
        if not out.is_dir():
            print(f"quantizing {mode} ...", flush=True)
            done = subprocess.run([sys.executable, "-c", QUANTIZE, str(source), str(out), mode, str(size)],
                                  capture_output=True, text=True)
            if done.returncode != 0:
                raise SystemExit(f"quantize {mode} failed:\n{done.stderr[-3000:]}")
            log.write_text(done.stdout.strip().splitlines()[-1])
        made[mode] = json.loads(log.read_text()) if log.is_file() else {}
    return made


def bench(folder: Path, provider: str, size: int, repeats: int) -> dict:
    args = json.dumps({"model": str(folder), "provider": provider, "precision": "fp32",
                       "width": size, "height": size, "repeats": repeats})
    done = subprocess.run([sys.executable, "-m", "sdonnx.runtime.bench", args], capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"bench {folder.name} on {provider} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def folder_mb(folder: Path, part: str) -> float:
    return sum(f.stat().st_size for f in (folder / part).rglob("*") if f.is_file()) / 2**20


def profile(model: Path, size: int) -> dict:
    done = subprocess.run([sys.executable, "-c", PROFILE, str(model), str(size)], capture_output=True,
                          text=True, cwd="/tmp")
    if done.returncode != 0:
        raise SystemExit(f"profile failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", choices=("sd15", "tiny"), default="sd15")
    parser.add_argument("--size", type=int, default=512, help="image side for the timings")
    parser.add_argument("--calibration-size", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--variants", nargs="+", choices=tuple(RUNS), default=tuple(RUNS),
                        help="only these variants (fp32 on ONNX Runtime CPU always runs: it is the baseline)")
    parser.add_argument("--out", type=Path, default=HERE / "results")
    args = parser.parse_args()
    source = prepare(args.preset)["onnx"]
    made = quantized(args.preset, source, args.calibration_size)
    folders = {"fp32": source, **{mode: CACHE / f"{args.preset}-random-{mode}" for mode in MODES}}
    times: dict[tuple[str, str], list[dict]] = defaultdict(list)
    for round_ in range(args.rounds):
        for variant, runners in RUNS.items():
            if variant not in args.variants and variant != "fp32":
                continue
            for provider in runners:
                result = bench(folders[variant], provider, args.size, args.repeats)
                times[variant, provider].append(result)
                print(f"round {round_ + 1}: {variant} on {provider}: {result['unet_step_s']:.2f} s/step", flush=True)
    base = statistics.median(r["unet_step_s"] for r in times["fp32", "cpu"])
    rows = [f"# Quantized variants, {args.preset} at {args.size}x{args.size} ({date.today()}, {machine()})", "",
            f"UNet step = one call on a CFG pair; medians of {args.rounds} round(s), each variant and provider "
            "in a fresh process. Speed-up is against fp32 on ONNX Runtime CPU in the same run.", "",
            "| variant | provider | UNet step s | speed-up | first step s | load s | peak RSS GB | UNet MB | "
            "whole folder MB | quantize s | quantize peak RSS GB |",
            "|---|---|---|---|---|---|---|---|---|---|---|"]
    for (variant, provider), results in times.items():
        step = statistics.median(r["unet_step_s"] for r in results)
        first = statistics.median(r["first_step_s"] for r in results)
        load = statistics.median(r["load_s"] for r in results)
        rss = max(r["peak_rss_gb"] for r in results)
        folder = folders[variant]
        whole = sum(folder_mb(folder, p) for p in ("text_encoder", "unet", "vae_decoder", "vae_encoder"))
        q = made.get(variant, {})
        rows.append(f"| {variant} | {provider} | {step:.3f} | {base / step:.2f}x | {first:.2f} | {load:.1f} | "
                    f"{rss:.2f} | {folder_mb(folder, 'unet'):.0f} | {whole:.0f} | "
                    f"{q.get('seconds', 0):.0f} | {q.get('peak_rss_gb', 0):.1f} |")
    if args.profile:
        rows += ["", f"ONNX Runtime CPU profile of one UNet call at {args.size}x{args.size} (seconds by operator)", "",
                 "| operator | fp32 s | int8 s |", "|---|---|---|"]
        fp32 = profile(source / "unet" / "model.onnx", args.size)
        int8 = profile(folders["int8"] / "unet" / "model.onnx", args.size)
        ops = sorted(set(fp32["by_op"]) | set(int8["by_op"]),
                     key=lambda op: -(int8["by_op"].get(op, 0) + fp32["by_op"].get(op, 0)))
        for op in ops[:14]:
            rows.append(f"| {op} | {fp32['by_op'].get(op, 0):.2f} | {int8['by_op'].get(op, 0):.2f} |")
        rows.append(f"| total (model run) | {fp32['total']:.2f} | {int8['total']:.2f} |")
    text = "\n".join(rows) + "\n"
    print(text)
    args.out.mkdir(parents=True, exist_ok=True)
    name = "quantized.md" if args.preset == "sd15" else f"quantized-{args.preset}.md"
    (args.out / name).write_text(text)


if __name__ == "__main__":
    main()
