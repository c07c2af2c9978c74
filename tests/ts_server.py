"""A real TorchServe 0.12 on loopback, for tests and benchmarks of exported archives.

Ready means a worker of the model is READY in the management API, not /ping: a worker that
crash-loops leaves /ping "Healthy". The gRPC stubs are generated at run time from the
inference.proto that TorchServe's own frontend jar carries, so they match the server.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import zipfile
from pathlib import Path
from types import ModuleType
from typing import Any


def _free_ports(n: int) -> list[int]:
    socks = []
    for _ in range(n):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        socks.append(s)
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def why_not_available() -> str:
    """Empty when TorchServe can run here, else the reason."""
    if shutil.which("java") is None:
        return "Java is not installed (TorchServe's frontend needs Java 17)"
    for module in ("ts", "model_archiver", "yaml"):
        if importlib.util.find_spec(module) is None:
            return f"python module {module} is missing (pip install 'facemux[torchserve]' pyyaml)"
    return ""


class TorchServe:
    def __init__(
        self,
        model_store: Path,
        workdir: Path,
        models: dict[str, str],
        env: dict[str, str] | None = None,
        batch_size_metric: bool = True,
    ) -> None:
        self.model_store = model_store
        self.extra_env = dict(env or {})  # e.g. OMP_NUM_THREADS for the Python workers
        self.batch_size_metric = batch_size_metric
        self.workdir = workdir
        self.models = models  # name -> archive file name in model_store
        self.http, self.management, self.metrics, self.grpc, self.grpc_mgmt = _free_ports(5)
        self.proc: subprocess.Popen[bytes] | None = None
        self.started_s = 0.0

    @property
    def rest(self) -> str:
        return f"http://127.0.0.1:{self.http}"

    @property
    def grpc_target(self) -> str:
        return f"127.0.0.1:{self.grpc}"

    def start(self, timeout: float = 180.0) -> TorchServe:
        self.workdir.mkdir(parents=True, exist_ok=True)
        config = self.workdir / "config.properties"
        config.write_text(
            "\n".join(
                [
                    f"inference_address=http://127.0.0.1:{self.http}",
                    f"management_address=http://127.0.0.1:{self.management}",
                    f"metrics_address=http://127.0.0.1:{self.metrics}",
                    "grpc_inference_address=127.0.0.1",
                    "grpc_management_address=127.0.0.1",
                    f"grpc_inference_port={self.grpc}",
                    f"grpc_management_port={self.grpc_mgmt}",
                    "disable_token_authorization=true",
                    "install_py_dep_per_model=false",
                    "default_workers_per_model=1",
                    f"model_store={self.model_store}",
                    *(
                        [f"metrics_config={metrics_config_with_batch_size(self.workdir)}"]
                        if self.batch_size_metric
                        else []
                    ),
                ]
            )
            + "\n"
        )
        env = {**os.environ, **self.extra_env, "LOG_LOCATION": str(self.workdir / "logs")}
        env["METRICS_LOCATION"] = str(self.workdir / "logs")
        # TorchServe keeps one pid file in the temp directory and refuses to start beside
        # another instance: a temp directory of its own lets several run side by side.
        (self.workdir / "tmp").mkdir(exist_ok=True)
        env["TMPDIR"] = str(self.workdir / "tmp")
        bindir = Path(sys.executable).parent
        env["PATH"] = f"{bindir}{os.pathsep}{env.get('PATH', '')}"
        models = [f"{name}={mar}" for name, mar in self.models.items()]
        t0 = time.monotonic()
        self.log = open(self.workdir / "torchserve.out", "wb")  # noqa: SIM115
        self.proc = subprocess.Popen(
            [
                str(bindir / "torchserve"),
                *("--start", "--foreground", "--ncs", "--ts-config", str(config)),
                *("--model-store", str(self.model_store), "--models", *models),
            ],
            cwd=self.workdir,
            env=env,
            stdout=self.log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            for name in self.models:
                self._wait_ready(name, t0 + timeout)
        except BaseException:
            self.stop()
            raise
        self.started_s = time.monotonic() - t0
        return self

    def _wait_ready(self, name: str, deadline: float) -> None:
        url = f"http://127.0.0.1:{self.management}/models/{name}"
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise RuntimeError(f"TorchServe exited ({self.proc.returncode}):\n{self.tail()}")
            try:
                with urllib.request.urlopen(url, timeout=2) as r:
                    workers = json.loads(r.read())[0].get("workers", [])
                if any(w.get("status") == "READY" for w in workers):
                    return
            except (urllib.error.URLError, OSError, ValueError, IndexError):
                pass
            time.sleep(0.1)
        raise TimeoutError(f"TorchServe model {name} not ready in time:\n{self.tail()}")

    def tail(self, n: int = 4000) -> str:
        text = ""
        for path in (self.workdir / "torchserve.out", self.workdir / "logs" / "model_log.log"):
            if path.exists():
                text += path.read_text(errors="replace")[-n:]
        return text

    def stop(self, timeout: float = 30.0) -> int | None:
        """SIGTERM to the whole process group (frontend and Python workers); the exit code."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        # Workers are children in the same group; none may outlive the test.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.log.close()
        return self.proc.returncode

    def batch_sizes(self) -> list[int]:
        """The size of every batch the facemux handler has run so far, in order."""
        return batch_sizes(self.workdir / "logs")

    def worker_torch_threads(self) -> int | None:
        """Torch threads of the facemux handler's worker, as it logged them at load."""
        path = self.workdir / "logs" / "model_log.log"
        found = _THREADS.findall(path.read_text(errors="replace")) if path.exists() else []
        return int(found[-1]) if found else None

    def management_get(self, path: str) -> Any:
        url = f"http://127.0.0.1:{self.management}{path}"
        with urllib.request.urlopen(url, timeout=10) as r:
            return json.loads(r.read())


