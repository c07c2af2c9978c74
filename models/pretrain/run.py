"""One run from its work directory: build the models, resume from the checkpoint if there
is one, train until done or told to stop, publish."""

from __future__ import annotations

import contextlib
import math
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from .. import checkpoint
from ..config import get_preset
from ..filelock import file_lock
from ..inference import pick_device
from ..networks import Decoder, Encoder, build_decoder, build_encoder
from ..trainer import Progress, Trainer
from .distributed import agree_on_stop, init_distributed, shut_down, sync_trainer
from .loss_maps import points
from .preview import save_preview
from .publish import Start, publish
from .recipe import make_trainer
from .spec import JobSpec
from .state import CHECKPOINT, load_state, save_state
from .workdir import RunFiles, load_faces, load_landmarks, read_spec

__all__ = ["run_job"]


def run_job(
    work_dir: str | os.PathLike[str],
    on_progress: Callable[[Progress], None] | None = None,
) -> dict[str, Any]:
    """Run (or resume) the job in ``work_dir``; returns what it writes to result.json."""
    work = Path(work_dir)
    spec = read_spec(work)
    rank, world, device = init_distributed(pick_device(spec.device))
    files = RunFiles(work, rank)
    # A run that outlives its server (killed without warning) still holds this lock; its
    # successor waits here until the old one has checkpointed and gone, so two processes
    # never write one work directory.
    lock = file_lock(work / ".run.lock") if rank == 0 else contextlib.nullcontext()
    with lock:
        try:
            result = _run(spec, files, device, world, on_progress)
        except BaseException as exc:
            msg = str(exc) or type(exc).__name__
            if isinstance(exc, torch.OutOfMemoryError):
                msg = f"out of memory even at batch size 1: {msg}"
            result = {"status": "failed", "error": f"{type(exc).__name__}: {msg}"}
            files.event("failed", error=result["error"])
            files.result(result)
            if not isinstance(exc, Exception):
                raise
        finally:
            shut_down(world)
    return result


def _build(
    spec: JobSpec, work_dir: Path, device: torch.device
) -> tuple[Encoder, dict[str, Decoder], Start]:
    if spec.mode == "identity":
        encoder, meta = checkpoint.load_encoder(work_dir / "encoder.safetensors", device)
        decoders = {spec.identity: build_decoder(meta.config, seed=spec.seed + 1)}
        return encoder, decoders, Start(meta.config, meta.fingerprint, meta.template)
    cfg = get_preset(spec.preset)
    encoder = build_encoder(cfg, seed=spec.seed)
    decoders = {n: build_decoder(cfg, seed=spec.seed + 1 + i) for i, n in enumerate(spec.datasets)}
    return encoder, decoders, Start(cfg)


def _announce(
    spec: JobSpec,
    files: RunFiles,
    data: dict[str, torch.Tensor],
    landmarks: dict[str, list[Any]],
) -> None:
    """Say how many faces the loss maps place by their own landmarks."""
    total = sum(len(f) for f in data.values())
    if spec.loss_emphasis == "eyes_mouth":
        with_lm = sum(1 for lms in landmarks.values() for lm in lms if lm is not None)
        files.event(
            "message",
            message=f"loss emphasis on eyes and mouth: {with_lm} of {total} faces placed "
            "by their own landmarks, the rest by the aligned-face template",
        )
    if spec.loss_mask == "landmarks":
        outlined = sum(
            1
            for lms in landmarks.values()
            for i in range(len(lms))
            if points(lms, i, 68) is not None
        )
        files.event(
            "message",
            message=f"loss mask: {outlined} of {total} faces outlined by their own 68 "
            "landmarks, the rest by the aligned-face template",
        )


def _run(
    spec: JobSpec,
    files: RunFiles,
    device: torch.device,
    world: int,
    on_progress: Callable[[Progress], None] | None,
) -> dict[str, Any]:
    spec.validate()
    work, rank = files.dir, files.rank
    if spec.threads > 0:
        torch.set_num_threads(spec.threads)
    if rank == 0:
        (work / "result.json").unlink(missing_ok=True)
    encoder, decoders, start = _build(spec, work, device)
    cfg = start.config
    pairs = list(zip(decoders, spec.datasets, strict=True))
    data = {name: load_faces(work, ds, cfg.resolution) for name, ds in pairs}
    landmarks: dict[str, list[Any]] = {}
    for name, ds in pairs:
        lms = load_landmarks(work, ds, cfg.resolution)
        if lms is not None:
            landmarks[name] = lms
    trainer = make_trainer(spec, encoder, decoders, data, device, rank, landmarks)
    ckpt = work / CHECKPOINT
    if ckpt.exists():
        load_state(ckpt, trainer)
        if rank > 0:
            # The checkpoint holds rank 0's sampler; the others must keep drawing their own.
            trainer._gen.manual_seed(spec.seed + rank + 7919 * trainer.steps_done)
        files.event("message", message=f"resumed from the checkpoint at step {trainer.steps_done}")
    else:
        files.event("message", message=f"started: {spec.mode} on {device}, {world} process(es)")
        _announce(spec, files, data, landmarks)
    if world > 1:
        sync_trainer(trainer)

    last_ckpt = trainer.steps_done
    last_ckpt_t = time.monotonic()
    stop_reason = ""

    def should_stop() -> bool:
        nonlocal last_ckpt, last_ckpt_t, stop_reason
        if (
            trainer.steps_done - last_ckpt >= spec.checkpoint_every
            and time.monotonic() - last_ckpt_t >= spec.checkpoint_min_seconds
        ):
            save_state(files, trainer)
            last_ckpt, last_ckpt_t = trainer.steps_done, time.monotonic()
            save_preview(files, trainer)
        stop_reason = agree_on_stop(files.control(spec.parent_pid), world)
        return bool(stop_reason)

    def progress(p: Progress) -> None:
        files.event(
            "progress",
            step=p.step,
            steps=p.steps,
            losses={k: v for k, v in p.losses.items() if math.isfinite(v)},
            examples_per_second=p.examples_per_s * world,
            eta_seconds=p.eta_s if math.isfinite(p.eta_s) else -1.0,
        )
        if on_progress is not None:
            on_progress(p)

    summary = _fit(trainer, files, device, world, progress, should_stop)

    if stop_reason:
        if trainer.steps_done != last_ckpt:
            save_state(files, trainer)
        result = {"status": stop_reason, "step": trainer.steps_done}
        files.event(stop_reason, step=trainer.steps_done)
        files.result(result)
        return result

    result = publish(spec, files, trainer, start, world, summary)
    files.event("succeeded", step=trainer.steps_done, result=result)
    files.result(result)
    return result


def _fit(
    trainer: Trainer,
    files: RunFiles,
    device: torch.device,
    world: int,
    progress: Callable[[Progress], None],
    should_stop: Callable[[], bool],
) -> dict[str, Any]:
    """Trainer.fit, halving the batch on out-of-memory (one process only: ranks would
    disagree on the batch) until it fits."""
    while True:
        try:
            return trainer.fit(progress, should_stop)
        except torch.OutOfMemoryError:
            bs = trainer.config.batch_size
            if bs <= 1 or world > 1:
                raise
            trainer.optimizer.zero_grad(set_to_none=True)
            if device.type == "cuda":
                torch.cuda.empty_cache()
            trainer.config.batch_size = max(1, bs // 2)
            files.event(
                "message",
                message=f"CUDA out of memory: batch size lowered to {trainer.config.batch_size}",
            )
