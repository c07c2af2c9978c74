"""The audit trail: one JSON line per call that creates synthetic content or changes
identities. It records who asked for what and how it ended, never image or latent content.

Setting `audit_log`: "-" writes to stdout, a path writes to a size-rotated file, "" is off.
Lines are hash-chained (facemux.client.audit_chain): each carries a sequence number and the
SHA-256 of the line before it, continued across restarts and rotated files, so an edited or
removed line shows in `facemux audit verify FILE`.
"""

from __future__ import annotations

import logging
import logging.handlers
import sys
import threading
import time
import uuid
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import grpc
from facemux.client.audit_chain import GENESIS, chain_line, last_line, line_hash, link_of
from facemux.service.auth import CallAudit
from facemux.service.request_ids import current_request_id

log = logging.getLogger(__name__)

# RPCs that make synthetic faces or change what identities exist or may be used.
AUDITED = frozenset(
    {
        "/facemux.v1.SwapService/Swap",
        "/facemux.v1.SwapService/SwapStream",
        "/facemux.v1.SwapService/Decode",
        "/facemux.v1.IdentityService/RegisterIdentity",
        "/facemux.v1.IdentityService/DeleteIdentity",
        "/facemux.v1.IdentityService/SetDefaultVersion",
        "/facemux.v1.IdentityService/RevokeConsent",
        "/facemux.v1.IdentityService/RecordConsent",
        "/facemux.v1.TrainingService/Train",
    }
)


def _field(msg: Any, name: str) -> Any:
    """A field's value if the message type has that field, else None."""
    desc = getattr(msg, "DESCRIPTOR", None)
    if desc is None or name not in desc.fields_by_name:
        return None
    return getattr(msg, name)


class AuditLog:
    def __init__(self, target: str, max_bytes: int = 100 << 20, backups: int = 10) -> None:
        self.target = target
        self._lock = threading.Lock()
        self._handler: logging.Handler | None
        self._seq, self._prev = 0, GENESIS
        if not target:
            self._handler = None
        elif target == "-":
            self._handler = logging.StreamHandler(sys.stdout)
        else:
            Path(target).parent.mkdir(parents=True, exist_ok=True)
            self._seq, self._prev = _resume(Path(target))
            self._handler = logging.handlers.RotatingFileHandler(
                target, maxBytes=max_bytes, backupCount=backups, encoding="utf-8"
            )
        if self._handler is not None:
            self._handler.setFormatter(logging.Formatter("%(message)s"))

    @property
    def enabled(self) -> bool:
        return self._handler is not None

    def write(self, entry: dict[str, Any]) -> None:
        if self._handler is None:
            return
        with self._lock:
            line = chain_line(entry, self._seq + 1, self._prev)
            record = logging.makeLogRecord({"msg": line, "levelno": logging.INFO})
            self._handler.handle(record)
            self._seq, self._prev = self._seq + 1, line_hash(line.encode())

    def event(
        self,
        rpc: str,
        caller: str,
        identity: str,
        identity_version: int,
        status: grpc.StatusCode,
        request_id: str,
        duration_s: float = 0.0,
        **extra: Any,
    ) -> None:
        """A line for what the server does on its own behalf, outside any RPC (a training
        job registering its result), in the shape of an RPC's line: `caller` is who asked
        for it (the job's submitter)."""
        self.write(
            {
                "time": datetime.now(timezone.utc).isoformat(timespec="milliseconds"),
                "caller": caller,
                "peer": "",
                "rpc": rpc,
                "identity": identity[:128],
                "identity_version": identity_version,
                "request_id": request_id,
                "faces_swapped": 0,
                "messages_in": 0,
                "status": status.name,
                "duration_ms": round(duration_s * 1000, 2),
                **extra,
            }
        )

    def hook(
        self, method: str, caller: str, request: Any, context: grpc.aio.ServicerContext
    ) -> CallAudit | None:
        """For the guard interceptor: an observer for audited calls, None for the rest."""
        if self._handler is None or method not in AUDITED:
            return None
        return _Entry(self, method, caller, context)

    def refusal(
        self,
        method: str,
        caller: str,
        claimed: str,
        context: grpc.aio.ServicerContext,
        code: grpc.StatusCode,
        reason: str,
    ) -> None:
        """For the guard: a refused call of any guarded RPC. `claimed` is the caller name
        the credentials claimed but did not prove ("" when `caller` is verified)."""
        if self._handler is None:
            return
        entry = _Entry(self, method, caller, context)
        if claimed:
            entry.data["claimed_caller"] = claimed[:64]
        entry.data["reason"] = reason[:200]
        entry.finish(code)

    def close(self) -> None:
        if self._handler is not None:
            self._handler.close()
            # The chain cannot show its newest lines cut off; this head, kept in the server
            # log, can (compare with the head `facemux audit verify` prints).
            log.info("audit log %s closed at seq %d, head sha256 %s", self.target, *self.head)

    @property
    def head(self) -> tuple[int, str]:
        """(seq, hash) of the last line written."""
        with self._lock:
            return self._seq, self._prev


