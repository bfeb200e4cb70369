"""How close two sets of images are: PSNR and SSIM, in numpy."""

from __future__ import annotations

import numpy as np

# PSNR of identical images is infinite; reports cap it here.
MAX_PSNR = 100.0


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return MAX_PSNR if mse == 0 else min(MAX_PSNR, 10 * np.log10(255.0**2 / mse))


def _blur(x: np.ndarray, sigma: float = 1.5, radius: int = 5) -> np.ndarray:
    """Separable Gaussian filter over the first two axes, 'valid' region only."""
    taps = np.exp(-0.5 * (np.arange(-radius, radius + 1) / sigma) ** 2)
    taps /= taps.sum()
    n = 2 * radius + 1
    rows = sum(taps[i] * x[i:x.shape[0] - n + 1 + i] for i in range(n))
    return sum(taps[i] * rows[:, i:rows.shape[1] - n + 1 + i] for i in range(n))


def ssim(a: np.ndarray, b: np.ndarray) -> float:
    """Mean structural similarity (Wang et al. 2004: 11x11 Gaussian window, sigma 1.5) over
    the colour channels of two 8-bit images."""
    x, y = a.astype(np.float64), b.astype(np.float64)
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    mx, my = _blur(x), _blur(y)
    vx = _blur(x * x) - mx * mx
    vy = _blur(y * y) - my * my
    cov = _blur(x * y) - mx * my
    score = ((2 * mx * my + c1) * (2 * cov + c2)) / ((mx * mx + my * my + c1) * (vx + vy + c2))
    return float(score.mean())


def compare(reference: list[np.ndarray], images: list[np.ndarray]) -> tuple[float, float]:
    """Mean PSNR (dB) and mean SSIM of image pairs."""
    pairs = list(zip(reference, images, strict=True))
    return (float(np.mean([psnr(a, b) for a, b in pairs])),
            float(np.mean([ssim(a, b) for a, b in pairs])))
