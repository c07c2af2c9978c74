"""TrainingService: datasets and training jobs over gRPC.

Everything that touches disk or images runs in a thread (asyncio.to_thread); the event loop
only parses and answers. Requests are validated completely before a job is queued, so a bad
request costs nothing and never leaves a job behind.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
from facemux.models import checkpoint
from facemux.models.errors import (
    InvalidInputError,
    NotFoundError,
    PreconditionError,
    ResourceExhaustedError,
    UnavailableError,
)
from facemux.models.pretrain import (
    DEFAULT_BATCH,
    DEFAULT_CHECKPOINT_EVERY,
    DEFAULT_LR,
    DEFAULT_PRESET,
    DEFAULT_STEPS,
    JobSpec,
    validate_hyper_parameters,
)
from facemux.service import convert
from facemux.service.audit import AuditLog
from facemux.service.auth import current_caller
from facemux.service.boundary import call_deadline, streaming, unary
from facemux.service.budget import PixelBudget
from facemux.service.consent import consent_for_upload, consent_from_proto
from facemux.service.errors import status_for
from facemux.service.metrics import Metrics
from facemux.service.request_ids import current_request_id
from facemux.service.runtime import Runtime
from facemux.service.settings import Settings
from facemux.service.store import Store, VersionRecord, validate_name
from facemux.service.training.datasets import (
    DatasetInfo,
    DatasetStore,
    Upload,
    rejection_reason,
)
from facemux.service.training.jobs import TERMINAL, JobManager, JobRecord
from facemux.v1 import training_service_pb2 as tpb
from facemux.v1 import training_service_pb2_grpc as tgrpc

log = logging.getLogger(__name__)

_MODES = {tpb.TRAIN_MODE_IDENTITY: "identity", tpb.TRAIN_MODE_PRETRAIN: "pretrain"}
_MODE_PROTO = {v: k for k, v in _MODES.items()}
_STATES = {
    "queued": tpb.JOB_STATE_QUEUED,
    "running": tpb.JOB_STATE_RUNNING,
    "succeeded": tpb.JOB_STATE_SUCCEEDED,
    "failed": tpb.JOB_STATE_FAILED,
    "cancelled": tpb.JOB_STATE_CANCELLED,
}
_STATE_NAMES = {v: k for k, v in _STATES.items()}
# Unset checkpoint_every: also at most one checkpoint per this much training (the other
# defaults for zero-valued hyper-parameters are the jobs' own, facemux.models.pretrain).
DEFAULT_CHECKPOINT_SECONDS = 10.0
DEFAULT_RESOLUTION = 64  # datasets uploaded before any encoder is served
CANCEL_GRACE_S = 0.02
WATCH_RECHECK_S = 5.0  # a WatchJob stream re-reads its job at least this often


def dataset_to_proto(d: DatasetInfo) -> tpb.Dataset:
    return tpb.Dataset(
        name=d.name,
        faces=d.faces,
        content_hash=d.content_hash,
        resolution=d.resolution,
        updated_at=convert.timestamp(d.updated_at),
    )


def job_to_proto(rec: JobRecord) -> tpb.Job:
    return tpb.Job(
        id=rec.id,
        mode=_MODE_PROTO.get(rec.mode, tpb.TRAIN_MODE_UNSPECIFIED),
        state=_STATES.get(rec.state, tpb.JOB_STATE_UNSPECIFIED),
        identity=rec.identity,
        datasets=rec.datasets,
        step=rec.step,
        steps=rec.steps,
        error=rec.error,
        created_at=convert.timestamp(rec.created_at),
        updated_at=convert.timestamp(rec.updated_at),
        result_version=rec.result_version,
        encoder_fingerprint=rec.encoder_fingerprint,
    )


class Training:
    """The datasets store, the job manager and what registers a finished job's result."""

    def __init__(
        self,
        settings: Settings,
        store: Store,
        runtime: Runtime,
        metrics: Metrics | None = None,
        audit: AuditLog | None = None,
    ) -> None:
        self.settings = settings
        self.store = store
        self.runtime = runtime
        self.metrics = metrics
        # Every identity version a job adds (or is refused) gets a line, as an upload does.
        self.audit = audit
        self.datasets = DatasetStore(store.datasets_dir(), settings)
        self.jobs = JobManager(
            store.jobs_dir(),
            self._finish,
            max_running=settings.max_running_jobs,
            max_queued=settings.max_queued_jobs,
            worker_threads=settings.training_threads,
            lease_s=settings.training_lease_seconds,
            scan_s=settings.training_scan_seconds,
            on_change=self._report if metrics is not None else None,
        )

    def _report(self, jobs: JobManager) -> None:
        assert self.metrics is not None
        self.metrics.set_training_jobs(jobs.counts())
        for rec in jobs.own_running():  # each replica reports the jobs it runs
            p = jobs.latest_progress(rec.id)
            if p:
                loss = float(p.get("losses", {}).get("total", 0.0))
                self.metrics.training_progress(
                    rec.id, float(p.get("examples_per_second", 0.0)), loss
                )

    def _finish(self, rec: JobRecord, work: Path, result: dict[str, Any]) -> tuple[int, str]:
        """Publish a succeeded run: a trained encoder by fingerprint, each decoder as a new
        identity version (source "trained", the job id). An identity that did not exist is
        created with the request's consent; an existing one keeps its own. The store refuses
        a version when the identity was revoked, deleted or created since the job was
        submitted; the job then fails saying so, having registered nothing for it."""
        if self.metrics is not None:
            self.metrics.training_finished(rec.id)
        fp = str(result.get("encoder_fingerprint", ""))
        if result.get("encoder"):
            data = (work / result["encoder"]).read_bytes()
            # A pretrained encoder becomes the default only on a store that has none: a
            # served encoder is never swapped under running servers by a job.
            self.store.put_encoder(data, fp, make_default=not self.store.list_encoders())
        version = 0
        refused: list[str] = []
        registered: list[str] = []
        for name, rel in dict(result.get("decoders", {})).items():
            # Idempotent by job id: a server that registered and then died before recording
            # it leaves the version in place for its successor to find, not to add again.
            with contextlib.suppress(NotFoundError):
                done = [v for v in self.store.get(name).versions if v.job_id == rec.id]
                if done:
                    version = done[0].version
                    continue
            data = (work / rel).read_bytes()
            _, meta = checkpoint.read_decoder(data)
            vrec = VersionRecord.for_decoder(
                meta,
                source="trained",
                job_id=rec.id,
                summary={
                    "datasets": rec.dataset_hashes,
                    **{k: v for k, v in dict(result.get("summary", {})).items() if k != "device"},
                },
            )
            # Default only when it fits the served encoder: a decoder for a new encoder made
            # default would turn that identity's swaps into FAILED_PRECONDITION.
            fits = meta.encoder_fingerprint == self.runtime.fingerprint
            try:
                self._register(rec, name, data, vrec, fits)
            except PreconditionError as exc:
                refused.append(str(exc))
                continue
            version = vrec.version
            registered.append(f"{name} v{version}")
        if refused:
            # Registered versions stay (each is complete and consented); the job fails so
            # that what was refused, and why, is not missed.
            also = f" (registered: {', '.join(registered)})" if registered else ""
            raise PreconditionError(f"job {rec.id}: " + "; ".join(refused) + also)
        return (version if rec.mode == "identity" else 0), fp

    def _register(
        self, rec: JobRecord, name: str, data: bytes, vrec: VersionRecord, fits: bool
    ) -> None:
        if rec.identities_at_submit is None:  # a record from before the state was kept
            expect, consent = None, rec.consent or None
        else:
            # Not named at submit: expected new, so an existing identity is never written.
            expect = rec.identities_at_submit.get(name, "")
            consent = None if expect else rec.consent
        t0 = time.perf_counter()
        code = grpc.StatusCode.OK
        try:
            self.store.add_version(
                name, data, vrec, make_default=fits, consent=consent, expect=expect
            )
        except Exception as exc:
            code = status_for(exc)
            raise
        finally:
            if self.audit is not None:
                self.audit.event(
                    "TrainJobRegister",
                    rec.submitted_by or "(unknown)",
                    name,
                    vrec.version if code == grpc.StatusCode.OK else 0,
                    code,
                    # The Train call's id (older records have none: the job id).
                    request_id=rec.request_id or rec.id,
                    duration_s=time.perf_counter() - t0,
                    job_id=rec.id,
                )

    def close(self) -> None:
        self.jobs.close()

    # -- Train validation -------------------------------------------------------------------

    def submit(self, request: tpb.TrainRequest) -> JobRecord:
        mode = _MODES.get(request.mode)
        if mode is None:
            raise InvalidInputError("mode must be TRAIN_MODE_IDENTITY or TRAIN_MODE_PRETRAIN")
        hp = request.hyper_parameters
        for name in ("learning_rate", "encoder_learning_rate"):
            if not math.isfinite(getattr(hp, name)):
                raise InvalidInputError(f"invalid hyper-parameters: {name} must be finite")
        steps = hp.steps or DEFAULT_STEPS
        batch = hp.batch_size or DEFAULT_BATCH
        lr = float(hp.learning_rate) if hp.learning_rate else DEFAULT_LR
        enc_lr = float(hp.encoder_learning_rate)
        every = hp.checkpoint_every or DEFAULT_CHECKPOINT_EVERY
        # Unset: also at most every DEFAULT_CHECKPOINT_SECONDS of training, so a fast GPU
        # does not spend its time writing checkpoints. Set: exactly every N steps.
        min_seconds = 0.0 if hp.checkpoint_every else DEFAULT_CHECKPOINT_SECONDS
        # Checked before any dataset is read or consent looked up; the whole spec is checked
        # once more as the job's work directory is laid out (JobManager.submit).
        validate_hyper_parameters(steps, batch, lr, enc_lr, every)
        names = list(request.datasets)
        if not names:
            raise InvalidInputError("name the dataset(s) to train on in `datasets`")
        for n in names:
            validate_name(n, "dataset")
        if len(set(names)) != len(names):
            raise InvalidInputError("datasets are named more than once")
        encoder_bytes: bytes | None = None
        encoder_fp = ""
        identity = ""
        at_submit: dict[str, str] = {}  # each identity it will register: see JobRecord
        if mode == "identity":
            identity = validate_name(request.identity)
            # The rule for every new identity version: a complete record in the request, or
            # an existing identity's stored, unrevoked one.
            admitted = consent_for_upload(self.store, identity, request.consent)
            consent = admitted.consent
            at_submit[identity] = admitted.expect
            if len(names) != 1:
                raise InvalidInputError(
                    f"identity mode trains from exactly one dataset, got {len(names)}"
                )
            if not self.runtime.ready:
                raise UnavailableError("the encoder is still loading; retry in a moment")
            encoder_fp, encoder_bytes = self.store.read_encoder(self.runtime.fingerprint)
            preset = self.runtime.config.name if self.runtime.config else ""
        else:
            if request.identity:
                raise InvalidInputError(
                    "pretrain mode names identities by dataset; leave `identity` empty"
                )
            preset = request.preset or DEFAULT_PRESET
            consent = consent_from_proto(request.consent)
            for n in names:  # each dataset becomes an identity: each needs consent
                admitted = consent_for_upload(self.store, validate_name(n), request.consent)
                at_submit[n] = admitted.expect
                if not admitted.expect:
                    consent = admitted.consent  # the validated record new ones get
        data: dict[str, np.ndarray] = {}
        hashes: dict[str, str] = {}
        landmarks: dict[str, list[Any]] = {}
        for n in names:
            info = self.datasets.get(n)  # NOT_FOUND for an unknown dataset
            if info.faces < 1:
                raise InvalidInputError(f"dataset {n!r} has no faces")
            data[n] = self.datasets.load(n)  # the job's own copy: deleting the dataset later
            hashes[n] = info.content_hash  # does not touch it
            landmarks[n] = self.datasets.load_landmarks(n)
        spec = JobSpec(
            mode=mode,
            datasets=names,
            identity=identity,
            preset=preset,
            steps=steps,
            batch_size=batch,
            lr=lr,
            encoder_lr=enc_lr,
            checkpoint_every=every,
            checkpoint_min_seconds=min_seconds,
            log_every=max(1, min(every, self.settings.training_log_every)),
            seed=int(hp.seed) if hp.seed else int(np.random.default_rng().integers(1, 2**31)),
            device=self.settings.device,
            threads=self.settings.training_threads,
        )
        return self.jobs.submit(
            spec,
            data,
            encoder_bytes,
            identity,
            consent,
            hashes,
            encoder_fp,
            landmarks,
            identities_at_submit=at_submit,
            submitted_by=current_caller.get(),
            request_id=current_request_id.get(),
        )


