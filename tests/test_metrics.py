"""Metrics: the gRPC interceptor on every RPC shape, facemux's own series on a live server,
the GPU collector (with a stand-in NVML), promtool's lint, and a real Prometheus scraping
a real server."""

from __future__ import annotations

import asyncio
import json
import shutil
import socket
import subprocess
import time
import urllib.parse
import urllib.request
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import grpc
import pytest
from common import Models, face_image, make_store
from facemux.client import FacemuxClient, NotFound
from facemux.models.errors import InvalidInputError
from facemux.service.metrics import GPU_METRICS, OTHER_IDENTITY, GpuCollector, Metrics
from facemux.service.server import ServerThread
from facemux.service.settings import Settings
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

# -- helpers -------------------------------------------------------------------------------


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        return str(r.read().decode())


def sample_names(text: str) -> set[str]:
    return {s.name for fam in text_string_to_metric_families(text) for s in fam.samples}


def value(text: str, name: str, **labels: str) -> float:
    """Sum of the samples of `name` whose labels include `labels`."""
    total, found = 0.0, False
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                total += s.value
                found = True
    assert found, f"no sample {name}{labels}"
    return total


def promtool_check_metrics(text: str) -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool is not installed (Debian package prometheus; .ci/run installs it)")
    out = subprocess.run(
        [promtool, "check", "metrics"], input=text, capture_output=True, text=True, timeout=30
    )
    assert out.returncode == 0, out.stdout + out.stderr


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# -- the interceptor, on a bare aio server with every RPC shape ---------------------------

SERVICE = "test.Shapes"


def shape_handlers() -> grpc.GenericRpcHandler:
    async def unary_ok(req: bytes, ctx: grpc.aio.ServicerContext) -> bytes:
        return req

    async def unary_abort(req: bytes, ctx: grpc.aio.ServicerContext) -> bytes:
        await ctx.abort(grpc.StatusCode.INVALID_ARGUMENT, "bad")
        raise AssertionError("unreachable")

    async def unary_crash(req: bytes, ctx: grpc.aio.ServicerContext) -> bytes:
        raise ValueError("boom")

    async def unary_set_code(req: bytes, ctx: grpc.aio.ServicerContext) -> bytes:
        ctx.set_code(grpc.StatusCode.NOT_FOUND)
        ctx.set_details("none here")
        return b""

    async def unary_slow(req: bytes, ctx: grpc.aio.ServicerContext) -> bytes:
        await asyncio.sleep(5)
        return req

    async def unary_late(req: bytes, ctx: grpc.aio.ServicerContext) -> bytes:
        # Busy past the caller's deadline without yielding, so nothing can cancel it: it
        # returns an answer that nobody gets.
        time.sleep(0.4)
        return req

    async def stream_gen(req: bytes, ctx: grpc.aio.ServicerContext) -> AsyncIterator[bytes]:
        for i in range(3):
            yield bytes([i])

    async def stream_writes(req: bytes, ctx: grpc.aio.ServicerContext) -> None:
        await ctx.write(b"a")
        await ctx.write(b"b")

    async def stream_abort(req: bytes, ctx: grpc.aio.ServicerContext) -> AsyncIterator[bytes]:
        yield b"first"
        await ctx.abort(grpc.StatusCode.FAILED_PRECONDITION, "stop")

    async def stream_forever(req: bytes, ctx: grpc.aio.ServicerContext) -> AsyncIterator[bytes]:
        while True:
            yield b"tick"
            await asyncio.sleep(0.05)

    async def client_stream(reqs: AsyncIterator[bytes], ctx: grpc.aio.ServicerContext) -> bytes:
        n = 0
        async for _ in reqs:
            n += 1
        return bytes([n])

    async def bidi_gen(
        reqs: AsyncIterator[bytes], ctx: grpc.aio.ServicerContext
    ) -> AsyncIterator[bytes]:
        async for r in reqs:
            yield r

    async def bidi_rw(reqs: AsyncIterator[bytes], ctx: grpc.aio.ServicerContext) -> None:
        while True:
            msg = await ctx.read()
            if msg is grpc.aio.EOF:
                return
            await ctx.write(msg)

    uu, us = grpc.unary_unary_rpc_method_handler, grpc.unary_stream_rpc_method_handler
    return grpc.method_handlers_generic_handler(
        SERVICE,
        {
            "UnaryOk": uu(unary_ok),
            "UnaryAbort": uu(unary_abort),
            "UnaryCrash": uu(unary_crash),
            "UnarySetCode": uu(unary_set_code),
            "UnarySlow": uu(unary_slow),
            "UnaryLate": uu(unary_late),
            "StreamGen": us(stream_gen),
            "StreamWrites": us(stream_writes),
            "StreamAbort": us(stream_abort),
            "StreamForever": us(stream_forever),
            "ClientStream": grpc.stream_unary_rpc_method_handler(client_stream),
            "BidiGen": grpc.stream_stream_rpc_method_handler(bidi_gen),
            "BidiReadWrite": grpc.stream_stream_rpc_method_handler(bidi_rw),
        },
    )


