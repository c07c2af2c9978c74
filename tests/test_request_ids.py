"""Request ids on every RPC (metadata x-request-id), and SwapStream's persistent settings."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from common import Models, face_image, make_store, png
from facemux.client import FacemuxClient
from facemux.client.errors import NotFound
from facemux.service.server import ServerThread
from facemux.service.settings import Settings
from facemux.v1 import identity_service_pb2 as ipb
from facemux.v1 import swap_service_pb2 as spb
from facemux.v1 import types_pb2

GOOD = png(face_image(0))


@pytest.fixture
def audited(tmp_path: Path, models: Models) -> Iterator[tuple[FacemuxClient, Path]]:
    make_store(tmp_path / "store", models, ("alice", "bob"))
    log = tmp_path / "audit.jsonl"
    settings = Settings(
        port=0, auth="off", store=tmp_path / "store", metrics_port=-1, audit_log=str(log)
    )
    with ServerThread(settings) as srv, FacemuxClient(srv.target, timeout=30) as c:
        c.wait_ready(30)
        yield c, log


def _audit(log: Path) -> list[dict[str, object]]:
    return [json.loads(line) for line in log.read_text().splitlines()]


def test_request_id_is_echoed_and_audited(audited: tuple[FacemuxClient, Path]) -> None:
    c, log = audited
    # Any RPC: the response headers carry the caller's id.
    _, call = c.identity_stub.GetIdentity.with_call(
        ipb.GetIdentityRequest(name="alice"), metadata=[("x-request-id", "trace-1")]
    )
    assert ("x-request-id", "trace-1") in call.initial_metadata()
    # Without one the server makes one, and says which.
    _, call = c.swap_stub.GetModelInfo.with_call(spb.GetModelInfoRequest())
    made = dict(call.initial_metadata())["x-request-id"]
    assert len(made) == 32
    # Outputs are marked with it, and the audit line carries it.
    res = c.swap_faces([GOOD], "alice", request_id="trace-2")
    assert res.request_id == "trace-2"
    # A refused call answers with the id as well, and the client error carries it.
    with pytest.raises(NotFound) as err:
        c.swap_faces([GOOD], "nobody", request_id="trace-3")
    assert err.value.request_id == "trace-3"
    # The line is written as the call ends, which may be just after the client hears it.
    deadline = time.monotonic() + 10
    while not any(line["request_id"] == "trace-3" for line in _audit(log)):
        assert time.monotonic() < deadline, _audit(log)
        time.sleep(0.05)
    assert any(
        line["request_id"] == "trace-3" and line["status"] == "NOT_FOUND" for line in _audit(log)
    )
    assert any(line["request_id"] == "trace-2" and line["status"] == "OK" for line in _audit(log))


def test_bad_request_id_is_refused(audited: tuple[FacemuxClient, Path]) -> None:
    c, _ = audited
    for bad in ("has space", "x" * 129):
        with pytest.raises(grpc.RpcError) as err:
            c.swap_stub.GetModelInfo(
                spb.GetModelInfoRequest(), metadata=[("x-request-id", bad)], timeout=10
            )
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "x-request-id" in err.value.details()
    assert c.model_info().resolution > 0  # still serving


def test_swap_stream_settings_persist_and_identity_is_echoed(
    audited: tuple[FacemuxClient, Path],
) -> None:
    c, log = audited
    crop = types_pb2.Image(encoded=GOOD)
    reqs = [
        # Settings in the first message only: aligned and the identity persist.
        spb.SwapStreamRequest(identity="alice", aligned=True, frame_index=0, frame=crop),
        spb.SwapStreamRequest(frame_index=1, frame=crop),
        # A new identity resets the version to the default, and persists in turn.
        spb.SwapStreamRequest(identity="bob", frame_index=2, frame=crop),
        spb.SwapStreamRequest(frame_index=3, frame=crop),
        # An explicit false is a change: this crop is now a frame to detect faces in.
        spb.SwapStreamRequest(aligned=False, frame_index=4, frame=crop),
    ]
    out = list(
        c.swap_stub.SwapStream(iter(reqs), metadata=[("x-request-id", "stream-7")], timeout=60)
    )
    assert [r.frame_index for r in out] == [0, 1, 2, 3, 4]
    assert [r.identity for r in out] == ["alice", "alice", "bob", "bob", "bob"]
    assert [r.identity_version for r in out[:4]] == [1, 1, 1, 1]
    assert [r.faces_swapped for r in out[:4]] == [1, 1, 1, 1]
    assert [r.results[0].resized for r in out[:2]] == [False, False]  # aligned crops
    # Frame 4 went through detection: no aligned-crop result for it.
    assert not out[4].HasField("error")
    assert all(not r.results or r.results[0].input_width != 64 for r in out[4:])
    assert [r.request_id for r in out] == [f"stream-7:{i}" for i in range(5)]
    stream_lines = [line for line in _audit(log) if line["rpc"] == "SwapStream"]
    assert stream_lines[-1]["request_id"] == "stream-7"
