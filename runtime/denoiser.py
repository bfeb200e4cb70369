"""The one adapter between samplers and the UNet, after k-diffusion's `external.py`.

Samplers see `denoised = denoise(x, sigma)` only. Here live the sigma -> timestep mapping,
the input scaling, classifier-free guidance with the negative prompt, and the conversion of
epsilon or v predictions into the clean-latent estimate.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

UNetFn = Callable[[np.ndarray, float, np.ndarray], np.ndarray]


@dataclass(frozen=True)
class Denoiser:
    unet: UNetFn  # (scaled sample, timestep, text embeddings) -> eps or v
    context: np.ndarray  # (n, 77, d) prompt embeddings, or (2n, 77, d) [negative; prompt]
    guidance: float
    prediction_type: str
    sigma_to_t: Callable[[float], float]
    # Inpainting UNets take (mask, masked-image latents) as 5 more input channels, unscaled.
    conditioning: np.ndarray | None = None
    # The same UNet in fp32, for the evaluations at `precise_sigmas` of a bf16 run (precision.py).
    precise_unet: UNetFn | None = None
    precise_sigmas: frozenset[float] = frozenset()
    # The most rows per UNet call (None: all, the CFG pair in one batch). 1 runs the negative
    # and the prompt as calls of one image each: half the UNet's activations (an SD 1.5 int8
    # call at 512x512: 0.13 GB against 0.25), the same arithmetic per row, and on a CPU
    # about the same time (tests/benchmarks/README.md "Memory").
    max_batch: int | None = None
    # Called before each evaluation's UNet calls: DeepCache counts evaluations (deep_cache.py).
    before_evaluation: Callable[[], None] | None = None

    @property
    def uses_guidance(self) -> bool:
        """Guidance scale <= 1 skips the unconditional pass, as diffusers does."""
        return self.guidance > 1.0

    def __call__(self, x: np.ndarray, sigma: float) -> np.ndarray:
        sigma = float(sigma)
        c_in = 1.0 / np.sqrt(sigma**2 + 1.0)
        sample = x * c_in
        if self.conditioning is not None:
            sample = np.concatenate([sample, self.conditioning], axis=1)
        if self.uses_guidance:
            sample = np.concatenate([sample, sample])
        unet = self.precise_unet if sigma in self.precise_sigmas else self.unet
        sample, t = sample.astype(np.float32), self.sigma_to_t(sigma)
        if self.before_evaluation is not None:
            self.before_evaluation()
        rows = self.max_batch or len(sample)
        if rows >= len(sample):  # (the context object itself: a bound device keeps it across steps)
            out = unet(sample, t, self.context)
        else:
            out = np.concatenate([unet(sample[i:i + rows], t, self.context[i:i + rows])
                                  for i in range(0, len(sample), rows)])
        if self.uses_guidance:
            uncond, cond = np.split(out, 2)
            out = uncond + self.guidance * (cond - uncond)
        if self.prediction_type == "v_prediction":
            # Salimans & Ho (2022): x0 = c_skip x + c_out v.
            return x / (sigma**2 + 1.0) - out * (sigma * c_in)
        return x - sigma * out
