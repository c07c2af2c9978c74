"""uint8 pixels <-> float intensities in [0, 1], on numpy arrays and torch tensors alike.

One scale (divide by 255) and one rounding rule back (to the nearest integer, ties to even:
numpy's rint and torch's round agree), so the OpenCV and tensor paths, the model's inputs
and outputs and the training previews all quantise the same way.
"""

from __future__ import annotations

from typing import overload

import numpy as np
import torch
from numpy.typing import NDArray
from torch import Tensor

__all__ = ["images_to_unit", "to_uint8", "to_unit"]


@overload
def to_unit(x: Tensor) -> Tensor: ...
@overload
def to_unit(x: NDArray[np.generic]) -> NDArray[np.float32]: ...
def to_unit(x: Tensor | NDArray[np.generic]) -> Tensor | NDArray[np.float32]:
    """uint8 0..255 -> float32 0..1 (a new array or tensor, same shape and device)."""
    if isinstance(x, Tensor):
        return x.float().div_(255.0)
    return np.asarray(x, np.float32) / np.float32(255.0)


def images_to_unit(x: Tensor) -> Tensor:
    """(N, H, W, C) uint8 images -> (N, C, H, W) float32 in [0, 1], contiguous.

    Contiguous, not the permuted view's channels-last strides: the CPU convolutions follow
    their input's layout, and in channels-last they ran the original64 model 1.6x slower on
    this project's 2-core CPU (batch 8: 271 against 172 ms) and a training step 10% slower.
    A caller whose model runs channels-last (tensor cores on CUDA; a CPU model for which
    inference.faster_layout measured it faster) converts after."""
    return to_unit(x.permute(0, 3, 1, 2).contiguous())


@overload
def to_uint8(x: Tensor) -> Tensor: ...
@overload
def to_uint8(x: NDArray[np.floating]) -> NDArray[np.uint8]: ...
def to_uint8(x: Tensor | NDArray[np.floating]) -> Tensor | NDArray[np.uint8]:
    """float 0..1 (clipped) -> uint8 0..255, rounded to nearest, ties to even."""
    if isinstance(x, Tensor):
        return x.clamp(0, 1).mul(255.0).round_().to(torch.uint8)
    return np.rint(np.clip(x, 0.0, 1.0) * 255.0).astype(np.uint8)
