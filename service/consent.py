"""Consent records: what registering or training an identity must come with.

`require_consent` is the one check every path that creates an identity version calls
(RegisterIdentity here, Train in the training service) before it accepts the request; the
store enforces the same rule again when the version is written, so a revocation (or a
deletion) between the two is never undone.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timezone

from facemux.models.errors import InvalidInputError, NotFoundError, PreconditionError
from facemux.service.convert import consent_from_proto
from facemux.service.store import CONSENT_FIELDS, IdentityRecord, Store
from facemux.v1 import types_pb2

# Who attests, where the evidence is, and when it was given: without these a record proves
# nothing, so they are required; scope and expiry are optional.
REQUIRED_FIELDS = ("attested_by", "evidence_ref", "granted_at")
_MAX_FIELD_CHARS = 1000
# How a caller refused for consent reasons gets going again.
RECORD_HINT = "(RecordConsent; `facemux identities consent NAME --consent '{...}'`)"


def _parse_time(field: str, value: str) -> datetime:
    try:
        when = datetime.fromisoformat(value)
    except ValueError:
        raise InvalidInputError(
            f"consent.{field} {value[:64]!r} is not an ISO-8601 date or timestamp"
        ) from None
    return when if when.tzinfo is not None else when.replace(tzinfo=timezone.utc)


def _canonical(when: datetime) -> str:
    # One spelling per instant: a record sent again (as a wire Timestamp) equals the stored
    # one however the stored one was written ("2026-01-01" or "...T00:00:00+00:00").
    when = when.astimezone(timezone.utc)
    return when.isoformat(timespec="microseconds" if when.microsecond else "seconds")


def validate_consent(consent: dict[str, str]) -> dict[str, str]:
    """A complete, well-formed consent record (or InvalidInputError saying what is wrong)."""
    record = {f: str(consent.get(f, "")).strip() for f in CONSENT_FIELDS if consent.get(f)}
    missing = [f for f in REQUIRED_FIELDS if not record.get(f)]
    if missing:
        raise InvalidInputError(
            "a consent record is required to register or train an identity; missing "
            + ", ".join(f"consent.{f}" for f in missing)
            + " (who attests, a reference to the evidence, and the date consent was given)"
        )
    for f, v in record.items():
        if len(v) > _MAX_FIELD_CHARS:
            raise InvalidInputError(f"consent.{f} is over {_MAX_FIELD_CHARS} characters")
        if not v.isprintable():
            raise InvalidInputError(f"consent.{f} has control characters")
    granted = _parse_time("granted_at", record["granted_at"])
    record["granted_at"] = _canonical(granted)
    if "expires_at" in record:
        expires = _parse_time("expires_at", record["expires_at"])
        record["expires_at"] = _canonical(expires)
        if expires <= granted:
            raise InvalidInputError("consent.expires_at must be after consent.granted_at")
        if expires < datetime.now(timezone.utc):
            raise PreconditionError(
                f"consent expired at {record['expires_at']}; record a new consent first"
            )
    return record


def require_consent(
    msg: types_pb2.ConsentRecord | dict[str, str], existing: dict[str, str] | None = None
) -> dict[str, str]:
    """The consent record a new identity version is made under.

    A new identity (`existing` None) needs a complete record in the request. An existing
    identity's record in force covers its new versions: the request may repeat it or send
    none, but never replaces it (RecordConsent does, an admin's act), and a revoked one
    covers nothing until an admin records new consent. The store checks the same again
    when the version is written (LocalStore.add_version), under its lock."""
    given = (
        dict(msg)
        if isinstance(msg, dict)
        else {k: v for k, v in consent_from_proto(msg).items() if k in CONSENT_FIELDS}
    )
    if existing is None:
        return validate_consent(given)
    if existing.get("revoked_at"):
        raise PreconditionError(
            f"consent was revoked at {existing['revoked_at']}; no new version can be added "
            "until an admin records new consent " + RECORD_HINT
        )
    if not any(existing.get(f) for f in REQUIRED_FIELDS):
        raise PreconditionError(
            "this identity has no consent record; an admin records one first " + RECORD_HINT
        )
    record = validate_consent(existing)  # PreconditionError once it expired
    if given and validate_consent(given) != record:
        raise PreconditionError(
            "this identity already has a consent record in force; a new version keeps it: "
            "send no consent record (or the same one), or have an admin replace it first "
            + RECORD_HINT
        )
    return record


@dataclass(frozen=True)
class Admission:
    """What a request to add a version to an identity was accepted against: the store
    checks it again when the version is written (a job's, hours later)."""

    # The record a new identity is created with, or the existing one's record in force.
    consent: dict[str, str]
    # "" = the identity did not exist; else its incarnation (IdentityRecord.incarnation).
    expect: str

    @property
    def new_identity_consent(self) -> dict[str, str] | None:
        """What to hand Store.add_version: a record only when it creates the identity."""
        return None if self.expect else self.consent


def consent_for_upload(store: Store, name: str, msg: types_pb2.ConsentRecord) -> Admission:
    """require_consent against what the store holds for `name` (blocking: run in a thread)."""
    try:
        rec = store.get(name)
    except NotFoundError:
        return Admission(require_consent(msg, None), "")
    return Admission(require_consent(msg, rec.consent), rec.incarnation)


def check_usable(rec: IdentityRecord) -> None:
    """PreconditionError unless the identity's consent allows drawing it now: not revoked,
    not expired. Swaps and exports call this one check."""
    consent = rec.consent
    if consent.get("revoked_at"):
        raise PreconditionError(
            f"identity {rec.name!r}: consent was revoked at {consent['revoked_at']}"
            + (f" ({consent['revocation_reason']})" if consent.get("revocation_reason") else "")
            + "; it can no longer be swapped"
        )
    expires = consent.get("expires_at", "")
    if expires:
        try:
            when = _parse_time("expires_at", expires)
        except InvalidInputError:
            return
        if when < datetime.now(timezone.utc):
            raise PreconditionError(
                f"identity {rec.name!r}: consent expired at {expires}; record a new consent "
                "to swap it again"
            )
