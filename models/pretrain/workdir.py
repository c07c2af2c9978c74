"""The work directory of one run: what goes in, what comes out, and how the two sides
talk while it runs.

::

    spec.json           what to train (JobSpec)
    data/<name>.npy     uint8 (N, R, R, 3) RGB aligned faces per identity
    data/<name>.landmarks.json   per face, its 5 or 68 points in crop pixels, or null
    encoder.safetensors identity mode: the shared encoder to train against
    checkpoint.pt       weights + optimiser + sampler state, replaced atomically
    events.jsonl        progress, checkpoints, notes, the final outcome (rank 0 appends)
    progress.json       the latest progress event (read by GetJob without parsing the log)
    result.json         written once the run ends: succeeded / failed / cancelled / paused
    preview.png         input | reconstruction | swap of the first faces, at each checkpoint
    out/                the trained encoder and decoders (safetensors) when it succeeded
    cancel, pause       control files: checkpoint and stop (pause = the server is going away
                        and will resume the run later)
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .. import checkpoint
from ..errors import InvalidInputError
from .spec import JobSpec

__all__ = [
    "RunFiles",
    "load_faces",
    "load_landmarks",
    "prepare_work_dir",
    "read_events",
    "read_spec",
]


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def prepare_work_dir(
    work_dir: Path,
    spec: JobSpec,
    datasets: dict[str, np.ndarray],
    encoder_bytes: bytes | None = None,
    landmarks: dict[str, list[Any]] | None = None,
) -> None:
    """Lay out a fresh work directory (used by the job manager, benchmarks and the CLI).
    ``landmarks[name]``: per face of that dataset, its (5 or 68, 2) points in crop pixels,
    or None."""
    spec.validate()
    (work_dir / "data").mkdir(parents=True, exist_ok=True)
    for name, arr in datasets.items():
        buf = io.BytesIO()
        np.save(buf, np.ascontiguousarray(arr, dtype=np.uint8))
        checkpoint.atomic_write(work_dir / "data" / f"{name}.npy", buf.getvalue())
    for name, lms in (landmarks or {}).items():
        rows = [None if lm is None else np.asarray(lm, dtype=float).round(3).tolist() for lm in lms]
        checkpoint.atomic_write(
            work_dir / "data" / f"{name}.landmarks.json", json.dumps(rows).encode()
        )
    if encoder_bytes is not None:
        checkpoint.atomic_write(work_dir / "encoder.safetensors", encoder_bytes)
    checkpoint.atomic_write(
        work_dir / "spec.json", json.dumps(asdict(spec), indent=2, sort_keys=True).encode()
    )


def read_spec(work_dir: Path) -> JobSpec:
    return JobSpec.from_dict(json.loads((work_dir / "spec.json").read_text()))


def load_faces(work_dir: Path, dataset: str, res: int) -> torch.Tensor:
    path = work_dir / "data" / f"{dataset}.npy"
    arr = np.load(path)
    if arr.dtype != np.uint8 or arr.ndim != 4 or arr.shape[-1] != 3 or arr.shape[0] < 1:
        raise InvalidInputError(f"{path.name}: expected uint8 (N,R,R,3) faces, got {arr.shape}")
    if arr.shape[1:3] != (res, res):
        import cv2  # only when a dataset was made for another resolution

        arr = np.stack([cv2.resize(a, (res, res), interpolation=cv2.INTER_AREA) for a in arr])
    return torch.from_numpy(np.ascontiguousarray(arr))


def load_landmarks(work_dir: Path, dataset: str, res: int) -> list[Any] | None:
    """The dataset's landmarks scaled to ``res`` crops, or None when it kept none."""
    path = work_dir / "data" / f"{dataset}.landmarks.json"
    if not path.exists():
        return None
    # In the dataset's crop pixels; the faces may have been resized to the model's.
    size = np.load(work_dir / "data" / f"{dataset}.npy", mmap_mode="r").shape[1]
    k = res / size
    return [
        None if lm is None else (np.asarray(lm, dtype=np.float64) * k)
        for lm in json.loads(path.read_text())
    ]


def read_events(work_dir: Path, offset: int = 0) -> tuple[list[dict[str, Any]], int]:
    """Complete event lines from byte ``offset`` on, and the offset after them (a line still
    being written is left for the next read)."""
    path = Path(work_dir) / "events.jsonl"
    try:
        with open(path, "rb") as fh:
            fh.seek(offset)
            data = fh.read()
    except FileNotFoundError:
        return [], offset
    end = data.rfind(b"\n") + 1
    out = []
    for line in data[:end].splitlines():
        with contextlib.suppress(ValueError):
            out.append(json.loads(line))
    return out, offset + end


class RunFiles:
    """Rank-aware writes into the work directory: rank 0 alone writes, every other rank's
    calls do nothing, so the run's code need not ask which rank it is."""

    def __init__(self, work_dir: Path, rank: int) -> None:
        self.dir = work_dir
        self.rank = rank
        # The process that started this one: the server itself, or the fork server that the
        # server started (which exits with it). Either way it changes when the server dies.
        self._launcher = os.getppid()

    def event(self, kind: str, **payload: Any) -> None:
        if self.rank != 0:
            return
        ev = {"type": kind, "time": _now(), **payload}
        line = (json.dumps(ev, sort_keys=True, allow_nan=False) + "\n").encode()
        # One write of a whole line in append mode: a reader never sees half an event
        # unless the process dies mid-write, and read_events skips an unterminated line.
        with open(self.dir / "events.jsonl", "ab") as fh:
            fh.write(line)
            fh.flush()
            os.fsync(fh.fileno())
        if kind == "progress":
            checkpoint.atomic_write(self.dir / "progress.json", line)

    def write(self, name: str, data: bytes) -> bool:
        """Replace ``name`` atomically (rank 0 only); whether this rank wrote it."""
        if self.rank != 0:
            return False
        checkpoint.atomic_write(self.dir / name, data)
        return True

    def result(self, payload: dict[str, Any]) -> None:
        self.write("result.json", json.dumps(payload, sort_keys=True).encode())

    def control(self, parent_pid: int) -> str:
        """What the control files (or a vanished parent) ask for: "", "cancelled" or
        "paused"."""
        if (self.dir / "cancel").exists():
            return "cancelled"
        if (self.dir / "pause").exists():
            return "paused"
        if parent_pid and (os.getppid() != self._launcher or not _alive(parent_pid)):
            return "paused"  # the server died: keep the checkpoint for its successor
        return ""


def _alive(pid: int) -> bool:
    """Whether a process with this pid exists (one that is not ours to signal still does)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
