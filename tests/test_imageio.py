"""Image decoding details: EXIF orientation, alpha, 16-bit and grayscale inputs."""

from __future__ import annotations

import struct

import cv2
import numpy as np
import pytest
from facemux.models import imageio


def _jpeg_with_orientation(bgr: np.ndarray, orientation: int) -> bytes:
    jpeg = bytes(cv2.imencode(".jpg", bgr, [cv2.IMWRITE_JPEG_QUALITY, 100])[1].tobytes())
    # A minimal big-endian TIFF with one IFD entry: Orientation (0x0112, SHORT, 1).
    tiff = b"MM\x00\x2a" + struct.pack(">I", 8) + struct.pack(">H", 1)
    tiff += struct.pack(">HHI", 0x0112, 3, 1) + struct.pack(">H", orientation) + b"\x00\x00"
    tiff += struct.pack(">I", 0)
    app1 = b"Exif\x00\x00" + tiff
    segment = b"\xff\xe1" + struct.pack(">H", len(app1) + 2) + app1
    return jpeg[:2] + segment + jpeg[2:]


@pytest.mark.parametrize("orientation", [1, 3, 6, 8])
def test_exif_orientation_is_applied(orientation: int) -> None:
    # An upright picture: red block top-left. Store it rotated, tag how to undo it.
    upright = np.zeros((40, 60, 3), np.uint8)
    upright[:10, :10] = (255, 0, 0)
    undo = {
        1: None,
        3: cv2.ROTATE_180,
        6: cv2.ROTATE_90_COUNTERCLOCKWISE,
        8: cv2.ROTATE_90_CLOCKWISE,
    }[orientation]
    stored = upright if undo is None else cv2.rotate(upright, undo)
    data = _jpeg_with_orientation(cv2.cvtColor(stored, cv2.COLOR_RGB2BGR), orientation)
    assert imageio.jpeg_orientation(data) == orientation
    out = imageio.decode_image(data, 10**7).rgb
    assert out.shape == upright.shape
    assert out[:10, :10, 0].mean() > 200 and out[-10:, -10:, 0].mean() < 50


def test_rgba_16bit_and_gray_png() -> None:
    rgba = np.zeros((8, 8, 4), np.uint16)
    rgba[..., 2] = 65535  # red in BGRA
    rgba[..., 3] = np.arange(64, dtype=np.uint16).reshape(8, 8) * 1000
    data = bytes(cv2.imencode(".png", rgba)[1].tobytes())
    d = imageio.decode_image(data, 10**6)
    assert d.rgb.dtype == np.uint8 and d.rgb[0, 0].tolist() == [255, 0, 0]
    assert d.alpha is not None and d.alpha[7, 7] == round(63000 * 255 / 65535)
    back = imageio.encode_image(d.rgb, "PNG", alpha=d.alpha)
    again = imageio.decode_image(back, 10**6)
    assert again.alpha is not None and np.array_equal(again.alpha, d.alpha)

    gray = np.arange(64, dtype=np.uint8).reshape(8, 8)
    g = imageio.decode_image(bytes(cv2.imencode(".png", gray)[1].tobytes()), 10**6)
    assert g.rgb.shape == (8, 8, 3) and np.array_equal(g.rgb[..., 1], gray)
