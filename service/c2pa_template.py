"""C2PA manifests for PNG and JPEG outputs assembled from a template, signed with
`cryptography`.

Through c2pa's Builder a 64 px face costs 0.35-0.45 ms to sign on a 2-core CPU: a new
claim, CBOR and JUMBF built each time, and the image rewritten through ~140 Python stream
callbacks, while the signature itself takes a few hundredths of that. Every manifest
facemux makes for a given (format, source type, version) has the same layout: only the
request id (and the title holding it), the image's hash, fresh ids and salts, the assertion
hashes and the signature change. So c2pa's Builder signs one probe image, and
`ManifestTemplate` keeps that manifest as bytes, then for each image:

- hashes the image once: the manifest goes into one segment c2pa puts at a fixed place (a
  PNG's caBX chunk right after IHDR, a JPEG's APP11 segment right after APP0) and the data
  hash excludes exactly that segment, so the hash is that of the image as encoded;
- writes the request assertion, gives every assertion a new salt and the manifest a new
  label and instance id (UUIDs), and rehashes the assertions into the claim;
- signs the claim (COSE_Sign1, the same protected header: algorithm and certificate chain);
- inserts the segment; nothing is decoded or re-encoded.

The layout is read from c2pa's own output, not assumed; a template whose output c2pa does
not validate is never used (C2paSigner checks one at start, and falls back to the Builder).
"""

from __future__ import annotations

import hashlib
import os
import struct
import uuid
import zlib
from collections.abc import Callable
from dataclasses import dataclass

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
IHDR_END = 8 + 12 + 13  # signature, then the IHDR chunk: where c2pa puts its caBX chunk
JPEG_APP11 = b"\xff\xeb"
JPEG_SEGMENT_MAX = 0xFFFF - 2 - 8  # JUMBF bytes one APP11 segment holds after its header
SALT_BOX = b"c2sh"
_UUID_LEN = 36

# The algorithms signed here (COSE ids), and how: ECDSA signatures go into COSE as r || s.
_CURVES: dict[str, tuple[type[ec.EllipticCurve], hashes.HashAlgorithm, int]] = {
    "es256": (ec.SECP256R1, hashes.SHA256(), 32),
    "es384": (ec.SECP384R1, hashes.SHA384(), 48),
    "es512": (ec.SECP521R1, hashes.SHA512(), 66),
}
SUPPORTED_ALGS = frozenset([*_CURVES, "ed25519"])


class TemplateError(ValueError):
    """The probe manifest does not have the layout this module knows how to refill."""


