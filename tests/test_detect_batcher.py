"""The detector's micro-batcher: frames of concurrent callers detected in one pass, each
caller answered with its own faces, deadlines and cancellation honoured, errors kept to
their own caller; and a real server batching the frames of concurrent Swap calls."""

from __future__ import annotations

import threading
import time
from concurrent.futures import CancelledError, ThreadPoolExecutor
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from common import Models, make_store, png, two_face_scene
from facemux.client import FacemuxClient
from facemux.client.errors import FacemuxRpcError
from facemux.models.errors import DeadlineExpiredError, InvalidInputError
from facemux.models.faces import DetectedFace, box_iou
from facemux.models.faces.blazeface import BlazeFaceDetector, Prepared
from facemux.service.cancel import CancelToken, current_cancel
from facemux.service.detect_batcher import DetectionBatcher, DetectionStats, detection_deadline
from facemux.service.server import ServerThread
from facemux.service.settings import Settings
from numpy.typing import NDArray
from skimage import data

U8 = NDArray[np.uint8]


@pytest.fixture(scope="module")
def bf() -> BlazeFaceDetector:
    # Whole frames only (no tiles): a fifth of the network work, for faces over ~1/10 of
    # the frame, which these are.
    return BlazeFaceDetector(tiles=1)


def _astronaut_at(x0: int, y0: int, side: int = 448) -> U8:
    """640x480 grey frame with the astronaut (face ~77 px) at (x0, y0)."""
    frame = np.full((480, 640, 3), 90, np.uint8)
    small = cv2.resize(data.astronaut(), (side, side), interpolation=cv2.INTER_AREA)
    frame[y0 : y0 + side, x0 : x0 + side] = small[: 480 - y0, : 640 - x0]
    return frame


def _astronaut_face(x0: int, y0: int, side: int = 448) -> NDArray[np.float64]:
    return np.array([179.0, 83.0, 267.0, 171.0]) * side / 512 + [x0, y0] * 2


def _same(a: list[DetectedFace], b: list[DetectedFace]) -> None:
    assert len(a) == len(b)
    for fa, fb in zip(a, b, strict=True):
        np.testing.assert_allclose(fa.box, fb.box, atol=0.05)
        assert fa.landmarks is not None and fb.landmarks is not None
        np.testing.assert_allclose(fa.landmarks, fb.landmarks, atol=0.05)


def test_waiting_frames_go_through_in_one_pass_each_with_its_own_faces(
    bf: BlazeFaceDetector,
) -> None:
    stats: list[DetectionStats] = []
    b = DetectionBatcher(bf, max_frames=3, on_batch=stats.append, start=False)
    frames = [_astronaut_at(0, 0), two_face_scene(2), np.zeros((100, 300, 3), np.uint8)]
    frames += [_astronaut_at(192, 32), two_face_scene(3)]
    futures = [b.submit(bf.prepare(f)) for f in frames]
    assert b.step() and b.step()
    assert [s.frames for s in stats] == [3, 2]  # bounded by max_frames
    for frame, fut in zip(frames, futures, strict=True):
        _same(bf.faces(fut.result(0)), bf.detect(frame))
    assert [len(bf.faces(f.result(0))) for f in futures] == [1, 2, 0, 1, 2]
    b.close()


def test_a_frame_that_breaks_its_batch_fails_alone(bf: BlazeFaceDetector) -> None:
    stats: list[DetectionStats] = []
    b = DetectionBatcher(bf, on_batch=stats.append, start=False)
    good = [_astronaut_at(0, 0), two_face_scene(2)]
    p0 = bf.prepare(good[0])
    # Inputs of the wrong size: the stacked forward fails for the whole batch.
    bad = Prepared(torch.zeros(p0.inputs.shape[0], 3, 64, 64), p0.views)
    futures = [b.submit(p0), b.submit(bad), b.submit(bf.prepare(good[1]))]
    assert b.step()
    assert [s.frames for s in stats] == [3]
    assert isinstance(futures[1].exception(0), RuntimeError)
    _same(bf.faces(futures[0].result(0)), bf.detect(good[0]))
    _same(bf.faces(futures[2].result(0)), bf.detect(good[1]))
    # A frame the detector cannot read fails in its caller's thread, before any batch.
    with pytest.raises(InvalidInputError):
        b.detect(np.zeros((10, 10), np.uint8))
    b.close()


