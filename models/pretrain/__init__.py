"""One training run from a job spec and a work directory: the single entry point behind the
training service's worker processes, the k8s pretraining Job and the benchmarks.

    python -m facemux.models.pretrain --job-dir DIR            # one process
    torchrun --nproc-per-node=2 -m facemux.models.pretrain --job-dir DIR

A run keeps everything it needs and leaves in its work directory (see :mod:`.workdir`), so
a run killed at any moment resumes from it. Under torchrun every rank draws its own
batches and the ranks keep one set of weights (see :mod:`.distributed`); rank 0 alone
writes files.

The modules, one concern each: :mod:`.spec` what to train, :mod:`.workdir` the files,
:mod:`.loss_maps` and :mod:`.recipe` the Trainer a job trains with, :mod:`.state` the
resumable checkpoint, :mod:`.preview` the preview strip, :mod:`.distributed` the ranks,
:mod:`.publish` the finished models, :mod:`.run` the run itself.

Nothing here imports grpc or the service: it runs inside training pods with no server
around (pretraining straight into a server's store is facemux.service.training.standalone).
"""

from __future__ import annotations

from .loss_maps import face_emphasis, face_loss_masks
from .recipe import make_trainer
from .run import run_job
from .spec import (
    DEFAULT_BATCH,
    DEFAULT_CHECKPOINT_EVERY,
    DEFAULT_LATENT_ADVERSARY,
    DEFAULT_LR,
    DEFAULT_PRESET,
    DEFAULT_STEPS,
    GRAD_CLIP,
    LOSS_EMPHASES,
    LOSS_MASKS,
    MODES,
    JobSpec,
    validate_hyper_parameters,
)
from .workdir import prepare_work_dir, read_events

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
    "face_emphasis",
    "face_loss_masks",
    "make_trainer",
    "prepare_work_dir",
    "read_events",
    "run_job",
    "validate_hyper_parameters",
]
