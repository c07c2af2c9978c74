"""The statuses the .proto comments document are the statuses the server returns.

Each RPC's leading comment lists its caller role and errors in a fixed format:

    // Role: swap
    // Errors:
    //   NOT_FOUND: when...
    //     (continuation lines are indented further)
    // Frame errors:            (SwapStream: codes carried in SwapStreamResponse.error)
    //   INVALID_ARGUMENT: ...

("Errors: none of its own." for an RPC without errors of its own), and types.proto lists
under "Errors of every RPC:" what any call may end with. This test parses those comments
and, for every documented status, makes a real server return it: a status documented but
never returned, or a trigger for an undocumented one, fails here.
"""

from __future__ import annotations

import re
import socket
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
from common import CONSENT, Models, face_image, make_store, png
from facemux.client.client import consent_record
from facemux.models import checkpoint
from facemux.service import auth
from facemux.service.server import ServerThread
from facemux.service.settings import Settings
from facemux.service.store import LocalStore, VersionRecord
from facemux.v1 import identity_service_pb2 as ipb
from facemux.v1 import provenance_service_pb2 as ppb
from facemux.v1 import swap_service_pb2 as spb
from facemux.v1 import training_service_pb2 as tpb
from facemux.v1 import types_pb2
from google.protobuf import descriptor_pool

C = grpc.StatusCode
PROTO_DIR = Path(__file__).resolve().parent.parent / "proto" / "facemux" / "v1"
SERVICES = ("SwapService", "IdentityService", "TrainingService", "ProvenanceService")
_CODE_LINE = re.compile(r"^  ([A-Z_]+): \S")


@dataclass
class RpcDoc:
    service: str
    role: str
    errors: set[str]
    frame_errors: set[str]


def _block(lines: list[str], header: str) -> set[str] | None:
    """Codes listed under `header` (None when the header is absent)."""
    for i, line in enumerate(lines):
        if line.startswith(header):
            rest = line[len(header) :].strip()
            if rest:
                assert rest == "none of its own.", f"unexpected text after {header!r}: {rest!r}"
                return set()
            codes: set[str] = set()
            for follow in lines[i + 1 :]:
                m = _CODE_LINE.match(follow)
                if m:
                    assert m.group(1) in C.__members__, f"unknown status {m.group(1)}"
                    assert m.group(1) not in codes, f"{m.group(1)} listed twice"
                    codes.add(m.group(1))
                elif not follow.startswith("    "):
                    break
            assert codes, f"{header} lists no status"
            return codes
    return None


def parse_docs() -> tuple[dict[str, RpcDoc], set[str]]:
    docs: dict[str, RpcDoc] = {}
    for path in sorted(PROTO_DIR.glob("*_service.proto")):
        text = path.read_text().splitlines()
        service = ""
        for i, line in enumerate(text):
            if line.startswith("service "):
                service = line.split()[1]
            m = re.match(r"\s+rpc (\w+)\(", line)
            if not m:
                continue
            comment: list[str] = []
            j = i - 1
            while j >= 0 and text[j].strip().startswith("//"):
                comment.insert(0, text[j].strip()[2:].removeprefix(" "))
                j -= 1
            roles = [c.split(":", 1)[1].strip() for c in comment if c.startswith("Role:")]
            assert len(roles) == 1, f"{m.group(1)}: one 'Role:' line"
            errors = _block(comment, "Errors:")
            assert errors is not None, f"{m.group(1)} has no 'Errors:' block"
            docs[m.group(1)] = RpcDoc(
                service, roles[0], errors, _block(comment, "Frame errors:") or set()
            )
    common_lines = [
        line[2:].removeprefix(" ")
        for line in (PROTO_DIR / "types.proto").read_text().splitlines()
        if line.startswith("//")
    ]
    common = _block(common_lines, "Errors of every RPC:")
    assert common is not None, "types.proto lists no errors of every RPC"
    return docs, common


DOCS, COMMON = parse_docs()


