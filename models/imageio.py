"""Image decoding, validation and encoding.

Everything inside facemux works on RGB uint8 arrays of shape (H, W, 3), optionally with an
alpha plane kept aside. OpenCV's BGR order only appears inside this module.

Sizes are read from the file header *before* decoding, so a small file that claims a huge
canvas (a decompression bomb) is refused without allocating it.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

import cv2
import numpy as np
from facemux.models.errors import InvalidInputError

# Layout name -> (channels, conversion to RGB). Names match the proto's PixelLayout.
RAW_LAYOUTS: dict[str, tuple[int, int | None]] = {
    "RGB8": (3, None),
    "BGR8": (3, cv2.COLOR_BGR2RGB),
    "RGBA8": (4, cv2.COLOR_RGBA2RGB),
    "BGRA8": (4, cv2.COLOR_BGRA2RGB),
    "GRAY8": (1, cv2.COLOR_GRAY2RGB),
}

FORMATS = ("JPEG", "PNG", "WEBP")


@dataclass
class DecodedImage:
    """An RGB image plus what is needed to give the caller back the same kind of file."""

    rgb: np.ndarray  # (H, W, 3) uint8
    alpha: np.ndarray | None  # (H, W) uint8 when the input had an alpha channel
    format: str  # "JPEG", "PNG", "WEBP" or "RAW"


def sniff_format(data: bytes) -> str | None:
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return "PNG"
    if data[:3] == b"\xff\xd8\xff":
        return "JPEG"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WEBP"
    return None


def _png_size(data: bytes) -> tuple[int, int]:
    if len(data) < 24 or data[12:16] != b"IHDR":
        raise InvalidInputError("PNG is truncated before its IHDR header")
    w, h = struct.unpack(">II", data[16:24])
    # Walk the chunk list: libpng (through OpenCV) allocates a chunk's declared length up
    # front, so an 800-byte file claiming a 4 GiB chunk would cost 4 GiB (found by fuzzing).
    i, n = 8, len(data)
    while i + 8 <= n:
        (length,) = struct.unpack(">I", data[i : i + 4])
        kind = data[i + 4 : i + 8]
        if i + 12 + length > n:
            raise InvalidInputError(
                f"PNG chunk {kind!r} claims {length} bytes, more than the file holds: "
                "corrupt or truncated"
            )
        if kind == b"IEND":
            break
        i += 12 + length
    return int(w), int(h)


# SOF markers carry the frame size; C4 (DHT), C8 (JPG) and CC (DAC) share the range but do not.
_JPEG_SOF = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}


def _jpeg_size(data: bytes) -> tuple[int, int]:
    i = 2
    n = len(data)
    while i + 4 <= n:
        if data[i] != 0xFF:
            i += 1
            continue
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if marker in (0xD8, 0x01) or 0xD0 <= marker <= 0xD7:
            i += 2
            continue
        (seg_len,) = struct.unpack(">H", data[i + 2 : i + 4])
        if marker in _JPEG_SOF:
            if i + 9 > n:
                break
            h, w = struct.unpack(">HH", data[i + 5 : i + 9])
            return int(w), int(h)
        if seg_len < 2:
            break
        i += 2 + seg_len
    raise InvalidInputError("JPEG is truncated or has no frame header (SOF)")


def _webp_size(data: bytes) -> tuple[int, int]:
    chunk = data[12:16]
    if chunk == b"VP8 " and len(data) >= 30:
        w, h = struct.unpack("<HH", data[26:30])
        return int(w & 0x3FFF), int(h & 0x3FFF)
    if chunk == b"VP8L" and len(data) >= 25:
        bits = int.from_bytes(data[21:25], "little")
        return (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1
    if chunk == b"VP8X" and len(data) >= 30:
        w = int.from_bytes(data[24:27], "little") + 1
        h = int.from_bytes(data[27:30], "little") + 1
        return w, h
    raise InvalidInputError("WebP is truncated or has an unknown chunk layout")


def encoded_size(data: bytes) -> tuple[str, int, int]:
    """(format, width, height) from the header alone."""
    fmt = sniff_format(data)
    if fmt is None:
        raise InvalidInputError(
            "image bytes are not JPEG, PNG or WebP (first bytes "
            f"{data[:8].hex() or 'empty'}); send an encoded file or raw pixels"
        )
    size = {"PNG": _png_size, "JPEG": _jpeg_size, "WEBP": _webp_size}[fmt](data)
    return fmt, size[0], size[1]


def check_pixels(
    width: int, height: int, max_pixels: int, setting: str = "max_image_pixels"
) -> None:
    if width <= 0 or height <= 0:
        raise InvalidInputError(f"image is {width}x{height}: width and height must be positive")
    if width * height > max_pixels:
        raise InvalidInputError(
            f"image is {width}x{height} = {width * height} pixels, over the server limit of "
            f"{max_pixels} (setting {setting}); downscale it first"
        )


def _to_rgb8(img: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
    """OpenCV's decode result (gray, BGR, BGRA; 8 or 16 bit) -> RGB uint8 + alpha."""
    if img.dtype == np.uint16:
        # 16-bit PNGs: round to 8 bits in one pass straight into uint8 (exactly
        # round(v * 255 / 65535)); integer arithmetic in numpy would hold several uint32
        # copies, 40 bytes a pixel for RGBA, which bounds what a request may cost.
        img = cv2.convertScaleAbs(img, alpha=255.0 / 65535.0)
    elif img.dtype != np.uint8:
        raise InvalidInputError(f"unsupported pixel type {img.dtype}; use 8 or 16 bit images")
    if img.ndim == 2:
        return cv2.cvtColor(img, cv2.COLOR_GRAY2RGB), None
    if img.shape[2] == 4:
        return cv2.cvtColor(img, cv2.COLOR_BGRA2RGB), np.ascontiguousarray(img[:, :, 3])
    return cv2.cvtColor(img, cv2.COLOR_BGR2RGB), None


