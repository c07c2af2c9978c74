"""Shared fixtures and helpers: tiny real models in a real store, a real server on port 0,
a real client. Loaded by conftest.py in the processes that run tests (not in pytest-xdist's
controller, which only hands them out); test modules import the helpers from here."""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import cv2
import grpc
import numpy as np
import pytest
import torch
from facemux.client import FacemuxClient
from facemux.models import checkpoint
from facemux.models.config import ModelConfig, get_preset
from facemux.models.networks import build_decoder, build_encoder
from facemux.service.server import ServerThread
from facemux.service.settings import Settings
from facemux.service.store import LocalStore
from grpc_health.v1 import health_pb2, health_pb2_grpc

# Keep each test process from spreading tiny models over every core: two threads alone, one
# per pytest-xdist worker. The servers, jobs and CLI commands the tests start as child
# processes inherit one thread too: each worker's share is at most one core, and a child's
# second OpenMP thread would only spin against the other workers.
if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
else:
    torch.set_num_threads(2)
# Servers load the tiny model in the layout their load-time trial picks for it here, without
# timing both at every start (about 0.15 s each; the suite starts well over a hundred).
# tests/test_layout.py runs the trial.
TEST_LAYOUT = "channels_last"
os.environ.setdefault("FACEMUX_CPU_LAYOUT", TEST_LAYOUT)


@dataclass
class Models:
    config: ModelConfig
    encoder_bytes: bytes
    fingerprint: str
    decoders: dict[str, bytes]  # identity -> checkpoint bytes for the encoder above
    foreign_decoder: bytes  # a tiny decoder trained against another encoder


@pytest.fixture(scope="session")
def models() -> Models:
    cfg = get_preset("tiny")
    enc = build_encoder(cfg, seed=1)
    enc_bytes, meta = checkpoint.encoder_to_bytes(enc, cfg)
    decoders = {
        name: checkpoint.decoder_to_bytes(
            build_decoder(cfg, seed=10 + i), cfg, meta.fingerprint, name
        )[0]
        for i, name in enumerate(("alice", "bob", "carol"))
    }
    other = checkpoint.encoder_to_bytes(build_encoder(cfg, seed=99), cfg)[1]
    foreign = checkpoint.decoder_to_bytes(
        build_decoder(cfg, seed=5), cfg, other.fingerprint, "mallory"
    )[0]
    return Models(cfg, enc_bytes, meta.fingerprint, decoders, foreign)


# A complete consent record: registering or training an identity requires one.
CONSENT = {"attested_by": "qa@example.com", "evidence_ref": "TICKET-1", "granted_at": "2026-01-01"}


def make_store(root: Path, models: Models, identities: tuple[str, ...] = ()) -> LocalStore:
    from facemux.service.store import VersionRecord

    store = LocalStore(root)
    store.put_encoder(models.encoder_bytes, models.fingerprint)
    for name in identities:
        data = models.decoders[name]
        _, meta = checkpoint.read_decoder(data)
        store.add_version(
            name,
            data,
            VersionRecord.for_decoder(meta),
            consent=dict(CONSENT),
        )
    return store


def wait_serving(target: str, timeout: float = 30.0) -> None:
    """Block until the server at `target` answers SERVING. Polls every few milliseconds:
    the client's own wait_ready sleeps a tenth of a second between checks, which adds up
    over the hundreds of servers the suite starts."""
    deadline = time.monotonic() + timeout
    # A refused connection is retried within 100 ms, not after gRPC's default second.
    backoff = [("grpc.initial_reconnect_backoff_ms", 50), ("grpc.max_reconnect_backoff_ms", 100)]
    with grpc.insecure_channel(target, backoff) as ch:
        stub = health_pb2_grpc.HealthStub(ch)
        while True:
            try:
                resp = stub.Check(health_pb2.HealthCheckRequest(), timeout=5)
                if resp.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"{target} not SERVING after {timeout}s")
            time.sleep(0.005)


def server_settings(store: Path, *, provenance: str = "on") -> Settings:
    """The settings of the shared test server: auth off (tests/test_auth.py covers
    authentication), a decoder cache bound of 2, 4 MiB messages, and no /metrics port: its
    HTTP server takes up to half a second to stop, and tests/test_metrics.py covers it."""
    return Settings(
        port=0,
        auth="off",
        store=store,
        decoder_cache_count=2,
        max_message_bytes=4 * 1024 * 1024,
        max_image_pixels=4_000_000,
        metrics_port=-1,
        provenance=provenance,
        cpu_layout=TEST_LAYOUT,
    )


@contextlib.contextmanager
def running_server(settings: Settings) -> Iterator[ServerThread]:
    """A started ServerThread whose model is loaded."""
    with ServerThread(settings) as srv:
        wait_serving(srv.target)
        yield srv


@pytest.fixture
def server(
    tmp_path: Path, models: Models, request: pytest.FixtureRequest
) -> Iterator[ServerThread]:
    """A server with alice and bob registered; decoder cache bound of 2. Tests marked
    `unmarked_outputs` compare exact model pixels or output bytes, so their server runs with
    provenance off (the watermark changes pixels, each manifest is unique);
    tests/test_provenance.py covers the marks."""
    make_store(tmp_path / "store", models, ("alice", "bob"))
    unmarked = request.node.get_closest_marker("unmarked_outputs") is not None
    settings = server_settings(tmp_path / "store", provenance="off" if unmarked else "on")
    with running_server(settings) as srv:
        yield srv


@pytest.fixture(scope="module")
def shared_server(
    tmp_path_factory: pytest.TempPathFactory, models: Models
) -> Iterator[ServerThread]:
    """The `server` fixture's server, once per module, for modules whose tests leave the
    store as they found it (read-only calls and refused requests). Its store is
    `shared_server.settings.store`."""
    root = tmp_path_factory.mktemp("shared") / "store"
    make_store(root, models, ("alice", "bob"))
    with running_server(server_settings(root)) as srv:
        yield srv


@pytest.fixture
def client(server: ServerThread) -> Iterator[FacemuxClient]:
    with FacemuxClient(server.target, timeout=30, retries=1) as c:
        c.wait_ready(30)
        yield c


def face_image(seed: int = 0, size: int = 64) -> np.ndarray:
    """A smooth random RGB image (stand-in for an aligned crop)."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
    return cv2.resize(small, (size, size), interpolation=cv2.INTER_CUBIC)


def png(rgb: np.ndarray) -> bytes:
    ok, buf = cv2.imencode(".png", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    assert ok
    return bytes(buf.tobytes())


def decode_png(data: bytes) -> np.ndarray:
    img = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    assert img is not None
    return img if img.ndim == 2 else cv2.cvtColor(img, cv2.COLOR_BGR2RGB)


def two_face_scene(seed: int) -> np.ndarray:
    """640x480 grey frame with two synthetic faces of different sizes (200 and 120 px)."""
    from facemux.models import synth

    rng = np.random.default_rng(seed)
    img = np.full((480, 640, 3), 80, np.uint8)
    for cx, size in ((170.0, 200.0), (470.0, 120.0)):
        a = np.array([[size, 0.0, cx - size / 2], [0.0, size, 240.0 - size / 2]])
        img = synth.render_into(
            img, synth.identity_from_seed(int(rng.integers(1000))), synth.FaceState(), a
        ).image
    return img