def test_every_rpc_is_documented_with_its_role() -> None:
    pool = descriptor_pool.Default()
    served = {
        m.name: s for s in SERVICES for m in pool.FindServiceByName(f"facemux.v1.{s}").methods
    }
    assert set(DOCS) == set(served)
    for rpc, doc in DOCS.items():
        assert doc.service == served[rpc]
        assert doc.role == auth.required_role(f"/facemux.v1.{doc.service}/{rpc}"), rpc


# -- servers ------------------------------------------------------------------------------

GOOD = png(face_image(0))


@dataclass
class World:
    srv: ServerThread
    channel: grpc.Channel
    idle: grpc.Channel  # a server whose model never loads (no encoder in its store)
    idle_srv: ServerThread
    models: Models
    store: Path


def _settings(store: Path, **kw: Any) -> Settings:
    return Settings(
        port=0,
        auth="off",
        store=store,
        metrics_port=-1,
        max_message_bytes=4 * 1024 * 1024,
        max_image_pixels=4_000_000,
        max_dataset_faces=3,
        **kw,
    )


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory, models: Models) -> Iterator[World]:
    root = tmp_path_factory.mktemp("errors")
    store = make_store(root / "store", models, ("alice", "bob", "carol"))
    data = models.decoders["bob"]
    _, meta = checkpoint.read_decoder(data)
    store.add_version("bob", data, VersionRecord.for_decoder(meta))  # v2; v1 stays default
    store.revoke_consent("carol", "withdrawn")
    LocalStore(root / "idle")  # no encoder: the model never loads
    with (
        ServerThread(_settings(root / "store")) as srv,
        ServerThread(_settings(root / "idle")) as idle_srv,
    ):
        channel = grpc.insecure_channel(srv.target)
        idle = grpc.insecure_channel(idle_srv.target)
        from facemux.client import FacemuxClient

        with FacemuxClient(srv.target) as c:
            c.wait_ready(30)
        yield World(srv, channel, idle, idle_srv, models, root / "store")
        channel.close()
        idle.close()


def _stub(channel: grpc.Channel, rpc: str) -> Any:
    from facemux.v1 import (
        identity_service_pb2_grpc,
        provenance_service_pb2_grpc,
        swap_service_pb2_grpc,
        training_service_pb2_grpc,
    )

    module = {
        "SwapService": swap_service_pb2_grpc,
        "IdentityService": identity_service_pb2_grpc,
        "TrainingService": training_service_pb2_grpc,
        "ProvenanceService": provenance_service_pb2_grpc,
    }[DOCS[rpc].service]
    return getattr(getattr(module, f"{DOCS[rpc].service}Stub")(channel), rpc)


def status(call: Callable[[], Any]) -> grpc.StatusCode:
    try:
        out = call()
        if isinstance(out, Iterator):
            list(out)
    except grpc.RpcError as err:
        return err.code()
    return C.OK


def _rpc(w: World, rpc: str, request: Any, idle: bool = False) -> grpc.StatusCode:
    return status(lambda: _stub(w.idle if idle else w.channel, rpc)(request, timeout=30))


def _frames(w: World, *reqs: spb.SwapStreamRequest, idle: bool = False) -> Any:
    return list(_stub(w.idle if idle else w.channel, "SwapStream")(iter(reqs), timeout=30))


def _stream_status(w: World, *reqs: spb.SwapStreamRequest, idle: bool = False) -> grpc.StatusCode:
    return status(lambda: _frames(w, *reqs, idle=idle))


def _frame_error(w: World, req: spb.SwapStreamRequest) -> grpc.StatusCode:
    (resp,) = _frames(w, req)
    assert resp.HasField("error"), resp
    return next(c for c in C if c.value[0] == resp.error.code)


def _latent(w: World, fingerprint: str = "") -> types_pb2.Latent:
    shape = list(w.models.config.latent_shape)
    n = 1
    for d in shape:
        n *= d
    return types_pb2.Latent(
        shape=shape,
        format=types_pb2.LATENT_FORMAT_FLOAT32,
        data=b"\x00" * (4 * n),
        encoder_fingerprint=fingerprint or w.models.fingerprint,
    )