def test_expired_and_cancelled_frames_are_not_computed(bf: BlazeFaceDetector) -> None:
    stats: list[DetectionStats] = []
    b = DetectionBatcher(bf, on_batch=stats.append, start=False)
    frame = _astronaut_at(0, 0)
    late = b.submit(bf.prepare(frame), deadline=time.monotonic() - 1.0)
    gone = b.submit(bf.prepare(frame))
    live = b.submit(bf.prepare(frame))
    gone.cancel()
    assert b.step()
    assert [s.frames for s in stats] == [1]
    assert isinstance(late.exception(0), DeadlineExpiredError)
    assert len(bf.faces(live.result(0))) == 1

    # A caller stops waiting at its deadline, and a cancelled call at once; neither frame
    # is computed afterwards.
    errors: list[BaseException] = []
    token = CancelToken()

    def call(deadline: float | None, cancel: CancelToken | None) -> None:
        detection_deadline.set(deadline)
        current_cancel.set(cancel)
        try:
            b.detect(frame)
        except BaseException as exc:
            errors.append(exc)

    t0 = time.monotonic()
    waiter = threading.Thread(target=call, args=(time.monotonic() + 0.2, None))
    waiter.start()
    waiter.join(5)
    assert 0.15 < time.monotonic() - t0 < 3.0
    cancelled = threading.Thread(target=call, args=(None, token))
    cancelled.start()
    time.sleep(0.05)
    token.cancel()
    cancelled.join(5)
    assert [type(e) for e in errors] == [DeadlineExpiredError, CancelledError]
    b.close()  # wakes the worker loop's last step: nothing left to compute
    assert [s.frames for s in stats] == [1]


def test_a_lone_frame_does_not_wait_for_company(bf: BlazeFaceDetector) -> None:
    frame = _astronaut_at(0, 0)
    bf.detect(frame)  # warm
    # A wait this long would show through any noise of a loaded machine.
    ran_in: list[str] = []
    b = DetectionBatcher(
        bf, max_wait_s=1.5, on_batch=lambda _: ran_in.append(threading.current_thread().name)
    )
    try:
        t0 = time.perf_counter()
        assert len(b.detect(frame)) == 1
        lone = time.perf_counter() - t0
        # Alone, the frame ran in its caller's thread: no hand-off to the worker and back.
        assert ran_in == [threading.current_thread().name]
        # An announced frame that never comes holds a batch max_wait_s at most.
        entered, leave = threading.Event(), threading.Event()

        def announcer() -> None:
            with b.expect():
                entered.set()
                leave.wait(5)

        th = threading.Thread(target=announcer)
        th.start()
        entered.wait(5)
        t0 = time.perf_counter()
        assert len(b.detect(frame)) == 1
        held = time.perf_counter() - t0
        leave.set()
        th.join(5)
    finally:
        b.close()
    assert lone < 1.0 and 1.4 < held < 5.0
    assert ran_in[1] == "facemux-detector"  # with company announced, the worker ran it


def _settings(store: Path, **kw: object) -> Settings:
    base: dict[str, object] = dict(
        port=0,
        auth="off",
        store=store,
        provenance="off",
        device="cpu",
        metrics_port=-1,
        detector="blazeface",
        detector_landmarks="detector",
        detector_tiles=1,
    )
    base.update(kw)
    return Settings(**base)


