"""Colour correction of a swapped crop towards the original crop's colours."""

from __future__ import annotations

import cv2
import numpy as np
from facemux.models.errors import InvalidInputError
from facemux.models.pixels import to_uint8, to_unit
from numpy.typing import NDArray

from .mask import as_float_mask

__all__ = ["COLOUR_METHODS", "correct_colour"]

COLOUR_METHODS = ("none", "average", "reinhard")


def _weighted_stats(
    x: NDArray[np.float32], w: NDArray[np.float32]
) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
    total = float(w.sum())
    flat = x.reshape(-1, x.shape[-1]).astype(np.float64)
    wf = w.reshape(-1, 1).astype(np.float64)
    mean = (flat * wf).sum(axis=0) / total
    var = (np.square(flat - mean) * wf).sum(axis=0) / total
    return mean, np.sqrt(var)


def correct_colour(
    face: NDArray[np.uint8],
    target: NDArray[np.uint8],
    mask: NDArray[np.generic],
    method: str = "reinhard",
) -> NDArray[np.uint8]:
    """``face`` (the swapped crop) recoloured so that, inside ``mask``, it matches ``target``
    (the original crop): "average" shifts each RGB channel's mean; "reinhard" matches the
    mean and standard deviation of each CIELAB channel (Reinhard et al. 2001), which also
    carries over contrast. Statistics are weighted by the mask; the whole crop is corrected.
    "none" returns ``face`` unchanged."""
    if method not in COLOUR_METHODS:
        raise InvalidInputError(
            f"unknown colour correction {method!r}; choose one of {', '.join(COLOUR_METHODS)}"
        )
    if method == "none":
        return face
    if face.shape != target.shape or face.ndim != 3 or face.shape[2] != 3:
        raise InvalidInputError(
            f"face and target crops must be the same (H, W, 3) shape, got {face.shape} and "
            f"{target.shape}"
        )
    w = as_float_mask(mask)
    if w.shape != face.shape[:2]:
        w = np.asarray(
            cv2.resize(w, (face.shape[1], face.shape[0]), interpolation=cv2.INTER_LINEAR),
            np.float32,
        )
    if float(w.sum()) < 1.0:
        return face  # no face pixels to take statistics from
    f, t = to_unit(face), to_unit(target)
    if method == "average":
        mf, _ = _weighted_stats(f, w)
        mt, _ = _weighted_stats(t, w)
        out = f + (mt - mf).astype(np.float32)
    else:
        lf = np.asarray(cv2.cvtColor(f, cv2.COLOR_RGB2LAB), np.float32)
        lt = np.asarray(cv2.cvtColor(t, cv2.COLOR_RGB2LAB), np.float32)
        mf, sf = _weighted_stats(lf, w)
        mt, st = _weighted_stats(lt, w)
        # A flat channel (sf ~ 0) would blow noise up: cap the gain.
        gain = np.minimum(st / np.maximum(sf, 1e-3), 4.0)
        lab = (lf - mf.astype(np.float32)) * gain.astype(np.float32) + mt.astype(np.float32)
        out = np.asarray(cv2.cvtColor(lab.astype(np.float32), cv2.COLOR_LAB2RGB), np.float32)
    return to_uint8(out)
