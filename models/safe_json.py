"""Parsing JSON that came from outside the process (checkpoint headers, uploaded metadata,
operator files).

``json.loads`` recurses once per nesting level, so a few hundred kilobytes of ``[[[[...``
raise RecursionError, which no caller expects and a server would answer with INTERNAL.
And a document that parses just below the interpreter's limit still breaks whatever walks
it next (``json.dumps``, protobuf conversion). So nesting is measured before parsing, with
a scan that does not recurse, and anything deeper than any facemux document needs is
refused as bad input.
"""

from __future__ import annotations

import json
import re
from typing import Any

import numpy as np

from .errors import FacemuxError, InvalidInputError

__all__ = ["MAX_JSON_DEPTH", "loads", "nesting_depth"]

# facemux's own documents nest 4 levels at most (a checkpoint's metadata summary, a
# callers entry); 64 leaves room for anything legitimate a user puts in a summary.
MAX_JSON_DEPTH = 64

# A JSON string literal: brackets inside one do not nest. Unrolled, so the regex engine
# does not backtrack per character; the closing quote is optional, so an unterminated
# string runs to the end in one match instead of being retried from every later quote
# (quadratic on a quote followed by a long run of escaped quotes).
_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"?', re.DOTALL)
_OPEN = (ord("["), ord("{"))
_CLOSE = (ord("]"), ord("}"))


def nesting_depth(data: str | bytes | bytearray | memoryview) -> int:
    """The deepest nesting of arrays and objects in ``data``, without parsing it.

    Exact for valid JSON; for invalid JSON (an unterminated string, unbalanced brackets) a
    bound good enough to refuse it early, since the parser refuses it anyway."""
    raw = data.encode("utf-8", "surrogatepass") if isinstance(data, str) else bytes(data)
    if raw.count(b"[") + raw.count(b"{") == 0:
        return 0
    bare = _STRING.sub(b"", raw)
    opens = bare.count(b"[") + bare.count(b"{")
    if opens <= 1:
        return opens
    arr = np.frombuffer(bare, np.uint8)
    step = np.isin(arr, _OPEN).astype(np.int32) - np.isin(arr, _CLOSE).astype(np.int32)
    return int(np.cumsum(step).max())


def loads(
    data: str | bytes | bytearray | memoryview,
    what: str,
    *,
    error: type[FacemuxError] = InvalidInputError,
    max_depth: int = MAX_JSON_DEPTH,
) -> Any:
    """``json.loads`` for untrusted text: any failure is ``error`` (bad input), with a
    message that starts with ``what`` and says what is wrong."""
    depth = nesting_depth(data)
    if depth > max_depth:
        raise error(
            f"{what} is not acceptable JSON: it nests {depth} levels deep, at most "
            f"{max_depth} are allowed"
        )
    try:
        return json.loads(bytes(data) if isinstance(data, (bytearray, memoryview)) else data)
    except RecursionError:  # cannot happen below max_depth; kept as the last line of defence
        raise error(f"{what} is not acceptable JSON: it nests too deeply") from None
    except ValueError as exc:  # JSONDecodeError and UnicodeDecodeError
        raise error(f"{what} is not JSON ({exc})") from None