class TrainingServicer(tgrpc.TrainingServiceServicer):
    def __init__(self, training: Training, budget: PixelBudget | None = None) -> None:
        self.training = training
        self.settings = training.settings
        self.budget = budget if budget is not None else PixelBudget.from_settings(self.settings)

    @unary
    async def UploadDataset(
        self,
        request_iterator: AsyncIterator[tpb.UploadDatasetRequest],
        context: grpc.aio.ServicerContext,
    ) -> tpb.UploadDatasetResponse:
        limit = self.settings.max_upload_bytes
        meta: tpb.UploadDatasetMetadata | None = None
        upload: Upload | None = None
        received = 0  # bytes of this stream
        index = 0
        try:
            async for part in request_iterator:
                received += part.ByteSize()
                if received > limit:
                    raise ResourceExhaustedError(
                        f"this upload is over {limit} bytes (setting max_upload_bytes); "
                        "nothing was added. Send the images in several UploadDataset calls"
                    )
                kind = part.WhichOneof("part")
                if kind == "metadata":
                    if meta is not None:
                        raise InvalidInputError("metadata was sent twice; send it once, first")
                    meta = part.metadata
                    validate_name(meta.name, "dataset")
                    upload = await asyncio.to_thread(self._begin_upload, meta.name)
                elif kind == "image":
                    if meta is None or upload is None:
                        raise InvalidInputError("the first message must carry the metadata")
                    if index >= self.settings.max_dataset_faces:
                        # More images than the dataset may hold faces: never all useful,
                        # and each still costs a decode and a line in the response.
                        raise ResourceExhaustedError(
                            f"this upload sends more than {self.settings.max_dataset_faces} "
                            "images (setting max_dataset_faces); nothing was added"
                        )
                    await self.budget.run(
                        await asyncio.to_thread(self._pixels, part.image),
                        call_deadline(context),
                        "dataset image",
                        self._stage,
                        upload,
                        index,
                        part.image,
                        meta,
                    )
                    index += 1
                else:
                    raise InvalidInputError("empty UploadDataset message")
            # A client's cancel ends the request stream as its end would, and cancels this
            # task a moment later (gRPC learns it from another completion): let that land
            # before committing, so a cancelled upload is not committed as a short one.
            await asyncio.sleep(CANCEL_GRACE_S)
            if meta is None or upload is None:
                raise InvalidInputError("UploadDataset stream had no metadata")
            if not index:
                raise InvalidInputError("no images were sent")
            result = await asyncio.to_thread(upload.commit)
        finally:
            if upload is not None:
                # Refused, failed or cancelled: the dataset stays as it was.
                await asyncio.shield(asyncio.to_thread(upload.discard))
        log.info(
            "dataset %s: %d added, %d duplicates, %d rejected",
            meta.name,
            result.accepted,
            len(result.duplicate_indices),
            len(result.rejected),
        )
        return tpb.UploadDatasetResponse(
            dataset=dataset_to_proto(result.dataset),
            accepted=result.accepted,
            duplicates=len(result.duplicate_indices),
            rejected=[tpb.RejectedImage(index=i, reason=r) for i, r in result.rejected],
            duplicate_indices=sorted(result.duplicate_indices),
        )

    def _begin_upload(self, name: str) -> Upload:
        cfg = self.training.runtime.config
        # A new dataset takes the served model's resolution; an existing one keeps its own.
        res = cfg.resolution if cfg is not None else DEFAULT_RESOLUTION
        return self.training.datasets.begin_upload(name, res)

    def _stage(
        self, upload: Upload, index: int, image: Any, meta: tpb.UploadDatasetMetadata
    ) -> None:
        upload.add(index, self._align(image, meta, upload.resolution))

    def _pixels(self, image: Any) -> int:
        """The image's pixels from its header; 0 for a bad one, which _align rejects."""
        try:
            return convert.image_pixels(image, self.settings.max_image_pixels, "image")
        except InvalidInputError:
            return 0

    def _align(
        self, image: Any, meta: tpb.UploadDatasetMetadata, res: int
    ) -> tuple[np.ndarray, np.ndarray | None] | str:
        # One bad image is a rejection with its reason, never a failed upload.
        try:
            rgb = convert.image_from_proto(image, self.settings.max_image_pixels, "image").rgb
            return self.training.datasets.align(rgb, meta.aligned, res)
        except Exception as exc:
            return rejection_reason(exc)

    @unary
    async def ListDatasets(
        self, request: tpb.ListDatasetsRequest, context: grpc.aio.ServicerContext
    ) -> tpb.ListDatasetsResponse:
        items = await asyncio.to_thread(self.training.datasets.list_all)
        return tpb.ListDatasetsResponse(datasets=[dataset_to_proto(d) for d in items])

    @unary
    async def DeleteDataset(
        self, request: tpb.DeleteDatasetRequest, context: grpc.aio.ServicerContext
    ) -> tpb.DeleteDatasetResponse:
        await asyncio.to_thread(self.training.datasets.delete, request.name)
        return tpb.DeleteDatasetResponse()

    @unary
    async def Train(
        self, request: tpb.TrainRequest, context: grpc.aio.ServicerContext
    ) -> tpb.TrainResponse:
        rec = await asyncio.to_thread(self.training.submit, request)
        return tpb.TrainResponse(job=job_to_proto(rec))

    @unary
    async def GetJob(
        self, request: tpb.GetJobRequest, context: grpc.aio.ServicerContext
    ) -> tpb.GetJobResponse:
        rec = await asyncio.to_thread(self.training.jobs.get, request.id)
        return tpb.GetJobResponse(job=job_to_proto(rec))

    @unary
    async def ListJobs(
        self, request: tpb.ListJobsRequest, context: grpc.aio.ServicerContext
    ) -> tpb.ListJobsResponse:
        states = {_STATE_NAMES[s] for s in request.states if s in _STATE_NAMES}
        recs = await asyncio.to_thread(self.training.jobs.list_jobs, states or None)
        return tpb.ListJobsResponse(jobs=[job_to_proto(r) for r in recs])

    @unary
    async def CancelJob(
        self, request: tpb.CancelJobRequest, context: grpc.aio.ServicerContext
    ) -> tpb.CancelJobResponse:
        rec = await asyncio.to_thread(self.training.jobs.cancel, request.id)
        return tpb.CancelJobResponse(job=job_to_proto(rec))

    @streaming
    async def WatchJob(
        self, request: tpb.WatchJobRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[tpb.WatchJobResponse]:
        """The job now (with its latest progress), then every new event until it ends. The
        job runs in its own process, so a watcher that disconnects changes nothing."""
        jobs = self.training.jobs
        # Between reads the stream waits for a change notice on the event loop, holding no
        # thread: the default executor is shared with Swap, and open watches must not
        # slow it down. Watching starts before the first read, so no change is missed.
        with jobs.watching(request.id) as seen:
            rec = await asyncio.to_thread(jobs.get_watched, request.id)
            async for msg in self._watch(rec, request.replay, seen):
                yield msg

    async def _watch(
        self, rec: JobRecord, replay: bool, seen: int
    ) -> AsyncIterator[tpb.WatchJobResponse]:
        jobs = self.training.jobs
        # Without replay the history is skipped: a re-attaching watcher wants the present.
        history, offset = await asyncio.to_thread(jobs.events, rec.id, 0)
        if replay:
            for ev in history:
                msg = tpb.WatchJobResponse(job=job_to_proto(rec))
                _fill(msg, ev)
                if ev.get("type") == "progress":
                    msg.job.step = int(ev.get("step", msg.job.step))
                yield msg
        first = tpb.WatchJobResponse(job=job_to_proto(rec))
        latest = await asyncio.to_thread(jobs.latest_progress, rec.id)
        if latest:
            _fill(first, latest)
        if rec.state in TERMINAL:
            first.message = f"job {rec.state}" + (f": {rec.error}" if rec.error else "")
        yield first
        ended = rec.state in TERMINAL
        last = first
        while not ended:
            # The timeout is a safety net only: notices come within the monitor's poll.
            seen = await jobs.changed(rec.id, seen, WATCH_RECHECK_S)
            rec, events, offset = await asyncio.to_thread(_read_job, jobs, rec.id, offset)
            ended = rec.state in TERMINAL
            for ev in events:
                msg = tpb.WatchJobResponse(job=job_to_proto(rec))
                _fill(msg, ev)
                if ev.get("type") == "preview":
                    png = await asyncio.to_thread(_read_preview, jobs.work_dir(rec.id))
                    if png:
                        msg.preview.encoded = png
                if ev.get("type") == "progress":
                    msg.job.step = int(ev.get("step", msg.job.step))
                yield msg
                last = msg
        if last.job.state != _STATES[rec.state]:
            # The final event came in a read before the record turned final (its owner,
            # maybe another replica, writes the event first): end on the final state.
            final = tpb.WatchJobResponse(job=job_to_proto(rec))
            final.message = f"job {rec.state}" + (f": {rec.error}" if rec.error else "")
            yield final


def _read_job(
    jobs: JobManager, job_id: str, offset: int
) -> tuple[JobRecord, list[dict[str, Any]], int]:
    rec = jobs.get(job_id)
    # Read events after the state: a final state's own event is then already there.
    events, offset = jobs.events(job_id, offset)
    return rec, events, offset


def _read_preview(work: Path) -> bytes:
    try:
        return (work / "preview.png").read_bytes()
    except OSError:
        return b""


def _fill(msg: tpb.WatchJobResponse, ev: dict[str, Any]) -> None:
    kind = ev.get("type")
    if kind == "progress":
        for k, v in dict(ev.get("losses", {})).items():
            msg.losses[str(k)] = float(v)
        msg.examples_per_second = float(ev.get("examples_per_second", 0.0))
        msg.eta_seconds = float(ev.get("eta_seconds", 0.0))
    elif kind == "message":
        msg.message = str(ev.get("message", ""))
    elif kind == "checkpoint":
        msg.message = f"checkpoint at step {ev.get('step')}"
    elif kind == "preview":
        msg.message = f"preview at step {ev.get('step')}"
    elif kind in ("failed", "cancelled", "paused", "succeeded"):
        msg.message = f"run {kind}" + (f": {ev['error']}" if ev.get("error") else "")
    elif kind == "state":
        msg.message = f"job {ev.get('state')}" + (f": {ev['error']}" if ev.get("error") else "")
    else:
        msg.message = json.dumps(ev)[:500]
