"""Registering an identity requires a consent record; it is stored and returned."""

from __future__ import annotations

import pytest
from conftest import CONSENT, Models, face_image, png
from facemux.client import FacemuxClient, FailedPrecondition, InvalidArgument
from facemux.models.errors import InvalidInputError, PreconditionError
from facemux.service.consent import require_consent, validate_consent

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
        record["granted_at"],
        record["scope"],
        record["expires_at"],
    )
    # A new version rides on the stored consent...
    assert client.register_identity("carol", models.decoders["bob"]).version == 2
    # ...until it is revoked: then swaps stop and a new version needs a new record.
    client.revoke_consent("carol", "withdrawn")
    with pytest.raises(FailedPrecondition, match="revoked"):
        client.swap_faces([FACE], "carol")
    with pytest.raises(FailedPrecondition, match="new consent record"):
        client.register_identity("carol", models.decoders["carol"])
    fresh = {**CONSENT, "granted_at": "2026-06-01", "evidence_ref": "TICKET-2"}
    assert client.register_identity("carol", models.decoders["carol"], consent=fresh).version == 3
    assert client.swap_faces([FACE], "carol").faces_swapped == 1
