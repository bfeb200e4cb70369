"""What a page's live preview costs the server: one txt2img request timed alone and with a
client polling /sdapi/v1/progress (with its preview image) every 0.2 s, alternating, in one
server process. Before cheap previews every poll's preview was a full VAE decode.

    python tests/benchmarks/preview_poll.py [--model DIR] [--steps 20] [--size 256] [--rounds 2]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import threading
import time
from datetime import date
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
from serving import Server  # noqa: E402

PROMPT = "a red circle on a white background"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=HERE / "cache" / "sd15-random-onnx")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--out", type=Path, default=HERE / "results")
    args = parser.parse_args()
    server = Server("--model", str(args.model), "--provider", "cpu", timeout=600)
    body = {"prompt": PROMPT, "steps": args.steps, "width": args.size, "height": args.size, "seed": 1}
    times: dict[str, list[float]] = {"alone": [], "polled": []}
    previews = []
    try:
        server.post("/sdapi/v1/txt2img", {**body, "steps": 1})  # warm-up: sessions built
        for _ in range(args.rounds):
            for mode in ("alone", "polled"):
                done = threading.Event()

                def poll():
                    while not done.is_set():
                        reply = server.get("/sdapi/v1/progress").body
                        if reply.get("current_image"):
                            previews.append(1)
                        time.sleep(0.2)

                poller = threading.Thread(target=poll) if mode == "polled" else None
                if poller:
                    poller.start()
                start = time.perf_counter()
                reply = server.post("/sdapi/v1/txt2img", body)
                times[mode].append(time.perf_counter() - start)
                done.set()
                if poller:
                    poller.join()
                assert reply.status == 200, reply.message
                print(mode, round(times[mode][-1], 2), flush=True)
    finally:
        server.stop()
    alone, polled = statistics.median(times["alone"]), statistics.median(times["polled"])
    from peers import machine_flags

    text = (f"# Live preview cost ({date.today()}, {machine_flags()})\n\n"
            f"{args.model.name}, {args.size}x{args.size}, {args.steps} steps, cpu, {args.rounds} rounds, median:\n\n"
            f"| request | seconds |\n|---|---|\n| alone | {alone:.2f} |\n| polled every 0.2 s | {polled:.2f} |\n\n"
            f"ratio {polled / alone:.3f}; {len(previews)} polls answered with a preview\n")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "preview-poll.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
