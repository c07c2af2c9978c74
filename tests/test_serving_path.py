"""The per-call serving path: one identity read per Swap and per stream (not per frame) while
revocations still stop swaps at once; the batched watermark; the C2PA signer's start-up
check that replaced per-signature verification."""

from __future__ import annotations

import queue
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
import torch
from common import Models, face_image, make_store, png
from facemux.client import FacemuxClient
from facemux.client.errors import FacemuxRpcError
from facemux.models import watermark as wm
from facemux.service import c2pa
from facemux.service.runtime import Runtime
from facemux.service.scheduler import Item, Op, Scheduler
from facemux.service.server import ServerThread
from facemux.service.settings import Settings
from facemux.service.store import IdentityRecord, LocalStore


def _count_reads(monkeypatch: pytest.MonkeyPatch, store: LocalStore) -> list[str]:
    """The names the server's own store object reads records of (its real `get`)."""
    reads: list[str] = []
    real = store.get

    def get(name: str) -> IdentityRecord:
        reads.append(name)
        return real(name)

    monkeypatch.setattr(store, "get", get)
    return reads


def test_swap_reads_the_identity_record_once(
    server: ServerThread, client: FacemuxClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    client.swap_faces([png(face_image(0))], "alice")  # decoder resident
    assert server.app is not None
    reads = _count_reads(monkeypatch, server.app.store)
    for i in range(3):
        client.swap_faces([png(face_image(i)), png(face_image(i + 1))], "alice")
    # Once per call at most; unary calls share a memo, so here not even that: the record
    # is unchanged since the first call read it.
    assert reads == []


def test_unary_swaps_stop_at_a_revocation_made_elsewhere(
    server: ServerThread, client: FacemuxClient, tmp_path: Path
) -> None:
    """The shared memo is checked against the store's stamp on every call: a revocation
    written by another process (here a second handle on the store) stops the next swap."""
    client.swap_faces([png(face_image(0))], "alice")
    assert server.app is not None
    LocalStore(server.app.settings.store).revoke_consent("alice", "withdrawn")
    with pytest.raises(FacemuxRpcError) as info:
        client.swap_faces([png(face_image(1))], "alice")
    assert info.value.code == grpc.StatusCode.FAILED_PRECONDITION


def test_stream_reads_the_identity_once_and_stops_at_a_revocation(
    server: ServerThread,
    client: FacemuxClient,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    client.swap_faces([png(face_image(0))], "alice")  # decoder resident
    assert server.app is not None
    reads = _count_reads(monkeypatch, server.app.store)
    # Frames go one at a time, each after the previous answer, so the revocation falls
    # between two known frames.
    inbox: queue.Queue[bytes | None] = queue.Queue()

    def frames() -> Iterator[bytes]:
        while (frame := inbox.get(timeout=30)) is not None:
            yield frame

    answers = client.swap_stream(frames(), "alice", aligned=True)
    try:
        for i in range(4):
            inbox.put(png(face_image(i)))
            got = next(answers)
            assert not got.HasField("error"), got.error.message
        assert reads == ["alice"], "the record was read again for a frame although unchanged"
        # Revoked through another handle on the same store, as another server process or an
        # operator's tool would: nothing tells this server but the store itself.
        LocalStore(tmp_path / "store").revoke_consent("alice", "withdrawn")
        inbox.put(png(face_image(5)))
        got = next(answers)
        assert got.HasField("error") and "revoked" in got.error.message
        inbox.put(png(face_image(6)))
        assert "revoked" in next(answers).error.message
    finally:
        inbox.put(None)
        for _ in answers:
            pass


def test_batched_watermark_is_the_per_image_one() -> None:
    rng = np.random.default_rng(3)
    for shape in [(5, 64, 64, 3), (3, 100, 130, 3), (2, 128, 144, 3)]:
        faces = rng.integers(0, 256, shape, dtype=np.uint8)
        faces[0, :4] = 255  # saturation at both ends, as cv2.add/subtract do
        faces[0, 4:8] = 0
        payloads = [wm.payload_for(f"req-{i}") for i in range(shape[0])]
        one_by_one = np.stack(
            [wm.embed_watermark(f, p) for f, p in zip(faces, payloads, strict=True)]
        )
        assert np.array_equal(wm.embed_watermark_batch(faces, payloads), one_by_one)
        on_device = wm.embed_watermark_batch_t(
            torch.from_numpy(faces).permute(0, 3, 1, 2), payloads
        )
        assert np.array_equal(on_device.permute(0, 2, 3, 1).numpy(), one_by_one)


def test_signer_with_a_key_not_its_certificate_fails_at_start(tmp_path: Path) -> None:
    """Manifests are no longer validated after each signature; a signer that would make
    invalid ones must not get as far as serving."""
    a = c2pa.generate_test_signer(tmp_path / "a")
    b = c2pa.generate_test_signer(tmp_path / "b")
    c2pa.C2paSigner(a)  # a matching pair starts
    with pytest.raises(Exception, match=r"(?i)sign|key|certificate|manifest"):
        c2pa.C2paSigner(c2pa.SignerConfig(a.cert_chain_pem, b.key_pem, test_only=True))


def test_scheduler_marks_the_batch_as_the_per_image_function(
    tmp_path: Path, models: Models
) -> None:
    """Items carrying payloads come back marked by the model's worker, each face with its
    own payload, identical to marking the unmarked output image by image; items without
    payloads in the same batch are left alone."""
    store = make_store(tmp_path / "store", models, ("alice",))
    rt = Runtime(Settings(store=store.root), store)
    rt.load()
    decoder = rt.decoder("alice").decoder
    faces = np.stack([face_image(i) for i in range(3)])
    sched = Scheduler(rt, max_batch=64, max_wait_s=0.5)
    try:
        payloads = [wm.payload_for(f"r{i}") for i in range(2)]
        marked = Item(Op.SWAP, faces[:2], decoder, None, marks=payloads)
        plain = Item(Op.SWAP, faces[2:], decoder, None)
        futures = [sched.submit(marked), sched.submit(plain)]
        got = [f.result(timeout=60) for f in futures]
        bare = sched.submit(Item(Op.SWAP, faces, decoder, None)).result(timeout=60)
    finally:
        sched.stop()
    assert bare.faces is not None and got[0].faces is not None and got[1].faces is not None
    expected = wm.embed_watermark_batch(bare.faces[:2], payloads)
    assert np.array_equal(got[0].faces, expected)
    assert np.array_equal(got[1].faces, bare.faces[2:])
