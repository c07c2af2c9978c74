"""Training jobs: persisted records, a bounded queue and worker processes.

Layout, in the directory the store names for jobs (`Store.jobs_dir`; ``<store>/jobs`` on the
local store)::

    <store>/jobs/<id>/job.json    the record below, replaced atomically on every change
    <store>/jobs/<id>/...         the run's work directory (see facemux.models.pretrain.workdir)

Each job runs `facemux.models.pretrain.run_job` in its own process, so a crashing job stays
away from the server. The server never forks itself (forking a process that runs gRPC's
threads is unsafe): jobs are forked by multiprocessing's *fork server*, a single-threaded
process started on the first job that has imported torch and the trainer once, so a job
starts in milliseconds instead of paying a fresh interpreter's imports (*spawn*, the fallback
where there is no fork server). A monitor thread starts
queued jobs while fewer than ``max_running_jobs`` run, and turns a finished run's result.json
into the record's final state (registering the trained decoder first). A server that
restarts finds QUEUED and RUNNING records and queues them again; a RUNNING one resumes from
its work directory's checkpoint.

Several servers may share the store (replicas on one volume). Each unfinished job belongs to
the server holding its claim (:mod:`.claims`): only that one starts, reaps and registers it.
The others read its record and events from the store (so any replica answers GetJob,
ListJobs and WatchJob for any job), ask it to stop with a ``cancel`` file, and take the job
over, resuming from its checkpoint, when its owner is gone.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import multiprocessing
import os
import shutil
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from multiprocessing.process import BaseProcess
from pathlib import Path
from typing import Any

from facemux.models.checkpoint import atomic_write
from facemux.models.errors import NotFoundError, PreconditionError, ResourceExhaustedError
from facemux.models.pretrain import JobSpec, prepare_work_dir, read_events, run_job
from facemux.service.store import disk_space, now_iso
from facemux.service.training.claims import Claims

log = logging.getLogger(__name__)

QUEUED, RUNNING, SUCCEEDED, FAILED, CANCELLED = (
    "queued",
    "running",
    "succeeded",
    "failed",
    "cancelled",
)
TERMINAL = (SUCCEEDED, FAILED, CANCELLED)
STAGING_MAX_AGE_S = 3600.0  # a staging directory older than this was left by a crash


@dataclass
class JobRecord:
    id: str
    mode: str
    state: str
    identity: str
    datasets: list[str]
    steps: int
    created_at: str
    updated_at: str
    consent: dict[str, str] = field(default_factory=dict)
    error: str = ""
    step: int = 0
    result_version: int = 0
    encoder_fingerprint: str = ""
    dataset_hashes: dict[str, str] = field(default_factory=dict)
    # Each identity the job will register, as it was when the job was submitted: "" = did
    # not exist, else its incarnation. Registration requires the same state (the store
    # checks under its lock), so a deletion or re-creation meanwhile fails the job. None on
    # records written before this was kept.
    identities_at_submit: dict[str, str] | None = None
    # Who submitted it (for the audit line of what it registers).
    submitted_by: str = ""
    # The request id of the Train call that submitted it, for the audit trail.
    request_id: str = ""

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> JobRecord:
        known = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in data.items() if k in known})


# Called in the monitor thread with a succeeded job and its work directory's result;
# returns (identity version registered or 0, encoder fingerprint).
Finisher = Callable[[JobRecord, Path, dict[str, Any]], tuple[int, str]]


def _valid_id(job_id: str) -> bool:
    # Ids are made here (time-uuid); anything else never names a directory of the store.
    return 0 < len(job_id) <= 64 and all(c.isalnum() or c == "-" for c in job_id)


def _read_result(work: Path) -> dict[str, Any]:
    try:
        data = json.loads((work / "result.json").read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _worker(work_dir: str, threads: int) -> None:
    """Entry point of a job's process (module level: it is pickled by name)."""
    if threads > 0:
        import torch

        torch.set_num_threads(threads)
    run_job(work_dir)


