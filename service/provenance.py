"""Provenance on every generated output, and the ProvenanceService.Verify RPC.

Every image facemux draws (Swap crops and frames, SwapStream frames, Decode faces) gets an
invisible watermark in its pixels before encoding and, when it is encoded (PNG, JPEG, WebP),
a signed C2PA manifest on the bytes. Raw-pixel outputs cannot carry a manifest: they get
the watermark only, and the response notes say so. The marks themselves: models/watermark.py
(pixels) and service/c2pa.py (manifest).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import grpc
import numpy as np
from facemux.models import imageio
from facemux.models import watermark as wm
from facemux.models.errors import InvalidInputError
from facemux.service import c2pa, convert
from facemux.service.boundary import call_deadline, unary
from facemux.service.budget import PixelBudget
from facemux.service.c2pa import COMPOSITE, TRAINED
from facemux.service.settings import Settings
from facemux.v1 import provenance_service_pb2 as ppb
from facemux.v1 import provenance_service_pb2_grpc as pgrpc
from facemux.v1 import types_pb2

if TYPE_CHECKING:  # Verify, here and in `facemux verify --local`, runs without torch
    import torch
    from facemux.models.faces.gpu_codec import JpegCodec
    from facemux.service.store import Store

# The servicers name the payload hash and the source types through this module, the one
# place that decides what is marked and how.
__all__ = [
    "COMPOSITE",
    "TRAINED",
    "Provenance",
    "ProvenanceServicer",
    "payload_for",
    "verify_bytes",
]
payload_for = wm.payload_for

log = logging.getLogger(__name__)

RAW_NOTE = (
    "raw-pixel outputs carry the invisible watermark only: a C2PA manifest needs an encoded "
    "image (ask for PNG, JPEG or WebP to get one)"
)


class Provenance:
    """The server's marking policy (settings.provenance) and its signing key."""

    def __init__(self, settings: Settings, store: Store | None = None) -> None:
        self.mode = settings.provenance
        self.signer: c2pa.C2paSigner | None = None
        from facemux.service import __version__

        self.version = __version__
        if self.mode != "on":
            if self.mode == "off":
                log.warning("provenance is OFF: outputs carry neither watermark nor manifest")
            return
        if settings.provenance_key:
            config = c2pa.SignerConfig(
                Path(settings.provenance_cert).read_bytes(),
                Path(settings.provenance_key).read_bytes(),
            )
        else:
            if store is None:
                raise ValueError("provenance without provenance_key keeps its key in a store")
            config = c2pa.generated_signer(store.keys)
            log.warning(
                "C2PA manifests are signed with a generated TEST certificate (kept in %s), for "
                "testing only: verifiers report it as untrusted. Set provenance_key and "
                "provenance_cert to the operator's key and certificate chain.",
                store.keys,
            )
        self.signer = c2pa.C2paSigner(config)
        # The templates the outputs are signed from are made and validated now, not by the
        # first requests of each kind.
        for fmt in c2pa.TEMPLATE_FORMATS:
            for source_type in (TRAINED, COMPOSITE):
                self.signer.uses_template(fmt, source_type, self.version)

    @property
    def watermarks(self) -> bool:
        return self.mode != "off"

    def output(
        self,
        rgb: np.ndarray,
        output: types_pb2.OutputOptions,
        input_format: str,
        *,
        mark_id: str,
        request_id: str,
        source_type: str,
        alpha: np.ndarray | None = None,
        notes: list[str] | None = None,
        regions: Sequence[wm.Region] | None = None,
    ) -> types_pb2.Image:
        """Watermark, encode and sign one output image.

        mark_id goes into the watermark payload (hashed to 24 bits); request_id into the
        manifest, which covers the whole image. `regions` (a frame's swapped faces) confine
        the watermark: every other pixel stays the caller's. A raw output adds RAW_NOTE to
        `notes` (once)."""
        if self.watermarks:
            rgb = wm.embed_watermark(rgb, wm.payload_for(mark_id), regions)
        img = convert.image_to_proto(rgb, output, input_format, alpha)
        fmt = convert.output_format(output, input_format)
        return self._sign(img, fmt, request_id, source_type, notes)

    def outputs(
        self,
        faces: np.ndarray,
        output: types_pb2.OutputOptions,
        input_formats: list[str],
        *,
        mark_ids: list[str],
        request_id: str,
        source_type: str,
        notes: list[str] | None = None,
        marked: bool = False,
    ) -> list[types_pb2.Image]:
        """``output`` for a batch of model faces (N, R, R, 3), watermarked in one vectorised
        pass (each with its own mark id) unless `marked` says that was done already (by the
        model's worker, on the model's device)."""
        if self.watermarks and not marked:
            faces = wm.embed_watermark_batch(faces, [wm.payload_for(m) for m in mark_ids])
        out = []
        for rgb, input_format in zip(faces, input_formats, strict=True):
            img = convert.image_to_proto(rgb, output, input_format)
            fmt = convert.output_format(output, input_format)
            out.append(self._sign(img, fmt, request_id, source_type, notes))
        return out

    def output_on_device(
        self,
        rgb: torch.Tensor,
        jpeg: JpegCodec,
        output: types_pb2.OutputOptions,
        input_format: str,
        *,
        mark_id: str,
        request_id: str,
        source_type: str,
        regions: Sequence[wm.Region] | None = None,
    ) -> types_pb2.Image | None:
        """``output`` for a frame still on the GPU (uint8 (3, H, W)) when it leaves as JPEG:
        marked and encoded there by nvjpeg, signed on the host. None when the output is not a
        JPEG or nvjpeg failed: the caller then uses ``output`` with the host copy."""
        if convert.output_format(output, input_format) != "JPEG":
            return None
        quality = convert.output_quality(output)
        try:
            if self.watermarks:
                rgb = wm.embed_watermark_t(rgb, wm.payload_for(mark_id), regions)
            data = jpeg.encode(rgb, quality)
        except Exception:
            log.exception("nvjpeg encode failed; this frame is encoded on the host")
            return None
        return self._sign(types_pb2.Image(encoded=data), "JPEG", request_id, source_type, None)

    def _sign(
        self,
        img: types_pb2.Image,
        fmt: str,
        request_id: str,
        source_type: str,
        notes: list[str] | None,
    ) -> types_pb2.Image:
        """Sign `img`, encoded just before as `fmt` (known, so its bytes are not sniffed)."""
        if self.signer is None:
            return img
        if img.WhichOneof("source") != "encoded":
            if notes is not None and RAW_NOTE not in notes:
                notes.append(RAW_NOTE)
            return img
        request_id = request_id[:128]  # caller-chosen: bound what goes into the manifest
        title = f"facemux-{request_id}.{fmt.lower()}"
        img.encoded = self.signer.sign(
            img.encoded, fmt, source_type, title, request_id, self.version
        )
        return img


