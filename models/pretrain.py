"""One training run from a job spec and a work directory: the single entry point behind the
training service's worker processes, the k8s pretraining Job and the benchmarks.

    python -m facemux.models.pretrain --job-dir DIR            # one process
    torchrun --nproc-per-node=2 -m facemux.models.pretrain --job-dir DIR

The work directory holds everything a run needs and leaves, so a run killed at any moment
resumes from it::

    spec.json           what to train (JobSpec)
    data/<name>.npy     uint8 (N, R, R, 3) RGB aligned faces per identity
    encoder.safetensors identity mode: the shared encoder to train against
    checkpoint.pt       weights + optimiser + sampler state, replaced atomically
    events.jsonl        progress, checkpoints, notes, the final outcome (rank 0 appends)
    progress.json       the latest progress event (read by GetJob without parsing the log)
    result.json         written once the run ends: succeeded / failed / cancelled / paused
    out/                the trained encoder and decoders (safetensors) when it succeeded
    cancel, pause       control files: checkpoint and stop (pause = the server is going away
                        and will resume the run later)

Under torchrun (WORLD_SIZE > 1) every rank draws its own batches (seed + rank) and the
gradients are averaged across ranks before each optimiser step (gloo on CPU, NCCL on CUDA),
so every rank holds the same weights; rank 0 alone writes files.

This module must not import grpc: it runs inside training pods with no server around.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import math
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from . import checkpoint
from .config import ModelConfig, get_preset
from .errors import InvalidInputError
from .faces.align import template_landmarks, umeyama
from .faces.mask import landmark_mask, template_mask
from .filelock import file_lock
from .inference import pick_device
from .losses import landmark_weight_map
from .networks import Decoder, Encoder, build_decoder, build_encoder
from .trainer import Progress, TrainConfig, Trainer

__all__ = ["DEFAULT_LR", "MODES", "JobSpec", "read_events", "run_job", "validate_hyper_parameters"]

MODES = ("identity", "pretrain")
# What the reconstruction loss counts: "template" weighs only the face (an ellipse around the
# mean aligned face, which is where the alignment puts every face), so the model spends its
# capacity where a swap is pasted; "landmarks" weighs each face's own outline where its
# dataset kept 68 landmarks (the template elsewhere), so the decoder's mask head also learns
# each face's shape; "none" counts the whole crop.
LOSS_MASKS = ("template", "landmarks", "none")
LOSS_EMPHASES = ("eyes_mouth", "none")
MAX_STEPS = 10_000_000
MAX_BATCH = 1024
MAX_LR = 0.01
# Peak Adam rate under the jobs' schedule (warm-up, cosine decay, gradient norm clipped at
# GRAD_CLIP). bench/quality.py measured 5e-4 < 1e-3 < 2e-3 on swap quality for short runs;
# 3e-3 collapsed the tiny model even with warm-up, and 2e-3 once without clipping, so the
# default keeps a margin.
DEFAULT_LR = 1e-3
GRAD_CLIP = 1.0
# Weight of the identity-confusion term in pretraining (facemux.models.trainer): a critic
# learns to name the identity from the shared latent and the encoder learns to defeat it.
# bench/quality.py (1,500 + 1,000 steps, tiny) measured it against 0 (see bench/RESULTS.md).
DEFAULT_LATENT_ADVERSARY = 0.3
MAX_LATENT_ADVERSARY = 10.0


@dataclass
class JobSpec:
    mode: str  # "identity" | "pretrain"
    datasets: list[str]  # identity mode: one; pretrain: one per identity (its name)
    identity: str = ""  # identity mode: the decoder's identity name
    preset: str = "tiny"  # pretrain mode (identity mode uses the encoder's own config)
    steps: int = 2000
    batch_size: int = 16
    lr: float = DEFAULT_LR
    encoder_lr: float = 0.0  # identity mode: 0 keeps the served encoder frozen
    checkpoint_every: int = 100
    # A checkpoint also waits until this much training time has passed since the last one
    # (0: never waits): fast GPU steps would otherwise spend their time writing checkpoints.
    checkpoint_min_seconds: float = 0.0
    log_every: int = 10
    seed: int = 0
    device: str = "auto"
    threads: int = 0  # torch intra-op threads; 0 = torch's default
    parent_pid: int = 0  # stop (after a checkpoint) when this process is gone; 0 = never
    # One of LOSS_MASKS. "landmarks" is "template" for faces without 68 points, so it changes
    # nothing for a dataset aligned by 5; with 68 it won 18 pairs of 20 where the template won
    # 15 on bench/quality.py (1,500 + 1,000 steps).
    loss_mask: str = "landmarks"
    # "eyes_mouth": the loss counts the eyes 3x and the mouth 2x, placed by each face's
    # landmarks when its dataset has them, else by the aligned-face template; "none": even.
    loss_emphasis: str = "eyes_mouth"
    # Pretrain mode: weight of the latent critic's identity-confusion term; 0 turns it off.
    latent_adversary: float = DEFAULT_LATENT_ADVERSARY

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> JobSpec:
        known = {f.name for f in fields(cls)}
        values = {k: v for k, v in data.items() if k in known}
        # prepare_work_dir writes every field, so a spec without this one was written before
        # the critic existed: its job resumes as it started, without one.
        values.setdefault("latent_adversary", 0.0)
        return cls(**values)

    def validate(self) -> None:
        if self.mode not in MODES:
            raise InvalidInputError(f"mode must be one of {MODES}, got {self.mode!r}")
        if not self.datasets:
            raise InvalidInputError("at least one dataset is needed")
        if self.mode == "identity" and len(self.datasets) != 1:
            raise InvalidInputError(
                f"identity mode trains one identity from one dataset, got {len(self.datasets)}"
            )
        if self.mode == "pretrain":
            get_preset(self.preset)
        if self.loss_emphasis not in LOSS_EMPHASES:
            raise InvalidInputError(
                f"loss_emphasis must be one of {LOSS_EMPHASES}, got {self.loss_emphasis!r}"
            )
        if self.loss_mask not in LOSS_MASKS:
            raise InvalidInputError(
                f"loss_mask must be one of {LOSS_MASKS}, got {self.loss_mask!r}"
            )
        if not 0 <= self.latent_adversary <= MAX_LATENT_ADVERSARY:
            raise InvalidInputError(
                f"latent_adversary must be in [0, {MAX_LATENT_ADVERSARY:g}], "
                f"got {self.latent_adversary!r}"
            )
        validate_hyper_parameters(
            self.steps, self.batch_size, self.lr, self.encoder_lr, self.checkpoint_every
        )


def validate_hyper_parameters(
    steps: int, batch_size: int, lr: float, encoder_lr: float, checkpoint_every: int
) -> None:
    """InvalidInputError naming every bad value, before any process is started."""
    problems = []
    if not 1 <= steps <= MAX_STEPS:
        problems.append(f"steps must be in 1..{MAX_STEPS}, got {steps}")
    if not 1 <= batch_size <= MAX_BATCH:
        problems.append(f"batch_size must be in 1..{MAX_BATCH}, got {batch_size}")
    if not (math.isfinite(lr) and 0 < lr <= MAX_LR):
        problems.append(f"learning_rate must be in (0, {MAX_LR}], got {lr}")
    if not (math.isfinite(encoder_lr) and 0 <= encoder_lr <= MAX_LR):
        problems.append(f"encoder_learning_rate must be in [0, {MAX_LR}], got {encoder_lr}")
    if checkpoint_every < 1:
        problems.append(f"checkpoint_every must be >= 1, got {checkpoint_every}")
    if problems:
        raise InvalidInputError("invalid hyper-parameters: " + "; ".join(problems))


# --------------------------------------------------------------------------- files


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def read_events(work_dir: Path, offset: int = 0) -> tuple[list[dict[str, Any]], int]:
    """Complete event lines from byte ``offset`` on, and the offset after them (a line still
    being written is left for the next read)."""
    path = Path(work_dir) / "events.jsonl"
    try:
        with open(path, "rb") as fh:
            fh.seek(offset)
            data = fh.read()
    except FileNotFoundError:
        return [], offset
    end = data.rfind(b"\n") + 1
    out = []
    for line in data[:end].splitlines():
        with contextlib.suppress(ValueError):
            out.append(json.loads(line))
    return out, offset + end


class _Run:
    """Rank-aware file writes for one run."""

    def __init__(self, work_dir: Path, rank: int) -> None:
        self.dir = work_dir
        self.rank = rank

    def event(self, kind: str, **payload: Any) -> None:
        if self.rank != 0:
            return
        ev = {"type": kind, "time": _now(), **payload}
        line = (json.dumps(ev, sort_keys=True, allow_nan=False) + "\n").encode()
        # One write of a whole line in append mode: a reader never sees half an event
        # unless the process dies mid-write, and read_events skips an unterminated line.
        with open(self.dir / "events.jsonl", "ab") as fh:
            fh.write(line)
            fh.flush()
            os.fsync(fh.fileno())
        if kind == "progress":
            checkpoint.atomic_write(self.dir / "progress.json", line)

    def result(self, payload: dict[str, Any]) -> None:
        if self.rank == 0:
            checkpoint.atomic_write(
                self.dir / "result.json", json.dumps(payload, sort_keys=True).encode()
            )


# --------------------------------------------------------------------------- data


def _load_faces(path: Path, res: int) -> torch.Tensor:
    arr = np.load(path)
    if arr.dtype != np.uint8 or arr.ndim != 4 or arr.shape[-1] != 3 or arr.shape[0] < 1:
        raise InvalidInputError(f"{path.name}: expected uint8 (N,R,R,3) faces, got {arr.shape}")
    if arr.shape[1:3] != (res, res):
        import cv2  # only when a dataset was made for another resolution

        arr = np.stack([cv2.resize(a, (res, res), interpolation=cv2.INTER_AREA) for a in arr])
    return torch.from_numpy(np.ascontiguousarray(arr))


# --------------------------------------------------------------------------- checkpoints


def _save_state(run: _Run, trainer: Trainer) -> None:
    if run.rank != 0:
        return
    state = {
        "steps_done": trainer.steps_done,
        "batch_size": trainer.config.batch_size,
        "decoders": {n: d.state_dict() for n, d in trainer.decoders.items()},
        "optimizer": trainer.optimizer.state_dict(),
        "generator": trainer._gen.get_state(),
    }
    if not trainer.config.encoder_frozen:
        # A frozen encoder is the work directory's encoder.safetensors, unchanged: saving
        # it again would make every checkpoint of a large preset hundreds of MB heavier.
        state["encoder"] = trainer.encoder.state_dict()
    if trainer.critic is not None and trainer.critic_optimizer is not None:
        state["critic"] = trainer.critic.state_dict()
        state["critic_optimizer"] = trainer.critic_optimizer.state_dict()
    buf = io.BytesIO()
    torch.save(state, buf)
    checkpoint.atomic_write(run.dir / "checkpoint.pt", buf.getvalue())
    run.event("checkpoint", step=trainer.steps_done)


def _save_preview(run: _Run, trainer: Trainer) -> None:
    """A small PNG strip, input | reconstruction | swap (to the next identity), of the first
    face of each identity: what WatchJob sends as its preview."""
    if run.rank != 0:
        return
    import cv2  # only here: the rest of the run needs no image codecs

    names = trainer.identities
    rows = []
    with torch.no_grad():
        for i, name in enumerate(names):
            x, _ = trainer._batch(name, torch.zeros(1, dtype=torch.long))
            z = trainer.encoder(x)
            own = trainer.decoders[name](z)[0]
            other = trainer.decoders[names[(i + 1) % len(names)]](z)[0]
            row = torch.cat([x, own, other], dim=3)[0].clamp(0, 1)
            rows.append(row)
    img = torch.cat(rows[:4], dim=1).permute(1, 2, 0).float().cpu().numpy()
    rgb = (img * 255 + 0.5).astype(np.uint8)
    ok, buf = cv2.imencode(".png", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    if ok:
        checkpoint.atomic_write(run.dir / "preview.png", buf.tobytes())
        run.event("preview", step=trainer.steps_done, file="preview.png")


def _load_state(path: Path, trainer: Trainer) -> None:
    state = torch.load(path, map_location=trainer.device, weights_only=True)
    if "encoder" in state:
        trainer.encoder.load_state_dict(state["encoder"])
    for n, d in trainer.decoders.items():
        d.load_state_dict(state["decoders"][n])
    trainer.optimizer.load_state_dict(state["optimizer"])
    if trainer.critic is not None and trainer.critic_optimizer is not None and "critic" in state:
        # A checkpoint from before the critic existed resumes with a fresh one.
        trainer.critic.load_state_dict(state["critic"])
        trainer.critic_optimizer.load_state_dict(state["critic_optimizer"])
    trainer._gen.set_state(state["generator"].cpu())
    trainer.steps_done = int(state["steps_done"])
    trainer.config.batch_size = int(state["batch_size"])


# --------------------------------------------------------------------------- distributed


def _init_distributed(device: torch.device) -> tuple[int, int]:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return dist.get_rank(), dist.get_world_size()


def _sync_gradients(trainer: Trainer, world: int) -> None:
    """Average gradients over ranks before every optimiser step (the critic's too): the
    Trainer's step stays as it is and every rank applies the same update to the same
    weights."""
    _sync_optimizer(trainer.optimizer, [p for p in trainer._params if p.requires_grad], world)
    if trainer.critic is not None and trainer.critic_optimizer is not None:
        _sync_optimizer(trainer.critic_optimizer, list(trainer.critic.parameters()), world)


def _sync_optimizer(optimizer: torch.optim.Optimizer, params: list[Any], world: int) -> None:
    def hook(opt: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat)
        flat /= world
        offset = 0
        for p in params:
            n = p.numel()
            p.grad = flat[offset : offset + n].view_as(p).clone()
            offset += n

    optimizer.register_step_pre_hook(hook)


def _broadcast_weights(trainer: Trainer) -> None:
    critic = [] if trainer.critic is None else [trainer.critic]
    for module in (trainer.encoder, *trainer.decoders.values(), *critic):
        for t in module.state_dict().values():
            dist.broadcast(t, src=0)


# --------------------------------------------------------------------------- the run


def _build(
    spec: JobSpec, work_dir: Path, device: torch.device
) -> tuple[ModelConfig, Encoder, dict[str, Decoder], str]:
    """(config, encoder, decoders, fingerprint of the starting encoder or '')."""
    if spec.mode == "identity":
        encoder, meta = checkpoint.load_encoder(work_dir / "encoder.safetensors", device)
        cfg = meta.config
        decoders = {spec.identity: build_decoder(cfg, seed=spec.seed + 1)}
        return cfg, encoder, decoders, meta.fingerprint
    cfg = get_preset(spec.preset)
    encoder = build_encoder(cfg, seed=spec.seed)
    decoders = {n: build_decoder(cfg, seed=spec.seed + 1 + i) for i, n in enumerate(spec.datasets)}
    return cfg, encoder, decoders, ""


def run_job(
    work_dir: str | os.PathLike[str],
    on_progress: Callable[[Progress], None] | None = None,
) -> dict[str, Any]:
    """Run (or resume) the job in ``work_dir``; returns what it writes to result.json."""
    work = Path(work_dir)
    spec = JobSpec.from_dict(json.loads((work / "spec.json").read_text()))
    device = pick_device(spec.device)
    rank, world = _init_distributed(device)
    run = _Run(work, rank)
    # A run that outlives its server (killed without warning) still holds this lock; its
    # successor waits here until the old one has checkpointed and gone, so two processes
    # never write one work directory.
    lock = file_lock(work / ".run.lock") if rank == 0 else contextlib.nullcontext()
    with lock:
        try:
            result = _run(spec, work, device, run, rank, world, on_progress)
        except BaseException as exc:
            msg = str(exc) or type(exc).__name__
            if isinstance(exc, torch.OutOfMemoryError):
                msg = f"out of memory even at batch size 1: {msg}"
            result = {"status": "failed", "error": f"{type(exc).__name__}: {msg}"}
            run.event("failed", error=result["error"])
            run.result(result)
            if not isinstance(exc, Exception):
                raise
        finally:
            if world > 1 and dist.is_initialized():
                dist.destroy_process_group()
    return result


def _points(landmarks: list[Any] | None, i: int, count: int) -> np.ndarray | None:
    """Face i's landmarks as a finite (count, 2) array, else None."""
    lm = None if landmarks is None or i >= len(landmarks) else landmarks[i]
    pts = None if lm is None else np.asarray(lm, dtype=np.float64)
    if pts is None or pts.shape != (count, 2) or not np.isfinite(pts).all():
        return None
    return pts


def face_loss_masks(landmarks: list[Any] | None, n: int, size: int) -> torch.Tensor:
    """(n, size, size) uint8 loss masks: each face's outline from its 68 points (the jaw and
    the brows raised onto the forehead), or the template's ellipse for a face without them
    (5 points place the template where it already is: alignment used them)."""
    template = (template_mask(size) * 255 + 0.5).astype(np.uint8)
    out = np.empty((n, size, size), dtype=np.uint8)
    for i in range(n):
        pts = _points(landmarks, i, 68)
        out[i] = template if pts is None else (landmark_mask(pts, size) * 255 + 0.5)
    return torch.from_numpy(out)


def face_emphasis(landmarks: list[Any] | None, n: int, size: int) -> torch.Tensor:
    """(n, size, size) loss weights, eyes 3 and mouth 2 over 1: from each face's 68 points,
    or the template's 68 fitted to its 5 points (dlib's 5 have no mouth), or, for a face
    without landmarks, the template itself (an aligned crop puts the features there).
    ``landmarks`` are in pixels of the ``size`` crops."""
    tmpl68 = template_landmarks(size, 68).astype(np.float64)
    tmpl5 = template_landmarks(size, 5).astype(np.float64)
    faces68 = []
    for i in range(n):
        pts68, pts5 = _points(landmarks, i, 68), _points(landmarks, i, 5)
        if pts68 is not None:
            faces68.append(pts68)
        elif pts5 is not None:
            m = umeyama(tmpl5, pts5)
            faces68.append(tmpl68 @ m[:, :2].T + m[:, 2])
        else:
            faces68.append(tmpl68)
    return landmark_weight_map(np.stack(faces68), size)[:, 0]


def make_trainer(
    spec: JobSpec,
    encoder: Encoder,
    decoders: dict[str, Decoder],
    data: dict[str, torch.Tensor],
    device: torch.device | str,
    rank: int = 0,
    landmarks: dict[str, list[Any]] | None = None,
) -> Trainer:
    """The Trainer a job trains with: its schedule, clipping, loss mask and emphasis (bench/
    builds its bare baseline with this too, so both time the same step)."""
    encoder_lr: float | None = spec.encoder_lr
    if spec.mode == "pretrain" and not spec.encoder_lr:
        encoder_lr = None  # pretraining always trains the encoder; default: the decoders' lr
    config = TrainConfig(
        steps=spec.steps,
        batch_size=spec.batch_size,
        lr=spec.lr,
        encoder_lr=encoder_lr,
        seed=spec.seed + rank,  # each rank draws its own batches
        log_every=spec.log_every,
        lr_schedule="cosine",
        warmup_steps=min(100, spec.steps // 10),
        grad_clip=GRAD_CLIP,
        latent_adversary=spec.latent_adversary if spec.mode == "pretrain" else 0.0,
    )
    res = encoder.config.resolution
    masks = None
    lms = landmarks or {}
    if spec.loss_mask == "template":
        template = torch.from_numpy((template_mask(res) * 255 + 0.5).astype(np.uint8))
        masks = {n: template.expand(len(faces), -1, -1) for n, faces in data.items()}
    elif spec.loss_mask == "landmarks":
        masks = {n: face_loss_masks(lms.get(n), len(faces), res) for n, faces in data.items()}
    weights = None
    if spec.loss_emphasis == "eyes_mouth":
        weights = {n: face_emphasis(lms.get(n), len(faces), res) for n, faces in data.items()}
    return Trainer(encoder, decoders, data, config, device=device, masks=masks, weights=weights)


def _run(
    spec: JobSpec,
    work: Path,
    device: torch.device,
    run: _Run,
    rank: int,
    world: int,
    on_progress: Callable[[Progress], None] | None,
) -> dict[str, Any]:
    spec.validate()
    if spec.threads > 0:
        torch.set_num_threads(spec.threads)
    if rank == 0:
        (work / "result.json").unlink(missing_ok=True)
    cfg, encoder, decoders, start_fp = _build(spec, work, device)
    data = {
        name: _load_faces(work / "data" / f"{ds}.npy", cfg.resolution)
        for name, ds in zip(decoders, [*spec.datasets], strict=True)
    }
    landmarks: dict[str, list[Any]] = {}
    for name, ds in zip(decoders, [*spec.datasets], strict=True):
        path = work / "data" / f"{ds}.landmarks.json"
        if path.exists():
            # In the dataset's crop pixels; the faces may have been resized to the model's.
            size = np.load(work / "data" / f"{ds}.npy", mmap_mode="r").shape[1]
            k = cfg.resolution / size
            landmarks[name] = [
                None if lm is None else (np.asarray(lm, dtype=np.float64) * k)
                for lm in json.loads(path.read_text())
            ]
    trainer = make_trainer(spec, encoder, decoders, data, device, rank, landmarks)
    ckpt = work / "checkpoint.pt"
    if ckpt.exists():
        _load_state(ckpt, trainer)
        if rank > 0:
            # The checkpoint holds rank 0's sampler; the others must keep drawing their own.
            trainer._gen.manual_seed(spec.seed + rank + 7919 * trainer.steps_done)
        run.event("message", message=f"resumed from the checkpoint at step {trainer.steps_done}")
    else:
        run.event("message", message=f"started: {spec.mode} on {device}, {world} process(es)")
        if spec.loss_emphasis == "eyes_mouth":
            with_lm = sum(1 for lms in landmarks.values() for lm in lms if lm is not None)
            total = sum(len(f) for f in data.values())
            run.event(
                "message",
                message=f"loss emphasis on eyes and mouth: {with_lm} of {total} faces placed "
                "by their own landmarks, the rest by the aligned-face template",
            )
        if spec.loss_mask == "landmarks":
            outlined = sum(
                1
                for lms in landmarks.values()
                for i in range(len(lms))
                if _points(lms, i, 68) is not None
            )
            total = sum(len(f) for f in data.values())
            run.event(
                "message",
                message=f"loss mask: {outlined} of {total} faces outlined by their own 68 "
                "landmarks, the rest by the aligned-face template",
            )
    if world > 1:
        _broadcast_weights(trainer)
        _sync_gradients(trainer, world)

    last_ckpt = trainer.steps_done
    last_ckpt_t = time.monotonic()
    stop_reason = ""

    def control() -> str:
        if (work / "cancel").exists():
            return "cancelled"
        if (work / "pause").exists():
            return "paused"
        if spec.parent_pid and os.getppid() != spec.parent_pid:
            return "paused"  # the server died: keep the checkpoint for its successor
        return ""

    def should_stop() -> bool:
        nonlocal last_ckpt, last_ckpt_t, stop_reason
        if (
            trainer.steps_done - last_ckpt >= spec.checkpoint_every
            and time.monotonic() - last_ckpt_t >= spec.checkpoint_min_seconds
        ):
            _save_state(run, trainer)
            last_ckpt, last_ckpt_t = trainer.steps_done, time.monotonic()
            _save_preview(run, trainer)
        reason = control()
        if world > 1:
            # Every rank must stop at the same step, so rank 0's view decides.
            flag = torch.tensor([("", "cancelled", "paused").index(reason)])
            dist.broadcast(flag, src=0)
            reason = ("", "cancelled", "paused")[int(flag.item())]
        stop_reason = reason
        return bool(reason)

    def progress(p: Progress) -> None:
        run.event(
            "progress",
            step=p.step,
            steps=p.steps,
            losses={k: v for k, v in p.losses.items() if math.isfinite(v)},
            examples_per_second=p.examples_per_s * world,
            eta_seconds=p.eta_s if math.isfinite(p.eta_s) else -1.0,
        )
        if on_progress is not None:
            on_progress(p)

    summary: dict[str, Any] = {}
    while True:
        try:
            summary = trainer.fit(progress, should_stop)
            break
        except torch.OutOfMemoryError:
            bs = trainer.config.batch_size
            if bs <= 1 or world > 1:
                raise
            trainer.optimizer.zero_grad(set_to_none=True)
            if device.type == "cuda":
                torch.cuda.empty_cache()
            trainer.config.batch_size = max(1, bs // 2)
            run.event(
                "message",
                message=f"CUDA out of memory: batch size lowered to {trainer.config.batch_size}",
            )

    if stop_reason:
        if trainer.steps_done != last_ckpt:
            _save_state(run, trainer)
        result = {"status": stop_reason, "step": trainer.steps_done}
        run.event(stop_reason, step=trainer.steps_done)
        run.result(result)
        return result

    result = _publish(spec, work, run, trainer, cfg, start_fp, world, summary)
    run.event("succeeded", step=trainer.steps_done, result=result)
    run.result(result)
    return result


def _publish(
    spec: JobSpec,
    work: Path,
    run: _Run,
    trainer: Trainer,
    cfg: ModelConfig,
    start_fp: str,
    world: int,
    summary: dict[str, Any],
) -> dict[str, Any]:
    out = work / "out"
    out.mkdir(exist_ok=True)
    summary = {k: v for k, v in summary.items() if k != "final_losses"} | {
        "final_losses": {k: v for k, v in summary.get("final_losses", {}).items()},
        "processes": world,
    }
    enc_fp = start_fp
    result: dict[str, Any] = {"status": "succeeded", "step": trainer.steps_done}
    # Every rank reports the fingerprints it ended with: the DDP test compares them.
    fps = {"encoder": checkpoint.fingerprint(trainer.encoder)}
    fps |= {n: checkpoint.fingerprint(d) for n, d in trainer.decoders.items()}
    if trainer.critic is not None:
        fps[":critic"] = checkpoint.fingerprint(trainer.critic)  # no identity name has ":"
    checkpoint.atomic_write(out / f"rank{run.rank}.json", json.dumps(fps).encode())
    if run.rank != 0:
        return result
    if spec.mode == "pretrain" or not trainer.config.encoder_frozen:
        data, meta = checkpoint.encoder_to_bytes(trainer.encoder.cpu(), cfg, summary)
        checkpoint.atomic_write(out / "encoder.safetensors", data)
        enc_fp = meta.fingerprint
        result["encoder"] = "out/encoder.safetensors"
    decoders = {}
    for name, dec in trainer.decoders.items():
        data, _ = checkpoint.decoder_to_bytes(dec.cpu(), cfg, enc_fp, name, summary)
        checkpoint.atomic_write(out / f"decoder-{name}.safetensors", data)
        decoders[name] = f"out/decoder-{name}.safetensors"
    result |= {"encoder_fingerprint": enc_fp, "decoders": decoders, "summary": summary}
    return result


# --------------------------------------------------------------------------- CLI


def prepare_work_dir(
    work_dir: Path,
    spec: JobSpec,
    datasets: dict[str, np.ndarray],
    encoder_bytes: bytes | None = None,
    landmarks: dict[str, list[Any]] | None = None,
) -> None:
    """Lay out a fresh work directory (used by the job manager, benchmarks and the CLI).
    ``landmarks[name]``: per face of that dataset, its (5 or 68, 2) points in crop pixels,
    or None."""
    spec.validate()
    (work_dir / "data").mkdir(parents=True, exist_ok=True)
    for name, arr in datasets.items():
        buf = io.BytesIO()
        np.save(buf, np.ascontiguousarray(arr, dtype=np.uint8))
        checkpoint.atomic_write(work_dir / "data" / f"{name}.npy", buf.getvalue())
    for name, lms in (landmarks or {}).items():
        rows = [None if lm is None else np.asarray(lm, dtype=float).round(3).tolist() for lm in lms]
        checkpoint.atomic_write(
            work_dir / "data" / f"{name}.landmarks.json", json.dumps(rows).encode()
        )
    if encoder_bytes is not None:
        checkpoint.atomic_write(work_dir / "encoder.safetensors", encoder_bytes)
    checkpoint.atomic_write(
        work_dir / "spec.json", json.dumps(asdict(spec), indent=2, sort_keys=True).encode()
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m facemux.models.pretrain",
        description="Run or resume one training job from its work directory (torchrun-ready).",
    )
    p.add_argument("--job-dir", help="work directory with spec.json and data/ (resumable)")
    p.add_argument("--store", help="store directory: pretrain on its datasets, publish there")
    p.add_argument("--preset", default="tiny")
    p.add_argument("--datasets", default="", help="comma-separated; default: all datasets")
    p.add_argument("--steps", type=int, default=100_000)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=DEFAULT_LR)
    args = p.parse_args(argv)
    if args.job_dir:
        result = run_job(args.job_dir)
    elif args.store:
        # The k8s Job: datasets and the encoder's destination are the server's store. The
        # store layout belongs to the service layer, which is imported only here (it
        # holds no grpc).
        from facemux.service.training.standalone import pretrain_into_store

        result = pretrain_into_store(
            Path(args.store),
            args.preset,
            [d for d in args.datasets.split(",") if d],
            steps=args.steps,
            batch_size=args.batch_size,
            lr=args.lr,
        )
    else:
        p.error("give --job-dir or --store")
    print(json.dumps({k: v for k, v in result.items() if k != "summary"}, sort_keys=True))
    return 0 if result.get("status") in ("succeeded", "paused", "cancelled") else 1


if __name__ == "__main__":
    raise SystemExit(main())
