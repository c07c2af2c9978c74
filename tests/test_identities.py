"""Identity registration, versions, deletion and the decoder LRU, over the real API."""

from __future__ import annotations

from pathlib import Path

import pytest
from common import CONSENT, Models, face_image, png
from facemux.client import FacemuxClient, FailedPrecondition, InvalidArgument, NotFound
from facemux.service.server import ServerThread
from facemux.service.settings import Settings
from facemux.service.store import LocalStore


def test_hot_registration_and_deletion(client: FacemuxClient, models: Models) -> None:
    face = png(face_image(1))
    with pytest.raises(NotFound):
        client.swap_faces([face], "carol")
    resp = client.register_identity(
        "carol",
        models.decoders["carol"],
        display_name="Carol C.",
        consent={
            "attested_by": "qa@example.com",
            "evidence_ref": "TICKET-1",
            "granted_at": "2026-01-01",
        },
    )
    assert resp.version == 1 and resp.identity.default_version == 1
    assert resp.identity.consent.attested_by == "qa@example.com"
    # Usable at once, no restart.
    assert client.swap_faces([face], "carol").faces_swapped == 1
    ident = client.get_identity("carol")
    assert ident.display_name == "Carol C."
    v = ident.versions[0]
    assert v.encoder_fingerprint == models.fingerprint and v.preset == "tiny"
    assert v.size_bytes == len(models.decoders["carol"])

    deleted = client.delete_identity("carol")
    assert deleted.identity_deleted and list(deleted.deleted_versions) == [1]
    with pytest.raises(NotFound, match="carol"):
        client.swap_faces([face], "carol")
    assert {i.name for i in client.list_identities()} == {"alice", "bob"}


@pytest.mark.unmarked_outputs
def test_versions_default_and_rollback(client: FacemuxClient, models: Models) -> None:
    face = png(face_image(2))
    v1 = client.swap_faces([face], "alice").faces[0]
    # A second version of alice that draws like bob (another decoder's weights).
    r = client.register_identity("alice", models.decoders["bob"], make_default=False)
    assert r.version == 2 and r.identity.default_version == 1
    assert client.swap_faces([face], "alice").faces[0] == v1
    v2 = client.swap_faces([face], "alice", version=2)
    assert v2.identity_version == 2 and v2.faces[0] != v1

    client.set_default_version("alice", 2)
    assert client.swap_faces([face], "alice").identity_version == 2
    with pytest.raises(FailedPrecondition, match="default"):
        client.delete_identity("alice", version=2)
    client.set_default_version("alice", 1)  # roll back
    d = client.delete_identity("alice", version=2)
    assert list(d.deleted_versions) == [2] and not d.identity_deleted
    with pytest.raises(NotFound, match="no version 2"):
        client.swap_faces([face], "alice", version=2)
    # Version numbers are never reused.
    assert client.register_identity("alice", models.decoders["bob"]).version == 3


def test_list_pages(client: FacemuxClient, models: Models) -> None:
    for name in ("carol", "dave", "erin"):
        client.register_identity(name, models.decoders["carol"], consent=CONSENT)
    names = [i.name for i in client.list_identities(page_size=2)]
    assert names == ["alice", "bob", "carol", "dave", "erin"]


def test_revoked_consent_stops_swapping(client: FacemuxClient) -> None:
    face = png(face_image(3))
    client.swap_faces([face], "bob")
    ident = client.revoke_consent("bob", reason="subject withdrew")
    assert ident.consent.HasField("revoked_at")
    with pytest.raises(FailedPrecondition, match=r"revoked.*subject withdrew"):
        client.swap_faces([face], "bob")


@pytest.mark.unmarked_outputs
def test_lru_keeps_at_most_the_bound(
    server: ServerThread, client: FacemuxClient, models: Models
) -> None:
    client.register_identity("carol", models.decoders["carol"], consent=CONSENT)
    face = png(face_image(4))
    assert server.app is not None
    cache = server.app.runtime.cache
    for name in ("alice", "bob", "carol"):
        client.swap_faces([face], name)
    # Bound is 2 (common.server_settings): the least recently used (alice) was evicted.
    assert [k[0] for k in cache.resident()] == ["bob", "carol"]
    first = client.swap_faces([face], "alice").faces[0]
    assert [k[0] for k in cache.resident()] == ["carol", "alice"]
    # Reloading after eviction gives the same output.
    assert client.swap_faces([face], "alice").faces[0] == first


def test_lru_bound_by_bytes(tmp_path: Path, models: Models) -> None:
    from common import make_store

    make_store(tmp_path / "s", models, ("alice", "bob", "carol"))
    one = len(models.decoders["alice"])
    settings = Settings(
        port=0,
        auth="off",
        store=tmp_path / "s",
        decoder_cache_count=10,
        decoder_cache_bytes=int(one * 1.5),
    )
    with ServerThread(settings) as srv, FacemuxClient(srv.target) as c:
        c.wait_ready(30)
        for name in ("alice", "bob", "carol"):
            c.swap_faces([face_image(0)], name)
        assert srv.app is not None
        assert [k[0] for k in srv.app.runtime.cache.resident()] == ["carol"]


@pytest.mark.parametrize("name", ["../etc", "a/b", "..", ".hidden", "x" * 65, "", "sp ace"])
def test_identity_names_are_validated(client: FacemuxClient, models: Models, name: str) -> None:
    with pytest.raises(InvalidArgument, match="name"):
        client.register_identity(name, models.decoders["carol"], consent=CONSENT)


def test_registration_refusals_store_nothing(
    server: ServerThread, client: FacemuxClient, models: Models
) -> None:
    import dataclasses
    import json
    import struct

    import safetensors.torch
    from facemux.models import checkpoint
    from facemux.models.networks import build_decoder

    # Tensors of a wider decoder under the metadata of a tiny one: shapes disagree.
    wide = dataclasses.replace(models.config, name="tiny-wide", decoder_dims=(48, 24, 12))
    wide_bytes = checkpoint.decoder_to_bytes(
        build_decoder(wide, seed=0), wide, models.fingerprint, "x"
    )[0]
    carol = models.decoders["carol"]
    (n,) = struct.unpack("<Q", carol[:8])
    carol_meta = json.loads(carol[8 : 8 + n])["__metadata__"]
    wrong_shapes = safetensors.torch.save(safetensors.torch.load(wide_bytes), carol_meta)
    # A decoder for another resolution (self-consistent, but not for this encoder's latents).
    other_res = dataclasses.replace(models.config, name="tiny32", resolution=32)
    other_res_bytes = checkpoint.decoder_to_bytes(
        build_decoder(other_res, seed=0), other_res, models.fingerprint, "x"
    )[0]
    cases = [
        (b"definitely not a checkpoint", InvalidArgument, "safetensors"),
        (models.decoders["carol"][:1000], InvalidArgument, "truncated"),
        (models.encoder_bytes, InvalidArgument, "encoder"),
        (wrong_shapes, InvalidArgument, "shape"),
        (other_res_bytes, InvalidArgument, "latents"),
        (models.foreign_decoder, FailedPrecondition, "encoder"),
    ]
    for data, exc, words in cases:
        with pytest.raises(exc, match=words):
            client.register_identity("newbie", data, consent=CONSENT)
    assert {i.name for i in client.list_identities()} == {"alice", "bob"}
    assert server.app is not None
    store = server.app.store
    assert isinstance(store, LocalStore)
    assert store.verify() == []
    leftovers = [p for p in store.root.rglob("*") if p.name.startswith((".staging", ".trash"))]
    assert leftovers == []
