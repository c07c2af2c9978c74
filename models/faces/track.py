"""Faces through a video: detect every N frames, track landmarks in between, smooth them.

Detection is the expensive step (tens of ms on CPU); re-predicting landmarks inside the box
where the face was costs well under a millisecond. Landmark predictors are noisy from frame
to frame (dlib's points are whole pixels, and any box change moves them), which makes aligned
crops, and so swapped faces, jitter: :class:`LandmarkFilter` smooths them hard while the face
is still or moves steadily, and lets go when the motion changes.

On a synthetic clip of a face panning 6 px/frame, the second difference of the landmarks
(jitter) drops from 1.3 px to 0.6 px with the defaults, and the error against the true
motion does not grow (a plain low-pass as smooth would trail by ~3 px).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from facemux.models.errors import InvalidInputError
from numpy.typing import NDArray

from .align import align_matrix, box_from_landmarks, compose_affine, crop_scale, warp_crop
from .detect import DetectedFace, Detector, box_area, box_iou, check_rgb
from .frame import DeviceFrame
from .landmarks import Landmarker

__all__ = ["FaceTracker", "LandmarkFilter", "Relocate"]

F32 = NDArray[np.float32]
F64 = NDArray[np.float64]
U8 = NDArray[np.uint8]
# Faces found again on the device near their boxes (see BlazeFaceDetector.relocate): the
# frame (3, H, W) uint8 on its device and the boxes in, 5 landmarks or None per box out.
Relocate = Callable[[torch.Tensor, Sequence[NDArray[np.floating]]], list[F32 | None]]
_GRAY = (0.299, 0.587, 0.114)

# Side of the gray crops compared to tell "still the same face" from "lost it".
_REF_SIZE = 32


def _alpha(cutoff: float) -> float:
    # Gain of a first-order low-pass at `cutoff` cycles per frame (dt = 1 frame).
    return 1.0 / (1.0 + 1.0 / (2.0 * math.pi * cutoff))


class LandmarkFilter:
    """Motion-adaptive alpha-beta (constant-velocity) filter over a set of 2D points.

    Each frame predicts ``x + v`` and corrects by the innovation (measurement minus
    prediction) with gain ``alpha`` (and ``alpha**2 / (2 - alpha)`` for the velocity, the
    Benedict-Bordner pairing). A face moving steadily is followed without lag, unlike a plain
    low-pass. The gain adapts as in the One-Euro filter (Casiez et al., CHI 2012): its cutoff
    grows by ``beta`` per unit of RMS innovation in face sizes, so noise is smoothed hard
    while a sudden start, stop or cut is followed within a frame or two. One gain for all
    points keeps the face's shape coherent.

    ``smoothing`` in (0, 1) is ``1 - alpha`` when nothing surprising happens."""

    def __init__(self, smoothing: float = 0.7, beta: float = 10.0) -> None:
        if not (0.0 < smoothing < 1.0):
            raise InvalidInputError(f"smoothing must be in (0, 1), got {smoothing!r}")
        rest = 1.0 - smoothing
        self.min_cutoff = rest / (2.0 * math.pi * smoothing)
        self.beta = beta
        self._x: F64 | None = None
        self._v: F64 | None = None
        self._n = 0

    def reset(self) -> None:
        self._x = self._v = None
        self._n = 0

    def __call__(self, points: NDArray[np.floating], scale: float) -> F64:
        """Filter one frame's points (n, 2); ``scale`` is the face size in pixels."""
        z = np.asarray(points, dtype=np.float64)
        if self._x is None or self._v is None or self._x.shape != z.shape:
            self._x, self._v, self._n = z.copy(), np.zeros_like(z), 1
            return z.copy()
        pred = self._x + self._v
        innovation = z - pred
        rms = math.sqrt(float(np.square(innovation).sum(axis=-1).mean())) / max(scale, 1e-6)
        a = _alpha(self.min_cutoff + self.beta * rms)
        # The second frame is the first chance to measure velocity: take it whole.
        b = 1.0 if self._n == 1 else a * a / (2.0 - a)
        self._x = pred + a * innovation
        self._v = self._v + b * innovation
        self._n += 1
        return self._x.copy()


