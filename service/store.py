"""The identity store: encoders by fingerprint, identities with numbered decoder versions.

Layout of the local directory backend::

    <root>/encoders/<fingerprint>/encoder.safetensors
    <root>/encoders/DEFAULT                      fingerprint of the default encoder
    <root>/identities/<name>/identity.json       name, display name, default version, consent
                                                 (the record in force and the ones it replaced)
    <root>/identities/<name>/v<N>/decoder.safetensors
    <root>/identities/<name>/v<N>/version.json   fingerprints, sha256, size, source, summary

Nothing half-written is ever visible: a new identity or version is assembled in a hidden
staging directory and renamed into place (rename is atomic on POSIX); JSON files are
replaced atomically; deletions rename to a hidden trash directory first. Writers take an
exclusive lock on <root>/.lock, so several server replicas may share one directory.
Hidden leftovers of a crash (.staging-*, .trash-*) are swept at open.

Consent belongs to the identity, not to a version: adding a version never changes it, a
revoked identity takes no new version, and only `record_consent` (the RecordConsent RPC, an
admin's audited act) replaces the record in force or lifts a revocation. The rule is checked
here, under the lock, so it holds for every path (uploads, training jobs) and every replica.

Other backends (an object store for clusters) implement the same `Store` interface.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
import shutil
import uuid
from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from facemux.models.checkpoint import DecoderMeta, atomic_write, fsync_directory
from facemux.models.errors import InvalidInputError, NotFoundError, PreconditionError

NAME_RE = re.compile(r"^[A-Za-z0-9_-][A-Za-z0-9._-]{0,63}$")


def validate_name(name: str, what: str = "identity") -> str:
    if not NAME_RE.match(name or "") or ".." in name:
        raise InvalidInputError(
            f"{what} name {name[:80]!r} is invalid: use 1-64 letters, digits, '.', '_' or '-', "
            "not starting with '.' and without '..' or path separators"
        )
    return name


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


# The fields of a consent record as callers give it; the store adds revoked_at and
# revocation_reason to the record in force, and replaced_at to the ones it keeps in history.
CONSENT_FIELDS = ("attested_by", "evidence_ref", "granted_at", "scope", "expires_at")


def consent_fields(consent: dict[str, str]) -> dict[str, str]:
    """What the person consented to, without the server's own marks (revocation...)."""
    return {k: consent[k] for k in CONSENT_FIELDS if consent.get(k)}


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

    def revocation(self) -> str:
        """'' when consent is in force, else a sentence saying when (and why) it was revoked."""
        at = self.consent.get("revoked_at", "")
        if not at:
            return ""
        why = self.consent.get("revocation_reason", "")
        return f"consent for identity {self.name!r} was revoked at {at}" + (
            f" ({why})" if why else ""
        )

    def version(self, number: int = 0) -> VersionRecord:
        wanted = number or self.default_version
        for v in self.versions:
            if v.version == wanted:
                return v
        have = ", ".join(str(v.version) for v in self.versions) or "none"
        raise NotFoundError(f"identity {self.name!r} has no version {wanted} (versions: {have})")


