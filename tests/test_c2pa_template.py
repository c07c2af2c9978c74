"""PNG and JPEG manifests signed from a template of c2pa's own (service/c2pa_template.py):
c2pa validates them, they assert what c2pa's Builder asserts, and each is bound to its
image."""

from __future__ import annotations

import io
import json
from typing import Any

import c2pa as c2pa_lib
import cv2
import numpy as np
import pytest
from facemux.models import imageio
from facemux.service import c2pa

FORMATS = ["PNG", "JPEG"]
MIME = {"PNG": "image/png", "JPEG": "image/jpeg"}


@pytest.fixture(scope="module")
def signers(tmp_path_factory: pytest.TempPathFactory) -> tuple[c2pa.C2paSigner, c2pa.C2paSigner]:
    config = c2pa.generate_test_signer(tmp_path_factory.mktemp("signer"))
    return c2pa.C2paSigner(config), c2pa.C2paSigner(config, template=False)


def _image(seed: int, fmt: str) -> bytes:
    small = np.random.default_rng(seed).integers(0, 256, (8, 8, 3), dtype=np.uint8)
    return imageio.encode_image(cv2.resize(small, (64, 64)), fmt, 90)


def _manifest(data: bytes, fmt: str) -> dict[str, Any]:
    reader = c2pa_lib.Reader(MIME[fmt], io.BytesIO(data))
    try:
        store = json.loads(reader.json())
    finally:
        reader.close()
    manifest: dict[str, Any] = store["manifests"][store["active_manifest"]]
    manifest["label"] = store["active_manifest"]
    return manifest


def _inserted(signed: bytes, image: bytes) -> tuple[int, int]:
    """(start, end) of the bytes signing inserted into `image`, from the first byte that
    differs (a segment that begins as the bytes it went before did is found shifted)."""
    start = next(i for i, (a, b) in enumerate(zip(signed, image, strict=False)) if a != b)
    end = start + len(signed) - len(image)
    assert signed[:start] + signed[end:] == image
    return start, end


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("source_type", [c2pa.TRAINED, c2pa.COMPOSITE])
def test_template_manifest_asserts_what_the_builder_does(
    signers: tuple[c2pa.C2paSigner, c2pa.C2paSigner], source_type: str, fmt: str
) -> None:
    fast, builder = signers
    assert fast.uses_template(fmt, source_type, "1.2")
    assert not builder.uses_template(fmt, source_type, "1.2")
    image = _image(0, fmt)
    title = f"facemux-req-7.{fmt.lower()}"
    signed = [s.sign(image, fmt, source_type, title, "req-7", "1.2") for s in (fast, builder)]
    reports = [c2pa.read_c2pa(s) for s in signed]
    assert reports[0] == reports[1]
    assert reports[0].valid and reports[0].request_id == "req-7"
    assert reports[0].digital_source_type == source_type
    ours, theirs = (_manifest(s, fmt) for s in signed)
    for key in ("title", "claim_generator_info", "claim_version"):
        assert ours[key] == theirs[key]
    assert ours["signature_info"]["alg"] == theirs["signature_info"]["alg"] == "Es256"
    # Same assertions, same content (the data hash names the image's own bytes).
    assert ours["assertions"] == theirs["assertions"]
    # The image untouched, the manifest where c2pa puts it.
    assert _inserted(signed[0], image)[0] == _inserted(signed[1], image)[0]


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("request_id", ["", "a", "x" * 128, "é" * 64 + "\U0001f600" * 16])
def test_template_fits_any_request_id(
    signers: tuple[c2pa.C2paSigner, c2pa.C2paSigner], request_id: str, fmt: str
) -> None:
    title = f"facemux-{request_id}.{fmt.lower()}"
    signed = signers[0].sign(_image(1, fmt), fmt, c2pa.TRAINED, title, request_id, "1.2")
    report = c2pa.read_c2pa(signed)
    assert report.valid, report.errors
    assert report.request_id == request_id
    assert _manifest(signed, fmt)["title"] == title


