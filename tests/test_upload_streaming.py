"""RegisterIdentity streams its upload to a staging file on disk and judges it by its header
as soon as that arrives: a bogus upload is refused at its first chunk, not after the whole
of it has been buffered in memory."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from common import CONSENT, Models
from facemux.client import FacemuxClient
from facemux.client.client import consent_record
from facemux.v1 import identity_service_pb2 as ipb

MIB = 1024 * 1024
CHUNKS = 64  # a 64 MiB upload, in 1 MiB messages (the test server takes up to 4 MiB)


def _meta(name: str = "bogus") -> ipb.RegisterIdentityRequest:
    return ipb.RegisterIdentityRequest(
        metadata=ipb.RegisterIdentityMetadata(name=name, consent=consent_record(CONSENT))
    )


class Counted:
    """A request stream that counts how many of its messages the client has taken."""

    def __init__(self, first: bytes, chunks: int = CHUNKS) -> None:
        self.first = first
        self.chunks = chunks
        self.taken = 0

    def __iter__(self) -> Iterator[ipb.RegisterIdentityRequest]:
        yield _meta()
        for i in range(self.chunks):
            self.taken += 1
            yield ipb.RegisterIdentityRequest(chunk=self.first if i == 0 else bytes(MIB))


def _staged(tmp_path: Path) -> list[Path]:
    return list((tmp_path / "store" / "identities").glob(".staging-*"))


@pytest.mark.parametrize("kind", ["zeros", "decoder header, zeros after"])
def test_bogus_upload_is_refused_at_its_first_chunk(
    client: FacemuxClient, models: Models, tmp_path: Path, kind: str
) -> None:
    # Zeros: a header length of 0. The other: a real decoder's first MiB (its whole header,
    # which says the file is under 1 MiB) and then 63 MiB more.
    first = bytes(MIB) if kind == "zeros" else (models.decoders["carol"] * 2)[:MIB]
    stream = Counted(first)
    t0 = time.perf_counter()
    with pytest.raises(grpc.RpcError) as info:
        client.identity_stub.RegisterIdentity(iter(stream), timeout=60)
    seconds = time.perf_counter() - t0
    err: grpc.Call = info.value
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, err
    assert "header" in (err.details() or "")
    # The server answered before the client had sent the rest: what the client had taken
    # when the call ended is what the transport buffers, not the upload.
    print(f"\n{kind}: refused after {stream.taken} of {CHUNKS} MiB, {seconds:.2f} s")
    assert stream.taken <= CHUNKS // 4, stream.taken
    assert not _staged(tmp_path)
    assert client.health() == "SERVING"


def test_upload_is_staged_on_disk_and_removed_when_the_caller_cancels(
    client: FacemuxClient, models: Models, tmp_path: Path
) -> None:
    data = models.decoders["carol"]
    half = len(data) // 2
    release = threading.Event()

    def parts() -> Iterator[ipb.RegisterIdentityRequest]:
        yield _meta("cancelled")
        for i in range(0, half, 16 * 1024):
            yield ipb.RegisterIdentityRequest(chunk=data[i : min(i + 16 * 1024, half)])
        release.wait(30)  # the rest never comes: the caller gives up instead

    future = client.identity_stub.RegisterIdentity.future(parts(), timeout=60)
    try:
        deadline = time.monotonic() + 20
        sizes: list[int] = []
        while time.monotonic() < deadline:
            sizes = [p.stat().st_size for p in _staged(tmp_path) if p.exists()]
            if sizes and max(sizes) >= half - 64 * 1024:
                break
            time.sleep(0.05)
        # The received bytes are in a staging file of the store, not in memory (all but
        # what its file object may still buffer).
        assert sizes and half - 64 * 1024 <= max(sizes) <= half, sizes
        future.cancel()
        deadline = time.monotonic() + 20
        while _staged(tmp_path) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not _staged(tmp_path)
    finally:
        release.set()
    assert "cancelled" not in {i.name for i in client.list_identities()}
    # And a whole upload goes through, its file moved into the version.
    resp = client.register_identity("carol", data, consent=CONSENT, chunk_size=64 * 1024)
    stored = tmp_path / "store" / "identities" / "carol" / "v1" / "decoder.safetensors"
    assert resp.version == 1 and stored.read_bytes() == data
    assert not _staged(tmp_path)
