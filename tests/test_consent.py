"""Registering an identity requires a consent record; it is stored and returned."""

from __future__ import annotations

from pathlib import Path

import pytest
from common import CONSENT, Models, face_image, make_store, png
from facemux.client import FacemuxClient, FailedPrecondition, InvalidArgument, NotFound
from facemux.client.client import timestamp
from facemux.models import checkpoint
from facemux.models.errors import InvalidInputError, PreconditionError
from facemux.service.consent import require_consent, validate_consent
from facemux.service.store import VersionRecord

FACE = png(face_image(0))


@pytest.mark.parametrize(
    ("record", "words"),
    [
        ({}, "consent record is required"),
        ({"attested_by": "x"}, "consent.evidence_ref, consent.granted_at"),
        ({**CONSENT, "granted_at": "yesterday"}, "ISO-8601"),
        ({**CONSENT, "expires_at": "2025-12-31"}, "after consent.granted_at"),
        ({**CONSENT, "evidence_ref": "x" * 5000}, "over 1000"),
        ({**CONSENT, "scope": "a\nb"}, "control characters"),
    ],
)
def test_incomplete_records_are_refused(record: dict[str, str], words: str) -> None:
    with pytest.raises(InvalidInputError, match=words):
        validate_consent(record)


def test_existing_consent_covers_new_versions_until_revoked() -> None:
    assert require_consent({}, dict(CONSENT)) == CONSENT
    # The record in force sent again, as a wire Timestamp spells its date, is the same one.
    again = {**CONSENT, "granted_at": "2026-01-01T00:00:00+00:00"}
    assert require_consent(again, dict(CONSENT)) == CONSENT
    with pytest.raises(PreconditionError, match="revoked"):
        require_consent({}, {**CONSENT, "revoked_at": "2026-02-01T00:00:00+00:00"})
    with pytest.raises(PreconditionError, match="expired"):
        validate_consent({**CONSENT, "expires_at": "2026-01-02"})


def test_registration_needs_consent_and_returns_it(client: FacemuxClient, models: Models) -> None:
    with pytest.raises(InvalidArgument, match="consent record is required"):
        client.register_identity("carol", models.decoders["carol"])
    with pytest.raises(InvalidArgument, match="evidence_ref"):
        client.register_identity("carol", models.decoders["carol"], consent={"attested_by": "me"})
    record = {**CONSENT, "scope": "internal demo", "expires_at": "2099-01-01T00:00:00+00:00"}
    client.register_identity("carol", models.decoders["carol"], consent=record)
    got = client.get_identity("carol").consent
    assert (got.attested_by, got.evidence_ref, got.granted_at, got.scope, got.expires_at) == (
        record["attested_by"],
        record["evidence_ref"],
        timestamp(record["granted_at"]),
        record["scope"],
        timestamp(record["expires_at"]),
    )
    assert got.granted_at.ToJsonString() == "2026-01-01T00:00:00Z"
    # A new version rides on the stored consent (repeating it is fine too)...
    assert client.register_identity("carol", models.decoders["bob"]).version == 2
    assert client.register_identity("carol", models.decoders["bob"], consent=record).version == 3
    # ...until it is revoked: then swaps stop and no version is added.
    client.revoke_consent("carol", "withdrawn")
    with pytest.raises(FailedPrecondition, match="revoked"):
        client.swap_faces([FACE], "carol")
    with pytest.raises(FailedPrecondition, match="RecordConsent"):
        client.register_identity("carol", models.decoders["carol"])


FRESH = {**CONSENT, "granted_at": "2026-06-01", "evidence_ref": "TICKET-2"}


