"""The synthetic face renderer: deterministic, well-formed, and both identity and state show."""

from __future__ import annotations

import dataclasses
import itertools
import math

import cv2
import numpy as np
import pytest
from facemux.models.synth import (
    IDENTITY_RANGES,
    LANDMARKS5_FROM_68,
    FaceState,
    HairStyle,
    IdentityParams,
    crop_affine,
    identity_from_seed,
    make_dataset,
    make_states,
    render,
    render_into,
)


def _mad(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a.astype(np.float64) - b.astype(np.float64)).mean())


def _random_pairs(n: int, seed: int) -> list[tuple[IdentityParams, FaceState]]:
    rng = np.random.default_rng(seed)
    return [(IdentityParams.random(rng), FaceState.random(rng)) for _ in range(n)]


def test_same_inputs_give_bit_identical_output() -> None:
    for ident, state in _random_pairs(5, seed=1):
        a, b = render(ident, state), render(ident, state)
        assert np.array_equal(a.image, b.image)
        assert np.array_equal(a.landmarks68, b.landmarks68)
        assert np.array_equal(a.landmarks5, b.landmarks5)
        assert np.array_equal(a.mask, b.mask)
    assert identity_from_seed(7) == identity_from_seed(7)
    assert identity_from_seed(7) != identity_from_seed(8)


@pytest.mark.parametrize("size", [32, 64, 100, 256])
def test_shapes_and_dtypes(size: int) -> None:
    face = render(identity_from_seed(3), FaceState.random(np.random.default_rng(size)), size)
    assert face.image.shape == (size, size, 3) and face.image.dtype == np.uint8
    assert face.landmarks68.shape == (68, 2) and face.landmarks68.dtype == np.float32
    assert face.landmarks5.shape == (5, 2) and face.landmarks5.dtype == np.float32
    assert face.mask.shape == (size, size) and face.mask.dtype == np.uint8
    assert set(np.unique(face.mask)) <= {0, 255}
    assert np.array_equal(face.landmarks5, face.landmarks68[list(LANDMARKS5_FROM_68)])


def test_landmarks_scale_with_size() -> None:
    ident, state = _random_pairs(1, seed=2)[0]
    unit = [(render(ident, state, s).landmarks68 + 0.5) / s for s in (32, 64, 200)]
    np.testing.assert_allclose(unit[0], unit[1], atol=1e-5)
    np.testing.assert_allclose(unit[0], unit[2], atol=1e-5)


def test_landmarks_stay_inside_the_crop() -> None:
    for ident, state in _random_pairs(60, seed=3):
        lm = render(ident, state, 64).landmarks68
        assert np.all(lm >= 0.0) and np.all(lm <= 63.0), state


def test_frontal_face_is_an_aligned_crop() -> None:
    size = 100
    for seed in range(8):
        lm = render(identity_from_seed(seed), FaceState.neutral(), size).landmarks68
        eyes = lm[36:48]
        assert 0.38 <= (eyes[:, 1].mean() + 0.5) / size <= 0.42
        assert abs(lm[36, 1] - lm[45, 1]) < 0.01  # level
        assert 0.70 <= (lm[16, 0] - lm[0, 0]) / size <= 0.80
        assert abs(lm[30, 0] - (size - 1) / 2) < 0.01  # symmetric about the centre


def test_landmark_order_matches_ibug_and_dlib5() -> None:
    lm = render(identity_from_seed(0), FaceState.neutral(), 64).landmarks68
    assert np.all(np.diff(lm[0:9, 1]) > 0) and np.all(np.diff(lm[8:17, 1]) < 0)  # jaw
    assert lm[0, 0] < lm[8, 0] < lm[16, 0]
    assert lm[17, 0] < lm[21, 0] < lm[22, 0] < lm[26, 0]  # brows, image left to right
    assert np.all(np.diff(lm[27:31, 1]) > 0)  # bridge down to the tip
    assert lm[36, 0] < lm[39, 0] < lm[42, 0] < lm[45, 0]  # eye corners
    assert lm[37, 1] < lm[41, 1] and lm[44, 1] < lm[46, 1]  # upper lids above lower lids
    assert lm[48, 0] < lm[51, 0] < lm[54, 0] and lm[51, 1] < lm[57, 1]
    # landmarks5 in dlib's order: image-right eye outer, inner; image-left eye outer, inner; nose.
    five = render(identity_from_seed(0), FaceState.neutral(), 64).landmarks5
    assert five[2, 0] < five[3, 0] < five[1, 0] < five[0, 0]
    assert five[4, 1] > five[:4, 1].max()


