"""The model's memory layout on CPU: chosen by timing both at load (settings.cpu_layout =
auto), or pinned; either way the server answers with the same faces and latents."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch
from common import Models, decode_png, face_image, make_store, png, running_server, server_settings
from facemux.client import FacemuxClient
from facemux.models import inference
from facemux.models.config import get_preset
from facemux.models.errors import InvalidInputError
from facemux.models.networks import build_decoder, build_encoder
from facemux.service.settings import Settings


def _layouts(module: torch.nn.Module) -> set[str]:
    """The layouts the module's 4-D weights are stored in ('both' for 1x1 kernels etc.,
    which satisfy either)."""
    seen = set()
    for p in module.parameters():
        if p.dim() != 4:
            continue
        nchw = p.is_contiguous()
        last = p.is_contiguous(memory_format=torch.channels_last)
        seen.add("both" if nchw and last else "nchw" if nchw else "channels_last")
    return seen - {"both"}


@pytest.mark.parametrize(("margin", "expected"), [(0.0, "nchw"), (float("inf"), "channels_last")])
def test_faster_layout_keeps_nchw_unless_channels_last_wins_by_the_margin(
    margin: float, expected: str
) -> None:
    cfg = get_preset("tiny")
    enc, dec = build_encoder(cfg, seed=0).eval(), build_decoder(cfg, seed=1).eval()
    layout, ratio = inference.faster_layout(enc, dec, cfg.resolution, batch=2, margin=margin)
    assert layout == expected
    assert ratio > 0
    # Both modules are left in the layout chosen, whatever order the trial ran them in.
    assert _layouts(enc) == _layouts(dec) == {expected}


def test_faster_layout_outputs_agree() -> None:
    cfg = get_preset("tiny")
    enc, dec = build_encoder(cfg, seed=0).eval(), build_decoder(cfg, seed=1).eval()
    x = torch.rand(3, 3, cfg.resolution, cfg.resolution, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        before = dec(enc(x))[0]
    layout, _ = inference.faster_layout(enc, dec, cfg.resolution, batch=2)
    with torch.inference_mode():
        after = dec(enc(x.contiguous(memory_format=inference.LAYOUTS[layout])))[0]
    assert torch.allclose(before, after, atol=1e-5)


def test_an_unknown_layout_is_refused_at_start() -> None:
    with pytest.raises(InvalidInputError, match="cpu_layout 'nhwc' must be auto, nchw or"):
        Settings(cpu_layout="nhwc")


@pytest.mark.unmarked_outputs
def test_both_layouts_serve_the_same_faces_and_latents(tmp_path: Path, models: Models) -> None:
    make_store(tmp_path / "store", models, ("alice",))
    faces = [png(face_image(i)) for i in range(3)]
    served: dict[str, tuple[list[np.ndarray], list[np.ndarray]]] = {}
    for layout in ("auto", "nchw", "channels_last"):
        settings = dataclasses.replace(
            server_settings(tmp_path / "store", provenance="off"), cpu_layout=layout
        )
        with running_server(settings) as srv, FacemuxClient(srv.target, timeout=30) as c:
            assert srv.app is not None
            chosen = srv.app.runtime.layout
            assert chosen == layout if layout != "auto" else chosen in inference.LAYOUTS
            swapped = [decode_png(f) for f in c.swap_faces(faces, "alice").faces]
            latents = [lat.array for lat in c.encode(faces)]
            # Latents the server made in one layout decode in the other's (here: its own).
            decoded = c.decode(c.encode(faces[:1]), "alice").faces
            assert len(decoded) == 1
        served[layout] = (swapped, latents)
    ref_faces, ref_latents = served["nchw"]
    for layout in ("auto", "channels_last"):
        got_faces, got_latents = served[layout]
        for a, b in zip(ref_faces, got_faces, strict=True):
            # Different kernels round differently: at most one level apart.
            assert np.abs(a.astype(int) - b.astype(int)).max() <= 1
        for a, b in zip(ref_latents, got_latents, strict=True):
            assert a.shape == b.shape
            np.testing.assert_allclose(a, b, atol=1e-4)