async def _eventually(check: Callable[[], bool], timeout: float = 5.0) -> None:
    # The server records a cancelled call's end on its own schedule, after the client left.
    give_up = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < give_up, "condition not reached"
        await asyncio.sleep(0.02)


def test_interceptor_counts_every_rpc_shape_and_status() -> None:
    metrics = Metrics()
    reg = metrics.registry

    def get(name: str, method: str, **labels: str) -> float:
        want = {"grpc_service": SERVICE, "grpc_method": method, **labels}
        return sum(
            s.value
            for fam in reg.collect()
            for s in fam.samples
            if s.name == name and want.items() <= s.labels.items()
        )

    async def main() -> None:
        server = grpc.aio.server(interceptors=[metrics.interceptor()])
        server.add_generic_rpc_handlers((shape_handlers(),))
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:

                def m(name: str) -> str:
                    return f"/{SERVICE}/{name}"

                assert await ch.unary_unary(m("UnaryOk"))(b"x") == b"x"
                for name, code in (
                    ("UnaryAbort", grpc.StatusCode.INVALID_ARGUMENT),
                    ("UnaryCrash", grpc.StatusCode.UNKNOWN),
                    ("UnarySetCode", grpc.StatusCode.NOT_FOUND),
                ):
                    with pytest.raises(grpc.aio.AioRpcError) as err:
                        await ch.unary_unary(m(name))(b"x")
                    assert err.value.code() == code
                with pytest.raises(grpc.aio.AioRpcError) as err:
                    await ch.unary_unary(m("UnarySlow"))(b"x", timeout=0.2)
                assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
                with pytest.raises(grpc.aio.AioRpcError) as err:
                    await ch.unary_unary(m("UnaryLate"))(b"x", timeout=0.2)
                assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED

                assert [r async for r in ch.unary_stream(m("StreamGen"))(b"")] == [
                    b"\0",
                    b"\1",
                    b"\2",
                ]
                assert [r async for r in ch.unary_stream(m("StreamWrites"))(b"")] == [b"a", b"b"]
                call = ch.unary_stream(m("StreamAbort"))(b"")
                with pytest.raises(grpc.aio.AioRpcError) as err:
                    async for _ in call:
                        pass
                assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
                forever = ch.unary_stream(m("StreamForever"))(b"")
                await forever.read()
                forever.cancel()

                assert await ch.stream_unary(m("ClientStream"))(iter([b"1", b"2", b"3", b"4"])) == (
                    b"\4"
                )
                bidi = ch.stream_stream(m("BidiGen"))(iter([b"p", b"q"]))
                assert [r async for r in bidi] == [b"p", b"q"]
                rw = ch.stream_stream(m("BidiReadWrite"))(iter([b"r", b"s", b"t"]))
                assert [r async for r in rw] == [b"r", b"s", b"t"]

            # Both ends are recorded on the server's schedule, after the client left: the
            # slow call's once the server sees its deadline pass, or at the latest when its
            # handler wakes from its 5 s sleep (both seconds late on a busy machine), the
            # cancelled stream's once the cancellation reaches it.
            await _eventually(
                lambda: (
                    get("grpc_server_handled_total", "UnarySlow", grpc_code="DEADLINE_EXCEEDED")
                    == 1
                ),
                timeout=15.0,
            )
            await _eventually(
                lambda: (
                    get("grpc_server_handled_total", "StreamForever", grpc_code="CANCELLED") == 1
                )
            )
        finally:
            await server.stop(0)

    asyncio.run(main())

    handled = "grpc_server_handled_total"
    assert get(handled, "UnaryOk", grpc_type="unary", grpc_code="OK") == 1
    assert get(handled, "UnaryAbort", grpc_code="INVALID_ARGUMENT") == 1
    assert get(handled, "UnaryCrash", grpc_code="UNKNOWN") == 1
    assert get(handled, "UnarySetCode", grpc_code="NOT_FOUND") == 1
    assert get(handled, "UnarySlow", grpc_code="DEADLINE_EXCEEDED") == 1
    assert get(handled, "UnaryLate", grpc_code="DEADLINE_EXCEEDED") == 1
    assert get(handled, "StreamGen", grpc_type="server_stream", grpc_code="OK") == 1
    assert get(handled, "StreamAbort", grpc_code="FAILED_PRECONDITION") == 1
    assert get(handled, "ClientStream", grpc_type="client_stream", grpc_code="OK") == 1
    assert get(handled, "BidiGen", grpc_type="bidi_stream", grpc_code="OK") == 1
    assert get(handled, "BidiReadWrite", grpc_type="bidi_stream", grpc_code="OK") == 1
    for method in ("UnaryOk", "UnaryAbort", "StreamGen", "ClientStream", "BidiReadWrite"):
        assert get("grpc_server_started_total", method) == 1
        assert get("grpc_server_handling_seconds_count", method) == 1
    # Messages: unary 1 in / 1 out on success; streams count each message, whichever API
    # (async generator or context.read/write) the handler used.
    received, sent = "grpc_server_msg_received_total", "grpc_server_msg_sent_total"
    assert (get(received, "UnaryOk"), get(sent, "UnaryOk")) == (1, 1)
    assert (get(received, "UnaryAbort"), get(sent, "UnaryAbort")) == (1, 0)
    assert get(sent, "StreamGen") == 3
    assert get(sent, "StreamWrites") == 2
    assert get(sent, "StreamAbort") == 1
    assert (get(received, "ClientStream"), get(sent, "ClientStream")) == (4, 1)
    assert (get(received, "BidiGen"), get(sent, "BidiGen")) == (2, 2)
    assert (get(received, "BidiReadWrite"), get(sent, "BidiReadWrite")) == (3, 3)


