"""JPEG decode and encode on an NVIDIA GPU with nvjpeg (through ``torchvision.io``), batched.

On one CPU core a 1080p JPEG costs about 4 ms to decode and 4 ms to encode
(bench/frame_stages.py); nvjpeg does either in a fraction of a millisecond, and a decoded
frame stays on the card for the tensor pixel path. torchvision is optional: without it, or
without CUDA, :func:`available` is False and callers keep OpenCV on the host.

The bytes are checked exactly as the OpenCV path checks them (size limit before any pixel is
decoded, truncation, EXIF orientation) so both paths accept and refuse the same files. A file
nvjpeg cannot decode (CMYK, exotic sampling) raises :class:`GpuCodecUnsupported`, and the caller
falls back to OpenCV for that file alone.

Concurrent callers are batched: while one batch runs on the GPU, new requests queue, and the
next batch takes all of them (up to ``max_batch``) in one nvjpeg call, which the torchvision
docs describe as more efficient than repeated single calls on CUDA.
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any, Generic, TypeVar

import numpy as np
import torch
from torch import Tensor

from .. import imageio

__all__ = [
    "GpuCodecUnsupported",
    "JpegCodec",
    "MicroBatcher",
    "apply_orientation_t",
    "available",
]

In = TypeVar("In")
Out = TypeVar("Out")


class GpuCodecUnsupported(Exception):
    """nvjpeg could not handle this file; decode it on the host instead."""


@functools.cache
def _torchvision_io() -> Any:
    try:
        import torchvision.io as tvio
    except Exception:  # ImportError, or a torchvision built for another torch
        return None
    return tvio if hasattr(tvio, "decode_jpeg") and hasattr(tvio, "encode_jpeg") else None


def available(device: str | torch.device) -> bool:
    """True when ``device`` is a CUDA device and torchvision's nvjpeg ops can be loaded."""
    dev = torch.device(device)
    return dev.type == "cuda" and torch.cuda.is_available() and _torchvision_io() is not None


def apply_orientation_t(img: Tensor, orientation: int) -> Tensor:
    """EXIF orientation for a (C, H, W) tensor: the same result as ``imageio.apply_orientation``
    on the (H, W, C) array."""
    if orientation == 2:
        return img.flip(-1)
    if orientation == 3:
        return img.flip(-1, -2)
    if orientation == 4:
        return img.flip(-2)
    if orientation == 5:  # transpose
        return img.transpose(-1, -2)
    if orientation == 6:  # 90 degrees clockwise
        return img.transpose(-1, -2).flip(-1)
    if orientation == 7:  # transverse
        return img.transpose(-1, -2).flip(-1, -2)
    if orientation == 8:  # 90 degrees counter-clockwise
        return img.transpose(-1, -2).flip(-2)
    return img


class MicroBatcher(Generic[In, Out]):
    """Runs ``fn(list_of_items) -> list_of_results`` on one worker thread over whatever has
    queued since the last call, so concurrent callers share one batched call and a lone caller
    never waits for company."""

    def __init__(
        self, fn: Callable[[list[In]], list[Out | BaseException]], max_batch: int, name: str
    ) -> None:
        self._fn = fn
        self._max = max(1, max_batch)
        self._items: list[tuple[In, Future[Out]]] = []
        self._cv = threading.Condition()
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self._thread.start()

    def submit(self, item: In) -> Future[Out]:
        if not self._thread.is_alive():
            raise RuntimeError(f"{self._thread.name} has stopped")
        fut: Future[Out] = Future()
        with self._cv:
            self._items.append((item, fut))
            self._cv.notify()
        return fut

    def __call__(self, item: In, timeout: float | None = 60.0) -> Out:
        # A GPU that stops answering fails the call (INTERNAL) instead of holding a request
        # thread forever.
        return self.submit(item).result(timeout)

    def _loop(self) -> None:
        while True:
            with self._cv:
                while not self._items:
                    self._cv.wait()
                batch, self._items = self._items[: self._max], self._items[self._max :]
            try:
                results = self._fn([item for item, _ in batch])
                if len(results) != len(batch):
                    raise RuntimeError(f"{len(results)} results for {len(batch)} items")
            except BaseException as exc:  # one bad batch fails its callers, not the thread
                results = [exc] * len(batch)
            for (_, fut), res in zip(batch, results, strict=True):
                if fut.done():  # cannot happen today; never let it kill the worker
                    continue
                if isinstance(res, BaseException):
                    fut.set_exception(res)
                else:
                    fut.set_result(res)


