"""The identity store: encoders by fingerprint, identities with numbered decoder versions.

Layout of the local directory backend::

    <root>/encoders/<fingerprint>/encoder.safetensors
    <root>/encoders/DEFAULT                      fingerprint of the default encoder
    <root>/identities/<name>/identity.json       name, display name, default version, consent
                                                 (the record in force and the ones it replaced)
    <root>/identities/<name>/v<N>/decoder.safetensors
    <root>/identities/<name>/v<N>/version.json   fingerprints, sha256, size, source, summary
    <root>/datasets/  <root>/jobs/  <root>/pretrain/<preset>/
                                                 training data and runs (Store.datasets_dir,
                                                 jobs_dir, pretrain_dir; their modules say more)
    <root>/provenance/<name>-chain.pem, <name>-key.pem
                                                 signing keys the server made (Store.keys)

Nothing half-written is ever visible: a new identity or version is assembled in a hidden
staging directory and renamed into place (rename is atomic on POSIX); JSON files are
replaced atomically; deletions rename to a hidden trash directory first. Writers take an
exclusive lock on <root>/.lock and readers a shared one, so several server replicas may
share one directory and a reader never sees an identity half-deleted. Uploads stream into
a hidden staging file (<root>/identities/.staging-*.upload) outside the lock and are
renamed into their version directory under it. Hidden leftovers of a crash (.staging-*,
.trash-*) are swept at open; an upload still being received holds a lock on its file and
is left alone. A write that runs out of disk space removes what it staged at once and
raises ResourceExhaustedError.

Consent belongs to the identity, not to a version: adding a version never changes it, a
revoked identity takes no new version, and only `record_consent` (the RecordConsent RPC, an
admin's audited act) replaces the record in force or lifts a revocation. The rule is checked
here, under the lock, so it holds for every path (uploads, training jobs) and every replica.

Other backends (an object store for clusters) implement the same `Store` interface. No other
module joins paths under the root: what training and provenance keep here they get from
the store.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import re
import shutil
import threading
import uuid
from abc import ABC, abstractmethod
from collections.abc import Callable, Hashable, Iterator
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, BinaryIO

from facemux.models.checkpoint import DecoderMeta, atomic_write, fsync_directory
from facemux.models.errors import (
    InvalidInputError,
    NotFoundError,
    PreconditionError,
    ResourceExhaustedError,
)
from facemux.models.filelock import file_lock
from facemux.service.consent import check_in_force, consent_fields

# \Z, not $: "$" also matches before a trailing newline, which let "name\n" through.
NAME_RE = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,63}\Z")


def validate_name(name: str, what: str = "identity") -> str:
    if not NAME_RE.match(name or "") or ".." in name:
        raise InvalidInputError(
            f"{what} name {name[:80]!r} is invalid: use 1-64 letters, digits, '.', '_' or '-', "
            "not starting with '.' and without '..' or path separators"
        )
    return name


# Out of space, out of quota, or over the process's file size limit: the write cannot
# succeed until an operator acts, which the caller must be told (not an internal error).
_DISK_FULL = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG})


@contextlib.contextmanager
def disk_space(what: str = "the store") -> Iterator[None]:
    """Turn running out of disk space inside the block into ResourceExhaustedError."""
    try:
        yield
    except OSError as exc:
        if exc.errno not in _DISK_FULL:
            raise
        raise ResourceExhaustedError(
            f"{what} is out of disk space ({os.strerror(exc.errno)}); nothing was stored: "
            "free space on the server's store volume (or raise its quota), then retry"
        ) from exc


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@dataclass
class VersionRecord:
    version: int
    created_at: str
    decoder_fingerprint: str
    encoder_fingerprint: str
    preset: str
    resolution: int
    size_bytes: int
    sha256: str
    source: str = "uploaded"  # "uploaded" | "trained"
    job_id: str = ""
    summary: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def for_decoder(
        cls,
        meta: DecoderMeta,
        source: str = "uploaded",
        job_id: str = "",
        summary: dict[str, Any] | None = None,
    ) -> VersionRecord:
        """A record for a validated decoder; the store fills in number, size and sha256."""
        return cls(
            version=0,
            created_at=now_iso(),
            decoder_fingerprint=meta.fingerprint,
            encoder_fingerprint=meta.encoder_fingerprint,
            preset=meta.config.name,
            resolution=meta.config.resolution,
            size_bytes=0,
            sha256="",
            source=source,
            job_id=job_id,
            summary=dict(meta.summary) if summary is None else summary,
        )


@dataclass
class IdentityRecord:
    name: str
    display_name: str
    default_version: int
    created_at: str
    consent: dict[str, str] = field(default_factory=dict)
    versions: list[VersionRecord] = field(default_factory=list)
    # Highest number ever issued: numbers are never reused, so "v3" always means one decoder.
    last_version: int = 0
    # Records that were in force before `consent`, oldest first, each with its replaced_at
    # (and its revocation, if it was revoked): nothing about consent is ever lost.
    consent_history: list[dict[str, str]] = field(default_factory=list)
    # Made when the identity is created: a name deleted and created again is another
    # identity, even within one second (created_at alone cannot tell them apart).
    uid: str = ""

    @property
    def incarnation(self) -> str:
        """What tells this identity from an earlier or later one of the same name."""
        return self.uid or self.created_at

    def version(self, number: int = 0) -> VersionRecord:
        wanted = number or self.default_version
        for v in self.versions:
            if v.version == wanted:
                return v
        have = ", ".join(str(v.version) for v in self.versions) or "none"
        raise NotFoundError(f"identity {self.name!r} has no version {wanted} (versions: {have})")


class Upload:
    """A checkpoint being received into the store's staging area, hashed as it is written.

    Made by `Store.new_upload`; pass it to `Store.add_version`, which moves the file into
    the new version. Closing removes the file if it is still staged (a failed or cancelled
    upload), so use it as a context manager. Writes may come from worker threads while the
    owner closes it: a lock orders them.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.size = 0
        self._hash = hashlib.sha256()
        self._mutex = threading.Lock()
        with disk_space():
            self._file: BinaryIO | None = open(path, "xb")  # noqa: SIM115 - held until close
        # Held while the upload is open: a store opening meanwhile (another replica
        # starting) must not sweep the file away as a crash leftover.
        fcntl.flock(self._file.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        os.fchmod(self._file.fileno(), 0o644)

    @property
    def sha256(self) -> str:
        return self._hash.hexdigest()

    def write(self, data: bytes) -> None:
        with self._mutex, disk_space():
            if self._file is None:
                raise ValueError("write to a closed upload")
            self._file.write(data)
            self._hash.update(data)
            self.size += len(data)

    def flush(self) -> None:
        """Make the bytes durable before the store renames the file into place."""
        with self._mutex, disk_space():
            if self._file is None:
                raise ValueError("flush of a closed upload")
            self._file.flush()
            os.fsync(self._file.fileno())

    def close(self) -> None:
        with self._mutex:
            if self._file is not None:
                with contextlib.suppress(OSError):  # a flush failing here loses nothing kept
                    self._file.close()
                self._file = None
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()

    def __enter__(self) -> Upload:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class KeyStore(ABC):
    """Signing keys the server makes for itself and keeps across restarts (the generated
    C2PA test signer): a certificate chain and its private key per name."""

    @abstractmethod
    def signing_key(
        self, name: str, make: Callable[[], tuple[bytes, bytes]]
    ) -> tuple[bytes, bytes]:
        """(certificate chain PEM, private key PEM) kept under `name`; when there is none yet,
        `make` makes it and it is kept, once: replicas starting together share one pair."""


class LocalKeyStore(KeyStore):
    """``<directory>/<name>-chain.pem`` and ``<name>-key.pem`` (the key readable by its owner
    only)."""

    def __init__(self, directory: Path) -> None:
        self.directory = Path(directory)

    def __str__(self) -> str:
        return str(self.directory)

    def paths(self, name: str) -> tuple[Path, Path]:
        """The files of `name`, for local tools that want them by path (an exported archive)."""
        validate_name(name, "key")
        return self.directory / f"{name}-chain.pem", self.directory / f"{name}-key.pem"

    def _read(self, name: str) -> tuple[bytes, bytes] | None:
        chain, key = self.paths(name)
        try:
            return chain.read_bytes(), key.read_bytes()
        except FileNotFoundError:
            return None

    def signing_key(
        self, name: str, make: Callable[[], tuple[bytes, bytes]]
    ) -> tuple[bytes, bytes]:
        found = self._read(name)
        if found is not None:
            return found
        self.directory.mkdir(parents=True, exist_ok=True)
        # Two replicas making a pair each at once could leave one's chain beside the other's
        # key: the second to take the lock finds the first one's pair.
        with disk_space(), file_lock(self.directory / ".lock"):
            found = self._read(name)
            if found is not None:
                return found
            chain, key = make()
            chain_path, key_path = self.paths(name)
            # The key first: a chain is never there without its key.
            atomic_write(key_path, key, mode=0o600)
            atomic_write(chain_path, chain)
            return chain, key


class Store(ABC):
    """What the server needs from persistent storage.

    Writes that run out of disk space raise ResourceExhaustedError and leave nothing
    behind; reads of something deleted meanwhile raise NotFoundError."""

    @abstractmethod
    def put_encoder(self, data: bytes, fingerprint: str, make_default: bool = True) -> None: ...

    @abstractmethod
    def read_encoder(self, fingerprint: str = "") -> tuple[str, bytes]:
        """(fingerprint, checkpoint bytes); empty fingerprint = the default encoder."""

    @abstractmethod
    def list_encoders(self) -> list[str]: ...

    @abstractmethod
    def new_upload(self) -> Upload:
        """An empty staging file for a checkpoint that arrives in pieces."""

    @abstractmethod
    def add_version(
        self,
        name: str,
        checkpoint: bytes | Upload,
        version: VersionRecord,
        display_name: str = "",
        make_default: bool = False,
        consent: dict[str, str] | None = None,
        expect: str | None = None,
    ) -> IdentityRecord:
        """Store a decoder as the next version; version.version is assigned here.

        `consent` is the record a new identity is created with; for an existing identity it
        must be absent or the record in force (a different one is refused: RecordConsent
        replaces consent). A revoked or expired identity takes no version. `expect`, when not
        None, is what the caller saw earlier: "" = the identity did not exist (it must still
        not), else its `incarnation` (it must still be that one); otherwise
        PreconditionError. An Upload's file is moved (not copied) into the version."""

    @abstractmethod
    def get(self, name: str) -> IdentityRecord: ...

    def stamp(self, name: str) -> Hashable | None:
        """A cheap token that changes whenever the identity's record does (consent, versions,
        default, deletion): a reader that took the stamp *before* `get` may reuse that
        record while the stamp stays equal. None = no cheap check; read the record again."""
        return None

    @abstractmethod
    def list_identities(self) -> list[IdentityRecord]: ...

    @abstractmethod
    def read_decoder(self, name: str, version: int) -> bytes: ...

    @abstractmethod
    def delete(self, name: str, version: int = 0) -> tuple[list[int], bool]: ...

    @abstractmethod
    def set_default(self, name: str, version: int) -> IdentityRecord: ...

    @abstractmethod
    def revoke_consent(self, name: str, reason: str) -> IdentityRecord:
        """Mark the record in force revoked (now); an already revoked one keeps its time."""

    @abstractmethod
    def record_consent(self, name: str, consent: dict[str, str]) -> IdentityRecord:
        """Put a new (validated) record in force, keeping the old one in the history; the
        one way a revocation is lifted."""

    def count_identities(self) -> int:
        return len(self.list_identities())

    # -- beside the identities: training data and runs, and the server's own keys ---------
    # Datasets and jobs are directories: job processes and torchrun ranks read and write
    # them as files, and replicas coordinate through them (file locks, claim files). A
    # backend that keeps identities elsewhere names a directory all replicas share.

    @property
    @abstractmethod
    def keys(self) -> KeyStore: ...

    @abstractmethod
    def datasets_dir(self) -> Path:
        """Where the training datasets live (service/training/datasets.py)."""

    @abstractmethod
    def jobs_dir(self) -> Path:
        """Where training jobs keep their records and work directories
        (service/training/jobs.py)."""

    @abstractmethod
    def pretrain_dir(self, preset: str) -> Path:
        """The work directory of standalone pretraining for `preset`
        (service/training/standalone.py): fixed, so a restarted run resumes."""


def _check_new_version(
    rec: IdentityRecord, consent: dict[str, str] | None, expect: str | None
) -> None:
    """Whether an existing identity may take a new version (see Store.add_version)."""
    if expect is not None and expect != rec.incarnation:
        raise PreconditionError(
            f"identity {rec.name!r} was "
            + ("created" if not expect else "deleted and created again")
            + f" (at {rec.created_at}) after the request that made this version was "
            "accepted; nothing was registered"
        )
    check_in_force(rec.name, rec.consent, consent)


def _in_use(path: Path) -> bool:
    """Whether another open Upload holds this staging file (see Upload)."""
    try:
        with open(path, "rb") as fh:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    except OSError:
        return False
    return False


def _write_json(path: Path, obj: Any) -> None:
    atomic_write(path, json.dumps(obj, indent=2, sort_keys=True).encode())


class LocalStore(Store):
    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self._encoders = self.root / "encoders"
        self._identities = self.root / "identities"
        for d in (self.root, self._encoders, self._identities):
            d.mkdir(parents=True, exist_ok=True)
        # Which lock this thread holds ("" none, "sh", "ex"): a nested _lock is a no-op
        # rather than a second flock on a new descriptor, which would wait on itself.
        self._held = threading.local()
        # flock favours no one: a steady stream of readers keeps a writer waiting for good.
        # A writer of this process holds the gate while it waits, which holds new readers
        # of this process back until it is through.
        self._gate = threading.Lock()
        self._keys = LocalKeyStore(self.root / "provenance")
        with self._lock():
            self._sweep()

    # -- training data and runs, keys -------------------------------------------------------

    @property
    def keys(self) -> LocalKeyStore:
        return self._keys

    def datasets_dir(self) -> Path:
        return self.root / "datasets"

    def jobs_dir(self) -> Path:
        return self.root / "jobs"

    def pretrain_dir(self, preset: str) -> Path:
        return self.root / "pretrain" / validate_name(preset, "preset")

    # -- plumbing -------------------------------------------------------------------------

    @contextlib.contextmanager
    def _lock(self, shared: bool = False) -> Iterator[None]:
        """Exclusive for writers; shared for readers, so that a reader sees an identity
        before or after a write, never between the steps of one (a delete's rename, a new
        version's directory and identity.json)."""
        held = getattr(self._held, "mode", "")
        if held:
            if held == "sh" and not shared:
                raise RuntimeError("store lock upgrade from shared to exclusive")
            yield
            return
        with contextlib.ExitStack() as stack:
            if shared:
                with self._gate:
                    stack.enter_context(file_lock(self.root / ".lock", shared=True))
            else:
                stack.enter_context(self._gate)
                stack.enter_context(file_lock(self.root / ".lock"))
            self._held.mode = "sh" if shared else "ex"
            try:
                yield
            finally:
                self._held.mode = ""

    def _sweep(self) -> None:
        for parent in (self._encoders, self._identities, *self._identities.iterdir()):
            if not parent.is_dir():
                continue
            for p in parent.iterdir():
                if p.name.startswith((".staging-", ".trash-")) or p.name.endswith(".tmp"):
                    if p.is_dir():
                        shutil.rmtree(p, ignore_errors=True)
                    elif not _in_use(p):
                        p.unlink(missing_ok=True)

    def _hidden(self, parent: Path, kind: str) -> Path:
        return parent / f".{kind}-{uuid.uuid4().hex}"

    def _identity_dir(self, name: str) -> Path:
        return self._identities / validate_name(name)

    @contextlib.contextmanager
    def _staging(self, parent: Path) -> Iterator[Path]:
        """A hidden directory to assemble something in; removed unless renamed away."""
        staging = self._hidden(parent, "staging")
        try:
            yield staging
        finally:
            if staging.exists():
                shutil.rmtree(staging, ignore_errors=True)

    def new_upload(self) -> Upload:
        return Upload(self._identities / f".staging-{uuid.uuid4().hex}.upload")

    @contextlib.contextmanager
    def _as_upload(self, checkpoint: bytes | Upload) -> Iterator[Upload]:
        """The caller's Upload as is, or bytes staged in one (removed on the way out)."""
        if isinstance(checkpoint, Upload):
            checkpoint.flush()
            yield checkpoint
            return
        with self.new_upload() as upload:
            upload.write(checkpoint)
            upload.flush()
            yield upload

    # -- encoders -------------------------------------------------------------------------

    def put_encoder(self, data: bytes, fingerprint: str, make_default: bool = True) -> None:
        validate_name(fingerprint, "encoder fingerprint")
        with disk_space(), self._lock():
            final = self._encoders / fingerprint
            if not final.exists():
                with self._staging(self._encoders) as staging:
                    staging.mkdir()
                    atomic_write(staging / "encoder.safetensors", data)
                    os.rename(staging, final)
                fsync_directory(self._encoders)
            if make_default:
                atomic_write(self._encoders / "DEFAULT", fingerprint.encode())

    def list_encoders(self) -> list[str]:
        with self._lock(shared=True):
            return sorted(
                p.name
                for p in self._encoders.iterdir()
                if p.is_dir() and not p.name.startswith(".")
            )

    def read_encoder(self, fingerprint: str = "") -> tuple[str, bytes]:
        with self._lock(shared=True):
            return self._read_encoder(fingerprint)

    def _read_encoder(self, fingerprint: str) -> tuple[str, bytes]:
        if not fingerprint:
            default = self._encoders / "DEFAULT"
            if not default.exists():
                raise NotFoundError(
                    f"the store at {self.root} has no encoder yet: run `facemux demo` or "
                    "train one (pretrain) first"
                )
            fingerprint = default.read_text().strip()
        path = self._encoders / validate_name(fingerprint, "encoder fingerprint")
        if not (path / "encoder.safetensors").exists():
            raise NotFoundError(f"encoder {fingerprint[:16]} is not in the store")
        return fingerprint, (path / "encoder.safetensors").read_bytes()

    # -- identities -----------------------------------------------------------------------

    def _read_identity(self, d: Path) -> IdentityRecord:
        meta = json.loads((d / "identity.json").read_text())
        versions = []
        for vdir in sorted(
            d.glob("v*"), key=lambda p: int(p.name[1:]) if p.name[1:].isdigit() else -1
        ):
            vfile = vdir / "version.json"
            if vfile.exists():
                versions.append(VersionRecord(**json.loads(vfile.read_text())))
        return IdentityRecord(
            name=meta["name"],
            display_name=meta.get("display_name", ""),
            default_version=int(meta["default_version"]),
            created_at=meta["created_at"],
            consent=meta.get("consent", {}),
            versions=versions,
            last_version=int(meta.get("last_version", 0)),
            consent_history=list(meta.get("consent_history", [])),
            uid=str(meta.get("uid", "")),
        )

    def _write_identity_meta(self, d: Path, rec: IdentityRecord) -> None:
        meta = asdict(rec)
        del meta["versions"]
        _write_json(d / "identity.json", meta)

    def get(self, name: str) -> IdentityRecord:
        d = self._identity_dir(name)
        with self._lock(shared=True):
            if not (d / "identity.json").exists():
                raise NotFoundError(
                    f"identity {name!r} does not exist; list them with ListIdentities"
                )
            return self._read_identity(d)

    def stamp(self, name: str) -> Hashable | None:
        # Two stats, no lock. identity.json is only ever replaced (atomic_write: a new file
        # renamed over the old), so its inode changes on every write, however close in time
        # (mtimes can be too coarse to tell two writes apart); a version directory added or
        # removed changes the identity directory's link count and mtime; a deletion makes the
        # stat fail, and a re-creation is a new directory.
        d = self._identity_dir(name)
        try:
            ds, js = os.stat(d), os.stat(d / "identity.json")
        except FileNotFoundError:
            return None
        return (ds.st_ino, ds.st_nlink, ds.st_mtime_ns, js.st_ino, js.st_mtime_ns, js.st_size)

    def count_identities(self) -> int:
        # One directory listing, no JSON parsed and no lock: for metrics, read often.
        if not self._identities.is_dir():
            return 0
        return sum(
            1
            for d in self._identities.iterdir()
            if not d.name.startswith(".") and (d / "identity.json").is_file()
        )

    def list_identities(self) -> list[IdentityRecord]:
        out = []
        with self._lock(shared=True):
            for d in sorted(self._identities.iterdir()):
                if d.is_dir() and not d.name.startswith(".") and (d / "identity.json").exists():
                    out.append(self._read_identity(d))
        return out

    def read_decoder(self, name: str, version: int) -> bytes:
        with self._lock(shared=True):
            v = self.get(name).version(version)
            path = self._identity_dir(name) / f"v{v.version}" / "decoder.safetensors"
            # Opened under the lock, read after it: an open file stays readable if the
            # version is deleted meanwhile, and a long read holds no writer up.
            fh = open(path, "rb")  # noqa: SIM115 - read below, outside the lock
        with fh:
            return fh.read()

    def add_version(
        self,
        name: str,
        checkpoint: bytes | Upload,
        version: VersionRecord,
        display_name: str = "",
        make_default: bool = False,
        consent: dict[str, str] | None = None,
        expect: str | None = None,
    ) -> IdentityRecord:
        d = self._identity_dir(name)
        # The bytes are staged before the lock is taken: only renames happen under it.
        with disk_space(), self._as_upload(checkpoint) as upload, self._lock():
            exists = (d / "identity.json").exists()
            if exists:
                rec = self._read_identity(d)
                _check_new_version(rec, consent, expect)
            else:
                if expect:
                    raise PreconditionError(
                        f"identity {name!r} was deleted after the request that made this "
                        "version was accepted; nothing was registered"
                    )
                if not consent:
                    raise InvalidInputError(f"identity {name!r} is new: it needs a consent record")
                rec = IdentityRecord(
                    name=name,
                    display_name=display_name,
                    default_version=0,
                    created_at=now_iso(),
                    consent=consent_fields(consent),
                    uid=uuid.uuid4().hex,
                )
            used = [v.version for v in rec.versions]
            version.version = max([rec.last_version, *used]) + 1
            rec.last_version = version.version
            version.size_bytes = upload.size
            version.sha256 = upload.sha256
            if display_name:
                rec.display_name = display_name
            if make_default or not rec.default_version:
                rec.default_version = version.version
            rec.versions.append(version)

            self._publish_version(d, exists, rec, version, upload)
            return rec

    def _publish_version(
        self, d: Path, exists: bool, rec: IdentityRecord, version: VersionRecord, upload: Upload
    ) -> None:
        """Move the upload into a new version directory and make it visible; on any failure
        nothing of it stays behind. Call with the lock held."""
        with self._staging(d if exists else self._identities) as staging:
            vdir = staging if exists else staging / f"v{version.version}"
            vdir.mkdir(parents=True)
            os.rename(upload.path, vdir / "decoder.safetensors")
            _write_json(vdir / "version.json", asdict(version))
            if not exists:
                self._write_identity_meta(staging, rec)
                os.rename(staging, d)
                fsync_directory(self._identities)
                return
            final = d / f"v{version.version}"
            os.rename(staging, final)
        fsync_directory(d)
        try:
            # The version directory is complete before identity.json points at it.
            self._write_identity_meta(d, rec)
        except BaseException:
            # Not recorded, so not stored: take the directory back out.
            trash = self._hidden(d, "trash")
            os.rename(final, trash)
            shutil.rmtree(trash, ignore_errors=True)
            raise

    def delete(self, name: str, version: int = 0) -> tuple[list[int], bool]:
        d = self._identity_dir(name)
        with self._lock():
            rec = self.get(name)  # nested: already under the exclusive lock
            if version == 0 or [v.version for v in rec.versions] == [version]:
                if version:
                    rec.version(version)  # NOT_FOUND for a wrong number
                trash = self._hidden(self._identities, "trash")
                os.rename(d, trash)
                fsync_directory(self._identities)
                shutil.rmtree(trash, ignore_errors=True)
                return [v.version for v in rec.versions], True
            v = rec.version(version)
            if v.version == rec.default_version:
                raise PreconditionError(
                    f"version {version} is the default of identity {name!r}; set another "
                    "default version first (SetDefaultVersion) or delete the whole identity"
                )
            trash = self._hidden(d, "trash")
            os.rename(d / f"v{v.version}", trash)
            fsync_directory(d)
            shutil.rmtree(trash, ignore_errors=True)
            return [v.version], False

    def set_default(self, name: str, version: int) -> IdentityRecord:
        with disk_space(), self._lock():
            rec = self.get(name)
            rec.default_version = rec.version(version).version
            self._write_identity_meta(self._identity_dir(name), rec)
            return rec

    def revoke_consent(self, name: str, reason: str) -> IdentityRecord:
        with disk_space(), self._lock():
            rec = self.get(name)
            if not rec.consent.get("revoked_at"):
                rec.consent = {**rec.consent, "revoked_at": now_iso(), "revocation_reason": reason}
                self._write_identity_meta(self._identity_dir(name), rec)
            return rec

    def record_consent(self, name: str, consent: dict[str, str]) -> IdentityRecord:
        with disk_space(), self._lock():
            rec = self.get(name)
            if rec.consent:
                rec.consent_history.append({**rec.consent, "replaced_at": now_iso()})
            rec.consent = consent_fields(consent)
            self._write_identity_meta(self._identity_dir(name), rec)
            return rec

    def verify(self) -> list[str]:
        """Problems found (empty = clean): every stored decoder matches its recorded sha256."""
        problems = []
        with self._lock(shared=True):  # one consistent view, even beside live writers
            for rec in self.list_identities():
                for v in rec.versions:
                    path = self._identity_dir(rec.name) / f"v{v.version}" / "decoder.safetensors"
                    if not path.exists():
                        problems.append(f"{rec.name} v{v.version}: decoder file missing")
                    elif sha256_hex(path.read_bytes()) != v.sha256:
                        problems.append(f"{rec.name} v{v.version}: checksum mismatch")
                if rec.versions and rec.default_version not in [v.version for v in rec.versions]:
                    problems.append(f"{rec.name}: default version {rec.default_version} missing")
        return problems