def _faces(*imgs: bytes) -> spb.FaceBatch:
    return spb.FaceBatch(faces=[types_pb2.Image(encoded=i) for i in imgs])


def _register(w: World, parts: list[ipb.RegisterIdentityRequest], idle: bool = False) -> Any:
    return status(
        lambda: _stub(w.idle if idle else w.channel, "RegisterIdentity")(iter(parts), timeout=30)
    )


def _meta(name: str, **kw: Any) -> ipb.RegisterIdentityRequest:
    return ipb.RegisterIdentityRequest(metadata=ipb.RegisterIdentityMetadata(name=name, **kw))


def _upload(w: World, parts: list[tpb.UploadDatasetRequest]) -> grpc.StatusCode:
    return status(lambda: _stub(w.channel, "UploadDataset")(iter(parts), timeout=30))


def _image(data: bytes) -> tpb.UploadDatasetRequest:
    return tpb.UploadDatasetRequest(image=types_pb2.Image(encoded=data))


def _upload_meta(name: str) -> tpb.UploadDatasetRequest:
    return tpb.UploadDatasetRequest(metadata=tpb.UploadDatasetMetadata(name=name, aligned=True))


def _racing_upload(w: World) -> grpc.StatusCode:
    """Another upload creates the dataset at another resolution while this one streams."""
    datasets = w.srv.app.training.datasets
    root = datasets.root

    def parts() -> Iterator[tpb.UploadDatasetRequest]:
        before = {p.name for p in root.iterdir()}
        yield _upload_meta("racy")
        deadline = time.monotonic() + 20
        while not {p.name for p in root.iterdir()} - before:  # the server's staging dir
            assert time.monotonic() < deadline, "the upload never began"
            time.sleep(0.01)
        res = w.models.config.resolution // 2  # not the served model's: the two disagree
        other = datasets.begin_upload("racy", res)
        other.add(0, (face_image(5, res), None))
        other.commit()
        yield _image(GOOD)

    return status(lambda: _stub(w.channel, "UploadDataset")(parts(), timeout=30))


def _train(w: World, idle: bool = False, **kw: Any) -> grpc.StatusCode:
    return _rpc(w, "Train", tpb.TrainRequest(**kw), idle=idle)


def _identity_train(identity: str, dataset: str, consent: bool = True) -> dict[str, Any]:
    return {
        "mode": tpb.TRAIN_MODE_IDENTITY,
        "identity": identity,
        "datasets": [dataset],
        "consent": consent_record(CONSENT) if consent else None,
    }


def _expired_consent() -> types_pb2.ConsentRecord:
    return consent_record({**CONSENT, "granted_at": "2020-01-01", "expires_at": "2021-01-01"})


Trigger = Callable[[World], grpc.StatusCode]
ALIGNED = {"aligned": True, "frame": types_pb2.Image(encoded=GOOD)}

