"""Request ids: one per call of every facemux RPC, the caller's or one the server makes.

The caller sends its id in the request metadata `x-request-id`; the server answers with the
id in the response headers (before any response or error), logs it, writes it to the audit
trail and marks outputs with it. One mechanism for every RPC, so a caller can trace any call
the same way (types.proto, "Request ids").
"""

from __future__ import annotations

import contextvars
import uuid
from collections.abc import Iterable
from typing import Any

HEADER = "x-request-id"
MAX_CHARS = 128

# The id of the call being handled, set before its handler runs.
current_request_id: contextvars.ContextVar[str] = contextvars.ContextVar(
    "facemux_request_id", default=""
)


def new_request_id() -> str:
    return uuid.uuid4().hex


def from_metadata(metadata: Iterable[tuple[str, Any]]) -> tuple[str, str]:
    """(request id, problem): the caller's id when it is usable, else a new one and why the
    caller's was refused ("" when it sent none or a good one)."""
    values = [v for k, v in metadata if k == HEADER]
    if not values:
        return new_request_id(), ""
    if len(values) > 1:
        return new_request_id(), f"metadata {HEADER} was sent {len(values)} times; send it once"
    value = values[0]
    if (
        not isinstance(value, str)
        or not 1 <= len(value) <= MAX_CHARS
        or not all("!" <= c <= "~" for c in value)
    ):
        return new_request_id(), (
            f"metadata {HEADER} must be 1-{MAX_CHARS} visible ASCII characters without spaces"
        )
    return value, ""
