"""Authentication, roles and per-caller limits for every facemux RPC.

Callers are configured by the operator in a JSON-lines file (setting `auth_tokens_file`),
one object per line:

    {"name": "render-farm", "hash": "scrypt$16384$8$1$<salt>$<hash>", "roles": ["swap"]}
    {"name": "ops-cert", "subject": "ops.example.com", "roles": ["admin"]}

Tokens are never stored in plain text: `facemux tokens hash` makes an entry. A token reads
`<name>.<secret>`, so the server finds the one entry to check without trying every salted
hash, and compares digests in constant time. With `auth = "mtls"` the caller is the common
name of its (already verified) client certificate, matched against `subject` entries.

Health and reflection stay open so probes and tooling work without credentials.
"""

from __future__ import annotations

import asyncio
import base64
import contextvars
import functools
import hashlib
import hmac
import inspect
import ipaddress
import logging
import re
import secrets
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import grpc
from facemux.models import safe_json
from facemux.models.errors import (
    FacemuxError,
    InvalidInputError,
    PermissionDeniedError,
    ResourceExhaustedError,
    UnauthenticatedError,
)
from facemux.service import boundary, request_ids
from facemux.service.errors import status_for

log = logging.getLogger(__name__)

ROLES = ("swap", "train", "admin")
# Any authenticated caller, whatever its roles (read-only calls).
ANY_ROLE = "any"

_SWAP = "/facemux.v1.SwapService/"
_IDENT = "/facemux.v1.IdentityService/"
_TRAIN = "/facemux.v1.TrainingService/"

# Full method name -> role it needs. Methods of facemux services that are missing here need
# `admin` (fail closed: a new RPC is not open until someone decides who may call it).
METHOD_ROLES: dict[str, str] = {
    _SWAP + "Swap": "swap",
    _SWAP + "SwapStream": "swap",
    _SWAP + "Encode": "swap",
    _SWAP + "Decode": "swap",
    _SWAP + "GetModelInfo": ANY_ROLE,
    _IDENT + "ListIdentities": ANY_ROLE,
    _IDENT + "GetIdentity": ANY_ROLE,
    _IDENT + "RegisterIdentity": "admin",
    _IDENT + "DeleteIdentity": "admin",
    _IDENT + "SetDefaultVersion": "admin",
    _IDENT + "RevokeConsent": "admin",
    _IDENT + "RecordConsent": "admin",
    _TRAIN + "UploadDataset": "train",
    _TRAIN + "ListDatasets": "train",
    _TRAIN + "DeleteDataset": "train",
    _TRAIN + "Train": "train",
    _TRAIN + "WatchJob": "train",
    _TRAIN + "GetJob": "train",
    _TRAIN + "ListJobs": "train",
    _TRAIN + "CancelJob": "train",
    # Anyone may check an image's provenance marks.
    "/facemux.v1.ProvenanceService/Verify": ANY_ROLE,
}
# Largest request message per method, checked on its raw bytes before it is parsed (gRPC
# itself only knows one limit for all methods, max_message_bytes). None = max_message_bytes:
# calls that carry images, frames, faces or latents. Methods not listed are control calls.
CONTROL_MESSAGE_BYTES = 64 << 10
MESSAGE_LIMITS: dict[str, int | None] = {
    _SWAP + "Swap": None,
    _SWAP + "SwapStream": None,  # per frame
    _SWAP + "Encode": None,
    _SWAP + "Decode": None,
    "/facemux.v1.ProvenanceService/Verify": None,
    _IDENT + "RegisterIdentity": 4 << 20,  # per chunk of the checkpoint (clients send 1 MiB)
    _TRAIN + "UploadDataset": 32 << 20,  # per photo
}


def message_limit(method: str, max_message_bytes: int) -> int:
    """The largest request message `method` accepts."""
    limit = MESSAGE_LIMITS.get(method, CONTROL_MESSAGE_BYTES)
    return max_message_bytes if limit is None else min(limit, max_message_bytes)


