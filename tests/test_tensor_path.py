"""The tensor (GPU-ready) pixel path, run on the CPU device, against the OpenCV path."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch
from facemux.models.faces import align_matrix, paste_face, warp_crop
from facemux.models.faces.colour import correct_colour
from facemux.models.faces.tensor import (
    correct_colour_t,
    from_uint8,
    paste_face_t,
    rgb_to_lab,
    to_uint8,
    warp_crop_t,
)
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
    mask = np.zeros((64, 64), np.float32)
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
    mask = np.zeros((64, 64), np.float32)
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
