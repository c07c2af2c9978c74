"""The run's own checkpoint (checkpoint.pt): everything a killed run needs to resume
exactly where its last checkpoint left it. Not a model file: those are safetensors, made
when the run succeeds (see publish)."""

from __future__ import annotations

import io
from pathlib import Path

import torch

from ..trainer import Trainer
from .workdir import RunFiles

__all__ = ["CHECKPOINT", "load_state", "save_state"]

CHECKPOINT = "checkpoint.pt"


def save_state(files: RunFiles, trainer: Trainer) -> None:
    if files.rank != 0:
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
    files.write(CHECKPOINT, buf.getvalue())
    files.event("checkpoint", step=trainer.steps_done)


def load_state(path: Path, trainer: Trainer) -> None:
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
