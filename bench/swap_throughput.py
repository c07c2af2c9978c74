"""Aligned-face Swap throughput through gRPC, against the same server unbatched and the bare
model loop, all measured in one run on one machine.

    python bench/swap_throughput.py --preset original64 --clients 8 --seconds 20
    python bench/swap_throughput.py --preset tiny --clients 8 --faces-per-call 1
    python bench/swap_throughput.py --convoy --max-wait-ms 10 [--baseline-src ../main]
    python bench/swap_throughput.py --preset df128 --device cuda --clients 32 --processes 4
    python bench/swap_throughput.py --preset df128 --device cuda --clients 32 \
        --compile reduce-overhead

--convoy measures batch formation under what users send: K closed-loop grpc.aio callers on
one channel, one 64x64 JPEG crop per call, PNG back, max batch K, server defaults otherwise
(provenance on); it prints the server's mean batch (from /metrics) next to faces/s and
latency. --baseline-src runs the same load against a server from another source checkout
(e.g. the main branch) in the same run, for a side-by-side before/after.

Each server runs in its own process (`facemux serve`), the clients are threads of this
process, each with its own channel, sending pre-encoded PNG crops and asking for raw output
(the server-side PNG encoder would otherwise dominate with small models). The bare loop runs
the encoder and decoder in this process at the batch size the batched server can form
(clients x faces per call), with the same torch thread count as the server.

--processes N adds a row for `facemux serve --processes N` (N servers on one port, torch
threads shared out among them) beside the one-process rows; every client then opens its own
connection (the kernel spreads connections, not calls, over the processes), in every row.

--compile MODE adds a row for the server with `--compile MODE` (each batch padded to a
power-of-two bucket, every bucket compiled at load) and a bare loop compiled the same way.
The server compiles on CUDA only: on CPU its row runs eager.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import cast

import cv2
import grpc
import numpy as np
import torch
from facemux.client import FacemuxClient
from facemux.models import checkpoint, inference
from facemux.models.config import get_preset
from facemux.models.networks import build_decoder, build_encoder
from facemux.service.store import LocalStore, VersionRecord
from facemux.v1 import swap_service_pb2 as spb
from facemux.v1 import swap_service_pb2_grpc, types_pb2

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from serve_process import ServeProcess, free_port

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


def _scrape(metrics_port: int) -> str:
    url = f"http://127.0.0.1:{metrics_port}/metrics"
    return bytes(urllib.request.urlopen(url, timeout=10).read()).decode()


def sample_sum(text: str, name: str) -> float:
    """One unlabelled sample (e.g. facemux_batch_size_sum) from a /metrics page."""
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def stage_ms(metrics_port: int) -> dict[str, float]:
    """Mean ms per observation of each pipeline stage, from the server's own /metrics (where
    a call's time goes: decoding crops, the queue and model, encoding results)."""
    text = _scrape(metrics_port)
    sums: dict[str, float] = {}
    counts: dict[str, float] = {}
    for line in text.splitlines():
        for suffix, into in (("_sum", sums), ("_count", counts)):
            head = f'facemux_stage_seconds{suffix}{{stage="'
            if line.startswith(head):
                stage = line[len(head) :].split('"', 1)[0]
                into[stage] = float(line.rsplit(" ", 1)[1])
    return {k: 1000 * sums[k] / counts[k] for k in sums if counts.get(k)}


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


def bare_loop(
    preset: str, batch: int, seconds: float, threads: int, device: str, compile_mode: str = ""
) -> Row:
    """The model alone at the server's batch size, with the server's precision rules
    (bf16 autocast on CUDA, fp32 on CPU) and the same uint8 in / uint8 out work;
    `compile_mode`: torch.compile'd in that mode, channels_last, as the server does."""
    torch.set_num_threads(threads)
    dev = inference.pick_device(device)
    cfg = get_preset(preset)
    enc: torch.nn.Module = build_encoder(cfg, seed=0).eval().to(dev)
    dec: torch.nn.Module = build_decoder(cfg, seed=1).eval().to(dev)
    if compile_mode and dev.type != "cuda":
        compile_mode = ""  # as the server: it compiles on CUDA only
    if compile_mode:
        inference.set_layout(enc, "channels_last")
        inference.set_layout(dec, "channels_last")
        enc = cast(torch.nn.Module, torch.compile(enc, mode=compile_mode, dynamic=False))
        dec = cast(torch.nn.Module, torch.compile(dec, mode=compile_mode, dynamic=False))
    faces = torch.randint(0, 255, (batch, cfg.resolution, cfg.resolution, 3), dtype=torch.uint8)
    bf16 = dev.type == "cuda"

    def once() -> None:
        x = faces.to(dev, non_blocking=True).permute(0, 3, 1, 2).float().div_(255.0)
        if compile_mode:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=bf16):
            rgb, _ = inference.decode(dec, inference.encode(enc, x))
        inference.tensor_to_images(rgb.float())

    for _ in range(3 if compile_mode else 1):  # CUDA graphs replay from the third call
        once()
    times: list[float] = []
    t_end = time.perf_counter() + seconds
    while time.perf_counter() < t_end or len(times) < 3:
        t0 = time.perf_counter()
        once()
        times.append(time.perf_counter() - t0)
    total = sum(times)
    return Row(
        f"bare model loop, batch {batch}" + (f", compiled ({compile_mode})" * bool(compile_mode)),
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
    own_connections: bool = False,
) -> Row:
    opts = [("grpc.use_local_subchannel_pool", 1)] if own_connections else []
    server = ServeProcess(
        store,
        # Loopback benchmark: no callers, no provenance marks (they are measured on their own
        # in bench/watermark.py), no audit lines.
        *("--auth", "off", "--provenance", "off", "--audit-log", ""),
        *("--torch-threads", str(threads), *extra),
        metrics=True,
        env={"FACEMUX_LOG_LEVEL": "WARNING"},
    ).start()
    port, metrics_port = server.port, server.metrics_port
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
            with FacemuxClient(f"127.0.0.1:{port}", timeout=300, channel_options=opts) as c:
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
        server.stop()
    flat = [x for lat in latencies for x in lat]
    return Row(
        name,
        len(flat) * per_call / wall,
        1000 * statistics.median(flat),
        1000 * float(np.percentile(flat, 99)),
        len(flat),
        stages,
    )