def test_positive_yaw_moves_the_nose_tip_right() -> None:
    for seed in range(4):
        ident = identity_from_seed(seed)
        lms = [render(ident, FaceState(yaw=y)).landmarks68 for y in range(-30, 31, 10)]
        nose_x = np.array([lm[30, 0] for lm in lms])
        nose_rel = np.array([lm[30, 0] - lm[[36, 45], 0].mean() for lm in lms])
        assert np.all(np.diff(nose_x) > 0.5), nose_x
        assert np.all(np.diff(nose_rel) > 0.2), nose_rel


def test_positive_pitch_moves_the_nose_tip_up_and_roll_turns_clockwise() -> None:
    ident = identity_from_seed(1)
    rel = []
    for p in (-20, 0, 20):
        lm = render(ident, FaceState(pitch=p)).landmarks68
        rel.append(lm[30, 1] - lm[[36, 45], 1].mean())
    assert rel[0] > rel[1] > rel[2]
    lm = render(ident, FaceState(roll=15)).landmarks68
    assert lm[45, 1] > lm[36, 1] + 3  # the image-right eye goes down


def test_mouth_open_opens_the_lips_and_drops_the_chin() -> None:
    # Light skin and lips and no beard, so that the dark opening is sure to show.
    ident = dataclasses.replace(
        identity_from_seed(2), skin=(0.85, 0.7, 0.6), lip_color=(0.8, 0.45, 0.45), facial_hair=0
    )
    lms = [render(ident, FaceState(mouth_open=m)).landmarks68 for m in (0.0, 0.5, 1.0)]
    gaps = [lm[66, 1] - lm[62, 1] for lm in lms]
    assert gaps[0] < 0.5 and gaps[0] < gaps[1] < gaps[2] and gaps[2] > 3.0
    assert lms[0][8, 1] < lms[1][8, 1] < lms[2][8, 1]
    # The opening shows: the mouth gets darker.
    closed, opened = (render(ident, FaceState(mouth_open=m)) for m in (0.0, 1.0))
    x, y = np.round(lms[2][[62, 66]].mean(axis=0)).astype(int)
    assert opened.image[y, x].mean() < closed.image[y, x].mean() - 20


def test_blink_and_smile() -> None:
    ident = identity_from_seed(4)
    open_, shut = (render(ident, FaceState(blink=b)).landmarks68 for b in (0.0, 1.0))
    for top, bottom in ((37, 41), (38, 40), (43, 47), (44, 46)):
        assert open_[bottom, 1] - open_[top, 1] > 1.0
        assert abs(shut[bottom, 1] - shut[top, 1]) < 0.05
    for smile, sign in ((1.0, 1.0), (-1.0, -1.0)):
        lm = render(ident, FaceState(smile=smile)).landmarks68
        lift = (open_[[48, 54], 1] - lm[[48, 54], 1]) * sign
        assert np.all(lift > 0.5)


def test_identities_differ_far_more_than_nearby_states() -> None:
    rng = np.random.default_rng(5)
    ratios = []
    for k in range(10):
        a, b = identity_from_seed(k), identity_from_seed(k + 100)
        state = FaceState.random(rng)
        nearby = dataclasses.replace(
            state, yaw=state.yaw + 4.0, mouth_open=min(1.0, state.mouth_open + 0.1)
        )
        near = _mad(render(a, state).image, render(a, nearby).image)
        other = _mad(render(a, state).image, render(b, state).image)
        assert other > 1.5 * near, (k, other, near)
        ratios.append(other / near)
    assert float(np.median(ratios)) > 4.0


