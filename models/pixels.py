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

__all__ = ["to_uint8", "to_unit"]


@overload
def to_unit(x: Tensor) -> Tensor: ...
@overload
def to_unit(x: NDArray[np.generic]) -> NDArray[np.float32]: ...
def to_unit(x: Tensor | NDArray[np.generic]) -> Tensor | NDArray[np.float32]:
    """uint8 0..255 -> float32 0..1 (a new array or tensor, same shape and device)."""
    if isinstance(x, Tensor):
        return x.float().div_(255.0)
    return np.asarray(x, np.float32) / np.float32(255.0)


@overload
def to_uint8(x: Tensor) -> Tensor: ...
@overload
def to_uint8(x: NDArray[np.floating]) -> NDArray[np.uint8]: ...
def to_uint8(x: Tensor | NDArray[np.floating]) -> Tensor | NDArray[np.uint8]:
    """float 0..1 (clipped) -> uint8 0..255, rounded to nearest, ties to even."""
    if isinstance(x, Tensor):
        return x.clamp(0, 1).mul(255.0).round_().to(torch.uint8)
    return np.rint(np.clip(x, 0.0, 1.0) * 255.0).astype(np.uint8)
