"""The Trainer a job trains with: its schedule, clipping, loss masks and emphasis."""

from __future__ import annotations

from typing import Any

import torch

from ..augment import AugmentConfig
from ..networks import Decoder, Encoder
from ..trainer import TrainConfig, Trainer
from .loss_maps import face_emphasis, face_loss_masks, template_loss_masks
from .spec import GRAD_CLIP, JobSpec

__all__ = ["make_trainer"]


def make_trainer(
    spec: JobSpec,
    encoder: Encoder,
    decoders: dict[str, Decoder],
    data: dict[str, torch.Tensor],
    device: torch.device | str,
    rank: int = 0,
    landmarks: dict[str, list[Any]] | None = None,
) -> Trainer:
    """bench/ builds its bare baseline with this too, so both time the same step."""
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
        augment=AugmentConfig(input_colour=spec.input_colour),
    )
    res = encoder.config.resolution
    masks = None
    lms = landmarks or {}
    if spec.loss_mask == "template":
        masks = {n: template_loss_masks(len(faces), res) for n, faces in data.items()}
    elif spec.loss_mask == "landmarks":
        masks = {n: face_loss_masks(lms.get(n), len(faces), res) for n, faces in data.items()}
    weights = None
    if spec.loss_emphasis == "eyes_mouth":
        weights = {n: face_emphasis(lms.get(n), len(faces), res) for n, faces in data.items()}
    return Trainer(encoder, decoders, data, config, device=device, masks=masks, weights=weights)