TRIGGERS: dict[tuple[str, str], Trigger] = {
    # SwapService
    ("Swap", "INVALID_ARGUMENT"): lambda w: _rpc(w, "Swap", spb.SwapRequest(identity="alice")),
    ("Swap", "NOT_FOUND"): lambda w: _rpc(
        w, "Swap", spb.SwapRequest(identity="nobody", faces=_faces(GOOD))
    ),
    ("Swap", "FAILED_PRECONDITION"): lambda w: _rpc(
        w, "Swap", spb.SwapRequest(identity="carol", faces=_faces(GOOD))
    ),
    ("Swap", "UNAVAILABLE"): lambda w: _rpc(
        w, "Swap", spb.SwapRequest(identity="alice", faces=_faces(GOOD)), idle=True
    ),
    ("SwapStream", "INVALID_ARGUMENT"): lambda w: _stream_status(
        w, spb.SwapStreamRequest(**ALIGNED)
    ),
    ("SwapStream", "UNAVAILABLE"): lambda w: _stream_status(
        w, spb.SwapStreamRequest(identity="alice", **ALIGNED), idle=True
    ),
    ("Encode", "INVALID_ARGUMENT"): lambda w: _rpc(w, "Encode", spb.EncodeRequest()),
    ("Encode", "UNAVAILABLE"): lambda w: _rpc(
        w, "Encode", spb.EncodeRequest(faces=[types_pb2.Image(encoded=GOOD)]), idle=True
    ),
    ("Decode", "INVALID_ARGUMENT"): lambda w: _rpc(w, "Decode", spb.DecodeRequest(identity="bob")),
    ("Decode", "NOT_FOUND"): lambda w: _rpc(
        w, "Decode", spb.DecodeRequest(identity="nobody", latents=[_latent(w)])
    ),
    ("Decode", "FAILED_PRECONDITION"): lambda w: _rpc(
        w, "Decode", spb.DecodeRequest(identity="bob", latents=[_latent(w, "f" * 64)])
    ),
    ("Decode", "UNAVAILABLE"): lambda w: _rpc(
        w, "Decode", spb.DecodeRequest(identity="bob", latents=[_latent(w)]), idle=True
    ),
    ("GetModelInfo", "UNAVAILABLE"): lambda w: _rpc(
        w, "GetModelInfo", spb.GetModelInfoRequest(), idle=True
    ),
    # IdentityService
    ("RegisterIdentity", "INVALID_ARGUMENT"): lambda w: _register(
        w, [ipb.RegisterIdentityRequest(chunk=b"x")]
    ),
    ("RegisterIdentity", "FAILED_PRECONDITION"): lambda w: _register(
        w, [_meta("carol"), ipb.RegisterIdentityRequest(chunk=w.models.decoders["carol"])]
    ),
    ("RegisterIdentity", "RESOURCE_EXHAUSTED"): lambda w: _register(
        w, [_meta("newbie", consent=consent_record(CONSENT), size_bytes=1 << 40)]
    ),
    ("RegisterIdentity", "UNAVAILABLE"): lambda w: _register(
        w,
        [
            _meta("newbie", consent=consent_record(CONSENT)),
            ipb.RegisterIdentityRequest(chunk=w.models.decoders["alice"]),
        ],
        idle=True,
    ),
    ("ListIdentities", "INVALID_ARGUMENT"): lambda w: _rpc(
        w, "ListIdentities", ipb.ListIdentitiesRequest(page_token="!!")
    ),
    ("GetIdentity", "INVALID_ARGUMENT"): lambda w: _rpc(
        w, "GetIdentity", ipb.GetIdentityRequest(name="../etc")
    ),
    ("GetIdentity", "NOT_FOUND"): lambda w: _rpc(
        w, "GetIdentity", ipb.GetIdentityRequest(name="nobody")
    ),
    ("DeleteIdentity", "INVALID_ARGUMENT"): lambda w: _rpc(
        w, "DeleteIdentity", ipb.DeleteIdentityRequest(name="../etc")
    ),
    ("DeleteIdentity", "NOT_FOUND"): lambda w: _rpc(
        w, "DeleteIdentity", ipb.DeleteIdentityRequest(name="bob", version=99)
    ),
    ("DeleteIdentity", "FAILED_PRECONDITION"): lambda w: _rpc(
        w, "DeleteIdentity", ipb.DeleteIdentityRequest(name="bob", version=1)
    ),
    ("SetDefaultVersion", "INVALID_ARGUMENT"): lambda w: _rpc(
        w, "SetDefaultVersion", ipb.SetDefaultVersionRequest(name="bob", version=0)
    ),
    ("SetDefaultVersion", "NOT_FOUND"): lambda w: _rpc(
        w, "SetDefaultVersion", ipb.SetDefaultVersionRequest(name="bob", version=99)
    ),
    ("RevokeConsent", "INVALID_ARGUMENT"): lambda w: _rpc(
        w, "RevokeConsent", ipb.RevokeConsentRequest(name="../etc")
    ),
    ("RevokeConsent", "NOT_FOUND"): lambda w: _rpc(
        w, "RevokeConsent", ipb.RevokeConsentRequest(name="nobody")
    ),
    ("RecordConsent", "INVALID_ARGUMENT"): lambda w: _rpc(
        w, "RecordConsent", ipb.RecordConsentRequest(name="bob")
    ),
    ("RecordConsent", "NOT_FOUND"): lambda w: _rpc(
        w,
        "RecordConsent",
        ipb.RecordConsentRequest(name="nobody", consent=consent_record(CONSENT)),
    ),
    ("RecordConsent", "FAILED_PRECONDITION"): lambda w: _rpc(
        w, "RecordConsent", ipb.RecordConsentRequest(name="bob", consent=_expired_consent())
    ),
    # TrainingService
    ("UploadDataset", "INVALID_ARGUMENT"): lambda w: _upload(w, [_image(GOOD)]),
    ("UploadDataset", "RESOURCE_EXHAUSTED"): lambda w: _upload(
        w, [_upload_meta("many")] + [_image(png(face_image(i))) for i in range(4)]
    ),
    ("UploadDataset", "FAILED_PRECONDITION"): _racing_upload,
    ("DeleteDataset", "INVALID_ARGUMENT"): lambda w: _rpc(
        w, "DeleteDataset", tpb.DeleteDatasetRequest(name="../etc")
    ),
    ("DeleteDataset", "NOT_FOUND"): lambda w: _rpc(
        w, "DeleteDataset", tpb.DeleteDatasetRequest(name="nothing")
    ),
    ("Train", "INVALID_ARGUMENT"): lambda w: _train(w, datasets=["d"]),
    ("Train", "NOT_FOUND"): lambda w: _train(w, **_identity_train("newbie", "nothing")),
    ("Train", "FAILED_PRECONDITION"): lambda w: _train(
        w, **_identity_train("carol", "nothing", consent=False)
    ),
    ("Train", "UNAVAILABLE"): lambda w: _train(
        w, idle=True, **_identity_train("newbie", "nothing")
    ),
    ("WatchJob", "NOT_FOUND"): lambda w: _rpc(w, "WatchJob", tpb.WatchJobRequest(id="nojob")),
    ("GetJob", "NOT_FOUND"): lambda w: _rpc(w, "GetJob", tpb.GetJobRequest(id="nojob")),
    ("CancelJob", "NOT_FOUND"): lambda w: _rpc(w, "CancelJob", tpb.CancelJobRequest(id="nojob")),
    # ProvenanceService
    ("Verify", "INVALID_ARGUMENT"): lambda w: _rpc(w, "Verify", ppb.VerifyRequest()),
}

