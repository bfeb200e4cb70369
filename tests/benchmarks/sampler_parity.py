"""The sampler parity table and the cost of the numpy sampler code, for the README and notes.

For every sampler and schedule: max abs pixel difference (0-255) and PSNR between sdonnx and
the diffusers scheduler it reproduces, on the tests' tiny epsilon model and tiny v-prediction
(trailing) model, 6 steps, guidance 7.5; stochastic samplers are listed with the ratio of their
noise spread to diffusers' (1.0 = same). Then the sampler arithmetic per step, timed with a
free denoiser on SD-size latents (4x64x64, CFG batch), against one UNet call of the tiny model.

    python tests/benchmarks/sampler_parity.py
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import conftest  # noqa: E402
import test_parity as tp  # noqa: E402

from sdonnx import Pipeline  # noqa: E402
from sdonnx.export.exporter import ExportConfig, export  # noqa: E402
from sdonnx.export.synthetic import build_random_pipeline  # noqa: E402
from sdonnx.runtime.pipeline import SAMPLERS  # noqa: E402


def build(root: Path, **kwargs):
    source = build_random_pipeline(root / "diffusers", output_gain=conftest.OUTPUT_GAIN,
                                   time_gain=conftest.TIME_GAIN, **kwargs)
    export(ExportConfig(source, root / "onnx"))
    return Pipeline.load(root / "onnx", provider="cpu"), conftest._reference(source)


def sampler_overhead(side: int, steps: int = 20) -> dict[str, float]:
    """Milliseconds per step of each sampler's own arithmetic on a 1x4xSIDExSIDE latent."""
    from sdonnx.runtime.schedules import SchedulerConfig

    x0 = np.random.default_rng(0).standard_normal((1, 4, side, side), dtype=np.float32)
    rng = np.random.default_rng(1)
    result = {}
    for name, sampler in SAMPLERS.items():
        schedule = sampler.schedule(SchedulerConfig(), steps)
        options = {**schedule.sampler_kwargs, "noise": lambda: rng.standard_normal(x0.shape, dtype=np.float32)}
        options = {k: v for k, v in options.items() if k in sampler.options}
        evaluations = [0]

        def denoise(x, sigma):
            evaluations[0] += 1
            return x * 0.5

        start = time.perf_counter()
        sampler.sample(denoise, x0 * schedule.noise_scale, schedule.sigmas, **options)
        result[name] = (time.perf_counter() - start) * 1000 / steps
    return result


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        models = {
            "epsilon": build(Path(tmp) / "eps"),
            "v": build(Path(tmp) / "v", seed=1, prediction_type="v_prediction", timestep_spacing="trailing"),
        }
        print("| sampler | schedule | epsilon: max abs diff | epsilon: PSNR dB | v (trailing): max abs diff | v: PSNR dB |")
        print("|---|---|---|---|---|---|")
        latents = tp.unit_latents()
        for (sampler, schedule), spec in tp.DETERMINISTIC.items():
            cells = []
            for pipe, reference_pipe in models.values():
                tp.use_scheduler(reference_pipe, *spec)
                want = tp.reference_images(reference_pipe, latents)[0].astype(int)
                got = tp.ours(pipe, sampler, latents, schedule=schedule)[0].astype(int)
                cells += [str(np.abs(got - want).max()), f"{conftest.psnr(got, want):.1f}"]
            print(f"| {sampler} | {schedule} | " + " | ".join(cells) + " |", flush=True)
        print()
        print("| stochastic sampler | schedule | eta | epsilon: noise spread / diffusers' | v: noise spread / diffusers' |")
        print("|---|---|---|---|---|")
        for sampler, schedule, eta in tp.STOCHASTIC:
            ratios = [np.divide(*tp.stochastic_spreads(pipe, ref, sampler, schedule, eta, eta))
                      for pipe, ref in models.values()]
            print(f"| {sampler} | {schedule} | {eta if eta is not None else '-'} | "
                  + " | ".join(f"{r:.3f}" for r in ratios) + " |", flush=True)
        pipe = models["epsilon"][0]
        unet_ms = {side: unet_call_ms(pipe, side) for side in (8, 64)}
    print()
    print("| sampler | numpy ms per step, 64 px (latent 8x8) | vs tiny UNet call | numpy ms per step, 512 px (64x64) | vs tiny UNet call |")
    print("|---|---|---|---|---|")
    small, large = sampler_overhead(8), sampler_overhead(64)
    for name in small:
        print(f"| {name} | {small[name]:.3f} | {small[name] / unet_ms[8]:.1%} | {large[name]:.2f} | "
              f"{large[name] / unet_ms[64]:.2%} |")
    print(f"tiny UNet call on a CFG pair: {unet_ms[8]:.1f} ms at 64 px, {unet_ms[64]:.0f} ms at 512 px")


def unet_call_ms(pipe, side: int, repeats: int = 10) -> float:
    context = np.zeros((2, 77, 32), dtype=np.float32)
    sample = np.zeros((2, 4, side, side), dtype=np.float32)
    pipe._unet(sample, 500.0, context)
    start = time.perf_counter()
    for _ in range(repeats):
        pipe._unet(sample, 500.0, context)
    return (time.perf_counter() - start) * 1000 / repeats


if __name__ == "__main__":
    main()