def _resume(path: Path) -> tuple[int, str]:
    """Where the chain of an existing log (or its newest rotated file) ends."""
    for p in (path, path.with_name(path.name + ".1")):
        line = last_line(p)
        if line is None:
            continue
        link = link_of(line)
        if link is None:
            # Not a chained line (a log from before chaining, or one cut by a crash): start
            # a new chain that names the line it follows; verify reports the break there.
            log.warning("audit log %s does not end in a chained line; starting a new chain", p)
            return 0, line_hash(line)
        return link[0], line_hash(line)
    return 0, GENESIS


class _Entry(CallAudit):
    def __init__(
        self, log: AuditLog, method: str, caller: str, context: grpc.aio.ServicerContext
    ) -> None:
        self._log = log
        self._t0 = time.perf_counter()
        peer = context.peer() or ""
        self.data: dict[str, Any] = {
            "time": datetime.now(timezone.utc).isoformat(timespec="milliseconds"),
            "caller": caller,
            "peer": peer.rsplit(":", 1)[0],
            "rpc": method.rsplit("/", 1)[-1],
            "identity": "",
            "identity_version": 0,
            # The call's id (metadata x-request-id or the server's), set before any handler.
            "request_id": current_request_id.get()[:128],
            "faces_swapped": 0,
            "messages_in": 0,
        }

    def observe_request(self, message: Any) -> None:
        d = self.data
        d["messages_in"] += 1
        meta = _field(message, "metadata")
        for value in (_field(message, "identity"), _field(message, "name")):
            if isinstance(value, str) and value and not d["identity"]:
                d["identity"] = value[:128]  # names are validated later; cap what we echo
        if meta is not None and not d["identity"]:
            d["identity"] = str(_field(meta, "name") or "")[:128]
        for key in ("identity_version", "version"):
            v = _field(message, key)
            if isinstance(v, int) and v and not d["identity_version"]:
                d["identity_version"] = v

    def observe_response(self, message: Any) -> None:
        d = self.data
        for key in ("identity_version", "version"):
            v = _field(message, key)
            if isinstance(v, int) and v:
                d["identity_version"] = v
        n = _field(message, "faces_swapped")
        if isinstance(n, int):
            d["faces_swapped"] += n
        elif _field(message, "faces") is not None:  # Decode: every latent is drawn
            d["faces_swapped"] += len(message.faces)

    def finish(self, code: grpc.StatusCode) -> None:
        d = self.data
        if not d["request_id"]:
            # Every line gets an id to quote in an investigation, even if the caller sent none.
            d["request_id"] = "srv-" + uuid.uuid4().hex[:16]
        d["status"] = code.name
        d["duration_ms"] = round((time.perf_counter() - self._t0) * 1000, 2)
        self._log.write(d)
