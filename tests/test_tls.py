"""TLS and mTLS with certificates generated on the fly; certificate reload without restart."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from certs import make_ca, make_leaf, write
from common import Models, face_image, make_store, png
from facemux.client import FacemuxClient
from facemux.client.errors import FacemuxRpcError
from facemux.service import auth
from facemux.service.server import ServerThread
from facemux.service.settings import Settings

FACE = png(face_image(0))
FACEMUX = str(Path(sys.executable).parent / "facemux")


def _settings(tmp_path: Path, **kw: object) -> Settings:
    return Settings(port=0, store=tmp_path / "store", metrics_port=-1, audit_log="", **kw)


def test_tls_with_tokens_and_live_certificate_reload(tmp_path: Path, models: Models) -> None:
    make_store(tmp_path / "store", models, ("alice",))
    ca1, ca2 = make_ca("CA one"), make_ca("CA two")
    certs = tmp_path / "certs"
    cert, key = write(certs, "server", make_leaf(ca1, "localhost", server=True))
    (certs / "ca1.crt").write_bytes(ca1.cert)
    (certs / "ca2.crt").write_bytes(ca2.cert)
    entry, token = auth.make_entry("swapper", ["swap"], scheme="sha256")
    (tmp_path / "callers.jsonl").write_text(json.dumps(entry) + "\n")
    settings = _settings(
        tmp_path,
        tls_cert=str(cert),
        tls_key=str(key),
        auth_tokens_file=str(tmp_path / "callers.jsonl"),
    )
    with ServerThread(settings) as srv:
        with FacemuxClient(srv.target, timeout=20, retries=1, ca=ca1.cert, token=token) as c:
            c.wait_ready(30)
            assert c.swap_faces([FACE], "alice").faces_swapped == 1
        # Plain text against a TLS port fails; so does a client that trusts another CA.
        for ca in (None, ca2.cert):
            with (
                FacemuxClient(srv.target, timeout=5, retries=1, ca=ca, token=token) as c,
                pytest.raises(FacemuxRpcError),
            ):
                c.swap_faces([FACE], "alice")

        # Renew: a certificate from CA two replaces the files; no restart.
        renewed = make_leaf(ca2, "localhost", server=True)
        key.write_bytes(renewed.key)
        cert.write_bytes(renewed.cert)
        later = time.time() + 5
        for p in (cert, key):
            os.utime(p, (later, later))
        with FacemuxClient(srv.target, timeout=20, retries=1, ca=ca2.cert, token=token) as c:
            assert c.swap_faces([FACE], "alice").faces_swapped == 1
        # The CLI speaks TLS too, with the token from a file.
        (tmp_path / "token").write_text(token + "\n")
        r = subprocess.run(
            [
                FACEMUX,
                "info",
                "--target",
                srv.target,
                "--ca",
                str(certs / "ca2.crt"),
                "--token-file",
                str(tmp_path / "token"),
            ],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert r.returncode == 0, r.stderr
        assert json.loads(r.stdout)["resolution"] == 64


def test_mtls_identity_from_the_client_certificate(tmp_path: Path, models: Models) -> None:
    make_store(tmp_path / "store", models, ("alice",))
    ca = make_ca()
    certs = tmp_path / "certs"
    cert, key = write(certs, "server", make_leaf(ca, "localhost", server=True))
    (certs / "ca.crt").write_bytes(ca.cert)
    ops = make_leaf(ca, "ops-client", server=False)
    stranger = make_leaf(ca, "stranger", server=False)
    (tmp_path / "callers.jsonl").write_text(
        json.dumps({"name": "ops", "subject": "ops-client", "roles": ["swap"]}) + "\n"
    )
    audit = tmp_path / "audit.log"
    settings = _settings(
        tmp_path,
        auth="mtls",
        tls_cert=str(cert),
        tls_key=str(key),
        tls_client_ca=str(certs / "ca.crt"),
        auth_tokens_file=str(tmp_path / "callers.jsonl"),
    ).replace(audit_log=str(audit))
    with ServerThread(settings) as srv:
        kw = {"timeout": 20, "retries": 1, "ca": ca.cert}
        with FacemuxClient(srv.target, cert=ops.cert, key=ops.key, **kw) as c:
            c.wait_ready(30)
            assert c.swap_faces([FACE], "alice").faces_swapped == 1
        with FacemuxClient(srv.target, cert=stranger.cert, key=stranger.key, **kw) as c:
            with pytest.raises(FacemuxRpcError) as info:
                c.swap_faces([FACE], "alice")
            # An unlisted certificate proves no configured caller: UNAUTHENTICATED, as for
            # an unknown token (README), not PERMISSION_DENIED.
            assert info.value.code.name == "UNAUTHENTICATED"
            assert "not a configured caller" in info.value.details
        # No client certificate: the TLS handshake itself is refused.
        with FacemuxClient(srv.target, **{**kw, "timeout": 5}) as c:
            with pytest.raises(FacemuxRpcError) as info:
                c.swap_faces([FACE], "alice")
            assert info.value.code.name == "UNAVAILABLE"
    rows = [json.loads(line) for line in audit.read_text().splitlines()]
    assert rows[0]["caller"] == "ops" and rows[0]["status"] == "OK"
    assert rows[1]["status"] == "UNAUTHENTICATED" and rows[1]["caller"] == "(refused)"
    assert rows[1]["claimed_caller"] == "stranger"


def test_health_port_answers_probes_in_plain_text_and_nothing_else(
    tmp_path: Path, models: Models
) -> None:
    """A TLS server's health for probes that cannot speak TLS (kubelet's gRPC probes)."""
    import grpc
    from facemux.v1 import swap_service_pb2 as spb
    from facemux.v1 import swap_service_pb2_grpc as sgrpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    make_store(tmp_path / "store", models, ("alice",))
    ca = make_ca()
    cert, key = write(tmp_path / "certs", "server", make_leaf(ca, "localhost", server=True))
    entry, token = auth.make_entry("swapper", ["swap"], scheme="sha256")
    (tmp_path / "callers.jsonl").write_text(json.dumps(entry) + "\n")
    settings = _settings(
        tmp_path,
        tls_cert=str(cert),
        tls_key=str(key),
        auth_tokens_file=str(tmp_path / "callers.jsonl"),
        health_port=0,
    )
    with ServerThread(settings) as srv:
        assert srv.app is not None and srv.app.health_port
        health_target = f"127.0.0.1:{srv.app.health_port}"
        with FacemuxClient(srv.target, timeout=20, retries=1, ca=ca.cert, token=token) as c:
            c.wait_ready(30)
        r = subprocess.run(
            [FACEMUX, "health", "--target", health_target, "--timeout", "5"],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert r.returncode == 0 and r.stdout.strip() == "SERVING", r.stderr
        with grpc.insecure_channel(health_target) as ch:
            stub = health_pb2_grpc.HealthStub(ch)
            live = stub.Check(health_pb2.HealthCheckRequest(service="liveness"), timeout=5)
            assert live.status == health_pb2.HealthCheckResponse.SERVING
            with pytest.raises(grpc.RpcError) as info:
                sgrpc.SwapServiceStub(ch).GetModelInfo(
                    spb.GetModelInfoRequest(),
                    metadata=[("authorization", f"Bearer {token}")],
                    timeout=5,
                )
            assert info.value.code() == grpc.StatusCode.UNIMPLEMENTED
