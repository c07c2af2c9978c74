"""A finished run's models: safetensors checkpoints in out/, and each rank's fingerprints
(the DDP test compares them)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from .. import checkpoint
from ..config import ModelConfig
from ..trainer import Trainer
from .spec import JobSpec
from .workdir import RunFiles

__all__ = ["Start", "publish"]


@dataclass(frozen=True)
class Start:
    """What a run started from and hands on to its models: the architecture, and in
    identity mode the served encoder's fingerprint and face template (None: the default
    every pretraining aligns its datasets with)."""

    config: ModelConfig
    encoder_fingerprint: str = ""
    template: Any = None


def publish(
    spec: JobSpec,
    files: RunFiles,
    trainer: Trainer,
    start: Start,
    world: int,
    summary: dict[str, Any],
) -> dict[str, Any]:
    """Write out/ and return the run's result (rank 0's is the one that counts)."""
    out = files.dir / "out"
    out.mkdir(exist_ok=True)
    summary = {k: v for k, v in summary.items() if k != "final_losses"} | {
        "final_losses": {k: v for k, v in summary.get("final_losses", {}).items()},
        "processes": world,
    }
    cfg, enc_fp = start.config, start.encoder_fingerprint
    result: dict[str, Any] = {"status": "succeeded", "step": trainer.steps_done}
    # Every rank reports the fingerprints it ended with.
    fps = {"encoder": checkpoint.fingerprint(trainer.encoder)}
    fps |= {n: checkpoint.fingerprint(d) for n, d in trainer.decoders.items()}
    if trainer.critic is not None:
        fps[":critic"] = checkpoint.fingerprint(trainer.critic)  # no identity name has ":"
    checkpoint.atomic_write(out / f"rank{files.rank}.json", json.dumps(fps).encode())
    if files.rank != 0:
        return result
    if spec.mode == "pretrain" or not trainer.config.encoder_frozen:
        data, meta = checkpoint.encoder_to_bytes(
            trainer.encoder.cpu(), cfg, summary, template=start.template
        )
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
