"""The pieces of the nvjpeg frame path that run without a GPU: orientation and watermark as
tensor ops (held to the host versions), the micro-batcher, the device-frame hand-over in the
swapper, and the gpu_jpeg setting. nvjpeg itself is exercised in tests/test_cuda.py."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from common import Models, make_store
from facemux.client import FacemuxClient
from facemux.models import imageio
from facemux.models import watermark as wm
from facemux.models.errors import InvalidInputError, PreconditionError
from facemux.models.faces import FaceSwapper, LandmarkPredictor, SwapOptions, make_detector
from facemux.models.faces.gpu_codec import MicroBatcher, apply_orientation_t, available
from facemux.service.server import ServerThread
from facemux.service.settings import Settings
from skimage import data

PHOTO = data.astronaut()


@pytest.mark.parametrize("orientation", range(1, 9))
def test_orientation_on_tensors_matches_the_host(orientation: int) -> None:
    img = np.random.default_rng(orientation).integers(0, 256, (5, 7, 3), dtype=np.uint8)
    want = imageio.apply_orientation(img, orientation)
    got = apply_orientation_t(torch.from_numpy(img).permute(2, 0, 1), orientation)
    assert np.array_equal(got.permute(1, 2, 0).numpy(), want)


@pytest.mark.parametrize("shape", [(64, 64), (37, 101), (128, 144), (480, 640)])
def test_watermark_on_tensors_matches_the_host(shape: tuple[int, int]) -> None:
    img = np.random.default_rng(0).integers(0, 256, (*shape, 3), dtype=np.uint8)
    img[:4] = 0  # saturation at both ends, as cv2.add/subtract saturate
    img[-4:] = 255
    payload = wm.payload_for("request-1")
    want = wm.embed_watermark(img, payload)
    got = wm.embed_watermark_t(torch.from_numpy(img).permute(2, 0, 1), payload)
    assert got.dtype == torch.uint8
    assert np.array_equal(got.permute(1, 2, 0).numpy(), want)


def test_micro_batcher_groups_waiting_callers_and_fails_items_alone() -> None:
    calls: list[list[int]] = []
    gate = threading.Event()

    def work(items: list[int]) -> list[int | BaseException]:
        gate.wait(10)
        calls.append(list(items))
        return [ValueError(f"bad {i}") if i < 0 else i * 10 for i in items]

    batcher: MicroBatcher[int, int] = MicroBatcher(work, max_batch=4, name="test-batcher")
    first = batcher.submit(1)  # taken alone; holds the worker at the gate
    time.sleep(0.2)
    rest = [batcher.submit(i) for i in (2, -3, 4, 5, 6)]
    gate.set()
    assert first.result(10) == 10
    assert [f.exception(10) is None for f in rest] == [True, False, True, True, True]
    assert [f.result() for f in rest if f.exception() is None] == [20, 40, 50, 60]
    assert "bad -3" in str(rest[1].exception())
    # The five that queued while the first ran went in batches of at most four.
    assert calls[0] == [1] and calls[1] == [2, -3, 4, 5] and calls[2] == [6]


def test_micro_batcher_survives_a_function_that_raises() -> None:
    def work(items: list[int]) -> list[int | BaseException]:
        if 0 in items:
            raise RuntimeError("boom")
        return list(items)

    batcher: MicroBatcher[int, int] = MicroBatcher(work, max_batch=8, name="test-raise")
    with pytest.raises(RuntimeError, match="boom"):
        batcher(0)
    assert batcher(7) == 7


def test_swapper_takes_a_frame_already_on_the_device() -> None:
    def model(crops: list[np.ndarray]) -> tuple[list[np.ndarray], None]:
        return [np.ascontiguousarray(c[:, ::-1]) for c in crops], None

    swapper = FaceSwapper(make_detector("hog"), LandmarkPredictor(5), device="cpu")
    opts = SwapOptions(colour="reinhard")
    uploaded = swapper.swap(PHOTO, model, opts)
    given = swapper.swap(PHOTO, model, opts, frame_t=torch.from_numpy(PHOTO).permute(2, 0, 1))
    assert [f.swapped for f in given.faces] == [True]
    assert np.array_equal(given.frame, uploaded.frame)
    assert given.device_frame is not None
    assert np.array_equal(given.device_frame.permute(1, 2, 0).numpy(), given.frame)
    assert not np.array_equal(given.frame, PHOTO)


def test_gpu_jpeg_on_without_a_gpu_refuses_to_start(tmp_path: Path, models: Models) -> None:
    if available("cuda"):
        pytest.skip("nvjpeg is available here")
    make_store(tmp_path / "store", models, ("alice",))
    with pytest.raises(InvalidInputError, match="gpu_jpeg"):
        Settings(gpu_jpeg="sometimes")
    settings = Settings(port=0, auth="off", store=tmp_path / "store", gpu_jpeg="on")
    with (
        pytest.raises(PreconditionError, match="gpu_jpeg is on but nvjpeg cannot run here"),
        ServerThread(settings),
    ):
        pass


def test_frames_count_the_codec_that_handled_them(
    server: ServerThread, client: FacemuxClient
) -> None:
    photo = imageio.encode_image(PHOTO, "JPEG", 95)
    res = client.swap_image(photo, "alice")
    assert res.faces_swapped == 1
    assert server.app is not None
    registry = server.app.metrics.registry
    for op in ("decode", "encode"):
        labels = {"op": op, "codec": "host"}  # no GPU here: OpenCV on the host
        assert registry.get_sample_value("facemux_frame_codec_frames_total", labels) == 1
        labels["codec"] = "nvjpeg"
        assert registry.get_sample_value("facemux_frame_codec_frames_total", labels) is None


def test_serve_says_why_it_cannot_start(tmp_path: Path) -> None:
    if available("cuda"):
        pytest.skip("nvjpeg is available here")
    cmd = [sys.executable, "-m", "facemux.client.cli", "serve", "--auth", "off", "--port", "0"]
    cmd += ["--metrics-port", "-1", "--store", str(tmp_path / "store"), "--gpu-jpeg", "on"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert "facemux serve: cannot start: gpu_jpeg is on but nvjpeg cannot run" in done.stderr
    assert "Traceback" not in done.stderr
