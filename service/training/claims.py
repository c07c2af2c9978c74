"""Which server runs which job, when several servers share one store.

In Kubernetes the replicas of the Deployment mount one ReadWriteMany volume, so every replica
sees every job. A job runs where its *claim* is held: ``<job>/claim`` names its owner (one
server process) and is created with O_EXCL, so of two replicas claiming at once one wins.
The owner rewrites it every few seconds with a growing beat count (a lease). Another server
takes a claim over only when its owner is gone:

- the owner ran in this very machine and PID namespace (same boot id and namespace inode) and
  its process is gone: no process with its pid, or one that started at another time (a pid
  reused); then at once;
- otherwise when the claim has not changed (beat count and mtime) for ``lease_s`` seconds of
  this server's own clock; the file's time is never compared with this clock. A scan that
  came late (this server stalled) starts those timers again rather than trusting them.

Takeover renames the stale claim aside, checks that what it moved is the claim it judged
stale, and puts a fresh one back with a hard link otherwise: a rename moves one file once, so
of two servers that both saw it stale only one goes on to claim. Release does the same.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

CLAIM = "claim"

# Owners open in this process: two managers over one store in one process (tests, tools)
# share a pid, and must still see each other as alive.
_live: set[str] = set()
_live_lock = threading.Lock()


def _read_text(path: Path) -> str:
    try:
        return path.read_text().strip()
    except OSError:
        return ""


def _start_time(pid: int) -> str:
    """The process's start time in clock ticks since boot ("" when there is no such pid)."""
    stat = _read_text(Path(f"/proc/{pid}/stat"))
    # The command name (field 2) may hold spaces and parentheses; fields after it do not.
    fields = stat.rsplit(")", 1)[-1].split()
    return fields[19] if len(fields) > 19 else ""


def _pid_namespace() -> str:
    with contextlib.suppress(OSError):
        return str(os.stat("/proc/self/ns/pid").st_ino)
    return ""


class Claims:
    def __init__(self, lease_s: float = 60.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.lease_s = lease_s
        # Only lease timers read it: tests step a manual clock instead of racing sleeps.
        self._clock = clock
        self.owner = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self._me = {
            "owner": self.owner,
            "host": socket.gethostname(),
            "boot": _read_text(Path("/proc/sys/kernel/random/boot_id")),
            "pidns": _pid_namespace(),
            "pid": os.getpid(),
            "start": _start_time(os.getpid()),
        }
        self._beat = 0
        # A beat rewrites the claim in place; this server's own reads must not see it half
        # written (another server that does takes it as held, which is safe).
        self._io = threading.RLock()
        self._seen: dict[Path, tuple[str, float]] = {}  # claim -> (what it said, first seen)
        self._last_look = clock()
        with _live_lock:
            _live.add(self.owner)

    def close(self) -> None:
        with _live_lock:
            _live.discard(self.owner)

    # -- reading -------------------------------------------------------------------------------

    @staticmethod
    def holder(work: Path) -> dict[str, Any] | None:
        """The claim's content; None when there is none; {} while it is being written."""
        try:
            text = (work / CLAIM).read_text()
        except FileNotFoundError:
            return None
        try:
            data = json.loads(text)
            return data if isinstance(data, dict) else {}
        except ValueError:
            return {}

    def holds(self, work: Path) -> bool:
        with self._io:
            h = self.holder(work)
        return bool(h) and h.get("owner") == self.owner  # type: ignore[union-attr]

    def _owner_gone(self, h: dict[str, Any]) -> bool:
        with _live_lock:
            if h.get("owner") in _live:
                return False
        me = self._me
        same_space = all(h.get(k) == me[k] and me[k] for k in ("host", "boot", "pidns"))
        if not same_space or not isinstance(h.get("pid"), int):
            return False  # another machine or PID namespace: only the lease can tell
        pid = int(h["pid"])
        if pid == me["pid"]:
            return True  # an earlier process with this pid, in this namespace
        started = _start_time(pid)
        return not started or started != h.get("start")

    def new_look(self) -> None:
        """Call before each pass over the claims. After a gap longer than half a lease (this
        server stalled), the timers start again: what looked unchanged may just be unseen."""
        now = self._clock()
        with self._io:
            if now - self._last_look > self.lease_s / 2:
                self._seen.clear()
            self._last_look = now

    def _stale(self, work: Path, h: dict[str, Any]) -> bool:
        if h and self._owner_gone(h):
            return True
        path = work / CLAIM
        try:
            state = f"{path.stat().st_mtime_ns}:{h.get('owner')}:{h.get('beat')}"
        except FileNotFoundError:
            return False
        now = self._clock()
        seen = self._seen.get(path)
        if seen is None or seen[0] != state:
            self._seen[path] = (state, now)
            return False
        return now - seen[1] >= self.lease_s

    # -- writing -------------------------------------------------------------------------------

    def _body(self) -> bytes:
        self._beat += 1
        return json.dumps({**self._me, "beat": self._beat}).encode()

    def _create(self, work: Path) -> bool:
        try:
            fd = os.open(work / CLAIM, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        try:
            os.write(fd, self._body())
            os.fsync(fd)
        finally:
            os.close(fd)
        return True

    def _take_aside(self, work: Path, expect_owner: str) -> bool:
        """Move the claim aside if it is still ``expect_owner``'s; True when it was."""
        aside = work / f".claim-aside-{uuid.uuid4().hex[:8]}"
        try:
            os.rename(work / CLAIM, aside)
        except FileNotFoundError:
            return False
        moved = self.holder_of(aside)
        if moved is not None and moved.get("owner") != expect_owner:
            # A claim made after ours was judged: put it back (fails only if yet another
            # server claimed meanwhile; its owner then sees the loss at its next beat).
            with contextlib.suppress(FileExistsError):
                os.link(aside, work / CLAIM)
            aside.unlink(missing_ok=True)
            return False
        aside.unlink(missing_ok=True)
        return True

    @staticmethod
    def holder_of(path: Path) -> dict[str, Any] | None:
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            return None
        return data if isinstance(data, dict) else None

    def claim(self, work: Path) -> bool:
        """Claim the job in ``work`` for this server: True when it holds it afterwards."""
        with self._io:
            return self._claim(work)

    def _claim(self, work: Path) -> bool:
        if self._create(work):
            return True
        h = self.holder(work)
        if h is None:
            return self._create(work)  # released meanwhile
        if h.get("owner") == self.owner:
            return True
        if not h or not self._stale(work, h):
            return False
        if not self._take_aside(work, str(h.get("owner"))):
            return False
        self._seen.pop(work / CLAIM, None)
        return self._create(work)

    def refresh(self, work: Path) -> bool:
        """Renew the lease; False when the claim is no longer this server's."""
        with self._io:
            return self._refresh(work)

    def _refresh(self, work: Path) -> bool:
        try:
            # In place, through one open file: if a takeover renames it away meanwhile, the
            # beat lands in the file moved aside, never in the new owner's claim.
            with open(work / CLAIM, "r+b") as fh:
                try:
                    mine = json.loads(fh.read()).get("owner") == self.owner
                except (ValueError, AttributeError):
                    mine = False
                if not mine:
                    return False
                fh.seek(0)
                fh.write(self._body())
                fh.truncate()
        except FileNotFoundError:
            return False
        return True

    def release(self, work: Path) -> None:
        with self._io:
            if self.holds(work):
                self._take_aside(work, self.owner)
            self._seen.pop(work / CLAIM, None)
