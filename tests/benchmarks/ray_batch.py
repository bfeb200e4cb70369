"""`sdonnx batch` on Ray: throughput of 1 and 2 workers, and what Ray adds per image.

The same jobs file in turn through four runs of the real command, each into an empty folder:
    local-1t    sdonnx batch, one process, --threads 1 (the peer for Ray's overhead)
    local-2t    sdonnx batch, one process, --threads 2 (all of this machine's cores in one model)
    ray-1w      --ray local --workers 1 --threads 1
    ray-2w      --ray local --workers 2 --threads 1
Ray runs inside a network namespace with only loopback (tests/ray_cluster.py), as the tests do.
Per run: the command's wall time, and its steady rate: images per second from the moment every
worker has placed its first image to the last image placed (file times), which leaves out
start-up (Ray, model load, compilation). Ray's overhead per image is ray-1w's steady seconds per image minus local-1t's.

    python tests/benchmarks/ray_batch.py [--preset tiny|sd15] [--images 8] [--size 256] [--steps 10] [--rounds 2]

`tiny` is the embedded model at its 128x128 (the overhead is most of its time); `sd15` the
random-weight SD 1.5 architecture of peers.py (prepared, and cached, on first use).
Writes ray-batch-PRESET.md to --out (default tests/benchmarks/results/).
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
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))
from peers import machine_flags  # noqa: E402
from ray_cluster import LoopbackNamespace  # noqa: E402

SDONNX = [sys.executable, "-m", "sdonnx.cli.app"]
RUNS = {
    "local-1t": ["--threads", "1"],
    "local-2t": ["--threads", "2"],
    "ray-1w": ["--ray", "local", "--workers", "1", "--threads", "1"],
    "ray-2w": ["--ray", "local", "--workers", "2", "--threads", "1"],
}


def one_run(name: str, jobs: Path, model: Path | None, namespace: LoopbackNamespace) -> dict:
    with tempfile.TemporaryDirectory(prefix="sdonnx-ray-bench-") as folder:
        out = Path(folder) / "out"
        command = [*SDONNX, "batch", str(jobs), "--out", str(out), *RUNS[name],
                   *(["--model", str(model)] if model else [])]
        if name.startswith("ray"):
            command = [*namespace.prefix, *command]
        start = time.perf_counter()
        done = subprocess.run(command, capture_output=True, text=True)
        wall = time.perf_counter() - start
        if done.returncode:
            raise SystemExit(f"{name} failed:\n{done.stderr}")
        records = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
        placed = sorted((out / r["file"]).stat().st_mtime_ns for r in records)
        # From the moment every worker has placed its first image to the last image: with w
        # workers the first w images end together, so (N - w) images in that span.
        workers = int(RUNS[name][RUNS[name].index("--workers") + 1]) if "--workers" in RUNS[name] else 1
        steady = (placed[-1] - placed[workers - 1]) / 1e9 / (len(placed) - workers)
        draw = statistics.median(r["seconds"] for r in records)
        return {"run": name, "wall": wall, "steady_s_per_image": steady, "draw_s": draw, "images": len(records)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", choices=["tiny", "sd15"], default="tiny")
    parser.add_argument("--images", type=int, default=None, help="default 40 (tiny), 8 (sd15)")
    parser.add_argument("--size", type=int, default=256, help="sd15 only (tiny: its 128)")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--out", type=Path, default=HERE / "results")
    args = parser.parse_args()
    images = args.images or (40 if args.preset == "tiny" else 8)
    model = None
    if args.preset == "sd15":
        from peers import paths, prepare

        model = paths("sd15")["onnx"]
        if not (model / "model_index.json").is_file():
            prepare("sd15")
    size = {"size": f"{args.size}x{args.size}"} if args.preset == "sd15" else {}
    namespace = LoopbackNamespace()
    runs: dict[str, list[dict]] = {name: [] for name in RUNS}
    try:
        with tempfile.TemporaryDirectory() as folder:
            jobs = Path(folder) / "jobs.jsonl"
            jobs.write_text("".join(json.dumps({"prompt": f"a red circle, picture {i}", "seed": i,
                                                "steps": args.steps, **size}) + "\n" for i in range(images)))
            for _ in range(args.rounds):
                for name in RUNS:
                    result = one_run(name, jobs, model, namespace)
                    print(json.dumps(result), flush=True)
                    runs[name].append(result)
    finally:
        namespace.close()

    def med(name: str, key: str) -> float:
        return statistics.median(r[key] for r in runs[name])

    base = med("ray-1w", "steady_s_per_image")
    shown = f"{args.size}x{args.size}" if args.preset == "sd15" else "128x128"
    lines = [f"{date.today()}, {machine_flags()}; `sdonnx batch` of {images} images ({args.preset} model, {shown}, "
             f"{args.steps} steps, --provider auto), runs in turn, {args.rounds} round(s), medians", "",
             "| run | wall s | steady s per image | images per minute | vs ray-1w | draw s (in the worker) |",
             "|---|---|---|---|---|---|"]
    for name in RUNS:
        steady = med(name, "steady_s_per_image")
        lines.append(f"| {name} | {med(name, 'wall'):.1f} | {steady:.3f} | {60 / steady:.1f} | "
                     f"{base / steady:.2f}x | {med(name, 'draw_s'):.3f} |")
    overhead = med("ray-1w", "steady_s_per_image") - med("local-1t", "steady_s_per_image")
    lines += ["", f"Ray's overhead per image (ray-1w - local-1t, steady): {overhead * 1000:+.0f} ms "
                  f"({overhead / med('local-1t', 'steady_s_per_image'):+.1%}); start-up "
                  f"(wall - images x steady): ray-1w {med('ray-1w', 'wall') - images * base:.1f} s, "
                  f"local-1t {med('local-1t', 'wall') - images * med('local-1t', 'steady_s_per_image'):.1f} s", ""]
    args.out.mkdir(parents=True, exist_ok=True)
    target = args.out / f"ray-batch-{args.preset}.md"
    target.write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
