"""Conversions between wire messages and arrays, with the validation that goes with them."""

from __future__ import annotations

import math
from datetime import datetime, timezone
from typing import Any

import numpy as np
from facemux.models import imageio
from facemux.models.errors import FingerprintMismatchError, InvalidInputError
from facemux.v1 import types_pb2
from google.protobuf.timestamp_pb2 import Timestamp

_LAYOUT_NAMES = {
    types_pb2.PIXEL_LAYOUT_RGB8: "RGB8",
    types_pb2.PIXEL_LAYOUT_BGR8: "BGR8",
    types_pb2.PIXEL_LAYOUT_RGBA8: "RGBA8",
    types_pb2.PIXEL_LAYOUT_BGRA8: "BGRA8",
    types_pb2.PIXEL_LAYOUT_GRAY8: "GRAY8",
}
_FORMAT_NAMES = {
    types_pb2.IMAGE_FORMAT_JPEG: "JPEG",
    types_pb2.IMAGE_FORMAT_PNG: "PNG",
    types_pb2.IMAGE_FORMAT_WEBP: "WEBP",
    types_pb2.IMAGE_FORMAT_RAW: "RAW",
}
_DTYPES: dict[int, np.dtype[Any]] = {
    types_pb2.LATENT_FORMAT_FLOAT32: np.dtype("<f4"),
    types_pb2.LATENT_FORMAT_FLOAT16: np.dtype("<f2"),
}


def image_from_proto(msg: types_pb2.Image, max_pixels: int, what: str) -> imageio.DecodedImage:
    try:
        kind = msg.WhichOneof("source")
        if kind == "encoded":
            if not msg.encoded:
                raise InvalidInputError("encoded image bytes are empty")
            return imageio.decode_image(msg.encoded, max_pixels)
        if kind == "raw":
            raw = msg.raw
            layout = _LAYOUT_NAMES.get(raw.layout, "")
            return imageio.decode_raw(raw.data, raw.width, raw.height, layout, max_pixels)
        raise InvalidInputError("image has neither encoded bytes nor raw pixels")
    except InvalidInputError as exc:
        raise InvalidInputError(f"{what}: {exc}") from None


def image_pixels(
    msg: types_pb2.Image, max_pixels: int, what: str, setting: str = "max_image_pixels"
) -> int:
    """Width x height of an image from its header or raw shape, without decoding it; refuses
    one over `max_pixels` as decoding would."""
    try:
        kind = msg.WhichOneof("source")
        if kind == "encoded":
            if not msg.encoded:
                raise InvalidInputError("encoded image bytes are empty")
            _, width, height = imageio.encoded_size(msg.encoded)
        elif kind == "raw":
            width, height = msg.raw.width, msg.raw.height
        else:
            raise InvalidInputError("image has neither encoded bytes nor raw pixels")
        imageio.check_pixels(width, height, max_pixels, setting)
        return width * height
    except InvalidInputError as exc:
        raise InvalidInputError(f"{what}: {exc}") from None


def request_pixels(images: Any, max_pixels: int, max_total: int, what: str) -> list[int]:
    """Each image's pixel count, from headers only, refusing the whole request when their sum
    is over `max_total`: every image of a request may be decoded before any is released,
    so the per-image limit alone lets one small message claim gigabytes."""
    sizes = [image_pixels(img, max_pixels, f"{what}[{i}]") for i, img in enumerate(images)]
    total = sum(sizes)
    if total > max_total:
        raise InvalidInputError(
            f"{len(sizes)} {what} decode to {total} pixels in one request, over the limit of "
            f"{max_total} (setting max_request_pixels); send fewer or smaller images"
        )
    return sizes


def output_format(output: types_pb2.OutputOptions, input_format: str) -> str:
    """The format an output is sent in: the one asked for, else the input's (PNG for raw)."""
    return _FORMAT_NAMES.get(output.format) or ("PNG" if input_format == "RAW" else input_format)


