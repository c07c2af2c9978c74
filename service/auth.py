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
import hashlib
import hmac
import inspect
import logging
import re
import secrets
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
from facemux.models import safe_json
from facemux.models.errors import InvalidInputError

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
OPEN_PREFIXES = (
    "/grpc.health.v1.Health/",
    "/grpc.reflection.v1alpha.ServerReflection/",
    "/grpc.reflection.v1.ServerReflection/",
)

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")
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
    name: str, roles: Iterable[str], token: str | None = None, scheme: str = "scrypt"
) -> tuple[dict[str, Any], str]:
    """A tokens-file entry for `name` and the token it accepts (a new one unless given)."""
    roles = sorted(set(roles))
    bad = [r for r in roles if r not in ROLES]
    if bad or not roles:
        raise ValueError(f"roles {bad or '(none)'}: choose from {', '.join(ROLES)}")
    token = token or new_token(name)
    if not token.startswith(name + "."):
        raise ValueError(f"a token for {name!r} must read '{name}.<secret>'")
    return {"name": name, "hash": hash_token(token, scheme), "roles": roles}, token


# -- the callers file -------------------------------------------------------------------------


@dataclass(frozen=True)
class Caller:
    name: str
    roles: frozenset[str]
    hash: str = ""
    subject: str = ""


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
        out[name] = Caller(name, frozenset(roles), hashed, subject)
    return out


