"""The tensor (GPU-ready) pixel path, run on the CPU device, against the OpenCV path."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from common import Models, decode_png, make_store, png
from facemux.client import FacemuxClient
from facemux.models.faces import DeviceFrame, align_matrix, paste_face, warp_crop
from facemux.models.faces.colour import correct_colour
from facemux.models.faces.mask import refine_mask
from facemux.models.faces.tensor import (
    correct_colour_t,
    from_uint8,
    paste_face_t,
    paste_faces_t,
    refine_mask_t,
    rgb_to_lab,
    to_uint8,
    warp_crop_t,
    warp_crops_t,
)
from facemux.service.server import ServerThread
from facemux.service.settings import Settings
from skimage import data

PHOTO = data.astronaut()
# 5-point landmarks of the astronaut's face (dlib order), as the predictor gives them.
LM5 = np.array([[247.0, 124.0], [231.0, 125.0], [196.0, 125.0], [212.0, 126.0], [222.0, 151.0]])


def _crop_matrix(size: int = 64) -> np.ndarray:
    return align_matrix(LM5, size)


def test_alignment_matches_opencv() -> None:
    m = _crop_matrix(128)  # about 1:1, where OpenCV's path is a plain bilinear warp
    want = warp_crop(PHOTO, m, 128).astype(np.float64)
    got = to_uint8(warp_crop_t(from_uint8(PHOTO), m, 128)).astype(np.float64)
    diff = np.abs(got - want)
    assert diff.mean() < 0.5 and np.percentile(diff, 99) <= 2


def test_paste_back_matches_opencv_and_leaves_the_rest_alone() -> None:
    m = _crop_matrix(64)
    rng = np.random.default_rng(0)
    face = cv2.resize(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8), (64, 64))
    mask: np.ndarray = np.zeros((64, 64), np.float32)
    cv2.circle(mask, (32, 34), 22, 1.0, -1)
    mask = cv2.GaussianBlur(mask, (0, 0), 3)
    mask[mask < 1e-3] = 0
    want = paste_face(PHOTO, face, mask, m, "feather")
    got = to_uint8(
        paste_face_t(from_uint8(PHOTO), from_uint8(face), torch.from_numpy(mask)[None], m)
    )
    changed_cv = np.any(want != PHOTO, axis=2)
    changed_t = np.any(got != PHOTO, axis=2)
    # Both change the same neighbourhood; far from it both are bit-identical.
    ys, xs = np.nonzero(changed_cv | changed_t)
    assert xs.max() - xs.min() < 120 and ys.max() - ys.min() < 120
    assert np.array_equal(got[~changed_t], PHOTO[~changed_t])
    diff = np.abs(got.astype(int) - want.astype(int))
    assert diff.mean() < 0.2 and np.percentile(diff[changed_cv], 99) <= 6


def test_lab_conversion_matches_opencv() -> None:
    rgb = PHOTO[100:164, 150:214].astype(np.float32) / 255
    want = cv2.cvtColor(rgb, cv2.COLOR_RGB2LAB)
    got = rgb_to_lab(torch.from_numpy(rgb).permute(2, 0, 1).double()).permute(1, 2, 0).numpy()
    # OpenCV interpolates tables (its a/b come in 1/64 steps): agree to well under 1 unit.
    assert np.abs(got - want).max() < 0.5


@pytest.mark.parametrize("method", ["average", "reinhard"])
def test_colour_correction_matches_opencv(method: str) -> None:
    m = _crop_matrix(64)
    target = warp_crop(PHOTO, m, 64)
    face = np.clip(target.astype(int) * [1.3, 0.8, 1.1] + 10, 0, 255).astype(np.uint8)
    mask: np.ndarray = np.zeros((64, 64), np.float32)
    cv2.circle(mask, (32, 34), 22, 1.0, -1)
    want = correct_colour(face, target, mask, method)
    got = to_uint8(
        correct_colour_t(from_uint8(face), from_uint8(target), torch.from_numpy(mask)[None], method)
    )
    assert np.abs(got.astype(int) - want.astype(int)).mean() < 1.0


def test_whole_frame_swap_on_the_tensor_path_matches_opencv() -> None:
    from facemux.models.faces import FaceSwapper, LandmarkPredictor, SwapOptions, make_detector

    def model(crops: list[np.ndarray]) -> tuple[list[np.ndarray], None]:
        return [np.ascontiguousarray(c[:, ::-1]) for c in crops], None  # a visible change

    det, lms = make_detector("hog"), LandmarkPredictor(5)
    opts = SwapOptions(colour="reinhard")
    want = FaceSwapper(det, lms).swap(PHOTO, model, opts)
    got = FaceSwapper(det, lms, device="cpu").swap(PHOTO, model, opts)
    assert [f.swapped for f in got.faces] == [f.swapped for f in want.faces] == [True]
    diff = np.abs(got.frame.astype(int) - want.frame.astype(int))
    changed = np.any(want.frame != PHOTO, axis=2)
    assert changed.sum() > 1000
    assert diff.mean() < 0.3 and np.percentile(diff[changed], 95) <= 4
    # The tensor path touches only the neighbourhood the OpenCV path touches.
    changed_t = np.any(got.frame != PHOTO, axis=2)
    near = cv2.dilate(changed.astype(np.uint8), np.ones((7, 7), np.uint8)) > 0
    assert not (changed_t & ~near).any()


def test_batched_warp_is_the_per_face_warp() -> None:
    frame = from_uint8(PHOTO)
    shift = np.array([[0, 0, 9.0], [0, 0, -5.0]])
    ms = [_crop_matrix(64), _crop_matrix(64) + shift, _crop_matrix(64) * 0.5]
    batched = warp_crops_t(frame, ms, 64)
    assert tuple(batched.shape) == (3, 3, 64, 64)
    for j, m in enumerate(ms):
        torch.testing.assert_close(batched[j], warp_crop_t(frame, m, 64), atol=1e-5, rtol=0)
    assert tuple(warp_crops_t(frame, [], 64).shape) == (0, 3, 64, 64)


def _paste_inputs(n_faces: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Faces of random colour blocks under soft round masks, 64 px, one per matrix."""
    rng = np.random.default_rng(seed)
    faces, masks = [], []
    for _ in range(n_faces):
        faces.append(cv2.resize(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8), (64, 64)))
        mask: np.ndarray = np.zeros((64, 64), np.float32)
        cx, cy, r = rng.integers(26, 38), rng.integers(28, 40), rng.integers(16, 26)
        cv2.circle(mask, (int(cx), int(cy)), int(r), 1.0, -1)
        mask = cv2.GaussianBlur(mask, (0, 0), 3)
        mask[mask < 1e-3] = 0
        masks.append(mask)
    return (
        torch.stack([from_uint8(f) for f in faces]),
        torch.from_numpy(np.stack(masks))[:, None],
    )


