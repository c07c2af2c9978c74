"""Full frames on the server: wire options to the face pipeline and its model callback.

The pipeline itself (detection, landmarks, alignment, masks, colour, paste-back, tracking)
lives in facemux.models.faces; this module turns wire options into its options, feeds its
model callback through the batching scheduler, and turns its results into wire results.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np
import torch
from facemux.models import faces as facelib
from facemux.models.errors import (
    InvalidInputError,
    NotFoundError,
    PreconditionError,
    UnavailableError,
)
from facemux.models.faces import DeviceFrame, gpu_codec
from facemux.models.faces.blazeface import BlazeFaceDetector
from facemux.models.imageio import DecodedImage, sniff_format
from facemux.models.networks import Decoder
from facemux.service.cancel import on_cancel
from facemux.service.detect_batcher import DetectionBatcher, DetectionStats, detection_deadline
from facemux.service.scheduler import Item, Op, Scheduler
from facemux.service.settings import Settings
from facemux.v1 import swap_service_pb2 as spb
from facemux.v1 import types_pb2

log = logging.getLogger(__name__)

_SELECTION = {
    spb.FACE_SELECTION_UNSPECIFIED: "all",
    spb.FACE_SELECTION_ALL: "all",
    spb.FACE_SELECTION_LARGEST: "largest",
    spb.FACE_SELECTION_LISTED: "all",  # narrowed by indices below
}
_COLOUR = {
    spb.COLOR_CORRECTION_UNSPECIFIED: "reinhard",
    spb.COLOR_CORRECTION_NONE: "none",
    spb.COLOR_CORRECTION_AVERAGE: "average",
    spb.COLOR_CORRECTION_REINHARD: "reinhard",
}
_BLEND = {
    spb.BLEND_MODE_UNSPECIFIED: "feather",
    spb.BLEND_MODE_FEATHER: "feather",
    spb.BLEND_MODE_SEAMLESS: "seamless",
}
_SKIP = {
    facelib.SKIP_NOT_SELECTED: spb.SKIP_REASON_NOT_SELECTED,
    facelib.SKIP_OVER_LIMIT: spb.SKIP_REASON_OVER_LIMIT,
}


@dataclass
class DeviceImage:
    """A frame nvjpeg decoded: its pixels stay on the device (``frame``); ``rgb``, the host
    copy, is made (and counted on the frame) only if something reads it."""

    frame: DeviceFrame
    alpha: None = None
    format: str = "JPEG"

    @property
    def rgb(self) -> np.ndarray:
        return self.frame.rgb


@dataclass
class FrameOutcome:
    swapped: facelib.SwapResult  # its frame is copied to the host only when read (rgb)
    results: list[spb.FaceResult]
    faces_swapped: int
    notes: list[str]
    timings: dict[str, float]
    device_frame: torch.Tensor | None = None  # rgb, uint8 (3, H, W), on the GPU
    # The swapped faces' crops in the frame (x0, y0, x1, y1): where the watermark goes, so
    # every other pixel comes back as the caller sent it.
    regions: list[tuple[int, int, int, int]] = field(default_factory=list)
    # The input frame as the tensor path held it (its host_reads say whether host pixels
    # were wanted); None on the OpenCV path.
    frame: DeviceFrame | None = None

    @property
    def rgb(self) -> np.ndarray:
        """The swapped frame on the host (copied from the device on first read)."""
        return self.swapped.frame


def build_swapper(
    settings: Settings,
    pixel_device: str | None = None,
    model_device: str = "cpu",
    on_detection: Callable[[DetectionStats], None] | None = None,
) -> facelib.FaceSwapper:
    """The detector and landmark predictor the settings name (loading them takes ~1 s).
    BlazeFace sits behind its micro-batcher unless ``detector_batching`` is off."""
    options: dict[str, object] = {}
    if settings.detector == "hog":
        options["max_side"] = settings.detector_max_side
        options["threshold"] = settings.detector_threshold
        options["processes"] = settings.detector_process_count()
    elif settings.detector == "blazeface":
        options["device"] = model_device
        options["tiles"] = settings.detector_tiles
        # Its own fitted 5 points skip the landmark model; the 68-point model, when asked
        # for, always predicts inside the box it places.
        options["landmarks"] = (
            settings.detector_landmarks == "detector" and settings.landmark_points == 5
        )
    else:
        options["onnx_path"] = settings.detector_model
    detector: facelib.Detector = facelib.make_detector(settings.detector, **options)
    if isinstance(detector, BlazeFaceDetector) and settings.detector_batching:
        detector = DetectionBatcher(
            detector,
            max_frames=settings.detector_max_batch,
            max_wait_s=settings.detector_max_wait_ms / 1000.0,
            on_batch=on_detection,
        )
    return facelib.FaceSwapper(
        detector, facelib.LandmarkPredictor(settings.landmark_points), device=pixel_device
    )


class FramePipeline:
    """Detector and landmark predictor, built from settings on first use (loading them costs
    a second; a server that only sees aligned crops never pays it)."""

    def __init__(
        self,
        settings: Settings,
        scheduler: Scheduler,
        device: str = "cpu",
        on_detection: Callable[[DetectionStats], None] | None = None,
    ) -> None:
        self.settings = settings
        self.on_detection = on_detection  # each detection batch's stats (metrics)
        self.scheduler = scheduler
        self.device = device  # the model's, where a torch detector runs too
        # Where the pixel work runs: the model's device when it is a GPU (tensor ops, the
        # frame stays on the card), else OpenCV on the host.
        mode = settings.frame_pipeline
        use_tensor = mode == "tensor" or (mode == "auto" and device.startswith("cuda"))
        self.pixel_device: str | None = device if use_tensor else None
        self.jpeg: gpu_codec.JpegCodec | None = None
        if settings.gpu_jpeg != "off":
            on_gpu = self.pixel_device is not None and self.pixel_device.startswith("cuda")
            why = ""
            if on_gpu and gpu_codec.available(device):
                try:
                    self.jpeg = gpu_codec.JpegCodec(device)
                except RuntimeError as exc:
                    why = str(exc)
            else:
                why = (
                    "it needs the tensor frame pipeline on a CUDA device (model device "
                    f"{device}) and torchvision installed beside torch"
                )
            if self.jpeg is None and settings.gpu_jpeg == "on":
                raise PreconditionError(
                    f"gpu_jpeg is on but nvjpeg cannot run here: {why}; set gpu_jpeg to auto or off"
                )
            if self.jpeg is None and on_gpu:
                log.warning("JPEG frames are decoded on the host: %s", why)
        self._swapper: facelib.FaceSwapper | None = None
        self._closed = False
        self._lock = threading.Lock()

    def decode_jpeg(self, data: bytes, max_pixels: int) -> DeviceImage | None:
        """A JPEG frame decoded by nvjpeg, on the device only (a host copy is made only if
        a host model reads it). None when this frame goes to OpenCV instead (no nvjpeg
        here, not a JPEG, or a JPEG nvjpeg cannot handle); bad files raise exactly as the
        host decoder would."""
        if self.jpeg is None or sniff_format(data) != "JPEG":
            return None
        try:
            frame_t = self.jpeg.decode(data, max_pixels)
        except gpu_codec.GpuCodecUnsupported:
            return None
        return DeviceImage(DeviceFrame(frame_t))

    def swapper(self) -> facelib.FaceSwapper:
        with self._lock:
            if self._closed:
                raise UnavailableError("the server is shutting down")
            if self._swapper is None:
                self._swapper = build_swapper(
                    self.settings, self.pixel_device, self.device, self.on_detection
                )
            return self._swapper

    @contextmanager
    def expect_detection(
        self, o: spb.SwapOptions, tracker: facelib.FaceTracker | None = None
    ) -> Iterator[None]:
        """Around a frame's whole call (decode included): tell the detection batcher, if
        there is one, that this frame will be detected, so a batch forming meanwhile waits
        for it. Frames with caller faces, and stream frames the tracker will not detect,
        are not announced."""
        sw = self._swapper
        batcher = sw.detector if sw is not None else None
        due = tracker is None or tracker.frame_index % tracker.detect_every == 0
        if not isinstance(batcher, DetectionBatcher) or o.faces or not due:
            yield
            return
        with batcher.expect():
            yield

    def close(self) -> None:
        """Stop the detector's worker processes, if it has any."""
        with self._lock:
            self._closed = True
            sw, self._swapper = self._swapper, None
        close = getattr(sw.detector, "close", None) if sw is not None else None
        if close is not None:
            close()

    def tracker(self, detect_every: int) -> facelib.FaceTracker:
        """A stream's tracker. With BlazeFace's own landmarks it tracks frames on the tensor
        path where they are (faces found again by BlazeFace near their boxes); with dlib's
        landmark models it reads each frame's host pixels, as those models need."""
        sw = self.swapper()
        detector: object = sw.detector
        if isinstance(detector, DetectionBatcher):
            detector = detector.detector
        relocate = None
        if isinstance(detector, BlazeFaceDetector) and detector.landmarks:
            relocate = detector.relocate
        return facelib.FaceTracker(
            sw.detector,
            sw.landmarker,
            detect_every=detect_every or self.settings.detect_every,
            relocate=relocate,
        )

    # -- options ---------------------------------------------------------------------------

    def options(self, o: spb.SwapOptions, resolution: int) -> facelib.SwapOptions:
        limit = self.settings.max_faces_per_frame
        return facelib.SwapOptions(
            select=_SELECTION.get(o.selection, "all"),
            max_faces=min(o.max_faces or limit, limit),
            colour=_COLOUR.get(o.color_correction, "reinhard"),
            blend=_BLEND.get(o.blend_mode, "feather"),
            mask_erosion=o.mask_erosion / 100.0 if o.mask_erosion else 0.02,
            mask_blur=o.mask_blur / 100.0 if o.mask_blur else 0.05,
            crop_size=resolution,
            face_template=self.scheduler.backend.face_template(),
        )

    @staticmethod
    def hints(o: spb.SwapOptions) -> dict[str, object]:
        """Caller-supplied faces: landmarks (skip detection and landmarks) or boxes."""
        if not o.faces:
            return {}
        with_lm = [h for h in o.faces if h.landmarks]
        if with_lm and len(with_lm) != len(o.faces):
            raise InvalidInputError(
                "options.faces: give landmarks for every face or for none (boxes only)"
            )
        if with_lm:
            lms = [np.array([[p.x, p.y] for p in h.landmarks], np.float64) for h in o.faces]
            if len({len(lm) for lm in lms}) != 1:
                raise InvalidInputError(
                    "options.faces: every face needs the same number of landmarks"
                )
            out: dict[str, object] = {"landmarks": np.stack(lms)}
            if all(h.HasField("box") for h in o.faces):
                out["boxes"] = np.array([_box(h.box) for h in o.faces], np.float64)
            return out
        if not all(h.HasField("box") for h in o.faces):
            raise InvalidInputError("options.faces: each face needs a box or landmarks")
        return {"boxes": np.array([_box(h.box) for h in o.faces], np.float64)}

    # -- one frame -------------------------------------------------------------------------

    def swap(
        self,
        image: DecodedImage | DeviceImage,
        decoder: Decoder,
        o: spb.SwapOptions,
        resolution: int,
        deadline: float | None,
        tracker: facelib.FaceTracker | None = None,
    ) -> FrameOutcome:
        # On the tensor path every frame is a DeviceFrame: one nvjpeg decoded, or one
        # decoded on the host and uploaded once here. Nothing below reads its host pixels
        # unless a host model needs them (see DeviceFrame).
        frame: DeviceFrame | None
        if isinstance(image, DeviceImage):
            frame = image.frame
        elif self.pixel_device is not None:
            frame = DeviceFrame.from_host(image.rgb, self.pixel_device)
        else:
            frame = None
        rgb: np.ndarray | DeviceFrame = image.rgb if frame is None else frame
        opts = self.options(o, resolution)
        swapper = self.swapper()
        t0 = time.perf_counter()
        reset = detection_deadline.set(deadline)  # the detection batcher honours it
        try:
            if tracker is not None and not o.faces:
                found = tracker.track(rgb)
            else:
                found = swapper.find_faces(rgb, **self.hints(o))
        finally:
            detection_deadline.reset(reset)
        t_find = time.perf_counter() - t0
        if o.selection == spb.FACE_SELECTION_LISTED:
            opts.indices = self._listed(o, found)

        def swap_crops(crops: list[np.ndarray]) -> tuple[list[np.ndarray], list[np.ndarray] | None]:
            item = Item(Op.SWAP, np.stack(crops), decoder, deadline)
            future = self.scheduler.submit(item)
            on_cancel(future.cancel)  # a cancelled call's faces are dropped before compute
            result = future.result()
            assert result.faces is not None
            masks = None if result.masks is None else list(result.masks)
            return list(result.faces), masks

        def swap_crops_t(crops: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
            # Tensor in, tensor out: the crops and the model's faces stay on the device.
            item = Item(Op.SWAP, crops, decoder, deadline)
            future = self.scheduler.submit(item)
            on_cancel(future.cancel)
            result = future.result()
            assert result.faces_t is not None
            return result.faces_t, result.masks_t

        on_device = self.pixel_device is not None and self.pixel_device == self.device
        out = swapper.swap(
            rgb, swap_crops, opts, faces=found, swap_crops_t=swap_crops_t if on_device else None
        )
        if o.require_face and not out.faces:
            raise NotFoundError(
                "no face was found in the frame and require_face is set; send a photo with a "
                "visible face, or pass its box or landmarks in options.faces"
            )
        timings = dict(out.timings)
        timings["detect"] = timings.get("detect", 0.0) + t_find
        results = [self._result(r) for r in out.faces]
        swapped = sum(r.swapped for r in out.faces)
        notes = []
        over = sum(r.skip_reason == facelib.SKIP_OVER_LIMIT for r in out.faces)
        if over:
            notes.append(
                f"{len(out.faces)} faces found; only the largest {opts.max_faces} were swapped "
                f"(per-frame limit), {over} skipped"
            )
        regions = [r.region for r in out.faces if r.swapped and r.region is not None]
        return FrameOutcome(out, results, swapped, notes, timings, out.device_frame, regions, frame)

    @staticmethod
    def _listed(o: spb.SwapOptions, found: list[facelib.DetectedFace]) -> list[int]:
        wanted = [int(i) for i in o.face_indices]
        for b in o.face_boxes:
            box = np.array(_box(b), np.float32)
            ious = [facelib.box_iou(box, f.box) for f in found]
            if ious and max(ious) > 0:
                wanted.append(int(np.argmax(ious)))
        return wanted

    @staticmethod
    def _result(r: facelib.FaceResult) -> spb.FaceResult:
        x0, y0, x1, y1 = (float(v) for v in r.box)
        return spb.FaceResult(
            index=r.index,
            box=types_pb2.Box(x_min=x0, y_min=y0, x_max=x1, y_max=y1),
            landmarks=[types_pb2.Point(x=float(x), y=float(y)) for x, y in r.landmarks],
            confidence=float(r.confidence),
            swapped=r.swapped,
            skip_reason=_SKIP.get(r.skip_reason or "", spb.SKIP_REASON_UNSPECIFIED),
            input_width=round(x1 - x0),
            input_height=round(y1 - y0),
        )


def _box(b: types_pb2.Box) -> tuple[float, float, float, float]:
    return (b.x_min, b.y_min, b.x_max, b.y_max)
