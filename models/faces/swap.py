"""One frame through the whole pipeline: find faces, align, run the model, paste back."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import cv2
import numpy as np
import torch
from facemux.models.errors import InvalidInputError
from facemux.models.pixels import to_unit
from numpy.typing import NDArray

from .align import align_matrix, box_from_landmarks, compose_affine, crop_landmarks, warp_crop
from .blend import BLEND_MODES, paste_into
from .colour import COLOUR_METHODS, correct_colour
from .detect import DetectedFace, Detector, box_area, check_rgb
from .frame import DeviceFrame
from .landmarks import Landmarker
from .mask import as_float_mask, landmark_mask, refine_mask, template_mask

__all__ = [
    "MASK_SOURCES",
    "SELECT_MODES",
    "SKIP_NOT_SELECTED",
    "SKIP_OVER_LIMIT",
    "STAGES",
    "FaceResult",
    "FaceSwapper",
    "SwapCrops",
    "SwapCropsT",
    "SwapOptions",
    "SwapResult",
    "swap_frame",
]

F32 = NDArray[np.float32]
U8 = NDArray[np.uint8]
P = TypeVar("P")  # a face's pixels: a uint8 array on the OpenCV path, a tensor on the other

# The model: aligned crops in, swapped crops (and, if its decoder has a mask head, masks)
# out, in the same order. The service batches the list into one forward pass.
SwapCrops = Callable[[list[U8]], tuple[Sequence[U8], Sequence[NDArray[Any]] | None]]
# The same model on the device, tensor in and tensor out: the aligned crops (N, 3, S, S)
# uint8 on the frame's device; the swapped faces (N, 3, R, R) uint8 and the masks (N, R, R)
# uint8 or None, on that device. The tensor path's crops then never visit the host.
SwapCropsT = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor | None]]

STAGES = ("detect", "landmarks", "align", "model", "mask_colour", "blend")
SELECT_MODES = ("all", "largest")
MASK_SOURCES = ("auto", "landmarks", "template")
SKIP_NOT_SELECTED = "not_selected"
SKIP_OVER_LIMIT = "over_limit"
MAX_CALLER_FACES = 256


@dataclass
class SwapOptions:
    """How to swap one frame.

    Selection: ``select`` "all" or "largest" face; ``indices`` picks faces by position
    instead (detected faces are ordered largest first, caller-supplied ones keep the
    caller's order; indices past the end select nothing). ``max_faces`` > 0 then swaps only
    the largest N selected faces and reports the rest as skipped "over_limit".

    Look: ``colour`` (none/average/reinhard), ``blend`` (feather/seamless), ``mask``
    ("auto": the decoder's mask if it predicts one, else from 68 landmarks, else the
    template ellipse), ``mask_erosion`` and ``mask_blur`` as fractions of the crop size
    (see refine_mask), and the crop framing ``coverage``/``y_offset`` (see align_matrix),
    which must match what the model was trained on, as must ``face_template``, the mean face
    its training crops were aligned to (from its encoder checkpoint; None: the default).
    ``crop_size`` is the side of the crops handed to the model."""

    select: str = "all"
    indices: Sequence[int] | None = None
    max_faces: int = 0
    colour: str = "reinhard"
    blend: str = "feather"
    mask: str = "auto"
    mask_erosion: float = 0.02
    mask_blur: float = 0.05
    crop_size: int = 64
    coverage: float = 1.0
    y_offset: float = 0.0
    face_template: NDArray[np.float64] | None = None

    def validate(self) -> None:
        def choice(name: str, value: str, allowed: tuple[str, ...]) -> None:
            if value not in allowed:
                raise InvalidInputError(
                    f"unknown {name} {value!r}; choose one of {', '.join(allowed)}"
                )

        choice("face selection", self.select, SELECT_MODES)
        choice("colour correction", self.colour, COLOUR_METHODS)
        choice("blend mode", self.blend, BLEND_MODES)
        choice("mask source", self.mask, MASK_SOURCES)
        if self.indices is not None and any(int(i) < 0 for i in self.indices):
            raise InvalidInputError(f"face indices must be >= 0, got {list(self.indices)}")
        if self.max_faces < 0:
            raise InvalidInputError(f"max_faces must be >= 0 (0: no limit), got {self.max_faces}")
        if not (16 <= self.crop_size <= 1024):
            raise InvalidInputError(f"crop_size must be in [16, 1024], got {self.crop_size}")
        for name, lo, hi in (
            ("mask_erosion", -0.5, 0.5),
            ("mask_blur", 0.0, 0.5),
            ("coverage", 0.1, 4.0),
            ("y_offset", -0.5, 0.5),
        ):
            value = float(getattr(self, name))
            if not (math.isfinite(value) and lo <= value <= hi):
                raise InvalidInputError(f"{name} must be in [{lo}, {hi}], got {value!r}")


@dataclass
class FaceResult:
    index: int  # position among the frame's faces (see SwapOptions.indices)
    box: F32  # (4,) x0, y0, x1, y1
    landmarks: F32  # (5|68, 2) frame pixels
    confidence: float  # detector confidence; 1.0 for caller-supplied faces
    swapped: bool
    skip_reason: str | None = None  # "not_selected" or "over_limit" when not swapped
    track_id: int | None = None
    # Swapped faces: x0, y0, x1, y1 (end exclusive) of the aligned crop in the frame, the only
    # pixels the swap may redraw (and where the watermark goes).
    region: tuple[int, int, int, int] | None = None


class SwapResult:
    """``frame``: same shape as the input (RGBA keeps its alpha). ``timings``: STAGES ->
    seconds. ``device_frame``: the tensor path's result, RGB uint8 (3, H, W) still on the
    device, which a GPU encoder takes from there without another copy; on that path the
    host ``frame`` is made from it only when first read, so a frame encoded on the card
    never comes back to the host."""

    def __init__(
        self,
        frame: U8 | Callable[[], U8],
        faces: list[FaceResult],
        timings: dict[str, float] | None = None,
        device_frame: torch.Tensor | None = None,
    ) -> None:
        self._frame: U8 | None = frame if isinstance(frame, np.ndarray) else None
        self._make: Callable[[], U8] | None = None if isinstance(frame, np.ndarray) else frame
        self.faces = faces
        self.timings = timings if timings is not None else {}
        self.device_frame = device_frame

    @property
    def frame(self) -> U8:
        if self._frame is None:
            assert self._make is not None
            self._frame, self._make = self._make(), None
        return self._frame

    @property
    def frame_on_host(self) -> bool:
        """Whether the host copy of the frame exists (read, or made on the host)."""
        return self._frame is not None


def crop_region(
    m: NDArray[np.float64], size: int, frame_hw: tuple[int, int]
) -> tuple[int, int, int, int]:
    """The frame box (x0, y0, x1, y1, clipped, end exclusive) covered by a size x size crop
    taken with frame -> crop matrix ``m``, with a pixel of slack for bilinear sampling."""
    inv = cv2.invertAffineTransform(np.asarray(m, np.float64))
    corners = np.array([[0.0, 0.0], [size, 0.0], [0.0, size], [size, size]])
    frame = corners @ inv[:, :2].T + inv[:, 2]
    h, w = frame_hw
    x0 = max(0, math.floor(frame[:, 0].min()) - 1)
    y0 = max(0, math.floor(frame[:, 1].min()) - 1)
    x1 = min(w, math.ceil(frame[:, 0].max()) + 2)
    y1 = min(h, math.ceil(frame[:, 1].max()) + 2)
    return x0, y0, max(x0, x1), max(y0, y1)


def _as_points(value: Any, what: str) -> NDArray[np.float64]:
    try:
        return np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise InvalidInputError(f"{what} must be numbers: {exc}") from None


def _check_inside(pts: NDArray[np.float64], w: int, h: int, what: str) -> None:
    if not np.all(np.isfinite(pts)):
        raise InvalidInputError(f"{what} has non-finite coordinates (NaN or inf)")
    x, y = pts[..., 0], pts[..., 1]
    if x.min() < 0 or y.min() < 0 or x.max() > w or y.max() > h:
        raise InvalidInputError(
            f"{what} reaches outside the {w}x{h} image (x in {x.min():.1f}..{x.max():.1f}, "
            f"y in {y.min():.1f}..{y.max():.1f}); coordinates are frame pixels"
        )


def validate_landmarks(value: Any, w: int, h: int) -> list[NDArray[np.float32]]:
    """Caller landmarks: one face (k, 2) or several (n, k, 2) / a list of (k, 2), k 5 or 68."""
    faces: list[NDArray[np.float64]]
    if isinstance(value, np.ndarray) and value.ndim == 3:
        faces = [_as_points(f, "landmarks") for f in value]
    elif isinstance(value, np.ndarray) and value.ndim == 2:
        faces = [_as_points(value, "landmarks")]
    else:
        try:
            items = list(value)
        except TypeError:
            raise InvalidInputError("landmarks must be a list of (k, 2) point arrays") from None
        faces = [_as_points(f, "landmarks") for f in items]
    if len(faces) > MAX_CALLER_FACES:
        raise InvalidInputError(f"at most {MAX_CALLER_FACES} faces per frame, got {len(faces)}")
    for i, lm in enumerate(faces):
        what = f"landmarks of face {i}"
        if lm.ndim != 2 or lm.shape[1] != 2 or lm.shape[0] not in (5, 68):
            raise InvalidInputError(
                f"{what} must be 5 or 68 (x, y) points (dlib order), got shape {lm.shape}"
            )
        _check_inside(lm, w, h, what)
        if float(np.ptp(lm, axis=0).max()) < 2.0:
            raise InvalidInputError(f"{what} are degenerate: all points within 2 px")
    return [f.astype(np.float32) for f in faces]


def validate_boxes(value: Any, w: int, h: int) -> list[NDArray[np.float32]]:
    """Caller boxes: (4,) or (n, 4) as x0, y0, x1, y1 in frame pixels."""
    boxes = _as_points(value, "boxes")
    if boxes.ndim == 1:
        boxes = boxes[None]
    if boxes.ndim != 2 or boxes.shape[1] != 4:
        raise InvalidInputError(f"boxes must be (n, 4) as x0, y0, x1, y1; got shape {boxes.shape}")
    if len(boxes) > MAX_CALLER_FACES:
        raise InvalidInputError(f"at most {MAX_CALLER_FACES} faces per frame, got {len(boxes)}")
    for i, b in enumerate(boxes):
        what = f"box {i} {b.tolist()}"
        _check_inside(b.reshape(2, 2), w, h, what)
        if b[2] - b[0] < 8 or b[3] - b[1] < 8:
            raise InvalidInputError(f"{what} must have x0 < x1 and y0 < y1, at least 8 px apart")
    return [b.astype(np.float32) for b in boxes]


def _resize_affine(m: NDArray[np.float64], k: float) -> NDArray[np.float64]:
    """``m`` followed by resizing the crop by ``k`` (pixel centres stay pixel centres)."""
    return compose_affine(np.array([[k, 0.0, 0.5 * k - 0.5], [0.0, k, 0.5 * k - 0.5]]), m)


class _Clock:
    def __init__(self) -> None:
        self.t = dict.fromkeys(STAGES, 0.0)
        self._last = time.perf_counter()

    def lap(self, stage: str) -> None:
        now = time.perf_counter()
        self.t[stage] += now - self._last
        self._last = now


class FaceSwapper:
    """Swap every selected face of a frame through a model callback (see :data:`SwapCrops`).

    Holds the detector and landmark predictor; holds no per-frame state, so one instance
    serves any number of requests (the components lock themselves)."""

    def __init__(
        self, detector: Detector, landmarker: Landmarker, device: str | None = None
    ) -> None:
        """``device`` (e.g. "cuda"): align, colour-correct and paste back with the tensor ops
        of :mod:`.tensor` on that device instead of OpenCV (feather blending only)."""
        self.detector = detector
        self.landmarker = landmarker
        self.device = device

    def _swap_tensor(
        self,
        frame: U8 | DeviceFrame,
        chosen: list[FaceResult],
        matrices: list[NDArray[np.float64]],
        swap_crops: SwapCrops,
        opts: SwapOptions,
        results: list[FaceResult],
        clock: _Clock,
        swap_crops_t: SwapCropsT | None,
    ) -> SwapResult:
        """The same steps as the OpenCV path, with the frame resident on ``self.device``.
        With ``swap_crops_t`` nothing but landmarks and matrices goes through the host: the
        crops (one batched warp) go to the model as a device tensor, its faces and masks
        come back as device tensors, and the pasted frame is copied to the host only if
        someone reads ``SwapResult.frame``. With ``swap_crops`` only the small crops travel
        to the model and back. A :class:`DeviceFrame` is never read on the host here."""
        from . import tensor as T

        assert self.device is not None
        size = opts.crop_size
        if isinstance(frame, DeviceFrame):
            frame_t = to_unit(frame.tensor.to(self.device))
        else:
            frame_t = T.from_uint8(frame[..., :3], self.device)
        frame_hw = (int(frame_t.shape[1]), int(frame_t.shape[2]))
        device = self.device
        crops_t = T.warp_crops_t(frame_t, matrices, size)  # (N, 3, S, S), one grid_sample
        crops_u8 = T.to_uint8_t(crops_t)  # what the model sees, as on the OpenCV path
        clock.lap("align")
        source: torch.Tensor = frame_t  # the frame before any face is pasted into it

        def original(j: int, m: NDArray[np.float64], side: int) -> torch.Tensor:
            return crops_t[j] if side == size else T.warp_crop_t(source, m, side)

        pastes: list[tuple[torch.Tensor, torch.Tensor, NDArray[np.float64]]]
        if swap_crops_t is not None:
            faces_t, masks_t = swap_crops_t(crops_u8)
            faces_t, masks_t = _check_model_output_t(faces_t, masks_t, len(matrices))
            clock.lap("model")
            pastes = self._pastes_device(
                chosen, matrices, faces_t, masks_t, opts, original, torch.device(device)
            )
        else:
            crops = list(crops_u8.permute(0, 2, 3, 1).contiguous().cpu().numpy())
            out_faces, out_masks = swap_crops(crops)
            out_faces, out_masks = _check_model_output(out_faces, out_masks, len(crops))
            clock.lap("model")

            def colour(face: U8, orig: torch.Tensor, hard: F32) -> torch.Tensor:
                hard_t = torch.from_numpy(np.ascontiguousarray(hard)).to(device)[None]
                return T.correct_colour_t(T.from_uint8(face, device), orig, hard_t, opts.colour)

            pastes = [
                (face_t, torch.from_numpy(soft).to(device), m)
                for face_t, soft, m in self._pastes(
                    chosen, matrices, out_faces, out_masks, opts, original, colour
                )
            ]
        clock.lap("mask_colour")
        if len({tuple(p[0].shape) for p in pastes}) == 1:
            # One model output size (always, today): every face in one batched inverse warp.
            frame_t = T.paste_faces_t(
                frame_t,
                torch.stack([p[0] for p in pastes]),
                torch.stack([p[1] for p in pastes])[:, None],
                [p[2] for p in pastes],
            )
        else:
            for face_t, soft_t, m in pastes:
                frame_t = T.paste_face_t(frame_t, face_t, soft_t[None], m)
        out_t = T.to_uint8_t(frame_t)
        for r, m in zip(chosen, matrices, strict=True):
            r.swapped, r.skip_reason = True, None
            r.region = crop_region(m, size, frame_hw)
        clock.lap("blend")

        def host() -> U8:
            rgb = np.ascontiguousarray(out_t.permute(1, 2, 0).cpu().numpy())
            if isinstance(frame, DeviceFrame) or frame.shape[2] == 3:
                return rgb
            out = frame.copy()  # RGBA keeps its alpha
            out[..., :3] = rgb
            return out

        return SwapResult(host, results, clock.t, device_frame=out_t)

    def _pastes_device(
        self,
        chosen: list[FaceResult],
        matrices: list[NDArray[np.float64]],
        faces_t: torch.Tensor,
        masks_t: torch.Tensor | None,
        opts: SwapOptions,
        original: Callable[[int, NDArray[np.float64], int], torch.Tensor],
        device: torch.device,
    ) -> list[tuple[torch.Tensor, torch.Tensor, NDArray[np.float64]]]:
        """:meth:`_pastes` for the model's device output: the decoder's masks are refined
        on the device; masks drawn from landmarks or the template are made on the host as
        on the OpenCV path (small, and from landmarks the host has anyway) and uploaded."""
        from . import tensor as T

        pastes = []
        for j, r in enumerate(chosen):
            face = to_unit(faces_t[j])
            side = int(face.shape[-1])
            m = (
                matrices[j]
                if side == opts.crop_size
                else _resize_affine(matrices[j], side / opts.crop_size)
            )
            if opts.mask == "auto" and masks_t is not None:
                hard_t = to_unit(masks_t[j])
                if hard_t.shape[-1] != side:
                    hard_t = torch.nn.functional.interpolate(
                        hard_t[None, None], size=(side, side), mode="bilinear", align_corners=False
                    )[0, 0]
                soft_t = T.refine_mask_t(hard_t, opts.mask_erosion, opts.mask_blur)
            else:
                hard = self._mask(r.landmarks, m, side, opts, None, j)
                hard_t = torch.from_numpy(hard).to(device)
                soft = refine_mask(hard, opts.mask_erosion, opts.mask_blur)
                soft_t = torch.from_numpy(soft).to(device)
            corrected = T.correct_colour_t(face, original(j, m, side), hard_t[None], opts.colour)
            pastes.append((corrected, soft_t, m))
        return pastes

    def find_faces(
        self,
        rgb: U8 | DeviceFrame,
        *,
        boxes: Any = None,
        landmarks: Any = None,
        faces: Sequence[DetectedFace] | None = None,
        clock: _Clock | None = None,
        frame_t: torch.Tensor | None = None,
    ) -> list[DetectedFace]:
        """Faces with landmarks: from ``faces`` (e.g. a FaceTracker), caller ``landmarks``
        and/or ``boxes`` (validated; no detection), or the detector. ``frame_t``: the same
        pixels as uint8 (3, H, W) on the device, for a detector that takes them there
        (``accepts_device_frames``), so the frame is not uploaded again to be detected.
        ``rgb`` may be a :class:`DeviceFrame` instead: its host pixels are read only where a
        host model needs them (a host detector, dlib landmarks)."""
        clock = clock or _Clock()
        if isinstance(rgb, DeviceFrame):
            dev: DeviceFrame | None = rgb
        else:
            dev = None if frame_t is None else DeviceFrame(frame_t, host=rgb[..., :3])
        frame: U8 | DeviceFrame = rgb

        def host() -> U8:
            return frame.rgb if isinstance(frame, DeviceFrame) else frame

        h, w = rgb.shape[:2]
        found: list[DetectedFace]
        if faces is not None:
            found = [DetectedFace(f.box, f.confidence, f.landmarks, f.track_id) for f in faces]
        elif landmarks is not None:
            lms = validate_landmarks(landmarks, w, h)
            bxs = validate_boxes(boxes, w, h) if boxes is not None else None
            if bxs is not None and len(bxs) != len(lms):
                raise InvalidInputError(
                    f"got {len(bxs)} boxes but {len(lms)} landmark sets; send one box per face"
                )
            found = [
                DetectedFace(bxs[i] if bxs else box_from_landmarks(lm), 1.0, lm)
                for i, lm in enumerate(lms)
            ]
        elif boxes is not None:
            found = [DetectedFace(b, 1.0) for b in validate_boxes(boxes, w, h)]
        else:
            if dev is not None and getattr(self.detector, "accepts_device_frames", False):
                device_detector: Any = self.detector  # beyond the Detector protocol
                found = device_detector.detect(dev.tensor)
            else:
                found = self.detector.detect(host())
        clock.lap("detect")
        for f in found:
            if f.landmarks is None:
                # dlib's models (68 points, or 5 inside a BlazeFace box) read host pixels.
                f.landmarks = self.landmarker.predict(host(), f.box)
        clock.lap("landmarks")
        return found

    def swap(
        self,
        frame: U8 | DeviceFrame,
        swap_crops: SwapCrops,
        options: SwapOptions | None = None,
        *,
        boxes: Any = None,
        landmarks: Any = None,
        faces: Sequence[DetectedFace] | None = None,
        frame_t: torch.Tensor | None = None,
        swap_crops_t: SwapCropsT | None = None,
    ) -> SwapResult:
        """Swap the selected faces of ``frame`` (RGB or RGBA uint8). Caller ``boxes``
        ((n, 4)) skip detection, caller ``landmarks`` ((n, 5|68, 2)) skip detection and
        landmark prediction, ``faces`` (e.g. from FaceTracker.track) are used as given.
        ``frame_t``: the same RGB pixels as uint8 (3, H, W), already on ``self.device``
        (decoded there by nvjpeg), so the tensor path skips the upload. ``swap_crops_t``:
        the model as a device callback (see :data:`SwapCropsT`), used on the tensor path
        instead of ``swap_crops``. ``frame`` may be a :class:`DeviceFrame` (RGB on the
        device): on the tensor path with feather blending nothing here reads it on the host
        unless a host model needs it (see :meth:`find_faces`)."""
        opts = options or SwapOptions()
        opts.validate()
        clock = _Clock()
        src: U8 | DeviceFrame
        if isinstance(frame, DeviceFrame):
            src = frame
        else:
            check_rgb(frame)
            rgb = frame if frame.shape[2] == 3 else np.ascontiguousarray(frame[..., :3])
            src = rgb if frame_t is None else DeviceFrame(frame_t, host=rgb)
        found = self.find_faces(src, boxes=boxes, landmarks=landmarks, faces=faces, clock=clock)

        results = [
            FaceResult(i, f.box, _landmarks_of(f), f.confidence, False, SKIP_NOT_SELECTED)
            for i, f in enumerate(found)
        ]
        for r, f in zip(results, found, strict=True):
            r.track_id = f.track_id
        chosen = _select(results, opts)
        if not chosen:
            if isinstance(frame, DeviceFrame):
                dev = frame
                return SwapResult(lambda: dev.rgb.copy(), results, clock.t, device_frame=dev.tensor)
            return SwapResult(frame.copy(), results, clock.t)

        size = opts.crop_size
        matrices = [
            align_matrix(r.landmarks, size, opts.coverage, opts.y_offset, opts.face_template)
            for r in chosen
        ]
        if self.device is not None and opts.blend == "feather":
            tensor_frame = src if isinstance(frame, DeviceFrame) or frame.shape[2] == 3 else frame
            return self._swap_tensor(
                tensor_frame, chosen, matrices, swap_crops, opts, results, clock, swap_crops_t
            )
        if isinstance(frame, DeviceFrame):
            # Seamless blending is OpenCV's on the host, as is the whole path without a
            # pixel device: they read the frame there.
            frame = frame.rgb
        rgb = frame if frame.shape[2] == 3 else np.ascontiguousarray(frame[..., :3])
        crops = [warp_crop(rgb, m, size) for m in matrices]
        clock.lap("align")

        out_faces, out_masks = swap_crops(crops)
        out_faces, out_masks = _check_model_output(out_faces, out_masks, len(crops))
        clock.lap("model")

        def original(j: int, m: NDArray[np.float64], side: int) -> U8:
            if side == size:
                return crops[j]
            resized = cv2.resize(crops[j], (side, side), interpolation=cv2.INTER_LINEAR)
            return np.asarray(resized, np.uint8)

        def colour(face: U8, orig: U8, hard: F32) -> U8:
            return correct_colour(face, orig, hard, opts.colour)

        pastes = self._pastes(chosen, matrices, out_faces, out_masks, opts, original, colour)
        clock.lap("mask_colour")

        out = frame.copy()
        for face, soft, m in pastes:
            paste_into(out, face, soft, m, opts.blend)
        for r, m in zip(chosen, matrices, strict=True):
            r.swapped, r.skip_reason = True, None
            r.region = crop_region(m, size, frame.shape[:2])
        clock.lap("blend")
        return SwapResult(out, results, clock.t)

    def _pastes(
        self,
        chosen: list[FaceResult],
        matrices: list[NDArray[np.float64]],
        out_faces: list[U8],
        out_masks: list[F32] | None,
        opts: SwapOptions,
        original: Callable[[int, NDArray[np.float64], int], P],
        colour: Callable[[U8, P, F32], P],
    ) -> list[tuple[P, F32, NDArray[np.float64]]]:
        """Per swapped face, what is pasted back: its colour-corrected face, soft mask and
        frame -> crop matrix at the model's output size. The OpenCV and tensor paths differ
        only in their pixels: ``original(j, m, side)`` is face j's frame crop under ``m`` at
        ``side`` px, ``colour(face, original, hard_mask)`` matches the face's colours to it."""
        pastes = []
        for j, r in enumerate(chosen):
            face = out_faces[j]
            side = face.shape[0]
            m = (
                matrices[j]
                if side == opts.crop_size
                else _resize_affine(matrices[j], side / opts.crop_size)
            )
            hard = self._mask(r.landmarks, m, side, opts, out_masks, j)
            corrected = colour(face, original(j, m, side), hard)
            pastes.append((corrected, refine_mask(hard, opts.mask_erosion, opts.mask_blur), m))
        return pastes

    @staticmethod
    def _mask(
        landmarks: F32,
        m: NDArray[np.float64],
        size: int,
        opts: SwapOptions,
        model_masks: list[NDArray[np.float32]] | None,
        j: int,
    ) -> NDArray[np.float32]:
        if opts.mask == "auto" and model_masks is not None:
            mask = model_masks[j]
            if mask.shape != (size, size):
                mask = np.asarray(
                    cv2.resize(mask, (size, size), interpolation=cv2.INTER_LINEAR), np.float32
                )
            return mask
        if opts.mask in ("auto", "landmarks") and len(landmarks) == 68:
            return landmark_mask(crop_landmarks(landmarks, m), size)
        return template_mask(size, opts.coverage, opts.y_offset, opts.face_template)


def _landmarks_of(face: DetectedFace) -> F32:
    if face.landmarks is None:
        raise RuntimeError("find_faces left a face without landmarks")
    return face.landmarks


def _select(results: list[FaceResult], opts: SwapOptions) -> list[FaceResult]:
    if not results:
        return []
    if opts.indices is not None:
        wanted = {int(i) for i in opts.indices}
        chosen = [r for r in results if r.index in wanted]
    elif opts.select == "largest":
        chosen = [max(results, key=lambda r: box_area(r.box))]
    else:
        chosen = list(results)
    if opts.max_faces and len(chosen) > opts.max_faces:
        by_size = sorted(chosen, key=lambda r: box_area(r.box), reverse=True)
        for r in by_size[opts.max_faces :]:
            r.skip_reason = SKIP_OVER_LIMIT
        chosen = sorted(by_size[: opts.max_faces], key=lambda r: r.index)
    return chosen


def _check_model_output(
    faces: Sequence[U8], masks: Sequence[NDArray[Any]] | None, n: int
) -> tuple[list[U8], list[NDArray[np.float32]] | None]:
    """The callback is server code, not caller input: a mismatch is a bug (RuntimeError)."""
    faces = list(faces)
    if len(faces) != n:
        raise RuntimeError(f"swap_crops returned {len(faces)} faces for {n} crops")
    for f in faces:
        if f.ndim != 3 or f.shape[2] != 3 or f.dtype != np.uint8 or f.shape[0] != f.shape[1]:
            raise RuntimeError(f"swap_crops must return square (S, S, 3) uint8, got {f.shape}")
    if masks is None:
        return faces, None
    if len(masks) != n:
        raise RuntimeError(f"swap_crops returned {len(masks)} masks for {n} crops")
    return faces, [as_float_mask(mk) for mk in masks]


def _check_model_output_t(
    faces: torch.Tensor, masks: torch.Tensor | None, n: int
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """:func:`_check_model_output` for the device callback."""
    if faces.ndim != 4 or faces.shape[0] != n or faces.shape[1] != 3:
        raise RuntimeError(f"swap_crops_t must return (N={n}, 3, R, R), got {tuple(faces.shape)}")
    if faces.dtype != torch.uint8 or faces.shape[2] != faces.shape[3]:
        raise RuntimeError(f"swap_crops_t must return square uint8 faces, got {faces.dtype}")
    if masks is not None and (masks.ndim != 3 or masks.shape[0] != n):
        raise RuntimeError(f"swap_crops_t returned masks {tuple(masks.shape)} for {n} faces")
    return faces, masks


def swap_frame(
    frame: U8,
    swap_crops: SwapCrops,
    detector: Detector,
    landmarker: Landmarker,
    options: SwapOptions | None = None,
    **faces: Any,
) -> SwapResult:
    """Functional form of ``FaceSwapper(detector, landmarker).swap(...)``."""
    return FaceSwapper(detector, landmarker).swap(frame, swap_crops, options, **faces)