OPEN_PREFIXES = (
    "/grpc.health.v1.Health/",
    "/grpc.reflection.v1alpha.ServerReflection/",
    "/grpc.reflection.v1.ServerReflection/",
)

# \Z, not $: "$" also matches before a trailing newline.
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}\Z")
# Interactive-grade scrypt cost: ~50 ms per check, done once per token (then cached).
_SCRYPT_N, _SCRYPT_R, _SCRYPT_P = 16384, 8, 1
_MAX_TOKEN_CHARS = 512

# The caller of the RPC being handled (token name or certificate subject), for audit/logs.
current_caller: contextvars.ContextVar[str] = contextvars.ContextVar(
    "facemux_caller", default="anonymous"
)


def required_role(method: str) -> str | None:
    """The role a full method name needs; None for the open services."""
    if method.startswith(OPEN_PREFIXES):
        return None
    return METHOD_ROLES.get(method, "admin")


# -- hashing ----------------------------------------------------------------------------------


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def hash_token(token: str, scheme: str = "scrypt") -> str:
    """A storable hash of `token`: scrypt (salted, slow) or sha256 (for long random tokens)."""
    if scheme == "sha256":
        return "sha256$" + hashlib.sha256(token.encode()).hexdigest()
    if scheme != "scrypt":
        raise ValueError("scheme must be scrypt or sha256")
    salt = secrets.token_bytes(16)
    digest = hashlib.scrypt(
        token.encode(), salt=salt, n=_SCRYPT_N, r=_SCRYPT_R, p=_SCRYPT_P, dklen=32
    )
    return f"scrypt${_SCRYPT_N}${_SCRYPT_R}${_SCRYPT_P}${_b64(salt)}${_b64(digest)}"


def check_hash(token: str, stored: str) -> bool:
    """Does `token` match the stored hash? Constant time in the digest comparison."""
    parts = stored.split("$")
    try:
        if parts[0] == "sha256" and len(parts) == 2:
            got = hashlib.sha256(token.encode()).hexdigest()
            return hmac.compare_digest(got, parts[1].lower())
        if parts[0] == "scrypt" and len(parts) == 6:
            n, r, p = int(parts[1]), int(parts[2]), int(parts[3])
            salt, want = base64.b64decode(parts[4]), base64.b64decode(parts[5])
            got_b = hashlib.scrypt(
                token.encode(), salt=salt, n=n, r=r, p=p, dklen=len(want), maxmem=64 << 20
            )
            return hmac.compare_digest(got_b, want)
    except (ValueError, TypeError):
        return False
    return False


def new_token(name: str) -> str:
    if not _NAME.match(name):
        raise ValueError(f"caller name {name!r}: use 1-64 letters, digits, '_' or '-'")
    return f"{name}.{secrets.token_urlsafe(32)}"


def make_entry(
    name: str,
    roles: Iterable[str],
    token: str | None = None,
    scheme: str = "scrypt",
    expires_at: str = "",
) -> tuple[dict[str, Any], str]:
    """A tokens-file entry for `name` and the token it accepts (a new one unless given),
    valid until `expires_at` (ISO-8601 with a time zone) when that is set."""
    roles = sorted(set(roles))
    bad = [r for r in roles if r not in ROLES]
    if bad or not roles:
        raise ValueError(f"roles {bad or '(none)'}: choose from {', '.join(ROLES)}")
    token = token or new_token(name)
    if not token.startswith(name + "."):
        raise ValueError(f"a token for {name!r} must read '{name}.<secret>'")
    entry: dict[str, Any] = {"name": name, "hash": hash_token(token, scheme), "roles": roles}
    if expires_at:
        try:
            when = parse_expiry(expires_at, f"expiry of {name}")
        except InvalidInputError as exc:
            raise ValueError(str(exc)) from None
        if when <= time.time():
            raise ValueError(f"expiry {expires_at} is in the past")
        entry["expires_at"] = expires_at
    return entry, token


