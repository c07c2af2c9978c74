"""Consent records: what registering or training an identity must come with.

`require_consent` is the one check every path that creates an identity version calls
(RegisterIdentity here, Train in the training service), so the rule lives in one place.
"""

from __future__ import annotations

from datetime import datetime, timezone

from facemux.models.errors import InvalidInputError, NotFoundError, PreconditionError
from facemux.service.store import IdentityRecord, Store
from facemux.v1 import types_pb2

CONSENT_FIELDS = ("attested_by", "evidence_ref", "granted_at", "scope", "expires_at")
# Who attests, where the evidence is, and when it was given: without these a record proves
# nothing, so they are required; scope and expiry are optional.
REQUIRED_FIELDS = ("attested_by", "evidence_ref", "granted_at")
_MAX_FIELD_CHARS = 1000


def _parse_time(field: str, value: str) -> datetime:
    try:
        when = datetime.fromisoformat(value)
    except ValueError:
        raise InvalidInputError(
            f"consent.{field} {value[:64]!r} is not an ISO-8601 date or timestamp"
        ) from None
    return when if when.tzinfo is not None else when.replace(tzinfo=timezone.utc)


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
    if "expires_at" in record:
        expires = _parse_time("expires_at", record["expires_at"])
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
    """The consent record to store with a new identity version.

    A request that carries a record must carry a complete one. A request without one may add
    a version to an identity whose stored record is complete and not revoked (the person
    already consented to this identity); a new identity always needs one."""
    given = (
        dict(msg)
        if isinstance(msg, dict)
        else {f: getattr(msg, f) for f in CONSENT_FIELDS if getattr(msg, f)}
    )
    if given:
        return validate_consent(given)
    if existing:
        if existing.get("revoked_at"):
            raise PreconditionError(
                f"consent was revoked at {existing['revoked_at']}; a new version needs a new "
                "consent record"
            )
        return validate_consent(existing)
    return validate_consent({})


def consent_for_upload(store: Store, name: str, msg: types_pb2.ConsentRecord) -> dict[str, str]:
    """require_consent against what the store holds for `name` (blocking: run in a thread)."""
    try:
        existing: dict[str, str] | None = store.get(name).consent
    except NotFoundError:
        existing = None
    return require_consent(msg, existing)


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
