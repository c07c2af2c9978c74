"""Face masks in crop space: from landmarks, from the template, and their refinement.

Masks are float32 (H, W) in [0, 1]. A decoder's own mask, when it has one, is better than
either: it knows where it drew a face.
"""

from __future__ import annotations

import math

import cv2
import numpy as np
from facemux.models.errors import InvalidInputError
from facemux.models.pixels import to_unit
from numpy.typing import ArrayLike, NDArray

from .align import template_landmarks

__all__ = ["as_float_mask", "landmark_mask", "refine_mask", "template_mask"]

F32 = NDArray[np.float32]

# How far the brows are pushed up to take in the forehead, as a fraction of the distance from
# the brows to the chin. 0.3 matches synth's face mask (hairline excluded) best (IoU ~0.9).
_FOREHEAD = 0.3


def as_float_mask(mask: NDArray[np.generic]) -> F32:
    """uint8 0..255 or float 0..1, (H, W) or (H, W, 1) -> float32 (H, W) in [0, 1]."""
    m = np.asarray(mask)
    if m.ndim == 3 and m.shape[2] == 1:
        m = m[..., 0]
    if m.ndim != 2:
        raise InvalidInputError(f"mask must be (H, W) or (H, W, 1), got {m.shape}")
    if m.dtype == np.uint8:
        return to_unit(m)
    return np.clip(np.nan_to_num(m.astype(np.float32)), 0.0, 1.0)


def _face_outline(lm68: NDArray[np.floating]) -> NDArray[np.float64]:
    lm = np.asarray(lm68, dtype=np.float64)
    jaw, brows = lm[0:17], lm[17:27]
    up = brows.mean(axis=0) - lm[8]
    raised = brows + _FOREHEAD * up
    return np.concatenate([jaw, raised])


def landmark_mask(landmarks68_crop: NDArray[np.floating], size: int) -> F32:
    """The convex hull of the jaw line and the brows raised onto the forehead (68 points, crop
    pixels) filled in a ``size`` x ``size`` mask."""
    lm = np.asarray(landmarks68_crop, dtype=np.float64)
    if lm.shape != (68, 2) or not np.all(np.isfinite(lm)):
        raise InvalidInputError(f"landmark_mask needs finite (68, 2) landmarks, got {lm.shape}")
    hull = cv2.convexHull(np.round(_face_outline(lm) * 16).astype(np.int32))
    mask = np.zeros((size, size), dtype=np.uint8)
    # 4 fractional bits: the outline lands where the landmarks say, not on whole pixels.
    cv2.fillConvexPoly(mask, hull, 255, cv2.LINE_AA, 4)
    return to_unit(mask)


def template_mask(
    size: int,
    coverage: float = 1.0,
    y_offset: float = 0.0,
    face_template: ArrayLike | None = None,
) -> F32:
    """An ellipse around the mean face's outline (the model's ``face_template``, else the
    default), for faces with only 5 landmarks."""
    lm = template_landmarks(size, 68, coverage, y_offset, face_template)
    pts = _face_outline(lm).astype(np.float32)
    (cx, cy), (w, h), angle = cv2.fitEllipse(pts)
    mask = np.zeros((size, size), dtype=np.uint8)
    cv2.ellipse(
        mask,
        (round(cx * 16), round(cy * 16)),
        (round(w * 8), round(h * 8)),
        angle,
        0.0,
        360.0,
        255,
        -1,
        cv2.LINE_AA,
        4,
    )
    return to_unit(mask)


def refine_mask(mask: NDArray[np.generic], erosion: float = 0.02, blur: float = 0.05) -> F32:
    """Erode (``erosion`` > 0) or dilate (< 0) by that fraction of the crop size, then
    feather with a Gaussian whose width (about 2 sigma) is ``blur`` times the crop size.

    The result also fades to 0 over the feather width at the crop's edges: a mask reaching
    the edge would otherwise cut a hard seam into the frame where the crop ends."""
    m = as_float_mask(mask)
    if not (math.isfinite(erosion) and abs(erosion) <= 0.5):
        raise InvalidInputError(f"mask erosion must be in [-0.5, 0.5], got {erosion!r}")
    if not (math.isfinite(blur) and 0.0 <= blur <= 0.5):
        raise InvalidInputError(f"mask blur must be in [0, 0.5], got {blur!r}")
    size = max(m.shape)
    radius = round(abs(erosion) * size)
    if radius > 0:
        kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * radius + 1, 2 * radius + 1))
        op = cv2.erode if erosion > 0 else cv2.dilate
        m = np.asarray(op(m, kernel, borderType=cv2.BORDER_CONSTANT, borderValue=0), np.float32)
    width = blur * size
    if width >= 0.5:
        sigma = width / 2.0
        k = 2 * math.ceil(3.0 * sigma) + 1
        # Zero beyond the edge so the blur pulls the mask down there, not up.
        m = np.asarray(
            cv2.GaussianBlur(m, (k, k), sigma, borderType=cv2.BORDER_CONSTANT), np.float32
        )
    edge = max(1.0, width)
    h, w = m.shape
    ramp_y = np.clip((np.minimum(np.arange(h), h - 1 - np.arange(h)) + 0.5) / edge, 0.0, 1.0)
    ramp_x = np.clip((np.minimum(np.arange(w), w - 1 - np.arange(w)) + 0.5) / edge, 0.0, 1.0)
    m = m * ramp_y[:, None].astype(np.float32) * ramp_x[None, :].astype(np.float32)
    return np.asarray(np.clip(m, 0.0, 1.0), dtype=np.float32)
