"""The TorchServe handler inside archives made by `facemux export torchserve`.

TorchServe loads this file from the archive and calls ``handle(data, context)`` with a batch
of requests (its own batching: ``batchSize``/``maxBatchDelay`` in the archive's
model-config.yaml). The networks, image codecs and provenance marks are facemux's own
(``facemux.models``), so TorchServe's Python environment needs facemux installed with the
server extra; this file imports neither grpc nor TorchServe.

One request = one aligned face. Its fields (gRPC ``input`` map keys, or multipart form
fields over REST; a raw REST body is the image):

    data       the face: JPEG or PNG bytes, or raw RGB8 pixels with width and height
    identity   which identity to draw (optional when the archive holds one); over REST also
               the header ``X-Facemux-Identity``
    width, height   for raw pixels (decimal text)
    request_id optional; goes into the watermark payload and the C2PA manifest

Each batch also reports its size as the TorchServe metric ``FacemuxBatchSize`` (one line per
batch through ``context.metrics``, like TorchServe's own ``PredictionTime``; in TorchServe's
default ``log`` metrics mode it lands in ``logs/model_metrics.log``), so the mean batch that
``batchSize``/``maxBatchDelay`` actually form can be read without touching the handler.

The answer is a PNG face (watermarked; C2PA-signed when the archive carries a signing key) or,
for a bad item, a JSON error object ``{"error": {"code": ..., "message": ...}}``. Over REST
the bad item also gets HTTP 400; over gRPC TorchServe answers every item of a batch with
status OK, so callers must check the body: `facemux.client.torchserve.prediction_image`
does, raising for an error body.
"""

from __future__ import annotations

import json
import logging
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import torch
from facemux.models import checkpoint, imageio, inference
from facemux.models import watermark as wm
from facemux.models.errors import FacemuxError, InvalidInputError, NotFoundError
from facemux.service import c2pa

log = logging.getLogger(__name__)

ARCHIVE_MANIFEST = "facemux-archive.json"
BATCH_SIZE_METRIC = "FacemuxBatchSize"
# gRPC code names, as the facemux server would answer the same mistakes.
_CODES = {InvalidInputError: "INVALID_ARGUMENT", NotFoundError: "NOT_FOUND"}


def _text(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, bytes | bytearray):
        return bytes(value).decode("utf-8", errors="replace").strip()
    return str(value).strip()


def error_body(exc: Exception) -> bytes:
    code = next((c for cls, c in _CODES.items() if isinstance(exc, cls)), "INTERNAL")
    message = str(exc) if isinstance(exc, FacemuxError) else "internal error in the handler"
    return json.dumps({"error": {"code": code, "message": message}}).encode()


