"""PNG manifests signed from a template of c2pa's own (service/c2pa_template.py): c2pa
validates them, they assert what c2pa's Builder asserts, and each is bound to its image."""

from __future__ import annotations

import io
import json
from typing import Any

import c2pa as c2pa_lib
import cv2
import numpy as np
import pytest
from facemux.service import c2pa


@pytest.fixture(scope="module")
def signers(tmp_path_factory: pytest.TempPathFactory) -> tuple[c2pa.C2paSigner, c2pa.C2paSigner]:
    config = c2pa.generate_test_signer(tmp_path_factory.mktemp("signer"))
    return c2pa.C2paSigner(config), c2pa.C2paSigner(config, template=False)


def _png(seed: int) -> bytes:
    rgb = np.random.default_rng(seed).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    return cv2.imencode(".png", rgb)[1].tobytes()


def _manifest(data: bytes) -> dict[str, Any]:
    reader = c2pa_lib.Reader("image/png", io.BytesIO(data))
    try:
        store = json.loads(reader.json())
    finally:
        reader.close()
    manifest: dict[str, Any] = store["manifests"][store["active_manifest"]]
    manifest["label"] = store["active_manifest"]
    return manifest


@pytest.mark.parametrize("source_type", [c2pa.TRAINED, c2pa.COMPOSITE])
def test_template_manifest_asserts_what_the_builder_does(
    signers: tuple[c2pa.C2paSigner, c2pa.C2paSigner], source_type: str
) -> None:
    fast, builder = signers
    assert fast.uses_template(source_type, "1.2") and not builder.uses_template()
    image = _png(0)
    signed = [
        s.sign(image, "PNG", source_type, "facemux-req-7.png", "req-7", "1.2")
        for s in (fast, builder)
    ]
    reports = [c2pa.read_c2pa(s) for s in signed]
    assert reports[0] == reports[1]
    assert reports[0].valid and reports[0].request_id == "req-7"
    assert reports[0].digital_source_type == source_type
    ours, theirs = (_manifest(s) for s in signed)
    for key in ("title", "claim_generator_info", "claim_version"):
        assert ours[key] == theirs[key]
    assert ours["signature_info"]["alg"] == theirs["signature_info"]["alg"] == "Es256"
    # Same assertions, same content (the data hash names the image's own bytes).
    assert [a["label"] for a in ours["assertions"]] == [a["label"] for a in theirs["assertions"]]
    assert ours["assertions"] == theirs["assertions"]
    # The same pixels, the manifest in the same place.
    for s in signed:
        assert s[:33] == image[:33] and s.endswith(image[33:])


@pytest.mark.parametrize("request_id", ["", "a", "x" * 128, "é" * 64 + "\U0001f600" * 16])
def test_template_fits_any_request_id(
    signers: tuple[c2pa.C2paSigner, c2pa.C2paSigner], request_id: str
) -> None:
    signed = signers[0].sign(
        _png(1), "PNG", c2pa.TRAINED, f"facemux-{request_id}.png", request_id, "1.2"
    )
    report = c2pa.read_c2pa(signed)
    assert report.valid, report.errors
    assert report.request_id == request_id
    assert _manifest(signed)["title"] == f"facemux-{request_id}.png"


def test_each_manifest_is_new_and_bound_to_its_image(
    signers: tuple[c2pa.C2paSigner, c2pa.C2paSigner],
) -> None:
    fast = signers[0]
    a = fast.sign(_png(2), "PNG", c2pa.TRAINED, "facemux-a.png", "a", "1.2")
    b = fast.sign(_png(3), "PNG", c2pa.TRAINED, "facemux-b.png", "b", "1.2")
    again = fast.sign(_png(2), "PNG", c2pa.TRAINED, "facemux-a.png", "a", "1.2")
    labels = {_manifest(x)["label"] for x in (a, b, again)}
    instances = {_manifest(x)["instance_id"] for x in (a, b, again)}
    assert len(labels) == len(instances) == 3
    assert a != again  # new ids, salts and signature
    # A changed pixel, or one image's manifest on another image, no longer validates.
    (length,) = np.frombuffer(a[33:37], ">u4")
    idat = 33 + 12 + int(length)
    tampered = bytearray(a)
    tampered[idat + 20] ^= 1
    assert not c2pa.read_c2pa(bytes(tampered)).valid
    moved = a[:idat] + b[idat:]
    assert not c2pa.read_c2pa(moved).valid