def test_unknown_methods_pass_through(tmp_path: Path) -> None:
    metrics = Metrics()

    async def main() -> None:
        server = grpc.aio.server(interceptors=[metrics.interceptor()])
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
                with pytest.raises(grpc.aio.AioRpcError) as err:
                    await ch.unary_unary("/no.Such/Method")(b"")
                assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED
        finally:
            await server.stop(0)

    asyncio.run(main())
    assert "no.Such" not in generate_latest(metrics.registry).decode()


# -- facemux's own series on a live server --------------------------------------------------


@pytest.fixture
def live(tmp_path: Path, models: Models) -> Iterator[tuple[ServerThread, FacemuxClient]]:
    make_store(tmp_path / "store", models, ("alice", "bob"))
    settings = Settings(
        port=0, auth="off", metrics_port=0, store=tmp_path / "store", max_batch_wait_ms=0
    )
    with ServerThread(settings) as srv, FacemuxClient(srv.target, timeout=30, retries=1) as c:
        c.wait_ready(30)
        yield srv, c


def test_live_server_metrics(live: tuple[ServerThread, FacemuxClient]) -> None:
    srv, c = live
    assert srv.app is not None and srv.app.metrics_port
    assert c.swap_faces([face_image(0), face_image(1)], "alice").faces_swapped == 2
    assert c.swap_faces([face_image(2)], "bob").faces_swapped == 1
    with pytest.raises(NotFound):
        c.swap_faces([face_image(0)], "nobody")
    frames = list(c.swap_stream([face_image(i) for i in range(3)], "alice", aligned=True))
    assert len(frames) == 3
    latents = c.encode([face_image(3)])
    assert len(c.decode(latents, "bob").faces) == 1
    assert c.health("liveness") == "SERVING"
    # Health's Watch (a coroutine writing with context.write) and reflection (a bidi
    # async generator) still work through the interceptor, and are counted.
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    with grpc.insecure_channel(srv.target) as ch:
        watch = health_pb2_grpc.HealthStub(ch).Watch(health_pb2.HealthCheckRequest())
        assert next(watch).status == health_pb2.HealthCheckResponse.SERVING
        watch.cancel()
        req = reflection_pb2.ServerReflectionRequest(list_services="")
        info = reflection_pb2_grpc.ServerReflectionStub(ch).ServerReflectionInfo(iter([req]))
        assert next(info).list_services_response.service

    text = scrape(srv.app.metrics_port)
    watch_labels = {"grpc_service": "grpc.health.v1.Health", "grpc_method": "Watch"}
    assert value(text, "grpc_server_msg_sent_total", **watch_labels) >= 1
    reflection = {"grpc_service": "grpc.reflection.v1alpha.ServerReflection"}
    assert value(text, "grpc_server_msg_received_total", **reflection) == 1
    assert value(text, "grpc_server_msg_sent_total", **reflection) == 1
    swap = {"grpc_service": "facemux.v1.SwapService", "grpc_method": "Swap"}
    assert value(text, "grpc_server_handled_total", grpc_code="OK", **swap) == 2
    assert value(text, "grpc_server_handled_total", grpc_code="NOT_FOUND", **swap) == 1
    assert value(text, "grpc_server_handling_seconds_count", grpc_type="unary", **swap) == 3
    stream = {"grpc_method": "SwapStream", "grpc_type": "bidi_stream"}
    assert value(text, "grpc_server_msg_received_total", **stream) == 3
    assert value(text, "grpc_server_msg_sent_total", **stream) == 3
    assert value(text, "facemux_faces_swapped_total", identity="alice") == 2 + 3
    assert value(text, "facemux_faces_swapped_total", identity="bob") == 1 + 1  # Swap + Decode
    assert value(text, "facemux_frames_swapped_total") == 3
    assert value(text, "facemux_batch_size_count") >= 5
    assert value(text, "facemux_stage_seconds_count", stage="preprocess") == 2 + 3
    assert value(text, "facemux_stage_seconds_count", stage="model_batch") >= 5
    assert value(text, "facemux_serving") == 1
    assert value(text, "facemux_identities") == 2
    assert value(text, "facemux_resident_decoders") == 2
    assert value(text, "facemux_resident_decoder_bytes") > 0
    assert value(text, "facemux_queue_depth") == 0
    assert value(text, "facemux_model_load_seconds") > 0
    assert value(text, "facemux_model_info", preset="tiny", device="cpu") == 1
    assert value(text, "facemux_batch_threads") >= 1
    assert value(text, "facemux_build_info") == 1
    assert value(text, "facemux_training_jobs", state="running") == 0
    # Zero series exist before the first call, so rate() reads 0 rather than no data.
    assert value(text, "grpc_server_started_total", grpc_method="RegisterIdentity") == 0
    # No GPU on this host: the GPU series are absent, not zero.
    if GpuCollector.create() is None:
        assert not any(n.startswith("facemux_gpu_") for n in sample_names(text))
    promtool_check_metrics(text)


