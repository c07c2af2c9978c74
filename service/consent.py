"""Consent records: what registering or training an identity must come with.

`require_consent` is the one check every path that creates an identity version calls
(RegisterIdentity, Train) before it accepts the request; the store enforces the same rule
(`check_in_force`) again when the version is written, so a revocation (or a deletion)
between the two is never undone. `check_usable` is the check before an identity is drawn
or exported.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timezone
from typing import TYPE_CHECKING

from facemux.models.errors import InvalidInputError, NotFoundError, PreconditionError
from facemux.service.convert import iso_time, timestamp
from facemux.v1 import types_pb2

if TYPE_CHECKING:
    from facemux.service.store import IdentityRecord, Store

# The fields of a consent record as callers give it; the store adds revoked_at and
# revocation_reason to the record in force, and replaced_at to the ones it keeps in history.
CONSENT_FIELDS = ("attested_by", "evidence_ref", "granted_at", "scope", "expires_at")
# Who attests, where the evidence is, and when it was given: without these a record proves
# nothing, so they are required; scope and expiry are optional.
REQUIRED_FIELDS = ("attested_by", "evidence_ref", "granted_at")
# Fields the wire carries as Timestamps; records keep them as ISO-8601 text.
_TIME_FIELDS = ("granted_at", "expires_at", "revoked_at")
_MAX_FIELD_CHARS = 1000


def consent_fields(consent: dict[str, str]) -> dict[str, str]:
    """What the person consented to, without the server's own marks (revocation...)."""
    return {k: consent[k] for k in CONSENT_FIELDS if consent.get(k)}


def record_hint(name: str = "") -> str:
    """How a caller refused for consent reasons gets going again."""
    return f"(RecordConsent; `facemux identities consent {name or 'NAME'} --consent '{{...}}'`)"


def parse_time(value: str) -> datetime | None:
    """An ISO-8601 date or timestamp (UTC unless it says otherwise); None if it is not one."""
    try:
        when = datetime.fromisoformat(value)
    except ValueError:
        return None
    return when if when.tzinfo is not None else when.replace(tzinfo=timezone.utc)


def has_passed(value: str) -> bool:
    """Whether the time `value` names is past. Stored records were validated; one whose date
    cannot be read (an odd legacy record) is not taken for expired."""
    when = parse_time(value)
    return when is not None and when < datetime.now(timezone.utc)


def _parse_time(field: str, value: str) -> datetime:
    when = parse_time(value)
    if when is None:
        raise InvalidInputError(
            f"consent.{field} {value[:64]!r} is not an ISO-8601 date or timestamp"
        )
    return when


def _canonical(when: datetime) -> str:
    # One spelling per instant: a record sent again (as a wire Timestamp) equals the stored
    # one however the stored one was written ("2026-01-01" or "...T00:00:00+00:00").
    when = when.astimezone(timezone.utc)
    return when.isoformat(timespec="microseconds" if when.microsecond else "seconds")


def _same_spelling(record: dict[str, str]) -> dict[str, str]:
    """`record` with its times spelled as validate_consent spells them."""
    out = dict(record)
    for f in ("granted_at", "expires_at"):
        when = parse_time(out.get(f, "")) if out.get(f) else None
        if when is not None:
            out[f] = _canonical(when)
    return out


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
    msg: types_pb2.ConsentRecord | dict[str, str],
    existing: dict[str, str] | None = None,
    name: str = "",
) -> dict[str, str]:
    """The consent record a new identity version is made under.

    A new identity (`existing` None) needs a complete record in the request. An existing
    identity's record in force covers its new versions: the request may repeat it or send
    none, but never replaces it (RecordConsent does, an admin's act), and a revoked one
    covers nothing until an admin records new consent. The store checks the same again
    when the version is written (LocalStore.add_version), under its lock."""
    given = dict(msg) if isinstance(msg, dict) else consent_from_proto(msg)
    if existing is None:
        return validate_consent(given)
    check_in_force(name, existing, given)
    return consent_fields(existing)


def check_in_force(name: str, existing: dict[str, str], given: dict[str, str] | None) -> None:
    """PreconditionError unless an identity's record in force covers a new version: there is
    one, it is neither revoked nor expired, and `given` (when a request sent one) is a valid
    record and the same one. Checked when a request is accepted and again, under the store's
    lock, when the version is written."""
    who = f"identity {name!r}" if name else "this identity"
    hint = record_hint(name)
    revoked = existing.get("revoked_at", "")
    if revoked:
        why = existing.get("revocation_reason", "")
        raise PreconditionError(
            f"consent for {who} was revoked at {revoked}"
            + (f" ({why})" if why else "")
            + "; it takes no new version until an admin records new consent "
            + hint
        )
    if not consent_fields(existing):
        raise PreconditionError(f"{who} has no consent record; an admin records one first {hint}")
    expires = existing.get("expires_at", "")
    if expires and has_passed(expires):
        raise PreconditionError(
            f"consent for {who} expired at {expires}; it takes no new version until an admin "
            "records new consent " + hint
        )
    if given and validate_consent(given) != _same_spelling(consent_fields(existing)):
        raise PreconditionError(
            f"{who} already has a consent record in force (attested by "
            f"{existing.get('attested_by', '?')}, granted {existing.get('granted_at', '?')})"
            "; a new version keeps it: send no consent record, or have an admin replace it "
            "first " + hint
        )


def consent_from_proto(msg: types_pb2.ConsentRecord) -> dict[str, str]:
    """The fields a caller set, as a record (unset ones left out; times as ISO-8601 UTC)."""
    out: dict[str, str] = {}
    for f in CONSENT_FIELDS:
        if f in _TIME_FIELDS:
            if msg.HasField(f):
                out[f] = iso_time(getattr(msg, f))
        elif getattr(msg, f):
            out[f] = getattr(msg, f)
    return out


def consent_to_proto(consent: dict[str, str]) -> types_pb2.ConsentRecord:
    # Stored records may carry keys the message has not (a history entry's replaced_at).
    known = types_pb2.ConsentRecord.DESCRIPTOR.fields_by_name
    msg = types_pb2.ConsentRecord(
        **{k: v for k, v in consent.items() if k in known and k not in _TIME_FIELDS}
    )
    for f in _TIME_FIELDS:
        ts = timestamp(consent.get(f, ""))
        if ts is not None:
            getattr(msg, f).CopyFrom(ts)
    return msg


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
    return Admission(require_consent(msg, rec.consent, name), rec.incarnation)


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
    if expires and has_passed(expires):
        raise PreconditionError(
            f"identity {rec.name!r}: consent expired at {expires}; record a new consent "
            "to swap it again"
        )