class Store(ABC):
    """What the server needs from persistent storage."""

    @abstractmethod
    def put_encoder(self, data: bytes, fingerprint: str, make_default: bool = True) -> None: ...

    @abstractmethod
    def read_encoder(self, fingerprint: str = "") -> tuple[str, bytes]:
        """(fingerprint, checkpoint bytes); empty fingerprint = the default encoder."""

    @abstractmethod
    def list_encoders(self) -> list[str]: ...

    @abstractmethod
    def add_version(
        self,
        name: str,
        checkpoint: bytes,
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
        PreconditionError."""

    @abstractmethod
    def get(self, name: str) -> IdentityRecord: ...

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


def _record_hint(name: str) -> str:
    return f"(RecordConsent; `facemux identities consent {name} --consent '{{...}}'`)"


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
    revoked = rec.revocation()
    if revoked:
        raise PreconditionError(
            f"{revoked}; it takes no new version until an admin records new consent "
            + _record_hint(rec.name)
        )
    if not consent_fields(rec.consent):
        raise PreconditionError(
            f"identity {rec.name!r} has no consent record; an admin records one first "
            + _record_hint(rec.name)
        )
    expires = rec.consent.get("expires_at", "")
    if expires and _past(expires):
        raise PreconditionError(
            f"consent for identity {rec.name!r} expired at {expires}; it takes no new version "
            "until an admin records new consent " + _record_hint(rec.name)
        )
    if consent and consent_fields(consent) != consent_fields(rec.consent):
        raise PreconditionError(
            f"identity {rec.name!r} already has a consent record in force (attested by "
            f"{rec.consent.get('attested_by', '?')}, granted {rec.consent.get('granted_at', '?')})"
            "; a new version keeps it: send no consent record, or have an admin replace it "
            "first " + _record_hint(rec.name)
        )


def _past(when: str) -> bool:
    try:
        t = datetime.fromisoformat(when)
    except ValueError:
        return False  # records are validated when stored; an odd legacy one is not expiry
    return (t if t.tzinfo is not None else t.replace(tzinfo=timezone.utc)) < datetime.now(
        timezone.utc
    )


def _write_json(path: Path, obj: Any) -> None:
    atomic_write(path, json.dumps(obj, indent=2, sort_keys=True).encode())


class LocalStore(Store):
    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self._encoders = self.root / "encoders"
        self._identities = self.root / "identities"
        for d in (self.root, self._encoders, self._identities):
            d.mkdir(parents=True, exist_ok=True)
        with self._lock():
            self._sweep()

    # -- plumbing -------------------------------------------------------------------------

    @contextlib.contextmanager
    def _lock(self) -> Iterator[None]:
        with open(self.root / ".lock", "a+") as fh:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh.fileno(), fcntl.LOCK_UN)

    def _sweep(self) -> None:
        for parent in (self._encoders, self._identities, *self._identities.iterdir()):
            if not parent.is_dir():
                continue
            for p in parent.iterdir():
                if p.name.startswith((".staging-", ".trash-")) or p.name.endswith(".tmp"):
                    shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink()

    def _hidden(self, parent: Path, kind: str) -> Path:
        return parent / f".{kind}-{uuid.uuid4().hex}"

    def _identity_dir(self, name: str) -> Path:
        return self._identities / validate_name(name)

    # -- encoders -------------------------------------------------------------------------

    def put_encoder(self, data: bytes, fingerprint: str, make_default: bool = True) -> None:
        validate_name(fingerprint, "encoder fingerprint")
        with self._lock():
            final = self._encoders / fingerprint
            if not final.exists():
                staging = self._hidden(self._encoders, "staging")
                staging.mkdir()
                atomic_write(staging / "encoder.safetensors", data)
                os.rename(staging, final)
                fsync_directory(self._encoders)
            if make_default:
                atomic_write(self._encoders / "DEFAULT", fingerprint.encode())

    def list_encoders(self) -> list[str]:
        return sorted(
            p.name for p in self._encoders.iterdir() if p.is_dir() and not p.name.startswith(".")
        )

    def read_encoder(self, fingerprint: str = "") -> tuple[str, bytes]:
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
        if not (d / "identity.json").exists():
            raise NotFoundError(f"identity {name!r} does not exist; list them with ListIdentities")
        return self._read_identity(d)

    def list_identities(self) -> list[IdentityRecord]:
        out = []
        for d in sorted(self._identities.iterdir()):
            if d.is_dir() and not d.name.startswith(".") and (d / "identity.json").exists():
                out.append(self._read_identity(d))
        return out

    def read_decoder(self, name: str, version: int) -> bytes:
        rec = self.get(name)
        v = rec.version(version)
        return (self._identity_dir(name) / f"v{v.version}" / "decoder.safetensors").read_bytes()

    def add_version(
        self,
        name: str,
        checkpoint: bytes,
        version: VersionRecord,
        display_name: str = "",
        make_default: bool = False,
        consent: dict[str, str] | None = None,
        expect: str | None = None,
    ) -> IdentityRecord:
        d = self._identity_dir(name)
        with self._lock():
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
            version.size_bytes = len(checkpoint)
            version.sha256 = sha256_hex(checkpoint)
            if display_name:
                rec.display_name = display_name
            if make_default or not rec.default_version:
                rec.default_version = version.version
            rec.versions.append(version)

            parent = d if exists else self._identities
            staging = self._hidden(parent, "staging")
            vdir = staging if exists else staging / f"v{version.version}"
            vdir.mkdir(parents=True)
            atomic_write(vdir / "decoder.safetensors", checkpoint)
            _write_json(vdir / "version.json", asdict(version))
            if exists:
                os.rename(staging, d / f"v{version.version}")
                fsync_directory(d)
                # The version directory is complete before identity.json points at it.
                self._write_identity_meta(d, rec)
            else:
                self._write_identity_meta(staging, rec)
                os.rename(staging, d)
                fsync_directory(self._identities)
            return rec

    def delete(self, name: str, version: int = 0) -> tuple[list[int], bool]:
        d = self._identity_dir(name)
        with self._lock():
            rec = self.get(name)
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
        with self._lock():
            rec = self.get(name)
            rec.default_version = rec.version(version).version
            self._write_identity_meta(self._identity_dir(name), rec)
            return rec

    def revoke_consent(self, name: str, reason: str) -> IdentityRecord:
        with self._lock():
            rec = self.get(name)
            if not rec.consent.get("revoked_at"):
                rec.consent = {**rec.consent, "revoked_at": now_iso(), "revocation_reason": reason}
                self._write_identity_meta(self._identity_dir(name), rec)
            return rec

    def record_consent(self, name: str, consent: dict[str, str]) -> IdentityRecord:
        with self._lock():
            rec = self.get(name)
            if rec.consent:
                rec.consent_history.append({**rec.consent, "replaced_at": now_iso()})
            rec.consent = consent_fields(consent)
            self._write_identity_meta(self._identity_dir(name), rec)
            return rec

    def verify(self) -> list[str]:
        """Problems found (empty = clean): every stored decoder matches its recorded sha256."""
        problems = []
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
