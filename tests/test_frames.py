"""Full frames through the real server: detection, paste-back invariance, selection, no-face
handling, caller landmarks, alpha, streams and the CLI."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import cv2
import grpc
import numpy as np
import pytest
from common import Models, decode_png, make_store, png
from facemux.client import FacemuxClient, InvalidArgument, NotFound
from facemux.models import synth
from facemux.service.server import ServerThread
from facemux.service.settings import Settings
from facemux.v1 import swap_service_pb2 as spb
from facemux.v1 import types_pb2 as tpb
from skimage import data

ASTRONAUT = data.astronaut()
FACEMUX = str(Path(sys.executable).parent / "facemux")


def _composite(
    n: int, size: int = 96, shape: tuple[int, int] = (240, 420)
) -> tuple[np.ndarray, list[np.ndarray]]:
    """A plain background with n synthetic faces of growing size; their 5-point landmarks."""
    frame = np.full((*shape, 3), 90, np.uint8)
    lms = []
    for i in range(n):
        s = size * (1 + 0.15 * i)
        affine = np.array([[s, 0, 10 + 135 * i], [0, s, 20]], np.float64)
        face = synth.render_into(frame, synth.identity_from_seed(i), synth.FaceState(), affine)
        frame = face.image
        lms.append(face.landmarks5)
    return frame, lms


def _hints(lms: list[np.ndarray]) -> list[spb.FaceHint]:
    return [
        spb.FaceHint(landmarks=[tpb.Point(x=float(x), y=float(y)) for x, y in lm]) for lm in lms
    ]


@pytest.mark.unmarked_outputs
def test_astronaut_face_is_found_and_only_its_region_changes(client: FacemuxClient) -> None:
    res = client.swap_image(png(ASTRONAUT), "alice", output_format="png")
    assert res.faces_swapped == 1
    face = res.response.results[0]
    assert face.swapped and face.confidence > 0.3 and len(face.landmarks) == 5
    # The astronaut's face is around x 180-270, y 80-170 in the 512x512 picture.
    assert 150 < face.box.x_min < 210 and 240 < face.box.x_max < 300
    assert 50 < face.box.y_min < 120 and 140 < face.box.y_max < 200
    assert res.frame is not None
    out = decode_png(res.frame)
    changed = np.any(out != ASTRONAUT, axis=2)
    assert changed.sum() > 500
    ys, xs = np.nonzero(changed)
    w, h = face.box.x_max - face.box.x_min, face.box.y_max - face.box.y_min
    # Every changed pixel lies near the face (the aligned crop covers ~2x the box).
    assert xs.min() > face.box.x_min - w and xs.max() < face.box.x_max + w
    assert ys.min() > face.box.y_min - h and ys.max() < face.box.y_max + h
    # ...so the rest of the picture is bit-identical.
    far = np.ones_like(changed)
    y0, y1 = max(0, int(face.box.y_min - h)), int(face.box.y_max + h) + 1
    x0, x1 = max(0, int(face.box.x_min - w)), int(face.box.x_max + w) + 1
    far[y0:y1, x0:x1] = False
    assert not changed[far].any()


def test_no_face_returns_the_frame_unchanged_or_not_found(client: FacemuxClient) -> None:
    blank = np.full((120, 160, 3), 128, np.uint8)
    res = client.swap_image(png(blank), "alice", output_format="png")
    assert res.faces_swapped == 0 and len(res.response.results) == 0
    assert res.frame is not None and np.array_equal(decode_png(res.frame), blank)
    with pytest.raises(NotFound, match="no face"):
        client.swap_image(png(blank), "alice", options=spb.SwapOptions(require_face=True))


@pytest.mark.unmarked_outputs
def test_caller_landmarks_selection_and_limits(client: FacemuxClient) -> None:
    frame, lms = _composite(3)
    opts = spb.SwapOptions(faces=_hints(lms))
    res = client.swap_image(png(frame), "bob", options=opts, output_format="png")
    assert res.faces_swapped == 3

    opts = spb.SwapOptions(faces=_hints(lms), max_faces=2)
    res = client.swap_image(png(frame), "bob", options=opts)
    skipped = [r for r in res.response.results if not r.swapped]
    assert res.faces_swapped == 2 and len(skipped) == 1
    assert skipped[0].skip_reason == spb.SKIP_REASON_OVER_LIMIT
    assert skipped[0].index == 0  # the smallest face is the one left out
    assert any("only the largest 2" in n for n in res.notes)

    opts = spb.SwapOptions(faces=_hints(lms), selection=spb.FACE_SELECTION_LARGEST)
    res = client.swap_image(png(frame), "bob", options=opts)
    assert [r.swapped for r in res.response.results] == [False, False, True]

    opts = spb.SwapOptions(faces=_hints(lms), selection=spb.FACE_SELECTION_LISTED, face_indices=[1])
    res = client.swap_image(png(frame), "bob", options=opts, output_format="png")
    assert [r.swapped for r in res.response.results] == [False, True, False]
    assert res.response.results[0].skip_reason == spb.SKIP_REASON_NOT_SELECTED
    # Faces not selected are untouched.
    assert res.frame is not None
    out = decode_png(res.frame)
    left = lms[0][:, 0].max() + 20
    assert np.array_equal(out[:, : int(left) - 40], frame[:, : int(left) - 40])


@pytest.mark.parametrize(
    ("hint", "words"),
    [
        (spb.FaceHint(landmarks=[tpb.Point(x=5000, y=1)] * 5), "outside"),
        (spb.FaceHint(landmarks=[tpb.Point(x=10, y=10)] * 3), "5 or 68"),
        (spb.FaceHint(box=tpb.Box(x_min=10, y_min=10, x_max=5, y_max=50)), "box"),
        (spb.FaceHint(box=tpb.Box(x_min=-900, y_min=10, x_max=50, y_max=50)), "outside"),
    ],
)
def test_bad_hints_are_invalid_argument(
    client: FacemuxClient, hint: spb.FaceHint, words: str
) -> None:
    frame, _ = _composite(1)
    with pytest.raises(InvalidArgument, match=words):
        client.swap_image(png(frame), "alice", options=spb.SwapOptions(faces=[hint]))
    assert client.health() == "SERVING"


def test_rgba_input_keeps_its_alpha(client: FacemuxClient) -> None:
    frame, lms = _composite(1)
    alpha = np.tile(np.linspace(0, 255, frame.shape[1]).astype(np.uint8), (frame.shape[0], 1))
    rgba = np.dstack([frame, alpha])
    data_ = bytes(cv2.imencode(".png", cv2.cvtColor(rgba, cv2.COLOR_RGBA2BGRA))[1].tobytes())
    res = client.swap_image(data_, "alice", options=spb.SwapOptions(faces=_hints(lms)))
    assert res.faces_swapped == 1 and res.frame is not None
    out = cv2.imdecode(np.frombuffer(res.frame, np.uint8), cv2.IMREAD_UNCHANGED)
    assert out is not None and out.shape[2] == 4 and np.array_equal(out[..., 3], alpha)


def test_stream_keeps_order_and_survives_bad_and_empty_frames(client: FacemuxClient) -> None:
    frame = ASTRONAUT
    blank = np.full_like(frame, 77)
    frames = [png(frame), png(blank), b"\x89PNG broken", png(frame), png(frame)]
    out = list(client.swap_stream(frames, "alice", detect_every=2, output_format="png"))
    assert [r.frame_index for r in out] == [0, 1, 2, 3, 4]
    assert out[2].error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert [r.faces_swapped for r in out] == [1, 0, 0, 1, 1]
    assert np.array_equal(decode_png(out[1].frame.encoded), blank)


def test_stream_with_detection_and_tracking(client: FacemuxClient) -> None:
    photo = png(ASTRONAUT)
    out = list(client.swap_stream([photo] * 6, "alice", detect_every=3, output_format="png"))
    assert [r.faces_swapped for r in out] == [1] * 6
    # A still picture tracked across frames gives the same box every frame.
    boxes = np.array([[r.results[0].box.x_min, r.results[0].box.y_min] for r in out])
    assert np.abs(boxes - boxes[0]).max() < 3


def test_disconnecting_mid_stream_frees_the_server(
    server: ServerThread, client: FacemuxClient
) -> None:
    def endless() -> object:
        while True:
            yield png(ASTRONAUT)

    stream = client.swap_stream(endless(), "alice")
    next(stream)
    stream.close()  # the client goes away mid-stream
    assert server.app is not None
    res = client.swap_image(png(ASTRONAUT), "alice")
    assert res.faces_swapped == 1
    assert server.app.scheduler.queue_depth() == 0


def test_cli_swap_photo_and_video(server: ServerThread, tmp_path: Path) -> None:
    t = ["--target", server.target]
    src = tmp_path / "astronaut.jpg"
    cv2.imwrite(str(src), cv2.cvtColor(ASTRONAUT, cv2.COLOR_RGB2BGR))
    out = tmp_path / "swapped.png"
    r = subprocess.run(
        [FACEMUX, "swap", str(src), "--identity", "alice", "-o", str(out), "--format", "png", *t],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, r.stderr
    assert decode_png(out.read_bytes()).shape == ASTRONAUT.shape

    video = tmp_path / "in.mp4"
    writer = cv2.VideoWriter(str(video), cv2.VideoWriter.fourcc(*"mp4v"), 12.0, (256, 256))
    small = cv2.resize(cv2.cvtColor(ASTRONAUT, cv2.COLOR_RGB2BGR), (256, 256))
    for i in range(10):
        writer.write(np.roll(small, i, axis=1))
    writer.release()
    dst = tmp_path / "out.mp4"
    r = subprocess.run(
        [FACEMUX, "swap-video", str(video), str(dst), "--identity", "alice", "--quiet", *t],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr
    assert "10 frames" in r.stdout and "audio" in r.stdout
    cap = cv2.VideoCapture(str(dst))
    assert int(cap.get(cv2.CAP_PROP_FRAME_COUNT)) == 10
    assert abs(cap.get(cv2.CAP_PROP_FPS) - 12.0) < 0.01
    assert (int(cap.get(cv2.CAP_PROP_FRAME_WIDTH)), int(cap.get(cv2.CAP_PROP_FRAME_HEIGHT))) == (
        256,
        256,
    )
    cap.release()


def test_detection_in_worker_processes_survives_a_killed_worker(
    tmp_path: Path, models: Models
) -> None:
    """detector_processes moves dlib (which holds the GIL) into spawned workers: the same
    faces as in the server's process; a killed worker is replaced and the call answered; the
    workers end with the server."""
    make_store(tmp_path / "store", models, ("alice",))
    frame = png(ASTRONAUT)
    boxes = {}
    pids: list[int] = []
    for processes in (0, 2):
        settings = Settings(
            port=0,
            auth="off",
            store=tmp_path / "store",
            provenance="off",
            detector_processes=processes,
        )
        with ServerThread(settings) as srv, FacemuxClient(srv.target, timeout=60) as c:
            c.wait_ready(60)
            res = c.swap_image(frame, "alice", output_format="png")
            assert res.faces_swapped == 1
            b = res.response.results[0].box
            boxes[processes] = (b.x_min, b.y_min, b.x_max, b.y_max)
            assert srv.app is not None and srv.app.frames is not None
            pool = srv.app.frames.swapper().detector.pool
            if processes == 0:
                assert pool is None
                continue
            pids = pool.pids()
            assert len(pids) == 2 and os.getpid() not in pids
            os.kill(pids[0], signal.SIGKILL)
            res = c.swap_image(frame, "alice", output_format="png")
            assert res.faces_swapped == 1
            assert pids[0] not in pool.pids()
    assert boxes[0] == boxes[2]
    for pid in pids:  # joined (so reaped) when the server closed
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


_SERVE_ONE_FRAME = """
import json, sys
from facemux.client import FacemuxClient
from facemux.service.server import ServerThread
from facemux.service.settings import Settings
from facemux.v1 import swap_service_pb2 as spb, types_pb2 as tpb

