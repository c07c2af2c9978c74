"""Every kind of bad input gets the right status and an actionable message, and the server
keeps serving afterwards."""

from __future__ import annotations

import math
import struct
import zlib
from collections.abc import Callable
from typing import Any

import cv2
import grpc
import numpy as np
import pytest
from conftest import Models, face_image, png
from facemux.client import FacemuxClient
from facemux.client.errors import FacemuxRpcError
from facemux.v1 import identity_service_pb2 as ipb
from facemux.v1 import swap_service_pb2 as spb
from facemux.v1 import types_pb2 as tpb

C = grpc.StatusCode


def _png_claiming(width: int, height: int) -> bytes:
    """A tiny valid-looking PNG whose header claims a huge canvas (a decompression bomb)."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    chunk = b"IHDR" + ihdr
    body = struct.pack(">I", len(ihdr)) + chunk + struct.pack(">I", zlib.crc32(chunk))
    idat = zlib.compress(b"\x00" * 1024)
    body += (
        struct.pack(">I", len(idat))
        + b"IDAT"
        + idat
        + struct.pack(">I", zlib.crc32(b"IDAT" + idat))
    )
    return b"\x89PNG\r\n\x1a\n" + body + b"\x00\x00\x00\x00IEND\xaeB`\x82"


def _jpeg(rgb: np.ndarray) -> bytes:
    ok, buf = cv2.imencode(".jpg", rgb)
    assert ok
    return bytes(buf.tobytes())


def _swap(*images: tpb.Image, identity: str = "alice", **kw: Any) -> spb.SwapRequest:
    return spb.SwapRequest(identity=identity, faces=spb.FaceBatch(faces=list(images)), **kw)


def _enc(data: bytes) -> tpb.Image:
    return tpb.Image(encoded=data)


def _raw(w: int, h: int, n: int, layout: int = tpb.PIXEL_LAYOUT_RGB8) -> tpb.Image:
    return tpb.Image(raw=tpb.RawImage(width=w, height=h, layout=layout, data=b"\x07" * n))


GOOD = png(face_image(0))
JPEG = _jpeg(face_image(0))
PNG_BOMB = _png_claiming(100_000, 100_000)

SWAP_CASES: list[tuple[str, spb.SwapRequest, grpc.StatusCode, str]] = [
    ("garbage bytes", _swap(_enc(b"hello world")), C.INVALID_ARGUMENT, "not JPEG, PNG or WebP"),
    ("empty bytes", _swap(_enc(b"")), C.INVALID_ARGUMENT, "empty"),
    ("truncated PNG", _swap(_enc(GOOD[: len(GOOD) // 2])), C.INVALID_ARGUMENT, "truncated"),
    ("truncated JPEG", _swap(_enc(JPEG[: len(JPEG) - 40])), C.INVALID_ARGUMENT, "truncated"),
    ("PNG header only", _swap(_enc(GOOD[:20])), C.INVALID_ARGUMENT, "truncated"),
    ("decompression bomb", _swap(_enc(PNG_BOMB)), C.INVALID_ARGUMENT, "over the server limit"),
    ("zero-width raw", _swap(_raw(0, 64, 0)), C.INVALID_ARGUMENT, "must be positive"),
    ("huge raw", _swap(_raw(50_000, 50_000, 10)), C.INVALID_ARGUMENT, "over the server limit"),
    ("short raw", _swap(_raw(64, 64, 64 * 64 * 3 - 1)), C.INVALID_ARGUMENT, "needs 12288 bytes"),
    ("long raw", _swap(_raw(64, 64, 64 * 64 * 4)), C.INVALID_ARGUMENT, "needs 12288 bytes"),
    ("raw without layout", _swap(_raw(8, 8, 192, 0)), C.INVALID_ARGUMENT, "layout"),
    ("image with nothing", _swap(tpb.Image()), C.INVALID_ARGUMENT, "neither"),
    ("no faces", _swap(), C.INVALID_ARGUMENT, "no faces"),
    ("too many faces", _swap(*[_enc(GOOD)] * 300), C.INVALID_ARGUMENT, "over the limit"),
    ("no input", spb.SwapRequest(identity="alice"), C.INVALID_ARGUMENT, "needs an input"),
    ("no identity", _swap(_enc(GOOD), identity=""), C.INVALID_ARGUMENT, "identity is required"),
    ("unknown identity", _swap(_enc(GOOD), identity="zed"), C.NOT_FOUND, "'zed' does not exist"),
    ("traversal identity", _swap(_enc(GOOD), identity="../alice"), C.INVALID_ARGUMENT, "invalid"),
    ("unknown version", _swap(_enc(GOOD), identity_version=9), C.NOT_FOUND, "no version 9"),
    (
        "bad quality",
        _swap(_enc(GOOD), output=tpb.OutputOptions(format=tpb.IMAGE_FORMAT_JPEG, quality=500)),
        C.INVALID_ARGUMENT,
        "quality",
    ),
]


@pytest.mark.parametrize(
    ("name", "request_", "code", "words"), SWAP_CASES, ids=[c[0] for c in SWAP_CASES]
)
def test_bad_swap_requests(
    client: FacemuxClient, name: str, request_: spb.SwapRequest, code: grpc.StatusCode, words: str
) -> None:
    with pytest.raises(FacemuxRpcError) as info:
        client._call(client.swap_stub.Swap, request_)
    assert info.value.code == code, info.value
    assert words in info.value.details
    # ...and the server still serves.
    assert client.swap_faces([GOOD], "alice").faces_swapped == 1


def _latent(models: Models, **changes: Any) -> tpb.Latent:
    shape = list(models.config.latent_shape)
    msg = tpb.Latent(
        shape=shape,
        dtype=tpb.LATENT_D_TYPE_FLOAT32,
        data=np.zeros(shape, "<f4").tobytes(),
        encoder_fingerprint=models.fingerprint,
    )
    for k, v in changes.items():
        if k == "shape":
            del msg.shape[:]
            msg.shape.extend(v)
        else:
            setattr(msg, k, v)
    return msg


def _with_value(models: Models, value: float) -> bytes:
    arr = np.zeros(models.config.latent_shape, "<f4")
    arr[0, 1, 2] = value
    return arr.tobytes()


LATENT_CASES: list[tuple[str, Callable[[Models], tpb.Latent], grpc.StatusCode, str]] = [
    ("wrong shape", lambda m: _latent(m, shape=[1, 2, 3]), C.INVALID_ARGUMENT, "has shape"),
    ("no dtype", lambda m: _latent(m, dtype=0), C.INVALID_ARGUMENT, "FLOAT32 or FLOAT16"),
    ("short data", lambda m: _latent(m, data=b"\x00" * 10), C.INVALID_ARGUMENT, "needs"),
    (
        "float16 size as float32",
        lambda m: _latent(m, dtype=tpb.LATENT_D_TYPE_FLOAT16),
        C.INVALID_ARGUMENT,
        "needs",
    ),
    ("NaN", lambda m: _latent(m, data=_with_value(m, math.nan)), C.INVALID_ARGUMENT, "NaN"),
    ("Inf", lambda m: _latent(m, data=_with_value(m, math.inf)), C.INVALID_ARGUMENT, "infinite"),
    (
        "no fingerprint",
        lambda m: _latent(m, encoder_fingerprint=""),
        C.INVALID_ARGUMENT,
        "encoder_fingerprint",
    ),
    (
        "other encoder",
        lambda m: _latent(m, encoder_fingerprint="ab" * 32),
        C.FAILED_PRECONDITION,
        "made for encoder abababab",
    ),
]


@pytest.mark.parametrize(
    ("name", "make", "code", "words"), LATENT_CASES, ids=[c[0] for c in LATENT_CASES]
)
def test_bad_latents(
    client: FacemuxClient,
    models: Models,
    name: str,
    make: Callable[[Models], tpb.Latent],
    code: grpc.StatusCode,
    words: str,
) -> None:
    req = spb.DecodeRequest(latents=[_latent(models), make(models)], identity="alice")
    with pytest.raises(FacemuxRpcError) as info:
        client._call(client.swap_stub.Decode, req)
    assert info.value.code == code, info.value
    assert words in info.value.details
    assert "latents[1]" in info.value.details  # says which one
    assert len(client.decode([_latent(models)], "alice").faces) == 1


def test_message_over_size_limit_hints_at_streaming(client: FacemuxClient) -> None:
    # The test server's limit is 4 MiB.
    blob = np.random.default_rng(0).integers(0, 255, 5 * 1024 * 1024, dtype=np.uint8).tobytes()
    with pytest.raises(FacemuxRpcError) as info:
        client.swap_faces([blob], "alice")
    assert info.value.code == C.RESOURCE_EXHAUSTED
    assert "SwapStream" in info.value.details and "max_message_bytes" in info.value.details
    assert client.swap_faces([GOOD], "alice").faces_swapped == 1


def _register(client: FacemuxClient, parts: list[ipb.RegisterIdentityRequest]) -> None:
    client._call(client.identity_stub.RegisterIdentity, iter(parts))


def test_bad_registration_streams(client: FacemuxClient, models: Models) -> None:
    meta = ipb.RegisterIdentityMetadata(name="newbie")
    data = models.decoders["carol"]
    cases = [
        ([ipb.RegisterIdentityRequest(chunk=data)], C.INVALID_ARGUMENT, "first message"),
        ([ipb.RegisterIdentityRequest(metadata=meta)], C.INVALID_ARGUMENT, "no checkpoint"),
        ([ipb.RegisterIdentityRequest(metadata=meta)] * 2, C.INVALID_ARGUMENT, "twice"),
        ([], C.INVALID_ARGUMENT, "no metadata"),
        (
            [
                ipb.RegisterIdentityRequest(
                    metadata=ipb.RegisterIdentityMetadata(name="newbie", sha256="00" * 32)
                ),
                ipb.RegisterIdentityRequest(chunk=data),
            ],
            C.INVALID_ARGUMENT,
            "sha256",
        ),
        (
            [
                ipb.RegisterIdentityRequest(
                    metadata=ipb.RegisterIdentityMetadata(name="newbie", size_bytes=1 << 40)
                )
            ],
            C.RESOURCE_EXHAUSTED,
            "max_checkpoint_bytes",
        ),
        (
            [
                ipb.RegisterIdentityRequest(
                    metadata=ipb.RegisterIdentityMetadata(
                        name="newbie", consent=tpb.ConsentRecord(expires_at="next tuesday")
                    )
                ),
                ipb.RegisterIdentityRequest(chunk=data),
            ],
            C.INVALID_ARGUMENT,
            "ISO-8601",
        ),
    ]
    for parts, code, words in cases:
        with pytest.raises(FacemuxRpcError) as info:
            _register(client, parts)
        assert info.value.code == code, (words, info.value)
        assert words in info.value.details
    assert "newbie" not in {i.name for i in client.list_identities()}


def test_bad_identity_calls(client: FacemuxClient) -> None:
    cases: list[tuple[Callable[[], object], grpc.StatusCode, str]] = [
        (lambda: client.get_identity("nobody"), C.NOT_FOUND, "does not exist"),
        (lambda: client.get_identity("a/../b"), C.INVALID_ARGUMENT, "invalid"),
        (lambda: client.delete_identity("nobody"), C.NOT_FOUND, "does not exist"),
        (lambda: client.delete_identity("alice", 7), C.NOT_FOUND, "no version 7"),
        (lambda: client.set_default_version("alice", 0), C.INVALID_ARGUMENT, "version"),
        (lambda: client.set_default_version("alice", 4), C.NOT_FOUND, "no version 4"),
        (
            lambda: client._call(
                client.identity_stub.ListIdentities, ipb.ListIdentitiesRequest(page_token="%%%")
            ),
            C.INVALID_ARGUMENT,
            "page_token",
        ),
    ]
    for call, code, words in cases:
        with pytest.raises(FacemuxRpcError) as info:
            call()
        assert info.value.code == code, (words, info.value)
        assert words in info.value.details
    assert client.health() == "SERVING"


def test_training_rpcs_say_they_are_not_available_yet(client: FacemuxClient) -> None:
    from facemux.v1 import training_service_pb2 as tr

    with pytest.raises(FacemuxRpcError) as info:
        client._call(client.training_stub.Train, tr.TrainRequest())
    assert info.value.code == C.UNIMPLEMENTED
    assert "RegisterIdentity" in info.value.details
    # The raw stub raises grpc's own error type.
    with pytest.raises(grpc.RpcError) as raw:
        list(client.training_stub.WatchJob(tr.WatchJobRequest(id="x")))
    assert raw.value.code() == C.UNIMPLEMENTED  # type: ignore[attr-defined]
    assert client.health() == "SERVING"