@pytest.mark.parametrize("fmt", FORMATS)
def test_each_manifest_is_new_and_bound_to_its_image(
    signers: tuple[c2pa.C2paSigner, c2pa.C2paSigner], fmt: str
) -> None:
    fast = signers[0]
    first, second = _image(2, fmt), _image(3, fmt)
    a = fast.sign(first, fmt, c2pa.TRAINED, "facemux-a", "a", "1.2")
    b = fast.sign(second, fmt, c2pa.TRAINED, "facemux-b", "b", "1.2")
    again = fast.sign(first, fmt, c2pa.TRAINED, "facemux-a", "a", "1.2")
    labels = {_manifest(x, fmt)["label"] for x in (a, b, again)}
    instances = {_manifest(x, fmt)["instance_id"] for x in (a, b, again)}
    assert len(labels) == len(instances) == 3
    assert a != again  # new ids, salts and signature
    # A changed byte of the image, or one image's manifest on another, no longer validates.
    _, end = _inserted(a, first)
    tampered = bytearray(a)
    tampered[-20] ^= 1
    assert not c2pa.read_c2pa(bytes(tampered)).valid
    moved = a[:end] + second[end - (len(a) - len(first)) :]
    assert not c2pa.read_c2pa(moved).valid


def test_jpeg_headers_the_template_takes_and_those_it_leaves_to_the_builder(
    signers: tuple[c2pa.C2paSigner, c2pa.C2paSigner],
) -> None:
    """The template inserts its segment after an APP0 of the probe's length, whatever that
    holds (another encoder's density, say); a JPEG laid out otherwise (here an APP1 segment
    first) goes through c2pa's Builder. Both validate."""
    image = _image(4, "JPEG")
    assert image[2:4] == b"\xff\xe0"
    density = image[:14] + b"\x00\x48\x00\x48" + image[18:]  # 72 dpi instead of 1:1
    app1 = b"\xff\xe1\x00\x08Other\x00"
    other = image[:2] + app1 + image[2:]
    template = signers[0]._template("JPEG", c2pa.TRAINED, "1.2")
    assert template is not None
    assert template.fits(density) and not template.fits(other)
    for jpeg in (density, other):
        signed = signers[0].sign(jpeg, "JPEG", c2pa.TRAINED, "facemux-o.jpg", "o", "1.2")
        report = c2pa.read_c2pa(signed)
        assert report.valid and report.request_id == "o"
    # The template's APP11 segment right after APP0.
    signed = signers[0].sign(density, "JPEG", c2pa.TRAINED, "facemux-d.jpg", "d", "1.2")
    assert signed[:20] == density[:20] and signed[20:22] == b"\xff\xeb"


def test_a_manifest_beyond_one_jpeg_segment_is_left_to_the_builder(
    signers: tuple[c2pa.C2paSigner, c2pa.C2paSigner],
) -> None:
    """One APP11 segment holds 64 KB; the Builder splits a longer manifest over several."""
    title = "t" * 70_000
    signed = signers[0].sign(_image(5, "JPEG"), "JPEG", c2pa.TRAINED, title, "long", "1.2")
    report = c2pa.read_c2pa(signed)
    assert report.valid and report.request_id == "long"
    assert signed.count(b"\xff\xeb") >= 2


def _signer_config(alg: str) -> c2pa.SignerConfig:
    """The server's test CA and a leaf whose key `alg` signs with."""
    from cryptography.hazmat.primitives.asymmetric import ec, ed25519

    key: ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey = (
        ed25519.Ed25519PrivateKey.generate()
        if alg == "ed25519"
        else ec.generate_private_key({"es384": ec.SECP384R1(), "es512": ec.SECP521R1()}[alg])
    )
    chain, key_pem = c2pa._make_test_signer(key)
    return c2pa.SignerConfig(chain, key_pem, alg, True)


@pytest.mark.parametrize("alg", ["es384", "es512", "ed25519"])
def test_template_signs_with_the_other_algorithms(alg: str) -> None:
    signer = c2pa.C2paSigner(_signer_config(alg))
    for fmt in FORMATS:
        assert signer.uses_template(fmt, c2pa.TRAINED, "1.2")
        signed = signer.sign(_image(6, fmt), fmt, c2pa.TRAINED, "facemux-alg", "alg", "1.2")
        report = c2pa.read_c2pa(signed)
        assert report.valid and report.request_id == "alg", report.errors
        assert _manifest(signed, fmt)["signature_info"]["alg"].lower() == alg