def test_batched_paste_is_the_per_face_paste_overlaps_included() -> None:
    """All faces in one inverse warp give the frame the face-by-face loop gives, in the same
    order: where faces overlap, the later one is blended over the earlier one."""
    frame = from_uint8(cv2.resize(PHOTO, (640, 480)))
    base = _crop_matrix(64)
    shift = np.array([[0, 0, 1.0], [0, 0, 0.0]])
    ms = [
        base,  # overlaps the next two
        base + shift * 14 * base[0, 0],  # 14 px to the left of it in the frame
        base * 0.7,  # bigger in the frame, over both
        base * 2.0,  # a small face
        base + np.array([[0, 0, -60.0], [0, 0, -40.0]]),  # apart from the others
        base + np.array([[0, 0, 40.0], [0, 0, 30.0]]),  # partly outside the frame's edge
    ]
    faces, masks = _paste_inputs(len(ms))
    masks[3] = 0.0  # a face with an empty mask leaves the frame alone
    want = frame
    for j, m in enumerate(ms):
        want = paste_face_t(want, faces[j], masks[j], m)
    got = paste_faces_t(frame, faces, masks, ms)
    # Overlaps really occur: the first three faces' changes intersect.
    touched = [
        (paste_face_t(frame, faces[j], masks[j], m) != frame).any(0) for j, m in enumerate(ms)
    ]
    assert (touched[0] & touched[1]).sum() > 500 and (touched[0] & touched[2]).sum() > 500
    assert not touched[3].any()
    assert (got - want).abs().max().item() <= 1 / 255
    assert (got - want).abs().mean().item() < 1e-5
    # Pixels no face reaches are the frame's own, bit for bit.
    untouched = ~torch.stack(touched).any(0)
    assert torch.equal(got[:, untouched], frame[:, untouched])
    # The order matters where faces overlap: pasting in reverse gives another frame.
    reverse = paste_faces_t(frame, faces.flip(0), masks.flip(0), ms[::-1])
    assert (reverse - want).abs().max().item() > 0.1
    assert torch.equal(paste_faces_t(frame, faces[:0], masks[:0], []), frame)


@pytest.mark.parametrize(("erosion", "blur"), [(0.02, 0.05), (-0.05, 0.1), (0.0, 0.0), (0.1, 0.02)])
def test_mask_refinement_on_the_device_matches_opencv(erosion: float, blur: float) -> None:
    mask: np.ndarray = np.zeros((64, 64), np.float32)
    cv2.ellipse(mask, (32, 36), (22, 26), 10, 0, 360, 1.0, -1)
    mask = cv2.GaussianBlur(mask, (0, 0), 1.5)  # soft, as a decoder's mask head gives
    want = refine_mask(mask, erosion, blur)
    got = refine_mask_t(torch.from_numpy(mask), erosion, blur).numpy()
    assert np.abs(got - want).max() < 2e-3


