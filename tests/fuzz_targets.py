"""Fuzz targets over facemux's request decoding and validation, shared by the Hypothesis
test (tests/test_fuzz.py, bounded, in CI) and the atheris harness (tests/fuzz_requests.py,
for long runs).

Each target takes arbitrary bytes. The contract: a target returns or raises one of
EXPECTED; anything else (another exception type, a crash, a hang) is a finding.
"""

from __future__ import annotations

import contextlib
import json
import struct
from collections.abc import Callable
from functools import cache

import numpy as np
from facemux.models import checkpoint
from facemux.models.errors import FacemuxError
from facemux.service import auth, convert
from facemux.service.consent import validate_consent
from facemux.service.frames import FramePipeline
from facemux.v1 import swap_service_pb2 as spb
from facemux.v1 import types_pb2 as tpb
from google.protobuf.message import DecodeError

# FacemuxError: the request was refused with a domain error (→ a gRPC status);
# DecodeError: gRPC itself refuses a message that is not valid protobuf, before facemux;
# auth.Denied: a refused credential (→ UNAUTHENTICATED).
EXPECTED: tuple[type[BaseException], ...] = (FacemuxError, DecodeError, auth.Denied)

MAX_PIXELS = 4_000_000
LATENT_SHAPE = (64, 8, 8)
FINGERPRINT = "ab" * 32


@cache
def seeds() -> dict[str, bytes]:
    """Valid inputs for the mutating fuzzers to start from."""
    import cv2
    import torch
    from facemux.models.config import get_preset
    from facemux.models.networks import build_decoder

    torch.manual_seed(0)
    rgb = np.random.default_rng(0).integers(0, 255, (16, 16, 3), np.uint8)
    png = bytes(cv2.imencode(".png", rgb)[1].tobytes())
    jpeg = bytes(cv2.imencode(".jpg", rgb)[1].tobytes())
    webp = bytes(cv2.imencode(".webp", rgb)[1].tobytes())
    cfg = get_preset("tiny")
    dec = checkpoint.decoder_to_bytes(build_decoder(cfg, seed=0), cfg, FINGERPRINT, "x")[0]
    latent = tpb.Latent(
        shape=list(LATENT_SHAPE),
        format=tpb.LATENT_FORMAT_FLOAT32,
        data=np.zeros(LATENT_SHAPE, "<f4").tobytes(),
        encoder_fingerprint=FINGERPRINT,
    ).SerializeToString()
    opts = spb.SwapOptions(
        faces=[spb.FaceHint(landmarks=[tpb.Point(x=float(i), y=float(i)) for i in range(5)])]
    ).SerializeToString()
    return {"png": png, "jpeg": jpeg, "webp": webp, "decoder": dec, "latent": latent, "opts": opts}


def encoded_image(data: bytes) -> None:
    img = convert.image_from_proto(tpb.Image(encoded=data), MAX_PIXELS, "fuzz")
    assert img.rgb.ndim == 3 and img.rgb.shape[2] == 3 and img.rgb.dtype == np.uint8


def image_message(data: bytes) -> None:
    msg = tpb.Image()
    msg.ParseFromString(data)
    convert.image_from_proto(msg, MAX_PIXELS, "fuzz")


def raw_image(data: bytes) -> None:
    if len(data) < 9:
        return
    w, h = struct.unpack("<II", data[:8])
    msg = tpb.Image(raw=tpb.RawImage(width=w, height=h, layout=data[8] % 8, data=data[9:]))
    convert.image_from_proto(msg, MAX_PIXELS, "fuzz")


def latent(data: bytes) -> None:
    msg = tpb.Latent()
    msg.ParseFromString(data)
    z = convert.latent_from_proto(msg, LATENT_SHAPE, FINGERPRINT, 0)
    assert z.shape == LATENT_SHAPE and np.isfinite(z).all()


def decoder_checkpoint(data: bytes) -> None:
    checkpoint.read_decoder(data)


def upload_prefix(data: bytes) -> None:
    """The first bytes of a RegisterIdentity upload, judged before the rest arrives."""
    size = checkpoint.expected_size(data, "decoder")
    assert size is None or size >= 10


def checkpoint_header(data: bytes) -> None:
    """Arbitrary bytes as the JSON header of a safetensors file."""
    checkpoint.read_metadata(struct.pack("<Q", len(data)) + data)


def landmarks(data: bytes) -> None:
    msg = spb.SwapOptions()
    msg.ParseFromString(data)
    FramePipeline.hints(msg)


def bearer(data: bytes) -> None:
    text = data.decode("ascii", errors="ignore")
    auth._bearer([("authorization", text)])


def callers_file(data: bytes) -> None:
    auth.parse_callers(data.decode("utf-8", errors="replace"))


def consent(data: bytes) -> None:
    try:
        record = json.loads(data)
    except ValueError:
        return
    if isinstance(record, dict):
        validate_consent({str(k): str(v) for k, v in record.items()})


TARGETS: dict[str, Callable[[bytes], None]] = {
    "encoded_image": encoded_image,
    "image_message": image_message,
    "raw_image": raw_image,
    "latent": latent,
    "decoder_checkpoint": decoder_checkpoint,
    "upload_prefix": upload_prefix,
    "checkpoint_header": checkpoint_header,
    "landmarks": landmarks,
    "bearer": bearer,
    "callers_file": callers_file,
    "consent": consent,
}


def run_one(target: str, data: bytes) -> None:
    """Run one input; swallow the expected refusals, let anything else propagate."""
    with contextlib.suppress(*EXPECTED):
        TARGETS[target](data)