@dataclass
class ConvoyRow:
    name: str
    mean_batch: float
    mean_queue_wait_ms: float
    faces_per_s: float
    p50_ms: float
    p99_ms: float
    calls: int


def _source_path(src: Path, into: Path) -> str:
    """A PYTHONPATH entry that imports facemux from another source checkout (its folders
    mapped as pyproject.toml maps them), ahead of the installed one."""
    pkg = into / "facemux"
    pkg.mkdir(parents=True)
    for name, folder in (
        ("models", "models"),
        ("service", "service"),
        ("client", "client"),
        ("v1", "proto/facemux/v1"),
    ):
        (pkg / name).symlink_to((src / folder).resolve(), target_is_directory=True)
    return str(into)


def convoy(
    name: str,
    store: Path,
    clients: int,
    max_batch: int,
    seconds: float,
    max_wait_ms: float,
    source: Path | None,
    workdir: Path,
) -> ConvoyRow:
    """K closed-loop grpc.aio callers on one channel against a server with defaults (but
    auth off: loopback, no tokens)."""
    env = {"FACEMUX_LOG_LEVEL": "WARNING"}
    port = free_port()
    if source is not None:
        env["PYTHONPATH"] = _source_path(source, workdir / f"src-{port}")
    server = ServeProcess(
        store,
        *("--auth", "off", "--audit-log", str(workdir / f"audit-{port}.log")),
        *("--max-batch-size", str(max_batch), "--max-batch-wait-ms", str(max_wait_ms)),
        port=port,
        metrics=True,
        env=env,
    ).start()
    metrics_port = server.metrics_port
    try:
        with FacemuxClient(f"127.0.0.1:{port}") as probe:
            probe.wait_ready(120)
            res = probe.model_info().resolution
        rng = np.random.default_rng(0)
        small = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
        face = cv2.resize(small, (res, res), interpolation=cv2.INTER_CUBIC)
        jpeg = bytes(cv2.imencode(".jpg", face)[1].tobytes())
        request = spb.SwapRequest(
            identity="bench",
            faces=spb.FaceBatch(faces=[types_pb2.Image(encoded=jpeg)]),
            output=types_pb2.OutputOptions(format=types_pb2.IMAGE_FORMAT_PNG),
        )

        async def load() -> tuple[list[float], float, float, float, float]:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                stub = swap_service_pb2_grpc.SwapServiceStub(channel)
                for _ in range(3):  # warm-up: load the decoder, settle the threads
                    await stub.Swap(request, timeout=300)
                before = _scrape(metrics_port)
                stop_at = time.perf_counter() + seconds
                latencies: list[float] = []

                async def caller() -> None:
                    while time.perf_counter() < stop_at:
                        t0 = time.perf_counter()
                        await stub.Swap(request, timeout=300)
                        latencies.append(time.perf_counter() - t0)

                t_start = time.perf_counter()
                await asyncio.gather(*(caller() for _ in range(clients)))
                wall = time.perf_counter() - t_start
                after = _scrape(metrics_port)

            def delta(sample: str) -> float:
                return sample_sum(after, sample) - sample_sum(before, sample)

            return (
                latencies,
                wall,
                delta("facemux_batch_size_sum") / max(1.0, delta("facemux_batch_size_count")),
                delta("facemux_queue_wait_seconds_sum"),
                delta("facemux_queue_wait_seconds_count"),
            )

        latencies, wall, mean_batch, wait_sum, wait_count = asyncio.run(load())
    finally:
        server.stop()
    return ConvoyRow(
        name,
        mean_batch,
        1000 * wait_sum / wait_count if wait_count else float("nan"),
        len(latencies) / wall,
        1000 * statistics.median(latencies),
        1000 * float(np.percentile(latencies, 99)),
        len(latencies),
    )