def test_twenty_identities_look_different() -> None:
    ids = [identity_from_seed(s) for s in range(20)]
    images = [render(i, FaceState.neutral()).image for i in ids]
    dists = [_mad(a, b) for a, b in itertools.combinations(images, 2)]
    assert min(dists) > 5.0 and float(np.median(dists)) > 25.0
    assert len({i.hair_style for i in ids}) >= 4
    skin_luma = [0.3 * i.skin[0] + 0.59 * i.skin[1] + 0.11 * i.skin[2] for i in ids]
    assert max(skin_luma) - min(skin_luma) > 0.3


def test_state_matters() -> None:
    rng = np.random.default_rng(6)
    ident = identity_from_seed(9)
    random_pairs = [
        _mad(render(ident, FaceState.random(rng)).image, render(ident, FaceState.random(rng)).image)
        for _ in range(8)
    ]
    assert min(random_pairs) > 15.0
    # Pose alone (same expression, light and background) changes the picture clearly, so a
    # swap that ignores pose scores visibly worse than one that follows it.
    pose_only = []
    for _ in range(8):
        state = FaceState.random(rng)
        frontal = dataclasses.replace(state, yaw=0.0, pitch=0.0, roll=0.0)
        diff = _mad(render(ident, state).image, render(ident, frontal).image)
        pose_only.append(diff)
        if max(abs(state.yaw), abs(state.pitch), abs(state.roll)) > 15.0:
            assert diff > 8.0, state
    assert float(np.mean(pose_only)) > 12.0


def _cheek_luma(image: np.ndarray, lm: np.ndarray, jaw: int, nose: int) -> float:
    x, y = np.round((lm[jaw] + lm[nose]) / 2).astype(int)
    patch = image[y - 2 : y + 3, x - 2 : x + 3].astype(np.float64)
    return float((patch @ np.array([0.3, 0.59, 0.11])).mean())


def test_side_light_darkens_the_far_cheek() -> None:
    ident = identity_from_seed(11)
    for azimuth, brighter in ((70.0, "right"), (-70.0, "left")):
        state = FaceState(
            light_azimuth=azimuth, light_elevation=10, light_strength=0.9, ambient=0.3
        )
        face = render(ident, state)
        left = _cheek_luma(face.image, face.landmarks68, 3, 31)
        right = _cheek_luma(face.image, face.landmarks68, 13, 35)
        if brighter == "right":
            assert right > left + 25
        else:
            assert left > right + 25


