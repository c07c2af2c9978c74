"""Which server runs which job, when several servers share one store.

In Kubernetes the replicas of the Deployment mount one ReadWriteMany volume, so every replica
sees every job. A job runs where its *claim* is held: ``<job>/claim`` names its owner (one
server process) and is created with O_EXCL, so of two replicas claiming at once one wins.
The owner touches it every few seconds (a lease). Another server takes a claim over only
when its owner is gone:

- the owner ran on this host and its process no longer exists, or was an earlier process
  with this one's pid (a container restarted as PID 1 again); then at once;
- otherwise when the claim's modification time has not moved for ``lease_s`` seconds of this
  server's own clock (comparing the file's time with this clock would trust two clocks).

Takeover renames the stale claim away first: a rename succeeds once, so of two servers that
both saw it stale only one goes on to claim.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import threading
import time
import uuid
from pathlib import Path

CLAIM = "claim"

# Owners open in this process: two managers over one store in one process (tests, tools)
# share a pid, and must still see each other as alive.
_live: set[str] = set()
_live_lock = threading.Lock()


class Claims:
    def __init__(self, lease_s: float = 30.0) -> None:
        self.lease_s = lease_s
        self.host = socket.gethostname()
        self.pid = os.getpid()
        self.owner = f"{self.host}:{self.pid}:{uuid.uuid4().hex[:8]}"
        self._seen: dict[Path, tuple[float, float]] = {}  # claim -> (mtime, first seen)
        with _live_lock:
            _live.add(self.owner)

    def close(self) -> None:
        with _live_lock:
            _live.discard(self.owner)

    # -- reading -------------------------------------------------------------------------------

    @staticmethod
    def holder(work: Path) -> dict[str, object] | None:
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
        h = self.holder(work)
        return bool(h) and h.get("owner") == self.owner  # type: ignore[union-attr]

    def _owner_gone(self, h: dict[str, object]) -> bool:
        owner = str(h.get("owner", ""))
        with _live_lock:
            if owner in _live:
                return False
        if h.get("host") != self.host or not isinstance(h.get("pid"), int):
            return False
        pid = int(h["pid"])  # type: ignore[call-overload]
        if pid == self.pid:
            return True  # an earlier process with this pid: this one's predecessor
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        except PermissionError:
            return False
        return False

    def _stale(self, work: Path, h: dict[str, object]) -> bool:
        if h and self._owner_gone(h):
            return True
        path = work / CLAIM
        try:
            mtime = path.stat().st_mtime
        except FileNotFoundError:
            return False
        now = time.monotonic()
        seen = self._seen.get(path)
        if seen is None or seen[0] != mtime:
            self._seen[path] = (mtime, now)
            return False
        return now - seen[1] >= self.lease_s

    # -- writing -------------------------------------------------------------------------------

    def _create(self, work: Path) -> bool:
        body = json.dumps({"owner": self.owner, "host": self.host, "pid": self.pid}).encode()
        try:
            fd = os.open(work / CLAIM, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        try:
            os.write(fd, body)
            os.fsync(fd)
        finally:
            os.close(fd)
        return True

    def claim(self, work: Path) -> bool:
        """Claim the job in ``work`` for this server: True when it holds it afterwards."""
        if self._create(work):
            return True
        h = self.holder(work)
        if h is None:
            return self._create(work)  # released meanwhile
        if h.get("owner") == self.owner:
            return True
        if not self._stale(work, h):
            return False
        aside = work / f".claim-taken-{uuid.uuid4().hex[:8]}"
        try:
            os.rename(work / CLAIM, aside)
        except FileNotFoundError:
            return False  # another server took it over first
        aside.unlink(missing_ok=True)
        self._seen.pop(work / CLAIM, None)
        return self._create(work)

    def refresh(self, work: Path) -> bool:
        """Renew the lease; False when the claim is no longer this server's."""
        if not self.holds(work):
            return False
        with contextlib.suppress(FileNotFoundError):
            os.utime(work / CLAIM)
            return True
        return False

    def release(self, work: Path) -> None:
        if self.holds(work):
            (work / CLAIM).unlink(missing_ok=True)
        self._seen.pop(work / CLAIM, None)
