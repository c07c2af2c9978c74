"""Per-call cost of Swap against a raw-bytes gRPC echo server, and the cost of provenance,
measured side by side in one run with one load generator.

    python bench/serving_path.py --preset tiny --clients 8 --seconds 10

Three servers, each in its own process, are driven in turn by the same closed-loop load
generator (grpc.aio coroutines of this process on one channel) sending the same serialized
single-face SwapRequest (a 64x64 JPEG crop, PNG back):

- a raw-bytes grpc.aio echo server: what a call costs with no work behind it;
- facemux with its defaults (provenance on: watermark + signed C2PA manifest per face);
- facemux with provenance off (labelled: users never get this by default).

The facemux servers batch up to --batch faces, waiting at most --max-wait-ms. The table
gives calls/s (= faces/s, one face per call), latency, the server's own per-stage split
(from its /metrics) and the ratios the serving targets are stated in.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import grpc
import numpy as np
from facemux.client import FacemuxClient
from facemux.v1 import swap_service_pb2 as spb
from facemux.v1 import types_pb2

sys.path.insert(0, str(Path(__file__).resolve().parent))
from swap_throughput import _free_port, make_store, stage_ms

SWAP = "/facemux.v1.SwapService/Swap"
ECHO = "/bench.Echo/Echo"


@dataclass
class Row:
    name: str
    calls_per_s: float
    p50_ms: float
    p99_ms: float
    calls: int
    stages: dict[str, float] = field(default_factory=dict)


def request_bytes(res: int) -> bytes:
    rng = np.random.default_rng(0)
    small = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
    img = cv2.resize(small, (res, res), interpolation=cv2.INTER_CUBIC)
    jpeg = bytes(cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, 90])[1].tobytes())
    req = spb.SwapRequest(
        identity="bench",
        faces=spb.FaceBatch(faces=[types_pb2.Image(encoded=jpeg)]),
        output=types_pb2.OutputOptions(format=types_pb2.IMAGE_FORMAT_PNG),
    )
    return req.SerializeToString()


async def _echo_server(port: int) -> None:
    def echo(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        return request

    handler = grpc.method_handlers_generic_handler(
        "bench.Echo", {"Echo": grpc.unary_unary_rpc_method_handler(echo)}
    )
    server = grpc.aio.server()
    server.add_generic_rpc_handlers((handler,))
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    await server.wait_for_termination()


async def _load(
    target: str, method: str, payload: bytes, clients: int, seconds: float
) -> tuple[int, float, list[float]]:
    """Closed loop: each client sends its next call when the last one returns."""
    async with grpc.aio.insecure_channel(target) as channel:
        call = channel.unary_unary(method)  # bytes in, bytes out: no (de)serialization
        for _ in range(5):  # warm-up: connection, decoder load
            await call(payload, timeout=120)
        latencies: list[float] = []
        stop_at = time.perf_counter() + seconds

        async def client() -> None:
            while time.perf_counter() < stop_at:
                t0 = time.perf_counter()
                await call(payload, timeout=60)
                latencies.append(time.perf_counter() - t0)

        t_start = time.perf_counter()
        await asyncio.gather(*(client() for _ in range(clients)))
        return len(latencies), time.perf_counter() - t_start, latencies


def _row(name: str, calls: int, wall: float, lat: list[float], stages: dict[str, float]) -> Row:
    return Row(
        name,
        calls / wall,
        1000 * statistics.median(lat),
        1000 * float(np.percentile(lat, 99)),
        calls,
        stages,
    )


def echo_row(payload: bytes, clients: int, seconds: float) -> Row:
    port = _free_port()
    proc = subprocess.Popen([sys.executable, __file__, "--echo-server", str(port)])
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                calls, wall, lat = asyncio.run(
                    _load(f"127.0.0.1:{port}", ECHO, payload, clients, seconds)
                )
                break
            except grpc.aio.AioRpcError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)
    finally:
        proc.terminate()
        proc.wait(30)
    return _row("raw-bytes grpc.aio echo server", calls, wall, lat, {})


def swap_row(
    name: str, store: Path, payload: bytes, args: argparse.Namespace, extra: list[str]
) -> Row:
    port, metrics_port = _free_port(), _free_port()
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
        # Loopback, no callers to authenticate; no audit file to write.
        "--auth",
        "off",
        "--audit-log",
        "",
        "--max-batch-size",
        str(args.batch),
        "--max-batch-wait-ms",
        str(args.max_wait_ms),
        *extra,
    ]
    env = {**os.environ, "FACEMUX_LOG_LEVEL": "WARNING"}
    proc = subprocess.Popen(cmd, env=env)
    try:
        with FacemuxClient(f"127.0.0.1:{port}") as probe:
            probe.wait_ready(120)
        calls, wall, lat = asyncio.run(
            _load(f"127.0.0.1:{port}", SWAP, payload, args.clients, args.seconds)
        )
        stages = stage_ms(metrics_port)
    finally:
        proc.terminate()
        proc.wait(30)
    return _row(name, calls, wall, lat, stages)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="tiny")
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--batch", type=int, default=8, help="the servers' max batch size")
    p.add_argument("--max-wait-ms", type=float, default=10.0)
    p.add_argument("--seconds", type=float, default=10.0)
    p.add_argument("--echo-server", type=int, default=0, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.echo_server:
        asyncio.run(_echo_server(args.echo_server))
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        store = Path(tmp) / "store"
        make_store(store, args.preset)
        from facemux.models.config import get_preset

        payload = request_bytes(get_preset(args.preset).resolution)
        echo = echo_row(payload, args.clients, args.seconds)
        on = swap_row("Swap, defaults (provenance on)", store, payload, args, [])
        off = swap_row("Swap, provenance OFF", store, payload, args, ["--provenance", "off"])
    print(
        f"\n{args.preset}, {args.clients} closed-loop clients on one channel, 1 face (64x64 "
        f"JPEG) per call, PNG back, batch {args.batch}, wait {args.max_wait_ms:g} ms, "
        f"{args.seconds:g} s per row, {os.cpu_count()} cores\n"
    )
    print("| server | calls/s | p50 ms | p99 ms | calls |")
    print("|---|---:|---:|---:|---:|")
    for r in (echo, on, off):
        print(f"| {r.name} | {r.calls_per_s:.1f} | {r.p50_ms:.1f} | {r.p99_ms:.1f} | {r.calls} |")
    print()
    for r in (on, off):
        split = ", ".join(f"{k} {v:.2f}" for k, v in sorted(r.stages.items()))
        print(f"- server ms per call, {r.name}: {split}")
    print(
        f"\nprovenance on / off = {on.calls_per_s / off.calls_per_s:.2f} (target >= 0.85); "
        f"Swap (defaults) / echo = {on.calls_per_s / echo.calls_per_s:.2f} (target >= 0.5)"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
