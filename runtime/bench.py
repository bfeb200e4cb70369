"""`sdonnx bench`: time the parts of a model on every provider and precision available here.

Each provider/precision runs in its own process, so that its load time is a cold start and its
peak RSS is its own: text encoding (prompt + negative), one UNet step on a CFG pair (the first
call, which includes any compilation, and the median of the next ones), one VAE decode.
"""

from __future__ import annotations

import json
import resource
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from sdonnx.runtime import parts, providers


@dataclass(frozen=True)
class BenchResult:
    provider: str
    precision: str
    load_s: float
    text_s: float
    first_step_s: float
    unet_step_s: float
    vae_decode_s: float
    peak_rss_gb: float
    width: int
    height: int


def peak_rss_gb() -> float:
    """This process's peak resident memory, in GB.

    /proc's VmHWM belongs to the process image, so a freshly started child reports its own
    peak; getrusage's ru_maxrss would carry the parent's peak across exec on Linux.
    """
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 2**20  # kB
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def combinations() -> list[tuple[str, str]]:
    """Every (provider, precision) this machine can run."""
    runnable = []
    for name, provider in providers.PROVIDERS.items():
        if not provider.available():
            continue
        for precision in provider.precisions:
            if precision == "bf16" and not providers.cpu_has_bf16():
                continue
            runnable.append((name, precision))
    return runnable


def _timed(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def measure(model: Path | None, provider: str, precision: str, width: int | None, height: int | None,
            repeats: int = 3, cache_dir: Path | None = None, threads: int | None = None) -> BenchResult:
    """Measure in this process (see `run` for one process per provider)."""
    from sdonnx.runtime.pipeline import GenerationConfig, Pipeline, guidance_embedding
    from sdonnx.runtime.upscale import DEFAULT_NOISE_LEVEL

    start = time.perf_counter()
    pipe = Pipeline.load(model, provider=provider, precision=precision, cache_dir=cache_dir, threads=threads)
    load_s = time.perf_counter() - start
    width, height = width or pipe.native_size, height or pipe.native_size
    distilled = pipe.guidance_embedding_dim is not None  # LCM: one row per image, the guidance an input
    config = GenerationConfig("a photo of a cat", "" if distilled else "blurry", width=width, height=height,
                              guidance=1.0 if distilled else 7.5)
    text_s = _timed(lambda: pipe.encode_context(config), repeats)
    context = pipe.encode_context(config)
    _, c, h, w = config.latent_shape
    rows = len(context)
    sample = np.random.default_rng(0).standard_normal((rows, c, h, w), dtype=np.float32)
    if pipe.unet_channels > c:  # inpainting, depth-to-image, the x4 upscaler: their extra input channels
        sample = np.concatenate([sample, np.zeros((rows, pipe.unet_channels - c, h, w), np.float32)], axis=1)
    cond = guidance_embedding(8.5, pipe.guidance_embedding_dim) if distilled else None
    labels = DEFAULT_NOISE_LEVEL if pipe.is_upscaler else None  # the x4 upscaler's noise level, its class label
    start = time.perf_counter()
    pipe._unet(sample, 500.0, context, timestep_cond=cond, class_labels=labels)
    first_step_s = time.perf_counter() - start
    unet_s = _timed(lambda: pipe._unet(sample, 500.0, context, timestep_cond=cond, class_labels=labels), repeats)
    vae_s = _timed(lambda: pipe.decode(sample[:1, : parts.LATENT_CHANNELS]), repeats)
    return BenchResult(provider, precision, load_s, text_s, first_step_s, unet_s, vae_s, peak_rss_gb(),
                       width, height)


def run(model: Path | None, width: int | None = None, height: int | None = None, repeats: int = 3,
        only: list[str] | None = None, threads: int | None = None) -> list[BenchResult]:
    """One child process per provider/precision, in turn."""
    results = []
    for provider, precision in combinations():
        if only and provider not in only:
            continue
        args = json.dumps({"model": str(model) if model else None, "provider": provider, "precision": precision,
                           "width": width, "height": height, "repeats": repeats, "threads": threads})
        done = subprocess.run([sys.executable, "-m", "sdonnx.runtime.bench", args],
                              capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"bench on {provider} ({precision}) failed:\n{done.stderr[-2000:]}")
        results.append(BenchResult(**json.loads(done.stdout.strip().splitlines()[-1])))
    return results


def table(results: list[BenchResult]) -> str:
    size = f"{results[0].width}x{results[0].height}" if results else "?"
    rows = [f"UNet step = one call on a CFG pair at {size}",
            "| provider | precision | load s | text enc s | first UNet step s | UNet step s | VAE decode s | peak RSS GB |",
            "|---|---|---|---|---|---|---|---|"]
    for r in results:
        rows.append(f"| {r.provider} | {r.precision} | {r.load_s:.2f} | {r.text_s:.3f} | {r.first_step_s:.3f} | "
                    f"{r.unet_step_s:.3f} | {r.vae_decode_s:.3f} | {r.peak_rss_gb:.2f} |")
    return "\n".join(rows)


if __name__ == "__main__":
    options = json.loads(sys.argv[1])
    result = measure(Path(options["model"]) if options["model"] else None, options["provider"],
                     options["precision"], options["width"], options["height"], options["repeats"],
                     threads=options.get("threads"))
    print(json.dumps(asdict(result)))
