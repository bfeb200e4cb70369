"""Load on `sdonnx serve`: CLIENTS concurrent OpenAI image requests on loopback, released together.

Reports how many completed with a valid image, how many got the documented busy answer (503
with Retry-After), that none was lost, their latencies, and the server's peak RSS next to a
plain `sdonnx generate` of the same request measured in the same run (the server's overhead).

    python tests/benchmarks/serve_load.py [--model DIR] [--clients 20] [--queue 4] [--steps 20] [--rounds 3]

With `--hold N` it measures instead whether the server holds its memory: N requests one after
another, cycling through four sizes (HOLD_SIZES) and both the OpenAI and the AUTOMATIC1111
endpoint, and the server's resident set after the first 10 (which have seen every size) against
after all N (issue 20: within 10%; tests/test_server.py checks the same on the embedded model).
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


HOLD_SIZES = ("512x512", "256x256", "384x256", "256x384")


def rss_mb(server: Server) -> float:
    status = Path(f"/proc/{server.process.pid}/status").read_text()
    return int(re.search(r"VmRSS:\s+(\d+) kB", status).group(1)) / 1024


def hold(server: Server, requests: int, steps: int) -> dict[int, float]:
    """The server's RSS in MB after request 1, 10, 25, 50 ... and `requests`."""
    after = {}
    marks = {1, 10, 25, 50, 75, requests}
    for i in range(requests):
        size = HOLD_SIZES[i % len(HOLD_SIZES)]
        width, height = (int(v) for v in size.split("x"))
        if i % 2:
            reply = server.post("/v1/images/generations", {"prompt": PROMPT, "size": size, "steps": steps, "seed": i})
        else:
            reply = server.post("/sdapi/v1/txt2img", {"prompt": PROMPT, "width": width, "height": height,
                                                      "steps": steps, "seed": i})
        if reply.status != 200:
            raise RuntimeError(f"request {i + 1} failed: {reply.status} {reply.message}")
        if i + 1 in marks:
            after[i + 1] = rss_mb(server)
            print(f"after {i + 1} requests: RSS {after[i + 1]:.0f} MB", flush=True)
    return after


def hold_report(args, after: dict[int, float]) -> str:
    rows = [f"# sdonnx serve holds its memory ({date.today()}, {machine()})", "",
            f"{args.hold} requests one after another, cycling through {', '.join(HOLD_SIZES)} and both "
            f"endpoints, {args.steps} step(s) each, provider {args.provider}, model {args.model or 'embedded default'}"
            f"{', --low-memory' if args.low_memory else ''}.", "",
            "| after requests | server RSS MB |", "|---|---|"]
    rows += [f"| {n} | {mb:.0f} |" for n, mb in sorted(after.items())]
    rows += ["", f"After {args.hold} against after 10: {after[args.hold] / after[10]:.3f}x (issue 20: at most 1.10x)."]
    return "\n".join(rows) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", type=Path)
    parser.add_argument("--clients", type=int, default=20)
    parser.add_argument("--queue", type=int, default=4)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--provider", default="cpu")
    parser.add_argument("--out", type=Path, default=HERE / "results")
    parser.add_argument("--hold", type=int, help="measure RSS over this many sequential requests of mixed sizes")
    parser.add_argument("--low-memory", action="store_true", help="serve with --low-memory")
    args = parser.parse_args()
    model = ["--model", str(args.model)] if args.model else []
    if args.hold:
        if args.hold < 10:
            parser.error("--hold needs at least 10 requests")
        server = Server(*model, "--provider", args.provider, *(["--low-memory"] if args.low_memory else []))
        try:
            text = hold_report(args, hold(server, args.hold, args.steps))
        finally:
            server.stop()
        print(text)
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "serve-hold.md").write_text(text)
        return
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
