"""Datasets of aligned faces, kept in the directory the store names for them
(`Store.datasets_dir`; ``<store>/datasets`` on the local store).

Layout::

    <store>/datasets/<name>/dataset.json       name, resolution, updated_at, face hashes
    <store>/datasets/<name>/faces/<sha256>.png one aligned crop per face
    <store>/datasets/.upload-<id>/             an upload in progress (see Upload)

A face's hash is the sha256 of its aligned crop's pixels (plus shape), so the same photo
uploaded twice, or re-encoded losslessly, is one face. The dataset hash is the sha256 over
the sorted face hashes: independent of upload order. Face files are written before
dataset.json names them, atomically, so a crash leaves at worst an unreferenced file.

An upload is staged on disk as it streams in, never held in memory, and counted against
``max_dataset_faces`` as it goes; it reaches the dataset in one step at its end, or not at
all: a refused, failed or cancelled upload leaves the dataset as it was.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np
from facemux.models import faces as facelib
from facemux.models.checkpoint import atomic_write, fsync_directory
from facemux.models.errors import (
    FacemuxError,
    NotFoundError,
    PreconditionError,
    ResourceExhaustedError,
)
from facemux.models.filelock import file_lock
from facemux.models.imageio import resize_square
from facemux.service.frames import build_swapper
from facemux.service.settings import Settings
from facemux.service.store import disk_space, now_iso, validate_name

STAGING_PREFIX = ".upload-"
# A staging directory untouched this long was left by a crashed server. (Not every one
# found at start: replicas share the store, and another may be uploading right now.)
STAGING_MAX_AGE_S = 3600.0


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
    rejected: list[tuple[int, str]] = field(default_factory=list)
    # Images whose face the dataset already holds: not rejections, counted apart.
    duplicate_indices: list[int] = field(default_factory=list)

    @property
    def duplicates(self) -> int:
        return len(self.duplicate_indices)


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
        self._swapper: facelib.FaceSwapper | None = None
        self._swapper_lock = threading.Lock()
        for p in self.root.iterdir():
            if p.name.startswith(".trash-") or (
                p.name.startswith(STAGING_PREFIX) and _idle_s(p) > STAGING_MAX_AGE_S
            ):
                shutil.rmtree(p, ignore_errors=True)

    def _lock(self) -> contextlib.AbstractContextManager[None]:
        return file_lock(self.root / ".lock")

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

    def swapper(self) -> facelib.FaceSwapper:
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
        m = facelib.align_matrix(face.landmarks, resolution)
        lm = face.landmarks.astype(np.float64) @ m[:, :2].T + m[:, 2]
        return facelib.warp_crop(rgb, m, resolution), lm.astype(np.float32)

    def add(
        self,
        name: str,
        resolution: int,
        crops: list[tuple[int, tuple[np.ndarray, np.ndarray | None] | str]],
    ) -> UploadResult:
        """Add aligned crops (or, for an image that failed earlier, its rejection reason) in
        one step: the staged path of UploadDataset, for callers that have them all at once."""
        upload = self.begin_upload(name, resolution)
        try:
            for index, item in crops:
                upload.add(index, item)
            return upload.commit()
        finally:
            upload.discard()

    def begin_upload(self, name: str, resolution: int) -> Upload:
        """Stage an upload into dataset ``name`` (created at ``resolution`` if new)."""
        meta = self._read(name)
        stored: list[str] = list(meta["faces"]) if meta else []  # type: ignore[call-overload]
        res = int(meta["resolution"]) if meta else resolution  # type: ignore[call-overload]
        staging = self.root / f"{STAGING_PREFIX}{uuid.uuid4().hex}"
        with disk_space("the dataset store"):
            (staging / "faces").mkdir(parents=True)
        return Upload(self, validate_name(name, "dataset"), res, set(stored), staging)

    def _commit(self, upload: Upload) -> UploadResult:
        """Move a staged upload into its dataset in one step (under the store's lock)."""
        d = self._dir(upload.name)
        with disk_space("the dataset store"), self._lock():
            meta = self._read(upload.name)
            created = meta is None
            if meta is None:
                meta = {
                    "name": upload.name,
                    "resolution": upload.resolution,
                    "faces": [],
                    "created_at": now_iso(),
                }
            res = int(meta["resolution"])  # type: ignore[call-overload]
            if res != upload.resolution:
                raise PreconditionError(
                    f"dataset {upload.name!r} was created at {res} px by another upload "
                    f"while this one was staged at {upload.resolution} px; upload again"
                )
            hashes: list[str] = list(meta["faces"])  # type: ignore[call-overload]
            known = set(hashes)
            result = UploadResult(dataset=DatasetInfo(upload.name, 0, "", res, ""))
            result.rejected = list(upload.rejected)
            result.duplicate_indices = list(upload.duplicate_indices)
            new: list[str] = []
            for h, index in upload.staged.items():
                if h in known:  # added by an upload that finished while this one streamed
                    result.duplicate_indices.append(index)
                else:
                    new.append(h)
            self._check_faces(upload.name, len(hashes), len(new))
            marks: dict[str, list[list[float]]] = dict(meta.get("landmarks", {}))  # type: ignore[call-overload]
            fresh = set(new)
            marks.update({h: lm for h, lm in upload.landmarks().items() if h in fresh})
            meta["faces"] = hashes + new
            if marks:
                meta["landmarks"] = marks  # crop pixels, per face hash
            meta["updated_at"] = now_iso()
            result.accepted = len(new)
            result.rejected.sort()
            body = json.dumps(meta, indent=1).encode()
            faces = upload.staging / "faces"
            if created:
                # The whole dataset appears with one rename.
                if d.exists():  # a directory without dataset.json is no dataset: debris
                    trash = self.root / f".trash-{uuid.uuid4().hex}"
                    d.rename(trash)
                    shutil.rmtree(trash, ignore_errors=True)
                for h in set(upload.staged) - fresh:
                    (faces / f"{h}.png").unlink(missing_ok=True)
                upload.landmarks_path.unlink(missing_ok=True)
                atomic_write(upload.staging / "dataset.json", body)
                os.rename(upload.staging, d)
                fsync_directory(self.root)
            else:
                # Face files first, then dataset.json names them: a crash in between
                # leaves unreferenced files, never a reference without its file.
                (d / "faces").mkdir(parents=True, exist_ok=True)
                moved: list[Path] = []
                try:
                    for h in new:
                        os.replace(faces / f"{h}.png", d / "faces" / f"{h}.png")
                        moved.append(d / "faces" / f"{h}.png")
                    fsync_directory(d / "faces")
                    atomic_write(d / "dataset.json", body)
                except BaseException:
                    # Out of space for dataset.json: the dataset stays as it was.
                    for path in moved:
                        path.unlink(missing_ok=True)
                    raise
            result.dataset = self._info(meta)
            return result

    def _check_faces(self, name: str, stored: int, adding: int) -> None:
        limit = self.settings.max_dataset_faces
        if stored + adding > limit:
            raise ResourceExhaustedError(
                f"dataset {name!r} would hold more than {limit} faces (setting "
                f"max_dataset_faces): it has {stored} and this upload adds at least "
                f"{adding}; nothing was added. Delete the dataset or upload to another one"
            )


class Upload:
    """One UploadDataset stream's faces, staged on disk under the datasets root: aligned
    crops as PNG files and landmarks as JSON lines, with only their hashes in memory.
    ``commit`` moves them into the dataset in one step; ``discard`` removes them."""

    def __init__(
        self, store: DatasetStore, name: str, resolution: int, stored: set[str], staging: Path
    ) -> None:
        self.store = store
        self.name = name
        self.resolution = resolution
        self.stored = stored
        self.staging = staging
        self.landmarks_path = staging / "landmarks.jsonl"
        self.staged: dict[str, int] = {}  # face hash -> index of the image it came from
        self.rejected: list[tuple[int, str]] = []
        self.duplicate_indices: list[int] = []
        self.images = 0
        self._lock = threading.Lock()

    def add(self, index: int, item: tuple[np.ndarray, np.ndarray | None] | str) -> None:
        """Stage one image's aligned crop and landmarks (or record why it was rejected).
        Raises ResourceExhaustedError the moment the dataset would pass max_dataset_faces."""
        with self._lock:
            self.images += 1
            if isinstance(item, str):
                self.rejected.append((index, item))
                return
            crop, lm = item
            if lm is not None and crop.shape[0] != self.resolution:
                lm = lm * (self.resolution / crop.shape[0])
            crop = resize_square(crop, self.resolution)[0]
            h = face_hash(crop)
            if h in self.stored or h in self.staged:
                self.duplicate_indices.append(index)
                return
            self.store._check_faces(self.name, len(self.stored), len(self.staged) + 1)
            ok, buf = cv2.imencode(".png", cv2.cvtColor(crop, cv2.COLOR_RGB2BGR))
            if not ok:
                self.rejected.append((index, "could not be stored"))
                return
            with disk_space("the dataset store"):
                _write_durably(self.staging / "faces" / f"{h}.png", buf.tobytes())
                if lm is not None:
                    line = {"h": h, "lm": np.asarray(lm, dtype=float).round(3).tolist()}
                    with open(self.landmarks_path, "a") as fh:
                        fh.write(json.dumps(line) + "\n")
            self.staged[h] = index

    def landmarks(self) -> dict[str, list[list[float]]]:
        out: dict[str, list[list[float]]] = {}
        with contextlib.suppress(FileNotFoundError), open(self.landmarks_path) as fh:
            for line in fh:
                row = json.loads(line)  # written just above, by this server
                out[row["h"]] = row["lm"]
        return out

    def commit(self) -> UploadResult:
        with self._lock:
            result = self.store._commit(self)
        self.discard()  # what is left of the staging directory, if anything
        return result

    def discard(self) -> None:
        with self._lock:
            # A new dataset's staging directory became the dataset itself.
            if self.staging.name.startswith(STAGING_PREFIX):
                shutil.rmtree(self.staging, ignore_errors=True)


def _write_durably(path: Path, data: bytes) -> None:
    with open(path, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())


def _idle_s(path: Path) -> float:
    """Seconds since anything was added to a staging directory."""
    newest = 0.0
    for p in (path, path / "faces", path / "landmarks.jsonl"):
        with contextlib.suppress(OSError):
            newest = max(newest, p.stat().st_mtime)
    return time.time() - newest


def rejection_reason(exc: BaseException) -> str:
    if isinstance(exc, FacemuxError):
        return str(exc)
    return f"could not be processed ({type(exc).__name__})"
