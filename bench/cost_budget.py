"""Where a served face's CPU time goes, and what that allows on this machine.

    python bench/cost_budget.py --preset tiny --clients 8 --seconds 8
    python bench/cost_budget.py --profile swap.txt     # also py-spy the default server

Two kinds of figures, in CPU-milliseconds per face (process CPU time, all threads, over the
faces done), measured in one run:

- parts, timed in this process one at a time: the bare model at batch 8 with 1 and with 2
  torch threads; decoding the 64x64 JPEG crop; encoding the PNG answer; the watermark over a
  batch of 8; the signed C2PA manifest; parsing the request and serializing the answer;
- whole calls under load: a raw-bytes grpc.aio echo server and `facemux serve` (defaults:
  bearer tokens, audit log, provenance on; and once with provenance off), driven by
  `--clients` closed-loop grpc.aio coroutines of this process on one channel sending the
  same serialized single-face request. The server's CPU comes from /proc (utime + stime of
  all its threads), the load generator's from this process's rusage, both over the same
  window.

"the rest" is the server's CPU per face minus the parts it is known to spend (model, JPEG
decode, PNG encode, watermark, C2PA, and what the echo server spends per call: gRPC's own
work). The ceiling: cores x 1000 CPU-ms/s over the CPU a face costs server and client
together, i.e. what this machine could answer with the load generator on it, if nothing
but these calls ran and every core were busy.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import numpy as np
import torch
from facemux.models import imageio, inference
from facemux.models import watermark as wm
from facemux.models.config import get_preset
from facemux.models.networks import build_decoder, build_encoder
from facemux.models.pixels import images_to_unit
from facemux.service import c2pa
from facemux.service.auth import make_entry
from facemux.service.store import LocalKeyStore
from facemux.v1 import swap_service_pb2 as spb
from facemux.v1 import types_pb2

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from serve_process import ServeProcess, free_port
from serving_path import ECHO, SWAP, request_bytes
from swap_throughput import _source_path, make_store

BATCH = 8
TICK = os.sysconf("SC_CLK_TCK")
JPEG_DECODE = "JPEG decode (64x64 crop, header checks)"
PNG_ENCODE = "PNG encode (level 1)"
WATERMARK = f"watermark, batch of {BATCH}"
C2PA = "C2PA manifest, signed (ES256)"


def cpu_ms(fn: Callable[[], object], seconds: float, per_call: int = 1) -> tuple[float, float]:
    """(CPU-ms per item, wall-ms per item) of `fn`, which handles `per_call` items, run
    repeatedly for about `seconds` (at least 5 times) after one warm-up call."""
    fn()
    calls = 0
    c0, t0 = time.process_time(), time.perf_counter()
    while calls < 5 or time.perf_counter() - t0 < seconds:
        fn()
        calls += 1
    cpu, wall = time.process_time() - c0, time.perf_counter() - t0
    return 1000 * cpu / (calls * per_call), 1000 * wall / (calls * per_call)


def proc_cpu_s(pid: int) -> float:
    """utime + stime of every thread of process `pid`, seconds."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK


def py_spy() -> str | None:
    spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    return spy if Path(spy).exists() else None


def python_threads(pid: int) -> dict[int, str]:
    """Native thread id -> Python thread name, from py-spy when it is installed (the OS
    names them all "python"); empty without it."""
    spy = py_spy()
    if spy is None:
        return {}
    try:
        text = subprocess.run(
            [spy, "dump", "-p", str(pid), "--json"], capture_output=True, timeout=30, check=True
        ).stdout
        dump = json.loads(text)
    except (subprocess.SubprocessError, ValueError):
        return {}
    return {int(t["os_thread_id"]): str(t["thread_name"]) for t in dump if t.get("os_thread_id")}


def thread_cpu_s(pid: int, names: dict[int, str]) -> dict[str, float]:
    """CPU seconds of process `pid` by thread: its Python name, else "other" (gRPC's own
    threads, torch's intra-op threads); to_thread workers (asyncio_0, asyncio_1, ...) are
    summed as asyncio_*."""
    out: dict[str, float] = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:  # the thread ended meanwhile
            continue
        name = names.get(int(task.name), "other")
        name = "asyncio_*" if name.startswith("asyncio_") else name
        out[name] = out.get(name, 0.0) + (int(fields[11]) + int(fields[12])) / TICK
    return out


