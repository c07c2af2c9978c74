"""Aligned-face Swap throughput through gRPC, against the same server unbatched and the bare
model loop, all measured in one run on one machine.

    python bench/swap_throughput.py --preset original64 --clients 8 --seconds 20
    python bench/swap_throughput.py --preset tiny --clients 8 --faces-per-call 1

Each server runs in its own process (`facemux serve`), the clients are threads of this
process, each with its own channel, sending pre-encoded PNG crops and asking for raw output
(the server-side PNG encoder would otherwise dominate with small models). The bare loop runs
the encoder and decoder in this process at the batch size the batched server can form
(clients x faces per call), with the same torch thread count as the server.
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np
import torch
from facemux.client import FacemuxClient
from facemux.models import checkpoint, inference
from facemux.models.config import get_preset
from facemux.models.networks import build_decoder, build_encoder
from facemux.service.store import LocalStore, VersionRecord

# Synthetic decoders of no one; the store gives every identity a consent record.
BENCH_CONSENT = {"attested_by": "bench", "evidence_ref": "synthetic", "granted_at": "2026-01-01"}


@dataclass
class Row:
    name: str
    faces_per_s: float
    p50_ms: float
    p99_ms: float
    calls: int
    stages: dict[str, float] = field(default_factory=dict)  # server ms per call, by stage


def stage_ms(metrics_port: int) -> dict[str, float]:
    """Mean ms per observation of each pipeline stage, from the server's own /metrics (where
    a call's time goes: decoding crops, the queue and model, encoding results)."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).read()
    sums: dict[str, float] = {}
    counts: dict[str, float] = {}
    for line in text.decode().splitlines():
        for suffix, into in (("_sum", sums), ("_count", counts)):
            head = f'facemux_stage_seconds{suffix}{{stage="'
            if line.startswith(head):
                stage = line[len(head) :].split('"', 1)[0]
                into[stage] = float(line.rsplit(" ", 1)[1])
    return {k: 1000 * sums[k] / counts[k] for k in sums if counts.get(k)}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def make_store(root: Path, preset: str) -> None:
    cfg = get_preset(preset)
    enc_bytes, meta = checkpoint.encoder_to_bytes(build_encoder(cfg, seed=0), cfg)
    store = LocalStore(root)
    store.put_encoder(enc_bytes, meta.fingerprint)
    data, dmeta = checkpoint.decoder_to_bytes(
        build_decoder(cfg, seed=1), cfg, meta.fingerprint, "bench"
    )
    store.add_version(
        "bench",
        data,
        VersionRecord.for_decoder(dmeta),
        consent=BENCH_CONSENT,
    )


def crops(n: int, res: int) -> list[bytes]:
    rng = np.random.default_rng(0)
    out = []
    for _ in range(n):
        small = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
        img = cv2.resize(small, (res, res), interpolation=cv2.INTER_CUBIC)
        out.append(bytes(cv2.imencode(".png", img)[1].tobytes()))
    return out


def bare_loop(preset: str, batch: int, seconds: float, threads: int, device: str) -> Row:
    """The model alone at the server's batch size, with the server's precision rules
    (bf16 autocast on CUDA, fp32 on CPU) and the same uint8 in / uint8 out work."""
    torch.set_num_threads(threads)
    dev = inference.pick_device(device)
    cfg = get_preset(preset)
    enc = build_encoder(cfg, seed=0).eval().to(dev)
    dec = build_decoder(cfg, seed=1).eval().to(dev)
    faces = torch.randint(0, 255, (batch, cfg.resolution, cfg.resolution, 3), dtype=torch.uint8)
    bf16 = dev.type == "cuda"

    def once() -> None:
        x = faces.to(dev, non_blocking=True).permute(0, 3, 1, 2).float().div_(255.0)
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=bf16):
            rgb, _ = inference.decode(dec, inference.encode(enc, x))
        inference.tensor_to_images(rgb.float())

    once()  # warm-up
    times: list[float] = []
    t_end = time.perf_counter() + seconds
    while time.perf_counter() < t_end or len(times) < 3:
        t0 = time.perf_counter()
        once()
        times.append(time.perf_counter() - t0)
    total = sum(times)
    return Row(
        f"bare model loop, batch {batch}",
        batch * len(times) / total,
        1000 * statistics.median(times),
        1000 * float(np.percentile(times, 99)),
        len(times),
    )