class JpegCodec:
    """nvjpeg decode to, and encode from, uint8 (3, H, W) tensors on one CUDA device."""

    def __init__(self, device: str | torch.device, max_batch: int = 32) -> None:
        """Raises RuntimeError when nvjpeg cannot run here: torchvision's Python functions
        can import while its compiled image ops (or their nvjpeg build) are missing, so one
        small image is encoded and decoded before the codec is trusted."""
        if not available(device):
            raise RuntimeError(f"nvjpeg is not available on {device} (needs CUDA and torchvision)")
        self.device = torch.device(device)
        self._io = _torchvision_io()
        probe = torch.zeros((3, 16, 16), dtype=torch.uint8, device=self.device)
        try:
            data = self._encode_batch([(probe, 90)])[0]
            if isinstance(data, BaseException):
                raise data
            back = self._decode_batch([data])[0]
            if isinstance(back, BaseException):
                raise back
        except Exception as exc:
            raise RuntimeError(f"nvjpeg self-test failed on {device}: {exc}") from exc
        self.frames_decoded = 0  # counters for tests and benchmarks
        self.frames_encoded = 0
        self._decoder: MicroBatcher[bytes, Tensor] = MicroBatcher(
            self._decode_batch, max_batch, "facemux-nvjpeg-decode"
        )
        self._encoder: MicroBatcher[tuple[Tensor, int], bytes] = MicroBatcher(
            self._encode_batch, max_batch, "facemux-nvjpeg-encode"
        )

    # -- decode ------------------------------------------------------------------------------

    def decode(self, data: bytes, max_pixels: int) -> Tensor:
        """A JPEG file -> upright uint8 (3, H, W) RGB on the device. Raises InvalidInputError
        for what the host path refuses too, GpuCodecUnsupported for what only nvjpeg refuses."""
        fmt, w, h = imageio.encoded_size(data)
        if fmt != "JPEG":
            raise GpuCodecUnsupported(f"{fmt} is decoded on the host")
        imageio.check_pixels(w, h, max_pixels)
        imageio.check_complete(fmt, data)
        img = self._decoder(data)
        if tuple(img.shape) != (3, h, w):
            raise GpuCodecUnsupported(f"nvjpeg decoded {tuple(img.shape)} for a {w}x{h} header")
        self.frames_decoded += 1
        return apply_orientation_t(img, imageio.jpeg_orientation(data))

    def _decode_batch(self, blobs: list[bytes]) -> list[Tensor | BaseException]:
        tvio = self._io
        rgb = tvio.ImageReadMode.RGB
        inputs = [torch.frombuffer(bytearray(b), dtype=torch.uint8) for b in blobs]
        # nvjpeg writes its output from its own stream: memory the caching allocator just
        # handed back may still be read by kernels queued on ours, so let those finish.
        torch.cuda.current_stream(self.device).synchronize()
        try:
            return list(tvio.decode_jpeg(inputs, mode=rgb, device=self.device))
        except Exception:
            pass  # one file nvjpeg rejects fails the whole list: find it one by one
        out: list[Tensor | BaseException] = []
        for t in inputs:
            try:
                out.append(tvio.decode_jpeg(t, mode=rgb, device=self.device))
            except Exception as exc:
                out.append(GpuCodecUnsupported(f"nvjpeg: {exc}"))
        return out

    # -- encode ------------------------------------------------------------------------------

    def encode(self, rgb: Tensor, quality: int) -> bytes:
        """uint8 (3, H, W) on the device -> JPEG bytes (4:4:4: nvjpeg through torchvision
        keeps full-resolution chroma, so files are larger than OpenCV's 4:2:0 at the same
        quality)."""
        if rgb.dtype != torch.uint8 or rgb.dim() != 3 or rgb.shape[0] != 3:
            raise ValueError(f"encode needs uint8 (3, H, W), got {rgb.dtype} {tuple(rgb.shape)}")
        out = self._encoder((rgb.contiguous(), quality))
        self.frames_encoded += 1
        return out

    def _encode_batch(self, items: list[tuple[Tensor, int]]) -> list[bytes | BaseException]:
        # Older torchvision releases read the input without waiting for the caller's stream
        # (the watermark kernels may still be running): wait for them here.
        torch.cuda.current_stream(self.device).synchronize()
        out: list[bytes | BaseException] = [RuntimeError("not encoded")] * len(items)
        by_quality: dict[int, list[int]] = {}
        for i, (_, q) in enumerate(items):
            by_quality.setdefault(q, []).append(i)
        for q, idx in by_quality.items():  # nvjpeg takes one quality per call
            try:
                encoded = self._io.encode_jpeg([items[i][0] for i in idx], quality=q)
                for i, t in zip(idx, encoded, strict=True):
                    out[i] = np.asarray(t.cpu()).tobytes()
            except Exception as exc:
                for i in idx:
                    out[i] = exc
        return out
