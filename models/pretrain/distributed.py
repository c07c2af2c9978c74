"""Several processes training one model under torchrun (WORLD_SIZE > 1): every rank draws
its own batches, and torch's DistributedDataParallel averages the gradients across ranks
(gloo on CPU, NCCL on CUDA) while the backward pass is still running, bucket by bucket, so
every rank applies the same update to the same weights.

Two wrappers: the encoder with all decoders (every rank trains every identity), and the
latent critic, which has its own backward pass and optimiser. The critic's other use, as a
fixed judge in the encoder's loss, goes to the bare module: its weights take no gradient
there, so there is nothing to average.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from ..trainer import Trainer

__all__ = ["STOP_REASONS", "agree_on_stop", "init_distributed", "shut_down", "sync_trainer"]

STOP_REASONS = ("", "cancelled", "paused")


def init_distributed(device: torch.device) -> tuple[int, int, torch.device]:
    """(rank, world size, this rank's device); (0, 1, device) outside torchrun. A CUDA
    device without an index becomes the rank's own GPU on its node (LOCAL_RANK)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1, device
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return dist.get_rank(), dist.get_world_size(), device


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


def sync_trainer(trainer: Trainer) -> None:
    """Wrap the trainer's modules in DistributedDataParallel. Wrapping copies rank 0's
    weights to every rank (the critic starts from a per-rank seed, a resumed run from the
    same checkpoint everywhere); the trainer keeps the bare modules, so nothing saved
    carries DDP's ``module.`` prefix. A frozen encoder is not wrapped: every rank loaded
    it from the same file and it never changes."""
    device_ids = None if trainer.device.type == "cpu" else [trainer.device]

    def autoencoders(module: nn.Module) -> nn.Module:
        # Unused parameters (a mask head without masks to learn from) are found by walking
        # the graph back from the outputs each step; a run with none skips the walk.
        return DistributedDataParallel(
            module, device_ids=device_ids, find_unused_parameters=trainer.untrained_in_step
        )

    def critic(module: nn.Module) -> nn.Module:
        return DistributedDataParallel(module, device_ids=device_ids)

    trainer.wrap(autoencoders, critic)
