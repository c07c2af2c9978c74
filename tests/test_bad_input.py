"""Every kind of bad input gets the right status and an actionable message, and the server
keeps serving afterwards."""

from __future__ import annotations

import json
import math
import struct
import zlib
from collections.abc import Callable
from typing import Any

import cv2
import grpc
import numpy as np
import pytest
import safetensors.torch
import torch
from common import CONSENT, Models, face_image, png
from facemux.client import FacemuxClient
from facemux.client.client import consent_record
from facemux.client.errors import FacemuxRpcError
from facemux.models.errors import InvalidInputError
from facemux.service.auth import new_token, parse_callers
from facemux.service.server import ServerThread
from facemux.v1 import identity_service_pb2 as ipb
from facemux.v1 import swap_service_pb2 as spb
from facemux.v1 import types_pb2 as tpb

C = grpc.StatusCode


@pytest.fixture
def server(shared_server: ServerThread) -> ServerThread:
    """One server for the module: every request here is refused and stores nothing, and each
    test checks that the server still serves afterwards."""
    return shared_server


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
    # Each within max_image_pixels, together over max_request_pixels: refused from the
    # headers, before any is decoded.
    (
        "bomb split over images",
        _swap(*[_enc(_png_claiming(2000, 2000))] * 30),
        C.INVALID_ARGUMENT,
        "(setting max_request_pixels); send fewer or smaller images",
    ),
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
        format=tpb.LATENT_FORMAT_FLOAT32,
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
    ("no format", lambda m: _latent(m, format=0), C.INVALID_ARGUMENT, "FLOAT32 or FLOAT16"),
    ("short data", lambda m: _latent(m, data=b"\x00" * 10), C.INVALID_ARGUMENT, "needs"),
    (
        "float16 size as float32",
        lambda m: _latent(m, format=tpb.LATENT_FORMAT_FLOAT16),
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


def _upload(data: bytes, name: str = "newbie", **meta: Any) -> list[ipb.RegisterIdentityRequest]:
    return [
        ipb.RegisterIdentityRequest(
            metadata=ipb.RegisterIdentityMetadata(
                name=name, consent=consent_record(CONSENT), **meta
            )
        ),
        ipb.RegisterIdentityRequest(chunk=data),
    ]


def test_bad_registration_streams(
    client: FacemuxClient, server: ServerThread, models: Models
) -> None:
    consent = consent_record(CONSENT)
    meta = ipb.RegisterIdentityMetadata(name="newbie", consent=consent)
    data = models.decoders["carol"]
    plain = safetensors.torch.save({"w": torch.zeros(4)})  # safetensors, not facemux
    cases = [
        # "$" matched before a trailing newline: this one was registered, and made a directory.
        (_upload(data, name="rt_nl\n"), C.INVALID_ARGUMENT, "invalid"),
        (_upload(b"\x00" * 4096), C.INVALID_ARGUMENT, "header length field is 0"),
        (_upload(b"\xff" * 64), C.INVALID_ARGUMENT, "header length field"),
        (_upload(b"\x08" + b"\x00" * 7 + b"not json"), C.INVALID_ARGUMENT, "not JSON"),
        (_upload(plain), C.INVALID_ARGUMENT, "no facemux metadata"),
        (_upload(models.encoder_bytes), C.INVALID_ARGUMENT, "expected a decoder"),
        (_upload(data[:-100]), C.INVALID_ARGUMENT, "truncated"),
        (_upload(data[:12]), C.INVALID_ARGUMENT, "truncated"),
        (_upload(data + b"\x00"), C.INVALID_ARGUMENT, "longer than its safetensors header"),
        (_upload(data, size_bytes=len(data) + 1), C.INVALID_ARGUMENT, "size_bytes"),
        (_upload(data[:-4] + b"\x01\x02\x03\x04"), C.INVALID_ARGUMENT, "corrupted"),
        (_upload(models.foreign_decoder), C.FAILED_PRECONDITION, "encoder"),
        ([ipb.RegisterIdentityRequest(chunk=data)], C.INVALID_ARGUMENT, "first message"),
        ([ipb.RegisterIdentityRequest(metadata=meta)], C.INVALID_ARGUMENT, "no checkpoint"),
        ([ipb.RegisterIdentityRequest(metadata=meta)] * 2, C.INVALID_ARGUMENT, "twice"),
        ([], C.INVALID_ARGUMENT, "no metadata"),
        (
            [
                ipb.RegisterIdentityRequest(
                    metadata=ipb.RegisterIdentityMetadata(
                        name="newbie", sha256="00" * 32, consent=consent
                    )
                ),
                ipb.RegisterIdentityRequest(chunk=data),
            ],
            C.INVALID_ARGUMENT,
            "sha256",
        ),
        (
            [
                ipb.RegisterIdentityRequest(
                    metadata=ipb.RegisterIdentityMetadata(
                        name="newbie", size_bytes=1 << 40, consent=consent
                    )
                )
            ],
            C.RESOURCE_EXHAUSTED,
            "max_checkpoint_bytes",
        ),
        (
            [
                ipb.RegisterIdentityRequest(
                    metadata=ipb.RegisterIdentityMetadata(
                        name="newbie",
                        consent=consent_record({**CONSENT, "expires_at": "2025-12-31"}),
                    )
                ),
                ipb.RegisterIdentityRequest(chunk=data),
            ],
            C.INVALID_ARGUMENT,
            "after consent.granted_at",
        ),
    ]
    for parts, code, words in cases:
        with pytest.raises(FacemuxRpcError) as info:
            _register(client, parts)
        assert info.value.code == code, (words, info.value)
        assert words in info.value.details
        assert "staging" not in info.value.details  # no server path in the message
    assert "newbie" not in {i.name for i in client.list_identities()}
    # Nothing was created, and no staged upload is left behind.
    assert sorted(p.name for p in (server.settings.store / "identities").iterdir()) == [
        "alice",
        "bob",
    ]


def test_names_with_a_trailing_newline_are_refused(
    client: FacemuxClient, server: ServerThread
) -> None:
    """Identity and dataset names: "$" in the name pattern matched before a final newline."""
    for call in (
        lambda: client.get_identity("alice\n"),
        lambda: client.delete_identity("alice\n"),
        lambda: client.upload_dataset("ds_nl\n", [GOOD], aligned=True),
    ):
        with pytest.raises(FacemuxRpcError) as info:
            call()
        assert info.value.code == C.INVALID_ARGUMENT, info.value
        assert "invalid" in info.value.details
    assert not any("\n" in p.name for p in server.settings.store.rglob("*"))
    assert client.get_identity("alice").name == "alice"


def test_caller_names_with_a_trailing_newline_are_refused() -> None:
    with pytest.raises(InvalidInputError, match="not valid"):
        parse_callers(json.dumps({"name": "ops\n", "hash": "sha256$00", "roles": ["swap"]}))
    with pytest.raises(ValueError, match="caller name"):
        new_token("ops\n")


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


def test_empty_training_requests_are_refused(client: FacemuxClient) -> None:
    from facemux.v1 import training_service_pb2 as tr

    with pytest.raises(FacemuxRpcError) as info:
        client._call(client.training_stub.Train, tr.TrainRequest())
    assert info.value.code == C.INVALID_ARGUMENT
    assert "mode" in info.value.details
    # The raw stub raises grpc's own error type.
    with pytest.raises(grpc.RpcError) as raw:
        list(client.training_stub.WatchJob(tr.WatchJobRequest(id="x")))
    assert raw.value.code() == C.NOT_FOUND
    assert client.health() == "SERVING"


# -- more RPCs: Encode, SwapStream, full frames, hints, metadata --------------------------------

GIF_HTML = b"GIF89a\x01\x00\x01\x00\x00\x00\x00;<html><script>alert(1)</script></html>"
PNG_ZIP = GOOD + b"PK\x03\x04" + b"\x00" * 26 + b"evil.sh"  # PNG that is also a ZIP
JPEG_PNG = JPEG[:200] + GOOD  # JPEG header, PNG body
PNG_HUGE_CHUNK = GOOD[:33] + b"\xff\xff\xff\x00" + GOOD[37:]  # the first chunk after IHDR
SVG = b'<?xml version="1.0"?><svg xmlns="http://www.w3.org/2000/svg"/>'
WEBP_HEADER = b"RIFF\xff\xff\xff\x7fWEBPVP8 " + b"\x00" * 20


def _frame(image: tpb.Image, **options: Any) -> spb.SwapRequest:
    return spb.SwapRequest(identity="alice", frame=image, options=spb.SwapOptions(**options))


def _hint(*points: tuple[float, float]) -> spb.FaceHint:
    return spb.FaceHint(landmarks=[tpb.Point(x=x, y=y) for x, y in points])


FIVE = [(20.0, 20.0), (40.0, 20.0), (30.0, 30.0), (22.0, 40.0), (38.0, 40.0)]

MORE_CASES: list[tuple[str, str, Any, grpc.StatusCode, str]] = [
    ("GIF/HTML polyglot", "Swap", _swap(_enc(GIF_HTML)), C.INVALID_ARGUMENT, "not JPEG"),
    ("SVG", "Swap", _swap(_enc(SVG)), C.INVALID_ARGUMENT, "not JPEG"),
    # Found by fuzzing: a tiny PNG whose chunk claims 4 GiB made libpng allocate 4 GiB.
    ("PNG 4 GiB chunk", "Swap", _swap(_enc(PNG_HUGE_CHUNK)), C.INVALID_ARGUMENT, "claims"),
    ("JPEG header, PNG body", "Swap", _swap(_enc(JPEG_PNG)), C.INVALID_ARGUMENT, ""),
    ("bogus WebP", "Swap", _swap(_enc(WEBP_HEADER)), C.INVALID_ARGUMENT, ""),
    # Strict: bytes after the PNG's end marker are refused, not ignored.
    ("PNG+ZIP polyglot", "Swap", _swap(_enc(PNG_ZIP)), C.INVALID_ARGUMENT, "PNG"),
    ("frame: garbage", "Swap", _frame(_enc(b"\x00" * 64)), C.INVALID_ARGUMENT, "frame"),
    ("frame: bomb", "Swap", _frame(_enc(PNG_BOMB)), C.INVALID_ARGUMENT, "over the server limit"),
    (
        "frame: NaN landmarks",
        "Swap",
        _frame(_enc(GOOD), faces=[_hint(*([(math.nan, 1.0)] * 5))]),
        C.INVALID_ARGUMENT,
        "",
    ),
    (
        "frame: 3 landmarks",
        "Swap",
        _frame(_enc(GOOD), faces=[_hint(*FIVE[:3])]),
        C.INVALID_ARGUMENT,
        "landmarks",
    ),
    (
        "frame: mixed hints",
        "Swap",
        _frame(_enc(GOOD), faces=[_hint(*FIVE), spb.FaceHint()]),
        C.INVALID_ARGUMENT,
        "options.faces",
    ),
    (
        "encode: unknown latent format",
        "Encode",
        spb.EncodeRequest(faces=[_enc(GOOD)], format=99),
        C.INVALID_ARGUMENT,
        "LATENT_FORMAT_FLOAT32 or LATENT_FORMAT_FLOAT16",
    ),
    ("encode: no faces", "Encode", spb.EncodeRequest(), C.INVALID_ARGUMENT, "no faces"),
    (
        "encode: bomb split over images",
        "Encode",
        spb.EncodeRequest(faces=[_enc(_png_claiming(2000, 2000))] * 30),
        C.INVALID_ARGUMENT,
        "max_request_pixels",
    ),
    (
        "encode: truncated",
        "Encode",
        spb.EncodeRequest(faces=[_enc(GOOD[:100])]),
        C.INVALID_ARGUMENT,
        "truncated",
    ),
    (
        "decode: no identity",
        "Decode",
        spb.DecodeRequest(identity=""),
        C.INVALID_ARGUMENT,
        "no latents",
    ),
    (
        "stream: no identity",
        "SwapStream",
        [spb.SwapStreamRequest(frame=_enc(GOOD), aligned=True)],
        C.INVALID_ARGUMENT,
        "must name the identity",
    ),
    (
        "stream: traversal identity",
        "SwapStream",
        [spb.SwapStreamRequest(identity="../../etc/passwd", frame=_enc(GOOD), aligned=True)],
        C.OK,  # per-frame error: the stream goes on
        "invalid",
    ),
    (
        "stream: bomb frame",
        "SwapStream",
        [spb.SwapStreamRequest(identity="alice", frame=_enc(PNG_BOMB))],
        C.OK,  # per-frame error: the stream goes on
        "(setting max_image_pixels)",
    ),
    (
        "get: 10k-char name",
        "GetIdentity",
        ipb.GetIdentityRequest(name="a" * 10_000),
        C.INVALID_ARGUMENT,
        "invalid",
    ),
    (
        "get: NUL in name",
        "GetIdentity",
        ipb.GetIdentityRequest(name="alice\x00.json"),
        C.INVALID_ARGUMENT,
        "invalid",
    ),
    (
        "revoke: traversal",
        "RevokeConsent",
        ipb.RevokeConsentRequest(name="../bob"),
        C.INVALID_ARGUMENT,
        "invalid",
    ),
    (
        "record consent: traversal",
        "RecordConsent",
        ipb.RecordConsentRequest(name="../bob", consent=consent_record(CONSENT)),
        C.INVALID_ARGUMENT,
        "invalid",
    ),
    (
        "record consent: no record",
        "RecordConsent",
        ipb.RecordConsentRequest(name="bob"),
        C.INVALID_ARGUMENT,
        "consent record is required",
    ),
    (
        "record consent: unknown identity",
        "RecordConsent",
        ipb.RecordConsentRequest(name="nobody", consent=consent_record(CONSENT)),
        C.NOT_FOUND,
        "nobody",
    ),
]


def _invoke(client: FacemuxClient, rpc: str, request: Any, metadata: Any = None) -> Any:
    md = tuple(metadata or ()) + client.metadata
    if rpc == "SwapStream":
        return list(client.swap_stub.SwapStream(iter(request), timeout=30, metadata=md))
    stub = client.identity_stub if hasattr(client.identity_stub, rpc) else client.swap_stub
    return getattr(stub, rpc)(request, timeout=30, metadata=md)


@pytest.mark.parametrize(
    ("name", "rpc", "request_", "code", "words"), MORE_CASES, ids=[c[0] for c in MORE_CASES]
)
def test_more_bad_requests(
    client: FacemuxClient, name: str, rpc: str, request_: Any, code: grpc.StatusCode, words: str
) -> None:
    if code == C.OK:
        out = _invoke(client, rpc, request_)
        if rpc == "SwapStream":  # the error is reported per frame
            assert out[0].error.code == C.INVALID_ARGUMENT.value[0]
            assert words in out[0].error.message
    else:
        with pytest.raises(grpc.RpcError) as info:
            _invoke(client, rpc, request_)
        err: Any = info.value
        assert err.code() == code, err
        assert words in err.details()
    assert client.swap_faces([GOOD], "alice").faces_swapped == 1


def test_oversized_metadata_is_refused_and_server_survives(client: FacemuxClient) -> None:
    # gRPC's default limit for a header block is 8 KiB (soft) / 16 KiB (hard).
    with pytest.raises(grpc.RpcError) as info:
        _invoke(client, "Swap", _swap(_enc(GOOD)), [("x-junk", "y" * 64 * 1024)])
    err: Any = info.value
    # The code depends on which side of the connection notices first (gRPC's, not ours).
    assert err.code() in (C.RESOURCE_EXHAUSTED, C.INTERNAL, C.UNAVAILABLE), err
    print(f"\noversized metadata -> {err.code().name}: {err.details()}")
    assert client.swap_faces([GOOD], "alice").faces_swapped == 1


def test_verify_refuses_an_image_over_its_own_limit(client: FacemuxClient) -> None:
    with pytest.raises(FacemuxRpcError) as info:
        client.verify(PNG_BOMB)
    assert info.value.code == C.INVALID_ARGUMENT
    assert "(setting max_verify_pixels)" in info.value.details
    assert client.swap_faces([GOOD], "alice").faces_swapped == 1


def _with_header(header: Any, data: bytes = b"") -> bytes:
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + data


def _nested(depth: int) -> str:
    return "[" * depth + "]" * depth


def _decoder_with_metadata(checkpoint_bytes: bytes, edit: Callable[[dict[str, Any]], Any]) -> bytes:
    """The same tensors under an edited facemux metadata object (the weights' fingerprint
    does not cover the metadata, so only the JSON decides)."""
    (n,) = struct.unpack("<Q", checkpoint_bytes[:8])
    header = json.loads(checkpoint_bytes[8 : 8 + n])
    body = json.loads(header["__metadata__"]["facemux"])
    value = edit(body)
    header["__metadata__"]["facemux"] = value if isinstance(value, str) else json.dumps(body)
    return _with_header(header, checkpoint_bytes[8 + n :])


def test_deeply_nested_json_in_a_checkpoint_is_bad_input(
    client: FacemuxClient, models: Models
) -> None:
    """JSON nested thousands deep makes a recursive parser raise RecursionError; nested a
    few hundred deep it parses but breaks whatever walks it next (storing the summary).
    Either is the caller's bad input, refused before anything is stored."""
    data = models.decoders["carol"]
    meta = ipb.RegisterIdentityMetadata(name="newbie", consent=consent_record(CONSENT))

    def deep_summary(body: dict[str, Any]) -> None:
        body["summary"] = {"x": json.loads(_nested(500))}

    cases = {
        "header": _with_header(_nested(100_000).encode()),
        "header object": _with_header(b'{"a":' * 50_000 + b"1" + b"}" * 50_000),
        "facemux metadata": _decoder_with_metadata(data, lambda body: _nested(100_000)),
        "metadata summary": _decoder_with_metadata(data, deep_summary),
    }
    for name, blob in cases.items():
        with pytest.raises(FacemuxRpcError) as info:
            _register(
                client,
                [
                    ipb.RegisterIdentityRequest(metadata=meta),
                    ipb.RegisterIdentityRequest(chunk=blob),
                ],
            )
        assert info.value.code == C.INVALID_ARGUMENT, (name, info.value)
        assert "nests" in info.value.details and "at most 64" in info.value.details, name
        assert client.swap_faces([GOOD], "alice").faces_swapped == 1
    assert "newbie" not in {i.name for i in client.list_identities()}
