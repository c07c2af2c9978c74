"""SwapService: validate a request, resolve the identity, run the model through the
scheduler and answer with marked outputs."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
import uuid
from collections.abc import AsyncIterator, Hashable
from dataclasses import dataclass
from typing import Any

import grpc
import numpy as np
from facemux.models import imageio
from facemux.models.errors import InvalidInputError, NotFoundError, PreconditionError
from facemux.models.faces import DETECTOR_LICENCES, LANDMARK_LICENCES, FaceTracker
from facemux.models.imageio import DecodedImage
from facemux.service import convert
from facemux.service import provenance as prov
from facemux.service.boundary import call_deadline, streaming, unary
from facemux.service.budget import PixelBudget
from facemux.service.consent import check_usable
from facemux.service.errors import status_for
from facemux.service.frames import DeviceImage, FrameOutcome, FramePipeline
from facemux.service.metrics import Metrics
from facemux.service.provenance import Provenance
from facemux.service.request_ids import current_request_id
from facemux.service.runtime import ResidentDecoder, Runtime
from facemux.service.scheduler import Item, Op, Result, Scheduler
from facemux.service.settings import Settings
from facemux.service.store import IdentityRecord, Store, validate_name
from facemux.v1 import swap_service_pb2 as spb
from facemux.v1 import swap_service_pb2_grpc as sgrpc
from facemux.v1 import types_pb2

log = logging.getLogger(__name__)

InputCrop = tuple[int, int, str]  # (width, height, format) of an aligned crop as sent


@dataclass
class _Seen:
    """An identity as a stream last resolved it, and the store's stamp taken before that."""

    name: str
    version: int  # as asked: 0 = the default
    record: IdentityRecord
    resident: ResidentDecoder
    stamp: Hashable


class IdentityMemo:
    """Per SwapStream: the identity's record and decoder, reused from frame to frame while the
    store's stamp of the identity is unchanged (two stats instead of reading and parsing the
    record for every frame). Any change to the record (a revocation, a deletion, a new
    default) changes the stamp, so the next frame reads it again and sees it."""

    def __init__(self) -> None:
        self.seen: _Seen | None = None


# Identities whose records unary calls reuse at once; more are read from the store each time.
MAX_SHARED_MEMOS = 1024

# Aligned crops of at most this many pixels in all (one 128x128 crop, four 64x64 ones) are
# decoded on the event loop when their identity is at hand: about 0.1 ms of decoding on a
# 2-core CPU, no more than the worker-thread hop it saves costs in CPU, and less in latency.
INLINE_DECODE_PIXELS = 128 * 128