def self_cpu_s() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


# -- parts -------------------------------------------------------------------------------------


@dataclass
class Part:
    name: str
    cpu_ms: float  # per face
    wall_ms: float  # per face
    note: str = ""


def parts(preset: str, seconds: float, keys: Path) -> tuple[list[Part], dict[int, Part]]:
    cfg = get_preset(preset)
    res = cfg.resolution
    enc = build_encoder(cfg, seed=0).eval()
    dec = build_decoder(cfg, seed=1).eval()
    x8 = torch.from_numpy(
        np.random.default_rng(0).integers(0, 256, (BATCH, res, res, 3), dtype=np.uint8)
    )

    # The layout the server picks for this model on this CPU (Runtime.load).
    layout, _ = inference.faster_layout(enc, dec, res, BATCH)

    def model() -> np.ndarray:
        x = images_to_unit(x8).contiguous(memory_format=inference.LAYOUTS[layout])
        rgb, _ = inference.decode(dec, inference.encode(enc, x))
        return inference.tensor_to_images(rgb.float())

    before = torch.get_num_threads()
    models: dict[int, Part] = {}
    for threads in (1, 2):
        torch.set_num_threads(threads)
        c, w = cpu_ms(model, seconds, BATCH)
        models[threads] = Part(
            f"bare {preset} model, batch {BATCH}, {threads} torch thread(s)",
            c,
            w,
            f"{1000 / w:.0f} faces/s alone",
        )
    torch.set_num_threads(before)

    faces = model()  # what the model draws: the PNG encoder's real input
    jpeg = spb.SwapRequest.FromString(request_bytes(res)).faces.faces[0].encoded
    payloads = [wm.payload_for(f"{i:032x}") for i in range(BATCH)]
    marked = wm.embed_watermark_batch(faces, payloads)
    png = imageio.encode_image(marked[0], "PNG")
    signer = c2pa.C2paSigner(c2pa.generated_signer(LocalKeyStore(keys)))
    signed = signer.sign(png, "PNG", c2pa.TRAINED, "facemux-x.png", "x" * 32, "0")
    request = request_bytes(res)
    response = spb.SwapResponse(
        identity="bench",
        faces=[types_pb2.Image(encoded=signed)],
        results=[spb.FaceResult(index=0, confidence=1.0, swapped=True)],
        request_id="x" * 32,
    )
    out: list[Part] = []

    def add(name: str, fn: Callable[[], object], per_call: int = 1, note: str = "") -> None:
        out.append(Part(name, *cpu_ms(fn, seconds / 4, per_call), note))

    add(JPEG_DECODE, lambda: imageio.decode_image(jpeg, 1 << 24))
    add(
        PNG_ENCODE,
        lambda: imageio.encode_image(marked[0], "PNG"),
        note=f"{len(png)} bytes",
    )
    add(
        WATERMARK,
        lambda: wm.embed_watermark_batch(faces, payloads),
        BATCH,
    )
    add("watermark, one face alone", lambda: wm.embed_watermark(faces[0], payloads[0]))
    add(
        C2PA,
        lambda: signer.sign(png, "PNG", c2pa.TRAINED, "facemux-x.png", "x" * 32, "0"),
        note=f"+{len(signed) - len(png)} bytes",
    )
    add(
        "request parse + response serialize (protobuf)",
        lambda: (spb.SwapRequest.FromString(request), response.SerializeToString()),
    )
    return out, models


# -- whole calls under load ------------------------------------------------------------------


@dataclass
class Served:
    name: str
    calls_per_s: float
    server_ms: float  # server CPU-ms per call
    client_ms: float  # load generator CPU-ms per call
    p50_ms: float
    p99_ms: float
    threads: dict[str, float] = field(default_factory=dict)  # server CPU-ms/call by thread

    @property
    def total_ms(self) -> float:
        return self.server_ms + self.client_ms