def test_mask_covers_the_face_and_excludes_hair_and_background() -> None:
    size = 64
    pairs = [(identity_from_seed(s), FaceState.neutral()) for s in range(6)]
    for ident, state in pairs + _random_pairs(10, seed=7):
        face = render(ident, state, size)
        lm = face.landmarks68
        outline = np.concatenate([lm[0:17], lm[26:16:-1]])
        poly = np.zeros((size, size), np.uint8)
        cv2.fillPoly(poly, [np.round(outline * 16).astype(np.int32)], 255, cv2.LINE_8, 4)
        inside = poly > 0
        covered = (face.mask[inside] > 0).mean()
        assert covered > 0.9, (covered, state)
        assert face.mask[0, 0] == 0 and face.mask[0, -1] == 0  # background corners
    # Short hair covers the top of the head: not face.
    short = dataclasses.replace(identity_from_seed(0), hair_style=int(HairStyle.SHORT))
    face = render(short, FaceState.neutral(), size)
    assert face.mask[3, size // 2] == 0 and face.mask[size // 2, size // 2] == 255


def test_render_into_follows_the_affine() -> None:
    rng = np.random.default_rng(8)
    frame = rng.integers(0, 256, size=(240, 320, 3), dtype=np.uint8)
    ident, state = identity_from_seed(12), FaceState(yaw=12.0, smile=0.4)
    angle, scale = math.radians(20.0), 110.0
    affine = np.array(
        [
            [scale * math.cos(angle), -scale * math.sin(angle), 130.0],
            [scale * math.sin(angle), scale * math.cos(angle), 40.0],
        ]
    )
    before = frame.copy()
    face = render_into(frame, ident, state, affine)
    assert np.array_equal(frame, before)  # the input is not modified
    assert face.image.shape == frame.shape and face.mask.shape == frame.shape[:2]

    size = 64
    unit = (render(ident, state, size).landmarks68.astype(np.float64) + 0.5) / size
    expected = unit @ affine[:, :2].T + affine[:, 2]
    np.testing.assert_allclose(face.landmarks68, expected, atol=1e-3)
    np.testing.assert_array_equal(face.landmarks5, face.landmarks68[list(LANDMARKS5_FROM_68)])

    x, y = np.round(face.landmarks68[30]).astype(int)
    assert face.mask[y, x] == 255
    assert not np.array_equal(face.image[y, x], frame[y, x])
    # Far from the face, the frame is untouched and the mask empty.
    assert np.array_equal(face.image[:, -20:], frame[:, -20:])
    assert not face.mask[:, -20:].any()
    # The mask is the crop's mask mapped by the affine: its area scales with the determinant.
    crop_mask_area = (render(ident, state, size).mask > 0).sum() / size**2
    area = (face.mask > 0).sum() / abs(np.linalg.det(affine[:, :2]))
    assert abs(area - crop_mask_area) < 0.05 * crop_mask_area


def test_render_into_at_the_crop_affine_matches_render() -> None:
    ident, state = identity_from_seed(13), FaceState.random(np.random.default_rng(9))
    crop = render(ident, state, 64)
    into = render_into(crop.image, ident, state, crop_affine(64))
    np.testing.assert_array_equal(into.landmarks68, crop.landmarks68)
    np.testing.assert_array_equal(into.mask, crop.mask)
    # Drawing the same face over itself changes only anti-aliased edges.
    assert _mad(into.image, crop.image) < 1.0


def test_render_into_outside_the_frame_leaves_it_untouched() -> None:
    frame = np.full((50, 60, 3), 77, np.uint8)
    affine = np.array([[40.0, 0.0, 500.0], [0.0, 40.0, 500.0]])
    face = render_into(frame, identity_from_seed(1), FaceState.neutral(), affine)
    assert np.array_equal(face.image, frame) and not face.mask.any()
    assert np.all(face.landmarks68 > 500.0)


def test_make_dataset_is_deterministic_and_paired_across_identities() -> None:
    a, b = identity_from_seed(20), identity_from_seed(21)
    images, landmarks = make_dataset(a, 6, size=48, seed=3)
    assert images.shape == (6, 48, 48, 3) and images.dtype == np.uint8
    assert landmarks.shape == (6, 68, 2) and landmarks.dtype == np.float32
    again, _ = make_dataset(a, 6, size=48, seed=3)
    assert np.array_equal(images, again)
    other_seed, _ = make_dataset(a, 6, size=48, seed=4)
    assert not np.array_equal(images, other_seed)
    # Same seed, other identity: the same states, so frame i of B is swap(A -> B)'s truth.
    images_b, _ = make_dataset(b, 6, size=48, seed=3)
    states = make_states(6, seed=3)
    assert np.array_equal(images_b[2], render(b, states[2], 48).image)
    assert np.array_equal(images[2], render(a, states[2], 48).image)


def test_invalid_parameters_are_rejected() -> None:
    ident = identity_from_seed(0)
    lo, _ = IDENTITY_RANGES["face_width"]
    with pytest.raises(ValueError, match="face_width"):
        dataclasses.replace(ident, face_width=lo - 0.1)
    with pytest.raises(ValueError, match="skin"):
        dataclasses.replace(ident, skin=(1.2, 0.5, 0.5))
    with pytest.raises(ValueError, match="hair_style"):
        dataclasses.replace(ident, hair_style=99)
    with pytest.raises(ValueError, match="mouth_open"):
        FaceState(mouth_open=1.5)
    with pytest.raises(ValueError, match="yaw"):
        FaceState(yaw=float("nan"))
    with pytest.raises(ValueError, match="size"):
        render(ident, FaceState.neutral(), 4)
    with pytest.raises(ValueError, match="frame"):
        render_into(np.zeros((10, 10), np.uint8), ident, FaceState.neutral(), crop_affine(10))
    with pytest.raises(ValueError, match="affine"):
        render_into(np.zeros((10, 10, 3), np.uint8), ident, FaceState.neutral(), np.zeros((2, 3)))
    # Lists are accepted for colours and normalised so identities stay hashable.
    listed = dataclasses.replace(ident, skin=[0.5, 0.4, 0.3])
    assert listed.skin == (0.5, 0.4, 0.3) and hash(listed) == hash(listed)
