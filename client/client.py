"""A typed, synchronous client for the facemux API.

    with FacemuxClient("localhost:50051") as fm:
        fm.wait_ready()
        result = fm.swap_faces([open("face.png", "rb").read()], identity="alice")
        open("out.png", "wb").write(result.faces[0])

Images may be given as encoded file bytes, a path, or a uint8 numpy array (H, W, 3) RGB,
(H, W) gray or (H, W, 4) RGBA. Calls that fail raise a subclass of FacemuxRpcError.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, TypeVar

import grpc
import numpy as np
from facemux.client.errors import FacemuxRpcError, Unavailable, from_rpc_error
from facemux.v1 import identity_service_pb2 as ipb
from facemux.v1 import identity_service_pb2_grpc as igrpc
from facemux.v1 import provenance_service_pb2 as ppb
from facemux.v1 import provenance_service_pb2_grpc as pgrpc
from facemux.v1 import swap_service_pb2 as spb
from facemux.v1 import swap_service_pb2_grpc as sgrpc
from facemux.v1 import training_service_pb2 as tpb
from facemux.v1 import training_service_pb2_grpc as tgrpc
from facemux.v1 import types_pb2
from google.protobuf.timestamp_pb2 import Timestamp
from grpc_health.v1 import health_pb2, health_pb2_grpc

ImageLike = bytes | str | os.PathLike[str] | np.ndarray
T = TypeVar("T")
# Request metadata carrying the caller's request id; the server echoes it in the response
# headers (types.proto, "Request ids").
REQUEST_ID_HEADER = "x-request-id"
_CONSENT_TIMES = ("granted_at", "expires_at", "revoked_at")

_SERVICES = (
    "facemux.v1.SwapService",
    "facemux.v1.IdentityService",
    "facemux.v1.TrainingService",
    "facemux.v1.ProvenanceService",
)
_FORMATS = {
    "jpeg": types_pb2.IMAGE_FORMAT_JPEG,
    "jpg": types_pb2.IMAGE_FORMAT_JPEG,
    "png": types_pb2.IMAGE_FORMAT_PNG,
    "webp": types_pb2.IMAGE_FORMAT_WEBP,
    "raw": types_pb2.IMAGE_FORMAT_RAW,
}
_RAW_LAYOUTS = {
    1: types_pb2.PIXEL_LAYOUT_GRAY8,
    3: types_pb2.PIXEL_LAYOUT_RGB8,
    4: types_pb2.PIXEL_LAYOUT_RGBA8,
}


# For the readiness probe only: retry a refused connection every 50-100 ms, not after gRPC's
# default second (growing 1.6x per attempt).
_PROBE_BACKOFF = (
    ("grpc.initial_reconnect_backoff_ms", 50),
    ("grpc.min_reconnect_backoff_ms", 50),
    ("grpc.max_reconnect_backoff_ms", 100),
)


def _service_config(retries: int) -> str:
    # gRPC's own retry machinery: transparent, with backoff, and it never retries once the
    # server has started answering (so a non-idempotent call is not repeated half-done).
    return json.dumps(
        {
            "methodConfig": [
                {
                    "name": [{"service": s} for s in _SERVICES],
                    "retryPolicy": {
                        "maxAttempts": max(2, retries + 1),
                        "initialBackoff": "0.2s",
                        "maxBackoff": "5s",
                        "backoffMultiplier": 2,
                        "retryableStatusCodes": ["UNAVAILABLE"],
                    },
                }
            ]
        }
    )


def _pem(value: str | os.PathLike[str] | bytes | None) -> bytes | None:
    """PEM bytes from bytes or a file path."""
    if value is None or isinstance(value, bytes):
        return value
    return Path(value).read_bytes()


def image_to_proto(image: ImageLike) -> types_pb2.Image:
    if isinstance(image, np.ndarray):
        arr = np.ascontiguousarray(image)
        if arr.dtype != np.uint8:
            raise TypeError(f"image arrays must be uint8, got {arr.dtype}")
        channels = 1 if arr.ndim == 2 else arr.shape[2]
        if arr.ndim not in (2, 3) or channels not in _RAW_LAYOUTS:
            raise ValueError(f"image array shape {arr.shape} is not (H,W), (H,W,3) or (H,W,4)")
        return types_pb2.Image(
            raw=types_pb2.RawImage(
                width=arr.shape[1],
                height=arr.shape[0],
                layout=_RAW_LAYOUTS[channels],
                data=arr.tobytes(),
            )
        )
    if isinstance(image, (str, os.PathLike)):
        image = Path(image).read_bytes()
    return types_pb2.Image(encoded=bytes(image))


def image_bytes(img: types_pb2.Image) -> bytes:
    """Encoded bytes of a returned image (raw outputs come back as their pixel bytes)."""
    return img.encoded if img.WhichOneof("source") == "encoded" else img.raw.data


def timestamp(value: str | datetime) -> Timestamp:
    """A wire Timestamp from a datetime or ISO-8601 text; a date, or a time without a zone,
    is taken as UTC."""
    if isinstance(value, str):
        try:
            value = datetime.fromisoformat(value.strip().replace("Z", "+00:00"))
        except ValueError:
            raise ValueError(
                f"{value!r} is not an ISO-8601 date or time (e.g. 2026-01-31 or "
                "2026-01-31T12:00:00Z)"
            ) from None
    if value.tzinfo is None:
        value = value.replace(tzinfo=timezone.utc)
    ts = Timestamp()
    ts.FromDatetime(value)
    return ts


def consent_record(consent: dict[str, str] | None) -> types_pb2.ConsentRecord:
    """The wire consent record; a key it does not have is named with the ones it has.
    Times (granted_at, expires_at) may be ISO-8601 text or datetimes."""
    consent = consent or {}
    known = [f.name for f in types_pb2.ConsentRecord.DESCRIPTOR.fields]
    unknown = sorted(set(consent) - set(known))
    if unknown:
        raise ValueError(
            f"consent has no field {', '.join(map(repr, unknown))}; its fields are "
            f"{', '.join(known)}"
        )
    msg = types_pb2.ConsentRecord(
        **{k: str(v) for k, v in consent.items() if k not in _CONSENT_TIMES}
    )
    for k in _CONSENT_TIMES:
        if consent.get(k):
            try:
                getattr(msg, k).CopyFrom(timestamp(consent[k]))
            except ValueError as exc:
                raise ValueError(f"consent {k}: {exc}") from None
    return msg


def output_options(fmt: str | None, quality: int = 0) -> types_pb2.OutputOptions:
    if fmt is None:
        return types_pb2.OutputOptions(quality=quality)
    try:
        return types_pb2.OutputOptions(format=_FORMATS[fmt.lower()], quality=quality)
    except KeyError:
        raise ValueError(f"output format {fmt!r}: use one of {', '.join(_FORMATS)}") from None


@dataclass
class Latent:
    """One face's latent: float array (C, H, W) and the encoder that made it."""

    array: np.ndarray
    encoder_fingerprint: str

    @classmethod
    def from_proto(cls, msg: types_pb2.Latent) -> Latent:
        dtype = "<f2" if msg.format == types_pb2.LATENT_FORMAT_FLOAT16 else "<f4"
        arr = np.frombuffer(msg.data, dtype=dtype).reshape(tuple(msg.shape))
        return cls(arr, msg.encoder_fingerprint)

    def to_proto(self) -> types_pb2.Latent:
        arr = np.ascontiguousarray(self.array)
        if arr.dtype == np.float16:
            fmt, data = types_pb2.LATENT_FORMAT_FLOAT16, arr.astype("<f2").tobytes()
        else:
            fmt, data = types_pb2.LATENT_FORMAT_FLOAT32, arr.astype("<f4").tobytes()
        return types_pb2.Latent(
            shape=list(arr.shape),
            format=fmt,
            data=data,
            encoder_fingerprint=self.encoder_fingerprint,
        )


