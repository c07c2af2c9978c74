"""CUDA paths (run by bench/gpu.sh on a GPU machine; skipped elsewhere)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import Models, face_image, make_store
from facemux.models.faces.tensor import from_uint8, paste_face_t, to_uint8, warp_crop_t
from facemux.service.runtime import Runtime
from facemux.service.scheduler import Item, Op, Scheduler
from facemux.service.settings import Settings
from skimage import data

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]


def test_bf16_runtime_on_cuda_matches_fp32_cpu(tmp_path: Path, models: Models) -> None:
    store = make_store(tmp_path / "s", models, ("alice",))
    cpu = Runtime(Settings(store=store.root, device="cpu"), store)
    gpu = Runtime(Settings(store=store.root, device="cuda", warmup_batch_sizes="1,8"), store)
    cpu.load()
    gpu.load()
    assert gpu.use_bf16 and not cpu.use_bf16
    faces = np.stack([face_image(i) for i in range(8)])
    outs = []
    for rt in (cpu, gpu):
        s = Scheduler(rt)
        try:
            item = Item(Op.SWAP, faces, rt.decoder("alice").decoder, None)
            res = s.submit(item).result(timeout=60)
        finally:
            s.stop()
        assert res.faces is not None
        outs.append(res.faces.astype(int))
    # bf16 keeps ~3 significant digits: a few grey levels on random-weight models.
    assert np.abs(outs[0] - outs[1]).mean() < 4


def test_tensor_pixel_path_same_on_cuda_and_cpu() -> None:
    photo = data.astronaut()
    m = np.array([[0.7, 0.0, -120.0], [0.0, 0.7, -50.0]])
    crops = [to_uint8(warp_crop_t(from_uint8(photo, d), m, 64)) for d in ("cpu", "cuda")]
    assert np.abs(crops[0].astype(int) - crops[1].astype(int)).max() <= 1
    face = from_uint8(crops[0])
    mask = torch.ones(1, 64, 64)
    frames = [
        to_uint8(paste_face_t(from_uint8(photo, d), face.to(d), mask.to(d), m))
        for d in ("cpu", "cuda")
    ]
    assert np.abs(frames[0].astype(int) - frames[1].astype(int)).max() <= 1
