"""Alignment: the mean-face template, similarity fits, aligned crops and their inverse.

The template (:mod:`facemux.models.face_template`) is the mean face of the crops a model is
trained on, in *unit crop coordinates* (0..1 across the crop; pixel ``i`` of a ``size`` crop
has its centre at ``u = (i + 0.5) / size``). Aligning a frame face onto it therefore frames
the face the way the training crops are framed. Functions that place faces take the model's
own template (``face_template``, from its encoder checkpoint); without one they use the
default every model so far was trained with.

Matrices are OpenCV 2x3 affines acting on pixel coordinates (pixel centres at integers).
"""

from __future__ import annotations

import math

import cv2
import numpy as np
from facemux.models.errors import InvalidInputError
from facemux.models.face_template import default_template, points_of
from numpy.typing import ArrayLike, NDArray

__all__ = [
    "ALIGN_POINTS_68",
    "align_matrix",
    "box_from_landmarks",
    "compose_affine",
    "crop_landmarks",
    "crop_scale",
    "invert_affine",
    "template",
    "template_landmarks",
    "umeyama",
    "warp_crop",
]

F32 = NDArray[np.float32]
F64 = NDArray[np.float64]

# With 68 points the fit ignores the jaw (0-16): its shape varies most between people and
# with the mouth opening, while brows, eyes, nose and mouth pin down position, scale and roll.
ALIGN_POINTS_68: tuple[int, ...] = tuple(range(17, 68))

# The box dlib's HOG detector draws around a face, in template (unit crop) coordinates: the
# shape predictors were trained on such boxes, and tracking re-predicts inside boxes built
# from landmarks, so they must look alike. Measured: (0.5, 0.555) side 0.58 on skimage's
# astronaut, (0.51, 0.52) side 0.69 on synthetic faces; the compromise below predicts the
# astronaut's landmarks within 0.5 px of its detector box and synth's best.
_DLIB_BOX_CENTER = (0.5, 0.53)
_DLIB_BOX_SIDE = 0.62


def template(points: int = 68, face_template: ArrayLike | None = None) -> F64:
    """The mean face in unit crop coordinates: (68, 2), or (5, 2) in dlib's 5-point order.
    ``face_template``: a model's (68, 2) template; None, the default."""
    base = default_template() if face_template is None else np.asarray(face_template, np.float64)
    return points_of(base, points)


def _unit_to_crop(size: int, coverage: float, y_offset: float) -> F64:
    """Affine from template unit coordinates to pixels of the requested crop."""
    if not (math.isfinite(coverage) and 0.1 <= coverage <= 4.0):
        raise InvalidInputError(f"coverage must be in [0.1, 4], got {coverage!r}")
    if not (math.isfinite(y_offset) and abs(y_offset) <= 0.5):
        raise InvalidInputError(f"y_offset must be in [-0.5, 0.5], got {y_offset!r}")
    if size < 8:
        raise InvalidInputError(f"crop size must be at least 8 px, got {size}")
    k = size / coverage
    # u -> ((u - (0.5, 0.5 + y_offset)) / coverage + 0.5) * size - 0.5
    return np.array(
        [[k, 0.0, size * 0.5 - 0.5 - 0.5 * k], [0.0, k, size * 0.5 - 0.5 - (0.5 + y_offset) * k]]
    )


def template_landmarks(
    size: int,
    points: int = 68,
    coverage: float = 1.0,
    y_offset: float = 0.0,
    face_template: ArrayLike | None = None,
) -> F32:
    """The template in pixel coordinates of a ``size`` crop with the given framing."""
    a = _unit_to_crop(size, coverage, y_offset)
    return (template(points, face_template) @ a[:, :2].T + a[:, 2]).astype(np.float32)


def umeyama(src: NDArray[np.floating], dst: NDArray[np.floating]) -> F64:
    """Least-squares similarity (rotation, uniform scale, translation; no reflection) taking
    ``src`` (n, 2) onto ``dst`` (n, 2), as a 2x3 matrix. Umeyama (1991)."""
    s = np.asarray(src, dtype=np.float64)
    d = np.asarray(dst, dtype=np.float64)
    if s.shape != d.shape or s.ndim != 2 or s.shape[1] != 2 or s.shape[0] < 2:
        raise InvalidInputError(f"umeyama needs two (n>=2, 2) point sets, got {s.shape}, {d.shape}")
    mu_s, mu_d = s.mean(axis=0), d.mean(axis=0)
    sc, dc = s - mu_s, d - mu_d
    var_s = float((sc * sc).sum()) / len(s)
    if var_s <= 1e-12:
        raise InvalidInputError("landmarks are degenerate (all points coincide)")
    cov = dc.T @ sc / len(s)
    u, sig, vt = np.linalg.svd(cov)
    # Flip the weakest axis when the best orthogonal map would be a reflection.
    e = np.array([1.0, -1.0 if np.linalg.det(u) * np.linalg.det(vt) < 0 else 1.0])
    rot = u @ np.diag(e) @ vt
    scale = float((sig * e).sum()) / var_s
    t = mu_d - scale * rot @ mu_s
    return np.hstack([scale * rot, t[:, None]])


