"""Does the embedded default model draw what the prompt asks? The full measurement.

50 held-out prompts (scenes never shown in training) x 2 seeds, 20 steps, judged by
tests/judge.py, for each sampler and guidance scale. Prints a markdown table.

    python tests/benchmarks/default_model_accuracy.py [--model DIR] [--seeds 2]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from judge import accuracy  # noqa: E402

from sdonnx import Pipeline  # noqa: E402
from sdonnx.models import shapes  # noqa: E402


EXAMPLES = [
    "a red circle on a white background",
    "a small blue square at the top left on a white background",
    "a large yellow star on a black background",
    "a green triangle at the bottom right on a gray background",
]


def write_examples(pipe, out: Path) -> None:
    """One image per example prompt (seed 0) at the model's native size, shown enlarged (nearest
    neighbour) to about 200 pixels in the README."""
    out.mkdir(parents=True, exist_ok=True)
    for i, prompt in enumerate(EXAMPLES):
        image = pipe.generate(prompt, seed=0)[0]
        scale = max(1, round(200 / image.width))
        image.resize((image.width * scale, image.height * scale), resample=0).save(out / f"example-{i}.png")
        print(f"example-{i}.png: {prompt}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", type=Path, default=None)
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--samplers", nargs="+", default=["euler", "ddim", "plms"])
    parser.add_argument("--guidance", nargs="+", type=float, default=[None, 7.5, 1.0],
                        help="scales to measure (default: the model's recommended one, 7.5 and 1)")
    parser.add_argument("--unconditional", action="store_true",
                        help="also the empty prompt at guidance 1, judged against the held-out scenes (chance level)")
    parser.add_argument("--examples", type=Path, help="also write the README's example images here")
    parser.add_argument("--provider", default="cpu", help="cpu, or openvino for OpenVINO IR folders")
    args = parser.parse_args()
    pipe = Pipeline.load(args.model, provider=args.provider, precision="fp32")
    if args.examples:
        write_examples(pipe, args.examples)
    scenes = shapes.held_out_scenes()
    print("| sampler | guidance | colour | shape | both | images | seconds |")
    print("|---|---|---|---|---|---|---|")
    for sampler in args.samplers:
        for guidance in args.guidance:
            start = time.perf_counter()
            result = accuracy(pipe, scenes, seeds=range(args.seeds), sampler=sampler,
                              guidance=guidance, steps=args.steps)
            shown = f"{pipe.defaults.guidance:g} (model default)" if guidance is None else f"{guidance:g}"
            print(f"| {sampler} | {shown} | {result['colour']:.0%} | {result['shape']:.0%} | "
                  f"{result['both']:.0%} | {result['images']} | {time.perf_counter() - start:.0f} |",
                  flush=True)
    if args.unconditional:
        result = accuracy(pipe, scenes, seeds=range(args.seeds), guidance=1.0, steps=args.steps, prompt="")
        print(f"| euler | empty prompt, 1 | {result['colour']:.0%} | {result['shape']:.0%} | "
              f"{result['both']:.0%} | {result['images']} | - |", flush=True)


if __name__ == "__main__":
    main()
