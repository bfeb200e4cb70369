"""Exporting a single-file SD 1.5 checkpoint against exporting its diffusers folder.

Not a test: minutes and about 10 GB of RAM. The random SD 1.5-architecture diffusers folder
(cached under tests/benchmarks/cache/, shared with sd15_export.py) is written once as an fp16
`.safetensors` in the original LDM layout (about 2 GB, as model sites offer them); then each
is exported by sdonnx in a fresh process, with the same settings, and wall time and the
child's own peak RSS are reported.

    python tests/benchmarks/single_file.py [--no-check]

Writes single-file-export.md to --out (default tests/benchmarks/results/).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from peers import machine  # noqa: E402

HERE = Path(__file__).parent
CACHE = HERE / "cache"
SOURCE = CACHE / "sd15-random-diffusers"
SINGLE = CACHE / "sd15-random-fp16.safetensors"


def child(code: str) -> tuple[float, float]:
    """Run Python code in a fresh process: (seconds, that process's peak RSS in GB)."""
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-c", code])
    _, status, usage = os.wait4(proc.pid, 0)
    if os.waitstatus_to_exitcode(status):
        raise SystemExit(f"the child failed: {code[:120]}")
    return time.perf_counter() - start, usage.ru_maxrss / 1024**2


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--no-check", action="store_true", help="skip the per-part parity check in both")
    parser.add_argument("--out", type=Path, default=HERE / "results")
    args = parser.parse_args()
    CACHE.mkdir(exist_ok=True)
    if not (SOURCE / "model_index.json").is_file():
        seconds, _ = child("from sdonnx.export.synthetic import build_random_pipeline;"
                           f"build_random_pipeline({str(SOURCE)!r}, preset='sd15')")
        print(f"built the random SD 1.5 folder in {seconds:.0f} s", flush=True)
    if not SINGLE.is_file():
        seconds, peak = child("from sdonnx.export.ldm_layout import write_single_file;"
                              f"write_single_file({str(SOURCE)!r}, {str(SINGLE)!r}, dtype='fp16')")
        print(f"wrote {SINGLE} ({SINGLE.stat().st_size / 1e9:.2f} GB) in {seconds:.0f} s", flush=True)
    rows = []
    for name, source in (("single file (fp16 .safetensors)", SINGLE), ("diffusers folder (fp32)", SOURCE)):
        out = CACHE / f"single-file-bench-{'file' if source == SINGLE else 'folder'}"
        seconds, peak = child(
            "from pathlib import Path; from sdonnx.export.exporter import ExportConfig, export;"
            f"export(ExportConfig(Path({str(source)!r}), Path({str(out)!r}), force=True, check={not args.no_check}),"
            " log=print)")
        print(f"{name}: {seconds:.0f} s, peak RSS {peak:.2f} GB", flush=True)
        rows.append((name, seconds, peak))
    check = "without" if args.no_check else "with"
    lines = [f"{date.today()}, {machine()}; SD 1.5 architecture, random weights; `sdonnx export` {check} the "
             "parity check, each in a fresh process, one round", "",
             "| source | export s | peak RSS GB |", "|---|---|---|"]
    lines += [f"| {name} | {seconds:.0f} | {peak:.2f} |" for name, seconds, peak in rows]
    text = "\n".join(lines)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "single-file-export.md").write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