def _fit_points(
    landmarks: NDArray[np.floating], face_template: ArrayLike | None = None
) -> tuple[F64, F64]:
    lm = np.asarray(landmarks, dtype=np.float64)
    if lm.ndim != 2 or lm.shape[1] != 2 or lm.shape[0] not in (5, 68):
        raise InvalidInputError(f"landmarks must be (5, 2) or (68, 2), got {lm.shape}")
    tmpl = template(lm.shape[0], face_template)
    if lm.shape[0] == 68:
        idx = list(ALIGN_POINTS_68)
        return lm[idx], tmpl[idx]
    return lm, tmpl


def align_matrix(
    landmarks: NDArray[np.floating],
    size: int,
    coverage: float = 1.0,
    y_offset: float = 0.0,
    face_template: ArrayLike | None = None,
) -> F64:
    """2x3 frame -> crop matrix that puts ``landmarks`` (5 or 68 points, frame pixels) onto the
    template in a ``size`` x ``size`` crop.

    ``coverage`` is the fraction of the template's extent the crop shows: 1.0 reproduces the
    synthetic training crops, < 1 zooms in (less forehead and background), > 1 zooms out.
    ``y_offset`` moves the crop window down by that fraction of the template's height
    (the face moves up in the crop), as faceswap's vertical centering does.
    ``face_template``: the model's mean face (see :func:`template`)."""
    src, tmpl = _fit_points(landmarks, face_template)
    a = _unit_to_crop(size, coverage, y_offset)
    return umeyama(src, tmpl @ a[:, :2].T + a[:, 2])


def invert_affine(m: NDArray[np.floating]) -> F64:
    return np.asarray(cv2.invertAffineTransform(np.asarray(m, dtype=np.float64)), np.float64)


def compose_affine(a: NDArray[np.floating], b: NDArray[np.floating]) -> F64:
    """The 2x3 affine applying ``b`` first, then ``a``."""
    a64, b64 = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return np.hstack([a64[:, :2] @ b64[:, :2], (a64[:, :2] @ b64[:, 2] + a64[:, 2])[:, None]])


def crop_scale(m: NDArray[np.floating]) -> float:
    """Crop pixels per frame pixel of a (similarity) frame -> crop matrix."""
    return math.sqrt(abs(float(np.linalg.det(np.asarray(m, dtype=np.float64)[:, :2]))))


def crop_landmarks(landmarks: NDArray[np.floating], m: NDArray[np.floating]) -> F32:
    """Frame landmarks (n, 2) mapped through ``m`` into crop pixels."""
    lm = np.asarray(landmarks, dtype=np.float64)
    a = np.asarray(m, dtype=np.float64)
    return (lm @ a[:, :2].T + a[:, 2]).astype(np.float32)


def warp_crop(rgb: NDArray[np.uint8], m: NDArray[np.floating], size: int) -> NDArray[np.uint8]:
    """The aligned ``size`` x ``size`` crop of ``rgb`` under the frame -> crop matrix ``m``.

    A face usually spans many more frame pixels than crop pixels; a bilinear warp would then
    alias (moire on hair and fabric), so the region is first shrunk with an area filter to
    about twice the crop's resolution and only the rest is done by the bilinear warp."""
    a = np.asarray(m, dtype=np.float64)
    scale = crop_scale(a)
    h, w = rgb.shape[:2]
    if scale < 0.5:
        inv = invert_affine(a)
        corners = np.array([[-1.0, -1.0], [size, -1.0], [-1.0, size], [size, size]])
        pts = corners @ inv[:, :2].T + inv[:, 2]
        x0 = max(0, math.floor(pts[:, 0].min()) - 1)
        y0 = max(0, math.floor(pts[:, 1].min()) - 1)
        x1 = min(w, math.ceil(pts[:, 0].max()) + 2)
        y1 = min(h, math.ceil(pts[:, 1].max()) + 2)
        if x1 - x0 >= 2 and y1 - y0 >= 2:
            f = 2.0 * scale
            rw, rh = max(1, round((x1 - x0) * f)), max(1, round((y1 - y0) * f))
            small = np.asarray(
                cv2.resize(rgb[y0:y1, x0:x1], (rw, rh), interpolation=cv2.INTER_AREA), np.uint8
            )
            fx, fy = rw / (x1 - x0), rh / (y1 - y0)
            # Small pixel j covers region pixels around (j + 0.5) / f - 0.5 (+ x0 in the frame).
            to_frame = np.array(
                [[1.0 / fx, 0.0, 0.5 / fx - 0.5 + x0], [0.0, 1.0 / fy, 0.5 / fy - 0.5 + y0]]
            )
            a = compose_affine(a, to_frame)
            rgb = small
    out = cv2.warpAffine(
        np.asarray(rgb), a, (size, size), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE
    )
    return np.asarray(out, dtype=np.uint8)


def box_from_landmarks(landmarks: NDArray[np.floating]) -> F32:
    """A dlib-detector-like square box (x0, y0, x1, y1) around a face given its landmarks;
    what the shape predictors expect when they re-predict a tracked face."""
    src, tmpl = _fit_points(landmarks)
    to_frame = umeyama(tmpl, src)
    centre = to_frame[:, :2] @ np.array(_DLIB_BOX_CENTER) + to_frame[:, 2]
    half = 0.5 * _DLIB_BOX_SIDE * crop_scale(to_frame)
    return np.array(
        [centre[0] - half, centre[1] - half, centre[0] + half, centre[1] + half], dtype=np.float32
    )
