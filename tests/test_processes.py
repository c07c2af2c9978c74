"""`facemux serve --processes N`: several whole servers on one port (SO_REUSEPORT), each
with its own /metrics, under a supervisor that forwards signals and fails as a set."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import grpc
import pytest
from common import Models, make_store
from facemux.service.processes import server_settings, settings_environ
from facemux.service.settings import Settings
from facemux.v1 import swap_service_pb2 as spb
from facemux.v1 import swap_service_pb2_grpc as sgrpc
from prometheus_client.parser import text_string_to_metric_families
from serve_process import ServeProcess, free_port

pytestmark = pytest.mark.slow


def _samples(metrics_port: int) -> list[Any]:
    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10) as r:
        text = r.read().decode()
    return [s for fam in text_string_to_metric_families(text) for s in fam.samples]


def _calls_counted(metrics_port: int) -> float:
    return sum(
        s.value
        for s in _samples(metrics_port)
        if s.name == "grpc_server_started_total" and s.labels.get("grpc_method") == "GetModelInfo"
    )


def _serving(metrics_port: int) -> bool:
    """SERVING: its gRPC port listens and its encoder is loaded (its /metrics comes up
    before either)."""
    return any(s.name == "facemux_serving" and s.value == 1 for s in _samples(metrics_port))


def _port_is_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def test_processes_share_the_port_and_stop_together(tmp_path: Path, models: Models) -> None:
    make_store(tmp_path / "store", models, ("alice",))
    with ServeProcess(tmp_path / "store", "--auth=off", "--processes=2", metrics=True) as srv:
        srv.wait_ready(60)
        # wait_ready saw one of them: wait until each says on its own /metrics that it serves.
        deadline = time.monotonic() + 60
        while True:
            try:
                if all(_serving(srv.metrics_port + i) for i in range(2)):
                    break
            except OSError:
                pass  # that /metrics is not up yet
            assert time.monotonic() < deadline, "the two servers never both served"
            time.sleep(0.05)
        # Each channel is its own connection (no shared subchannel), and the kernel gives
        # each connection to one of the processes: over a few dozen, both serve.
        for _ in range(24):
            with grpc.insecure_channel(
                srv.target, options=[("grpc.use_local_subchannel_pool", 1)]
            ) as ch:
                info = sgrpc.SwapServiceStub(ch).GetModelInfo(spb.GetModelInfoRequest(), timeout=30)
                assert info.resolution == models.config.resolution
        counted = [_calls_counted(srv.metrics_port + i) for i in range(2)]
        assert sum(counted) == 24 and min(counted) > 0, counted
        assert srv.stop(signal.SIGTERM, 60) == 0
    # Neither server outlives the supervisor: the port is free again.
    assert _port_is_free(srv.port)


def test_a_server_that_fails_stops_the_set(tmp_path: Path) -> None:
    # The store is a file: each server fails as it opens it; the supervisor says so with
    # the server's status instead of serving on with fewer processes.
    (tmp_path / "store").write_text("not a directory")
    port = free_port()
    started = time.monotonic()
    argv = [sys.executable, "-m", "facemux.client.cli", "serve", "--store", str(tmp_path / "store")]
    argv += ["--port", str(port), "--metrics-port=-1", "--processes=2", "--auth=off"]
    done = subprocess.run(
        argv,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode != 0, done.stderr
    assert "exited" in done.stderr and "stopping the others" in done.stderr
    assert time.monotonic() - started < 60
    assert _port_is_free(port)


def test_each_server_gets_its_share_and_its_own_metrics_port() -> None:
    base = Settings(port=50051, processes=4, metrics_port=9100, torch_threads=0)
    each = [server_settings(base, i) for i in range(4)]
    assert [s.metrics_port for s in each] == [9100, 9101, 9102, 9103]
    assert all(s.processes == 1 and s.reuse_port and s.port == 50051 for s in each)
    assert all(s.torch_threads >= 1 for s in each)
    # The environment carries every setting: read back, it is the same settings.
    assert Settings.load(environ=settings_environ(each[2])) == each[2]
    with pytest.raises(Exception, match="fixed port"):
        Settings(port=0, processes=2)
    with pytest.raises(Exception, match="processes"):
        Settings(processes=0)