@dataclass
class _Track:
    track_id: int
    raw: F32  # last unsmoothed landmarks: the next frame's box is built from these
    prev_raw: F32 | None
    smoothed: F32
    confidence: float
    # Normalised gray crop of the face when a detection last confirmed it (a device tensor
    # when the frames are on a device).
    reference: F32 | torch.Tensor
    filter: LandmarkFilter | None
    misses: int = 0


def _face_size(landmarks: NDArray[np.floating]) -> float:
    box = box_from_landmarks(landmarks)
    return float(box[2] - box[0])


def _appearance(rgb: NDArray[np.uint8], landmarks: NDArray[np.floating]) -> F32:
    crop = warp_crop(rgb, align_matrix(landmarks, _REF_SIZE), _REF_SIZE)
    gray = crop.astype(np.float32) @ np.array(_GRAY, dtype=np.float32)
    gray -= gray.mean()
    norm = float(np.linalg.norm(gray))
    return gray / norm if norm > 1e-3 else np.zeros_like(gray)


def _appearance_t(frame: torch.Tensor, landmarks: NDArray[np.floating]) -> torch.Tensor:
    """`_appearance` from a (3, H, W) uint8 frame on its device, computed there: only the
    face's neighbourhood is converted, sampled at about half the frame's resolution and
    averaged down to the crop (as `warp_crop` shrinks with an area filter before its warp)."""
    from .tensor import warp_crop_t

    m = align_matrix(landmarks, _REF_SIZE)
    k = max(1, min(8, math.ceil(0.5 / max(crop_scale(m), 1e-6))))
    big = compose_affine(np.array([[k, 0.0, 0.5 * k - 0.5], [0.0, k, 0.5 * k - 0.5]]), m)
    inv = np.linalg.inv(np.vstack([big, [0.0, 0.0, 1.0]]))
    side = _REF_SIZE * k
    corners = np.array([[-1.0, -1.0, 1], [side, -1.0, 1], [-1.0, side, 1], [side, side, 1]])
    pts = corners @ inv[:2].T
    h, w = int(frame.shape[1]), int(frame.shape[2])
    x0, y0 = max(0, math.floor(pts[:, 0].min()) - 1), max(0, math.floor(pts[:, 1].min()) - 1)
    x1, y1 = min(w, math.ceil(pts[:, 0].max()) + 2), min(h, math.ceil(pts[:, 1].max()) + 2)
    if x1 <= x0 or y1 <= y0:
        return torch.zeros(_REF_SIZE * _REF_SIZE, device=frame.device)
    sub = frame[:, y0:y1, x0:x1].float()
    shifted = compose_affine(big, np.array([[1.0, 0.0, x0], [0.0, 1.0, y0]]))
    crop = warp_crop_t(sub, shifted, side)
    if k > 1:
        crop = F.avg_pool2d(crop[None], k)[0]
    gray = torch.einsum("c,chw->hw", torch.tensor(_GRAY, device=crop.device), crop).flatten()
    gray = gray - gray.mean()
    norm = gray.norm()
    return torch.where(norm > 1e-3, gray / norm.clamp_min(1e-3), torch.zeros_like(gray))


def _similarity(a: F32 | torch.Tensor, b: F32 | torch.Tensor) -> float:
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        return float((a * b).sum())
    return float((np.asarray(a) * np.asarray(b)).sum())