def test_server_detects_concurrent_frames_in_shared_batches(tmp_path: Path, models: Models) -> None:
    make_store(tmp_path / "store", models, ("alice",))
    places = [(0, 0), (192, 0), (128, 32), (192, 32)]
    jobs: list[tuple[bytes, list[NDArray[np.float64]] | int]] = []
    for i, (x, y) in enumerate(places):
        jobs.append((png(_astronaut_at(x, y)), [_astronaut_face(x, y)]))
        jobs.append((png(two_face_scene(2 + i % 2)), 2))
    with ServerThread(_settings(tmp_path / "store")) as srv:
        with FacemuxClient(srv.target, timeout=60) as c:
            c.wait_ready(60)
            assert c.swap_image(jobs[0][0], "alice").faces_swapped == 1  # a lone call

        assert srv.app is not None
        reg = srv.app.metrics.registry

        def sample(name: str) -> float:
            return reg.get_sample_value(f"facemux_detector_batch_frames_{name}") or 0.0

        assert (sample("count"), sample("sum")) == (1.0, 1.0)

        def run(job: tuple[bytes, list[NDArray[np.float64]] | int]) -> None:
            frame, want = job
            with FacemuxClient(srv.target, timeout=60) as cc:
                res = cc.swap_image(frame, "alice")
            boxes = [
                np.array([f.box.x_min, f.box.y_min, f.box.x_max, f.box.y_max])
                for f in res.response.results
            ]
            if isinstance(want, int):
                assert len(boxes) == want
            else:  # this caller's own face, where it put it
                assert len(boxes) == 1 and box_iou(boxes[0], want[0]) > 0.5

        # Rounds of concurrent callers until detection batches of more than one frame
        # formed (on a busy machine callers may straggle in one by one for a round).
        for _ in range(4):
            with ThreadPoolExecutor(len(jobs)) as pool:
                list(pool.map(run, jobs))
            if sample("sum") > sample("count"):
                break
        assert sample("sum") > sample("count")  # some batch held several frames


def test_server_bad_or_late_frames_fail_alone(tmp_path: Path, models: Models) -> None:
    make_store(tmp_path / "store", models, ("alice",))
    good = png(_astronaut_at(128, 32))
    settings = _settings(tmp_path / "store", detector_max_wait_ms=50.0)
    with ServerThread(settings) as srv, FacemuxClient(srv.target, timeout=60) as c:
        c.wait_ready(60)
        c.swap_image(good, "alice")  # loads the detector

        def run(kind: str) -> str:
            with FacemuxClient(srv.target, timeout=60) as cc:
                try:
                    if kind == "corrupt":
                        cc.swap_image(good[: len(good) // 2], "alice")
                    elif kind == "late":
                        cc.swap_image(good, "alice", timeout=0.005)
                    else:
                        assert cc.swap_image(good, "alice").faces_swapped == 1
                except FacemuxRpcError as exc:
                    return str(exc.code.name)
            return "OK"

        kinds = ["good", "corrupt", "good", "late", "good", "good"]
        with ThreadPoolExecutor(len(kinds)) as pool:
            codes = list(pool.map(run, kinds))
    assert codes == ["OK", "INVALID_ARGUMENT", "OK", "DEADLINE_EXCEEDED", "OK", "OK"]


def test_frames_already_on_the_device_are_detected_where_they_are(bf: BlazeFaceDetector) -> None:
    """A frame decoded on the device (nvjpeg) is detected from there, not uploaded again:
    the same faces as from the host copy, through the batcher and the pipeline."""
    from facemux.models.faces import FaceSwapper, LandmarkPredictor

    frame = _astronaut_at(192, 32)
    on_device = torch.from_numpy(frame).permute(2, 0, 1).contiguous()  # (3, H, W) uint8
    _same(bf.detect(on_device), bf.detect(frame))
    with pytest.raises(InvalidInputError):
        bf.prepare(on_device.float())
    b = DetectionBatcher(bf)
    try:
        sw = FaceSwapper(b, LandmarkPredictor(5))
        _same(sw.find_faces(frame, frame_t=on_device), sw.find_faces(frame))
    finally:
        b.close()
