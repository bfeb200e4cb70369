"""Export a full-size SD 1.5-architecture model (random weights) and generate one image.

Not a test: it takes minutes and about 6 GB of RAM. It builds the diffusers folder offline
from SD 1.5's architecture (cached under tests/benchmarks/cache/), exports it with sdonnx in
a child process, and reports wall time and peak RSS of the export and of one generation.

    python tests/benchmarks/sd15_export.py [--steps 20] [--size 512]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

CACHE = Path(__file__).parent / "cache"
SOURCE = CACHE / "sd15-random-diffusers"
EXPORTED = CACHE / "sd15-random-onnx"


def child(code: str) -> tuple[float, float, str]:
    """Run Python code in a fresh process: (seconds, peak RSS in GB, stdout)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    peak_kb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    if peak_kb <= before:
        print("warning: peak RSS of this child is not above an earlier child's", file=sys.stderr)
    return seconds, peak_kb / 1024**2, proc.stdout


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--size", type=int, default=512)
    args = parser.parse_args()
    CACHE.mkdir(exist_ok=True)
    results = {}
    if not (SOURCE / "model_index.json").is_file():
        seconds, _, _ = child(
            "from sdonnx.export.synthetic import build_random_pipeline;"
            f"build_random_pipeline({str(SOURCE)!r}, preset='sd15')"
        )
        print(f"built random SD 1.5 pipeline in {seconds:.0f} s")
    seconds, peak, out = child(
        "from pathlib import Path; from sdonnx.export.exporter import export, ExportConfig;"
        f"r = export(ExportConfig(Path({str(SOURCE)!r}), Path({str(EXPORTED)!r}), force=True), log=print)"
    )
    print(out)
    results["export"] = {"seconds": round(seconds, 1), "peak_rss_gb": round(peak, 2)}
    print(f"export: {seconds:.0f} s, peak RSS {peak:.2f} GB")
    seconds, peak, out = child(
        "import time; from sdonnx import Pipeline; t = time.perf_counter();"
        f"pipe = Pipeline.load({str(EXPORTED)!r}, provider='cpu'); load = time.perf_counter() - t;"
        f"img = pipe.generate('a photo of a cat', steps={args.steps}, width={args.size}, height={args.size})[0];"
        f"img.save({str(CACHE / 'sd15-random.png')!r});"
        "print(f'load {load:.1f} s, total {time.perf_counter() - t:.1f} s')"
    )
    print(out)
    results["generate"] = {"steps": args.steps, "size": args.size, "seconds": round(seconds, 1),
                           "peak_rss_gb": round(peak, 2)}
    sizes = {p.name: sum(f.stat().st_size for f in p.rglob("*") if f.is_file()) / 1e9
             for p in EXPORTED.iterdir() if p.is_dir()}
    results["sizes_gb"] = {k: round(v, 3) for k, v in sizes.items()}
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
