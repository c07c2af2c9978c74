"""Several processes training one model under torchrun (WORLD_SIZE > 1): every rank draws
its own batches and the gradients are averaged across ranks before each optimiser step
(gloo on CPU, NCCL on CUDA), so every rank holds the same weights."""

from __future__ import annotations

import os
from typing import Any

import torch
import torch.distributed as dist

from ..trainer import Trainer

__all__ = ["STOP_REASONS", "agree_on_stop", "init_distributed", "shut_down", "sync_trainer"]

STOP_REASONS = ("", "cancelled", "paused")


def init_distributed(device: torch.device) -> tuple[int, int]:
    """(rank, world size); (0, 1) outside torchrun."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return dist.get_rank(), dist.get_world_size()


def shut_down(world: int) -> None:
    if world > 1 and dist.is_initialized():
        dist.destroy_process_group()


def agree_on_stop(reason: str, world: int) -> str:
    """Rank 0's stop reason on every rank: all ranks must stop at the same step."""
    if world <= 1:
        return reason
    flag = torch.tensor([STOP_REASONS.index(reason)])
    dist.broadcast(flag, src=0)
    return STOP_REASONS[int(flag.item())]


def sync_trainer(trainer: Trainer, world: int) -> None:
    """Start every rank from rank 0's weights and keep them equal from then on."""
    _broadcast_weights(trainer)
    _sync_gradients(trainer, world)


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
