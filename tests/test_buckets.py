"""Batch-size buckets (settings.batch_buckets): the model runs only at the bucket sizes, each
batch padded with blank rows, and answers each caller exactly as it would unpadded."""

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
from facemux.service.runtime import Runtime
from facemux.service.settings import Settings
from facemux.service.store import LocalStore
from test_metrics import scrape, value


def test_power_of_two_buckets_end_at_the_max_batch() -> None:
    assert inference.power_of_two_buckets(1) == (1,)
    assert inference.power_of_two_buckets(8) == (1, 2, 4, 8)
    assert inference.power_of_two_buckets(12) == (1, 2, 4, 8, 12)
    assert inference.power_of_two_buckets(64) == (1, 2, 4, 8, 16, 32, 64)


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_padded_batches_answer_as_unpadded_ones(layout: str) -> None:
    cfg = get_preset("tiny")
    enc, dec = build_encoder(cfg, seed=0).eval(), build_decoder(cfg, seed=1).eval()
    inference.set_layout(enc, layout)
    inference.set_layout(dec, layout)
    seen: list[tuple[int, bool]] = []

    def encode(x: torch.Tensor) -> torch.Tensor:
        kept = x.is_contiguous(memory_format=inference.LAYOUTS[layout]) and x.is_inference()
        seen.append((len(x), kept))
        return inference.encode(enc, x)

    def decode(z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        seen.append((len(z), z.is_inference()))
        return inference.decode(dec, z)

    buckets = (2, 4, 8)
    x = torch.rand(
        11, 3, cfg.resolution, cfg.resolution, generator=torch.Generator().manual_seed(0)
    )
    fmt = inference.LAYOUTS[layout]
    x = x.contiguous(memory_format=fmt)
    # (rows, blank rows run): 1 -> 2; 3 -> 4; 4 as is; 11 -> 8 and 3 -> 4.
    for n, blank in ((1, 1), (3, 1), (4, 0), (11, 1)):
        seen.clear()
        z, padded = inference.in_buckets(encode, x[:n], buckets, fmt)
        assert padded == blank
        assert all(size in buckets and kept for size, kept in seen), seen
        want = inference.encode(enc, x[:n])
        assert z.shape == want.shape
        torch.testing.assert_close(z, want, atol=1e-5, rtol=1e-4)
        seen.clear()
        (rgb, mask), padded = inference.in_buckets(decode, z, buckets, fmt)
        assert padded == blank and all(size in buckets and ok for size, ok in seen), seen
        want_rgb, want_mask = inference.decode(dec, z)
        torch.testing.assert_close(rgb, want_rgb, atol=1e-5, rtol=1e-4)
        assert (mask is None) == (want_mask is None)
        if mask is not None and want_mask is not None:
            torch.testing.assert_close(mask, want_mask, atol=1e-5, rtol=1e-4)
    # No buckets: the batch runs as it is, at its own size.
    seen.clear()
    inference.in_buckets(encode, x[:3], ())
    assert [size for size, _ in seen] == [3]


def test_bucket_settings_are_checked_and_resolved(tmp_path: Path) -> None:
    # Whole sizes from 1 to the max batch, ending at it.
    for bad in ("0,8", "a,b", "", "4,x", "-1,8", "1_0,8", "1,4", "8,16", "8,99999999999"):
        with pytest.raises(InvalidInputError, match=r"batch_buckets .* must be auto, off or"):
            Settings(batch_buckets=bad, max_batch_size=8)
    store = LocalStore(tmp_path / "store")
    # auto: buckets only for a compiled model, which runs on CUDA alone.
    for spec, want in (("auto ", ()), ("off", ()), ("8, 2,4,,2", (2, 4, 8)), (" 8 ", (8,))):
        settings = Settings(device="cpu", batch_buckets=spec, max_batch_size=8)
        assert Runtime(settings, store).buckets == want


def test_chunks_keep_their_rows_when_the_model_reuses_its_output_buffer() -> None:
    # A CUDA graph replays into the same output tensors: what a chunk returned must not
    # change when the next chunk runs.
    buffers: dict[int, torch.Tensor] = {}

    def replayed(x: torch.Tensor) -> torch.Tensor:
        out = buffers.setdefault(len(x), torch.empty(len(x), 2))
        out.copy_(x[:, :2] * 10)
        return out

    x = torch.arange(9 * 2, dtype=torch.float32).reshape(9, 2)
    out, padded = inference.in_buckets(replayed, x, (1, 2, 4))  # 4, 4 and 1
    assert padded == 0
    torch.testing.assert_close(out, x * 10)
    out, padded = inference.in_buckets(replayed, x[:3], (1, 2, 4))  # padded to 4
    assert padded == 1
    torch.testing.assert_close(out, x[:3] * 10)
    inference.in_buckets(replayed, x[4:], (1, 2, 4))
    torch.testing.assert_close(out, x[:3] * 10)  # not written over by the next batch


@pytest.mark.unmarked_outputs
def test_server_with_buckets_answers_as_without(tmp_path: Path, models: Models) -> None:
    make_store(tmp_path / "store", models, ("alice",))
    faces = [png(face_image(i)) for i in range(3)]
    base = dataclasses.replace(
        server_settings(tmp_path / "store", provenance="off"), max_batch_size=8, metrics_port=0
    )
    served = {}
    for spec in ("off", "2,4,8"):
        settings = dataclasses.replace(base, batch_buckets=spec)
        with running_server(settings) as srv, FacemuxClient(srv.target, timeout=30) as c:
            assert srv.app is not None and srv.app.metrics_port
            latents = [lat.array for lat in c.encode(faces)]  # 3 faces: a batch of 4
            swapped = [decode_png(f) for f in c.swap_faces(faces[:1], "alice").faces]  # of 2
            text = scrape(srv.app.metrics_port)
            if spec == "off":
                assert "facemux_batch_padding_faces" not in text
            else:
                # Encode: 1 blank row; Swap: 1 through the encoder and 1 through the decoder.
                assert srv.app.runtime.padded_faces == 3
                assert value(text, "facemux_batch_padding_faces_total") == 3
        served[spec] = (latents, swapped)
    (ref_latents, ref_faces), (got_latents, got_faces) = served["off"], served["2,4,8"]
    for a, b in zip(ref_latents, got_latents, strict=True):
        np.testing.assert_allclose(a, b, atol=1e-4)
    for a, b in zip(ref_faces, got_faces, strict=True):
        assert a.shape == b.shape and np.abs(a.astype(int) - b.astype(int)).max() <= 1


def test_a_compiled_model_is_traced_once_per_bucket() -> None:
    # torch.compile's eager backend: the same tracing and guards as on CUDA, no codegen.
    from torch._dynamo.utils import counters

    cfg = get_preset("tiny")
    enc, dec = build_encoder(cfg, seed=0).eval(), build_decoder(cfg, seed=1).eval()
    # As on CUDA: the model in channels_last, so the encoder's latents come out in it.
    inference.set_layout(enc, "channels_last")
    inference.set_layout(dec, "channels_last")
    fmt = torch.channels_last
    enc = torch.compile(enc, backend="eager", dynamic=False)
    dec = torch.compile(dec, backend="eager", dynamic=False)
    buckets = inference.power_of_two_buckets(8)
    torch._dynamo.reset()
    counters.clear()
    try:
        for n in range(1, 11):  # 9 and 10: in two
            x = torch.rand(n, 3, cfg.resolution, cfg.resolution)
            z, _ = inference.in_buckets(lambda t: inference.encode(enc, t), x, buckets, fmt)
            inference.in_buckets(lambda t: inference.decode(dec, t), z, buckets, fmt)
            # Latents as a Decode request brings them: contiguous, not made by the encoder.
            asked = z.contiguous().clone()
            inference.in_buckets(lambda t: inference.decode(dec, t), asked, buckets, fmt)
        # One graph per bucket for each network, and none left uncompiled.
        assert counters["stats"]["unique_graphs"] == 2 * len(buckets)
        assert not any("recompile" in k.lower() for k in counters["unimplemented"])
    finally:
        torch._dynamo.reset()