class FaceTracker:
    """Per-frame faces of a video (one tracker per stream; not thread-safe).

    Detection runs on frames 0, N, 2N, ... (``detect_every`` = N). In between, each face is
    re-predicted inside its previous box moved by its last motion, and kept only while its
    aligned crop still correlates with how it looked when last detected
    (``min_similarity``), so a cut or a face leaving the frame ends its track. On detection
    frames tracks are matched to detections by IoU; unmatched detections start tracks,
    tracks without a detection survive ``max_misses`` detection rounds.

    ``smoothing`` in [0, 1): 0 passes the landmarks through; otherwise the landmarks go
    through a :class:`LandmarkFilter` (constant-velocity, motion-adaptive by ``beta``).

    ``track(frame)`` returns faces with (smoothed) landmarks and a ``track_id``, largest
    first.

    ``frame`` may be a :class:`DeviceFrame`. With ``relocate`` (BlazeFace's own landmarks:
    :meth:`BlazeFaceDetector.relocate`) such a frame is tracked on its device: a detector
    that takes device frames detects it there, faces are found again between detections by
    the network looking near their predicted boxes, not by ``landmarker``, and the
    appearance check is computed there too, so only boxes and landmarks reach the host.
    Without it (HOG, or dlib's landmark models asked for) its host pixels are read."""

    def __init__(
        self,
        detector: Detector,
        landmarker: Landmarker,
        detect_every: int = 5,
        smoothing: float = 0.7,
        beta: float = 10.0,
        iou_threshold: float = 0.3,
        max_misses: int = 1,
        min_similarity: float = 0.5,
        relocate: Relocate | None = None,
    ) -> None:
        if int(detect_every) < 1:
            raise InvalidInputError(f"detect_every must be >= 1, got {detect_every!r}")
        if not (0.0 <= smoothing < 1.0):
            raise InvalidInputError(f"smoothing must be in [0, 1), got {smoothing!r}")
        if not (beta >= 0.0 and math.isfinite(beta)):
            raise InvalidInputError(f"beta must be finite and >= 0, got {beta!r}")
        self.detector = detector
        self.landmarker = landmarker
        self.detect_every = int(detect_every)
        self.smoothing = float(smoothing)
        self.beta = float(beta)
        self.iou_threshold = float(iou_threshold)
        self.max_misses = int(max_misses)
        self.min_similarity = float(min_similarity)
        self.relocate = relocate
        self.frame_index = 0
        self._tracks: list[_Track] = []
        self._next_id = 0

    def reset(self) -> None:
        self.frame_index = 0
        self._tracks = []

    def _new_filter(self) -> LandmarkFilter | None:
        if self.smoothing <= 0.0:
            return None
        return LandmarkFilter(self.smoothing, self.beta)

    def _on_device(self, frame: U8 | DeviceFrame) -> bool:
        return isinstance(frame, DeviceFrame) and self.relocate is not None

    @staticmethod
    def _host(frame: U8 | DeviceFrame) -> U8:
        return frame.rgb if isinstance(frame, DeviceFrame) else frame

    def _detect(self, frame: U8 | DeviceFrame) -> list[DetectedFace]:
        if isinstance(frame, DeviceFrame) and getattr(
            self.detector, "accepts_device_frames", False
        ):
            device_detector: Any = self.detector  # beyond the Detector protocol
            found: list[DetectedFace] = device_detector.detect(frame.tensor)
            return found
        return self.detector.detect(self._host(frame))

    def _locate(self, frame: U8 | DeviceFrame, boxes: Sequence[F32]) -> list[F32 | None]:
        """Each face's landmarks re-predicted inside its box: on the device in one pass, or
        by the landmark model on the host, one box at a time."""
        if not boxes:
            return []
        if self.relocate is not None and isinstance(frame, DeviceFrame):
            return self.relocate(frame.tensor, boxes)
        rgb = self._host(frame)
        return [self.landmarker.predict(rgb, b) for b in boxes]

    def _appearance(self, frame: U8 | DeviceFrame, lm: F32) -> F32 | torch.Tensor:
        if self._on_device(frame):
            assert isinstance(frame, DeviceFrame)
            return _appearance_t(frame.tensor, lm)
        return _appearance(self._host(frame), lm)

    def _start(self, frame: U8 | DeviceFrame, face: DetectedFace) -> None:
        lm = face.landmarks
        if lm is None:
            lm = self.landmarker.predict(self._host(frame), face.box)
        filt = self._new_filter()
        smoothed = lm if filt is None else filt(lm, _face_size(lm)).astype(np.float32)
        reference = self._appearance(frame, lm)
        self._tracks.append(
            _Track(self._next_id, lm, None, smoothed, face.confidence, reference, filt)
        )
        self._next_id += 1

    def _predicted_box(self, t: _Track) -> F32:
        box = box_from_landmarks(t.raw)
        if t.prev_raw is not None:
            shift = t.raw.mean(axis=0) - t.prev_raw.mean(axis=0)
            box = box + np.tile(shift, 2).astype(np.float32)
        return box

    def _advance_all(
        self, frame: U8 | DeviceFrame, moves: list[tuple[_Track, F32, bool]]
    ) -> list[bool]:
        """Re-predict each track inside its box (``confirmed``: a detection matched it);
        False where the face is lost. All boxes are located together."""
        found = self._locate(frame, [box for _, box, _ in moves])
        return [
            self._advance(frame, t, lm, confirmed)
            for (t, _, confirmed), lm in zip(moves, found, strict=True)
        ]

    def _advance(self, frame: U8 | DeviceFrame, t: _Track, lm: F32 | None, confirmed: bool) -> bool:
        if lm is None:
            return False  # no face near where it was (device relocation)
        size = _face_size(lm)
        old = _face_size(t.raw)
        if not (0.5 < size / old < 2.0):
            return False  # the predictor collapsed or exploded: not a face any more
        if confirmed:
            t.reference = self._appearance(frame, lm)
        elif _similarity(t.reference, self._appearance(frame, lm)) < self.min_similarity:
            return False
        h, w = frame.shape[:2]
        cx, cy = lm.mean(axis=0)
        if not (0 <= cx < w and 0 <= cy < h):
            return False
        t.prev_raw, t.raw = t.raw, lm
        t.smoothed = lm if t.filter is None else t.filter(lm, size).astype(np.float32)
        return True

    def track(self, frame: U8 | DeviceFrame) -> list[DetectedFace]:
        if not isinstance(frame, DeviceFrame):
            check_rgb(frame)
            frame = frame if frame.shape[2] == 3 else np.ascontiguousarray(frame[..., :3])
        detecting = self.frame_index % self.detect_every == 0
        self.frame_index += 1
        boxes = [self._predicted_box(t) for t in self._tracks]
        kept: list[_Track] = []
        if detecting:
            detections = self._detect(frame)
            pairs = sorted(
                (
                    (box_iou(boxes[i], d.box), i, j)
                    for i in range(len(self._tracks))
                    for j, d in enumerate(detections)
                ),
                reverse=True,
            )
            used_t: set[int] = set()
            used_d: set[int] = set()
            moves: list[tuple[_Track, F32, bool]] = []
            confidences: list[float] = []
            for iou, i, j in pairs:
                if iou < self.iou_threshold or i in used_t or j in used_d:
                    continue
                used_t.add(i)
                used_d.add(j)
                # Re-predicting in the tracked box, not the detector's, keeps the landmarks
                # consistent across the detection frame; a detection far off wins.
                box = boxes[i] if iou >= 0.5 else detections[j].box
                moves.append((self._tracks[i], box, True))
                confidences.append(detections[j].confidence)
            for i, t in enumerate(self._tracks):
                if i in used_t:
                    continue
                t.misses += 1
                if t.misses <= self.max_misses:
                    moves.append((t, boxes[i], False))
            for k, ok in enumerate(self._advance_all(frame, moves)):
                t, _, confirmed = moves[k]
                if ok and confirmed:
                    t.misses, t.confidence = 0, confidences[k]
                if ok:
                    kept.append(t)
            self._tracks = kept
            for j, d in enumerate(detections):
                if j not in used_d:
                    self._start(frame, d)
        else:
            moves = [(t, boxes[i], False) for i, t in enumerate(self._tracks)]
            advanced = self._advance_all(frame, moves)
            self._tracks = [t for (t, _, _), ok in zip(moves, advanced, strict=True) if ok]
        out = [
            DetectedFace(
                box=box_from_landmarks(t.smoothed),
                confidence=t.confidence,
                landmarks=t.smoothed.copy(),
                track_id=t.track_id,
            )
            for t in self._tracks
        ]
        return sorted(out, key=lambda f: box_area(f.box), reverse=True)