async def _load(
    target: str,
    method: str,
    payload: bytes,
    clients: int,
    seconds: float,
    metadata: tuple[tuple[str, str], ...],
    server_pid: int,
) -> tuple[int, float, float, float, list[float], dict[str, float]]:
    async with grpc.aio.insecure_channel(target) as channel:
        call = channel.unary_unary(method)  # bytes in, bytes out
        for _ in range(20):  # connection, decoder load, learned round trip
            await call(payload, timeout=120, metadata=metadata)
        latencies: list[float] = []
        stop_at = time.perf_counter() + seconds

        async def client() -> None:
            while time.perf_counter() < stop_at:
                t0 = time.perf_counter()
                await call(payload, timeout=60, metadata=metadata)
                latencies.append(time.perf_counter() - t0)

        names = python_threads(server_pid)
        th0 = thread_cpu_s(server_pid, names)
        s0, c0, t0 = proc_cpu_s(server_pid), self_cpu_s(), time.perf_counter()
        await asyncio.gather(*(client() for _ in range(clients)))
        wall = time.perf_counter() - t0
        server, client_s = proc_cpu_s(server_pid) - s0, self_cpu_s() - c0
        th1 = thread_cpu_s(server_pid, names)
        threads = {k: v - th0.get(k, 0.0) for k, v in th1.items()}
        return len(latencies), wall, server, client_s, latencies, threads


def drive(
    name: str,
    target: str,
    method: str,
    payload: bytes,
    args: argparse.Namespace,
    server_pid: int,
    metadata: tuple[tuple[str, str], ...] = (),
) -> Served:
    deadline = time.monotonic() + 60
    while True:
        try:
            n, wall, server, client, lat, threads = asyncio.run(
                _load(target, method, payload, args.clients, args.seconds, metadata, server_pid)
            )
            break
        except grpc.aio.AioRpcError:  # still starting
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)
    return Served(
        name,
        n / wall,
        1000 * server / n,
        1000 * client / n,
        1000 * statistics.median(lat),
        1000 * float(np.percentile(lat, 99)),
        {k: 1000 * v / n for k, v in threads.items() if v > 0},
    )


@contextlib.contextmanager
def profiling(pid: int, out: str, seconds: float) -> Iterator[None]:
    """py-spy (when installed) sampling `pid` for `seconds`, folded stacks to `out`."""
    spy = py_spy()
    if not out or spy is None:
        yield
        return
    cmd = [spy, "record", "-p", str(pid), "-d", str(int(seconds)), "-r", "200"]
    cmd += ["--threads", "--nonblocking", "-f", "raw", "-o", out]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        yield
    finally:
        proc.wait(seconds + 30)


@dataclass
class Target:
    key: str
    name: str
    target: str
    method: str
    pid: int
    metadata: tuple[tuple[str, str], ...] = ()


class Servers:
    """The echo server and the facemux servers, all started once and kept up while the
    rounds alternate between them (so a shared machine's load falls on every row alike)."""

    def __init__(self, store: Path, work: Path, args: argparse.Namespace) -> None:
        self.procs: list[ServeProcess] = []
        self.targets: list[Target] = []
        port = free_port()
        script = str(Path(__file__).with_name("serving_path.py"))
        self.echo = subprocess.Popen([sys.executable, script, "--echo-server", str(port)])
        self.targets.append(
            Target(
                "echo", "raw-bytes grpc.aio echo server", f"127.0.0.1:{port}", ECHO, self.echo.pid
            )
        )
        entry, token = make_entry("bench", ["swap"])
        tokens = work / "callers.jsonl"
        tokens.write_text(json.dumps(entry) + "\n")
        metadata = (("authorization", f"Bearer {token}"),)
        rows: list[tuple[str, str, list[str], Path | None]] = [
            ("on", "Swap, defaults (tokens, audit log, provenance on)", [], None),
            ("off", "Swap, provenance OFF (else defaults)", ["--provenance", "off"], None),
        ]
        if args.baseline_src:
            base = Path(args.baseline_src)
            rows.insert(0, ("base-on", f"baseline {base.name}: Swap, defaults", [], base))
            rows.insert(
                1,
                (
                    "base-off",
                    f"baseline {base.name}: provenance OFF",
                    ["--provenance", "off"],
                    base,
                ),
            )
        for spec in args.also:
            label, _, extra = spec.partition(":")
            rows.append((label, f"Swap, defaults + {extra.strip()}", extra.split(), None))
        for key, name, extra, src in rows:
            env = {"FACEMUX_LOG_LEVEL": "WARNING"}
            port = free_port()
            if src is not None:
                env["PYTHONPATH"] = _source_path(src, work / f"src-{port}")
            server = ServeProcess(
                store,
                *("--auth-tokens-file", str(tokens)),
                *("--max-batch-size", str(args.batch)),
                *("--max-batch-wait-ms", str(args.max_wait_ms)),
                *(("--torch-threads", str(args.threads)) if args.threads else ()),
                *extra,
                port=port,
                # The audit trail goes to stdout by default: written, as a user's would
                # be, then dropped (with a log file the helper drops the child's stdout).
                log=work / f"{key}.log",
                env=env,
            ).start()
            self.procs.append(server)
            self.targets.append(Target(key, name, server.target, SWAP, server.pid, metadata))
        for server in self.procs:
            server.wait_ready(180)

    def close(self) -> None:
        for server in self.procs:
            server.stop()
        self.echo.terminate()
        self.echo.wait(30)