def test_servers_in_one_process_keep_their_own_registries(
    live: tuple[ServerThread, FacemuxClient], tmp_path: Path, models: Models
) -> None:
    srv, c = live
    make_store(tmp_path / "other", models, ("carol",))
    with ServerThread(Settings(port=0, auth="off", store=tmp_path / "other")) as other:
        assert other.app is not None and srv.app is not None
        # Left at its default, an embedded server's metrics port becomes a free one.
        assert other.app.metrics_port not in (None, 9090, srv.app.metrics_port)
        c.swap_faces([face_image(0)], "alice")
        assert "carol" not in scrape(srv.app.metrics_port)
        assert value(scrape(other.app.metrics_port), "facemux_identities") == 1
        assert 'identity="alice"' not in scrape(other.app.metrics_port)


def test_metrics_port_setting(tmp_path: Path, models: Models) -> None:
    make_store(tmp_path / "store", models)
    with ServerThread(
        Settings(port=0, auth="off", metrics_port=-1, store=tmp_path / "store")
    ) as srv:
        assert srv.app is not None and srv.app.metrics_port is None
    with pytest.raises(InvalidInputError, match="metrics_port"):
        Settings(metrics_port=-2)
    assert Settings.load(environ={"FACEMUX_METRICS_PORT": "9191"}).metrics_port == 9191
    # A metrics port in use fails the start, as a gRPC port in use does.
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        taken = busy.getsockname()[1]
        with pytest.raises(OSError):
            ServerThread(
                Settings(port=0, auth="off", metrics_port=taken, store=tmp_path / "store")
            ).start()


