"""Load on `sdonnx serve`: CLIENTS concurrent OpenAI image requests on loopback, released together.

Reports how many completed with a valid image, how many got the documented busy answer (503
with Retry-After), that none was lost, their latencies, and the server's peak RSS next to a
plain `sdonnx generate` of the same request measured in the same run (the server's overhead).

    python tests/benchmarks/serve_load.py [--model DIR] [--clients 20] [--queue 4] [--steps 20] [--rounds 3]
"""

from __future__ import annotations

import argparse
import re
import statistics
import subprocess
import sys
import tempfile
from datetime import date
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))
from peers import machine  # noqa: E402
from serving import Server, load  # noqa: E402

PROMPT = "a red circle on a white background"
GENERATE_RSS = """
import resource, sys
from sdonnx.cli.app import main
sys.argv = ["sdonnx", "generate", *sys.argv[1:]]
try:
    main()
except SystemExit:
    pass
print("peak_rss_mb", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
"""


def generate_rss_mb(model: list[str], steps: int, provider: str) -> float:
    with tempfile.TemporaryDirectory() as out:
        done = subprocess.run([sys.executable, "-c", GENERATE_RSS, PROMPT, *model, "--steps", str(steps), "--seed", "0",
                               "--provider", provider, "--out", str(Path(out) / "x.png")],
                              capture_output=True, text=True, check=True)
    return float(re.search(r"peak_rss_mb (\S+)", done.stdout).group(1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", type=Path)
    parser.add_argument("--clients", type=int, default=20)
    parser.add_argument("--queue", type=int, default=4)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--provider", default="cpu")
    parser.add_argument("--out", type=Path, default=HERE / "results")
    args = parser.parse_args()
    model = ["--model", str(args.model)] if args.model else []
    server = Server(*model, "--provider", args.provider, "--queue", str(args.queue))
    try:
        size = server.get("/health").body["native_size"]
        results = [load(server, args.clients, {"prompt": PROMPT, "steps": args.steps}, size) for _ in range(args.rounds)]
        server_rss = server.peak_rss_mb()
    finally:
        server.stop()
    plain_rss = generate_rss_mb(model, args.steps, args.provider)
    latencies = [t for r in results for t in r.latencies]
    rows = [f"# sdonnx serve under load ({date.today()}, {machine()})", "",
            f"{args.clients} concurrent clients per round, {args.rounds} rounds, `--queue {args.queue}`, "
            f"{args.steps} steps at {size}x{size}, provider {args.provider}, model "
            f"{args.model or 'embedded default'}.", "",
            "| round | completed (200, valid image) | busy (503 + Retry-After) | other (lost/broken) | wall s |",
            "|---|---|---|---|---|"]
    for i, r in enumerate(results, 1):
        rows.append(f"| {i} | {r.completed} | {r.busy} | {len(r.other)} | {r.seconds:.2f} |")
    rows += ["", f"Latency of completed requests: median {statistics.median(latencies):.2f} s, "
             f"max {max(latencies):.2f} s.", "",
             f"Peak RSS: server {server_rss:.0f} MB after all rounds; one `sdonnx generate` of the same "
             f"request {plain_rss:.0f} MB (server / generate = {server_rss / plain_rss:.2f}x)."]
    lost = [o for r in results for o in r.other]
    if lost:
        rows += ["", "Unaccounted replies:", *[f"- {o}" for o in lost]]
    text = "\n".join(rows) + "\n"
    print(text)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "serve-load.md").write_text(text)


if __name__ == "__main__":
    main()
