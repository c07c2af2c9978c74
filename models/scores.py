"""Swap quality against ground truth inside the face: SSIM and PSNR of uint8 RGB crops.

The SSIM is scikit-image's ``structural_similarity`` with ``win_size=7`` (uniform window,
sample covariance, reflected borders, the map averaged over the colour channels), computed
with OpenCV so the server extra needs no scikit-image; bench/quality.py scores with
scikit-image itself and tests/test_demo_encoder.py holds the two together.
"""

from __future__ import annotations

import cv2
import numpy as np
from numpy.typing import NDArray

__all__ = ["face_scores", "ssim_map"]

_WIN = 7
_K1, _K2 = 0.01, 0.03


def ssim_map(a: NDArray[np.uint8], b: NDArray[np.uint8]) -> NDArray[np.float64]:
    """(H, W) SSIM map of two (H, W, 3) or (H, W) uint8 images, channels averaged."""
    if a.shape != b.shape or a.ndim not in (2, 3):
        raise ValueError(f"expected two images of one shape, got {a.shape} and {b.shape}")
    x, y = a.astype(np.float64), b.astype(np.float64)

    def mean(v: NDArray[np.float64]) -> NDArray[np.float64]:
        return cv2.blur(v, (_WIN, _WIN), borderType=cv2.BORDER_REFLECT)  # type: ignore[return-value]

    cov_norm = _WIN * _WIN / (_WIN * _WIN - 1.0)
    ux, uy = mean(x), mean(y)
    vx = cov_norm * (mean(x * x) - ux * ux)
    vy = cov_norm * (mean(y * y) - uy * uy)
    vxy = cov_norm * (mean(x * y) - ux * uy)
    c1, c2 = (_K1 * 255.0) ** 2, (_K2 * 255.0) ** 2
    s = ((2 * ux * uy + c1) * (2 * vxy + c2)) / ((ux * ux + uy * uy + c1) * (vx + vy + c2))
    return s.mean(axis=2) if s.ndim == 3 else s


def face_scores(
    pred: NDArray[np.uint8], truth: NDArray[np.uint8], mask: NDArray[np.uint8]
) -> tuple[float, float]:
    """(SSIM, PSNR in dB) of ``pred`` against ``truth`` where ``mask`` > 127."""
    inside = mask > 127
    if not inside.any():
        raise ValueError("the mask selects no pixel")
    ssim = float(ssim_map(pred, truth)[inside].mean())
    err = pred.astype(np.float64)[inside] - truth.astype(np.float64)[inside]
    mse = float((err**2).mean())
    return ssim, 10.0 * float(np.log10(255.0**2 / max(mse, 1e-10)))
