"""Graceful shutdown of `facemux serve`: on SIGTERM an in-flight call completes during the
drain, new calls are refused, and the process exits 0."""

from __future__ import annotations

import signal
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

import grpc
import pytest
from common import Models, face_image, make_store
from facemux.client import FacemuxClient
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families
from serve_process import ServeProcess

pytestmark = pytest.mark.slow


def _queue_depth(metrics_port: int) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5) as r:
        text = r.read().decode()
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if s.name == "facemux_queue_depth":
                return float(s.value)
    raise AssertionError("no facemux_queue_depth")


def _probe(target: str) -> str:
    """One health check on a fresh connection: SERVING, NOT_SERVING or the error code."""
    with grpc.insecure_channel(target) as ch:
        try:
            resp = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=1)
        except grpc.RpcError as err:
            return str(err.code().name)
    return str(health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status))


@pytest.mark.timeout(120)
def test_sigterm_drains_in_flight_calls_and_refuses_new_ones(
    tmp_path: Path, models: Models
) -> None:
    make_store(tmp_path / "store", models, ("alice",))
    # A face waits up to 4 s for the callers the previous batch answered to come back (two
    # calls answered together, then one): an in-flight call that is still running when
    # SIGTERM arrives, without patching anything in the server.
    srv = ServeProcess(
        tmp_path / "store",
        "--auth",
        "off",
        "--max-batch-wait-ms",
        "4000",
        "--grace-seconds",
        "20",
        metrics=True,
        log=tmp_path / "serve.log",
    ).start()
    target, metrics_port = srv.target, srv.metrics_port
    try:
        with FacemuxClient(target, timeout=30, retries=1) as c:
            c.wait_ready(60)
            # Two callers at once: the first one's batch waits for the second, announced.
            pair = [
                threading.Thread(target=c.swap_faces, args=([face_image(i)], "alice"))
                for i in range(2)
            ]
            for t in pair:
                t.start()
            for t in pair:
                t.join(30)
            outcome: dict[str, Any] = {}

            def in_flight() -> None:
                try:
                    outcome["response"] = c.swap_faces([face_image(0)], "alice")
                except Exception as exc:  # reported by the assertions below
                    outcome["error"] = exc
                outcome["done_at"] = time.monotonic()

            worker = threading.Thread(target=in_flight)
            worker.start()
            give_up = time.monotonic() + 10
            while _queue_depth(metrics_port) < 1:  # the call is queued in the server
                assert time.monotonic() < give_up, "the call never reached the queue"
                time.sleep(0.05)

            assert _probe(target) == "SERVING"  # the probe itself works
            sigterm_at = time.monotonic()
            srv.proc.send_signal(signal.SIGTERM)
            seen: list[str] = []
            while worker.is_alive() and (not seen or seen[-1] != "UNAVAILABLE"):
                seen.append(_probe(target))
                time.sleep(0.05)
            # New calls were refused while the first one was still being served.
            assert seen and seen[-1] == "UNAVAILABLE", seen
            assert worker.is_alive(), "the in-flight call ended before new calls were refused"
            assert "SERVING" not in seen[1:], seen  # never back to SERVING once draining
            worker.join(timeout=30)
        assert "error" not in outcome, outcome.get("error")
        assert outcome["response"].faces_swapped == 1
        assert outcome["done_at"] > sigterm_at
        assert srv.proc.wait(timeout=30) == 0
    finally:
        srv.kill()
    log = srv.log_text()
    assert "draining" in log and "stopped" in log, log