class SwapServicer(sgrpc.SwapServiceServicer):
    def __init__(
        self,
        settings: Settings,
        runtime: Runtime,
        store: Store,
        scheduler: Scheduler,
        metrics: Metrics | None = None,
        provenance: Provenance | None = None,
        budget: PixelBudget | None = None,
    ) -> None:
        self.settings = settings
        # Decoded pixels in flight, shared with the other servicers of the server.
        self.budget = budget if budget is not None else PixelBudget.from_settings(settings)
        self.runtime = runtime
        self.store = store
        self.scheduler = scheduler
        # Watermark + C2PA manifest on every generated image (models/provenance.py).
        self.provenance = provenance if provenance is not None else Provenance(settings, store)
        # A private, unexposed registry when none is given (servicer built alone in tests).
        self.metrics = metrics if metrics is not None else Metrics()
        self.frames = FramePipeline(
            settings, scheduler, str(runtime.device), on_detection=self.metrics.observe_detection
        )
        # Unary calls share one memo per (identity, version): the record is read again only
        # when the store's stamp of it changes, as in a stream.
        self._memos: dict[tuple[str, int], IdentityMemo] = {}
        self._memos_lock = threading.Lock()

    # -- helpers ---------------------------------------------------------------------------

    def _shared_memo(self, name: str, version: int) -> IdentityMemo:
        with self._memos_lock:
            memo = self._memos.get((name, version))
            if memo is None:
                if len(self._memos) >= MAX_SHARED_MEMOS:  # oldest first: a bound, not an LRU
                    del self._memos[next(iter(self._memos))]
                memo = self._memos[(name, version)] = IdentityMemo()
            return memo

    def _count(self, n: int, what: str) -> None:
        if n == 0:
            raise InvalidInputError(f"no {what} in the request; send at least one")
        limit = self.settings.max_faces_per_request
        if n > limit:
            raise InvalidInputError(
                f"{n} {what} in one request, over the limit of {limit}; split the batch"
            )

    def _memo_hit(
        self, name: str, version: int, memo: IdentityMemo | None
    ) -> tuple[IdentityMemo, Hashable | None, ResidentDecoder | None]:
        """(memo, the store's stamp, the resident decoder when the memo holds it still):
        the checks of `_resolve` that read no record (two stats at most), cheap enough for
        the event loop."""
        self.runtime.encoder()  # UNAVAILABLE while loading, before anything else
        if not name:
            raise InvalidInputError("identity is required: name the identity to draw")
        if memo is None:
            memo = self._shared_memo(validate_name(name), version)
        # Taken before the record is read: a write between the two changes the stamp after
        # the record was read, so the next call reads it again.
        stamp = self.store.stamp(name)
        seen = memo.seen
        if (
            seen is not None
            and stamp is not None
            and (seen.name, seen.version, seen.stamp) == (name, version, stamp)
            # Still resident: a decoder evicted from the cache is not kept alive here.
            and self.runtime.cache.get((name, seen.resident.version.version)) is seen.resident
        ):
            check_usable(seen.record)  # expiry is a matter of time, not of the record
            return memo, stamp, seen.resident
        return memo, stamp, None

    def _resolve(
        self, name: str, version: int, memo: IdentityMemo | None = None
    ) -> ResidentDecoder:
        """The identity's decoder, after its consent check: one read of its record (the
        store validates the name), handed on to the runtime rather than read again."""
        memo, stamp, resident = self._memo_hit(name, version, memo)
        if resident is not None:
            return resident
        rec = self.store.get(name)
        check_usable(rec)
        resident = self.runtime.decoder(name, version, rec)
        memo.seen = None if stamp is None else _Seen(name, version, rec, resident, stamp)
        return resident

    def _face_pixels(self, faces: Any) -> list[int]:
        return convert.request_pixels(
            faces, self.settings.max_image_pixels, self.settings.max_request_pixels, "faces"
        )

    def _decode_crops(self, images: Any) -> tuple[np.ndarray, list[bool], list[InputCrop]]:
        """Crops decoded one at a time, each resized to the model's resolution and dropped
        before the next: a request holds one full-size image at a time, whatever its count."""
        res = self.runtime.model_config().resolution
        batch = np.empty((len(images), res, res, 3), dtype=np.uint8)
        resized: list[bool] = []
        inputs: list[InputCrop] = []
        for i, img in enumerate(images):
            d = convert.image_from_proto(img, self.settings.max_image_pixels, f"faces[{i}]")
            h, w = d.rgb.shape[:2]
            batch[i], was = imageio.resize_square(d.rgb, res)
            resized.append(was)
            inputs.append((w, h, d.format))
            del d
        return batch, resized, inputs

    async def _decode_faces(
        self, faces: Any, sizes: list[int], deadline: float | None
    ) -> tuple[np.ndarray, list[bool], list[InputCrop]]:
        # One full-size image at a time (_decode_crops): the largest is what the call holds.
        return await self.budget.run(
            max(sizes), deadline, f"{len(sizes)} faces", self._decode_crops, faces
        )

    def _prepare_swap(
        self, identity: str, version: int, faces: Any, memo: IdentityMemo | None
    ) -> tuple[ResidentDecoder, np.ndarray, list[bool], list[InputCrop]]:
        """The identity's decoder and the decoded crops, in one worker-thread hop."""
        resident = self._resolve(identity, version, memo)
        return (resident, *self._decode_crops(faces))

    def _prepare_inline(
        self, identity: str, version: int, faces: Any, memo: IdentityMemo | None, pixels: int
    ) -> tuple[ResidentDecoder, np.ndarray, list[bool], list[InputCrop]] | None:
        """`_prepare_swap` on the event loop, for small crops of an identity whose record
        and decoder are at hand: a thread hop (two wake-ups, a future, a task) cost more
        than decoding them. None when that does not hold, taking nothing."""
        if pixels > INLINE_DECODE_PIXELS:
            return None
        _, _, resident = self._memo_hit(identity, version, memo)
        if resident is None or not self.budget.try_acquire(pixels):
            return None
        try:
            return (resident, *self._decode_crops(faces))
        finally:
            self.budget.release(pixels)

    def _swap_response(
        self,
        identity: str,
        resident: ResidentDecoder,
        inputs: list[InputCrop],
        resized: list[bool],
        result: Result,
        options: spb.SwapOptions,
        output: types_pb2.OutputOptions,
        request_id: str = "",
        mark_id: str = "",
    ) -> spb.SwapResponse:
        assert result.faces is not None
        notes: list[str] = []
        res = self.runtime.model_config().resolution
        resp = spb.SwapResponse(
            identity=identity,
            identity_version=resident.version.version,
            model_resolution=res,
            faces_swapped=len(inputs),
        )
        resp.faces.extend(
            self.provenance.outputs(
                result.faces,
                output,
                [fmt for _, _, fmt in inputs],
                mark_ids=[mark_id or request_id] * len(inputs),
                request_id=request_id,
                source_type=prov.TRAINED,
                notes=notes,
                marked=True,  # by the model's worker (Item.marks)
            )
        )
        for i, (w, h, _) in enumerate(inputs):
            resp.results.append(
                spb.FaceResult(
                    index=i,
                    confidence=1.0,
                    swapped=True,
                    resized=resized[i],
                    input_width=w,
                    input_height=h,
                )
            )
        if options.return_masks and result.masks is not None:
            resp.masks.extend(convert.mask_to_proto(m) for m in result.masks)
        n_resized = sum(resized)
        if n_resized:
            resp.notes.append(
                f"{n_resized} of {len(inputs)} crops were resized to the model's {res}x{res}"
            )
        resp.notes.extend(notes)
        return resp

    async def _swap_faces(
        self,
        identity: str,
        version: int,
        faces: Any,
        options: spb.SwapOptions,
        output: types_pb2.OutputOptions,
        deadline: float | None,
        request_id: str = "",
        mark_id: str = "",
        memo: IdentityMemo | None = None,
    ) -> spb.SwapResponse:
        clock = self.metrics.stage_clock()
        # Checks that read only the message and image headers (microseconds) run here; the
        # store read and the decoding share one worker-thread hop, holding the pixels.
        self.runtime.encoder()  # UNAVAILABLE while loading, before anything else
        self._count(len(faces), "faces")
        sizes = self._face_pixels(faces)

        def respond(result: Result) -> spb.SwapResponse:
            t0 = time.perf_counter()
            resp = self._swap_response(
                identity, resident, inputs, resized, result, options, output, request_id, mark_id
            )
            self.metrics.observe_stage("postprocess", time.perf_counter() - t0)
            return resp

        # Announced from here to submit: a batch forming meanwhile waits for these faces.
        with self.scheduler.expect(len(faces)):
            prepared = self._prepare_inline(identity, version, faces, memo, sum(sizes))
            if prepared is None:
                prepared = await self.budget.run(
                    max(sizes),
                    deadline,
                    f"{len(sizes)} faces",
                    self._prepare_swap,
                    identity,
                    version,
                    faces,
                    memo,
                )
            resident, batch, resized, inputs = prepared
            clock.lap("preprocess")
            # Encoded, watermarked and signed by the scheduler's finishing thread as soon as
            # the batch is computed: no further thread hop, and every face of the batch is
            # answered at once, so the next batch forms full. (queue_and_model includes
            # postprocess.)
            marks = None
            if self.provenance.watermarks:
                marks = [prov.payload_for(mark_id or request_id)] * len(inputs)
            result = await self.scheduler.run(
                Item(Op.SWAP, batch, resident.decoder, deadline, finish=respond, marks=marks)
            )
        clock.lap("queue_and_model")
        resp = result.finished
        assert isinstance(resp, spb.SwapResponse)
        self.metrics.faces_swapped(identity, resp.faces_swapped)
        return resp

    def _swap_frame(
        self,
        frame: types_pb2.Image,
        identity: str,
        version: int,
        options: spb.SwapOptions,
        output: types_pb2.OutputOptions,
        deadline: float | None,
        tracker: FaceTracker | None = None,
        request_id: str = "",
        mark_id: str = "",
        memo: IdentityMemo | None = None,
    ) -> tuple[types_pb2.Image, FrameOutcome, ResidentDecoder]:
        """One full frame, synchronously (runs in a worker thread)."""
        # Announced before the frame is decoded: a detection batch forming meanwhile waits
        # for it rather than leaving without it.
        with self.frames.expect_detection(options, tracker):
            resident = self._resolve(identity, version, memo)
            t0 = time.perf_counter()
            image: DecodedImage | DeviceImage | None = None
            if frame.WhichOneof("source") == "encoded":
                try:
                    image = self.frames.decode_jpeg(frame.encoded, self.settings.max_image_pixels)
                except InvalidInputError as exc:
                    raise InvalidInputError(f"frame: {exc}") from None
            on_gpu = image is not None
            if image is None:
                image = convert.image_from_proto(frame, self.settings.max_image_pixels, "frame")
            t1 = time.perf_counter()
            res = self.runtime.model_config().resolution
            out = self.frames.swap(image, resident.decoder, options, res, deadline, tracker)
            t2 = time.perf_counter()
            self.metrics.frame_codec("decode", "nvjpeg" if on_gpu else "host")
            if out.faces_swapped:
                # Only frames with a face drawn by the model are synthetic and get marked; a
                # frame returned unchanged (no face found) is the caller's own image.
                marks = {
                    "mark_id": mark_id or request_id,
                    "request_id": request_id,
                    "source_type": prov.COMPOSITE,
                    "regions": out.regions,  # the mark stays on the swapped faces
                }
                encoded = None
                if (
                    out.device_frame is not None
                    and self.frames.jpeg is not None
                    and image.alpha is None
                ):
                    encoded = self.provenance.output_on_device(
                        out.device_frame, self.frames.jpeg, output, image.format, **marks
                    )
                self.metrics.frame_codec("encode", "host" if encoded is None else "nvjpeg")
                if encoded is None:
                    encoded = self.provenance.output(
                        out.rgb, output, image.format, alpha=image.alpha, notes=out.notes, **marks
                    )
            else:
                encoded = self._unchanged_on_device(out, output, image.format, image.alpha)
                self.metrics.frame_codec("encode", "host" if encoded is None else "nvjpeg")
                if encoded is None:
                    encoded = convert.image_to_proto(out.rgb, output, image.format, image.alpha)
            out.timings["decode"] = t1 - t0
            out.timings["encode"] = time.perf_counter() - t2
            if out.frame is not None and out.frame.host_reads:
                self.metrics.frame_host_read(copied=out.frame.host_copies > 0)
            for stage, seconds in out.timings.items():
                self.metrics.observe_stage(stage, seconds)
            self.metrics.faces_swapped(identity, out.faces_swapped)
            self.metrics.frames_swapped()
            return encoded, out, resident

    def _unchanged_on_device(
        self,
        out: FrameOutcome,
        output: types_pb2.OutputOptions,
        input_format: str,
        alpha: np.ndarray | None,
    ) -> types_pb2.Image | None:
        """A frame without a swapped face that is still on the card, leaving as JPEG: encoded
        there by nvjpeg (not marked: it is the caller's own image), so it is not copied to
        the host for OpenCV either. None: encode the host copy instead."""
        jpeg = self.frames.jpeg
        if out.device_frame is None or jpeg is None or alpha is not None:
            return None
        if convert.output_format(output, input_format) != "JPEG":
            return None
        try:
            data = jpeg.encode(out.device_frame, convert.output_quality(output))
        except Exception:
            log.exception("nvjpeg encode failed; this frame is encoded on the host")
            return None
        return types_pb2.Image(encoded=data)

    async def _frame_pixels(self, frame: types_pb2.Image) -> int:
        """A full frame's pixels from its header: what its call holds of the budget while
        the frame is decoded, swapped and encoded."""
        return await asyncio.to_thread(
            convert.image_pixels, frame, self.settings.max_image_pixels, "frame"
        )

    # -- RPCs ------------------------------------------------------------------------------

    @unary
    async def Swap(
        self, request: spb.SwapRequest, context: grpc.aio.ServicerContext
    ) -> spb.SwapResponse:
        kind = request.WhichOneof("input")
        # The call's id (metadata x-request-id): the watermark payload and manifest carry it.
        request_id = current_request_id.get() or uuid.uuid4().hex
        if kind == "frame":
            deadline = call_deadline(context)
            img, out, resident = await self.budget.run(
                await self._frame_pixels(request.frame),
                deadline,
                "frame",
                self._swap_frame,
                request.frame,
                request.identity,
                request.identity_version,
                request.options,
                request.output,
                deadline,
                None,
                request_id,
            )
            return spb.SwapResponse(
                frame=img,
                results=out.results,
                faces_swapped=out.faces_swapped,
                identity=request.identity,
                identity_version=resident.version.version,
                model_resolution=self.runtime.model_config().resolution,
                notes=out.notes,
                request_id=request_id,
            )
        if kind != "faces":
            raise InvalidInputError("SwapRequest needs an input: a frame or aligned faces")
        resp = await self._swap_faces(
            request.identity,
            request.identity_version,
            request.faces.faces,
            request.options,
            request.output,
            call_deadline(context),
            request_id,
        )
        resp.request_id = request_id
        return resp

    @streaming
    async def SwapStream(
        self,
        request_iterator: AsyncIterator[spb.SwapStreamRequest],
        context: grpc.aio.ServicerContext,
    ) -> AsyncIterator[spb.SwapStreamResponse]:
        identity, version, aligned = "", 0, False
        options, output = spb.SwapOptions(), types_pb2.OutputOptions()
        tracker: FaceTracker | None = None  # per stream: tracks faces between detections
        detect_every = 0
        # Each frame's provenance marks carry "<the call's request id>:<frame index>".
        stream_id = current_request_id.get() or uuid.uuid4().hex[:16]
        memo = IdentityMemo()  # the identity's record is read again only when it changes
        async for req in request_iterator:
            # Settings persist until a message carries them again (field presence).
            if req.HasField("identity"):
                identity, version = req.identity, 0
            if req.HasField("identity_version"):
                version = req.identity_version
            if req.HasField("aligned"):
                aligned = req.aligned
            if req.HasField("options"):
                options = req.options
            if req.HasField("output"):
                output = req.output
            if req.HasField("detect_every") and req.detect_every != detect_every:
                detect_every, tracker = req.detect_every, None
            if not identity:
                raise InvalidInputError("the first SwapStream message must name the identity")
            mark = f"{stream_id}:{req.frame_index}"
            try:
                if aligned:
                    r = await self._swap_faces(
                        identity,
                        version,
                        [req.frame],
                        options,
                        output,
                        call_deadline(context),
                        mark,
                        memo=memo,
                    )
                    self.metrics.frames_swapped()
                    frame, results, n = r.faces[0], list(r.results), r.faces_swapped
                    used = r.identity_version
                else:
                    if tracker is None:
                        tracker = await asyncio.to_thread(self.frames.tracker, detect_every)
                    deadline = call_deadline(context)
                    frame, out, resident = await self.budget.run(
                        await self._frame_pixels(req.frame),
                        deadline,
                        "frame",
                        self._swap_frame,
                        req.frame,
                        identity,
                        version,
                        options,
                        output,
                        deadline,
                        tracker,
                        mark,
                        "",
                        memo,
                    )
                    results, n = out.results, out.faces_swapped
                    used = resident.version.version
            except (InvalidInputError, NotFoundError, PreconditionError) as exc:
                # A bad frame (or an identity that cannot be drawn now) fails alone; the
                # stream goes on, and a later message may name another identity.
                yield spb.SwapStreamResponse(
                    frame_index=req.frame_index,
                    error=spb.FrameError(code=status_for(exc).value[0], message=str(exc)),
                    identity=identity,
                )
                continue
            yield spb.SwapStreamResponse(
                frame_index=req.frame_index,
                frame=frame,
                results=results,
                faces_swapped=n,
                request_id=mark,
                identity=identity,
                identity_version=used,
            )

    def _prepare_encode(self, request: spb.EncodeRequest) -> list[int]:
        self.runtime.encoder()  # UNAVAILABLE while loading
        self._count(len(request.faces), "faces")
        if request.format not in (
            types_pb2.LATENT_FORMAT_UNSPECIFIED,
            types_pb2.LATENT_FORMAT_FLOAT32,
            types_pb2.LATENT_FORMAT_FLOAT16,
        ):
            raise InvalidInputError("format must be LATENT_FORMAT_FLOAT32 or LATENT_FORMAT_FLOAT16")
        return self._face_pixels(request.faces)

    @unary
    async def Encode(
        self, request: spb.EncodeRequest, context: grpc.aio.ServicerContext
    ) -> spb.EncodeResponse:
        deadline = call_deadline(context)
        with self.scheduler.expect(len(request.faces)):
            sizes = await asyncio.to_thread(self._prepare_encode, request)
            batch, resized, _ = await self._decode_faces(request.faces, sizes, deadline)
            result = await self.scheduler.run(Item(Op.ENCODE, batch, None, deadline))
        assert result.latents is not None
        fp = self.runtime.fingerprint
        return spb.EncodeResponse(
            latents=[convert.latent_to_proto(z, request.format, fp) for z in result.latents],
            encoder_fingerprint=fp,
            resized=resized,
            model_resolution=self.runtime.model_config().resolution,
        )

    def _prepare_decode(self, request: spb.DecodeRequest) -> tuple[np.ndarray, ResidentDecoder]:
        self.runtime.encoder()  # UNAVAILABLE while loading
        self._count(len(request.latents), "latents")
        cfg = self.runtime.model_config()
        fp = self.runtime.fingerprint
        z = np.stack(
            [
                convert.latent_from_proto(m, cfg.latent_shape, fp, i)
                for i, m in enumerate(request.latents)
            ]
        )
        return z, self._resolve(request.identity, request.identity_version)

    def _decode_response(
        self, request: spb.DecodeRequest, resident: ResidentDecoder, result: Result
    ) -> spb.DecodeResponse:
        assert result.faces is not None
        request_id = current_request_id.get() or uuid.uuid4().hex
        resp = spb.DecodeResponse(
            identity=request.identity,
            identity_version=resident.version.version,
            request_id=request_id,
        )
        notes: list[str] = []
        resp.faces.extend(
            self.provenance.output(
                f,
                request.output,
                "PNG",
                mark_id=request_id,
                request_id=request_id,
                source_type=prov.TRAINED,
                notes=notes,
            )
            for f in result.faces
        )
        resp.notes.extend(notes)
        if request.return_masks and result.masks is not None:
            resp.masks.extend(convert.mask_to_proto(m) for m in result.masks)
        return resp

    @unary
    async def Decode(
        self, request: spb.DecodeRequest, context: grpc.aio.ServicerContext
    ) -> spb.DecodeResponse:
        with self.scheduler.expect(len(request.latents)):
            z, resident = await asyncio.to_thread(self._prepare_decode, request)
            result = await self.scheduler.run(
                Item(Op.DECODE, z, resident.decoder, call_deadline(context))
            )
        resp = await asyncio.to_thread(self._decode_response, request, resident, result)
        self.metrics.faces_swapped(request.identity, len(resp.faces))
        return resp

    @unary
    async def GetModelInfo(
        self, request: spb.GetModelInfoRequest, context: grpc.aio.ServicerContext
    ) -> spb.GetModelInfoResponse:
        from facemux.service import __version__

        cfg = self.runtime.model_config()
        return spb.GetModelInfoResponse(
            encoder_fingerprint=self.runtime.fingerprint,
            preset=cfg.name,
            resolution=cfg.resolution,
            latent_shape=list(cfg.latent_shape),
            has_mask=cfg.mask_head,
            device=str(self.runtime.device),
            server_version=__version__,
            face_detector=self.settings.detector,
            face_models_licence=(
                f"detector: {DETECTOR_LICENCES[self.settings.detector]}; landmarks: "
                f"{LANDMARK_LICENCES[self.settings.landmark_points]}"
            ),
        )