FRAME_TRIGGERS: dict[tuple[str, str], Callable[[World], grpc.StatusCode]] = {
    ("SwapStream", "INVALID_ARGUMENT"): lambda w: _frame_error(
        w,
        spb.SwapStreamRequest(
            identity="alice", aligned=True, frame=types_pb2.Image(encoded=b"junk")
        ),
    ),
    ("SwapStream", "NOT_FOUND"): lambda w: _frame_error(
        w, spb.SwapStreamRequest(identity="nobody", **ALIGNED)
    ),
    ("SwapStream", "FAILED_PRECONDITION"): lambda w: _frame_error(
        w, spb.SwapStreamRequest(identity="carol", **ALIGNED)
    ),
}

DOCUMENTED = sorted((rpc, code) for rpc, d in DOCS.items() for code in d.errors)
DOCUMENTED_FRAMES = sorted((rpc, code) for rpc, d in DOCS.items() for code in d.frame_errors)


def test_each_documented_status_has_a_trigger() -> None:
    assert set(TRIGGERS) == set(DOCUMENTED)
    assert set(FRAME_TRIGGERS) == set(DOCUMENTED_FRAMES)


@pytest.mark.parametrize(("rpc", "code"), DOCUMENTED, ids=[f"{r}-{c}" for r, c in DOCUMENTED])
def test_documented_status(world: World, rpc: str, code: str) -> None:
    assert TRIGGERS[(rpc, code)](world) == C[code]


