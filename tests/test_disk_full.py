"""A store volume that runs out of space: the caller gets RESOURCE_EXHAUSTED saying so, what
was staged is removed at once, the server keeps serving, and writes work again once there
is room.

These tests need a real small filesystem, a tmpfs mounted for the test (root, and a kernel
or container that allows the mount); elsewhere they are skipped, saying why."""

from __future__ import annotations

import errno
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from common import CONSENT, Models, face_image, make_store, png
from facemux.client import FacemuxClient
from facemux.client.errors import FacemuxRpcError
from facemux.models import checkpoint
from facemux.models.errors import ResourceExhaustedError
from facemux.service.server import ServerThread
from facemux.service.settings import Settings
from facemux.service.store import LocalStore, VersionRecord
from facemux.service.training.datasets import DatasetStore

# Room for the tiny encoder (2.8 MB) and two decoders (0.9 MB each) with some to spare.
VOLUME = "8m"


@pytest.fixture
def volume(tmp_path: Path) -> Iterator[Path]:
    mount = tmp_path / "volume"
    mount.mkdir()
    try:
        done = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={VOLUME}", "tmpfs", str(mount)],
            capture_output=True,
            text=True,
            timeout=30,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        pytest.skip(f"cannot mount a small tmpfs to fill: {exc}")
    if done.returncode != 0:
        reason = done.stderr.strip() or f"mount exited {done.returncode}"
        print(f"\nskipped: cannot mount a small tmpfs to fill: {reason}")
        pytest.skip(f"cannot mount a small tmpfs to fill: {reason}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], capture_output=True, timeout=30)


def fill(volume: Path, leave: int = 0) -> Path:
    """Take all the free space of the volume but about `leave` bytes; returns the filler."""
    filler = volume / "filler"
    with open(filler, "wb") as fh:
        try:
            while True:
                fh.write(b"\xff" * 65536)
                fh.flush()
        except OSError as exc:
            assert exc.errno == errno.ENOSPC, exc
    if leave:
        os.truncate(filler, max(0, filler.stat().st_size - leave))
    return filler


def hidden(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.name.startswith(".") and p.name != ".lock"]


def test_registration_on_a_full_volume(volume: Path, models: Models) -> None:
    root = volume / "store"
    make_store(root, models, ("alice",))
    data = models.decoders["carol"]
    settings = Settings(port=0, auth="off", store=root, provenance="off")
    with ServerThread(settings) as srv, FacemuxClient(srv.target, timeout=30, retries=1) as c:
        c.wait_ready(30)
        # Half a decoder's room: the upload fails part way through its staging file.
        filler = fill(volume, leave=len(data) // 2)
        with pytest.raises(FacemuxRpcError) as info:
            c.register_identity("carol", data, consent=CONSENT, chunk_size=64 * 1024)
        assert info.value.code.name == "RESOURCE_EXHAUSTED", info.value
        assert "out of disk space" in info.value.details
        assert hidden(root / "identities") == []  # the staging file went at once
        # A new version of an existing identity, with no room at all.
        fill(volume)
        with pytest.raises(FacemuxRpcError) as info:
            c.register_identity("alice", data, chunk_size=64 * 1024)
        assert info.value.code.name == "RESOURCE_EXHAUSTED", info.value
        assert hidden(root / "identities") == []
        assert [v.version for v in c.get_identity("alice").versions] == [1]
        # Reads go on.
        assert c.swap_faces([png(face_image(0))], "alice").faces_swapped == 1
        assert "carol" not in {i.name for i in c.list_identities()}
        # Room again: the same upload goes through.
        filler.unlink()
        assert c.register_identity("carol", data, consent=CONSENT).version == 1
    assert LocalStore(root).verify() == []


def test_store_writers_on_a_full_volume(volume: Path, models: Models) -> None:
    root = volume / "store"
    store = make_store(root, models, ("alice",))
    data = models.decoders["bob"]
    _, meta = checkpoint.read_decoder(data)
    fill(volume, leave=len(data) // 2)
    with pytest.raises(ResourceExhaustedError, match="out of disk space"):
        store.add_version("bob", data, VersionRecord.for_decoder(meta), consent=dict(CONSENT))
    with pytest.raises(ResourceExhaustedError, match="out of disk space"):
        store.put_encoder(models.encoder_bytes + b"", "f" * 64)
    fill(volume)
    with pytest.raises(ResourceExhaustedError, match="out of disk space"):
        store.record_consent("alice", {**CONSENT, "scope": "all"})
    assert hidden(root) == []
    assert store.list_encoders() == [models.fingerprint]
    assert [r.name for r in store.list_identities()] == ["alice"]
    assert store.get("alice").consent == CONSENT
    assert store.verify() == []


def test_dataset_upload_on_a_full_volume(volume: Path) -> None:
    datasets = DatasetStore(volume / "datasets", Settings())
    crops: list[tuple[int, tuple[np.ndarray, np.ndarray | None] | str]] = [
        (i, (np.random.default_rng(i).integers(0, 256, (256, 256, 3), np.uint8), None))
        for i in range(4)
    ]
    datasets.add("kept", 256, crops[:1])
    fill(volume, leave=300_000)  # room for one face of noise (200 KB as PNG), not three
    with pytest.raises(ResourceExhaustedError, match="out of disk space"):
        datasets.add("fresh", 256, crops[1:])
    with pytest.raises(ResourceExhaustedError, match="out of disk space"):
        datasets.add("kept", 256, crops[1:])
    assert not (volume / "datasets" / "fresh").exists()
    assert datasets.get("kept").faces == 1
    assert len(list((volume / "datasets" / "kept" / "faces").iterdir())) == 1
    assert hidden(volume / "datasets") == []