def _job_context() -> (
    multiprocessing.context.ForkServerContext | multiprocessing.context.SpawnContext
):
    if "forkserver" not in multiprocessing.get_all_start_methods():
        return multiprocessing.get_context("spawn")
    ctx = multiprocessing.get_context("forkserver")
    # What a job imports anyway (torch, the trainer), and not __main__: the server's own
    # entry point has nothing a job needs. Read when the fork server starts (the first job).
    # torch._dynamo too: torch's optimizers import it when the first one is made, about
    # 1.5 s of every job here; the server itself never needs it.
    ctx.set_forkserver_preload([__name__, "torch._dynamo"])
    return ctx


def _stamp(work: Path) -> tuple[int, ...]:
    """What changes when a job's record is replaced or an event is appended."""
    out: list[int] = []
    for name in ("job.json", "events.jsonl"):
        try:
            st = os.stat(work / name)
            out += [st.st_ino, st.st_size, st.st_mtime_ns]
        except OSError:
            out += [0, 0, 0]
    return tuple(out)


class JobNews:
    """Change notices for WatchJob streams, without a thread per stream.

    A job's files change in other processes (its run appends events, another replica
    replaces the record of a job it owns), so someone must look: the monitor thread, once
    per poll for all streams, stats the files of the jobs being watched and wakes their
    streams on their own event loops. Each job has a change count; a stream waits for it to
    pass the count it has seen, so a notice is never lost between a read and a wait."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._versions: dict[str, int] = {}
        self._watchers: dict[str, int] = {}
        self._stamps: dict[str, tuple[int, ...]] = {}
        self._waiters: dict[str, set[tuple[asyncio.AbstractEventLoop, asyncio.Future[None]]]] = {}

    def version(self, job_id: str) -> int:
        with self._lock:
            return self._versions.get(job_id, 0)

    def watch(self, job_id: str) -> None:
        with self._lock:
            self._watchers[job_id] = self._watchers.get(job_id, 0) + 1

    def unwatch(self, job_id: str) -> None:
        with self._lock:
            left = self._watchers.get(job_id, 0) - 1
            if left > 0:
                self._watchers[job_id] = left
            else:
                self._watchers.pop(job_id, None)
                self._stamps.pop(job_id, None)
                if not self._waiters.get(job_id):
                    self._versions.pop(job_id, None)

    def read_at(self, job_id: str, stamp: tuple[int, ...]) -> None:
        """A stream is about to read the job's files as they were at ``stamp``: the first
        look compares against it, so opening a stream wakes nobody unless the files change
        after it. A stamp already held is older or equal, so it stays."""
        with self._lock:
            if job_id in self._watchers:
                self._stamps.setdefault(job_id, stamp)

    def bump(self, job_id: str) -> None:
        with self._lock:
            if job_id not in self._watchers:
                return  # nobody listens: nothing to count
            self._versions[job_id] = self._versions.get(job_id, 0) + 1
            waiters = self._waiters.pop(job_id, set())
        for loop, fut in waiters:
            with contextlib.suppress(RuntimeError):  # that loop is closed: its stream is gone
                loop.call_soon_threadsafe(_resolve, fut)

    def poll(self, work_dir: Callable[[str], Path]) -> None:
        """Compare the watched jobs' files with the last look (the monitor, every poll)."""
        with self._lock:
            watched = list(self._watchers)
        for job_id in watched:
            stamp = _stamp(work_dir(job_id))
            with self._lock:
                before = self._stamps.get(job_id)
                if job_id in self._watchers:
                    self._stamps[job_id] = stamp
            # A job with no stamp yet counts as changed: its new stream may have read it
            # before this look without recording what it read.
            if before != stamp:
                self.bump(job_id)

    async def wait(self, job_id: str, seen: int, timeout: float) -> int:
        loop = asyncio.get_running_loop()
        with self._lock:
            now = self._versions.get(job_id, 0)
            if now != seen:
                return now
            fut: asyncio.Future[None] = loop.create_future()
            entry = (loop, fut)
            self._waiters.setdefault(job_id, set()).add(entry)
        try:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(fut, timeout)
        finally:
            with self._lock:
                self._waiters.get(job_id, set()).discard(entry)
                if not self._waiters.get(job_id):
                    self._waiters.pop(job_id, None)
                now = self._versions.get(job_id, 0)
        return now


def _resolve(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)


