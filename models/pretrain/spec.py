"""What a training job trains: the job spec, its defaults and its limits."""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Any

from ..config import get_preset
from ..errors import InvalidInputError

__all__ = [
    "DEFAULT_BATCH",
    "DEFAULT_CHECKPOINT_EVERY",
    "DEFAULT_LATENT_ADVERSARY",
    "DEFAULT_LR",
    "DEFAULT_PRESET",
    "DEFAULT_STEPS",
    "GRAD_CLIP",
    "LOSS_EMPHASES",
    "LOSS_MASKS",
    "MODES",
    "JobSpec",
    "validate_hyper_parameters",
]

MODES = ("identity", "pretrain")
# What the reconstruction loss counts: "template" weighs only the face (an ellipse around the
# mean aligned face, which is where the alignment puts every face), so the model spends its
# capacity where a swap is pasted; "landmarks" weighs each face's own outline where its
# dataset kept 68 landmarks (the template elsewhere), so the decoder's mask head also learns
# each face's shape; "none" counts the whole crop.
LOSS_MASKS = ("template", "landmarks", "none")
LOSS_EMPHASES = ("eyes_mouth", "none")
# A job's defaults, also what the training API gives a hyper-parameter it is sent as zero.
DEFAULT_STEPS = 2000
DEFAULT_BATCH = 16
DEFAULT_CHECKPOINT_EVERY = 100
DEFAULT_PRESET = "tiny"
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
    preset: str = DEFAULT_PRESET  # pretrain mode (identity mode uses the encoder's own config)
    steps: int = DEFAULT_STEPS
    batch_size: int = DEFAULT_BATCH
    lr: float = DEFAULT_LR
    encoder_lr: float = 0.0  # identity mode: 0 keeps the served encoder frozen
    checkpoint_every: int = DEFAULT_CHECKPOINT_EVERY
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
    # Strength of a colour cast on the encoder's inputs only (augment.AugmentConfig); 0: off.
    input_colour: float = 0.0

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
        if not 0 <= self.input_colour <= 1:
            raise InvalidInputError(f"input_colour must be in [0, 1], got {self.input_colour!r}")
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