def check_complete(fmt: str, data: bytes) -> None:
    """Decoders fill a truncated file's missing rows with grey instead of failing, so a cut
    upload would be swapped silently: look for the format's end marker instead."""
    if fmt == "JPEG":
        complete = data.rstrip(b"\x00")[-2:] == b"\xff\xd9"
    elif fmt == "PNG":
        complete = b"IEND" in data[-16:]
    else:
        complete = int.from_bytes(data[4:8], "little") + 8 <= len(data)
    if not complete:
        raise InvalidInputError(f"{fmt} data is truncated (no end marker); re-send the whole file")


def decode_image(data: bytes, max_pixels: int, setting: str = "max_image_pixels") -> DecodedImage:
    """Decode a JPEG/PNG/WebP file into RGB uint8, refusing oversized or broken files."""
    fmt, w, h = encoded_size(data)
    check_pixels(w, h, max_pixels, setting)
    check_complete(fmt, data)
    buf = np.frombuffer(data, dtype=np.uint8)
    img = cv2.imdecode(buf, cv2.IMREAD_UNCHANGED)
    if img is None or img.size == 0:
        raise InvalidInputError(f"{fmt} image ({w}x{h}) could not be decoded: corrupt or truncated")
    if img.shape[0] != h or img.shape[1] != w:
        raise InvalidInputError(
            f"{fmt} header says {w}x{h} but the data decodes to {img.shape[1]}x{img.shape[0]}"
        )
    rgb, alpha = _to_rgb8(img)
    orientation = jpeg_orientation(data) if fmt == "JPEG" else 1
    if orientation != 1:
        rgb = apply_orientation(rgb, orientation)
        alpha = None if alpha is None else apply_orientation(alpha, orientation)
    return DecodedImage(rgb=rgb, alpha=alpha, format=fmt)


def jpeg_orientation(data: bytes) -> int:
    """The EXIF Orientation tag (1-8) of a JPEG, 1 when absent or unreadable. Phones store
    portrait photos sideways and set this tag; ignoring it would find no upright faces."""
    i, n = 2, len(data)
    while i + 4 <= n and data[i] == 0xFF:
        marker = data[i + 1]
        (seg_len,) = struct.unpack(">H", data[i + 2 : i + 4])
        if marker == 0xE1 and data[i + 4 : i + 10] == b"Exif\x00\x00":
            return _tiff_orientation(data[i + 10 : i + 2 + seg_len])
        if marker == 0xDA or seg_len < 2:  # start of scan: no more metadata
            break
        i += 2 + seg_len
    return 1


def _tiff_orientation(tiff: bytes) -> int:
    if len(tiff) < 8 or tiff[:2] not in (b"II", b"MM"):
        return 1
    end = "<" if tiff[:2] == b"II" else ">"
    (ifd,) = struct.unpack(end + "I", tiff[4:8])
    if ifd + 2 > len(tiff):
        return 1
    (count,) = struct.unpack(end + "H", tiff[ifd : ifd + 2])
    for k in range(count):
        off = ifd + 2 + 12 * k
        if off + 12 > len(tiff):
            break
        tag, typ, _, value = struct.unpack(end + "HHI4s", tiff[off : off + 12])
        if tag == 0x0112 and typ == 3:  # SHORT
            (v,) = struct.unpack(end + "H", value[:2])
            return v if 1 <= v <= 8 else 1
    return 1


