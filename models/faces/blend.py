"""Pasting a crop back into the frame it was aligned from."""

from __future__ import annotations

import math

import cv2
import numpy as np
from facemux.models.errors import InvalidInputError
from numpy.typing import NDArray

from .align import compose_affine, invert_affine
from .detect import check_rgb
from .mask import as_float_mask

__all__ = ["BLEND_MODES", "paste_face", "paste_into", "warp_mask_to_frame"]

BLEND_MODES = ("feather", "seamless")

# Frame pixels of slack around the warped mask's support: bilinear sampling reaches one crop
# pixel (>= 1 frame pixel when pasting bigger) beyond it, plus OpenCV's fixed-point rounding.
_PAD = 2


def _support_roi(
    mask: NDArray[np.float32], inv: NDArray[np.float64], frame_hw: tuple[int, int]
) -> tuple[int, int, int, int] | None:
    ys, xs = np.nonzero(mask > 0)
    if len(xs) == 0:
        return None
    # One crop pixel of margin: the bilinear footprint of the support's edge pixels.
    x0, x1 = float(xs.min()) - 1.0, float(xs.max()) + 1.0
    y0, y1 = float(ys.min()) - 1.0, float(ys.max()) + 1.0
    corners = np.array([[x0, y0], [x1, y0], [x0, y1], [x1, y1]]) @ inv[:, :2].T + inv[:, 2]
    h, w = frame_hw
    fx0 = max(0, math.floor(corners[:, 0].min()) - _PAD)
    fy0 = max(0, math.floor(corners[:, 1].min()) - _PAD)
    fx1 = min(w, math.ceil(corners[:, 0].max()) + _PAD + 1)
    fy1 = min(h, math.ceil(corners[:, 1].max()) + _PAD + 1)
    if fx1 <= fx0 or fy1 <= fy0:
        return None
    return fx0, fy0, fx1, fy1


def warp_mask_to_frame(
    mask_crop: NDArray[np.generic], m: NDArray[np.floating], frame_hw: tuple[int, int]
) -> tuple[tuple[int, int, int, int], NDArray[np.float32]] | None:
    """The crop mask warped into the frame, as (x0, y0, x1, y1) and the mask over that region;
    everywhere else it is 0. None when it does not reach the frame at all."""
    mask = as_float_mask(mask_crop)
    a = np.asarray(m, dtype=np.float64)
    roi = _support_roi(mask, invert_affine(a), frame_hw)
    if roi is None:
        return None
    x0, y0, x1, y1 = roi
    # Region pixel (x, y) is frame pixel (x + x0, y + y0).
    local = compose_affine(a, np.array([[1.0, 0.0, x0], [0.0, 1.0, y0]]))
    warped = cv2.warpAffine(
        mask,
        local,
        (x1 - x0, y1 - y0),
        flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,
        borderMode=cv2.BORDER_CONSTANT,
        borderValue=0.0,
    )
    return roi, np.asarray(warped, dtype=np.float32)


# Poisson cloning costs grow faster than the pixel count; above this side it runs on a
# shrunk copy (see _seamless).
_SEAMLESS_MAX_SIDE = 192


def _seamless(
    face: NDArray[np.uint8], dst: NDArray[np.uint8], alpha: NDArray[np.float32]
) -> NDArray[np.uint8] | None:
    """Poisson (gradient-domain) clone of ``face`` into ``dst`` over the mask's core.

    The clone equals the face plus a harmonic, hence smooth, correction field; for big
    regions that field is solved on a shrunk copy and upsampled (a 600 px face: 70 -> 20 ms,
    and the swapped face has the model's resolution anyway)."""
    h, w = alpha.shape
    f = _SEAMLESS_MAX_SIDE / max(h, w)
    if f >= 1.0:
        return _clone(face, dst, alpha)
    size = (max(3, round(w * f)), max(3, round(h * f)))
    small_face = np.asarray(cv2.resize(face, size, interpolation=cv2.INTER_AREA), np.uint8)
    small_dst = np.asarray(cv2.resize(dst, size, interpolation=cv2.INTER_AREA), np.uint8)
    small_alpha = np.asarray(cv2.resize(alpha, size, interpolation=cv2.INTER_AREA), np.float32)
    small = _clone(small_face, small_dst, small_alpha)
    if small is None:
        return None
    correction = small.astype(np.float32) - small_face.astype(np.float32)
    full = cv2.resize(correction, (w, h), interpolation=cv2.INTER_LINEAR)
    return np.clip(face.astype(np.float32) + full + 0.5, 0.0, 255.0).astype(np.uint8)


