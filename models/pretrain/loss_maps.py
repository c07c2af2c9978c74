"""Per-face maps the reconstruction loss is weighed by: where the face is (loss masks) and
which of its parts count more (emphasis), from each face's landmarks when its dataset kept
them, else from the aligned-face template."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from ..faces.align import template_landmarks, umeyama
from ..faces.mask import landmark_mask, template_mask
from ..losses import landmark_weight_map
from ..pixels import to_uint8

__all__ = ["face_emphasis", "face_loss_masks", "points", "template_loss_masks"]


def points(landmarks: list[Any] | None, i: int, count: int) -> np.ndarray | None:
    """Face i's landmarks as a finite (count, 2) array, else None."""
    lm = None if landmarks is None or i >= len(landmarks) else landmarks[i]
    pts = None if lm is None else np.asarray(lm, dtype=np.float64)
    if pts is None or pts.shape != (count, 2) or not np.isfinite(pts).all():
        return None
    return pts


def template_loss_masks(n: int, size: int) -> torch.Tensor:
    """(n, size, size) uint8: the template's ellipse for every face (one shared copy)."""
    template = torch.from_numpy(to_uint8(template_mask(size)))
    return template.expand(n, -1, -1)


def face_loss_masks(landmarks: list[Any] | None, n: int, size: int) -> torch.Tensor:
    """(n, size, size) uint8 loss masks: each face's outline from its 68 points (the jaw and
    the brows raised onto the forehead), or the template's ellipse for a face without them
    (5 points place the template where it already is: alignment used them)."""
    template = to_uint8(template_mask(size))
    out = np.empty((n, size, size), dtype=np.uint8)
    for i in range(n):
        pts = points(landmarks, i, 68)
        out[i] = template if pts is None else to_uint8(landmark_mask(pts, size))
    return torch.from_numpy(out)


def face_emphasis(landmarks: list[Any] | None, n: int, size: int) -> torch.Tensor:
    """(n, size, size) loss weights, eyes 3 and mouth 2 over 1: from each face's 68 points,
    or the template's 68 fitted to its 5 points (dlib's 5 have no mouth), or, for a face
    without landmarks, the template itself (an aligned crop puts the features there).
    ``landmarks`` are in pixels of the ``size`` crops."""
    tmpl68 = template_landmarks(size, 68).astype(np.float64)
    tmpl5 = template_landmarks(size, 5).astype(np.float64)
    faces68 = []
    for i in range(n):
        pts68, pts5 = points(landmarks, i, 68), points(landmarks, i, 5)
        if pts68 is not None:
            faces68.append(pts68)
        elif pts5 is not None:
            m = umeyama(tmpl5, pts5)
            faces68.append(tmpl68 @ m[:, :2].T + m[:, 2])
        else:
            faces68.append(tmpl68)
    return landmark_weight_map(np.stack(faces68), size)[:, 0]
