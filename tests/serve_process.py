"""`facemux serve` in a child process, for the tests and benchmarks that need a server with
its own memory, its own signals or its own interpreter (bench/ imports this file too)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType

from facemux.client import FacemuxClient


def free_port() -> int:
    """A port nothing listens on now (the OS's pick; it may be taken again before use)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class ServeProcess:
    """`facemux serve --store STORE --port PORT ARGS...`, started by `start()` or `with`.

    The gRPC port is a free one unless given (a restarted server takes its predecessor's);
    `metrics=True` also puts /metrics on a free port (`metrics_port`), otherwise it is off.
    The child's stderr goes to `log` when one is given (read it with `log_text()`; a file,
    not a pipe, so a chatty server never blocks on a full pipe), else to this process's
    (its stdout too).
    Leaving the `with` block stops the server (SIGTERM, then SIGKILL) if it still runs.
    """

    def __init__(
        self,
        store: Path,
        *args: str,
        port: int | None = None,
        metrics: bool = False,
        env: Mapping[str, str] | None = None,
        log: Path | None = None,
    ) -> None:
        self.store = store
        self.port = port or free_port()
        self.metrics_port = free_port() if metrics else -1
        self.args = [
            "--store",
            str(store),
            "--port",
            str(self.port),
            "--metrics-port",
            str(self.metrics_port),
            *args,
        ]
        self.env = {**os.environ, **(env or {})}
        self.log = log
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def proc(self) -> subprocess.Popen[bytes]:
        assert self._proc is not None, "not started"
        return self._proc

    @property
    def pid(self) -> int:
        return self.proc.pid

    def start(self) -> ServeProcess:
        cmd = [sys.executable, "-m", "facemux.client.cli", "serve", *self.args]
        if self.log is None:
            self._proc = subprocess.Popen(cmd, env=self.env)
        else:
            with self.log.open("ab") as out:
                self._proc = subprocess.Popen(
                    cmd, env=self.env, stdout=subprocess.DEVNULL, stderr=out
                )
        return self

    def wait_ready(self, timeout: float = 120.0) -> ServeProcess:
        """Block until it answers SERVING (its encoder loaded)."""
        with FacemuxClient(self.target, timeout=30, retries=1) as c:
            c.wait_ready(timeout)
        return self

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> int:
        """Send `sig` and wait for the exit (SIGKILL after `timeout`); its exit status."""
        proc = self.proc
        if proc.poll() is None:
            proc.send_signal(sig)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        return int(proc.returncode)

    def kill(self) -> int:
        return self.stop(signal.SIGKILL)

    def log_text(self) -> str:
        assert self.log is not None, "started without a log file"
        return self.log.read_text(errors="replace")

    def __enter__(self) -> ServeProcess:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._proc is not None:
            self.stop()
