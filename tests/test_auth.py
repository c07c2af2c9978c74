"""Authentication, roles, per-caller limits and the audit trail, over a real server."""

from __future__ import annotations

import contextlib
import io
import json
import threading
import time
from collections.abc import Iterator
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import grpc
import pytest
from common import CONSENT, Models, face_image, make_store, png
from facemux.client import FacemuxClient
from facemux.client.cli import main as cli_main
from facemux.client.errors import FacemuxRpcError
from facemux.models.errors import InvalidInputError
from facemux.service import auth
from facemux.service.server import ServerThread
from facemux.service.settings import Settings
from facemux.v1 import swap_service_pb2 as spb
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

C = grpc.StatusCode
FACE = png(face_image(0))

# name -> roles; sha256 hashes keep the suite fast (scrypt is covered on its own below).
CALLERS = {"swapper": ["swap"], "trainer": ["train"], "root": ["admin", "swap", "train"]}


def write_callers(path: Path, callers: dict[str, list[str]], scheme: str = "sha256") -> dict:
    tokens, lines = {}, []
    for name, roles in callers.items():
        entry, token = auth.make_entry(name, roles, scheme=scheme)
        tokens[name] = token
        lines.append(json.dumps(entry))
    path.write_text("\n".join(lines) + "\n")
    return tokens


@pytest.fixture
def secured(tmp_path: Path, models: Models) -> Iterator[tuple[ServerThread, dict[str, str], Path]]:
    make_store(tmp_path / "store", models, ("alice", "bob"))
    tokens = write_callers(tmp_path / "callers.jsonl", CALLERS)
    audit = tmp_path / "audit" / "audit.log"
    settings = Settings(
        port=0,
        store=tmp_path / "store",
        auth="tokens",
        auth_tokens_file=str(tmp_path / "callers.jsonl"),
        audit_log=str(audit),
        metrics_port=-1,
        auth_reload_seconds=0.1,  # a changed callers file applies within 0.1 s (1 s default)
    )
    with ServerThread(settings) as srv:
        with FacemuxClient(srv.target, timeout=30, retries=1) as c:
            c.wait_ready(30)  # health is open: no token needed
        yield srv, tokens, audit


def _client(srv: ServerThread, token: str | None = None, **kw: object) -> FacemuxClient:
    return FacemuxClient(srv.target, timeout=30, retries=1, token=token, **kw)


def test_roles_allow_and_deny(
    secured: tuple[ServerThread, dict[str, str], Path], models: Models
) -> None:
    srv, tokens, _ = secured
    with _client(srv, tokens["swapper"]) as c:
        assert c.swap_faces([FACE], "alice").faces_swapped == 1
        assert c.model_info().resolution == 64  # any authenticated caller
        assert {i.name for i in c.list_identities()} == {"alice", "bob"}
        with pytest.raises(FacemuxRpcError) as info:
            c.register_identity("carol", models.decoders["carol"], consent=CONSENT)
        assert info.value.code == C.PERMISSION_DENIED and "'admin' role" in info.value.details
        with pytest.raises(FacemuxRpcError) as info:
            c.delete_identity("alice")
        assert info.value.code == C.PERMISSION_DENIED
    with _client(srv, tokens["trainer"]) as c:
        with pytest.raises(FacemuxRpcError) as info:
            c.swap_faces([FACE], "alice")
        assert info.value.code == C.PERMISSION_DENIED and "'swap' role" in info.value.details
    with _client(srv, tokens["root"]) as c:
        assert c.register_identity("carol", models.decoders["carol"], consent=CONSENT).version == 1
        assert c.swap_faces([FACE], "carol").faces_swapped == 1


MALFORMED: list[tuple[str, list[tuple[str, str]]]] = [
    ("no authorization", []),
    ("empty", [("authorization", "")]),
    ("scheme only", [("authorization", "Bearer")]),
    ("basic scheme", [("authorization", "Basic dXNlcjpwYXNz")]),
    ("no dot", [("authorization", "Bearer abcdef")]),
    ("unknown caller", [("authorization", "Bearer nobody.secret")]),
    ("wrong secret", [("authorization", "Bearer swapper.not-the-secret")]),
    ("huge token", [("authorization", "Bearer swapper." + "x" * 4000)]),
    ("two headers", [("authorization", "Bearer a.b"), ("authorization", "Bearer c.d")]),
    ("colon form", [("authorization", "Bearer swapper:secret")]),
]


@pytest.mark.parametrize(("name", "metadata"), MALFORMED, ids=[m[0] for m in MALFORMED])
def test_bad_credentials_are_unauthenticated(
    secured: tuple[ServerThread, dict[str, str], Path], name: str, metadata: list
) -> None:
    srv, tokens, _ = secured
    with _client(srv, metadata=metadata) as c:
        with pytest.raises(FacemuxRpcError) as info:
            c.swap_faces([FACE], "alice")
        assert info.value.code == C.UNAUTHENTICATED, info.value
    with _client(srv, tokens["swapper"]) as c:  # and the server keeps serving
        assert c.swap_faces([FACE], "alice").faces_swapped == 1


