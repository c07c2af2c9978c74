"""What a RegisterIdentity upload costs the server: peak resident memory growth and how much
of the upload the client had sent when the server answered, for a bogus upload (zeros) and a
valid one. The server runs as its own process (`facemux serve`) on a fresh store.

    python bench/register_memory.py --mib 300
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
from facemux.client import FacemuxClient
from facemux.client.client import consent_record
from facemux.models import checkpoint
from facemux.models.config import get_preset
from facemux.models.networks import build_decoder, build_encoder
from facemux.service.store import LocalStore
from facemux.v1 import identity_service_pb2 as ipb

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from serve_process import ServeProcess

MIB = 1024 * 1024
CONSENT = {"attested_by": "bench", "evidence_ref": "BENCH-1", "granted_at": "2026-01-01"}


def peak_rss(pid: int) -> int:
    """VmHWM: the process's peak resident set so far, in bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--mib", type=int, default=300, help="size of the bogus upload")
    args = p.parse_args()
    cfg = get_preset("tiny")
    enc_bytes, meta = checkpoint.encoder_to_bytes(build_encoder(cfg, seed=0), cfg)
    decoder = checkpoint.decoder_to_bytes(build_decoder(cfg, seed=1), cfg, meta.fingerprint, "x")[0]
    with tempfile.TemporaryDirectory() as tmp:
        store = Path(tmp) / "store"
        LocalStore(store).put_encoder(enc_bytes, meta.fingerprint)
        server = ServeProcess(
            store, "--auth", "off", "--audit-log", "", log=Path(tmp) / "serve.log"
        ).start()
        port, pid = server.port, server.pid
        try:
            with FacemuxClient(f"127.0.0.1:{port}", timeout=120, retries=1) as c:
                c.wait_ready(120)
                c.register_identity("warmup", decoder, consent=CONSENT)
                base = peak_rss(pid)
                sent = 0

                def zeros() -> Iterator[ipb.RegisterIdentityRequest]:
                    nonlocal sent
                    yield ipb.RegisterIdentityRequest(
                        metadata=ipb.RegisterIdentityMetadata(
                            name="bogus", consent=consent_record(CONSENT)
                        )
                    )
                    for _ in range(args.mib):
                        sent += 1
                        yield ipb.RegisterIdentityRequest(chunk=bytes(MIB))

                t0 = time.perf_counter()
                try:
                    c.identity_stub.RegisterIdentity(zeros(), timeout=600)
                    status = "OK"
                except grpc.RpcError as err:
                    status = err.code().name
                seconds = time.perf_counter() - t0
                grew = peak_rss(pid) - base
                print(
                    f"{args.mib} MiB of zeros: {status} after {seconds:.2f} s, client had sent "
                    f"{sent} MiB, server peak RSS grew {grew / MIB:.1f} MiB"
                )
                t0 = time.perf_counter()
                c.register_identity("valid", decoder, consent=CONSENT)
                print(
                    f"valid {len(decoder) / MIB:.2f} MiB decoder: OK in "
                    f"{time.perf_counter() - t0:.2f} s, server peak RSS grew "
                    f"{(peak_rss(pid) - base) / MIB:.1f} MiB in all"
                )
        finally:
            server.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
