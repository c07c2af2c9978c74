"""Crash safety: kill -9 during identity registration leaves every identity fully present or
absent, the store verifies clean, and writing goes on afterwards."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
from common import CONSENT, Models, face_image, make_store, png
from facemux.client import FacemuxClient
from facemux.client.errors import FacemuxRpcError
from facemux.service.store import LocalStore
from serve_process import ServeProcess

pytestmark = pytest.mark.slow

WRITER = textwrap.dedent(
    """
    import sys
    from pathlib import Path
    from facemux.service.store import LocalStore, VersionRecord, now_iso

    root, data = Path(sys.argv[1]), Path(sys.argv[2]).read_bytes()
    store = LocalStore(root)
    print("ready", flush=True)
    i = 0
    while True:
        store.add_version(
            f"id{i % 4}",
            data,
            VersionRecord(0, now_iso(), "d" * 64, "e" * 64, "tiny", 64, 0, ""),
            consent={"attested_by": "qa", "evidence_ref": "T-1", "granted_at": "2026-01-01"},
            make_default=True,
        )
        i += 1
    """
)


def _check(root: Path, data: bytes) -> int:
    """The store after a crash: clean, every listed version complete, still writable."""
    store = LocalStore(root)  # opening sweeps hidden leftovers
    assert store.verify() == []
    count = 0
    for rec in store.list_identities():
        assert rec.versions, rec.name
        for v in rec.versions:
            if rec.name != "alice":  # alice has her own decoder
                assert store.read_decoder(rec.name, v.version) == data
            count += 1
    leftovers = [p for p in root.rglob("*") if p.name.startswith((".staging", ".trash"))]
    assert leftovers == []
    return count


def test_kill_9_during_store_writes(tmp_path: Path, models: Models) -> None:
    root = tmp_path / "store"
    make_store(root, models)
    ckpt = tmp_path / "dec.safetensors"
    data = models.decoders["carol"]
    ckpt.write_bytes(data)
    (tmp_path / "writer.py").write_text(WRITER)
    rng = random.Random(7)
    kills, versions = 0, 0
    for _ in range(4):
        proc = subprocess.Popen(
            [sys.executable, str(tmp_path / "writer.py"), str(root), str(ckpt)],
            stdout=subprocess.PIPE,
            text=True,
        )
        assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
        time.sleep(rng.uniform(0.02, 0.4))
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        kills += 1
        versions = _check(root, data)
    assert versions > 0
    print(
        f"\nfaults: {kills} kill -9 during store writes, {versions} versions intact, verify clean"
    )


def _serve(root: Path, log: Path) -> ServeProcess:
    return ServeProcess(root, "--auth", "off", "--audit-log", "", log=log).start()


def test_kill_9_server_during_registration(tmp_path: Path, models: Models) -> None:
    root = tmp_path / "store"
    make_store(root, models, ("alice",))
    data = models.decoders["carol"]
    srv = _serve(root, tmp_path / "serve.log")
    try:
        with FacemuxClient(srv.target, timeout=30, retries=1) as c:
            c.wait_ready(60)
            stop = threading.Event()

            def register() -> None:
                i = 0
                while not stop.is_set():
                    try:
                        # Small chunks: the upload is in flight for a while.
                        c.register_identity(f"new{i % 3}", data, consent=CONSENT, chunk_size=4096)
                    except FacemuxRpcError:
                        return  # the server went away mid-call
                    i += 1

            t = threading.Thread(target=register)
            t.start()
            time.sleep(1.5)
            os.kill(srv.pid, signal.SIGKILL)
            srv.proc.wait(10)
            stop.set()
            t.join(30)
    finally:
        srv.kill()
    _check(root, data)
    # After restart: every identity is either usable or absent.
    srv = _serve(root, tmp_path / "serve.log")
    try:
        with FacemuxClient(srv.target, timeout=30, retries=1) as c:
            c.wait_ready(60)
            names = {i.name for i in c.list_identities()}
            assert "alice" in names
            for name in names:
                assert c.swap_faces([png(face_image(0))], name).faces_swapped == 1
            # And registration goes on where it stopped.
            for name in ("new0", "new1", "new2"):
                c.register_identity(name, data, consent=CONSENT)
    finally:
        srv.stop()
    assert LocalStore(root).verify() == []