def served(
    store: Path, work: Path, payload: bytes, args: argparse.Namespace
) -> tuple[dict[str, Served], dict[str, list[Served]]]:
    """Each row's median round (by calls/s), and every round."""
    servers = Servers(store, work, args)
    rounds: dict[str, list[Served]] = {t.key: [] for t in servers.targets}
    try:
        for r in range(args.rounds):
            for t in servers.targets:
                spy = args.profile if t.key == "on" and r == args.rounds - 1 else ""
                with profiling(t.pid, spy, args.seconds + 2):
                    rounds[t.key].append(
                        drive(t.name, t.target, t.method, payload, args, t.pid, t.metadata)
                    )
    finally:
        servers.close()
    median = {k: sorted(v, key=lambda s: s.calls_per_s)[len(v) // 2] for k, v in rounds.items()}
    return median, rounds


def ratio(rounds: dict[str, list[Served]], a: str, b: str) -> float:
    """Median over rounds of a's calls/s over b's in the same round."""
    return statistics.median(
        x.calls_per_s / y.calls_per_s for x, y in zip(rounds[a], rounds[b], strict=True)
    )


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="tiny")
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--batch", type=int, default=BATCH, help="the server's max batch size")
    p.add_argument("--max-wait-ms", type=float, default=10.0)
    p.add_argument("--threads", type=int, default=0, help="server torch threads; 0 = default")
    p.add_argument("--seconds", type=float, default=8.0, help="per measurement")
    p.add_argument("--cores", type=int, default=os.cpu_count() or 1)
    p.add_argument(
        "--torchserve",
        type=float,
        default=0.0,
        help="TorchServe's faces/s on this machine (bench/serving_compare.py), for the 2x row",
    )
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument(
        "--baseline-src", default="", help="also serve from this source checkout (before/after)"
    )
    p.add_argument(
        "--also",
        action="append",
        default=[],
        metavar="LABEL:ARGS",
        help='one more server row with these serve arguments, e.g. "t1:--torch-threads 1"',
    )
    p.add_argument("--profile", default="", help="py-spy folded stacks of the default server")
    p.add_argument("--json", default="")
    args = p.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        store = work / "store"
        make_store(store, args.preset)
        payload = request_bytes(get_preset(args.preset).resolution)
        rows, rounds = served(store, work, payload, args)
        part_rows, models = parts(args.preset, args.seconds, work / "keys")

    echo, on, off = rows["echo"], rows["on"], rows["off"]
    part = {r.name: r for r in part_rows}
    # The least CPU the model needs for a face: one thread (more threads only add the cost
    # of sharing the work, which the rest below then includes).
    model = min(models.values(), key=lambda m: m.cpu_ms)
    known = {
        "model (bare, batch 8, fewest CPU-ms)": model.cpu_ms,
        "JPEG decode": part[JPEG_DECODE].cpu_ms,
        "PNG encode": part[PNG_ENCODE].cpu_ms,
        "watermark (batch 8)": part[WATERMARK].cpu_ms,
        "C2PA manifest": part[C2PA].cpu_ms,
        "gRPC call, server side (echo server)": echo.server_ms,
    }
    rest = on.server_ms - sum(known.values())

    print(
        f"\n{args.preset}, {args.clients} closed-loop clients on one channel, one 64x64 JPEG "
        f"per call, PNG back; server batch {args.batch}, wait {args.max_wait_ms:g} ms, torch "
        f"threads {args.threads or 'default'}; {args.cores} cores; {args.rounds} rounds of "
        f"{args.seconds:g} s per row (median round shown)\n"
    )
    print("| part | CPU-ms per face | wall-ms per face | note |")
    print("|---|---:|---:|---|")
    for r in (*models.values(), *part_rows):
        print(f"| {r.name} | {r.cpu_ms:.3f} | {r.wall_ms:.3f} | {r.note} |")
    print()
    print("| served | calls/s | server CPU-ms/call | client CPU-ms/call | p50 ms | p99 ms |")
    print("|---|---:|---:|---:|---:|---:|")
    for s in rows.values():
        print(
            f"| {s.name} | {s.calls_per_s:.1f} | {s.server_ms:.3f} | {s.client_ms:.3f} | "
            f"{s.p50_ms:.1f} | {s.p99_ms:.1f} |"
        )
    print()
    print("| per face, Swap with defaults | CPU-ms | share |")
    print("|---|---:|---:|")
    for k, v in known.items():
        print(f"| {k} | {v:.3f} | {v / on.total_ms:.0%} |")
    print(
        f"| the rest of the server (handler, auth, audit, scheduler, ...) | {rest:.3f} | "
        f"{rest / on.total_ms:.0%} |"
    )
    print(f"| load generator (client) | {on.client_ms:.3f} | {on.client_ms / on.total_ms:.0%} |")
    print(f"| **total** | **{on.total_ms:.3f}** | |")

    budget = args.cores * 1000.0
    floor = model.cpu_ms + echo.total_ms  # model + a bare call, nothing else
    print()
    print(f"Ceilings on {args.cores} cores ({budget:.0f} CPU-ms/s), load generator included:")
    print(f"- echo: {budget / echo.total_ms:.0f} calls/s ({echo.total_ms:.3f} CPU-ms a call)")
    print(f"- Swap as measured: {budget / on.total_ms:.0f} faces/s ({on.total_ms:.3f} CPU-ms)")
    print(
        f"- Swap if everything but the bare model and a bare gRPC call were free: "
        f"{budget / floor:.0f} faces/s ({floor:.3f} CPU-ms)"
    )
    best = echo.total_ms / floor
    print(
        f"- Swap / echo at best = echo CPU / (model + echo CPU) = {echo.total_ms:.3f} / "
        f"{floor:.3f} = {best:.2f} (target 0.5: "
        f"{'reachable' if best >= 0.5 else 'unreachable'} on this machine)"
    )
    if args.torchserve:
        need = budget / (2 * args.torchserve)
        print(
            f"- 2x TorchServe = {2 * args.torchserve:.0f} faces/s needs <= {need:.3f} CPU-ms a "
            f"face all told (now {on.total_ms:.3f}; model + bare call {floor:.3f}): "
            f"{'reachable' if floor <= need else 'unreachable'} by this arithmetic"
        )
    print()
    print("Same-run ratios (median over rounds of each round's ratio):")
    print(
        f"- provenance on / off: {ratio(rounds, 'on', 'off'):.2f} (target >= 0.85); CPU-ms a "
        f"face {on.total_ms:.3f} vs {off.total_ms:.3f}"
    )
    print(f"- Swap (defaults) / echo: {ratio(rounds, 'on', 'echo'):.3f} (target >= 0.5)")
    if "base-on" in rows:
        print(
            f"- this checkout / baseline, defaults: {ratio(rounds, 'on', 'base-on'):.2f}; "
            f"provenance off: {ratio(rounds, 'off', 'base-off'):.2f}; baseline provenance "
            f"on / off: {ratio(rounds, 'base-on', 'base-off'):.2f}"
        )
    for key in rows:
        if key not in ("echo", "on", "off", "base-on", "base-off"):
            print(f"- {rows[key].name} / defaults: {ratio(rounds, key, 'on'):.2f}")
    if args.json:
        Path(args.json).write_text(
            json.dumps(
                {
                    "parts": [vars(r) for r in (*models.values(), *part_rows)],
                    "served": {k: [vars(r) for r in v] for k, v in rounds.items()},
                    "rest_ms": rest,
                },
                indent=1,
            )
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
