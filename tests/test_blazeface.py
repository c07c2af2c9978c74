"""BlazeFace in torch: the port against MediaPipe's TFLite graph, detection and landmarks on
real photos, batches equal to single frames, and a real server swapping with it."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from common import Models, make_store, png, two_face_scene
from facemux.client import FacemuxClient
from facemux.models import faces as fp
from facemux.models.errors import InvalidInputError
from facemux.models.faces.blazeface import (
    INPUT,
    BlazeFaceDetector,
    batched_nms_mask,
    greedy_nms,
    load_blazeface,
    weights_file,
)
from facemux.service.server import ServerThread
from facemux.service.settings import Settings
from numpy.typing import NDArray
from skimage import data

U8 = NDArray[np.uint8]

# dlib 5-point order, from HOG + the 5-point model (tests/test_faces.py).
ASTRONAUT_LM5 = np.array(((255, 104), (237, 105), (195, 101), (212, 103), (224, 135)), np.float32)


@pytest.fixture(scope="module")
def bf() -> BlazeFaceDetector:
    return BlazeFaceDetector()


@pytest.fixture(scope="module")
def astronaut() -> U8:
    return np.ascontiguousarray(data.astronaut())


def test_port_matches_the_tflite_graph() -> None:
    litert = pytest.importorskip("ai_edge_litert.interpreter")
    rng = np.random.default_rng(0)
    face = np.asarray(
        torch.nn.functional.interpolate(
            torch.from_numpy(data.astronaut()).permute(2, 0, 1)[None].float(),
            size=(INPUT, INPUT),
            mode="area",
        )[0].permute(1, 2, 0)
    )
    x = np.stack([face / 127.5 - 1, rng.uniform(-1, 1, (INPUT, INPUT, 3))]).astype(np.float32)
    interp = litert.Interpreter(model_path=str(weights_file()))
    interp.allocate_tensors()
    ref_reg, ref_cls = [], []
    for xi in x:
        interp.set_tensor(interp.get_input_details()[0]["index"], xi[None])
        interp.invoke()
        out = {d["name"]: interp.get_tensor(d["index"]) for d in interp.get_output_details()}
        ref_reg.append(out["regressors"][0])
        ref_cls.append(out["classificators"][0, :, 0])
    with torch.inference_mode():
        reg, logits = load_blazeface()(torch.from_numpy(x).permute(0, 3, 1, 2))
    assert np.abs(reg.numpy() - np.stack(ref_reg)).max() < 1e-3
    assert np.abs(logits.numpy() - np.stack(ref_cls)).max() < 1e-3
    assert logits[0].max() > 1.0 > logits[1].max()  # a face in one, none in the noise


def test_finds_the_astronaut_with_landmarks_near_dlibs(
    bf: BlazeFaceDetector, astronaut: U8
) -> None:
    faces = bf.detect(astronaut)
    assert len(faces) == 1
    f = faces[0]
    assert f.confidence > 0.8 and f.landmarks is not None and f.landmarks.shape == (5, 2)
    assert fp.box_iou(f.box, np.array([179.0, 83.0, 267.0, 171.0])) > 0.7
    eyes = float(np.linalg.norm(ASTRONAUT_LM5[0] - ASTRONAUT_LM5[2]))
    assert np.linalg.norm(f.landmarks - ASTRONAUT_LM5, axis=1).max() < 0.1 * eyes
    # Mirrored, the eyes swap sides and dlib's order follows the image, not the person.
    w = astronaut.shape[1]
    mirrored = bf.detect(np.ascontiguousarray(astronaut[:, ::-1]))
    assert len(mirrored) == 1 and mirrored[0].landmarks is not None
    expect = ASTRONAUT_LM5[[2, 3, 0, 1, 4]] * np.array([-1.0, 1.0]) + np.array([w - 1, 0.0])
    assert np.linalg.norm(mirrored[0].landmarks - expect, axis=1).max() < 0.1 * eyes


def test_finds_the_astronaut_at_a_fraction_of_a_larger_frame(
    bf: BlazeFaceDetector, astronaut: U8
) -> None:
    """The tiles find a face ~1/12 of the frame's width, which the whole view misses."""
    side = 320  # the face ~55 px of 640
    frame = np.full((480, 640, 3), 90, np.uint8)
    small = cv2.resize(astronaut, (side, side), interpolation=cv2.INTER_AREA)
    frame[480 - side :, 640 - side :] = small
    found = bf.detect(frame)
    assert len(found) == 1
    truth = np.array([179.0, 83.0, 267.0, 171.0]) * side / 512 + [320, 160] * 2
    assert fp.box_iou(found[0].box, truth) > 0.5
    assert BlazeFaceDetector(tiles=1).detect(frame) == []