def _clone(
    face: NDArray[np.uint8], dst: NDArray[np.uint8], alpha: NDArray[np.float32]
) -> NDArray[np.uint8] | None:
    binary = np.where(alpha >= 0.5, 255, 0).astype(np.uint8)
    # seamlessClone clears the mask's 1-pixel border itself and then places the source's
    # mask bounding box centred on `center`: compute that box the same way so the clone
    # lands exactly where it came from (both images share one coordinate system here).
    binary[0, :] = binary[-1, :] = 0
    binary[:, 0] = binary[:, -1] = 0
    x, y, w, h = cv2.boundingRect(binary)
    if w < 3 or h < 3:
        return None
    center = (x + w // 2, y + h // 2)
    try:
        out = cv2.seamlessClone(face, dst, binary, center, cv2.NORMAL_CLONE)
    except cv2.error:
        return None
    return np.asarray(out, dtype=np.uint8)


def paste_face(
    frame: NDArray[np.uint8],
    face_crop: NDArray[np.uint8],
    mask_crop: NDArray[np.generic],
    m: NDArray[np.floating],
    mode: str = "feather",
) -> NDArray[np.uint8]:
    """A copy of ``frame`` with ``face_crop`` warped back through the frame -> crop matrix
    ``m`` and blended under ``mask_crop`` (float 0..1 or uint8, the crop's size).

    "feather": alpha blend with the (feathered) mask. "seamless": Poisson clone of the face
    (``cv2.seamlessClone``, which matches the surrounding colours and lighting), then the same
    alpha blend onto the original so its edge stays soft; it falls back to feather when the
    clone is impossible (a mask under 3 px across, or OpenCV refusing the region).

    Only the region around the warped mask is touched, and every pixel where the warped
    mask is exactly 0 comes back bit-identical. RGBA frames keep their alpha plane."""
    out = frame.copy()
    paste_into(out, face_crop, mask_crop, m, mode)
    return out


def paste_into(
    out: NDArray[np.uint8],
    face_crop: NDArray[np.uint8],
    mask_crop: NDArray[np.generic],
    m: NDArray[np.floating],
    mode: str = "feather",
) -> None:
    """:func:`paste_face` in place: saves a frame copy per face when pasting several."""
    check_rgb(out)
    if mode not in BLEND_MODES:
        raise InvalidInputError(
            f"unknown blend mode {mode!r}; choose one of {', '.join(BLEND_MODES)}"
        )
    if face_crop.ndim != 3 or face_crop.shape[2] != 3 or face_crop.dtype != np.uint8:
        raise InvalidInputError(f"face crop must be (H, W, 3) uint8, got {face_crop.shape}")
    mask = as_float_mask(mask_crop)
    if mask.shape != face_crop.shape[:2]:
        size = (face_crop.shape[1], face_crop.shape[0])
        mask = np.asarray(cv2.resize(mask, size, interpolation=cv2.INTER_LINEAR), np.float32)
    warped = warp_mask_to_frame(mask, m, out.shape[:2])
    if warped is None:
        return
    (x0, y0, x1, y1), alpha = warped
    local = compose_affine(np.asarray(m, np.float64), np.array([[1.0, 0.0, x0], [0.0, 1.0, y0]]))
    face = np.asarray(
        cv2.warpAffine(
            face_crop,
            local,
            (x1 - x0, y1 - y0),
            flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,
            borderMode=cv2.BORDER_REPLICATE,
        ),
        np.uint8,
    )
    dst = np.ascontiguousarray(out[y0:y1, x0:x1, :3])
    if mode == "seamless":
        cloned = _seamless(face, dst, alpha)
        if cloned is not None:
            face = cloned
    result = cv2.blendLinear(dst, face, 1.0 - alpha, alpha)
    # Weights (1, 0) already give back dst; copying only where alpha > 0 makes it a guarantee.
    np.copyto(out[y0:y1, x0:x1, :3], result, where=(alpha > 0)[..., None])