def through_server(
    name: str,
    store: Path,
    clients: int,
    per_call: int,
    seconds: float,
    threads: int,
    extra: list[str],
) -> Row:
    port = _free_port()
    metrics_port = _free_port()
    env = {**os.environ, "FACEMUX_LOG_LEVEL": "WARNING"}
    cmd = [
        sys.executable,
        "-m",
        "facemux.client.cli",
        "serve",
        "--port",
        str(port),
        "--store",
        str(store),
        "--metrics-port",
        str(metrics_port),
        # Loopback benchmark: no callers, no provenance marks (they are measured on their own
        # in bench/watermark.py), no audit lines.
        "--auth",
        "off",
        "--provenance",
        "off",
        "--audit-log",
        "",
        "--torch-threads",
        str(threads),
        *extra,
    ]
    proc = subprocess.Popen(cmd, env=env)
    try:
        with FacemuxClient(f"127.0.0.1:{port}") as probe:
            probe.wait_ready(120)
            res = probe.model_info().resolution
        inputs = crops(per_call, res)
        # Warm-up: load the decoder and settle the threads.
        with FacemuxClient(f"127.0.0.1:{port}") as c:
            for _ in range(3):
                c.swap_faces(inputs, "bench", output_format="raw")
        latencies: list[list[float]] = [[] for _ in range(clients)]
        stop_at = time.perf_counter() + seconds
        barrier = threading.Barrier(clients)

        def worker(k: int) -> None:
            with FacemuxClient(f"127.0.0.1:{port}", timeout=300) as c:
                barrier.wait()
                while time.perf_counter() < stop_at:
                    t0 = time.perf_counter()
                    c.swap_faces(inputs, "bench", output_format="raw")
                    latencies[k].append(time.perf_counter() - t0)

        t_start = time.perf_counter()
        ts = [threading.Thread(target=worker, args=(k,)) for k in range(clients)]
        for t in ts:
            t.start()
        for t in ts:
            t.join()
        wall = time.perf_counter() - t_start
        stages = stage_ms(metrics_port)
    finally:
        proc.terminate()
        proc.wait(30)
    flat = [x for lat in latencies for x in lat]
    return Row(
        name,
        len(flat) * per_call / wall,
        1000 * statistics.median(flat),
        1000 * float(np.percentile(flat, 99)),
        len(flat),
        stages,
    )


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="original64")
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--faces-per-call", type=int, default=1)
    p.add_argument("--seconds", type=float, default=15.0)
    p.add_argument(
        "--threads",
        type=int,
        default=os.cpu_count() or 1,
        help="torch threads for the server and the bare loop",
    )
    p.add_argument("--max-wait-ms", type=float, default=5.0)
    p.add_argument("--device", default="auto", help="auto, cpu or cuda (server and bare loop)")
    args = p.parse_args()
    batch = args.clients * args.faces_per_call
    with tempfile.TemporaryDirectory() as tmp:
        store = Path(tmp) / "store"
        make_store(store, args.preset)
        batched = through_server(
            f"server, batching on (max batch {batch}, wait {args.max_wait_ms} ms)",
            store,
            args.clients,
            args.faces_per_call,
            args.seconds,
            args.threads,
            [
                "--max-batch-size",
                str(batch),
                "--max-batch-wait-ms",
                str(args.max_wait_ms),
                "--device",
                args.device,
            ],
        )
        unbatched = through_server(
            "server, batching off",
            store,
            args.clients,
            args.faces_per_call,
            args.seconds,
            args.threads,
            ["--batching", "false", "--device", args.device],
        )
    bare = bare_loop(args.preset, batch, args.seconds, args.threads, args.device)
    print(
        f"\npreset {args.preset}, {args.clients} clients x {args.faces_per_call} face(s) per "
        f"call, {args.seconds:.0f} s each, {args.threads} torch threads, {os.cpu_count()} cores"
    )
    print(f"{'mode':52s} {'faces/s':>9s} {'p50 ms':>8s} {'p99 ms':>8s} {'calls':>7s}")
    for r in (batched, unbatched, bare):
        print(f"{r.name:52s} {r.faces_per_s:9.1f} {r.p50_ms:8.1f} {r.p99_ms:8.1f} {r.calls:7d}")
    for r in (batched, unbatched):
        # Warm-up calls included; model_batch is per batch, the others per call.
        split = ", ".join(f"{k} {v:.1f}" for k, v in sorted(r.stages.items()))
        print(f"  server ms, {r.name.split(' (')[0]}: {split}")
    print(
        f"summary: batched/unbatched = {batched.faces_per_s / unbatched.faces_per_s:.2f}x, "
        f"batched/bare = {batched.faces_per_s / bare.faces_per_s:.2f} "
        f"({args.preset}, {args.clients}x{args.faces_per_call})"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