def _frame_model(
    crops: list[np.ndarray],
) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """A model with a mask head: the crop mirrored, and a soft oval as its mask."""
    mask: np.ndarray = np.zeros((64, 64), np.uint8)
    cv2.ellipse(mask, (32, 36), (20, 25), 0, 0, 360, 255, -1)
    mask = cv2.GaussianBlur(mask, (0, 0), 2)
    return [np.ascontiguousarray(c[:, ::-1]) for c in crops], [mask] * len(crops)


def _frame_model_t(crops: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The same model, tensor in and tensor out."""
    faces, masks = _frame_model(list(crops.permute(0, 2, 3, 1).numpy()))
    return (
        torch.from_numpy(np.stack(faces)).permute(0, 3, 1, 2).contiguous(),
        torch.from_numpy(np.stack(masks)),
    )


def test_device_resident_swap_matches_the_host_model_path() -> None:
    from facemux.models.faces import FaceSwapper, LandmarkPredictor, SwapOptions, make_detector

    det, lms = make_detector("hog"), LandmarkPredictor(5)
    opts = SwapOptions(colour="reinhard")
    sw = FaceSwapper(det, lms, device="cpu")
    before = sw.swap(PHOTO, _frame_model, opts)  # crops through the host, as before
    got = sw.swap(PHOTO, _frame_model, opts, swap_crops_t=_frame_model_t)
    # Nothing came back to the host until the frame was asked for.
    assert not got.frame_on_host and got.device_frame is not None
    assert np.array_equal(got.device_frame.permute(1, 2, 0).numpy(), got.frame)
    assert got.frame_on_host
    assert [f.swapped for f in got.faces] == [True]
    changed = np.any(before.frame != PHOTO, axis=2)
    assert changed.sum() > 1000
    diff = np.abs(got.frame.astype(int) - before.frame.astype(int))
    assert diff.mean() < 0.05 and diff.max() <= 2
    opencv = FaceSwapper(det, lms).swap(PHOTO, _frame_model, opts)
    diff = np.abs(got.frame.astype(int) - opencv.frame.astype(int))
    assert diff.mean() < 0.3 and np.percentile(diff[changed], 95) <= 4


def _tensor_and_opencv_frames(
    store: Path, faces: int, options: object = None, **settings: object
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """PHOTO swapped by a real server with frame_pipeline=tensor (on the CPU device) and
    with the OpenCV path: (tensor frame, OpenCV frame, pixels the OpenCV path changed)."""
    outs = {}
    for pipeline in ("tensor", "opencv"):
        config = Settings(
            port=0,
            auth="off",
            store=store,
            provenance="off",
            device="cpu",
            metrics_port=-1,
            frame_pipeline=pipeline,
            **settings,
        )
        with ServerThread(config) as srv, FacemuxClient(srv.target, timeout=60) as c:
            c.wait_ready(60)
            res = c.swap_image(png(PHOTO), "alice", options=options, output_format="png")
            assert res.faces_swapped == faces and res.frame is not None
            outs[pipeline] = decode_png(res.frame)
    return outs["tensor"], outs["opencv"], np.any(outs["opencv"] != PHOTO, axis=2)


def test_server_frames_on_the_device_path_match_the_opencv_path(
    tmp_path: Path, models: Models
) -> None:
    """device=cpu with frame_pipeline=tensor runs the device-resident path (crops to the
    model and its faces and masks back as tensors) on the CPU: the same frame as OpenCV."""
    make_store(tmp_path / "store", models, ("alice",))
    tensor, opencv, changed = _tensor_and_opencv_frames(
        tmp_path / "store", 1, detector="blazeface", detector_landmarks="detector"
    )
    assert changed.sum() > 1000
    diff = np.abs(tensor.astype(int) - opencv.astype(int))
    assert diff.mean() < 0.3 and np.percentile(diff[changed], 95) <= 4


def test_server_pastes_overlapping_faces_as_the_opencv_path_does(
    tmp_path: Path, models: Models
) -> None:
    """Three caller faces, two of them overlapping, through a real server: the tensor path
    pastes them in one batched warp and gives the frame the OpenCV path gives, which pastes
    them one after the other."""
    from facemux.v1 import swap_service_pb2 as spb
    from facemux.v1 import types_pb2 as tpb

    faces = [LM5, LM5 + np.array([22.0, 6.0]), LM5 + np.array([-150.0, 200.0])]
    options = spb.SwapOptions(
        faces=[spb.FaceHint(landmarks=[tpb.Point(x=x, y=y) for x, y in lm]) for lm in faces]
    )
    make_store(tmp_path / "store", models, ("alice",))
    tensor, opencv, changed = _tensor_and_opencv_frames(tmp_path / "store", 3, options)
    assert changed.sum() > 3000
    diff = np.abs(tensor.astype(int) - opencv.astype(int))
    assert diff.mean() < 0.3 and np.percentile(diff[changed], 95) <= 4


def _device_frame(rgb: np.ndarray) -> DeviceFrame:
    return DeviceFrame(torch.from_numpy(rgb).permute(2, 0, 1).contiguous())


def test_a_device_frame_is_never_copied_to_the_host_with_blazeface_landmarks() -> None:
    """A frame that arrives on the device (as nvjpeg hands it over) is detected, aligned,
    swapped and pasted there with BlazeFace's own 5 points: no host copy of it is made. With
    dlib's landmarks asked for (opt-in) it is copied once, for them, and swapped the same."""
    from facemux.models.faces import FaceSwapper, LandmarkPredictor, SwapOptions
    from facemux.models.faces.blazeface import BlazeFaceDetector

    opts = SwapOptions(colour="reinhard")
    sw = FaceSwapper(BlazeFaceDetector("cpu"), LandmarkPredictor(5), device="cpu")
    frame = _device_frame(PHOTO)
    got = sw.swap(frame, _frame_model, opts, swap_crops_t=_frame_model_t)
    assert [f.swapped for f in got.faces] == [True]
    assert frame.host_reads == 0 and not frame.on_host
    assert got.device_frame is not None and not got.frame_on_host
    # The same pixels as the frame given on the host.
    want = sw.swap(PHOTO, _frame_model, opts, swap_crops_t=_frame_model_t)
    assert np.array_equal(got.frame, want.frame)
    assert frame.host_reads == 0  # reading the result copies the result, not the input

    dlib = FaceSwapper(
        BlazeFaceDetector("cpu", landmarks=False), LandmarkPredictor(5), device="cpu"
    )
    frame = _device_frame(PHOTO)
    got = dlib.swap(frame, _frame_model, opts, swap_crops_t=_frame_model_t)
    assert [f.swapped for f in got.faces] == [True]
    assert frame.host_copies == 1 and frame.host_reads >= 1
    want = dlib.swap(PHOTO, _frame_model, opts, swap_crops_t=_frame_model_t)
    assert np.array_equal(got.frame, want.frame)


def _host_reads(srv: ServerThread, source: str) -> float | None:
    assert srv.app is not None
    return srv.app.metrics.registry.get_sample_value(
        "facemux_frame_host_reads_frames_total", {"source": source}
    )


@pytest.mark.parametrize("landmarks", ["detector", "dlib"])
def test_server_frames_and_streams_on_the_device_path_read_no_host_pixels(
    tmp_path: Path, models: Models, landmarks: str
) -> None:
    """Through a real server on the tensor path: with BlazeFace's own landmarks neither Swap
    nor SwapStream (detecting every 3rd frame, tracking between) reads a frame's pixels on
    the host; with dlib's landmarks (opt-in) every frame is read there, and swapped. A frame
    returned unchanged leaves through the host encoder here (PNG), which reads it."""
    make_store(tmp_path / "store", models, ("alice",))
    settings = Settings(
        port=0,
        auth="off",
        store=tmp_path / "store",
        provenance="off",
        device="cpu",
        metrics_port=-1,
        frame_pipeline="tensor",
        detector="blazeface",
        detector_landmarks=landmarks,
    )
    blank = np.full_like(PHOTO, 90)
    with ServerThread(settings) as srv, FacemuxClient(srv.target, timeout=60) as c:
        c.wait_ready(60)
        assert c.swap_image(png(PHOTO), "alice", output_format="png").faces_swapped == 1
        shifted = [np.roll(PHOTO, 3 * i, axis=1) for i in range(6)]
        out = list(c.swap_stream([png(f) for f in shifted], "alice", detect_every=3))
        assert [r.faces_swapped for r in out] == [1] * 6
        xs = [r.results[0].box.x_min - 3 * i for i, r in enumerate(out)]
        assert max(xs) - min(xs) < 6  # the face is followed as it moves
        if landmarks == "detector":
            assert _host_reads(srv, "host") is None
        else:
            assert _host_reads(srv, "host") == 1 + 6
        assert c.swap_image(png(blank), "alice", output_format="png").faces_swapped == 0
        assert _host_reads(srv, "host") == (1 if landmarks == "detector" else 8)
        assert _host_reads(srv, "copied") is None  # PNG frames are decoded on the host