def test_health_and_reflection_stay_open(
    secured: tuple[ServerThread, dict[str, str], Path],
) -> None:
    srv, _, _ = secured
    with grpc.insecure_channel(srv.target) as ch:
        resp = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=10)
        assert resp.status == health_pb2.HealthCheckResponse.SERVING
        stub = reflection_pb2_grpc.ServerReflectionStub(ch)
        answers = list(
            stub.ServerReflectionInfo(
                iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=10
            )
        )
        names = {s.name for s in answers[0].list_services_response.service}
        assert "facemux.v1.SwapService" in names


def test_audit_trail(secured: tuple[ServerThread, dict[str, str], Path], models: Models) -> None:
    srv, tokens, audit = secured
    with _client(srv, tokens["root"]) as c:
        c.swap_faces([FACE, FACE], "alice", request_id="req-42")
        c.register_identity("carol", models.decoders["carol"], consent=CONSENT)
        c.revoke_consent("carol", "withdrawn")
        with pytest.raises(FacemuxRpcError):
            c.swap_faces([FACE], "carol")
        list(c.swap_stream([FACE, FACE, FACE], "bob", aligned=True))
        c.get_identity("alice")  # read-only: not audited
    with _client(srv, tokens["swapper"]) as c, pytest.raises(FacemuxRpcError):
        c.delete_identity("alice")
    lines = audit.read_text().splitlines()
    rows = [json.loads(line) for line in lines]
    assert [r["rpc"] for r in rows] == [
        "Swap",
        "RegisterIdentity",
        "RevokeConsent",
        "Swap",
        "SwapStream",
        "DeleteIdentity",
    ]
    swap, reg, _, refused, stream, denied = rows
    assert swap["caller"] == "root" and swap["identity"] == "alice"
    assert swap["faces_swapped"] == 2 and swap["request_id"] == "req-42"
    assert swap["identity_version"] == 1 and swap["status"] == "OK"
    assert reg["identity"] == "carol" and reg["identity_version"] == 1 and reg["status"] == "OK"
    assert refused["status"] == "FAILED_PRECONDITION" and refused["identity"] == "carol"
    assert stream["faces_swapped"] == 3 and stream["identity"] == "bob"
    # Refused for its role: the caller is verified, and the reason is recorded.
    assert denied["status"] == "PERMISSION_DENIED" and denied["caller"] == "swapper"
    assert "'admin' role" in denied["reason"]
    for r in rows:
        assert {"time", "caller", "rpc", "identity", "request_id", "status"} <= set(r)
    # Never image content: every line is short.
    assert max(len(line) for line in lines) < 600


def test_record_consent_is_an_admins_audited_act(
    secured: tuple[ServerThread, dict[str, str], Path],
) -> None:
    """Lifting a revocation is RecordConsent alone: admin only, and on the audit trail."""
    srv, tokens, audit = secured
    fresh = {**CONSENT, "evidence_ref": "TICKET-7"}
    with _client(srv, tokens["root"]) as c:
        c.revoke_consent("bob", "withdrawn")
    for name in ("trainer", "swapper"):
        with _client(srv, tokens[name]) as c, pytest.raises(FacemuxRpcError) as info:
            c.record_consent("bob", fresh)
        assert info.value.code == C.PERMISSION_DENIED and "'admin' role" in info.value.details
    with _client(srv, tokens["root"]) as c:
        assert c.get_identity("bob").consent.HasField("revoked_at")  # still revoked
        assert c.record_consent("bob", fresh).consent.evidence_ref == "TICKET-7"
        assert c.swap_faces([FACE], "bob").faces_swapped == 1
    rows = [json.loads(line) for line in audit.read_text().splitlines()]
    recorded = [
        (r["caller"], r["identity"], r["status"]) for r in rows if r["rpc"] == "RecordConsent"
    ]
    # A role refusal names the verified caller; its body was never read, so no identity.
    assert recorded == [
        ("trainer", "", "PERMISSION_DENIED"),
        ("swapper", "", "PERMISSION_DENIED"),
        ("root", "bob", "OK"),
    ]


def test_tokens_file_reloads_without_restart(
    secured: tuple[ServerThread, dict[str, str], Path], tmp_path: Path
) -> None:
    srv, tokens, _ = secured
    path = tmp_path / "callers.jsonl"
    new = write_callers(path, {"newcomer": ["swap"]})  # swapper is gone, newcomer arrives
    deadline = time.monotonic() + 10
    ok = False
    while time.monotonic() < deadline and not ok:
        time.sleep(0.15)
        with _client(srv, new["newcomer"]) as c, contextlib.suppress(FacemuxRpcError):
            ok = c.swap_faces([FACE], "alice").faces_swapped == 1
    assert ok
    with _client(srv, tokens["swapper"]) as c, pytest.raises(FacemuxRpcError) as info:
        c.swap_faces([FACE], "alice")
    assert info.value.code == C.UNAUTHENTICATED


