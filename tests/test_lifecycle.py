"""Health before and after the encoder loads; settings; the client without torch."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from common import Models, face_image
from facemux.client import FacemuxClient, Unavailable
from facemux.models.errors import InvalidInputError
from facemux.service.server import ServerThread
from facemux.service.settings import Settings, parse_settings
from facemux.service.store import LocalStore
from serve_process import ServeProcess

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent


def test_not_serving_until_the_encoder_is_loaded(tmp_path: Path, models: Models) -> None:
    store = LocalStore(tmp_path / "store")  # empty: no encoder yet
    with (
        ServerThread(Settings(port=0, auth="off", store=store.root)) as srv,
        FacemuxClient(srv.target, retries=1) as c,
    ):
        assert c.health() == "NOT_SERVING"
        assert c.health("facemux.v1.SwapService") == "NOT_SERVING"
        with pytest.raises(Unavailable, match="still loading"):
            c.swap_faces([face_image(0)], "alice")
        # Publishing an encoder into the store brings the server up without a restart.
        store.put_encoder(models.encoder_bytes, models.fingerprint)
        c.wait_ready(15)
        assert c.health("facemux.v1.SwapService") == "SERVING"
        assert c.model_info().encoder_fingerprint == models.fingerprint


def test_wait_ready_sees_a_server_that_starts_after_it_began(
    tmp_path: Path, models: Models
) -> None:
    from common import make_store
    from serve_process import free_port

    make_store(tmp_path / "store", models)
    port = free_port()
    settings = Settings(port=port, auth="off", store=tmp_path / "store", metrics_port=-1)
    with FacemuxClient(f"127.0.0.1:{port}", retries=1) as c:
        # Nothing listens yet: a clear UNAVAILABLE once the time is up.
        with pytest.raises(Unavailable, match=r"not ready after 0\.3s"):
            c.wait_ready(0.3)
        with pytest.raises(Unavailable):
            c.model_info()  # refused: the client's own channel now backs off for a second
        # The wait still ends with the server up,
        # and the next call on that channel goes through at once.
        started: list[ServerThread] = []
        timer = threading.Timer(0.5, lambda: started.append(ServerThread(settings).start()))
        timer.start()
        try:
            c.wait_ready(30)
            assert started
            assert c.model_info().encoder_fingerprint == models.fingerprint
        finally:
            timer.join()
            for srv in started:
                srv.stop()


def test_reflection_lists_the_services(client: FacemuxClient, server: ServerThread) -> None:
    import grpc
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    with grpc.insecure_channel(server.target) as ch:
        stub = reflection_pb2_grpc.ServerReflectionStub(ch)
        req = reflection_pb2.ServerReflectionRequest(list_services="")
        resp = next(stub.ServerReflectionInfo(iter([req])))
    names = {s.name for s in resp.list_services_response.service}
    assert {
        "facemux.v1.SwapService",
        "facemux.v1.IdentityService",
        "facemux.v1.TrainingService",
        "grpc.health.v1.Health",
    } <= names


def test_settings_precedence_and_validation(tmp_path: Path) -> None:
    env = {
        "FACEMUX_PORT": "6000",
        "FACEMUX_DECODER_CACHE_COUNT": "3",
        "FACEMUX_STORE": str(tmp_path),
    }
    s = Settings.load(environ=env)
    assert (s.port, s.decoder_cache_count, s.store) == (6000, 3, tmp_path)
    import argparse

    parser = argparse.ArgumentParser()
    Settings.add_arguments(parser)
    s = Settings.load(parser.parse_args(["--port", "7000"]), environ=env)
    assert s.port == 7000 and s.decoder_cache_count == 3  # flag beats env, env beats default
    assert parse_settings(["--host", "::", "--port", "1"]).address == "[::]:1"
    with pytest.raises(InvalidInputError, match=r"FACEMUX|port"):
        Settings.load(environ={"FACEMUX_PORT": "eighty"})
    with pytest.raises(InvalidInputError, match="decoder_cache_count must be positive"):
        Settings(decoder_cache_count=0)
    with pytest.raises(InvalidInputError, match="device"):
        Settings(device="tpu")
    with pytest.raises(InvalidInputError, match=r"detector_processes must be in -1\.\.64"):
        Settings(detector_processes=-2)


def test_detector_processes_auto_follows_the_cgroup_cpu_limit(tmp_path: Path) -> None:
    from facemux.service import settings as settings_mod

    affinity = len(os.sched_getaffinity(0))
    assert settings_mod.usable_cores(tmp_path) == affinity  # no cpu.max: affinity alone
    (tmp_path / "cpu.max").write_text("max 100000\n")
    assert settings_mod.usable_cores(tmp_path) == affinity
    (tmp_path / "cpu.max").write_text("150000 100000\n")  # a 1.5-CPU limit
    assert settings_mod.usable_cores(tmp_path) == min(affinity, 2)
    v1 = tmp_path / "v1"
    (v1 / "cpu").mkdir(parents=True)
    (v1 / "cpu" / "cpu.cfs_quota_us").write_text("-1\n")
    (v1 / "cpu" / "cpu.cfs_period_us").write_text("100000\n")
    assert settings_mod.usable_cores(v1) == affinity
    (v1 / "cpu" / "cpu.cfs_quota_us").write_text("100000\n")  # cgroup v1, 1 CPU
    assert settings_mod.usable_cores(v1) == 1
    assert Settings(detector_processes=3).detector_process_count() == 3
    auto = Settings().detector_process_count()
    cores = settings_mod.usable_cores()
    assert auto == (min(16, cores // 2) if cores >= 4 else 0)


def test_client_imports_without_torch() -> None:
    # A finder that refuses torch: if the client (or the CLI's client commands) needed it,
    # the import below would fail.
    code = """
import sys
class NoTorch:
    def find_spec(self, name, path=None, target=None):
        if name == "torch" or name.startswith("torch."):
            raise ImportError("torch is not installed here")
sys.meta_path.insert(0, NoTorch())
import facemux.client, facemux.client.cli
facemux.client.cli.build_parser().parse_args(["swap", "x.png", "--identity", "a"])
assert "torch" not in sys.modules and "cv2" not in sys.modules
print("ok")
"""
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "PYTHONPATH": ""},
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"


def test_generated_code_matches_protos() -> None:
    out = subprocess.run(
        [sys.executable, str(ROOT / "proto" / "generate.py"), "--check"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr


def test_serve_command_starts_and_stops_on_sigterm(tmp_path: Path, models: Models) -> None:
    from common import make_store

    make_store(tmp_path / "store", models, ("alice",))
    # Metrics on a free port: the default 9090 may be taken on a developer's machine.
    srv = ServeProcess(
        tmp_path / "store", "--auth", "off", metrics=True, log=tmp_path / "serve.log"
    )
    with srv:
        with FacemuxClient(srv.target) as c:
            c.wait_ready(60)
            assert c.swap_faces([face_image(0)], "alice").faces_swapped == 1
        assert srv.stop() == 0
    log = srv.log_text()
    assert "listening" in log and "stopped" in log