def convoy_main(args: argparse.Namespace) -> int:
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        store = work / "store"
        make_store(store, args.preset)
        sources: list[tuple[str, Path | None]] = [("this checkout", None)]
        if args.baseline_src:
            sources.insert(0, (f"baseline {args.baseline_src}", Path(args.baseline_src)))
        max_batch = args.max_batch or args.clients
        rows = [
            convoy(name, store, args.clients, max_batch, args.seconds, args.max_wait_ms, src, work)
            for name, src in sources
        ]
    print(
        f"\npreset {args.preset}, {args.clients} closed-loop grpc.aio callers on one channel, "
        f"1 JPEG crop per call, PNG out, provenance on, max batch {max_batch}, "
        f"wait {args.max_wait_ms} ms, {args.seconds:.0f} s each, {os.cpu_count()} cores\n"
    )
    print("| server | mean batch | queue wait ms | faces/s | p50 ms | p99 ms | calls |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(
            f"| {r.name} | {r.mean_batch:.2f} | {r.mean_queue_wait_ms:.2f} | "
            f"{r.faces_per_s:.1f} | {r.p50_ms:.1f} | {r.p99_ms:.1f} | {r.calls} |"
        )
    if len(rows) == 2:
        print(
            f"\nsummary: mean batch {rows[0].mean_batch:.2f} -> {rows[1].mean_batch:.2f} of "
            f"{max_batch}, faces/s x{rows[1].faces_per_s / rows[0].faces_per_s:.2f}"
        )
    return 0


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
    p.add_argument(
        "--processes",
        type=int,
        default=1,
        help="also serve with this many server processes on one port (a row of its own)",
    )
    p.add_argument(
        "--compile",
        default="",
        help="also serve with --compile MODE (batches padded to buckets), beside a bare loop "
        "compiled the same way (rows of their own)",
    )
    p.add_argument(
        "--convoy",
        action="store_true",
        help="batch formation under K closed-loop grpc.aio callers (JPEG in, PNG out, "
        "provenance on); prints the server's mean batch",
    )
    p.add_argument(
        "--max-batch",
        type=int,
        default=0,
        help="with --convoy: the server's max batch (default: one face per client)",
    )
    p.add_argument(
        "--baseline-src",
        default="",
        help="with --convoy: also run a server from this source checkout, first",
    )
    args = p.parse_args()
    if args.convoy:
        return convoy_main(args)
    batch = args.clients * args.faces_per_call
    own = args.processes > 1
    batching = ["--max-batch-size", str(batch), "--max-batch-wait-ms", str(args.max_wait_ms)]
    multi: Row | None = None
    compiled: Row | None = None
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
            [*batching, "--device", args.device],
            own,
        )
        if own:
            multi = through_server(
                f"server, batching on, {args.processes} processes",
                store,
                args.clients,
                args.faces_per_call,
                args.seconds,
                max(1, args.threads // args.processes),
                [*batching, "--device", args.device, "--processes", str(args.processes)],
                own,
            )
        if args.compile:
            compiled = through_server(
                f"server, batching on, compiled ({args.compile})",
                store,
                args.clients,
                args.faces_per_call,
                args.seconds,
                args.threads,
                [*batching, "--device", args.device, "--compile", args.compile],
                own,
            )
        unbatched = through_server(
            "server, batching off",
            store,
            args.clients,
            args.faces_per_call,
            args.seconds,
            args.threads,
            ["--batching", "false", "--device", args.device],
            own,
        )
    bare = bare_loop(args.preset, batch, args.seconds, args.threads, args.device)
    bare_compiled = None
    if args.compile:
        bare_compiled = bare_loop(
            args.preset, batch, args.seconds, args.threads, args.device, args.compile
        )
    print(
        f"\npreset {args.preset}, {args.clients} clients x {args.faces_per_call} face(s) per "
        f"call, {args.seconds:.0f} s each, {args.threads} torch threads, {os.cpu_count()} cores"
    )
    print(f"{'mode':52s} {'faces/s':>9s} {'p50 ms':>8s} {'p99 ms':>8s} {'calls':>7s}")
    extra_rows = [r for r in (multi, compiled) if r is not None]
    for r in (batched, *extra_rows, unbatched, bare, *([bare_compiled] if bare_compiled else [])):
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
    if multi is not None:
        print(
            f"summary: {args.processes} processes / one = "
            f"{multi.faces_per_s / batched.faces_per_s:.2f}x, "
            f"{args.processes} processes / bare = {multi.faces_per_s / bare.faces_per_s:.2f}"
        )
    if compiled is not None and bare_compiled is not None:
        print(
            f"summary: compiled server / bare compiled = "
            f"{compiled.faces_per_s / bare_compiled.faces_per_s:.2f}, compiled / eager server "
            f"= {compiled.faces_per_s / batched.faces_per_s:.2f}x ({args.compile})"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