class FacemuxHandler:
    def __init__(self) -> None:
        self.initialized = False
        self.encoder: torch.nn.Module | None = None
        self.decoders: dict[str, torch.nn.Module] = {}
        self.versions: dict[str, int] = {}
        self.resolution = 0
        self.max_pixels = 0
        self.device = torch.device("cpu")
        self.layout = "nchw"
        self.signer: c2pa.C2paSigner | None = None
        self.archive = ""

    def initialize(self, context: Any) -> None:
        props = context.system_properties
        model_dir = Path(props["model_dir"])
        manifest = json.loads((model_dir / ARCHIVE_MANIFEST).read_text())
        gpu = props.get("gpu_id")
        if torch.cuda.is_available() and gpu is not None:
            self.device = torch.device(f"cuda:{gpu}")
        fingerprint = manifest["encoder_fingerprint"]
        self.encoder, meta = checkpoint.load_encoder(model_dir / manifest["encoder"], self.device)
        if meta.fingerprint != fingerprint:
            raise RuntimeError("the archive's encoder does not match its manifest")
        for name, entry in manifest["identities"].items():
            self.decoders[name], _ = checkpoint.load_decoder(
                model_dir / entry["file"], self.device, expected_encoder_fingerprint=fingerprint
            )
            self.versions[name] = int(entry["version"])
        self.resolution = meta.config.resolution
        if self.device.type == "cpu" and self.decoders:
            # The layout facemux's own server would pick for this model (Runtime.load).
            first, *rest = self.decoders.values()
            self.layout, _ = inference.faster_layout(self.encoder, first, self.resolution)
            for decoder in rest:
                inference.set_layout(decoder, self.layout)
        self.max_pixels = int(manifest["max_image_pixels"])
        self.archive = str(manifest.get("model_name", "facemux"))
        signing = manifest.get("c2pa")
        if signing:
            self.signer = c2pa.C2paSigner(
                c2pa.SignerConfig(
                    (model_dir / signing["cert"]).read_bytes(),
                    (model_dir / signing["key"]).read_bytes(),
                )
            )
        self.initialized = True
        log.info(
            "facemux archive %s: encoder %s, identities %s on %s (%s), %d torch threads",
            self.archive,
            fingerprint[:12],
            ", ".join(f"{n} v{v}" for n, v in self.versions.items()),
            self.device,
            self.layout,
            torch.get_num_threads(),
        )

    # -- one batch ----------------------------------------------------------------------------

    def _parse(self, row: dict[str, Any], context: Any, idx: int) -> tuple[str, np.ndarray, str]:
        data = row.get("data")
        if data is None:
            data = row.get("body")
        if not isinstance(data, bytes | bytearray) or not data:
            raise InvalidInputError(
                "send the face as 'data' (JPEG, PNG or raw RGB8 bytes); over REST a raw body "
                "needs Content-Type image/png, image/jpeg or application/octet-stream (a form "
                "content type makes TorchServe parse the image as form fields)"
            )
        identity = _text(row.get("identity"))
        if not identity and context is not None:
            identity = _text(context.get_request_header(idx, "X-Facemux-Identity"))
        if not identity and len(self.decoders) == 1:
            identity = next(iter(self.decoders))
        if identity not in self.decoders:
            have = ", ".join(sorted(self.decoders))
            raise (InvalidInputError if not identity else NotFoundError)(
                f"identity {identity[:64]!r} is not in this archive (it holds: {have})"
                if identity
                else f"name the identity ('identity' field); this archive holds: {have}"
            )
        width, height = _text(row.get("width")), _text(row.get("height"))
        if width or height:
            if not (width.isdigit() and height.isdigit()):
                raise InvalidInputError("width and height of raw pixels must be whole numbers")
            rgb = imageio.decode_raw(bytes(data), int(width), int(height), "RGB8", self.max_pixels)
        else:
            rgb = imageio.decode_image(bytes(data), self.max_pixels)
        request_id = _text(row.get("request_id"))[:128]
        if not request_id:
            request_id = (context.get_request_id(idx) if context is not None else "") or ""
        return identity, rgb.rgb, request_id or uuid.uuid4().hex

    @torch.inference_mode()
    def _swap(self, faces: list[np.ndarray], identities: list[str]) -> np.ndarray:
        assert self.encoder is not None
        x, _ = inference.faces_to_tensor(faces, self.resolution, self.device)
        x = x.contiguous(memory_format=inference.LAYOUTS[self.layout])
        # The shared encoder runs once over the whole batch, whatever the identities; each
        # decoder draws its own rows.
        z = self.encoder(x)
        out = torch.empty_like(x)
        for name in sorted(set(identities)):
            rows = [i for i, n in enumerate(identities) if n == name]
            index = torch.tensor(rows, device=z.device)
            rgb, _ = self.decoders[name](z.index_select(0, index))
            out.index_copy_(0, index, rgb.to(out.dtype))
        return inference.tensor_to_images(out)

    def _output(self, rgb: np.ndarray, request_id: str) -> bytes:
        marked = wm.embed_watermark(rgb, wm.payload_for(request_id))
        png = imageio.encode_image(marked, "PNG")
        if self.signer is None:
            return png
        return self.signer.sign(
            png, "PNG", c2pa.TRAINED, f"facemux-{request_id}.png", request_id, self.archive
        )

    def handle(self, data: list[dict[str, Any]], context: Any) -> list[bytes]:
        _report_batch_size(context, len(data))
        answers: list[bytes] = [b""] * len(data)
        good: list[tuple[int, str, np.ndarray, str]] = []
        for i, row in enumerate(data):
            try:
                good.append((i, *self._parse(row, context, i)))
            except Exception as exc:  # one bad item fails alone
                answers[i] = self._fail(context, i, exc)
        if good:
            try:
                swapped = self._swap([g[2] for g in good], [g[1] for g in good])
                for (i, _, _, request_id), rgb in zip(good, swapped, strict=True):
                    answers[i] = self._output(rgb, request_id)
                    if context is not None:
                        context.set_response_content_type(i, "image/png")
            except Exception as exc:
                log.exception("facemux batch failed")
                for i, *_ in good:
                    answers[i] = self._fail(context, i, exc)
        return answers

    def _fail(self, context: Any, idx: int, exc: Exception) -> bytes:
        if not isinstance(exc, FacemuxError):
            log.exception("facemux item %d failed", idx, exc_info=exc)
        if context is not None:
            status = 404 if isinstance(exc, NotFoundError) else 400
            if not isinstance(exc, FacemuxError):
                status = 500
            context.set_response_status(status, "facemux error", idx)
            context.set_response_content_type(idx, "application/json")
        return error_body(exc)


def _report_batch_size(context: Any, size: int) -> None:
    metrics = getattr(context, "metrics", None)
    if metrics is None:
        return
    try:
        # A fresh dimensions list each call: TorchServe appends its default dimensions to the
        # list it is given (a shared default list would grow by two entries per batch).
        metrics.add_metric(BATCH_SIZE_METRIC, size, "count", dimensions=[])
    except Exception:  # a metrics failure must not fail the batch
        log.debug("could not report the batch size", exc_info=True)


_service = FacemuxHandler()


def handle(data: list[dict[str, Any]] | None, context: Any) -> list[bytes] | None:
    """TorchServe's entry point."""
    if not _service.initialized:
        _service.initialize(context)
    if data is None:
        return None
    return _service.handle(data, context)