def test_identity_label_is_bounded() -> None:
    m = Metrics(max_identities=2)
    for name in ("a", "b", "c", "d", "a"):
        m.faces_swapped(name, 1)
    reg = m.registry
    assert reg.get_sample_value("facemux_faces_swapped_total", {"identity": "a"}) == 2
    assert reg.get_sample_value("facemux_faces_swapped_total", {"identity": "b"}) == 1
    assert reg.get_sample_value("facemux_faces_swapped_total", {"identity": OTHER_IDENTITY}) == 2
    assert reg.get_sample_value("facemux_faces_swapped_total", {"identity": "c"}) is None


def test_training_gauges() -> None:
    m = Metrics()
    reg = m.registry
    m.set_training_jobs({"running": 2, "queued": 1})
    assert reg.get_sample_value("facemux_training_jobs", {"state": "running"}) == 2
    assert reg.get_sample_value("facemux_training_jobs", {"state": "failed"}) == 0
    m.training_progress("j1", 100.0, 0.5)
    m.training_progress("j2", 50.0, 0.3)
    assert reg.get_sample_value("facemux_training_examples_per_second") == 150
    assert reg.get_sample_value("facemux_training_loss") == pytest.approx(0.4)
    m.training_finished("j1")
    m.training_finished("j2")
    assert reg.get_sample_value("facemux_training_examples_per_second") == 0


# -- GPU collector --------------------------------------------------------------------------


class FakeNvml:
    """Just the NVML calls the collector makes; device 1 cannot report power."""

    class NVMLError(Exception):
        pass

    def __init__(self, count: int = 2, fail_init: bool = False) -> None:
        self.count = count
        self.fail_init = fail_init
        self.shut = False

    def nvmlInit(self) -> None:
        if self.fail_init:
            raise self.NVMLError("NVML Shared Library Not Found")

    def nvmlShutdown(self) -> None:
        self.shut = True

    def nvmlDeviceGetCount(self) -> int:
        return self.count

    def nvmlDeviceGetHandleByIndex(self, i: int) -> int:
        return i

    def nvmlDeviceGetUUID(self, h: int) -> str:
        return f"GPU-{h:04d}"

    def nvmlDeviceGetName(self, h: int) -> bytes:
        return b"NVIDIA H100 80GB HBM3"

    def nvmlDeviceGetUtilizationRates(self, h: int) -> Any:
        return SimpleNamespace(gpu=37, memory=10)

    def nvmlDeviceGetMemoryInfo(self, h: int) -> Any:
        return SimpleNamespace(used=(h + 1) * 2**30, total=80 * 2**30, free=0)

    def nvmlDeviceGetPowerUsage(self, h: int) -> int:
        if h == 1:
            raise self.NVMLError("Not Supported")
        return 312_500  # milliwatts


def test_gpu_collector_with_nvml() -> None:
    nvml = FakeNvml()
    collector = GpuCollector.create(nvml)
    assert collector is not None
    m = Metrics()
    m.registry.register(collector)
    text = generate_latest(m.registry).decode()
    gpu0 = {"gpu": "0", "uuid": "GPU-0000", "model": "NVIDIA H100 80GB HBM3"}
    assert value(text, "facemux_gpu_utilization_ratio", **gpu0) == pytest.approx(0.37)
    assert value(text, "facemux_gpu_memory_used_bytes", gpu="1") == 2 * 2**30
    assert value(text, "facemux_gpu_memory_total_bytes", gpu="0") == 80 * 2**30
    assert value(text, "facemux_gpu_power_watts", gpu="0") == pytest.approx(312.5)
    with pytest.raises(AssertionError):
        value(text, "facemux_gpu_power_watts", gpu="1")  # not supported there: left out
    assert set(GPU_METRICS) <= sample_names(text)
    promtool_check_metrics(text)
    collector.close()
    assert nvml.shut


