"""First start against second start: what sdonnx's on-disk caches save (runtime/cache.py).

For each sdonnx provider, in rounds: an empty cache folder, then two fresh processes one after
the other, each loading the model and making a 2-step warm-up image and a timed image (as in
peers.py). The first start optimizes (onnxruntime) or compiles (OpenVINO) and saves the result;
the second reads it. Reports load time, time from process start to the end of the first
sampler step, and seconds per step (the cached graph must not be slower).

    python tests/benchmarks/second_start.py [--preset sd15|tiny] [--steps 2] [--rounds 1]

Writes second-start.md to --out (default tests/benchmarks/results/).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
from datetime import date
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from peers import HERE, contestants, in_child, machine, prepare  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", choices=["sd15", "tiny"], default="sd15")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--size", type=int, default=None, help="default 512 (sd15), 64 (tiny)")
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--threads", type=int, help="threads per run (default: all cores)")
    parser.add_argument("--out", type=Path, default=HERE / "results")
    args = parser.parse_args()
    args.size = args.size or (512 if args.preset == "sd15" else 64)
    if args.threads:
        os.environ["SDONNX_BENCH_THREADS"] = str(args.threads)
    prepare(args.preset)
    names = [name for name in contestants() if name.startswith("sdonnx")]
    runs: dict[tuple[str, str], list[dict]] = {}
    for _ in range(args.rounds):
        for name in names:
            with tempfile.TemporaryDirectory(prefix="sdonnx-cache-") as cache:
                os.environ["SDONNX_CACHE_DIR"] = cache
                for start in ("first", "second"):
                    result = in_child(name, args.preset, args.steps, args.size)
                    print(start, result, flush=True)
                    if "error" in result:
                        raise SystemExit(f"{name} failed: {result['error']}")
                    runs.setdefault((name, start), []).append(result)

    def med(name, start, key):
        return statistics.median(r[key] for r in runs[name, start])

    threads = f", {args.threads} thread(s)" if args.threads else ""
    lines = [f"{date.today()}, {machine()}{threads}; {args.preset} model, {args.size}x{args.size}, "
             f"{args.rounds} round(s), medians; each start a fresh process, the cache empty before the first",
             "",
             "| contestant | load s first / second | to first step s first / second | second start faster "
             "| s per step first / second |",
             "|---|---|---|---|---|"]
    for name in names:
        load = [med(name, s, "load_s") for s in ("first", "second")]
        to_step = [med(name, s, "cold_start_s") for s in ("first", "second")]
        step = [med(name, s, "step_s") for s in ("first", "second")]
        lines.append(f"| {name} | {load[0]:.2f} / {load[1]:.2f} | {to_step[0]:.2f} / {to_step[1]:.2f} | "
                     f"{to_step[0] / to_step[1]:.2f}x (load {load[0] / load[1]:.1f}x) | "
                     f"{step[0]:.3f} / {step[1]:.3f} |")
    text = "\n".join(lines)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "second-start.md").write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