_BATCH = re.compile(r"\bFacemuxBatchSize\.[A-Za-z]+:(\d+)(?:\.0*)?\|")
_THREADS = re.compile(r"facemux archive .* (\d+) torch threads")


def metrics_config_with_batch_size(workdir: Path) -> Path:
    """TorchServe's default metrics.yaml plus the handler's FacemuxBatchSize counter.

    TorchServe records only the model metrics its metrics config declares: without this the
    handler's per-batch line reaches the frontend and is dropped."""
    import ts
    import yaml

    config = yaml.safe_load((Path(ts.__file__).parent / "configs" / "metrics.yaml").read_text())
    counters = config.setdefault("model_metrics", {}).setdefault("counter", [])
    counters.append(
        {"name": "FacemuxBatchSize", "unit": "Count", "dimensions": ["ModelName", "Level"]}
    )
    path = workdir / "metrics.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def batch_sizes(logs: Path) -> list[int]:
    """Batch sizes from the handler's FacemuxBatchSize metric lines in a TorchServe log
    directory (model_metrics.log in TorchServe's default `log` metrics mode)."""
    path = logs / "model_metrics.log"
    if not path.exists():
        return []
    return [int(v) for v in _BATCH.findall(path.read_text(errors="replace"))]


def grpc_modules(workdir: Path) -> tuple[ModuleType, ModuleType]:
    """(inference_pb2, inference_pb2_grpc) built from the frontend jar's inference.proto."""
    import ts
    from grpc_tools import protoc

    jar = Path(ts.__file__).parent / "frontend" / "model-server.jar"
    src = workdir / "proto"
    with zipfile.ZipFile(jar) as z:
        for name in ("inference.proto", "google/rpc/status.proto"):
            (src / name).parent.mkdir(parents=True, exist_ok=True)
            (src / name).write_bytes(z.read(name))
    out = workdir / "gen"
    out.mkdir(parents=True, exist_ok=True)
    import grpc_tools

    include = str(Path(grpc_tools.__file__).parent / "_proto")
    rc = protoc.main(
        [
            "protoc",
            f"-I{src}",
            f"-I{include}",
            f"--python_out={out}",
            f"--grpc_python_out={out}",
            str(src / "inference.proto"),
            str(src / "google/rpc/status.proto"),
        ]
    )
    if rc != 0:
        raise RuntimeError("protoc could not build TorchServe's inference.proto")
    sys.path.insert(0, str(out))
    try:
        return importlib.import_module("inference_pb2"), importlib.import_module(
            "inference_pb2_grpc"
        )
    finally:
        sys.path.remove(str(out))