class CallerRegistry:
    """The callers file, re-read when it changes (no restart to add or revoke a token)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._stamp: tuple[float, int] | None = None
        self._checked = 0.0
        self._callers: dict[str, Caller] = {}
        self._verified: OrderedDict[bytes, str] = OrderedDict()  # sha256(token) -> name
        self.reload()

    def reload(self) -> None:
        st = self.path.stat()
        callers = parse_callers(self.path.read_text(), str(self.path))
        self._callers, self._stamp = callers, (st.st_mtime, st.st_size)
        self._verified.clear()  # a removed or changed entry must not stay accepted

    def _maybe_reload(self) -> None:
        now = time.monotonic()
        if now - self._checked < 1.0:
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

    def by_token(self, token: str) -> tuple[Caller | None, bool]:
        """(caller, cached): the caller the token belongs to, or None."""
        self._maybe_reload()
        key = hashlib.sha256(token.encode()).digest()
        name = self._verified.get(key)
        if name is not None and name in self._callers:
            self._verified.move_to_end(key)
            return self._callers[name], True
        return None, False

    def verify(self, token: str) -> Caller | None:
        """Slow path (scrypt): run in a worker thread."""
        name = token.split(".", 1)[0]
        caller = self._callers.get(name)
        if caller is None or not caller.hash or not check_hash(token, caller.hash):
            return None
        key = hashlib.sha256(token.encode()).digest()
        self._verified[key] = name
        while len(self._verified) > 4096:
            self._verified.popitem(last=False)
        return caller

    def by_subject(self, subject: str) -> Caller | None:
        self._maybe_reload()
        for c in self._callers.values():
            if c.subject and hmac.compare_digest(c.subject.encode(), subject.encode()):
                return c
        return None


# -- rate and stream limits -------------------------------------------------------------------


class RateLimiter:
    """A token bucket per caller. Runs on the event loop only, so it needs no lock."""

    def __init__(self, per_second: float, burst: int) -> None:
        self.rate = per_second
        self.burst = float(burst or max(1, int(2 * per_second)))
        self._buckets: dict[str, tuple[float, float]] = {}

    def take(self, key: str) -> float:
        """0 when the call may go ahead, else the seconds until it could."""
        if self.rate <= 0:
            return 0.0
        now = time.monotonic()
        tokens, last = self._buckets.get(key, (self.burst, now))
        tokens = min(self.burst, tokens + (now - last) * self.rate)
        if tokens >= 1.0:
            self._buckets[key] = (tokens - 1.0, now)
            return 0.0
        self._buckets[key] = (tokens, now)
        if len(self._buckets) > 10_000:  # forget callers whose buckets are full again
            full = [k for k, (t, ts) in self._buckets.items() if now - ts > self.burst / self.rate]
            for k in full:
                del self._buckets[k]
        return (1.0 - tokens) / self.rate


# -- the interceptor --------------------------------------------------------------------------


class Denied(Exception):
    def __init__(
        self, code: grpc.StatusCode, message: str, trailers: tuple[tuple[str, str], ...] = ()
    ) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.trailers = trailers


AuditHook = Callable[[str, str, Any, grpc.aio.ServicerContext], "CallAudit | None"]


class CallAudit:
    """What the audit trail wants to see of one call (filled in by the interceptor)."""

    def observe_request(self, message: Any) -> None: ...

    def observe_response(self, message: Any) -> None: ...

    def finish(self, code: grpc.StatusCode) -> None: ...


@dataclass
class Guard:
    """Everything the interceptor checks before a handler runs."""

    mode: str  # tokens | mtls | off
    registry: CallerRegistry | None
    limiter: RateLimiter
    max_streams: int
    audit: AuditHook | None = None
    streams: dict[str, int] = field(default_factory=dict)
    # At most two slow (scrypt) checks at once: a flood of made-up tokens then costs two
    # cores at worst, and callers whose tokens are already verified never wait for them.
    slow_checks: asyncio.Semaphore = field(default_factory=lambda: asyncio.Semaphore(2))

    async def authenticate(self, method: str, context: grpc.aio.ServicerContext) -> str:
        """The caller's name, or Denied."""
        role = required_role(method)
        if self.mode == "off":
            peer = context.peer() or "unknown"
            # Without auth the peer's address stands in for the caller (limits and audit).
            return "anonymous@" + peer.rsplit(":", 1)[0]
        assert self.registry is not None
        caller: Caller | None
        if self.mode == "mtls":
            names = context.auth_context().get("x509_common_name") or []
            subject = names[0].decode(errors="replace") if names else ""
            if not subject:
                raise Denied(
                    grpc.StatusCode.UNAUTHENTICATED,
                    "this server needs a client certificate (mTLS); none was presented",
                )
            caller = self.registry.by_subject(subject)
            if caller is None:
                raise Denied(
                    grpc.StatusCode.PERMISSION_DENIED,
                    f"client certificate {subject!r} is not a configured caller",
                )
        else:
            token = _bearer(context.invocation_metadata() or ())
            caller, _ = self.registry.by_token(token)
            if caller is None:
                async with self.slow_checks:
                    caller = await asyncio.to_thread(self.registry.verify, token)
            if caller is None:
                raise Denied(grpc.StatusCode.UNAUTHENTICATED, "the bearer token is not valid")
        if role is not None and role != ANY_ROLE and role not in caller.roles:
            raise Denied(
                grpc.StatusCode.PERMISSION_DENIED,
                f"caller {caller.name!r} lacks the {role!r} role needed for "
                f"{method.rsplit('/', 1)[-1]}",
            )
        return caller.name

    def admit(self, caller: str) -> None:
        wait = self.limiter.take(caller)
        if wait > 0:
            secs = max(1, int(wait + 0.999))
            raise Denied(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"rate limit of {self.limiter.rate:g} calls/s for {caller!r} reached; "
                f"retry after {secs}s (setting rate_limit_per_second)",
                (("retry-after", str(secs)),),
            )

    def open_stream(self, caller: str) -> None:
        n = self.streams.get(caller, 0)
        if self.max_streams and n >= self.max_streams:
            raise Denied(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"{caller!r} already has {n} streams open, the limit "
                "(setting max_streams_per_caller); close one and retry",
                (("retry-after", "1"),),
            )
        self.streams[caller] = n + 1

    def close_stream(self, caller: str) -> None:
        n = self.streams.get(caller, 1) - 1
        if n <= 0:
            self.streams.pop(caller, None)
        else:
            self.streams[caller] = n


def _bearer(metadata: Iterable[tuple[str, Any]]) -> str:
    values = [v for k, v in metadata if k == "authorization"]
    if not values:
        raise Denied(
            grpc.StatusCode.UNAUTHENTICATED,
            "no credentials: send metadata 'authorization: Bearer <token>'",
        )
    if len(values) > 1:
        raise Denied(grpc.StatusCode.UNAUTHENTICATED, "more than one authorization header")
    value = values[0] if isinstance(values[0], str) else ""
    scheme, _, token = value.partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        raise Denied(grpc.StatusCode.UNAUTHENTICATED, "authorization must read 'Bearer <token>'")
    if len(token) > _MAX_TOKEN_CHARS or "." not in token or not token.isprintable():
        raise Denied(grpc.StatusCode.UNAUTHENTICATED, "the bearer token is malformed")
    return token


