"""Datasets of aligned faces, kept in the store directory.

Layout::

    <store>/datasets/<name>/dataset.json       name, resolution, updated_at, face hashes
    <store>/datasets/<name>/faces/<sha256>.png one aligned crop per face

A face's hash is the sha256 of its aligned crop's pixels (plus shape), so the same photo
uploaded twice, or re-encoded losslessly, is one face. The dataset hash is the sha256 over
the sorted face hashes: independent of upload order. Face files are written before
dataset.json names them, atomically, so a crash leaves at worst an unreferenced file.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import shutil
import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np
from facemux.models import faces as fp
from facemux.models.checkpoint import atomic_write
from facemux.models.errors import FacemuxError, NotFoundError
from facemux.models.imageio import resize_square
from facemux.service.frames import build_swapper
from facemux.service.settings import Settings
from facemux.service.store import disk_space, now_iso, validate_name


@dataclass
class DatasetInfo:
    name: str
    faces: int
    content_hash: str
    resolution: int
    updated_at: str


@dataclass
class UploadResult:
    dataset: DatasetInfo
    accepted: int = 0
    duplicates: int = 0
    rejected: list[tuple[int, str]] = field(default_factory=list)


def face_hash(crop: np.ndarray) -> str:
    h = hashlib.sha256(f"{crop.shape}".encode())
    h.update(np.ascontiguousarray(crop).tobytes())
    return h.hexdigest()


def content_hash(hashes: list[str]) -> str:
    return hashlib.sha256("\n".join(sorted(hashes)).encode()).hexdigest()


class DatasetStore:
    def __init__(self, root: Path, settings: Settings) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.settings = settings
        self._swapper: fp.FaceSwapper | None = None
        self._swapper_lock = threading.Lock()
        for p in self.root.iterdir():
            if p.name.startswith(".trash-"):
                shutil.rmtree(p, ignore_errors=True)

    @contextlib.contextmanager
    def _lock(self) -> Iterator[None]:
        with open(self.root / ".lock", "a+") as fh:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh.fileno(), fcntl.LOCK_UN)

    def _dir(self, name: str) -> Path:
        return self.root / validate_name(name, "dataset")

    def _read(self, name: str) -> dict[str, object] | None:
        try:
            text = (self._dir(name) / "dataset.json").read_text()
        except FileNotFoundError:  # never made, or deleted (maybe just now)
            return None
        meta: dict[str, object] = json.loads(text)
        return meta

    @staticmethod
    def _info(meta: dict[str, object]) -> DatasetInfo:
        hashes = list(meta["faces"])  # type: ignore[call-overload]
        return DatasetInfo(
            name=str(meta["name"]),
            faces=len(hashes),
            content_hash=content_hash(hashes),
            resolution=int(meta["resolution"]),  # type: ignore[call-overload]
            updated_at=str(meta["updated_at"]),
        )

    def get(self, name: str) -> DatasetInfo:
        meta = self._read(name)
        if meta is None:
            raise NotFoundError(f"dataset {name!r} does not exist; upload it with UploadDataset")
        return self._info(meta)

    def list_all(self) -> list[DatasetInfo]:
        out = []
        for d in sorted(self.root.iterdir()):
            if d.is_dir() and not d.name.startswith(".") and (d / "dataset.json").exists():
                meta = self._read(d.name)
                if meta is not None:
                    out.append(self._info(meta))
        return out

    def delete(self, name: str) -> None:
        d = self._dir(name)
        with self._lock():
            if not (d / "dataset.json").exists():
                raise NotFoundError(f"dataset {name!r} does not exist")
            trash = self.root / f".trash-{uuid.uuid4().hex}"
            d.rename(trash)
            shutil.rmtree(trash, ignore_errors=True)

    def load_landmarks(self, name: str) -> list[list[list[float]] | None]:
        """Each face's landmarks in crop pixels (None for uploaded crops), in ``load``'s
        order."""
        meta = self._read(name)
        if meta is None:
            raise NotFoundError(f"dataset {name!r} does not exist; upload it with UploadDataset")
        marks = dict(meta.get("landmarks", {}))  # type: ignore[call-overload]
        return [marks.get(h) for h in sorted(meta["faces"])]  # type: ignore[call-overload]

    def load(self, name: str) -> np.ndarray:
        """All faces as uint8 (N, R, R, 3) RGB, in a stable (hash) order."""
        meta = self._read(name)
        if meta is None:
            raise NotFoundError(f"dataset {name!r} does not exist; upload it with UploadDataset")
        faces_dir = self._dir(name) / "faces"
        res = int(meta["resolution"])  # type: ignore[call-overload]
        hashes = sorted(meta["faces"])  # type: ignore[call-overload]
        out = np.empty((len(hashes), res, res, 3), np.uint8)
        for i, h in enumerate(hashes):
            bgr = cv2.imread(str(faces_dir / f"{h}.png"), cv2.IMREAD_COLOR)
            if bgr is None:
                raise NotFoundError(f"dataset {name!r}: face file {h[:12]} is missing")
            out[i] = cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
        return out

    # -- upload ------------------------------------------------------------------------------

    def swapper(self) -> fp.FaceSwapper:
        with self._swapper_lock:
            if self._swapper is None:
                # In-process detection: uploads are not a throughput path, and a second pool
                # of worker processes would idle beside the Swap path's.
                self._swapper = build_swapper(self.settings.replace(detector_processes=0))
            return self._swapper

    def align(
        self, rgb: np.ndarray, aligned: bool, resolution: int
    ) -> tuple[np.ndarray, np.ndarray | None]:
        """The aligned crop of one image and its landmarks in crop pixels: crops are resized
        (no landmarks); photos are detected and aligned (the largest face) at the model
        resolution, as the swap path aligns them, and keep the landmarks found."""
        if aligned:
            return resize_square(rgb, resolution)[0], None
        found = self.swapper().find_faces(rgb)
        if not found:
            raise NotFoundError("no face found")
        face = found[0]  # detectors answer largest first
        assert face.landmarks is not None
        m = fp.align_matrix(face.landmarks, resolution)
        lm = face.landmarks.astype(np.float64) @ m[:, :2].T + m[:, 2]
        return fp.warp_crop(rgb, m, resolution), lm.astype(np.float32)

    def add(
        self,
        name: str,
        resolution: int,
        crops: list[tuple[int, tuple[np.ndarray, np.ndarray | None] | str]],
    ) -> UploadResult:
        """Add aligned crops with their landmarks, if any (or, for an image that failed
        earlier, its rejection reason)."""
        d = self._dir(name)
        with disk_space("the dataset store"), self._lock():
            old = self._read(name)
            written: list[Path] = []
            try:
                return self._add(d, name, resolution, crops, old, written)
            except BaseException:
                # Out of space (or anything else) half way: what this call wrote goes, so a
                # failed upload leaves the dataset as it was.
                for path in written:
                    path.unlink(missing_ok=True)
                if old is None:
                    shutil.rmtree(d, ignore_errors=True)
                raise

    def _add(
        self,
        d: Path,
        name: str,
        resolution: int,
        crops: list[tuple[int, tuple[np.ndarray, np.ndarray | None] | str]],
        old: dict[str, object] | None,
        written: list[Path],
    ) -> UploadResult:
        meta = old or {
            "name": name,
            "resolution": resolution,
            "faces": [],
            "created_at": now_iso(),
        }
        res = int(meta["resolution"])  # type: ignore[call-overload]
        hashes: list[str] = list(meta["faces"])  # type: ignore[call-overload]
        marks: dict[str, list[list[float]]] = dict(meta.get("landmarks", {}))  # type: ignore[call-overload]
        known = set(hashes)
        (d / "faces").mkdir(parents=True, exist_ok=True)
        result = UploadResult(dataset=DatasetInfo(name, 0, "", res, ""))
        for index, item in crops:
            if isinstance(item, str):
                result.rejected.append((index, item))
                continue
            crop, lm = item
            if lm is not None and crop.shape[0] != res:
                lm = lm * (res / crop.shape[0])
            crop = resize_square(crop, res)[0]
            h = face_hash(crop)
            if h in known:
                result.duplicates += 1
                result.rejected.append((index, "duplicate of a face already in the dataset"))
                continue
            ok, buf = cv2.imencode(".png", cv2.cvtColor(crop, cv2.COLOR_RGB2BGR))
            if not ok:
                result.rejected.append((index, "could not be stored"))
                continue
            path = d / "faces" / f"{h}.png"
            written.append(path)
            atomic_write(path, buf.tobytes())
            if lm is not None:
                marks[h] = np.asarray(lm, dtype=float).round(3).tolist()
            known.add(h)
            hashes.append(h)
            result.accepted += 1
        meta["faces"] = hashes
        if marks:
            meta["landmarks"] = marks  # crop pixels, per face hash
        meta["updated_at"] = now_iso()
        atomic_write(d / "dataset.json", json.dumps(meta, indent=1).encode())
        result.dataset = self._info(meta)
        return result


def rejection_reason(exc: BaseException) -> str:
    if isinstance(exc, FacemuxError):
        return str(exc)
    return f"could not be processed ({type(exc).__name__})"