def test_gpu_metrics_absent_without_a_gpu() -> None:
    assert GpuCollector.create(FakeNvml(fail_init=True)) is None
    assert GpuCollector.create(FakeNvml(count=0)) is None
    m = Metrics()
    m.attach(gpu=True)  # the real NVML: on a host without a GPU nvmlInit raises, quietly
    names = sample_names(generate_latest(m.registry).decode())
    if m.gpu is None:
        assert not names & set(GPU_METRICS)
    m.close()


# -- a real Prometheus scraping a real server ---------------------------------------------


def _prom_query(port: int, query: str) -> list[dict[str, Any]]:
    url = f"http://127.0.0.1:{port}/api/v1/query?" + urllib.parse.urlencode({"query": query})
    with urllib.request.urlopen(url, timeout=5) as r:
        body = json.loads(r.read())
    assert body["status"] == "success", body
    return list(body["data"]["result"])


def _wait_for(
    check: Callable[[], bool], timeout: float, what: str, proc: subprocess.Popen[Any], log: Path
) -> None:
    give_up = time.monotonic() + timeout
    while True:
        try:
            if check():
                return
        except OSError:
            pass  # not listening yet
        if proc.poll() is not None or time.monotonic() > give_up:
            tail = log.read_text()[-3000:]
            raise AssertionError(f"timed out waiting for {what}; Prometheus said:\n{tail}")
        time.sleep(0.25)


@pytest.mark.timeout(120)
def test_prometheus_scrapes_the_server(
    live: tuple[ServerThread, FacemuxClient], tmp_path: Path
) -> None:
    prometheus = shutil.which("prometheus")
    if prometheus is None:
        pytest.skip("prometheus is not installed (Debian package prometheus; .ci/run installs it)")
    srv, c = live
    assert srv.app is not None
    port = free_port()
    config = tmp_path / "prometheus.yml"
    config.write_text(
        "global:\n  scrape_interval: 200ms\n  scrape_timeout: 200ms\n"
        "scrape_configs:\n  - job_name: facemux\n    static_configs:\n"
        f"      - targets: ['127.0.0.1:{srv.app.metrics_port}']\n"
    )
    log_path = tmp_path / "prometheus.log"
    log = log_path.open("w")
    proc = subprocess.Popen(
        [
            prometheus,
            f"--config.file={config}",
            f"--storage.tsdb.path={tmp_path / 'tsdb'}",
            f"--web.listen-address=127.0.0.1:{port}",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        cwd=tmp_path,
    )
    try:

        def scraped() -> bool:
            up = _prom_query(port, 'up{job="facemux"}')
            return bool(up) and up[0]["value"][1] == "1"

        _wait_for(scraped, 30, "Prometheus to scrape facemux", proc, log_path)
        # Swaps on both sides of a scrape, so the counter has two different samples.
        c.swap_faces([face_image(0), face_image(1)], "alice")
        time.sleep(0.5)  # at least two scrapes apart
        c.swap_faces([face_image(2)], "alice")
        query = 'sum(increase(facemux_faces_swapped_total{job="facemux"}[30s]))'

        def increased() -> bool:
            result = _prom_query(port, query)
            return bool(result) and float(result[0]["value"][1]) > 0

        _wait_for(increased, 30, f"a non-zero {query}", proc, log_path)
        rate = _prom_query(port, 'sum(rate(grpc_server_handled_total{grpc_method="Swap"}[30s]))')
        assert rate and float(rate[0]["value"][1]) > 0
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


def test_interceptor_wraps_a_method_once_while_its_handler_stays_the_same() -> None:
    # A call reuses the wrapper made for its method's first call (no closures, handler
    # objects or metric series looked up per call); a method re-registered with another
    # handler is wrapped again.
    async def echo(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        return request

    first = grpc.unary_unary_rpc_method_handler(echo)
    second = grpc.unary_unary_rpc_method_handler(echo)
    interceptor = Metrics().interceptor()

    async def main() -> None:
        def details(method: str) -> Any:
            return SimpleNamespace(method=method, invocation_metadata=())

        async def resolve(handler: grpc.RpcMethodHandler) -> Any:
            async def continuation(_: Any) -> grpc.RpcMethodHandler:
                return handler

            return await interceptor.intercept_service(continuation, details("/a.S/M"))

        a, b = await resolve(first), await resolve(first)
        assert a is b and a is not first
        c = await resolve(second)
        assert c is not a and await resolve(second) is c

    asyncio.run(main())