class GuardInterceptor(grpc.aio.ServerInterceptor):
    """Authenticates, checks the role, applies the caller's limits and feeds the audit
    trail. Each wrapper is of the same kind as the handler it wraps (see MetricsInterceptor:
    grpc.aio picks how to drive a handler by the kind of function it is)."""

    def __init__(self, guard: Guard) -> None:
        self.guard = guard

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Any],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        handler = await continuation(handler_call_details)
        method = handler_call_details.method
        if handler is None or required_role(method) is None:
            return handler
        return _wrap(handler, method, self.guard)


def _status(exc: BaseException | None, context: grpc.aio.ServicerContext) -> grpc.StatusCode:
    from facemux.service.metrics import _code_for_exception, _context_code

    if exc is None:
        return _context_code(context) or grpc.StatusCode.OK
    return _code_for_exception(exc, context)


async def _observed(it: AsyncIterator[Any], audit: CallAudit | None) -> AsyncIterator[Any]:
    async for msg in it:
        if audit is not None:
            audit.observe_request(msg)
        yield msg


def _wrap(handler: grpc.RpcMethodHandler, method: str, guard: Guard) -> grpc.RpcMethodHandler:
    req_stream, resp_stream = handler.request_streaming, handler.response_streaming
    fn: Any = (
        handler.stream_stream
        if req_stream and resp_stream
        else handler.stream_unary
        if req_stream
        else handler.unary_stream
        if resp_stream
        else handler.unary_unary
    )
    streaming = req_stream or resp_stream

    async def begin(
        request: Any, context: grpc.aio.ServicerContext
    ) -> tuple[str, CallAudit | None, Any]:
        try:
            caller = await guard.authenticate(method, context)
            guard.admit(caller)
            if streaming:
                guard.open_stream(caller)
        except Denied as d:
            if guard.audit is not None and d.code != grpc.StatusCode.RESOURCE_EXHAUSTED:
                # Refused attempts at audited RPCs are part of the trail too.
                refused = guard.audit(method, "(refused)", request, context)
                if refused is not None:
                    refused.finish(d.code)
            await context.abort(d.code, d.message, trailing_metadata=d.trailers)
        current_caller.set(caller)
        audit = guard.audit(method, caller, request, context) if guard.audit else None
        if req_stream:
            request = _observed(request, audit)
        elif audit is not None:
            audit.observe_request(request)
        return caller, audit, request

    def end(caller: str, audit: CallAudit | None, exc: BaseException | None, ctx: Any) -> None:
        if streaming:
            guard.close_stream(caller)
        if audit is not None:
            audit.finish(_status(exc, ctx))

    if resp_stream and inspect.isasyncgenfunction(fn):

        async def gen(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            caller, audit, request = await begin(request, context)
            exc: BaseException | None = None
            try:
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

        async def coro(request: Any, context: grpc.aio.ServicerContext) -> Any:
            caller, audit, request = await begin(request, context)
            exc: BaseException | None = None
            try:
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

    kind = (
        "stream_stream"
        if req_stream and resp_stream
        else "stream_unary"
        if req_stream
        else "unary_stream"
        if resp_stream
        else "unary_unary"
    )
    factory = getattr(grpc, f"{kind}_rpc_method_handler")
    return factory(
        wrapped,
        request_deserializer=handler.request_deserializer,
        response_serializer=handler.response_serializer,
    )


def check_startup(mode: str, tokens_file: str, client_ca: str) -> CallerRegistry | None:
    """The callers registry for `mode`, or a clear error when the settings cannot work."""
    if mode == "off":
        log.warning("authentication is OFF (auth=off): every caller may use every RPC")
        return None
    if mode == "mtls" and not client_ca:
        raise InvalidInputError(
            "auth=mtls needs tls_client_ca (and tls_cert/tls_key) to verify client certificates"
        )
    if not tokens_file:
        raise InvalidInputError(
            f"auth={mode} needs auth_tokens_file (callers and their roles; make entries with "
            "`facemux tokens hash`); to run without authentication set auth=off explicitly"
        )
    try:
        return CallerRegistry(Path(tokens_file))
    except OSError as exc:
        raise InvalidInputError(f"auth_tokens_file {tokens_file}: {exc.strerror}") from None