def parse_expiry(value: object, where: str) -> float:
    """Seconds since the epoch of an ISO-8601 time that names its time zone."""
    try:
        when = datetime.fromisoformat(str(value).replace("Z", "+00:00"))
    except ValueError:
        raise InvalidInputError(
            f"{where}: {value!r} is not an ISO-8601 time (e.g. 2027-01-31T00:00:00Z)"
        ) from None
    if when.tzinfo is None:
        raise InvalidInputError(f"{where}: {value!r} needs a time zone (e.g. a trailing Z)")
    return when.timestamp()


@functools.cache
def _dummy_hash() -> str:
    """A hash no token matches, with the default scrypt cost: checked for names that are
    not configured, so that an unknown name costs the same time as a known one."""
    return hash_token(secrets.token_urlsafe(32))


# -- the callers file -------------------------------------------------------------------------


@dataclass(frozen=True)
class Caller:
    name: str
    roles: frozenset[str]
    hash: str = ""
    subject: str = ""
    expires_at: float = 0.0  # seconds since the epoch; 0 = never
    expires_text: str = ""  # as written in the file, for messages


def parse_callers(text: str, where: str = "tokens file") -> dict[str, Caller]:
    """Entries from a JSON-lines (or JSON array) callers file, by name."""
    stripped = text.strip()
    rows: list[Any]
    if stripped.startswith("["):
        rows = safe_json.loads(stripped, where)
        if not isinstance(rows, list):
            raise InvalidInputError(f"{where}: expected a JSON array")
    else:
        rows = []
        for i, line in enumerate(text.splitlines(), 1):
            if line.strip() and not line.lstrip().startswith("#"):
                rows.append(safe_json.loads(line, f"{where} line {i}"))
    out: dict[str, Caller] = {}
    for row in rows:
        if not isinstance(row, dict):
            raise InvalidInputError(f"{where}: every entry must be a JSON object")
        name, roles = str(row.get("name", "")), row.get("roles", [])
        if not _NAME.match(name):
            raise InvalidInputError(f"{where}: caller name {name!r} is not valid")
        if "token" in row:
            raise InvalidInputError(
                f"{where}: {name} has a plain-text token; store its hash "
                "(facemux tokens hash) instead"
            )
        if not isinstance(roles, list) or any(r not in ROLES for r in roles):
            raise InvalidInputError(f"{where}: {name} roles must be a list of {ROLES}")
        hashed, subject = str(row.get("hash", "")), str(row.get("subject", ""))
        if not hashed and not subject:
            raise InvalidInputError(f"{where}: {name} needs a hash or a certificate subject")
        if hashed and not hashed.startswith(("scrypt$", "sha256$")):
            raise InvalidInputError(f"{where}: {name} hash must be scrypt$... or sha256$...")
        if name in out:
            raise InvalidInputError(f"{where}: caller {name} is listed twice")
        expires_text = str(row.get("expires_at") or "")
        expires = parse_expiry(expires_text, f"{where}: {name} expires_at") if expires_text else 0.0
        out[name] = Caller(name, frozenset(roles), hashed, subject, expires, expires_text)
    return out


