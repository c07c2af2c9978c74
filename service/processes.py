"""`facemux serve --processes N`: N whole servers on one port, and a supervisor.

One Python process serves at most what one event loop and one GIL can feed the model; on a
fast GPU that host side, not the card, bounds aligned-face Swap (bench/RESULTS.md). N
processes bind the same port with SO_REUSEPORT and the kernel hands each new connection to
one of them. Each is a whole server: its own model copy, decoder cache, scheduler, /metrics
(on metrics_port + i) and job manager (the processes share the store as replicas on one
volume do). The CPU is shared out: unless set, each takes its share of the cores for torch
and of the detector processes.

This process only supervises. It forwards SIGTERM and SIGINT; when a server exits on its
own, it stops the others and exits with that status, so the orchestrator restarts the set
instead of it serving on with fewer processes than asked. Its servers die with it.
"""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import subprocess
import sys
import time
from dataclasses import fields
from types import FrameType

from facemux.service.settings import ENV_PREFIX, Settings, usable_cores

log = logging.getLogger(__name__)

# How long the servers may take to drain after the signal, beyond their own grace period.
STOP_SLACK_S = 10.0


def server_settings(settings: Settings, index: int) -> Settings:
    """The settings of server `index` of `settings.processes`."""
    n = settings.processes
    changes: dict[str, object] = {"processes": 1, "reuse_port": True}
    if settings.metrics_port > 0:
        changes["metrics_port"] = settings.metrics_port + index
    if settings.torch_threads == 0:
        changes["torch_threads"] = max(1, usable_cores() // n)
    if settings.detector_processes < 0:
        changes["detector_processes"] = settings.detector_process_count() // n
    return settings.replace(**changes)


def settings_environ(settings: Settings) -> dict[str, str]:
    """Every setting as the environment variable it is read from: a server started with
    these and no flags has exactly these settings (and no secret shows in `ps`)."""
    env = {}
    for f in fields(settings):
        value = getattr(settings, f.name)
        env[ENV_PREFIX + f.name.upper()] = (
            ("true" if value else "false") if isinstance(value, bool) else str(value)
        )
    return env


def _die_with_parent() -> None:
    # Runs in the child between fork and exec: ask Linux to send it SIGTERM when the
    # supervisor dies, however it dies, so no server is left holding the port.
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def run_processes(settings: Settings) -> int:
    """Start `settings.processes` servers and supervise them until they end; the exit
    status: 0 after a clean stop on a signal, else the first failed server's."""
    procs: list[subprocess.Popen[bytes]] = []
    stopping = False

    def stop_all(signum: int = signal.SIGTERM, _frame: FrameType | None = None) -> None:
        nonlocal stopping
        stopping = True
        for p in procs:
            if p.poll() is None:
                p.send_signal(signum)

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, stop_all)
    preexec = _die_with_parent if sys.platform.startswith("linux") else None
    for i in range(settings.processes):
        env = {**os.environ, **settings_environ(server_settings(settings, i))}
        cmd = [sys.executable, "-m", "facemux.client.cli", "serve"]
        procs.append(subprocess.Popen(cmd, env=env, preexec_fn=preexec))
    log.info(
        "facemux: %d server processes on %s (pids %s)",
        len(procs),
        settings.address,
        ", ".join(str(p.pid) for p in procs),
    )
    failed: int | None = None
    while not stopping:
        for p in procs:
            rc = p.poll()
            if rc is not None:
                log.error("server process %d exited (status %d); stopping the others", p.pid, rc)
                failed = rc if rc > 0 else 1  # ending unasked is a failure, whatever it says
                stop_all()
                break
        else:
            time.sleep(0.1)
    deadline = time.monotonic() + settings.grace_seconds + STOP_SLACK_S
    for p in procs:
        try:
            p.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            log.error("server process %d did not stop in time; killing it", p.pid)
            p.kill()
            p.wait()
    if failed is not None:
        return failed
    return max((p.returncode for p in procs if p.returncode > 0), default=0)
