"""The audit log's hash chain: how the server links its lines and how `facemux audit verify`
checks them. Standard library only, so the verifier installs with the client alone.

Every line is one JSON object carrying `seq` (1, 2, ... across restarts and rotated files)
and `prev`, the SHA-256 (hex) of the previous line's bytes without its newline; the first
line of a log has `prev` = GENESIS. An edited line no longer hashes to the next line's
`prev`; a removed line leaves a gap in `seq`; lines moved around break both. What the chain
cannot show by itself is the newest lines cut off the end: compare the head (last `seq` and
hash) with one kept elsewhere (the server logs it when it closes the audit log).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

GENESIS = "0" * 64


def line_hash(line: bytes) -> str:
    return hashlib.sha256(line).hexdigest()


def chain_line(entry: dict[str, Any], seq: int, prev: str) -> str:
    """The line (no newline) that records `entry` as link `seq` after the line hashing to
    `prev`. ASCII-only JSON with sorted keys, so the bytes written are the bytes hashed."""
    return json.dumps({**entry, "seq": seq, "prev": prev}, sort_keys=True, separators=(",", ":"))


def link_of(line: bytes) -> tuple[int, str] | None:
    """(seq, prev) of a chained line; None if it is not one."""
    try:
        obj = json.loads(line)
    except ValueError:
        return None
    if not isinstance(obj, dict):
        return None
    seq, prev = obj.get("seq"), obj.get("prev")
    if not isinstance(seq, int) or isinstance(seq, bool) or seq < 1 or not isinstance(prev, str):
        return None
    return seq, prev


def last_line(path: Path, block: int = 64 << 10) -> bytes | None:
    """The last non-empty line of a file, None when it has none."""
    try:
        with path.open("rb") as f:
            f.seek(0, 2)
            end = f.tell()
            start = max(0, end - block)
            while True:
                f.seek(start)
                tail = f.read(end - start).rstrip(b"\n")
                if b"\n" in tail or start == 0:
                    line = tail.rsplit(b"\n", 1)[-1]
                    return line or None
                start = max(0, start - block)
    except FileNotFoundError:
        return None


def rotated_files(path: Path) -> list[Path]:
    """`path` and its rotated predecessors (path.1 is newer than path.2), oldest first. A
    missing one in between is not skipped silently: the chain shows the gap."""
    older = []
    for p in path.parent.glob(path.name + ".*"):
        suffix = p.name[len(path.name) + 1 :]
        if suffix.isdigit():
            older.append((int(suffix), p))
    return [p for _, p in sorted(older, reverse=True)] + [path]


@dataclass
class ChainReport:
    ok: bool
    lines: int
    first_seq: int  # > 1 when older lines were rotated away (or removed from the start)
    last_seq: int
    head: str  # hash of the last line checked: keep it to detect lines cut off the end
    problem: str = ""  # "" when ok, else what is wrong
    where: str = ""  # file:line of the first line that breaks the chain

    def __str__(self) -> str:
        if not self.ok:
            return f"BROKEN at {self.where}: {self.problem}"
        if not self.lines:
            return "OK: empty"
        start = "" if self.first_seq == 1 else " (earlier lines are in older files)"
        return (
            f"OK: {self.lines} lines, seq {self.first_seq}..{self.last_seq}{start}; "
            f"head sha256 {self.head}"
        )


def verify(paths: Sequence[Path]) -> ChainReport:
    """Check that `paths` (oldest first) hold one unbroken chain."""
    prev_hash, prev_seq, first_seq, count = "", 0, 0, 0

    def broken(where: str, problem: str) -> ChainReport:
        return ChainReport(False, count, first_seq, prev_seq, prev_hash, problem, where)

    for path in paths:
        raw = path.read_bytes()
        rows = raw.split(b"\n")
        if rows and rows[-1] == b"":
            rows.pop()
        for i, line in enumerate(rows, 1):
            where = f"{path}:{i}"
            link = link_of(line)
            if link is None:
                return broken(where, "not a chained audit line (no JSON object with seq and prev)")
            seq, prev = link
            if not count:
                first_seq = seq
                if seq == 1 and prev != GENESIS:
                    return broken(where, "seq 1 must start the chain (prev = genesis)")
            elif seq != prev_seq + 1:
                gap = seq - prev_seq - 1
                what = f"{gap} line(s) removed before it" if gap > 0 else "lines out of order"
                return broken(where, f"seq {seq} follows seq {prev_seq}: {what}")
            elif prev != prev_hash:
                return broken(
                    where,
                    f"prev does not match the hash of seq {prev_seq}: that line was edited "
                    "(or replaced)",
                )
            prev_hash, prev_seq, count = line_hash(line), seq, count + 1
    return ChainReport(True, count, first_seq, prev_seq, prev_hash)
