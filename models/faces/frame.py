"""A full frame as the tensor path holds it: pixels on the device, host pixels on demand.

On the tensor path a frame's pixel work runs where the frame is (the GPU, or the CPU device
in tests); the host needs only boxes and landmarks. What still reads host pixels is opt-in:
dlib's landmark models (the 68-point one, or dlib predicting inside BlazeFace's boxes), a
detector that runs on the host (HOG, YuNet), seamless blending (OpenCV's Poisson solver), and
RGBA frames given to the library as arrays. Those read :attr:`DeviceFrame.rgb`, which copies
the frame to the host the first time (a frame nvjpeg decoded has no host pixels until then)
and counts every read, so tests and the server's metrics can tell that the default settings
never ask.
"""

from __future__ import annotations

import numpy as np
import torch
from facemux.models.errors import InvalidInputError
from numpy.typing import NDArray

__all__ = ["DeviceFrame"]

U8 = NDArray[np.uint8]


class DeviceFrame:
    """An RGB frame, uint8 (3, H, W) on its device (``tensor``), with its (H, W, 3) host
    array made only when :attr:`rgb` is read. ``host``: the same pixels already on the host
    (a frame decoded there and uploaded), handed out by :attr:`rgb` without a copy."""

    def __init__(self, tensor: torch.Tensor, host: U8 | None = None) -> None:
        if tensor.dtype != torch.uint8 or tensor.ndim != 3 or tensor.shape[0] != 3:
            raise InvalidInputError(
                f"a device frame must be (3, H, W) uint8, got {tuple(tensor.shape)} {tensor.dtype}"
            )
        if host is not None and host.shape != (tensor.shape[1], tensor.shape[2], 3):
            raise InvalidInputError(
                f"host pixels {host.shape} do not match the device frame {tuple(tensor.shape)}"
            )
        self.tensor = tensor
        self._host = host
        self.host_reads = 0  # reads of `rgb`: zero when nothing on the host wanted pixels
        self.host_copies = 0  # copies from the device those reads made (at most one)

    @classmethod
    def from_host(cls, rgb: U8, device: str | torch.device) -> DeviceFrame:
        """An (H, W, 3) uint8 frame uploaded to ``device`` (on the CPU device, a view)."""
        if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
            raise InvalidInputError(f"frame must be (H, W, 3) uint8, got {rgb.shape} {rgb.dtype}")
        t = torch.from_numpy(np.ascontiguousarray(rgb)).to(device).permute(2, 0, 1)
        return cls(t, host=rgb)

    @property
    def height(self) -> int:
        return int(self.tensor.shape[1])

    @property
    def width(self) -> int:
        return int(self.tensor.shape[2])

    @property
    def shape(self) -> tuple[int, int, int]:
        """(H, W, 3), as the host array would have it."""
        return self.height, self.width, 3

    @property
    def on_host(self) -> bool:
        """Whether host pixels exist (given, or copied by a read)."""
        return self._host is not None

    @property
    def rgb(self) -> U8:
        """The frame on the host, (H, W, 3) uint8: copied from the device on first read."""
        self.host_reads += 1
        if self._host is None:
            self._host = np.ascontiguousarray(self.tensor.permute(1, 2, 0).cpu().numpy())
            self.host_copies += 1
        return self._host