def test_scrypt_hashes_and_cli_helper() -> None:
    entry, token = auth.make_entry("svc", ["swap"])
    assert entry["hash"].startswith("scrypt$") and token not in json.dumps(entry)
    assert auth.check_hash(token, entry["hash"])
    assert not auth.check_hash(token + "x", entry["hash"])
    assert not auth.check_hash(token, "scrypt$garbage")
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        assert cli_main(["tokens", "hash", "ci-bot", "--roles", "swap,train"]) == 0
    line = json.loads(out.getvalue())
    shown = err.getvalue().rsplit(" ", 1)[-1].strip()
    assert line["name"] == "ci-bot" and line["roles"] == ["swap", "train"]
    assert shown.startswith("ci-bot.") and shown not in out.getvalue()
    assert auth.check_hash(shown, line["hash"])
    assert auth.parse_callers(out.getvalue())["ci-bot"].roles == {"swap", "train"}


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ('{"name": "a", "token": "a.b", "roles": ["swap"]}', "plain-text"),
        ('{"name": "a", "hash": "md5$x", "roles": ["swap"]}', "scrypt$"),
        ('{"name": "a", "hash": "sha256$00", "roles": ["root"]}', "roles"),
        ('{"name": "../a", "hash": "sha256$00", "roles": []}', "not valid"),
        ("not json", "not JSON"),
        ('{"name": "a", "roles": ["swap"]}', "hash or a certificate"),
    ],
)
def test_bad_callers_files_are_refused(text: str, words: str) -> None:
    with pytest.raises(InvalidInputError, match=words.replace("$", r"\$")):
        auth.parse_callers(text)


def test_auth_is_off_only_explicitly(tmp_path: Path, models: Models) -> None:
    make_store(tmp_path / "store", models)
    with pytest.raises(InvalidInputError, match="auth=off explicitly"):
        ServerThread(Settings(port=0, store=tmp_path / "store", metrics_port=-1)).start()
    with pytest.raises(InvalidInputError, match="tls_client_ca"):
        ServerThread(
            Settings(
                port=0,
                store=tmp_path / "store",
                metrics_port=-1,
                auth="mtls",
                auth_tokens_file=str(tmp_path / "x"),
            )
        ).start()
    with pytest.raises(InvalidInputError, match="auth"):
        Settings(auth="maybe")


def test_rate_limit_and_stream_limit(tmp_path: Path, models: Models) -> None:
    make_store(tmp_path / "store", models, ("alice",))
    tokens = write_callers(tmp_path / "callers.jsonl", {"swapper": ["swap"]})
    settings = Settings(
        port=0,
        store=tmp_path / "store",
        auth_tokens_file=str(tmp_path / "callers.jsonl"),
        audit_log="",
        metrics_port=-1,
        rate_limit_per_second=0.5,
        rate_limit_burst=3,
        max_streams_per_caller=1,
    )
    with ServerThread(settings) as srv, _client(srv, tokens["swapper"]) as c:
        c.wait_ready(30)
        release = threading.Event()

        def frames() -> Iterator[spb.SwapStreamRequest]:
            yield spb.SwapStreamRequest(identity="alice", aligned=True, frame=_img())
            release.wait(20)

        first = c.swap_stub.SwapStream(frames(), timeout=30, metadata=c.metadata)
        assert next(first).faces_swapped == 1  # stream 1 open (call 1 of the burst)
        with pytest.raises(FacemuxRpcError) as info:
            list(c.swap_stream([FACE], "alice", aligned=True))  # call 2
        assert info.value.code == C.RESOURCE_EXHAUSTED
        assert "max_streams_per_caller" in info.value.details
        release.set()
        list(first)
        c.swap_faces([FACE], "alice")  # call 3: the burst is spent
        with pytest.raises(grpc.RpcError) as raw:
            c.swap_stub.Swap(
                spb.SwapRequest(identity="alice", faces=spb.FaceBatch(faces=[_img()])),
                metadata=c.metadata,
                timeout=10,
            )
        err = raw.value
        assert err.code() == C.RESOURCE_EXHAUSTED
        assert "rate_limit_per_second" in err.details()
        trailers = dict(err.trailing_metadata())
        assert int(trailers["retry-after"]) >= 1
        with pytest.raises(FacemuxRpcError) as info:
            c.swap_faces([FACE], "alice")
        assert info.value.retry_after is not None and info.value.retry_after >= 1
        # Health is never rate limited.
        assert c.health() == "SERVING"


def _img() -> object:
    from facemux.v1 import types_pb2

    return types_pb2.Image(encoded=FACE)