def test_batch_equals_one_by_one(bf: BlazeFaceDetector, astronaut: U8) -> None:
    frames = [astronaut, two_face_scene(1), np.zeros((100, 300, 3), np.uint8), two_face_scene(2)]
    batched = bf.detect_batch(frames)
    assert [len(b) for b in batched] == [1, 2, 0, 2]
    for frame, faces in zip(frames, batched, strict=True):
        alone = bf.detect(frame)
        assert len(alone) == len(faces)
        for a, b in zip(alone, faces, strict=True):
            np.testing.assert_allclose(a.box, b.box, atol=0.05)
            np.testing.assert_allclose(a.confidence, b.confidence, atol=1e-4)
            assert a.landmarks is not None and b.landmarks is not None
            np.testing.assert_allclose(a.landmarks, b.landmarks, atol=0.05)


def test_rejects_bad_frames_and_options(bf: BlazeFaceDetector) -> None:
    with pytest.raises(InvalidInputError):
        bf.detect_batch([np.zeros((10, 10), np.uint8)])
    with pytest.raises(InvalidInputError):
        BlazeFaceDetector(tiles=0)
    with pytest.raises(InvalidInputError):
        BlazeFaceDetector(score_threshold=1.5)
    assert bf.detect_batch([]) == []


@pytest.mark.parametrize("own_landmarks", [False, True])
def test_server_swaps_a_full_frame_with_blazeface(
    tmp_path: Path, models: Models, astronaut: U8, own_landmarks: bool
) -> None:
    make_store(tmp_path / "store", models, ("alice",))
    settings = Settings(
        port=0,
        auth="off",
        store=tmp_path / "store",
        provenance="off",
        detector="blazeface",
        detector_landmarks="detector" if own_landmarks else "dlib",
    )
    with ServerThread(settings) as srv, FacemuxClient(srv.target, timeout=60) as c:
        c.wait_ready(60)
        info = c.model_info()
        assert info.face_detector == "blazeface" and "Apache-2.0" in info.face_models_licence
        res = c.swap_image(png(astronaut), "alice", output_format="png")
        assert res.faces_swapped == 1
        face = res.response.results[0]
        got = np.array([[p.x, p.y] for p in face.landmarks], np.float32)
        assert got.shape == (5, 2)
        assert np.linalg.norm(got - ASTRONAUT_LM5, axis=1).max() < 6.0
        assert 150 < face.box.x_min < 210 and 240 < face.box.x_max < 300
        assert res.frame is not None and res.frame != png(astronaut)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_same_faces_on_cuda_as_on_cpu(bf: BlazeFaceDetector, astronaut: U8) -> None:
    gpu = BlazeFaceDetector(device="cuda")
    frames = [astronaut, two_face_scene(1), two_face_scene(2)]
    for a_faces, b_faces in zip(bf.detect_batch(frames), gpu.detect_batch(frames), strict=True):
        assert len(a_faces) == len(b_faces)
        for a, b in zip(a_faces, b_faces, strict=True):
            np.testing.assert_allclose(a.box, b.box, atol=0.5)
            assert a.landmarks is not None and b.landmarks is not None
            np.testing.assert_allclose(a.landmarks, b.landmarks, atol=0.5)


def _greedy_reference(boxes: NDArray[np.float64], iou: float) -> list[bool]:
    """Textbook greedy NMS over boxes already in score order."""
    keep: list[bool] = []
    for j, b in enumerate(boxes):
        keep.append(not any(keep[i] and fp.box_iou(boxes[i], b) > iou for i in range(j)))
    return keep


def test_batched_greedy_nms_is_greedy_nms_for_every_image() -> None:
    rng = np.random.default_rng(3)
    b, k = 4, 40
    xy = rng.uniform(0, 60, (b, k, 2))
    wh = rng.uniform(5, 30, (b, k, 2))
    boxes = torch.from_numpy(np.concatenate([xy, xy + wh], -1)).float()
    scores = torch.from_numpy(np.sort(rng.uniform(0, 1, (b, k)), 1)[:, ::-1].copy()).float()
    scores[:, -5:] = float("-inf")  # absent candidates
    got = greedy_nms(boxes, scores, 0.3)
    for i in range(b):
        want = _greedy_reference(boxes[i, :-5].double().numpy(), 0.3)
        assert got[i, :-5].tolist() == want and not got[i, -5:].any()
    # A chain of overlaps: greedy NMS keeps the third, which only the second overlaps.
    chain = torch.tensor([[[0, 0, 10, 10], [5, 0, 15, 10], [10, 0, 20, 10]]], dtype=torch.float32)
    top = torch.tensor([[0.9, 0.8, 0.7]])
    assert greedy_nms(chain, top, 0.3).tolist() == [[True, False, True]]
    assert batched_nms_mask(chain, top, 0.3).tolist() == [[True, False, True]]
    if importlib.util.find_spec("torchvision") is not None:  # the gpu extra's fused kernel
        assert torch.equal(batched_nms_mask(boxes, scores, 0.3), got)