def apply_orientation(img: np.ndarray, orientation: int) -> np.ndarray:
    """Rotate/flip an image stored with EXIF orientation `orientation` to upright."""
    ops = {
        2: lambda a: cv2.flip(a, 1),
        3: lambda a: cv2.rotate(a, cv2.ROTATE_180),
        4: lambda a: cv2.flip(a, 0),
        5: lambda a: cv2.flip(cv2.rotate(a, cv2.ROTATE_90_CLOCKWISE), 1),
        6: lambda a: cv2.rotate(a, cv2.ROTATE_90_CLOCKWISE),
        7: lambda a: cv2.flip(cv2.rotate(a, cv2.ROTATE_90_COUNTERCLOCKWISE), 1),
        8: lambda a: cv2.rotate(a, cv2.ROTATE_90_COUNTERCLOCKWISE),
    }
    op = ops.get(orientation)
    return img if op is None else np.ascontiguousarray(op(img))


def decode_raw(data: bytes, width: int, height: int, layout: str, max_pixels: int) -> DecodedImage:
    """Raw pixels with an explicit shape -> RGB uint8."""
    if layout not in RAW_LAYOUTS:
        raise InvalidInputError(
            f"raw image layout {layout or 'UNSPECIFIED'} is not supported; use one of "
            + ", ".join(RAW_LAYOUTS)
        )
    check_pixels(width, height, max_pixels)
    channels, conversion = RAW_LAYOUTS[layout]
    expected = width * height * channels
    if len(data) != expected:
        raise InvalidInputError(
            f"raw {layout} image {width}x{height} needs {expected} bytes, got {len(data)}"
        )
    arr = np.frombuffer(data, dtype=np.uint8).reshape(height, width, channels)
    alpha = np.ascontiguousarray(arr[:, :, 3]) if channels == 4 else None
    rgb = (
        np.ascontiguousarray(arr)
        if conversion is None
        else cv2.cvtColor(arr.squeeze(-1) if channels == 1 else arr, conversion)
    )
    return DecodedImage(rgb=rgb, alpha=alpha, format="RAW")


def encode_image(
    rgb: np.ndarray, fmt: str, quality: int = 95, alpha: np.ndarray | None = None
) -> bytes:
    """RGB(+alpha) uint8 -> file bytes. Alpha is kept for PNG and WebP."""
    if fmt not in FORMATS:
        raise InvalidInputError(f"cannot encode to {fmt}; use one of {', '.join(FORMATS)}")
    if rgb.ndim == 2:
        bgr = rgb
    elif alpha is not None and fmt != "JPEG":
        bgr = cv2.cvtColor(rgb, cv2.COLOR_RGB2BGRA)
        bgr[:, :, 3] = alpha
    else:
        bgr = cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR)
    q = int(min(max(quality, 1), 100))
    params: list[int] = []
    if fmt == "JPEG":
        params = [cv2.IMWRITE_JPEG_QUALITY, q]
    elif fmt == "WEBP":
        params = [cv2.IMWRITE_WEBP_QUALITY, q]
    elif fmt == "PNG":
        # Level 1: PNG outputs are usually re-read by a program, not archived. Run-length
        # matches only (zlib's Z_RLE): after PNG's row filters, the long-distance matches
        # the default strategy searches for are rare in faces and photos; on this project's
        # 2-core CPU it encoded a served 64x64 face in 0.20 ms instead of 0.26 (5.2 KB
        # instead of 6.3) and a 512x512 photo in 13 ms instead of 16 (9% smaller).
        params = [
            cv2.IMWRITE_PNG_COMPRESSION,
            1,
            cv2.IMWRITE_PNG_STRATEGY,
            cv2.IMWRITE_PNG_STRATEGY_RLE,
        ]
    ok, buf = cv2.imencode("." + fmt.lower(), bgr, params)
    if not ok:
        raise InvalidInputError(f"OpenCV could not encode a {rgb.shape} image as {fmt}")
    return bytes(buf.tobytes())


def to_raw(rgb: np.ndarray, layout: str) -> bytes:
    """RGB uint8 -> raw bytes in the requested layout (alpha, when asked, is opaque)."""
    conversions = {
        "RGB8": None,
        "BGR8": cv2.COLOR_RGB2BGR,
        "RGBA8": cv2.COLOR_RGB2RGBA,
        "BGRA8": cv2.COLOR_RGB2BGRA,
        "GRAY8": cv2.COLOR_RGB2GRAY,
    }
    if layout not in conversions:
        raise InvalidInputError(f"raw output layout {layout} is not supported")
    code = conversions[layout]
    out = rgb if code is None else cv2.cvtColor(rgb, code)
    return bytes(np.ascontiguousarray(out).tobytes())


def resize_square(rgb: np.ndarray, size: int) -> tuple[np.ndarray, bool]:
    """Resize a crop to size x size; area filter when shrinking, cubic when growing."""
    h, w = rgb.shape[:2]
    if h == size and w == size:
        return rgb, False
    interp = cv2.INTER_AREA if (h > size or w > size) else cv2.INTER_CUBIC
    return cv2.resize(rgb, (size, size), interpolation=interp), True