class JobManager:
    def __init__(
        self,
        root: Path,
        finish: Finisher,
        max_running: int = 1,
        max_queued: int = 16,
        worker_threads: int = 0,
        poll_s: float = 0.2,
        on_change: Callable[[JobManager], None] | None = None,
        lease_s: float = 60.0,
        scan_s: float = 2.0,
    ) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.finish = finish
        self.max_running = max_running
        self.max_queued = max_queued
        self.worker_threads = worker_threads
        self.poll_s = poll_s
        self.on_change = on_change
        self._ctx = _job_context()
        self._lock = threading.RLock()
        self._jobs: dict[str, JobRecord] = {}
        self._procs: dict[str, BaseProcess] = {}
        self._queue: list[str] = []
        self._stop = threading.Event()
        self._changed = threading.Condition(self._lock)
        self._news = JobNews()
        self.claims = Claims(lease_s)
        self._ended: set[str] = set()  # other servers' finished jobs, skipped by the scan
        self.scan_s = scan_s
        self._scan()
        self._thread = threading.Thread(target=self._monitor, name="facemux-jobs", daemon=True)
        self._thread.start()
        # Its own thread, never waiting for the monitor's lock or its file reads: a lease
        # must not run out because the monitor was busy registering a decoder.
        self._beats = threading.Thread(target=self._beat_loop, name="facemux-claims", daemon=True)
        self._beats.start()

    # -- records -----------------------------------------------------------------------------

    def work_dir(self, job_id: str) -> Path:
        return self.root / job_id

    def _save(self, rec: JobRecord) -> None:
        rec.updated_at = now_iso()
        atomic_write(self.work_dir(rec.id) / "job.json", json.dumps(asdict(rec), indent=1).encode())
        self._changed.notify_all()
        self._news.bump(rec.id)

    def _read(self, job_id: str) -> JobRecord | None:
        try:
            return JobRecord.from_dict(json.loads((self.work_dir(job_id) / "job.json").read_text()))
        except FileNotFoundError:
            return None
        except (OSError, ValueError, TypeError) as exc:
            log.warning("skipping unreadable job record %s: %s", job_id, exc)
            return None

    def _scan(self) -> None:
        """Claim the store's unfinished jobs that no live server holds and queue them: at
        start (the jobs of the process before this one) and every scan_s (jobs submitted to
        another replica, or left by one that is gone)."""
        self.claims.new_look()
        for d in sorted(self.root.iterdir()):
            if d.name.startswith(".staging-"):
                with contextlib.suppress(OSError):
                    if time.time() - d.stat().st_mtime > STAGING_MAX_AGE_S:
                        shutil.rmtree(d, ignore_errors=True)
                continue
            with self._lock:
                if d.name in self._jobs or d.name in self._ended:
                    continue
                if len(self._procs) + len(self._queue) >= self.max_running:
                    continue  # no free slot: leave it to a replica that has one
            rec = self._read(d.name)
            if rec is not None and rec.state in TERMINAL:
                self._ended.add(d.name)  # final: never read again by the scan
                continue
            if rec is None or not self.claims.claim(d):
                continue
            rec = self._read(d.name)  # its owner may have finished it before letting go
            if rec is None or rec.state in TERMINAL:
                self.claims.release(d)
                continue
            (d / "pause").unlink(missing_ok=True)
            with self._lock:
                self._jobs[rec.id] = rec
                self._queue.append(rec.id)
                # Queue order: as they were created.
                self._queue.sort(key=lambda i: self._jobs[i].created_at)
                self._changed.notify_all()
            if rec.state == RUNNING:
                log.info("job %s was running; resuming it from its checkpoint", rec.id)

    def _beat_loop(self) -> None:
        """Renew the claims of this server's unfinished jobs every sixth of a lease; stop
        any another server took over (this one missed its lease: a stalled process or
        volume)."""
        while not self._stop.wait(self.claims.lease_s / 6):
            with self._lock:
                mine = [i for i, r in self._jobs.items() if r.state not in TERMINAL]
            lost = [i for i in mine if not self.claims.refresh(self.work_dir(i))]
            if lost:
                with self._lock:
                    for job_id in lost:
                        rec = self._jobs.get(job_id)
                        # Ended (and released) since the snapshot: nothing was lost.
                        if rec is not None and rec.state not in TERMINAL:
                            self._drop(job_id)

    def _drop(self, job_id: str) -> None:
        """Forget a job another server now owns; kill its run here, if any (its checkpoint
        stays, and the new owner's run waits for this one's lock)."""
        if job_id not in self._jobs:
            return
        log.warning("job %s was taken over by another server; stopping it here", job_id)
        proc = self._procs.pop(job_id, None)
        if proc is not None:
            proc.kill()
            proc.join(5)
        if job_id in self._queue:
            self._queue.remove(job_id)
        del self._jobs[job_id]

    def _cancel_requested(self) -> None:
        """Queued jobs of this server that another replica was asked to cancel."""
        for job_id in list(self._queue):
            if (self.work_dir(job_id) / "cancel").exists():
                self._queue.remove(job_id)
                rec = self._jobs[job_id]
                rec.state = CANCELLED
                self._append_final(self.work_dir(job_id), rec)
                self._save(rec)
                self.claims.release(self.work_dir(job_id))

    def get(self, job_id: str) -> JobRecord:
        with self._lock:
            rec = self._jobs.get(job_id)
            out = None if rec is None else JobRecord.from_dict(asdict(rec))
        if out is None and _valid_id(job_id):
            out = self._read(job_id)  # another server's job: its record in the store
        if out is None:
            raise NotFoundError(f"job {job_id[:80]!r} does not exist; list them with ListJobs")
        progress = self.latest_progress(job_id)
        if progress and out.state == RUNNING:
            out.step = max(out.step, int(progress.get("step", 0)))
        return out

    def list_jobs(self, states: set[str] | None = None) -> list[JobRecord]:
        with self._lock:
            ids = set(self._jobs)
        ids |= {d.name for d in self.root.iterdir() if (d / "job.json").exists()}
        recs = []
        for i in ids:
            with contextlib.suppress(NotFoundError):
                recs.append(self.get(i))
        recs = [r for r in recs if not states or r.state in states]
        return sorted(recs, key=lambda r: (r.created_at, r.id), reverse=True)

    def latest_progress(self, job_id: str) -> dict[str, Any] | None:
        with contextlib.suppress(FileNotFoundError, ValueError):
            data: dict[str, Any] = json.loads((self.work_dir(job_id) / "progress.json").read_text())
            return data
        return None

    def own_running(self) -> list[JobRecord]:
        """The jobs running in this server's workers (what its metrics report)."""
        with self._lock:
            ids = [i for i, r in self._jobs.items() if r.state == RUNNING]
        return [self.get(i) for i in ids]

    def counts(self) -> dict[str, int]:
        with self._lock:
            out: dict[str, int] = {}
            for r in self._jobs.values():
                out[r.state] = out.get(r.state, 0) + 1
            return out

    # -- commands ----------------------------------------------------------------------------

    def submit(
        self,
        spec: JobSpec,
        datasets: dict[str, Any],
        encoder_bytes: bytes | None,
        identity: str,
        consent: dict[str, str],
        dataset_hashes: dict[str, str],
        encoder_fingerprint: str = "",
        landmarks: dict[str, list[Any]] | None = None,
        identities_at_submit: dict[str, str] | None = None,
        submitted_by: str = "",
        request_id: str = "",
    ) -> JobRecord:
        with self._lock:
            if len(self._queue) >= self.max_queued:
                raise ResourceExhaustedError(
                    f"the training queue is full ({self.max_queued} jobs waiting; setting "
                    "max_queued_jobs); retry when a job has started"
                )
        job_id = time.strftime("%Y%m%d%H%M%S", time.gmtime()) + "-" + uuid.uuid4().hex[:8]
        # Assemble the work directory aside and rename it into place: a crash never leaves a
        # job.json next to half its data.
        staging = self.root / f".staging-{job_id}"
        spec.parent_pid = os.getpid()
        try:
            with disk_space("the job store"):
                prepare_work_dir(staging, spec, datasets, encoder_bytes, landmarks)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)  # not left for the hourly sweep
            raise
        now = now_iso()
        rec = JobRecord(
            id=job_id,
            mode=spec.mode,
            state=QUEUED,
            identity=identity,
            datasets=list(spec.datasets),
            steps=spec.steps,
            created_at=now,
            updated_at=now,
            consent=consent,
            encoder_fingerprint=encoder_fingerprint,
            dataset_hashes=dataset_hashes,
            identities_at_submit=identities_at_submit,
            submitted_by=submitted_by,
            request_id=request_id,
        )
        atomic_write(staging / "job.json", json.dumps(asdict(rec), indent=1).encode())
        self.claims.claim(staging)  # in place before the directory appears: no one else runs it
        with self._lock:
            if len(self._queue) >= self.max_queued:
                shutil.rmtree(staging, ignore_errors=True)
                raise ResourceExhaustedError(
                    f"the training queue is full ({self.max_queued} jobs waiting)"
                )
            os.rename(staging, self.work_dir(job_id))
            self._jobs[job_id] = rec
            self._queue.append(job_id)
            self._changed.notify_all()
        log.info("job %s queued (%s, %s)", job_id, spec.mode, ", ".join(spec.datasets))
        return self.get(job_id)

    def cancel(self, job_id: str) -> JobRecord:
        with self._lock:
            rec = self._jobs.get(job_id)
            if rec is None:
                other = self.get(job_id)  # NotFoundError when there is no such job
                if other.state not in TERMINAL:
                    # Another server's job: its owner stops it (a queued one within a poll, a
                    # running one after its checkpoint), or whoever takes it over does.
                    (self.work_dir(job_id) / "cancel").touch()
                return other
            if rec.state == QUEUED:
                self._queue.remove(job_id)
                rec.state = CANCELLED
                self._append_final(self.work_dir(job_id), rec)
                self._save(rec)
                self.claims.release(self.work_dir(job_id))
            elif rec.state == RUNNING:
                # The run checkpoints and stops at its next step; the monitor records it.
                (self.work_dir(job_id) / "cancel").touch()
        return self.get(job_id)

    def wait_changed(self, timeout: float) -> None:
        with self._lock:
            self._changed.wait(timeout)

    @contextlib.contextmanager
    def watching(self, job_id: str) -> Iterator[int]:
        """While open, the monitor looks for changes to this job's files (its record, its
        events), whoever writes them; yields the job's change count to pass to ``changed``.
        Enter it before reading the job, so a change after the read is not missed."""
        if not _valid_id(job_id):
            raise NotFoundError(f"job {job_id[:80]!r} does not exist; list them with ListJobs")
        self._news.watch(job_id)
        try:
            yield self._news.version(job_id)
        finally:
            self._news.unwatch(job_id)

    def get_watched(self, job_id: str) -> JobRecord:
        """``get`` for a stream inside ``watching``: the files' stamp is taken before the
        read, so the monitor's next look wakes the stream only for a later change."""
        self._news.read_at(job_id, _stamp(self.work_dir(job_id)))
        return self.get(job_id)

    async def changed(self, job_id: str, seen: int, timeout: float) -> int:
        """Wait, on the event loop (no thread), until the job changed since ``seen`` or
        ``timeout`` passed; returns the change count to pass next time."""
        return await self._news.wait(job_id, seen, timeout)

    # -- monitor -----------------------------------------------------------------------------

    def _start(self, rec: JobRecord) -> None:
        work = self.work_dir(rec.id)
        if not self.claims.holds(work):
            self._drop_unowned(rec.id)
            return
        done = _read_result(work)
        if done.get("status") == "succeeded":
            # Its run finished but the server that ran it went before registering: register
            # now rather than train again.
            self._conclude(rec.id, done)
            return
        spec_path = work / "spec.json"
        spec = json.loads(spec_path.read_text())
        # A resumed job belongs to this server now: its orphan watch follows this pid.
        spec["parent_pid"] = os.getpid()
        atomic_write(spec_path, json.dumps(spec, indent=2, sort_keys=True).encode())
        (work / "result.json").unlink(missing_ok=True)
        proc = self._ctx.Process(
            target=_worker, args=(str(work), self.worker_threads), name=f"facemux-job-{rec.id}"
        )
        proc.start()
        self._procs[rec.id] = proc
        rec.state = RUNNING
        self._save(rec)

    def _drop_unowned(self, job_id: str) -> None:
        log.warning("job %s: this server no longer holds its claim; leaving it", job_id)
        self._jobs.pop(job_id, None)

    def _reap(self, job_id: str, proc: BaseProcess) -> None:
        result = _read_result(self.work_dir(job_id))
        if not result:
            result = {"status": FAILED, "error": f"worker exited with code {proc.exitcode}"}
        self._conclude(job_id, result)

    def _conclude(self, job_id: str, result: dict[str, Any]) -> None:
        rec = self._jobs[job_id]
        work = self.work_dir(job_id)
        if not self.claims.holds(work):
            # Taken over while it ran: its new owner concludes it (and registers it once).
            self._drop_unowned(job_id)
            return
        status = result.get("status")
        rec.step = int(result.get("step", rec.step))
        if status == "succeeded":
            try:
                rec.result_version, fp = self.finish(rec, work, result)
                rec.encoder_fingerprint = fp or rec.encoder_fingerprint
                rec.state = SUCCEEDED
            except PreconditionError as exc:
                # Refused by the store (consent revoked, identity deleted...): expected.
                log.warning("job %s: its result was not registered: %s", job_id, exc)
                rec.state, rec.error = FAILED, f"registering the result failed: {exc}"
            except Exception as exc:
                log.exception("job %s: registering its result failed", job_id)
                rec.state, rec.error = FAILED, f"registering the result failed: {exc}"
        elif status == "cancelled":
            rec.state = CANCELLED
        elif status == "paused":
            if not self._stop.is_set():
                # Paused by a stale pause file or a departing server, not by this one's
                # shutdown: run it again (from its checkpoint).
                (work / "pause").unlink(missing_ok=True)
                self._queue.insert(0, job_id)
            return  # stopping: the record stays RUNNING and resumes at the next start
        else:
            rec.state, rec.error = FAILED, str(result.get("error") or "unknown error")
        self._append_final(work, rec)
        self._save(rec)
        self.claims.release(work)
        log.info("job %s %s", job_id, rec.state)

    def _append_final(self, work: Path, rec: JobRecord) -> None:
        line = {"type": "state", "state": rec.state, "error": rec.error, "time": now_iso()}
        with open(work / "events.jsonl", "ab") as fh:
            fh.write((json.dumps(line) + "\n").encode())

    def _monitor(self) -> None:
        next_scan = time.monotonic() + self.scan_s
        while not self._stop.is_set():
            try:
                now = time.monotonic()
                if now >= next_scan:
                    self._scan()
                    next_scan = now + self.scan_s
                with self._lock:
                    self._cancel_requested()
                    for job_id, proc in list(self._procs.items()):
                        if not proc.is_alive():
                            proc.join()
                            del self._procs[job_id]
                            self._reap(job_id, proc)
                    while (
                        self._queue
                        and len(self._procs) < self.max_running
                        and not self._stop.is_set()  # close() may be collecting the runs
                    ):
                        job_id = self._queue.pop(0)
                        self._start(self._jobs[job_id])
                self._news.poll(self.work_dir)
                if self.on_change is not None:
                    self.on_change(self)
            except Exception:
                log.exception("job monitor error")
            self._stop.wait(self.poll_s)

    def close(self, timeout: float = 8.0) -> None:
        """Stop the monitor; running jobs checkpoint and exit (paused), resuming at the next
        start. Nothing is marked finished."""
        self._stop.set()
        self._thread.join(timeout=5)
        self._beats.join(timeout=5)
        with self._lock:
            procs = dict(self._procs)
        for job_id in procs:
            with contextlib.suppress(OSError):
                (self.work_dir(job_id) / "pause").touch()
        deadline = time.monotonic() + timeout
        for proc in procs.values():
            proc.join(max(0.1, deadline - time.monotonic()))
            if proc.is_alive():
                proc.terminate()
                proc.join(5)
        for job_id in procs:
            with contextlib.suppress(OSError):
                (self.work_dir(job_id) / "pause").unlink()
        # Unfinished jobs go back to the store at once: another replica (or this server's
        # successor) claims them without waiting for a lease to run out.
        with self._lock:
            mine = [i for i, r in self._jobs.items() if r.state not in TERMINAL]
        for job_id in mine:
            self.claims.release(self.work_dir(job_id))
        self.claims.close()

    def events(self, job_id: str, offset: int) -> tuple[list[dict[str, Any]], int]:
        return read_events(self.work_dir(job_id), offset)