def test_only_record_consent_lifts_a_revocation(client: FacemuxClient, models: Models) -> None:
    """A new version with a fresh record used to replace a revoked identity's consent and
    so re-enable its older versions: consent belongs to the identity, and only an admin's
    RecordConsent (audited) changes it."""
    client.register_identity("bob", models.decoders["carol"])  # v2 under bob's record
    client.revoke_consent("bob", "withdrawn")
    revoked_at = client.get_identity("bob").consent.revoked_at
    with pytest.raises(FailedPrecondition, match=r"revoked at .*RecordConsent"):
        client.register_identity("bob", models.decoders["bob"], consent=FRESH)
    # Nothing changed: no v3, the revocation stands, no version of bob swaps.
    ident = client.get_identity("bob")
    assert [v.version for v in ident.versions] == [1, 2]
    assert ident.consent.revoked_at == revoked_at and ident.consent.evidence_ref == "TICKET-1"
    for version in (0, 1, 2):
        with pytest.raises(FailedPrecondition, match="revoked"):
            client.swap_faces([FACE], "bob", version=version)
    # Revoking again keeps the first revocation's time.
    assert client.revoke_consent("bob", "again").consent.revoked_at == revoked_at

    # RecordConsent: complete records only, never a revocation of the caller's making.
    with pytest.raises(InvalidArgument, match="evidence_ref"):
        client.record_consent("bob", {"attested_by": "x@example.com"})
    with pytest.raises(InvalidArgument, match="revoked_at"):
        client.record_consent("bob", {**FRESH, "revoked_at": "2026-07-01"})
    with pytest.raises(NotFound):
        client.record_consent("nobody", FRESH)
    ident = client.record_consent("bob", FRESH)
    assert ident.consent.evidence_ref == "TICKET-2" and not ident.consent.HasField("revoked_at")
    (old,) = ident.consent_history
    assert old.evidence_ref == "TICKET-1" and old.revoked_at == revoked_at
    assert old.revocation_reason == "withdrawn"
    assert client.swap_faces([FACE], "bob", version=1).faces_swapped == 1
    assert client.register_identity("bob", models.decoders["bob"]).version == 3
    # A version never replaces the record in force: a different one is refused.
    with pytest.raises(FailedPrecondition, match="already has a consent record"):
        client.register_identity("bob", models.decoders["bob"], consent=CONSENT)
    assert client.get_identity("bob").consent.evidence_ref == "TICKET-2"


def test_store_guards_consent_for_every_writer(tmp_path: Path, models: Models) -> None:
    """The store's own rule, for any path that adds a version (and any replica)."""
    store = make_store(tmp_path / "store", models, ("alice",))
    data = models.decoders["alice"]

    def vrec() -> VersionRecord:
        return VersionRecord.for_decoder(checkpoint.read_decoder(data)[1])

    first = store.get("alice")
    # A name deleted and created again within the same second is still another identity.
    store.delete("alice")
    store.add_version("alice", data, vrec(), consent=dict(CONSENT))
    again = store.get("alice")
    assert again.incarnation != first.incarnation
    with pytest.raises(PreconditionError, match="deleted and created again"):
        store.add_version("alice", data, vrec(), expect=first.incarnation)
    with pytest.raises(PreconditionError, match="was created"):
        store.add_version("alice", data, vrec(), consent=dict(CONSENT), expect="")
    with pytest.raises(PreconditionError, match="was deleted"):
        store.add_version("zoe", data, vrec(), consent=dict(CONSENT), expect=again.incarnation)
    with pytest.raises(InvalidInputError, match="needs a consent record"):
        store.add_version("zoe", data, vrec())
    assert store.add_version("alice", data, vrec(), expect=again.incarnation).last_version == 2
    # Expired consent: no new version until new consent is recorded (which keeps the old).
    store.record_consent("alice", {**CONSENT, "expires_at": "2026-01-02"})
    with pytest.raises(PreconditionError, match="expired at 2026-01-02"):
        store.add_version("alice", data, vrec())
    store.revoke_consent("alice", "withdrawn")
    with pytest.raises(PreconditionError, match="revoked at"):
        store.add_version("alice", data, vrec())
    rec = store.record_consent("alice", FRESH)
    assert rec.consent == FRESH and [c["granted_at"] for c in rec.consent_history] == [
        "2026-01-01",
        "2026-01-01",
    ]
    assert rec.consent_history[1]["revocation_reason"] == "withdrawn"
    assert all(c["replaced_at"] for c in rec.consent_history)
    assert store.add_version("alice", data, vrec()).consent == FRESH