store, frame, points = sys.argv[1], open(sys.argv[2], "rb").read(), json.loads(sys.argv[3])
hint = spb.FaceHint(landmarks=[tpb.Point(x=x, y=y) for x, y in points])
settings = Settings(port=0, auth="off", store=store, provenance="off")
with ServerThread(settings) as srv, FacemuxClient(srv.target, timeout=60) as client:
    client.wait_ready(60)
    opts = spb.SwapOptions(faces=[hint])
    res = client.swap_image(frame, "alice", output_format="png", options=opts)
open(sys.argv[2] + ".out", "wb").write(res.frame)
print(json.dumps({"swapped": res.faces_swapped, "synth": "facemux.models.synth" in sys.modules}))
__import__("gc").freeze()  # as facemux's own entry points do: no collections over torch at exit
"""


def _footprint(m: np.ndarray, shape: tuple[int, ...], size: int) -> np.ndarray:
    """Frame pixels whose centres the frame -> crop matrix ``m`` puts inside the crop, or
    within a crop pixel of it (the paste-back's bilinear warp reaches that far)."""
    ys, xs = np.mgrid[: shape[0], : shape[1]]
    u = m[0, 0] * xs + m[0, 1] * ys + m[0, 2]
    v = m[1, 0] * xs + m[1, 1] * ys + m[1, 2]
    return (u >= -1.5) & (u <= size + 0.5) & (v >= -1.5) & (v <= size + 0.5)


def test_serving_aligns_to_the_checkpoint_template_and_renders_no_faces(
    tmp_path: Path, models: Models
) -> None:
    """A server in a fresh process loads the encoder's stored template, aligns frames to it
    (here one framing faces 30 % smaller: the swap reaches past the default crop) and never
    imports the synthetic-face renderer."""
    import dataclasses
    import json

    from facemux.models import checkpoint
    from facemux.models.face_template import TEMPLATE_68
    from facemux.models.faces import align_matrix

    template = (np.asarray(TEMPLATE_68) - 0.5) * 0.7 + 0.5
    encoder, _ = checkpoint.load_encoder(models.encoder_bytes)
    data, meta = checkpoint.encoder_to_bytes(encoder, models.config, template=template)
    assert meta.fingerprint == models.fingerprint  # the template is not part of the weights
    make_store(tmp_path / "store", dataclasses.replace(models, encoder_bytes=data), ("alice",))
    frame, (lm,) = _composite(1, size=80, shape=(200, 200))
    (tmp_path / "frame.png").write_bytes(png(frame))
    out = subprocess.run(
        [
            sys.executable,
            "-c",
            _SERVE_ONE_FRAME,
            str(tmp_path / "store"),
            str(tmp_path / "frame.png"),
            json.dumps(lm.tolist()),
        ],
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert json.loads(out.stdout.splitlines()[-1]) == {"swapped": 1, "synth": False}
    changed = (decode_png((tmp_path / "frame.png.out").read_bytes()) != frame).any(axis=2)
    ours = _footprint(align_matrix(lm, 64, face_template=template), frame.shape, 64)
    default = _footprint(align_matrix(lm, 64), frame.shape, 64)
    assert changed.any() and not (changed & ~ours).any()
    assert (changed & ~default).sum() > 0.3 * changed.sum()
