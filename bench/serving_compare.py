"""The same model served by facemux and by TorchServe 0.12, driven by one load generator in one
run, each against its own bare forward at batch 8 (measured right before it).

    python bench/serving_compare.py                      # tiny and original64, 20 s each
    python bench/serving_compare.py --presets tiny --seconds 10 --json out.json
    python bench/serving_compare.py --presets tiny --connections 8 --processes 2

Per preset: one store with random-weight identities (the figures do not depend on training);
the TorchServe archive is exported from that store (`export_torchserve`: the same weights,
facemux's handler). Both servers get the same C2PA test signer, so both answer every face
watermarked and C2PA-signed, as `facemux serve` does by default (`--provenance
watermark-only` drops the C2PA manifest on both, and the rows say so). Each server runs alone
(the other is stopped), out of this process, with the same torch thread count:

- facemux: `facemux serve` with its defaults (bearer tokens, provenance on, audit log) except
  max batch 8 / max wait 10 ms, TorchServe's batchSize / maxBatchDelay;
- TorchServe: the archive (batchSize 8, maxBatchDelay 10, one worker), OMP_NUM_THREADS set
  to the same count (the worker logs the torch threads it got), TorchServe's own token
  authorization off (the test launcher's setting).

The load: K closed-loop grpc.aio clients on one channel (`--connections N`: spread over N
channels, each its own connection), one 64x64 JPEG face per call, PNG back; facemux's Swap,
TorchServe's gRPC Predictions (identity field). A TorchServe answer whose body is not a PNG
(the handler's JSON error body) counts as an error. `--processes N` adds a row for
`facemux serve --processes N`: N servers on one port, each with its share of the torch
threads and its own batches. Mean batch: facemux's facemux_batch_size histogram (summed over
the processes); TorchServe's from the handler's FacemuxBatchSize
metric (declared in the launcher's metrics.yaml), both over the measured window only. The
bare forward is bench/model_throughput.py's `measure` at batch 8 (fp32, not compiled).

Needs the torchserve extra and Java 17 (the dev install has both). A benchmark, not a test.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import socket
import statistics
import sys
import tempfile
import time
import urllib.request
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import cv2
import grpc
import numpy as np
import torch
from facemux.client import FacemuxClient
from facemux.models import checkpoint
from facemux.models.config import get_preset
from facemux.models.networks import build_decoder, build_encoder
from facemux.service import c2pa
from facemux.service.auth import make_entry
from facemux.service.export_torchserve import export_torchserve
from facemux.service.store import LocalStore, VersionRecord
from facemux.v1 import swap_service_pb2 as spb
from facemux.v1 import swap_service_pb2_grpc as sgrpc
from facemux.v1 import types_pb2

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from model_throughput import measure
from serve_process import ServeProcess, free_port
from ts_server import TorchServe, grpc_modules, why_not_available

CONSENT = {"attested_by": "bench@example.com", "evidence_ref": "BENCH", "granted_at": "2026-01-01"}
IDENTITY = "bench"
BATCH, WAIT_MS = 8, 10
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@dataclass
class Row:
    preset: str
    server: str
    faces_per_s: float
    p50_ms: float
    p99_ms: float
    errors: int
    calls: int
    mean_batch: float
    bare_faces_per_s: float
    torch_threads: int | None
    note: str

    @property
    def ratio_to_bare(self) -> float:
        return self.faces_per_s / self.bare_faces_per_s


def make_store(root: Path, preset: str) -> LocalStore:
    cfg = get_preset(preset)
    store = LocalStore(root)
    enc_bytes, meta = checkpoint.encoder_to_bytes(build_encoder(cfg, seed=0), cfg)
    store.put_encoder(enc_bytes, meta.fingerprint)
    data, dmeta = checkpoint.decoder_to_bytes(
        build_decoder(cfg, seed=1), cfg, meta.fingerprint, IDENTITY
    )
    store.add_version(IDENTITY, data, VersionRecord.for_decoder(dmeta), consent=dict(CONSENT))
    return store


def jpeg_face(size: int) -> bytes:
    """A smooth 64x64-ish face-sized JPEG (noise would make both PNG encoders slower)."""
    small = np.random.default_rng(0).integers(0, 256, (8, 8, 3), dtype=np.uint8)
    img = cv2.resize(small, (size, size), interpolation=cv2.INTER_CUBIC)
    return bytes(cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, 90])[1].tobytes())


@dataclass
class Load:
    latencies: list[float]
    errors: int
    seconds: float
    first_error: str = ""


async def closed_loop(
    call_for: Callable[[int], Callable[[], Awaitable[bool]]],
    clients: int,
    warmup: float,
    seconds: float,
    at_start: Callable[[], None],
) -> Load:
    """`clients` coroutines, each issuing its next call (client i's: `call_for(i)`) when
    the last one is answered. Calls that start in the warm-up are not counted; `at_start`
    runs when measuring begins."""
    loop = asyncio.get_running_loop()
    begin = loop.time() + warmup
    end = begin + seconds
    latencies: list[float] = []
    load = Load(latencies, 0, seconds)

    async def client(i: int) -> None:
        call = call_for(i)
        while (t0 := loop.time()) < end:
            try:
                ok = await call()
                why = "" if ok else "answer is not a PNG face"
            except grpc.aio.AioRpcError as exc:
                ok, why = False, f"{exc.code().name}: {exc.details()}"
            t1 = loop.time()
            if t0 >= begin and t1 <= end:
                if ok:
                    latencies.append(t1 - t0)
                else:
                    load.errors += 1
                    load.first_error = load.first_error or why

    async def mark() -> None:
        await asyncio.sleep(warmup)
        await loop.run_in_executor(None, at_start)

    await asyncio.gather(mark(), *(client(i) for i in range(clients)))
    return load


def _summary(load: Load) -> tuple[float, float, float]:
    lat = load.latencies or [float("nan")]
    return (
        len(load.latencies) / load.seconds,
        1000 * statistics.median(lat),
        1000 * float(np.percentile(lat, 99)),
    )


def facemux_batches(metrics_port: int) -> tuple[float, float]:
    """(sum, count) of the facemux_batch_size histogram."""
    url = f"http://127.0.0.1:{metrics_port}/metrics"
    text = urllib.request.urlopen(url, timeout=10).read().decode()
    found = {"sum": 0.0, "count": 0.0}
    for line in text.splitlines():
        for key in found:
            if line.startswith(f"facemux_batch_size_{key} "):
                found[key] = float(line.split()[-1])
    return found["sum"], found["count"]


async def load_over(
    target: str,
    call_on: Callable[[grpc.aio.Channel], Callable[[], Awaitable[bool]]],
    args: argparse.Namespace,
    at_start: Callable[[], None],
) -> Load:
    """`closed_loop` with client i calling through channel i % --connections (its call is
    `call_on(channel)`). Each channel has a connection of its own: grpc shares one among
    channels to the same target unless each keeps its own pool."""
    n = args.connections
    options = [("grpc.use_local_subchannel_pool", 1)] if n > 1 else []
    chans = [grpc.aio.insecure_channel(target, options=options) for _ in range(n)]
    try:
        calls = [call_on(ch) for ch in chans]
        return await closed_loop(
            lambda i: calls[i % n], args.clients, args.warmup, args.seconds, at_start
        )
    finally:
        for ch in chans:
            await ch.close()


def run_facemux(
    preset: str,
    store: Path,
    work: Path,
    face: bytes,
    args: argparse.Namespace,
    bare: float,
    processes: int = 1,
) -> Row:
    entry, token = make_entry("bench", ["swap"])
    tokens = work / "callers.jsonl"
    tokens.write_text(json.dumps(entry) + "\n")
    threads = max(1, args.threads // processes)  # each server's share
    # Server i of `--processes` serves /metrics on metrics_port + i: a run of free ports.
    metrics_base = free_ports(processes)
    # The audit trail goes to stdout by default: written, as a user's would be, then dropped
    # (with a log file the helper drops the child's stdout).
    server = ServeProcess(
        store,
        *("--auth-tokens-file", str(tokens), "--torch-threads", str(threads)),
        *("--max-batch-size", str(BATCH), "--max-batch-wait-ms", str(WAIT_MS)),
        *(["--provenance", args.provenance] if args.provenance != "on" else []),
        *(["--processes", str(processes)] if processes > 1 else []),
        *("--metrics-port", str(metrics_base)),  # after the helper's own: argparse keeps it
        log=work / "facemux.log",
    ).start()
    port = server.port
    metrics_ports = [metrics_base + i for i in range(processes)]
    try:
        with FacemuxClient(f"127.0.0.1:{port}", token=token) as probe:
            probe.wait_ready(120)
        if processes > 1:  # the probe found one of them ready: wait for every one
            wait_metrics(metrics_ports, 120)
        request = spb.SwapRequest(
            identity=IDENTITY,
            faces=spb.FaceBatch(faces=[types_pb2.Image(encoded=face)]),
            output=types_pb2.OutputOptions(format=types_pb2.IMAGE_FORMAT_PNG),
        )
        metadata = (("authorization", f"Bearer {token}"),)
        marks: list[tuple[float, float]] = []

        def batches() -> tuple[float, float]:
            found = [facemux_batches(p) for p in metrics_ports]
            return sum(s for s, _ in found), sum(c for _, c in found)

        def call_on(channel: grpc.aio.Channel) -> Callable[[], Awaitable[bool]]:
            stub = sgrpc.SwapServiceStub(channel)

            async def call() -> bool:
                resp = await stub.Swap(request, metadata=metadata, timeout=60)
                return len(resp.faces) == 1 and resp.faces[0].encoded.startswith(PNG_MAGIC)

            return call

        target = f"127.0.0.1:{port}"
        load = asyncio.run(load_over(target, call_on, args, lambda: marks.append(batches())))
        marks.append(batches())
    finally:
        server.stop()
    (s0, c0), (s1, c1) = marks
    fps, p50, p99 = _summary(load)
    name = "facemux" if processes == 1 else f"facemux, {processes} processes"
    note = "defaults: tokens auth (loopback, no TLS), audit log on, "
    note += _provenance_note(args.provenance)
    if processes > 1:
        note += f"; {processes} servers on one port, {threads} torch thread(s) each"
    if load.first_error:
        print(f"{name} {preset}: {load.errors} errors, first: {load.first_error}")
    return Row(
        preset,
        name,
        fps,
        p50,
        p99,
        load.errors,
        len(load.latencies),
        (s1 - s0) / max(c1 - c0, 1),
        bare,
        threads,
        note,
    )


def free_ports(n: int) -> int:
    """The first of `n` consecutive ports free on loopback now."""
    for _ in range(100):
        base = free_port()
        if base + n - 1 > 65535:
            continue
        try:
            with contextlib.ExitStack() as held:
                for p in range(base, base + n):
                    s = held.enter_context(socket.socket())
                    s.bind(("127.0.0.1", p))
            return base
        except OSError:
            continue
    raise RuntimeError(f"no {n} consecutive free ports on 127.0.0.1")


def wait_metrics(ports: list[int], timeout: float) -> None:
    """Until every port answers /metrics with a loaded model (facemux_model_info)."""
    deadline = time.monotonic() + timeout
    for port in ports:
        while True:
            try:
                url = f"http://127.0.0.1:{port}/metrics"
                if "facemux_model_info{" in urllib.request.urlopen(url, timeout=5).read().decode():
                    break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"no facemux /metrics with a model on port {port}")
            time.sleep(0.1)


def run_torchserve(
    preset: str, mars: Path, work: Path, face: bytes, args: argparse.Namespace, bare: float
) -> Row:
    ts = TorchServe(
        mars,
        work / "ts",
        {"facemux": "facemux.mar"},
        env={"OMP_NUM_THREADS": str(args.threads)},
    ).start()
    try:
        pb2, pb2_grpc = grpc_modules(work / "ts")
        request = pb2.PredictionsRequest(
            model_name="facemux", input={"data": face, "identity": IDENTITY.encode()}
        )
        marks: list[int] = []

        def call_on(channel: grpc.aio.Channel) -> Callable[[], Awaitable[bool]]:
            stub = pb2_grpc.InferenceAPIsServiceStub(channel)

            async def call() -> bool:
                # gRPC status OK even for a refused item: the body tells.
                resp = await stub.Predictions(request, timeout=60)
                return bool(resp.prediction.startswith(PNG_MAGIC))

            return call

        def at_start() -> None:
            marks.append(len(ts.batch_sizes()))

        load = asyncio.run(load_over(ts.grpc_target, call_on, args, at_start))
        # The frontend writes the worker's metric lines a moment later.
        time.sleep(1.0)
        sizes = ts.batch_sizes()[marks[0] :]
        threads = ts.worker_torch_threads()
    finally:
        ts.stop()
    fps, p50, p99 = _summary(load)
    if load.first_error:
        print(f"TorchServe {preset}: {load.errors} errors, first: {load.first_error}")
    return Row(
        preset,
        TORCHSERVE,
        fps,
        p50,
        p99,
        load.errors,
        len(load.latencies),
        statistics.fmean(sizes) if sizes else float("nan"),
        bare,
        threads,
        "facemux handler, 1 worker, TorchServe token authorization off; "
        + _provenance_note(args.provenance),
    )


def _provenance_note(mode: str) -> str:
    if mode == "on":
        return "provenance on (watermark + C2PA)"
    return "C2PA OFF (watermark only)"


def compare(preset: str, args: argparse.Namespace) -> list[Row]:
    size = get_preset(preset).resolution
    face = jpeg_face(64)
    with tempfile.TemporaryDirectory(prefix=f"facemux-bench-serving-{preset}-") as tmp:
        root = Path(tmp)
        store = make_store(root / "store", preset)
        # The signer `facemux serve` would generate for itself (Store.keys), shared with
        # the archive so both servers sign every answer.
        c2pa.generated_signer(store.keys)
        chain, key = store.keys.paths(c2pa.TEST_SIGNER)
        signed = args.provenance == "on"
        export_torchserve(
            store,
            [IDENTITY],
            root / "mars",
            batch_size=BATCH,
            max_batch_delay_ms=WAIT_MS,
            c2pa_cert=chain if signed else None,
            c2pa_key=key if signed else None,
        )
        torch.set_num_threads(args.threads)

        def bare() -> float:
            # Right before each server, so a shared machine's drift hits both alike.
            fps, _ms = measure(preset, torch.device("cpu"), BATCH, False, False, args.bare_seconds)
            print(f"{preset} ({size}x{size}): bare forward at batch {BATCH}: {fps:.1f} faces/s")
            return fps

        rows = [run_facemux(preset, root / "store", root, face, args, bare())]
        print(f"{preset}: facemux {rows[-1].faces_per_s:.1f} faces/s")
        if args.processes > 1:
            rows.append(
                run_facemux(preset, root / "store", root, face, args, bare(), args.processes)
            )
            print(f"{preset}: {rows[-1].server} {rows[-1].faces_per_s:.1f} faces/s")
        rows.append(run_torchserve(preset, root / "mars", root, face, args, bare()))
        print(f"{preset}: TorchServe {rows[-1].faces_per_s:.1f} faces/s")
    return rows


def table(rows: list[Row], args: argparse.Namespace) -> str:
    out = [
        f"{args.clients} closed-loop grpc.aio clients on {_connections(args.connections)}, "
        "one 64x64 JPEG face per "
        f"call, PNG back; batch {BATCH}, max wait {WAIT_MS} ms; {args.seconds:.0f} s after "
        f"{args.warmup:.0f} s warm-up; {args.threads} torch threads; {os.cpu_count()} cores",
        "",
        "| preset | server | faces/s | p50 ms | p99 ms | errors | mean batch | bare b8 faces/s "
        "| ratio to bare | torch threads | notes |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        out.append(
            f"| {r.preset} | {r.server} | {r.faces_per_s:.1f} | {r.p50_ms:.1f} | "
            f"{r.p99_ms:.1f} | {r.errors} | {r.mean_batch:.2f} | {r.bare_faces_per_s:.1f} | "
            f"{r.ratio_to_bare:.2f} | {r.torch_threads} | {r.note} |"
        )
    out += ["", "| preset | facemux / TorchServe faces/s | p99 facemux vs TorchServe |"]
    out.append("|---|---:|---|")
    for preset in dict.fromkeys(r.preset for r in rows):
        ts = next(r for r in rows if r.preset == preset and r.server == TORCHSERVE)
        for fm in (r for r in rows if r.preset == preset and r.server != TORCHSERVE):
            verdict = "lower" if fm.p99_ms < ts.p99_ms else "not lower"
            label = preset if fm.server == "facemux" else f"{preset} ({fm.server})"
            out.append(
                f"| {label} | {fm.faces_per_s / ts.faces_per_s:.2f}x | "
                f"{fm.p99_ms:.1f} vs {ts.p99_ms:.1f} ms ({verdict}) |"
            )
    return "\n".join(out)


def _connections(n: int) -> str:
    return "one channel" if n == 1 else f"{n} channels (a connection each)"


TORCHSERVE = "TorchServe 0.12"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--presets", default="tiny,original64")
    p.add_argument("--seconds", type=float, default=20.0, help="measured seconds per server")
    p.add_argument("--warmup", type=float, default=3.0, help="uncounted seconds before")
    p.add_argument("--bare-seconds", type=float, default=5.0)
    p.add_argument("--clients", type=int, default=8)
    p.add_argument(
        "--threads", type=int, default=os.cpu_count() or 1, help="torch threads, all three"
    )
    p.add_argument(
        "--provenance",
        choices=("on", "watermark-only"),
        default="on",
        help="both servers: watermark + C2PA (facemux's default) or the watermark alone",
    )
    p.add_argument(
        "--connections",
        type=int,
        default=1,
        help="spread the clients over this many channels, each its own connection (both servers)",
    )
    p.add_argument(
        "--processes",
        type=int,
        default=1,
        help="also serve with `facemux serve --processes N` (a row of its own; the kernel "
        "spreads connections, not calls, so give --connections of N or more)",
    )
    p.add_argument("--json", type=Path, help="also write the rows here")
    args = p.parse_args()
    if args.connections < 1 or args.processes < 1:
        p.error("--connections and --processes must be at least 1")
    reason = why_not_available()
    if reason:
        print(f"TorchServe cannot run here: {reason}", file=sys.stderr)
        return 2
    rows: list[Row] = []
    for preset in args.presets.split(","):
        rows += compare(preset.strip(), args)
    print()
    print(table(rows, args))
    if args.json:
        payload: list[dict[str, Any]] = [
            {**asdict(r), "ratio_to_bare": r.ratio_to_bare} for r in rows
        ]
        args.json.write_text(json.dumps(payload, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