def _box(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", 8 + len(body)) + kind + body


def _boxes(data: bytes) -> list[tuple[bytes, bytes]]:
    """(type, whole box) of each box in `data`; 32-bit lengths only (all c2pa writes here)."""
    out = []
    i = 0
    while i < len(data):
        if i + 8 > len(data):
            raise TemplateError("truncated JUMBF box")
        (length,) = struct.unpack(">I", data[i : i + 4])
        if length < 8 or i + length > len(data):
            raise TemplateError("unsupported JUMBF box length")
        out.append((data[i + 4 : i + 8], data[i : i + length]))
        i += length
    return out


def _children(superbox: bytes) -> tuple[bytes, list[bytes]]:
    """(description box, child boxes) of a JUMBF superbox."""
    inner = _boxes(superbox[8:])
    if superbox[4:8] != b"jumb" or not inner or inner[0][0] != b"jumd":
        raise TemplateError("expected a JUMBF superbox")
    return inner[0][1], [b for _, b in inner[1:]]


def _label(jumd: bytes) -> str:
    return jumd[8 + 17 :].split(b"\0", 1)[0].decode()


def _cbor_head(major: int, n: int) -> bytes:
    if n < 24:
        return bytes([major << 5 | n])
    if n < 0x100:
        return bytes([major << 5 | 24, n])
    if n < 0x10000:
        return bytes([major << 5 | 25]) + struct.pack(">H", n)
    return bytes([major << 5 | 26]) + struct.pack(">I", n)


def _tstr(text: str) -> bytes:
    raw = text.encode()
    return _cbor_head(3, len(raw)) + raw


def _bstr(raw: bytes) -> bytes:
    return _cbor_head(2, len(raw)) + raw


def _split_once(data: bytes, old: bytes, what: str) -> tuple[bytes, bytes]:
    if data.count(old) != 1:
        raise TemplateError(f"{what} is not found once in the probe manifest")
    before, after = data.split(old)
    return before, after


def _png_chunks(png: bytes) -> list[tuple[bytes, int, int]]:
    """(type, start, end) of each chunk."""
    out = []
    i = 8
    while i + 12 <= len(png):
        (n,) = struct.unpack(">I", png[i : i + 4])
        out.append((png[i + 4 : i + 8], i, i + 12 + n))
        i += 12 + n
    return out


def _jpeg_segments(jpeg: bytes) -> list[tuple[bytes, int, int]]:
    """(marker, start, end) of each segment before the scan."""
    out = []
    i = 2
    while i + 4 <= len(jpeg) and jpeg[i] == 0xFF and jpeg[i + 1] != 0xDA:
        (n,) = struct.unpack(">H", jpeg[i + 2 : i + 4])
        out.append((jpeg[i : i + 2], i, i + 2 + n))
        i += 2 + n
    return out


def _find_manifest(fmt: str, signed: bytes) -> tuple[int, int, bytes, bytes]:
    """(start, end, header, JUMBF) of the one segment c2pa put its manifest in: the header
    is what comes before the JUMBF in it (the PNG chunk's CRC is recomputed, not kept)."""
    if fmt == "PNG":
        chunks = _png_chunks(signed)
        if len(chunks) < 2 or chunks[0][0] != b"IHDR" or chunks[1][0] != b"caBX":
            raise TemplateError("c2pa did not put its manifest right after IHDR")
        _, start, end = chunks[1]
        if start != IHDR_END:
            raise TemplateError("unexpected IHDR chunk")
        return start, end, b"", signed[start + 8 : end - 4]
    if fmt == "JPEG":
        found = [(start, end) for m, start, end in _jpeg_segments(signed) if m == JPEG_APP11]
        if len(found) != 1:
            raise TemplateError("c2pa's manifest is not in one APP11 segment")
        start, end = found[0]
        header = signed[start + 4 : start + 12]  # "JP", box instance, sequence number 1
        if header[:2] != b"JP" or header[4:] != b"\0\0\0\x01":
            raise TemplateError("unexpected APP11 segment header")
        return start, end, header, signed[start + 12 : end]
    raise TemplateError(f"{fmt} is signed through c2pa's Builder only")


def _wrap(fmt: str, header: bytes, jumbf: bytes) -> bytes:
    """The segment holding `jumbf`, as c2pa writes it."""
    if fmt == "PNG":
        body = b"caBX" + jumbf
        return struct.pack(">I", len(jumbf)) + body + struct.pack(">I", zlib.crc32(body))
    if len(jumbf) > JPEG_SEGMENT_MAX:
        raise ValueError("the manifest does not fit one APP11 segment")
    return JPEG_APP11 + struct.pack(">H", 2 + len(header) + len(jumbf)) + header + jumbf


def _signing_function(key_pem: bytes, alg: str) -> Callable[[bytes], bytes]:
    key = serialization.load_pem_private_key(key_pem, password=None)
    if alg == "ed25519":
        if not isinstance(key, ed25519.Ed25519PrivateKey):
            raise TemplateError("the ed25519 signer's key is not an Ed25519 key")
        return key.sign
    if alg not in _CURVES:
        raise TemplateError(f"{alg} is signed through c2pa's Builder only")
    curve, digest, size = _CURVES[alg]
    if not isinstance(key, ec.EllipticCurvePrivateKey) or not isinstance(key.curve, curve):
        raise TemplateError(f"the {alg} signer's key is not on {curve.name}")
    ecdsa = ec.ECDSA(digest)

    def sign(data: bytes) -> bytes:
        r, s = decode_dss_signature(key.sign(data, ecdsa))
        return r.to_bytes(size, "big") + s.to_bytes(size, "big")

    return sign


@dataclass(frozen=True)
class _Assertion:
    jumd_unsalted: bytes  # the description box less its last 16 bytes (the salt)
    content: bytes  # the content box (constant) or, for the variable ones, a prefix of it


class ManifestTemplate:
    """One probe manifest, refilled and re-signed for each image (see the module doc)."""

    def __init__(
        self,
        fmt: str,
        probe: bytes,
        signed: bytes,
        *,
        request_id: str,
        title: str,
        key_pem: bytes,
        alg: str,
    ) -> None:
        self._sign = _signing_function(key_pem, alg)
        self.fmt = fmt
        start, end, self._header, jumbf = _find_manifest(fmt, signed)
        if signed[:start] + signed[end:] != probe:
            raise TemplateError("c2pa changed more of the image than its manifest's segment")
        if _wrap(fmt, self._header, jumbf) != signed[start:end]:
            raise TemplateError("the manifest's segment is not written as c2pa writes it")
        # Every image must have what the probe had before the segment, so that it goes in at
        # the same offset: the PNG signature and IHDR's length and type; a JPEG's SOI, then
        # one APP0 segment of the same length (whatever it holds: the data hash covers it).
        self._start = start
        if fmt == "PNG":
            self._prefix = PNG_MAGIC + b"\0\0\0\x0dIHDR"
        elif probe[2:4] == b"\xff\xe0" and 4 + int.from_bytes(probe[4:6], "big") == start:
            self._prefix = probe[:6]
        else:
            raise TemplateError("c2pa did not put its APP11 segment right after APP0")
        (store,) = [b for _, b in _boxes(jumbf)]
        self._store_jumd, (manifest,) = _children(store)
        manifest_jumd, parts = _children(manifest)
        label = _label(manifest_jumd)
        if not label.startswith("urn:c2pa:") or len(label) != len("urn:c2pa:") + _UUID_LEN:
            raise TemplateError("unexpected manifest label")
        self._manifest_uuid = label[-_UUID_LEN:].encode()
        self._manifest_jumd = _split_once(manifest_jumd, self._manifest_uuid, "the label")
        if [_label(_children(p)[0]) for p in parts] != [
            "c2pa.assertions",
            "c2pa.claim.v2",
            "c2pa.signature",
        ]:
            raise TemplateError("unexpected manifest parts")
        self._astore_jumd, assertion_boxes = _children(parts[0])
        claim_jumd, (claim_box,) = _children(parts[1])
        sig_jumd, (sig_box,) = _children(parts[2])
        self._claim_jumd, self._sig_jumd = claim_jumd, sig_jumd
        if claim_box[4:8] != b"cbor" or sig_box[4:8] != b"cbor":
            raise TemplateError("claim and signature must be CBOR boxes")
        claim = claim_box[8:]

        # The assertions, in order; the hashes the claim holds for each are replaced below.
        self._assertions: list[_Assertion] = []
        self._old_hashes: list[bytes] = []
        self._kinds: list[str] = []
        for box in assertion_boxes:
            jumd, (content,) = _children(box)
            salt_box = jumd[-24:]
            if salt_box[:8] != struct.pack(">I", 24) + SALT_BOX:
                raise TemplateError("assertion without a 16-byte salt")
            self._assertions.append(_Assertion(jumd[:-16], content))
            self._old_hashes.append(hashlib.sha256(box[8:]).digest())
            self._kinds.append(_label(jumd))
            if claim.count(self._old_hashes[-1]) != 1:
                raise TemplateError(f"the claim does not hold {self._kinds[-1]}'s hash once")
        if sorted(self._kinds) != sorted(
            ["c2pa.actions.v2", "org.facemux.request", "c2pa.hash.data"]
        ):
            raise TemplateError(f"unexpected assertions {self._kinds}")

        request = self._assertions[self._kinds.index("org.facemux.request")].content
        self._request_head = _split_once(request[8:], _tstr(request_id), "the request id")[0]
        if request[8:] != self._request_head + _tstr(request_id):
            raise TemplateError("the request assertion holds more than the request id")

        # The data hash: an exclusion (start, length) of the segment, and the hash.
        data_hash = self._assertions[self._kinds.index("c2pa.hash.data")].content[8:]
        old_hash = hashlib.sha256(probe).digest()
        exclusion = _tstr("start") + _cbor_head(0, start) + _tstr("length")
        head, tail = _split_once(data_hash, exclusion + _cbor_head(0, end - start), "the exclusion")
        self._hash_parts = (head + exclusion, *_split_once(tail, _bstr(old_hash), "the data hash"))
        self._length_width = len(_cbor_head(0, end - start))

        # The claim: everything but the title, the ids and the hashes is kept as it is. It is
        # cut where those fields lie, so that nothing a caller chose (the title) is searched.
        iid = claim.split(_tstr("instanceID"), 1)[1][:50]
        at = iid.find(b"xmp.iid:")
        if at < 0:
            raise TemplateError("the claim has no xmp.iid instance id")
        fields: list[tuple[bytes, str]] = [
            (_tstr(title), "title"),
            (iid[at + 8 : at + 8 + _UUID_LEN], "instance"),
            (self._manifest_uuid, "manifest"),
        ]
        fields += [(h, f"hash{i}") for i, h in enumerate(self._old_hashes)]
        spots = []
        for value, name in fields:
            if claim.count(value) != 1:
                raise TemplateError(f"the claim does not hold its {name} once")
            spots.append((claim.index(value), len(value), name))
        spots.sort()
        self._claim_parts: list[bytes | str] = []
        pos = 0
        for offset, length, name in spots:
            if offset < pos:
                raise TemplateError("overlapping claim fields")
            self._claim_parts += [claim[pos:offset], name]
            pos = offset + length
        self._claim_parts.append(claim[pos:])

        # COSE_Sign1: tag 18, [protected header, unprotected header, nil, signature].
        sig = sig_box[8:]
        size = self._sig_size = 2 * _CURVES[alg][2] if alg in _CURVES else 64
        self._sig_head = sig[:-size]
        if sig[:2] != b"\xd2\x84" or not self._sig_head.endswith(b"\xf6" + _cbor_head(2, size)):
            raise TemplateError("unexpected COSE_Sign1 layout")
        protected = sig[2 : 2 + self._protected(sig)]
        # Sig_structure: ["Signature1", protected, external_aad (empty), payload (the claim)].
        self._sig_structure_head = _cbor_head(4, 4) + _tstr("Signature1") + protected + _bstr(b"")

    @staticmethod
    def _protected(sig: bytes) -> int:
        """Length of the protected header bstr (head included) after the tag and array head."""
        head = sig[2]
        if head >> 5 != 2:
            raise TemplateError("COSE protected header is not a byte string")
        n = head & 31
        if n < 24:
            return 1 + n
        width = {24: 1, 25: 2, 26: 4}.get(n)
        if width is None:
            raise TemplateError("unsupported COSE header length")
        return 1 + width + int.from_bytes(sig[3 : 3 + width], "big")

    def fits(self, image: bytes) -> bool:
        """Whether `image` starts as the probe did, up to where the manifest goes."""
        return image.startswith(self._prefix)

    def sign(self, image: bytes, title: str, request_id: str) -> bytes:
        """`image` with a manifest for `request_id` (a signed copy; `image` is not parsed,
        only hashed). It must fit (see `fits`)."""
        if not self.fits(image):
            raise ValueError(f"not a {self.fmt} laid out as the template's probe")
        manifest_uuid = str(uuid.uuid4()).encode()
        salts = os.urandom(16 * len(self._assertions))

        def assertion(i: int, content: bytes) -> bytes:
            a = self._assertions[i]
            return _box(b"jumb", a.jumd_unsalted + salts[16 * i : 16 * i + 16] + content)

        request = _box(b"cbor", self._request_head + _tstr(request_id))
        boxes = [
            assertion(i, request if kind == "org.facemux.request" else a.content)
            for i, (a, kind) in enumerate(zip(self._assertions, self._kinds, strict=True))
        ]
        # The data hash names the manifest's length, which is the same whatever the hashes
        # and the signature hold: measure it with zeros there, then fill them in.
        at = self._kinds.index("c2pa.hash.data")
        boxes[at] = assertion(at, _box(b"cbor", self._data_hash(0, bytes(32))))
        zeros = self._claim_for(manifest_uuid, title, [bytes(32)] * len(boxes))
        unsigned = self._sig_head + bytes(self._sig_size)
        segment_len = len(
            _wrap(self.fmt, self._header, self._store(manifest_uuid, boxes, zeros, unsigned))
        )
        digest = hashlib.sha256(image).digest()  # the file less the segment: as encoded
        boxes[at] = assertion(at, _box(b"cbor", self._data_hash(segment_len, digest)))
        claim = self._claim_for(
            manifest_uuid, title, [hashlib.sha256(b[8:]).digest() for b in boxes]
        )
        signature = self._sig_head + self._sign(self._sig_structure_head + _bstr(claim))
        segment = _wrap(self.fmt, self._header, self._store(manifest_uuid, boxes, claim, signature))
        if len(segment) != segment_len:
            raise AssertionError("the manifest changed length while it was filled")
        return image[: self._start] + segment + image[self._start :]

    def _data_hash(self, segment_len: int, digest: bytes) -> bytes:
        head, middle, tail = self._hash_parts
        length = _cbor_head(0, segment_len) if segment_len else bytes(self._length_width)
        if len(length) != self._length_width:
            raise ValueError("the manifest's length does not fit the template")
        return head + length + middle + _bstr(digest) + tail

    def _claim_for(self, manifest_uuid: bytes, title: str, digests: list[bytes]) -> bytes:
        values = {
            "title": _tstr(title),
            "instance": str(uuid.uuid4()).encode(),
            "manifest": manifest_uuid,
            **{f"hash{i}": d for i, d in enumerate(digests)},
        }
        return b"".join(p if isinstance(p, bytes) else values[p] for p in self._claim_parts)

    def _store(
        self, manifest_uuid: bytes, assertions: list[bytes], claim: bytes, sig: bytes
    ) -> bytes:
        before, after = self._manifest_jumd
        manifest = _box(
            b"jumb",
            before
            + manifest_uuid
            + after
            + _box(b"jumb", self._astore_jumd + b"".join(assertions))
            + _box(b"jumb", self._claim_jumd + _box(b"cbor", claim))
            + _box(b"jumb", self._sig_jumd + _box(b"cbor", sig)),
        )
        return _box(b"jumb", self._store_jumd + manifest)