def _key(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


class CallerRegistry:
    """The callers file, re-read when it changes (no restart to add or revoke a token).

    Tokens that passed the slow hash are remembered with the hash they matched: they stay
    verified across reloads for as long as their caller's entry keeps that hash (a removed
    or re-keyed caller is refused at once; new roles or expiry apply at once). Tokens that
    failed are remembered for `failed_ttl` seconds, so repeating one costs no hash."""

    _CACHE = 4096

    def __init__(self, path: Path, failed_ttl: float = 60.0, reload_s: float = 1.0) -> None:
        self.path = path
        self.failed_ttl = failed_ttl
        self.reload_s = reload_s
        self._stamp: tuple[float, int] | None = None
        self._checked = 0.0
        self._callers: dict[str, Caller] = {}
        # sha256(token) -> (caller name, the stored hash it matched)
        self._verified: OrderedDict[bytes, tuple[str, str]] = OrderedDict()
        # sha256(token) -> monotonic time until which it is known to be bad
        self._failed: OrderedDict[bytes, float] = OrderedDict()
        self.reload()

    def reload(self) -> None:
        st = self.path.stat()
        callers = parse_callers(self.path.read_text(), str(self.path))
        self._callers, self._stamp = callers, (st.st_mtime, st.st_size)
        # A new entry may make a refused token valid; verified ones are checked at lookup.
        self._failed.clear()

    def _maybe_reload(self) -> None:
        now = time.monotonic()
        if now - self._checked < self.reload_s:
            return
        self._checked = now
        try:
            st = self.path.stat()
            if (st.st_mtime, st.st_size) != self._stamp:
                self.reload()
                log.info("reloaded callers from %s (%d entries)", self.path, len(self._callers))
        except (OSError, InvalidInputError) as exc:
            # Keep the last good table: a half-written file must not lock everyone out.
            log.error("could not reload %s, keeping the previous callers: %s", self.path, exc)

    def lookup(self, token: str) -> tuple[Caller | None, bool]:
        """(caller, known_bad) without hashing: the caller of an already verified token,
        else whether this very token failed within failed_ttl."""
        self._maybe_reload()
        key = _key(token)
        hit = self._verified.get(key)
        if hit is not None:
            caller = self._callers.get(hit[0])
            if caller is not None and caller.hash == hit[1]:
                self._verified.move_to_end(key)
                return caller, False
            del self._verified[key]
        until = self._failed.get(key)
        if until is not None:
            if time.monotonic() < until:
                return None, True
            del self._failed[key]
        return None, False

    def verify(self, token: str) -> Caller | None:
        """Slow path (scrypt), run in a worker thread. A name that is not configured is
        checked against a dummy hash of the same cost, so timing does not tell names apart."""
        caller = self._callers.get(token.split(".", 1)[0])
        if caller is None or not caller.hash:
            check_hash(token, _dummy_hash())
            return None
        return caller if check_hash(token, caller.hash) else None

    def remember(self, token: str, caller: Caller | None) -> None:
        """Record a slow check's outcome (on the event loop, like every lookup)."""
        key = _key(token)
        if caller is not None:
            self._verified[key] = (caller.name, caller.hash)
            self._verified.move_to_end(key)
            while len(self._verified) > self._CACHE:
                self._verified.popitem(last=False)
        else:
            self._failed[key] = time.monotonic() + self.failed_ttl
            while len(self._failed) > self._CACHE:
                self._failed.popitem(last=False)

    def by_subject(self, subject: str) -> Caller | None:
        self._maybe_reload()
        for c in self._callers.values():
            if c.subject and hmac.compare_digest(c.subject.encode(), subject.encode()):
                return c
        return None


# -- rate and stream limits -------------------------------------------------------------------


class RateLimiter:
    """A token bucket per key. Runs on the event loop only, so it needs no lock."""

    def __init__(self, per_second: float, burst: int) -> None:
        self.rate = per_second
        self.burst = float(burst or max(1, int(2 * per_second)))
        self._buckets: dict[str, tuple[float, float]] = {}

    def _level(self, key: str, now: float) -> float:
        tokens, last = self._buckets.get(key, (self.burst, now))
        return min(self.burst, tokens + (now - last) * self.rate)

    def wait(self, key: str) -> float:
        """Seconds until `key` may go ahead (0 = now), taking nothing."""
        if self.rate <= 0:
            return 0.0
        tokens = self._level(key, time.monotonic())
        return 0.0 if tokens >= 1.0 else (1.0 - tokens) / self.rate

    def take(self, key: str) -> float:
        """0 when the call may go ahead (one token taken), else the seconds until it could."""
        if self.rate <= 0:
            return 0.0
        now = time.monotonic()
        tokens = self._level(key, now)
        if len(self._buckets) > 10_000:  # forget keys whose buckets are full again
            full = [k for k, (t, ts) in self._buckets.items() if now - ts > self.burst / self.rate]
            for k in full:
                del self._buckets[k]
        if tokens >= 1.0:
            self._buckets[key] = (tokens - 1.0, now)
            return 0.0
        self._buckets[key] = (tokens, now)
        return (1.0 - tokens) / self.rate

    def refund(self, key: str) -> None:
        """Give back a token taken for work that turned out legitimate."""
        if self.rate > 0 and key in self._buckets:
            now = time.monotonic()
            self._buckets[key] = (min(self.burst, self._level(key, now) + 1.0), now)


class AttemptLimiter:
    """Token checks that need the slow hash (a token not verified before), limited per peer
    address and per claimed caller name BEFORE hashing. A check that succeeds is given back,
    so only failures use the allowance. The name's allowance is `name_factor` times the
    address's, so one address cannot use up a caller's allowance by itself."""

    def __init__(self, per_second: float, burst: int, name_factor: int = 3) -> None:
        self.by_peer = RateLimiter(per_second, burst)
        self.by_name = RateLimiter(per_second * name_factor, burst * name_factor)

    def reserve(self, peer: str, name: str) -> float:
        """0 when a check may run (and counts against both), else the seconds to wait."""
        wait = max(self.by_peer.wait(peer), self.by_name.wait(name))
        if wait <= 0:
            self.by_peer.take(peer)
            self.by_name.take(name)
        return wait

    def refund(self, peer: str, name: str) -> None:
        self.by_peer.refund(peer)
        self.by_name.refund(name)


# -- the guard --------------------------------------------------------------------------------


class Denied(Exception):
    """A call refused before its handler runs, for `error`. `caller` is the verified caller
    (refused for its role or limits), else `claimed` the name its credentials claimed
    without proof."""

    def __init__(self, error: FacemuxError, caller: str = "", claimed: str = "") -> None:
        super().__init__(str(error))
        self.error = error  # what the caller is told, with its status from the one table
        self.caller = caller
        self.claimed = claimed

    @property
    def code(self) -> grpc.StatusCode:
        return status_for(self.error)


AuditHook = Callable[[str, str, Any, grpc.aio.ServicerContext], "CallAudit | None"]
# (method, caller or "(refused)", claimed caller, context, status, reason)
RefusalHook = Callable[[str, str, str, grpc.aio.ServicerContext, grpc.StatusCode, str], None]


class CallAudit:
    """What the audit trail wants to see of one call (filled in by the interceptor)."""

    def observe_request(self, message: Any) -> None: ...

    def observe_response(self, message: Any) -> None: ...

    def finish(self, code: grpc.StatusCode) -> None: ...


def _retry_after(seconds: float) -> int:
    """Whole seconds to wait, at least one."""
    return max(1, int(seconds + 0.999))


def peer_address(context: grpc.aio.ServicerContext) -> str:
    """The peer without its port ("ipv4:10.0.0.7"): one client, however many connections."""
    return (context.peer() or "unknown").rsplit(":", 1)[0]


@dataclass
class Guard:
    """Everything the interceptor checks before a handler runs (and before the request
    message is read)."""

    mode: str  # tokens | mtls | off
    registry: CallerRegistry | None
    limiter: RateLimiter
    max_streams: int
    audit: AuditHook | None = None
    refusals: RefusalHook | None = None
    attempts: AttemptLimiter = field(default_factory=lambda: AttemptLimiter(1.0, 10))
    # Slow checks waiting or running at once, over all addresses and names: bounds how long
    # a new valid token can wait behind a flood from many addresses.
    max_pending_checks: int = 32
    max_message_bytes: int = 64 << 20
    streams: dict[str, int] = field(default_factory=dict)
    # At most two slow (scrypt) checks at once: a flood of made-up tokens then costs two
    # cores at worst, and callers whose tokens are already verified never wait for them.
    slow_checks: asyncio.Semaphore = field(default_factory=lambda: asyncio.Semaphore(2))
    pending_checks: int = 0

    async def authenticate(self, method: str, context: grpc.aio.ServicerContext) -> str:
        """The caller's name, or Denied. Reads metadata and the TLS context only."""
        role = required_role(method)
        if self.mode == "off":
            # Without auth the peer's address stands in for the caller (limits and audit).
            return "anonymous@" + peer_address(context)
        assert self.registry is not None
        caller: Caller | None
        if self.mode == "mtls":
            names = context.auth_context().get("x509_common_name") or []
            subject = names[0].decode(errors="replace")[:256] if names else ""
            if not subject:
                raise Denied(
                    UnauthenticatedError(
                        "this server needs a client certificate (mTLS); none was presented"
                    )
                )
            caller = self.registry.by_subject(subject)
            if caller is None:
                raise Denied(
                    UnauthenticatedError(
                        f"client certificate {subject!r} is not a configured caller"
                    ),
                    claimed=subject,
                )
        else:
            token = _bearer(context.invocation_metadata() or ())
            claimed = token.split(".", 1)[0][:64]
            caller, known_bad = self.registry.lookup(token)
            if caller is None:
                if known_bad:
                    raise Denied(
                        UnauthenticatedError("the bearer token is not valid"), claimed=claimed
                    )
                caller = await self._slow_check(token, claimed, peer_address(context))
        if caller.expires_at and time.time() >= caller.expires_at:
            raise Denied(
                UnauthenticatedError(
                    f"the credentials of {caller.name!r} expired at {caller.expires_text}; "
                    "ask the operator for new ones"
                ),
                claimed=caller.name,
            )
        if role is not None and role != ANY_ROLE and role not in caller.roles:
            raise Denied(
                PermissionDeniedError(
                    f"caller {caller.name!r} lacks the {role!r} role needed for "
                    f"{method.rsplit('/', 1)[-1]}"
                ),
                caller=caller.name,
            )
        return caller.name

    async def _slow_check(self, token: str, claimed: str, peer: str) -> Caller:
        assert self.registry is not None
        if self.pending_checks >= self.max_pending_checks:
            raise Denied(
                ResourceExhaustedError(
                    f"the server is already checking {self.pending_checks} new tokens; retry "
                    "after 1s (setting auth_max_pending_checks)",
                    retry_after=1,
                ),
                claimed=claimed,
            )
        wait = self.attempts.reserve(peer, claimed)
        if wait > 0:
            secs = _retry_after(wait)
            raise Denied(
                ResourceExhaustedError(
                    f"too many failed token checks from {peer} or for caller {claimed!r}; "
                    f"retry after {secs}s (setting auth_attempts_per_second)",
                    retry_after=secs,
                ),
                claimed=claimed,
            )
        self.pending_checks += 1
        try:
            async with self.slow_checks:
                caller = await asyncio.to_thread(self.registry.verify, token)
        finally:
            self.pending_checks -= 1
        self.registry.remember(token, caller)
        if caller is None:
            raise Denied(UnauthenticatedError("the bearer token is not valid"), claimed=claimed)
        self.attempts.refund(peer, claimed)
        return caller

    def admit(self, caller: str) -> None:
        wait = self.limiter.take(caller)
        if wait > 0:
            secs = _retry_after(wait)
            raise Denied(
                ResourceExhaustedError(
                    f"rate limit of {self.limiter.rate:g} calls/s for {caller!r} reached; "
                    f"retry after {secs}s (setting rate_limit_per_second)",
                    retry_after=secs,
                ),
                caller=caller,
            )

    def open_stream(self, caller: str) -> None:
        n = self.streams.get(caller, 0)
        if self.max_streams and n >= self.max_streams:
            raise Denied(
                ResourceExhaustedError(
                    f"{caller!r} already has {n} streams open, the limit "
                    "(setting max_streams_per_caller); close one and retry",
                    retry_after=1,
                ),
                caller=caller,
            )
        self.streams[caller] = n + 1

    def close_stream(self, caller: str) -> None:
        n = self.streams.get(caller, 1) - 1
        if n <= 0:
            self.streams.pop(caller, None)
        else:
            self.streams[caller] = n

    def refused(self, method: str, denied: Denied, context: grpc.aio.ServicerContext) -> None:
        """Every refusal goes to the audit trail, whatever the RPC."""
        if self.refusals is not None:
            caller = denied.caller or "(refused)"
            claimed = "" if denied.caller else denied.claimed
            self.refusals(method, caller, claimed, context, denied.code, str(denied.error))


def _bearer(metadata: Iterable[tuple[str, Any]]) -> str:
    values = [v for k, v in metadata if k == "authorization"]
    if not values:
        raise Denied(
            UnauthenticatedError("no credentials: send metadata 'authorization: Bearer <token>'")
        )
    if len(values) > 1:
        raise Denied(UnauthenticatedError("more than one authorization header"))
    value = values[0] if isinstance(values[0], str) else ""
    scheme, _, token = value.partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        raise Denied(UnauthenticatedError("authorization must read 'Bearer <token>'"))
    if len(token) > _MAX_TOKEN_CHARS or "." not in token or not token.isprintable():
        raise Denied(UnauthenticatedError("the bearer token is malformed"))
    return token


# -- the interceptor --------------------------------------------------------------------------


class GuardInterceptor(boundary.WrappingInterceptor):
    """Authenticates, checks the role, applies the caller's limits and feeds the audit
    trail, all before the request message is read: every guarded method is served as a
    request stream (the same bytes on the wire), so a refused call's body is never received
    past gRPC's flow-control window, let alone parsed. Request messages are parsed here,
    after their size is checked against the method's limit (MESSAGE_LIMITS)."""

    def __init__(self, guard: Guard) -> None:
        super().__init__()
        self.guard = guard

    def wrap(self, handler: grpc.RpcMethodHandler, method: str) -> grpc.RpcMethodHandler:
        if required_role(method) is None:
            return handler
        return _wrap(handler, method, self.guard)


def _decoder(method: str, parse: Callable[[bytes], Any] | None, limit: int) -> Callable[..., Any]:
    rpc = method.rsplit("/", 1)[-1]

    def decode(raw: bytes) -> Any:
        if len(raw) > limit:
            raise ResourceExhaustedError(
                f"a {rpc} request message may be at most {limit} bytes; this one has "
                f"{len(raw)} (per-method limits: README, Security)"
            )
        if parse is None:
            return raw
        try:
            return parse(raw)
        except Exception:
            raise InvalidInputError(f"the {rpc} request is not a valid message") from None

    return decode


async def _decoded(
    requests: AsyncIterator[bytes], decode: Callable[[bytes], Any], audit: CallAudit | None
) -> AsyncIterator[Any]:
    async for raw in requests:
        msg = decode(raw)
        if audit is not None:
            audit.observe_request(msg)
        yield msg


async def _first(
    requests: AsyncIterator[bytes],
    decode: Callable[[bytes], Any],
    audit: CallAudit | None,
    context: grpc.aio.ServicerContext,
) -> Any:
    """The one message of a unary request; a bad one ends the call with its status."""
    try:
        async for msg in _decoded(requests, decode, audit):
            return msg
        raise InvalidInputError("the call ended without a request message")
    except FacemuxError as exc:
        await boundary.fail(context, exc)


def _wrap(handler: grpc.RpcMethodHandler, method: str, guard: Guard) -> grpc.RpcMethodHandler:
    req_stream, resp_stream = handler.request_streaming, handler.response_streaming
    fn: Any = boundary.behaviour(handler)
    streaming = req_stream or resp_stream
    decode = _decoder(
        method, handler.request_deserializer, message_limit(method, guard.max_message_bytes)
    )

    async def begin(context: grpc.aio.ServicerContext) -> tuple[str, CallAudit | None]:
        # The id first, so that even a refused call answers (and is audited) with one.
        rid, bad_id = request_ids.from_metadata(context.invocation_metadata() or ())
        request_ids.current_request_id.set(rid)
        await context.send_initial_metadata(((request_ids.HEADER, rid),))
        try:
            caller = await guard.authenticate(method, context)
            guard.admit(caller)
            if bad_id:
                raise Denied(InvalidInputError(bad_id), caller=caller)
            if streaming:
                guard.open_stream(caller)
        except Denied as d:
            guard.refused(method, d, context)
            await boundary.fail(context, d.error)
        current_caller.set(caller)
        audit = guard.audit(method, caller, None, context) if guard.audit else None
        return caller, audit

    async def request_of(
        requests: AsyncIterator[bytes], audit: CallAudit | None, context: grpc.aio.ServicerContext
    ) -> Any:
        if req_stream:
            return _decoded(requests, decode, audit)
        return await _first(requests, decode, audit, context)

    def end(caller: str, audit: CallAudit | None, exc: BaseException | None, ctx: Any) -> None:
        if streaming:
            guard.close_stream(caller)
        if audit is not None:
            audit.finish(boundary.call_status(exc, ctx))

    if resp_stream and inspect.isasyncgenfunction(fn):

        async def gen(
            requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext
        ) -> AsyncIterator[Any]:
            caller, audit = await begin(context)
            exc: BaseException | None = None
            try:
                request = await request_of(requests, audit, context)
                async for msg in fn(request, context):
                    if audit is not None:
                        audit.observe_response(msg)
                    yield msg
            except BaseException as e:
                exc = e
                raise
            finally:
                end(caller, audit, exc, context)

        wrapped: Any = gen
    else:

        async def coro(requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext) -> Any:
            caller, audit = await begin(context)
            exc: BaseException | None = None
            try:
                request = await request_of(requests, audit, context)
                result = fn(request, context)
                if inspect.isawaitable(result):
                    result = await result
                if audit is not None and result is not None:
                    audit.observe_response(result)
                return result
            except BaseException as e:
                exc = e
                raise
            finally:
                end(caller, audit, exc, context)

        wrapped = coro

    # Always a request stream: the behaviour runs before any request byte is read.
    return boundary.wrap_handler(handler, wrapped, raw_requests=True)


def is_loopback(host: str) -> bool:
    host = host.strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def insecure_tokens_problem(mode: str, host: str, tls_cert: str) -> str:
    """Why these settings would send bearer tokens in clear text, or ""."""
    if mode != "tokens" or tls_cert or is_loopback(host):
        return ""
    return (
        f"auth=tokens without TLS on {host} would send every caller's token in clear text: "
        "set tls_cert and tls_key, or allow_insecure_tokens when something else encrypts "
        "the traffic (a service mesh with mTLS between pods)"
    )


def check_startup(
    mode: str,
    tokens_file: str,
    client_ca: str,
    host: str = "127.0.0.1",
    tls_cert: str = "",
    allow_insecure_tokens: bool = False,
    reload_s: float = 1.0,
) -> CallerRegistry | None:
    """The callers registry for `mode`, or a clear error when the settings cannot work."""
    if mode == "off":
        log.warning("authentication is OFF (auth=off): every caller may use every RPC")
        return None
    if mode == "mtls" and not client_ca:
        raise InvalidInputError(
            "auth=mtls needs tls_client_ca (and tls_cert/tls_key) to verify client certificates"
        )
    problem = insecure_tokens_problem(mode, host, tls_cert)
    if problem and not allow_insecure_tokens:
        raise InvalidInputError(problem)
    if problem:
        log.warning(
            "INSECURE: bearer tokens travel in clear text on %s (allow_insecure_tokens is set); "
            "anyone on the path can read and reuse them",
            host,
        )
    if not tokens_file:
        raise InvalidInputError(
            f"auth={mode} needs auth_tokens_file (callers and their roles; make entries with "
            "`facemux tokens hash`); to run without authentication set auth=off explicitly"
        )
    try:
        return CallerRegistry(Path(tokens_file), reload_s=reload_s)
    except OSError as exc:
        raise InvalidInputError(f"auth_tokens_file {tokens_file}: {exc.strerror}") from None
