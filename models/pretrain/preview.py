"""The preview strip WatchJob sends: how the model sees each identity right now."""

from __future__ import annotations

import torch

from ..pixels import to_uint8
from ..trainer import Trainer
from .workdir import RunFiles

__all__ = ["PREVIEW", "save_preview"]

PREVIEW = "preview.png"


def save_preview(files: RunFiles, trainer: Trainer) -> None:
    """A small PNG strip, input | reconstruction | swap (to the next identity), of the first
    face of each identity (at most four rows)."""
    if files.rank != 0:
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
    img = torch.cat(rows[:4], dim=1).permute(1, 2, 0).float().cpu()
    rgb = to_uint8(img).numpy()
    ok, buf = cv2.imencode(".png", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    if ok:
        files.write(PREVIEW, buf.tobytes())
        files.event("preview", step=trainer.steps_done, file=PREVIEW)