def verify_bytes(
    data: bytes,
    max_pixels: int = 100_000_000,
    trust_anchors_pem: bytes | None = None,
    check_request_id: str = "",
) -> ppb.VerifyResponse:
    """Check one encoded image for a C2PA manifest and the facemux watermark, and whether
    the watermark is `check_request_id`'s (else the manifest's request's).

    Shared by the RPC and `facemux verify --local`, so both answer the same."""
    if not data:
        raise InvalidInputError("image is empty")
    # Header-first size check (and a clear error for non-images) before any parsing.
    decoded = imageio.decode_image(data, max_pixels, "max_verify_pixels")
    report = c2pa.read_c2pa(data, trust_anchors_pem)
    resp = ppb.VerifyResponse(
        manifest_present=report.present,
        manifest_valid=report.valid,
        issuer_trusted=report.trusted,
        issuer=report.issuer,
        signer=report.signer,
        digital_source_type=report.digital_source_type,
        generator=report.generator,
        request_id=report.request_id,
        manifest_errors=report.errors,
        manifest_summary=report.summary,
    )
    mark = wm.detect_watermark_full(decoded.rgb)
    resp.watermark_found = mark.found
    resp.watermark_confidence = mark.confidence
    if mark.payload is not None:
        resp.watermark_payload = mark.payload.hex()
    # The manifest's request id is only a hypothesis here (a manifest that fails validation
    # still names one): the pixels alone decide whether they carry its mark.
    resp.checked_request_id = check_request_id or report.request_id
    if resp.checked_request_id:
        expected = wm.payload_for(resp.checked_request_id)
        resp.watermark_matches_request = (
            mark.payload == expected
            if mark.payload is not None
            else wm.match_payload(decoded.rgb, expected) >= wm.MATCH_Z
        )
    return resp


class ProvenanceServicer(pgrpc.ProvenanceServiceServicer):
    def __init__(self, settings: Settings, budget: PixelBudget | None = None) -> None:
        self.settings = settings
        self.budget = budget if budget is not None else PixelBudget.from_settings(settings)

    @unary
    async def Verify(
        self, request: ppb.VerifyRequest, context: grpc.aio.ServicerContext
    ) -> ppb.VerifyResponse:
        if not request.image.encoded:
            raise InvalidInputError(
                "Verify needs an encoded image (PNG, JPEG or WebP): a manifest lives in "
                "the file, and raw pixels have none"
            )
        limit = self.settings.max_verify_pixels
        pixels = await asyncio.to_thread(
            convert.image_pixels, request.image, limit, "image", "max_verify_pixels"
        )
        return await self.budget.run(
            pixels,
            call_deadline(context),
            "Verify",
            verify_bytes,
            request.image.encoded,
            limit,
            None,
            request.check_request_id,
        )