@pytest.mark.parametrize(
    ("rpc", "code"), DOCUMENTED_FRAMES, ids=[f"{r}-{c}" for r, c in DOCUMENTED_FRAMES]
)
def test_documented_frame_error(world: World, rpc: str, code: str) -> None:
    assert FRAME_TRIGGERS[(rpc, code)](world) == C[code]
    # A frame's error ends nothing: the stream still swaps the next frame.
    out = _frames(
        world,
        spb.SwapStreamRequest(identity="nobody", frame_index=0, **ALIGNED),
        spb.SwapStreamRequest(identity="alice", frame_index=1, **ALIGNED),
    )
    assert out[0].HasField("error") and out[1].faces_swapped == 1


# -- errors of every RPC ------------------------------------------------------------------


def _raw(channel: grpc.Channel, rpc: str, payload: bytes, **kw: Any) -> grpc.StatusCode:
    """The RPC called with raw request bytes, whatever its kind of stream."""
    doc = DOCS[rpc]
    method = descriptor_pool.Default().FindMethodByName(f"facemux.v1.{doc.service}.{rpc}")
    path = f"/facemux.v1.{doc.service}/{rpc}"
    kw.setdefault("timeout", 30)
    if method.client_streaming and method.server_streaming:
        return status(lambda: list(channel.stream_stream(path)(iter([payload]), **kw)))
    if method.client_streaming:
        return status(lambda: channel.stream_unary(path)(iter([payload]), **kw))
    if method.server_streaming:
        return status(lambda: list(channel.unary_stream(path)(payload, **kw)))
    return status(lambda: channel.unary_unary(path)(payload, **kw))


@pytest.fixture(scope="module")
def guarded(tmp_path_factory: pytest.TempPathFactory, models: Models) -> Iterator[Any]:
    """A server that checks bearer tokens, and a token for a swap-only and a train-only
    caller."""
    root = tmp_path_factory.mktemp("guarded")
    make_store(root / "store", models)
    lines, tokens = [], {}
    for name, role in (("swapper", "swap"), ("trainer", "train")):
        entry, tokens[role] = auth.make_entry(name, [role], scheme="sha256")
        import json

        lines.append(json.dumps(entry))
    (root / "callers.jsonl").write_text("\n".join(lines) + "\n")
    settings = Settings(
        port=0,
        auth="tokens",
        auth_tokens_file=str(root / "callers.jsonl"),
        store=root / "store",
        metrics_port=-1,
    )
    with ServerThread(settings) as srv:
        channel = grpc.insecure_channel(srv.target)
        yield channel, tokens
        channel.close()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _common(world: World, guarded: Any, rpc: str, code: str) -> grpc.StatusCode:
    channel, tokens = guarded
    if code == "UNAUTHENTICATED":
        return _raw(channel, rpc, b"")
    if code == "PERMISSION_DENIED":
        other = "train" if DOCS[rpc].role == "swap" else "swap"
        return _raw(channel, rpc, b"", metadata=[("authorization", f"Bearer {tokens[other]}")])
    if code == "INVALID_ARGUMENT":
        return _raw(world.channel, rpc, b"", metadata=[("x-request-id", "not valid")])
    if code == "RESOURCE_EXHAUSTED":
        limit = auth.message_limit(f"/facemux.v1.{DOCS[rpc].service}/{rpc}", 4 * 1024 * 1024)
        return _raw(world.channel, rpc, b"\x00" * (limit + 1))
    if code == "UNAVAILABLE":
        with grpc.insecure_channel(f"127.0.0.1:{_free_port()}") as nowhere:
            return _raw(nowhere, rpc, b"", timeout=10)
    raise AssertionError(f"no trigger for {code}, documented for every RPC")


COMMON_CASES = sorted(
    (rpc, code)
    for rpc in DOCS
    for code in COMMON
    if not (code == "PERMISSION_DENIED" and DOCS[rpc].role == "any")
)


@pytest.mark.parametrize(("rpc", "code"), COMMON_CASES, ids=[f"{r}-{c}" for r, c in COMMON_CASES])
def test_status_of_every_rpc(world: World, guarded: Any, rpc: str, code: str) -> None:
    assert _common(world, guarded, rpc, code) == C[code]