def output_quality(output: types_pb2.OutputOptions) -> int:
    quality = output.quality or 95
    if not 1 <= quality <= 100:
        raise InvalidInputError(f"output quality {quality} is not in 1..100")
    return quality


def image_to_proto(
    rgb: np.ndarray,
    output: types_pb2.OutputOptions,
    input_format: str,
    alpha: np.ndarray | None = None,
) -> types_pb2.Image:
    fmt = output_format(output, input_format)
    if fmt == "RAW":
        layout = _LAYOUT_NAMES.get(output.raw_layout, "RGB8")
        h, w = rgb.shape[:2]
        return types_pb2.Image(
            raw=types_pb2.RawImage(
                width=w,
                height=h,
                layout=types_pb2.PixelLayout.Value("PIXEL_LAYOUT_" + layout),
                data=imageio.to_raw(rgb, layout),
            )
        )
    return types_pb2.Image(encoded=imageio.encode_image(rgb, fmt, output_quality(output), alpha))


def mask_to_proto(mask: np.ndarray) -> types_pb2.Image:
    return types_pb2.Image(encoded=imageio.encode_image(mask, "PNG"))


def latent_from_proto(
    msg: types_pb2.Latent, shape: tuple[int, ...], fingerprint: str, index: int
) -> np.ndarray:
    """Validate one latent and return it as float32 (C, H, W)."""
    where = f"latents[{index}]"
    if tuple(msg.shape) != shape:
        raise InvalidInputError(
            f"{where} has shape {list(msg.shape)} but this encoder's latents are {list(shape)}"
        )
    dtype = _DTYPES.get(msg.format)
    if dtype is None:
        raise InvalidInputError(f"{where} format must be FLOAT32 or FLOAT16")
    expected = math.prod(shape) * dtype.itemsize
    if len(msg.data) != expected:
        raise InvalidInputError(
            f"{where} needs {expected} bytes for shape {list(shape)} {dtype.name}, "
            f"got {len(msg.data)}"
        )
    if not msg.encoder_fingerprint:
        raise InvalidInputError(
            f"{where} has no encoder_fingerprint; send latents as Encode returns them"
        )
    if msg.encoder_fingerprint != fingerprint:
        raise FingerprintMismatchError(where, fingerprint, msg.encoder_fingerprint)
    arr = np.frombuffer(msg.data, dtype=dtype).reshape(shape).astype(np.float32)
    if not np.isfinite(arr).all():
        raise InvalidInputError(f"{where} contains NaN or infinite values")
    return arr


def latent_to_proto(arr: np.ndarray, fmt: int, fingerprint: str) -> types_pb2.Latent:
    if fmt == types_pb2.LATENT_FORMAT_UNSPECIFIED:
        fmt = types_pb2.LATENT_FORMAT_FLOAT32
    np_dtype = _DTYPES.get(fmt)
    if np_dtype is None:
        raise InvalidInputError("latent format must be FLOAT32 or FLOAT16")
    return types_pb2.Latent(
        shape=list(arr.shape),
        format=fmt,
        data=np.ascontiguousarray(arr, dtype=np_dtype).tobytes(),
        encoder_fingerprint=fingerprint,
    )


def timestamp(iso: str) -> Timestamp | None:
    """A stored ISO-8601 time (a date, or a time without zone, is UTC) on the wire; None
    for "" or text that is not a time (left unset rather than failing a whole listing)."""
    if not iso:
        return None
    try:
        when = datetime.fromisoformat(iso)
    except ValueError:
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=timezone.utc)
    ts = Timestamp()
    ts.FromDatetime(when)
    return ts


def iso_time(ts: Timestamp) -> str:
    """A wire Timestamp as the store's ISO-8601 UTC text (seconds, or finer when given)."""
    when = ts.ToDatetime(tzinfo=timezone.utc)
    return when.isoformat(timespec="microseconds" if when.microsecond else "seconds")