@dataclass
class SwapResult:
    faces: list[bytes]
    masks: list[bytes]
    frame: bytes | None
    faces_swapped: int
    identity: str
    identity_version: int
    notes: list[str]
    request_id: str
    response: spb.SwapResponse = field(repr=False)


@dataclass
class DecodeResult:
    faces: list[bytes]
    masks: list[bytes]
    identity_version: int
    request_id: str = ""  # recorded in the faces' provenance marks
    notes: list[str] = field(default_factory=list)


class FacemuxClient:
    def __init__(
        self,
        target: str = "127.0.0.1:50051",
        *,
        timeout: float = 60.0,
        retries: int = 4,
        credentials: grpc.ChannelCredentials | None = None,
        metadata: Sequence[tuple[str, str]] = (),
        max_message_bytes: int = 256 * 1024 * 1024,
        ca: str | os.PathLike[str] | bytes | None = None,
        cert: str | os.PathLike[str] | bytes | None = None,
        key: str | os.PathLike[str] | bytes | None = None,
        token: str | None = None,
        server_name: str | None = None,
        channel_options: Sequence[tuple[str, Any]] = (),
    ) -> None:
        """`ca` (PEM, path or bytes) turns TLS on; `cert`/`key` add a client certificate
        (mTLS); `token` is sent as `authorization: Bearer <token>` on every call;
        `server_name` overrides the name checked against the server certificate;
        `channel_options` are more gRPC channel arguments (e.g.
        ``("grpc.use_local_subchannel_pool", 1)``: a connection of this client's own rather
        than one shared with other clients of the same target, which a server run with
        `--processes` spreads by connection). A
        `x-request-id` in `metadata` goes with every call; the `request_id` argument of a
        method replaces it for that call."""
        options: list[tuple[str, Any]] = [
            ("grpc.enable_retries", 1),
            ("grpc.service_config", _service_config(retries)),
            ("grpc.max_receive_message_length", max_message_bytes),
            ("grpc.max_send_message_length", max_message_bytes),
        ]
        self.target = target
        self.timeout = timeout
        self.metadata = tuple(metadata)
        if token:
            self.metadata += (("authorization", f"Bearer {token.strip()}"),)
        if credentials is None and (ca is not None or cert is not None):
            credentials = grpc.ssl_channel_credentials(
                root_certificates=_pem(ca), private_key=_pem(key), certificate_chain=_pem(cert)
            )
        if server_name:
            options.append(("grpc.ssl_target_name_override", server_name))
        options.extend(channel_options)
        self._credentials = credentials
        self._options = options
        self._channel = self._new_channel(options)
        self.swap_stub = sgrpc.SwapServiceStub(self._channel)
        self.identity_stub = igrpc.IdentityServiceStub(self._channel)
        self.training_stub = tgrpc.TrainingServiceStub(self._channel)
        self.provenance_stub = pgrpc.ProvenanceServiceStub(self._channel)
        self._health = health_pb2_grpc.HealthStub(self._channel)

    def _new_channel(self, options: Sequence[tuple[str, Any]]) -> grpc.Channel:
        if self._credentials is not None:
            return grpc.secure_channel(self.target, self._credentials, options)
        return grpc.insecure_channel(self.target, options)

    # -- lifecycle ---------------------------------------------------------------------------

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> FacemuxClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _metadata(self, request_id: str = "") -> tuple[tuple[str, str], ...]:
        if not request_id:
            return self.metadata
        kept = tuple((k, v) for k, v in self.metadata if k != REQUEST_ID_HEADER)
        return (*kept, (REQUEST_ID_HEADER, request_id))

    def _call(
        self, method: Any, request: Any, timeout: float | None = None, request_id: str = ""
    ) -> Any:
        try:
            return method(
                request,
                timeout=self.timeout if timeout is None else timeout,
                metadata=self._metadata(request_id),
            )
        except grpc.RpcError as err:
            raise from_rpc_error(err) from None

    def health(self, service: str = "", timeout: float = 5.0) -> str:
        """SERVING, NOT_SERVING or SERVICE_UNKNOWN."""
        return self._health_status(self._health.Check, service, timeout)

    def _health_status(self, check: Any, service: str, timeout: float) -> str:
        resp = self._call(check, health_pb2.HealthCheckRequest(service=service), timeout)
        return str(health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status))

    def wait_ready(self, timeout: float = 60.0) -> None:
        """Block until the server reports SERVING (its model is loaded).

        The health checks go through a channel of their own that retries a refused
        connection within a tenth of a second. The client's channel keeps gRPC's reconnect
        backoff (a second, then longer), which would see a server that has just started
        listening up to seconds late; it connects once the server is up."""
        deadline = time.monotonic() + timeout
        last = "no answer"
        probe_options = [*self._options, *_PROBE_BACKOFF]
        with self._new_channel(probe_options) as probe:
            check = health_pb2_grpc.HealthStub(probe).Check
            while time.monotonic() < deadline:
                try:
                    wait = min(5.0, max(0.1, deadline - time.monotonic()))
                    last = self._health_status(check, "", wait)
                    if last == "SERVING":
                        break
                except Unavailable as exc:
                    last = exc.details
                except Exception as exc:  # a deadline while the server starts is not fatal
                    last = str(exc)
                time.sleep(0.05)
            else:
                raise Unavailable(
                    grpc.StatusCode.UNAVAILABLE,
                    f"{self.target} not ready after {timeout}s ({last})",
                )
        # wait_for_ready rides out a backoff this channel may be in; a connectivity watch
        # (channel_ready_future) would instead hold close() up to 200 ms.
        try:
            self._call(
                lambda req, **kw: self._health.Check(req, wait_for_ready=True, **kw),
                health_pb2.HealthCheckRequest(),
                max(0.1, deadline - time.monotonic()),
            )
        except FacemuxRpcError as exc:
            raise Unavailable(
                grpc.StatusCode.UNAVAILABLE,
                f"{self.target} answered SERVING but this client could not reach it: {exc.details}",
            ) from None

    # -- model -------------------------------------------------------------------------------

    def model_info(self) -> spb.GetModelInfoResponse:
        return self._call(self.swap_stub.GetModelInfo, spb.GetModelInfoRequest())

    def swap_faces(
        self,
        faces: Sequence[ImageLike],
        identity: str,
        version: int = 0,
        *,
        output_format: str | None = None,
        quality: int = 0,
        return_masks: bool = False,
        request_id: str = "",
        timeout: float | None = None,
    ) -> SwapResult:
        """Swap aligned face crops to `identity`; returns the swapped crops in order."""
        req = spb.SwapRequest(
            identity=identity,
            identity_version=version,
            faces=spb.FaceBatch(faces=[image_to_proto(f) for f in faces]),
            options=spb.SwapOptions(return_masks=return_masks),
            output=output_options(output_format, quality),
        )
        return self._swap_result(self._call(self.swap_stub.Swap, req, timeout, request_id))

    def swap_image(
        self,
        image: ImageLike,
        identity: str,
        version: int = 0,
        *,
        options: spb.SwapOptions | None = None,
        output_format: str | None = None,
        quality: int = 0,
        request_id: str = "",
        timeout: float | None = None,
    ) -> SwapResult:
        """Swap the faces of a full photo or video frame to `identity`."""
        req = spb.SwapRequest(
            identity=identity,
            identity_version=version,
            frame=image_to_proto(image),
            options=options or spb.SwapOptions(),
            output=output_options(output_format, quality),
        )
        return self._swap_result(self._call(self.swap_stub.Swap, req, timeout, request_id))

    @staticmethod
    def _swap_result(resp: spb.SwapResponse) -> SwapResult:
        return SwapResult(
            faces=[image_bytes(f) for f in resp.faces],
            masks=[image_bytes(m) for m in resp.masks],
            frame=image_bytes(resp.frame) if resp.HasField("frame") else None,
            faces_swapped=resp.faces_swapped,
            identity=resp.identity,
            identity_version=resp.identity_version,
            notes=list(resp.notes),
            request_id=resp.request_id,
            response=resp,
        )

    def swap_stream(
        self,
        frames: Iterable[ImageLike],
        identity: str,
        version: int = 0,
        *,
        aligned: bool = False,
        options: spb.SwapOptions | None = None,
        output_format: str | None = None,
        quality: int = 0,
        detect_every: int = 0,
        timeout: float | None = None,
        request_id: str = "",
    ) -> Iterator[spb.SwapStreamResponse]:
        """Stream frames through SwapStream; yields one response per frame, in order. The
        settings go in the first message only: they persist for the whole stream."""

        def requests() -> Iterator[spb.SwapStreamRequest]:
            for i, frame in enumerate(frames):
                req = spb.SwapStreamRequest(frame_index=i, frame=image_to_proto(frame))
                if i == 0:
                    req.identity = identity
                    req.identity_version = version
                    req.aligned = aligned
                    req.detect_every = detect_every
                    req.output.CopyFrom(output_options(output_format, quality))
                    req.options.CopyFrom(options or spb.SwapOptions())
                yield req

        call = self.swap_stub.SwapStream(
            requests(), timeout=timeout, metadata=self._metadata(request_id)
        )
        try:
            yield from call
        except grpc.RpcError as err:
            raise from_rpc_error(err) from None
        finally:
            call.cancel()

    def encode(
        self, faces: Sequence[ImageLike], dtype: str = "float32", *, request_id: str = ""
    ) -> list[Latent]:
        formats = {
            "float32": types_pb2.LATENT_FORMAT_FLOAT32,
            "float16": types_pb2.LATENT_FORMAT_FLOAT16,
        }
        if dtype not in formats:
            raise ValueError("dtype must be float32 or float16")
        req = spb.EncodeRequest(faces=[image_to_proto(f) for f in faces], format=formats[dtype])
        resp = self._call(self.swap_stub.Encode, req, request_id=request_id)
        return [Latent.from_proto(m) for m in resp.latents]

    def decode(
        self,
        latents: Sequence[Latent | types_pb2.Latent],
        identity: str,
        version: int = 0,
        *,
        output_format: str | None = None,
        return_masks: bool = False,
        request_id: str = "",
    ) -> DecodeResult:
        msgs = [lat.to_proto() if isinstance(lat, Latent) else lat for lat in latents]
        req = spb.DecodeRequest(
            latents=msgs,
            identity=identity,
            identity_version=version,
            output=output_options(output_format),
            return_masks=return_masks,
        )
        resp = self._call(self.swap_stub.Decode, req, request_id=request_id)
        return DecodeResult(
            faces=[image_bytes(f) for f in resp.faces],
            masks=[image_bytes(m) for m in resp.masks],
            identity_version=resp.identity_version,
            request_id=resp.request_id,
            notes=list(resp.notes),
        )

    # -- identities --------------------------------------------------------------------------

    def register_identity(
        self,
        name: str,
        checkpoint: bytes | str | os.PathLike[str],
        *,
        display_name: str = "",
        make_default: bool = True,
        consent: dict[str, str] | None = None,
        chunk_size: int = 1024 * 1024,
        timeout: float | None = None,
        request_id: str = "",
    ) -> ipb.RegisterIdentityResponse:
        """Upload a decoder checkpoint (safetensors) as a new version of `name`."""
        data = checkpoint if isinstance(checkpoint, bytes) else Path(checkpoint).read_bytes()
        meta = ipb.RegisterIdentityMetadata(
            name=name,
            display_name=display_name,
            make_default=make_default,
            size_bytes=len(data),
            sha256=hashlib.sha256(data).hexdigest(),
            consent=consent_record(consent),
        )

        def parts() -> Iterator[ipb.RegisterIdentityRequest]:
            yield ipb.RegisterIdentityRequest(metadata=meta)
            for i in range(0, len(data), chunk_size):
                yield ipb.RegisterIdentityRequest(chunk=data[i : i + chunk_size])

        return self._call(self.identity_stub.RegisterIdentity, parts(), timeout, request_id)

    def list_identities(self, page_size: int = 100) -> list[ipb.Identity]:
        out: list[ipb.Identity] = []
        token = ""
        while True:
            resp = self._call(
                self.identity_stub.ListIdentities,
                ipb.ListIdentitiesRequest(page_size=page_size, page_token=token),
            )
            out.extend(resp.identities)
            token = resp.next_page_token
            if not token:
                return out

    def get_identity(self, name: str) -> ipb.Identity:
        return self._call(
            self.identity_stub.GetIdentity, ipb.GetIdentityRequest(name=name)
        ).identity

    def delete_identity(self, name: str, version: int = 0) -> ipb.DeleteIdentityResponse:
        return self._call(
            self.identity_stub.DeleteIdentity, ipb.DeleteIdentityRequest(name=name, version=version)
        )

    def set_default_version(self, name: str, version: int) -> ipb.Identity:
        return self._call(
            self.identity_stub.SetDefaultVersion,
            ipb.SetDefaultVersionRequest(name=name, version=version),
        ).identity

    def revoke_consent(self, name: str, reason: str = "") -> ipb.Identity:
        return self._call(
            self.identity_stub.RevokeConsent, ipb.RevokeConsentRequest(name=name, reason=reason)
        ).identity

    def record_consent(self, name: str, consent: dict[str, str]) -> ipb.Identity:
        """Put a new consent record in force for an existing identity (admin): the old one
        goes to its consent_history, and a revocation is lifted."""
        return self._call(
            self.identity_stub.RecordConsent,
            ipb.RecordConsentRequest(name=name, consent=consent_record(consent)),
        ).identity

    def verify(
        self, image: bytes | str | os.PathLike[str], check_request_id: str = ""
    ) -> ppb.VerifyResponse:
        """Provenance of an image file (bytes or path): its C2PA manifest and watermark, and
        whether the watermark is `check_request_id`'s (empty: the manifest's request's)."""
        data = image if isinstance(image, bytes) else Path(image).read_bytes()
        request = ppb.VerifyRequest(
            image=types_pb2.Image(encoded=data), check_request_id=check_request_id
        )
        return self._call(self.provenance_stub.Verify, request)

    # -- training ----------------------------------------------------------------------------

    def upload_dataset(
        self,
        name: str,
        images: Iterable[ImageLike],
        *,
        aligned: bool = False,
        timeout: float | None = None,
        request_id: str = "",
    ) -> tpb.UploadDatasetResponse:
        """Add photos (detected and aligned server-side) or aligned crops to a dataset.
        `images` is read lazily, one image per message as the upload goes."""

        def parts() -> Iterator[tpb.UploadDatasetRequest]:
            yield tpb.UploadDatasetRequest(
                metadata=tpb.UploadDatasetMetadata(name=name, aligned=aligned)
            )
            for img in images:
                yield tpb.UploadDatasetRequest(image=image_to_proto(img))

        return self._call(self.training_stub.UploadDataset, parts(), timeout, request_id)

    def list_datasets(self) -> list[tpb.Dataset]:
        return list(self._call(self.training_stub.ListDatasets, tpb.ListDatasetsRequest()).datasets)

    def delete_dataset(self, name: str) -> None:
        self._call(self.training_stub.DeleteDataset, tpb.DeleteDatasetRequest(name=name))

    def train(
        self,
        datasets: Sequence[str],
        *,
        identity: str = "",
        mode: str = "identity",
        preset: str = "",
        steps: int = 0,
        batch_size: int = 0,
        learning_rate: float = 0.0,
        encoder_learning_rate: float = 0.0,
        checkpoint_every: int = 0,
        seed: int = 0,
        consent: dict[str, str] | None = None,
        request_id: str = "",
    ) -> tpb.Job:
        """Start a job (mode "identity" or "pretrain"); zero values take server defaults."""
        modes = {"identity": tpb.TRAIN_MODE_IDENTITY, "pretrain": tpb.TRAIN_MODE_PRETRAIN}
        if mode not in modes:
            raise ValueError(f"mode {mode!r}: use identity or pretrain")
        req = tpb.TrainRequest(
            mode=modes[mode],
            identity=identity,
            datasets=list(datasets),
            preset=preset,
            hyper_parameters=tpb.TrainHyperParameters(
                steps=steps,
                batch_size=batch_size,
                learning_rate=learning_rate,
                encoder_learning_rate=encoder_learning_rate,
                checkpoint_every=checkpoint_every,
                seed=seed,
            ),
            consent=consent_record(consent),
        )
        return self._call(self.training_stub.Train, req, request_id=request_id).job

    def watch_job(
        self, job_id: str, timeout: float | None = None, replay: bool = False
    ) -> Iterator[tpb.WatchJobResponse]:
        """Progress events until the job ends (re-attach any time; stopping to read does not
        stop the job). ``replay``: every past event first. ``timeout`` bounds the whole
        stream; None = no bound."""
        call = self.training_stub.WatchJob(
            tpb.WatchJobRequest(id=job_id, replay=replay), timeout=timeout, metadata=self.metadata
        )
        try:
            yield from call
        except grpc.RpcError as err:
            raise from_rpc_error(err) from None
        finally:
            call.cancel()

    def get_job(self, job_id: str) -> tpb.Job:
        return self._call(self.training_stub.GetJob, tpb.GetJobRequest(id=job_id)).job

    def list_jobs(self, states: Sequence[int] = ()) -> list[tpb.Job]:
        return list(
            self._call(self.training_stub.ListJobs, tpb.ListJobsRequest(states=list(states))).jobs
        )

    def cancel_job(self, job_id: str) -> tpb.Job:
        return self._call(self.training_stub.CancelJob, tpb.CancelJobRequest(id=job_id)).job
