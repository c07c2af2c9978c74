"""A bounded load test on loopback: N concurrent clients for T seconds of mixed RPCs, with
authentication and the audit trail on. Zero unexpected errors; p99 latency and RSS growth
are reported (run with -s to see them) and RSS growth is bounded.

FACEMUX_LOAD_CLIENTS / FACEMUX_LOAD_SECONDS make it longer than the CI default.
"""

from __future__ import annotations

import json
import os
import random
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from common import Models, face_image, make_store, png
from facemux.client import FacemuxClient
from facemux.service import auth
from facemux.service.server import ServerThread
from facemux.service.settings import Settings

pytestmark = pytest.mark.slow

CLIENTS = int(os.environ.get("FACEMUX_LOAD_CLIENTS", "6"))
SECONDS = float(os.environ.get("FACEMUX_LOAD_SECONDS", "6"))
RSS_GROWTH_BOUND_MB = 150.0


def _rss_mb() -> float:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def test_mixed_load(tmp_path: Path, models: Models) -> None:
    make_store(tmp_path / "store", models, ("alice", "bob"))
    entry, token = auth.make_entry("loadgen", ["swap"], scheme="sha256")
    (tmp_path / "callers.jsonl").write_text(json.dumps(entry) + "\n")
    settings = Settings(
        port=0,
        store=tmp_path / "store",
        auth_tokens_file=str(tmp_path / "callers.jsonl"),
        audit_log=str(tmp_path / "audit.log"),
        metrics_port=-1,
        max_streams_per_caller=CLIENTS * 2,
    )
    faces = [png(face_image(i)) for i in range(4)]
    raw = face_image(9)
    latencies: dict[str, list[float]] = {}
    errors: list[str] = []
    lock = threading.Lock()

    with ServerThread(settings) as srv:
        clients = [
            FacemuxClient(srv.target, timeout=30, retries=1, token=token) for _ in range(CLIENTS)
        ]
        clients[0].wait_ready(30)
        lat = clients[0].encode([faces[0]])

        def one(c: FacemuxClient, rng: random.Random) -> str:
            op = rng.choice(["swap", "swap", "swap_raw", "encode", "decode", "stream", "read"])
            if op == "swap":
                assert c.swap_faces(faces[: rng.randint(1, 4)], "alice").faces_swapped >= 1
            elif op == "swap_raw":
                assert c.swap_faces([raw], "bob").faces_swapped == 1
            elif op == "encode":
                assert len(c.encode(faces[:2])) == 2
            elif op == "decode":
                assert len(c.decode(lat, "bob").faces) == 1
            elif op == "stream":
                out = list(c.swap_stream(faces[:3], "alice", aligned=True))
                assert [r.frame_index for r in out] == [0, 1, 2]
            else:
                c.get_identity("alice")
                c.list_identities()
                assert c.health() == "SERVING"
            return op

        def worker(i: int, until: float) -> None:
            rng = random.Random(i)
            c = clients[i]
            while time.monotonic() < until:
                t0 = time.perf_counter()
                try:
                    op = one(c, rng)
                except Exception as exc:  # every failure is unexpected here
                    with lock:
                        errors.append(repr(exc))
                    continue
                with lock:
                    latencies.setdefault(op, []).append(time.perf_counter() - t0)

        def run(seconds: float) -> None:
            until = time.monotonic() + seconds
            threads = [threading.Thread(target=worker, args=(i, until)) for i in range(CLIENTS)]
            for t in threads:
                t.start()
            for t in threads:
                t.join(seconds + 60)

        run(1.5)  # warm-up: decoders resident, allocator pools filled
        latencies.clear()
        rss0 = _rss_mb()
        t0 = time.monotonic()
        run(SECONDS)
        elapsed = time.monotonic() - t0
        rss1 = _rss_mb()
        for c in clients:
            c.close()

    assert errors == [], errors[:5]
    every = np.array([x for v in latencies.values() for x in v])
    lines = [
        f"load: {CLIENTS} clients x {elapsed:.1f}s: {every.size} calls "
        f"({every.size / elapsed:.1f}/s), 0 errors, p50 {np.percentile(every, 50) * 1e3:.1f} ms, "
        f"p99 {np.percentile(every, 99) * 1e3:.1f} ms; RSS {rss0:.0f} -> {rss1:.0f} MB "
        f"(+{rss1 - rss0:.1f}, bound {RSS_GROWTH_BOUND_MB:.0f})"
    ]
    for op, xs in sorted(latencies.items()):
        a = np.array(xs) * 1e3
        p50, p99 = np.percentile(a, 50), np.percentile(a, 99)
        lines.append(f"  {op:9s} n={a.size:5d} p50={p50:7.1f} ms p99={p99:7.1f} ms")
    print("\n" + "\n".join(lines))
    assert every.size > CLIENTS * 5
    assert rss1 - rss0 < RSS_GROWTH_BOUND_MB
    audited = (tmp_path / "audit.log").read_text().count("\n")
    assert audited > 0
