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
(from its /metrics, over all rounds) and the ratios the serving targets are stated in.
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
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import grpc
import numpy as np
from facemux.v1 import swap_service_pb2 as spb
from facemux.v1 import types_pb2

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from serve_process import ServeProcess, free_port
from swap_throughput import make_store, stage_ms

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


def mean_batch(metrics_port: int) -> float:
    """Mean faces per model batch, from the server's /metrics."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).read()
    got = {}
    for line in text.decode().splitlines():
        for key in ("facemux_batch_size_sum", "facemux_batch_size_count"):
            if line.startswith(key + " "):
                got[key] = float(line.split()[1])
    return got.get("facemux_batch_size_sum", 0.0) / max(1.0, got.get("facemux_batch_size_count", 0))


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


class Servers:
    """The three servers, started once and kept up while the rounds alternate between them."""

    def __init__(self, store: Path, args: argparse.Namespace) -> None:
        self.servers: list[ServeProcess] = []
        self.metrics: dict[str, int] = {}
        self.targets: dict[str, tuple[str, str]] = {}
        port = free_port()
        self.echo = subprocess.Popen([sys.executable, __file__, "--echo-server", str(port)])
        self.targets[ECHO_ROW] = (f"127.0.0.1:{port}", ECHO)
        for name, extra in ((ON_ROW, []), (OFF_ROW, ["--provenance", "off"])):
            server = ServeProcess(
                store,
                # Loopback, no callers to authenticate; no audit file to write.
                *("--auth", "off", "--audit-log", ""),
                *("--max-batch-size", str(args.batch)),
                *("--max-batch-wait-ms", str(args.max_wait_ms)),
                *extra,
                metrics=True,
                env={"FACEMUX_LOG_LEVEL": "WARNING"},
            ).start()
            self.servers.append(server)
            self.targets[name] = (server.target, SWAP)
            self.metrics[name] = server.metrics_port
        for server in self.servers:
            server.wait_ready(120)

    def close(self) -> None:
        for server in self.servers:
            server.proc.terminate()
        for server in self.servers:
            server.stop()
        self.echo.terminate()
        self.echo.wait(30)


ECHO_ROW = "raw-bytes grpc.aio echo server"
ON_ROW = "Swap, defaults (provenance on)"
OFF_ROW = "Swap, provenance OFF"


def measure(servers: Servers, name: str, payload: bytes, clients: int, seconds: float) -> Row:
    target, method = servers.targets[name]
    deadline = time.monotonic() + 30
    while True:
        try:
            calls, wall, lat = asyncio.run(_load(target, method, payload, clients, seconds))
            break
        except grpc.aio.AioRpcError:  # the echo server still starting
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)
    return _row(name, calls, wall, lat, {})


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="tiny")
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--batch", type=int, default=8, help="the servers' max batch size")
    p.add_argument("--max-wait-ms", type=float, default=10.0)
    p.add_argument("--seconds", type=float, default=5.0, help="per row and round")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--echo-server", type=int, default=0, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.echo_server:
        asyncio.run(_echo_server(args.echo_server))
        return 0
    names = (ECHO_ROW, ON_ROW, OFF_ROW)
    rounds: dict[str, list[Row]] = {n: [] for n in names}
    with tempfile.TemporaryDirectory() as tmp:
        store = Path(tmp) / "store"
        make_store(store, args.preset)
        from facemux.models.config import get_preset

        payload = request_bytes(get_preset(args.preset).resolution)
        servers = Servers(store, args)
        try:
            # Rounds alternate between the servers, so that the load of a shared machine
            # falls on every row alike; each row reports its median round.
            for _ in range(args.rounds):
                for n in names:
                    rounds[n].append(measure(servers, n, payload, args.clients, args.seconds))
            stages = {n: stage_ms(servers.metrics[n]) for n in (ON_ROW, OFF_ROW)}
            for n in (ON_ROW, OFF_ROW):
                stages[n]["mean faces per batch"] = mean_batch(servers.metrics[n])
        finally:
            servers.close()

    def median(rows: list[Row]) -> Row:
        return sorted(rows, key=lambda r: r.calls_per_s)[len(rows) // 2]

    echo, on, off = (median(rounds[n]) for n in names)
    on.stages, off.stages = stages[ON_ROW], stages[OFF_ROW]
    ratio_on_off = statistics.median(
        a.calls_per_s / b.calls_per_s for a, b in zip(rounds[ON_ROW], rounds[OFF_ROW], strict=True)
    )
    ratio_echo = statistics.median(
        a.calls_per_s / b.calls_per_s for a, b in zip(rounds[ON_ROW], rounds[ECHO_ROW], strict=True)
    )
    print(
        f"\n{args.preset}, {args.clients} closed-loop clients on one channel, 1 face (64x64 "
        f"JPEG) per call, PNG back, batch {args.batch}, wait {args.max_wait_ms:g} ms, "
        f"{args.rounds} rounds of {args.seconds:g} s per row (median shown), "
        f"{os.cpu_count()} cores\n"
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
        f"\nmedian of per-round ratios: provenance on / off = {ratio_on_off:.2f} (target >= "
        f"0.85); Swap (defaults) / echo = {ratio_echo:.2f} (target >= 0.5)"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
