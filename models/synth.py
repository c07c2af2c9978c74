"""Procedural synthetic faces: the ground truth of facemux.

"Identity B rendered in A's state" is what a perfect swap(A -> B) would output, so this module
separates *who* a face is (:class:`IdentityParams`) from *what it is doing and how it is lit*
(:class:`FaceState`) and renders any pairing of the two deterministically.

The face model
--------------
Every identity is a small 3D point model in *local* coordinates, in crop units (1.0 = the
crop's width): x to the image right, y down, z towards the
camera, origin between the two eyes. It holds the 68 iBUG-300W landmarks plus extra points
(forehead arc, iris rings, nostrils, ears, brow outlines, eyelid surrounds, hairline, fringe,
beard outline). The head itself is an ellipsoid behind the features; it gives the skull
silhouette (hair and the top of the head follow it, so they do not shrink when the head
turns) and the surface normals for lighting.

A state acts on that model in three steps:

1. Expression is linear: ``points = neutral + mouth_open * D_open + smile+ * D_smile +
   smile- * D_frown + blink * D_blink``, with the displacement fields built once per identity
   (mouth open drops the lower lip and the chin, smile lifts and widens the mouth corners and
   raises the lower lids, blink brings the upper lids down onto the lower ones).
2. Pose: ``R = Rz(roll) @ Rx(pitch) @ Ry(yaw)`` about the centroid of the neutral 68
   landmarks, then orthographic (weak perspective) projection. The centroid stays where it is
   at frontal pose, which is what a landmark-based aligner does: the face stays centred while
   its parts move with parallax. Conventions, all in the image: positive yaw moves the nose
   tip to the image right (+x), positive pitch moves it up (-y, the subject looks up),
   positive roll turns the face clockwise.
3. Light: Lambert (with a little wrap) on the head ellipsoid's normals plus flat nose facets,
   ``shade = ambient + light_strength * lambert``. Light direction: azimuth 0 is from the
   camera, positive azimuth from the image right, positive elevation from above.

Drawing happens in an RGBA canvas supersampled 2-4x (alpha is the head's coverage) with flat
albedo colours, is multiplied by the shading map, box-filtered down and composited over the
background, so edges are anti-aliased and the same code draws into a crop (:func:`render`) or
into any frame at any affine placement (:func:`render_into`).

The crop is an aligned crop: at frontal, neutral pose the eyes sit level at 0.40 of the
height, the jaw outline spans 70-80 % of the width and the chin is at 0.82-0.88. Landmarks are
pixel coordinates with OpenCV's convention (pixel ``i`` has its centre at ``i``), so the crop's
unit square maps to pixels by ``x = u * size - 0.5``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import IntEnum
from functools import lru_cache

import cv2
import numpy as np
from numpy.typing import NDArray

from .face_template import LANDMARKS5_FROM_68

__all__ = [
    "IDENTITY_RANGES",
    "LANDMARKS5_FROM_68",
    "STATE_LIMITS",
    "FaceState",
    "FacialHair",
    "HairStyle",
    "IdentityParams",
    "RenderedFace",
    "crop_affine",
    "identity_from_seed",
    "make_dataset",
    "make_states",
    "render",
    "render_into",
]

RGB = tuple[float, float, float]
FloatArray = NDArray[np.float64]

# Eye midpoint of the frontal, neutral face in crop units.
_EYE_MID = (0.5, 0.40)


class HairStyle(IntEnum):
    SHORT = 0
    LONG = 1
    BALD = 2  # only short hair at the sides
    FRINGE = 3
    BOB = 4
    BUZZ = 5  # shaved: a thin cap mixed with the skin colour


class FacialHair(IntEnum):
    NONE = 0
    STUBBLE = 1
    MOUSTACHE = 2
    BEARD = 3


# Documented, validated ranges of the scalar identity parameters (colours are RGB in 0..1).
# Lengths are in crop units; "scale" parameters multiply a base size; angles in degrees.
IDENTITY_RANGES: dict[str, tuple[float, float]] = {
    "face_width": (0.95, 1.07),  # scale of the cheek width
    "face_length": (0.92, 1.08),  # scale of the eyes-to-chin distance
    "jaw_width": (0.70, 0.95),  # jaw width at mouth level relative to the cheeks
    "chin": (0.0, 1.0),  # 0 broad and round, 1 pointed
    "forehead": (0.0, 1.0),  # 0 low hairline, 1 high
    "eye_spacing": (0.066, 0.090),  # half the distance between the inner eye corners
    "eye_size": (0.85, 1.15),
    "eye_tilt": (-8.0, 8.0),  # positive: outer corners higher
    "brow_thickness": (0.010, 0.028),
    "brow_height": (0.065, 0.095),  # above the eye line
    "brow_angle": (-12.0, 12.0),  # positive: outer ends higher
    "nose_length": (0.85, 1.20),
    "nose_width": (0.80, 1.25),
    "mouth_width": (0.85, 1.15),
    "lip_thickness": (0.70, 1.30),
    "hair_volume": (0.0, 1.0),
    "ear_size": (0.80, 1.20),
}

_IDENTITY_COLOURS = ("skin", "iris_color", "brow_color", "lip_color", "hair_color", "shirt_color")


def _as_rgb(value: object, name: str) -> RGB:
    try:
        r, g, b = (float(c) for c in value)  # type: ignore[attr-defined]
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{name} must be three floats (RGB in 0..1), got {value!r}") from exc
    if not all(0.0 <= c <= 1.0 for c in (r, g, b)):
        raise ValueError(f"{name} must be RGB floats in 0..1, got {value!r}")
    return (r, g, b)


def _check_range(name: str, value: float, lo: float, hi: float) -> None:
    if not (lo <= value <= hi):  # also rejects NaN
        raise ValueError(f"{name} must be in [{lo}, {hi}], got {value!r}")


@dataclass(frozen=True)
class IdentityParams:
    """Who the person is. Scalars are in :data:`IDENTITY_RANGES`; colours are RGB 0..1."""

    face_width: float
    face_length: float
    jaw_width: float
    chin: float
    forehead: float
    skin: RGB
    eye_spacing: float
    eye_size: float
    eye_tilt: float
    iris_color: RGB
    brow_thickness: float
    brow_height: float
    brow_angle: float
    brow_color: RGB
    nose_length: float
    nose_width: float
    mouth_width: float
    lip_color: RGB
    lip_thickness: float
    hair_style: int
    hair_color: RGB
    hair_volume: float
    facial_hair: int
    ear_size: float
    shirt_color: RGB

    def __post_init__(self) -> None:
        # Normalise (lists -> tuples of float) so instances hash; the renderer caches on them.
        for name in _IDENTITY_COLOURS:
            object.__setattr__(self, name, _as_rgb(getattr(self, name), name))
        for name, (lo, hi) in IDENTITY_RANGES.items():
            value = float(getattr(self, name))
            _check_range(name, value, lo, hi)
            object.__setattr__(self, name, value)
        try:
            object.__setattr__(self, "hair_style", int(HairStyle(self.hair_style)))
            object.__setattr__(self, "facial_hair", int(FacialHair(self.facial_hair)))
        except ValueError as exc:
            raise ValueError(f"bad hair_style or facial_hair: {exc}") from exc

    @classmethod
    def random(cls, rng: np.random.Generator) -> IdentityParams:
        """A random person. Draws only ``rng.random()`` so seeds stay stable across numpy."""

        def u(lo: float, hi: float) -> float:
            return lo + (hi - lo) * float(rng.random())

        def pick(n: int) -> int:
            return min(int(rng.random() * n), n - 1)

        def jitter(c: RGB, amount: float) -> RGB:
            return _clip_rgb(tuple(x + amount * (2.0 * float(rng.random()) - 1.0) for x in c))

        scalars = {name: u(lo, hi) for name, (lo, hi) in IDENTITY_RANGES.items()}

        # Skin: a tone along a light-to-dark line through a mid tone, then a small hue jitter.
        tone = float(rng.random())
        if tone < 0.5:
            skin = _mix(_SKIN_LIGHT, _SKIN_MID, tone * 2.0)
        else:
            skin = _mix(_SKIN_MID, _SKIN_DARK, tone * 2.0 - 1.0)
        skin = jitter(skin, 0.03)

        hair = jitter(_HAIR_PALETTE[_pick_weighted(rng, _HAIR_PALETTE_P)], 0.04)
        grey = max(hair) - min(hair) < 0.08 and min(hair) > 0.4
        brow = hair if grey else _scale_rgb(hair, 0.7 if max(hair) > 0.5 else 0.85)
        iris = jitter(_IRIS_PALETTE[pick(len(_IRIS_PALETTE))], 0.04)
        if rng.random() < 0.15:  # lipstick
            lips = jitter(_LIPSTICK_PALETTE[pick(len(_LIPSTICK_PALETTE))], 0.05)
        else:
            lips = _scale_rgb(_mix(skin, (0.78, 0.33, 0.34), 0.45), u(0.8, 0.95))
        shirt = _clip_rgb(tuple(0.1 + 0.8 * float(rng.random()) for _ in range(3)))

        style = HairStyle(_pick_weighted(rng, _HAIR_STYLE_P))
        facial = FacialHair(_pick_weighted(rng, _FACIAL_HAIR_P))
        return cls(
            skin=skin,
            iris_color=iris,
            brow_color=brow,
            lip_color=lips,
            hair_style=int(style),
            hair_color=hair,
            facial_hair=int(facial),
            shirt_color=shirt,
            **scalars,
        )


_SKIN_LIGHT: RGB = (0.96, 0.83, 0.74)
_SKIN_MID: RGB = (0.80, 0.60, 0.45)
_SKIN_DARK: RGB = (0.36, 0.23, 0.16)
_HAIR_PALETTE: tuple[RGB, ...] = (
    (0.06, 0.05, 0.05),  # black
    (0.20, 0.12, 0.07),  # dark brown
    (0.42, 0.26, 0.13),  # brown
    (0.58, 0.24, 0.10),  # red
    (0.82, 0.67, 0.40),  # blond
    (0.92, 0.86, 0.70),  # platinum
    (0.60, 0.59, 0.58),  # grey
    (0.86, 0.86, 0.84),  # white
)
# How common each hair colour is: grey and white are a minority.
_HAIR_PALETTE_P = (0.26, 0.26, 0.17, 0.06, 0.12, 0.04, 0.05, 0.04)
_IRIS_PALETTE: tuple[RGB, ...] = (
    (0.24, 0.13, 0.06),
    (0.42, 0.26, 0.12),
    (0.46, 0.39, 0.18),
    (0.28, 0.46, 0.26),
    (0.28, 0.48, 0.72),
    (0.50, 0.56, 0.62),
)
_LIPSTICK_PALETTE: tuple[RGB, ...] = ((0.72, 0.08, 0.12), (0.85, 0.35, 0.50), (0.45, 0.12, 0.20))
# Probabilities, in enum order.
_HAIR_STYLE_P = (0.24, 0.20, 0.08, 0.16, 0.16, 0.16)
_FACIAL_HAIR_P = (0.64, 0.12, 0.10, 0.14)


def _pick_weighted(rng: np.random.Generator, weights: tuple[float, ...]) -> int:
    x = float(rng.random()) * sum(weights)
    for i, w in enumerate(weights):
        x -= w
        if x < 0.0:
            return i
    return len(weights) - 1


def _mix(a: RGB, b: RGB, t: float) -> RGB:
    return (a[0] + (b[0] - a[0]) * t, a[1] + (b[1] - a[1]) * t, a[2] + (b[2] - a[2]) * t)


def _scale_rgb(c: RGB, k: float) -> RGB:
    return _clip_rgb((c[0] * k, c[1] * k, c[2] * k))


def _clip_rgb(c: tuple[float, ...]) -> RGB:
    return (min(max(c[0], 0.0), 1.0), min(max(c[1], 0.0), 1.0), min(max(c[2], 0.0), 1.0))


# What FaceState accepts. Beyond about 45 degrees of yaw or pitch the face model degrades (the
# far eye is not occluded by the nose), so FaceState.random stays within +-35.
STATE_LIMITS: dict[str, tuple[float, float]] = {
    "yaw": (-60.0, 60.0),
    "pitch": (-60.0, 60.0),
    "roll": (-90.0, 90.0),
    "mouth_open": (0.0, 1.0),
    "smile": (-1.0, 1.0),
    "blink": (0.0, 1.0),
    "light_azimuth": (-180.0, 180.0),
    "light_elevation": (-90.0, 90.0),
    "light_strength": (0.0, 1.0),
    "ambient": (0.0, 1.0),
}


@dataclass(frozen=True)
class FaceState:
    """What the face is doing and how it is lit (angles in degrees, see the module docstring)."""

    yaw: float = 0.0  # |yaw| <= 60 accepted, random() draws within +-35
    pitch: float = 0.0  # |pitch| <= 60 accepted, random() draws within +-30
    roll: float = 0.0  # |roll| <= 90 accepted, random() draws within +-20
    mouth_open: float = 0.0  # 0..1
    smile: float = 0.0  # -1 (frown) .. 1
    blink: float = 0.0  # 0 open .. 1 closed
    light_azimuth: float = 0.0  # -180..180
    light_elevation: float = 25.0  # -90..90
    light_strength: float = 0.65  # 0..1
    ambient: float = 0.45  # 0..1
    background: RGB = (0.55, 0.58, 0.62)  # vertical gradient around this colour

    def __post_init__(self) -> None:
        for name, (lo, hi) in STATE_LIMITS.items():
            value = float(getattr(self, name))
            _check_range(name, value, lo, hi)
            object.__setattr__(self, name, value)
        object.__setattr__(self, "background", _as_rgb(self.background, "background"))

    @classmethod
    def neutral(cls) -> FaceState:
        """Frontal, relaxed, lit from slightly above the camera."""
        return cls()

    @classmethod
    def random(cls, rng: np.random.Generator) -> FaceState:
        """A random state. Draws only ``rng.random()`` so seeds stay stable across numpy."""

        def u(lo: float, hi: float) -> float:
            return lo + (hi - lo) * float(rng.random())

        yaw, pitch, roll = u(-35, 35), u(-30, 30), u(-20, 20)
        mouth_open = max(0.0, u(-0.6, 1.0))  # closed about a third of the time
        smile = u(-0.7, 1.0)
        blink = u(0.0, 0.15) if rng.random() < 0.75 else u(0.15, 1.0)
        azimuth, elevation = u(-80, 80), u(-20, 60)
        strength, ambient = u(0.3, 1.0), u(0.25, 0.6)
        raw = [0.12 + 0.76 * float(rng.random()) for _ in range(3)]
        grey = sum(raw) / 3.0
        background = _clip_rgb(tuple(grey + 0.6 * (c - grey) for c in raw))
        return cls(
            yaw=yaw,
            pitch=pitch,
            roll=roll,
            mouth_open=mouth_open,
            smile=smile,
            blink=blink,
            light_azimuth=azimuth,
            light_elevation=elevation,
            light_strength=strength,
            ambient=ambient,
            background=background,
        )


@dataclass
class RenderedFace:
    image: NDArray[np.uint8]  # (H, W, 3) RGB
    landmarks68: NDArray[np.float32]  # (68, 2) pixel (x, y), iBUG-300W order
    landmarks5: NDArray[np.float32]  # (5, 2) pixel (x, y), LANDMARKS5_FROM_68 order
    mask: NDArray[np.uint8]  # (H, W) 0/255: the face (jaw + forehead), not hair or background


def identity_from_seed(seed: int) -> IdentityParams:
    return IdentityParams.random(np.random.default_rng(seed))


# --------------------------------------------------------------------------------------------
# The identity's 3D point model
# --------------------------------------------------------------------------------------------


def _allocate(sizes: dict[str, int]) -> tuple[dict[str, slice], int]:
    out: dict[str, slice] = {}
    start = 0
    for name, n in sizes.items():
        out[name] = slice(start, start + n)
        start += n
    return out, start


_N_ARC = 9  # forehead arc of the face outline
_N_RING = 12  # iris rings
_N_NOSTRIL = 6
_N_EAR = 12
_N_FRINGE = 13
_N_HAIRLINE = 9
_IDX, _N_POINTS = _allocate(
    {
        "lm": 68,
        "arc": _N_ARC,
        "iris_r": _N_RING,
        "iris_l": _N_RING,
        "nostril_r": _N_NOSTRIL,
        "nostril_l": _N_NOSTRIL,
        "ear_r": _N_EAR,
        "ear_l": _N_EAR,
        "brow_r": 10,  # upper edge outer->inner, then lower edge inner->outer
        "brow_l": 10,
        "lid_r": 10,  # beyond-outer, beyond-inner, 4 above (outer->inner), 4 below (outer->inner)
        "lid_l": 10,
        "hairline": _N_HAIRLINE,  # image left -> right
        "sideburn": 6,  # image right: top, bottom (short), bottom (long); then image left
        "fringe": _N_FRINGE,  # image left -> right
        "beard": 5,  # upper edge of a beard, image right -> left
        "moustache": 10,
        "teeth": 3,  # lower edge of the upper teeth; set per state
    }
)
_JAW = np.arange(0, 17)
_BROW_R = np.arange(17, 22)
_BROW_L = np.arange(22, 27)
_EYE_R = np.arange(36, 42)
_EYE_L = np.arange(42, 48)
_OUTER_LIP = np.arange(48, 60)
_INNER_LIP = np.arange(60, 68)
_UPPER_LIP = np.array([48, 49, 50, 51, 52, 53, 54, 64, 63, 62, 61, 60])
# Nose sides (subject's right, left) and underside, in the order of _Model.nose_normals.
_NOSE_FACETS = ([27, 31, 30], [27, 35, 30], [31, 30, 35, 34, 33, 32])

# Head ellipsoid in local coordinates: centre and semi-axes (x scaled by face_width).
_HEAD_CENTRE = (0.0, 0.03, -0.34)
_HEAD_AXES = (0.395, 0.47, 0.40)


@dataclass(frozen=True)
class _Model:
    neutral: FloatArray  # (_N_POINTS, 3)
    d_open: FloatArray
    d_smile: FloatArray
    d_frown: FloatArray
    d_blink: FloatArray
    centroid: FloatArray  # (3,) of the neutral 68 landmarks
    anchor: FloatArray  # (2,) where the centroid projects, crop units
    head_centre: FloatArray  # (3,)
    head_axes: FloatArray  # (3,)
    nose_normals: FloatArray  # (3, 3): right side, left side, underside; local coordinates
    colours: dict[str, tuple[float, float, float, float]]  # RGBA 0..255 albedo


def _on_head(x: FloatArray, y: FloatArray, axes: FloatArray, lift: float = 0.0) -> FloatArray:
    """z of the front surface of the head ellipsoid at (x, y), for points drawn on the skin."""
    cx, cy, cz = _HEAD_CENTRE
    ax, ay, az = axes
    inside = 1.0 - ((x - cx) / ax) ** 2 - ((y - cy) / ay) ** 2
    return np.asarray(cz + az * np.sqrt(np.clip(inside, 0.0, None)) + lift, dtype=np.float64)


def _ring(
    centre: FloatArray, a: FloatArray, b: FloatArray, n: int, phase: float = 0.0
) -> FloatArray:
    t = np.linspace(0.0, 2.0 * math.pi, n, endpoint=False) + phase
    return np.asarray(
        centre[None, :] + np.cos(t)[:, None] * a[None, :] + np.sin(t)[:, None] * b[None, :],
        dtype=np.float64,
    )


@lru_cache(maxsize=512)
def _model(ident: IdentityParams) -> _Model:
    p = np.zeros((_N_POINTS, 3), dtype=np.float64)
    lm = p[:68]
    axes = np.array(_HEAD_AXES) * np.array([ident.face_width, 1.0, 1.0])

    # Jaw: a lower half-ellipse whose exponents make it boxy or pointed and whose width tapers.
    half_w = 0.37 * ident.face_width
    y_ear, y_chin = 0.02, 0.44 * ident.face_length
    phi = np.linspace(0.0, math.pi, 17)
    c, s = np.cos(phi), np.sin(phi)
    taper = 1.0 - (1.0 - ident.jaw_width) * s**1.5
    ex = 0.75 + 0.6 * ident.chin
    lm[_JAW, 0] = -half_w * taper * np.sign(c) * np.abs(c) ** ex
    lm[_JAW, 1] = y_ear + (y_chin - y_ear) * s ** (0.9 + 0.3 * ident.chin)
    lm[_JAW, 2] = -0.20 + 0.24 * s**1.5

    # Forehead arc from jaw point 16 (image right) over the top to point 0, on the head surface.
    psi = np.linspace(0.0, math.pi, _N_ARC + 2)[1:-1]
    top = _HEAD_CENTRE[1] - 0.985 * axes[1]
    ax_ = half_w * np.cos(psi)
    ay_ = y_ear - (y_ear - top) * np.sin(psi)
    p[_IDX["arc"]] = np.stack([ax_, ay_, _on_head(ax_, ay_, axes)], axis=1)

    # Eyes. Right eye (subject's right) is at -x; corners then lids, then the canthal tilt.
    es, ew = ident.eye_spacing, 0.13 * ident.eye_size
    up, lo = 0.21 * ew, 0.15 * ew
    tilt = math.radians(ident.eye_tilt)
    # fmt: off
    eye_r = np.array([
        [-(es + ew), 0.0], [-(es + 0.68 * ew), -up], [-(es + 0.30 * ew), -0.96 * up],
        [-es, 0.0], [-(es + 0.30 * ew), 0.95 * lo], [-(es + 0.68 * ew), lo],
    ])
    # fmt: on
    eye_cx = es + 0.5 * ew
    for idx, sign in ((_EYE_R, -1.0), (_EYE_L, 1.0)):
        e = eye_r.copy()
        if sign > 0:  # mirror and reorder into the left eye's numbering (inner corner first)
            e = e[[3, 2, 1, 0, 5, 4]] * np.array([-1.0, 1.0])
        dist = np.abs(e[:, 0]) - eye_cx
        e[:, 1] -= math.tan(tilt) * dist
        lm[idx, :2] = e
        lm[idx, 2] = -0.035 * (np.abs(e[:, 0]) - es) / ew + 0.01 * np.array([0, 1, 1, 0, 1, 1])
    for name, sign in (("iris_r", -1.0), ("iris_l", 1.0)):
        centre = np.array([sign * eye_cx, -0.03 * ew, 0.02])
        r = 0.2 * ew
        p[_IDX[name]] = _ring(centre, np.array([r, 0, 0]), np.array([0, r, 0]), _N_RING)
    # Skin around each eye that hides the iris outside the lids: fixed outer edge, lids inside.
    for name, idx, sign in (("lid_r", _EYE_R, -1.0), ("lid_l", _EYE_L, 1.0)):
        corners = lm[idx]
        outer = corners[0] if sign < 0 else corners[3]
        inner = corners[3] if sign < 0 else corners[0]
        t = np.linspace(0.0, 1.0, 4)
        xs = outer[0] + (inner[0] - outer[0]) * t + sign * np.array([0.02, 0, 0, -0.02])
        ys = outer[1] + (inner[1] - outer[1]) * t
        zs = outer[2] + (inner[2] - outer[2]) * t
        block = np.empty((10, 3))
        block[0] = outer + np.array([sign * 0.022, 0, 0])
        block[1] = inner - np.array([sign * 0.022, 0, 0])
        block[2:6] = np.stack([xs, ys - up - 0.04, zs], axis=1)
        block[6:10] = np.stack([xs, ys + lo + 0.035, zs], axis=1)
        p[_IDX[name]] = block

    # Brows, outer -> inner for the right brow (17..21), inner -> outer for the left (22..26).
    bt = np.linspace(0.0, 1.0, 5)
    b_in, b_out = es - 0.012, es + ew + 0.022
    bx = b_in + (b_out - b_in) * bt
    by = (
        -ident.brow_height
        - math.tan(math.radians(ident.brow_angle)) * (bx - b_in)
        - 0.012 * np.sin(math.pi * bt)
    )
    bz = 0.035 - 0.06 * bt
    thick = ident.brow_thickness * (1.15 - 0.55 * bt)
    for idx, name, sign in ((_BROW_R, "brow_r", -1.0), (_BROW_L, "brow_l", 1.0)):
        order = slice(None, None, -1) if sign < 0 else slice(None)
        centre = np.stack([sign * bx, by, bz], axis=1)[order]
        th = thick[order]
        lm[idx] = centre
        upper = centre - np.stack([0 * th, th / 2, 0 * th], axis=1)
        lower = centre + np.stack([0 * th, th / 2, 0 * th], axis=1)
        p[_IDX[name]] = np.concatenate([upper, lower[::-1]])

    # Nose: bridge 27..30 (30 is the tip), base 31..35 (33 under the tip).
    nl, nw = ident.nose_length, ident.nose_width
    # fmt: off
    lm[27:36] = [
        [0.0, -0.03, 0.035], [0.0, 0.035 * nl, 0.06], [0.0, 0.09 * nl, 0.09 + 0.02 * (nl - 1)],
        [0.0, 0.145 * nl, 0.125 + 0.04 * (nl - 1)],
        [-0.048 * nw, 0.165 * nl, 0.045], [-0.024 * nw, 0.18 * nl, 0.065],
        [0.0, 0.185 * nl, 0.075],
        [0.024 * nw, 0.18 * nl, 0.065], [0.048 * nw, 0.165 * nl, 0.045],
    ]
    # fmt: on
    for name, sign in (("nostril_r", -1.0), ("nostril_l", 1.0)):
        centre = np.array([sign * 0.024 * nw, 0.171 * nl, 0.07])
        a = np.array([0.012 * nw, 0.0, 0.0])
        b = np.array([0.0, 0.45, 0.89]) * 0.009  # disc tilted up: seen only from below-front
        p[_IDX[name]] = _ring(centre, a, b, _N_NOSTRIL)

    # Mouth: one third of the way from the nose base to the chin.
    y_base = 0.185 * nl
    ym = y_base + (y_chin - y_base) * 0.34
    hm = 0.112 * ident.mouth_width
    ut, lt = 0.024 * ident.lip_thickness, 0.032 * ident.lip_thickness
    # fmt: off
    lm[48:68] = [
        [-hm, ym, 0.0], [-0.58 * hm, ym - 0.85 * ut, 0.04], [-0.2 * hm, ym - ut, 0.055],
        [0.0, ym - 0.82 * ut, 0.06], [0.2 * hm, ym - ut, 0.055], [0.58 * hm, ym - 0.85 * ut, 0.04],
        [hm, ym, 0.0],
        [0.6 * hm, ym + 0.8 * lt, 0.04], [0.28 * hm, ym + 0.97 * lt, 0.05], [0.0, ym + lt, 0.055],
        [-0.28 * hm, ym + 0.97 * lt, 0.05], [-0.6 * hm, ym + 0.8 * lt, 0.04],
        [-0.88 * hm, ym, 0.01], [-0.4 * hm, ym, 0.045], [0.0, ym, 0.05], [0.4 * hm, ym, 0.045],
        [0.88 * hm, ym, 0.01], [0.4 * hm, ym, 0.045], [0.0, ym, 0.05], [-0.4 * hm, ym, 0.045],
    ]
    # fmt: on

    # Ears: discs facing outwards-forwards beside the head, behind the face outline.
    er = ident.ear_size
    for name, sign in (("ear_r", -1.0), ("ear_l", 1.0)):
        d = np.array([sign * 0.6, 0.0, -0.8])
        centre = np.array([sign * (half_w - 0.005), 0.075, -0.21]) + d * 0.045 * er
        p[_IDX[name]] = _ring(
            centre, np.array([0.0, 0.075 * er, 0.0]), d * 0.05 * er, _N_EAR, phase=0.3
        )

    # Hairline across the forehead; sideburns down to above the ear (short hair) or, for long
    # hair, locks framing the face down to the cheeks.
    hl_y = -0.215 - 0.085 * ident.forehead
    ht = np.linspace(-1.0, 1.0, _N_HAIRLINE)
    hx = ht * half_w * 0.84
    hy = hl_y + 0.085 * np.abs(ht) ** 2.2
    p[_IDX["hairline"]] = np.stack([hx, hy, _on_head(hx, hy, axes, 0.004)], axis=1)
    sb = []
    for sign in (1.0, -1.0):
        pts = np.array(
            [
                [sign * half_w * 0.93, hl_y + 0.14],
                [sign * half_w * 0.985, 0.03],
                [sign * half_w * 0.9, 0.22],
            ]
        )
        sb.append(np.concatenate([pts, _on_head(pts[:, 0], pts[:, 1], axes, 0.004)[:, None]], 1))
    p[_IDX["sideburn"]] = np.concatenate(sb)

    # Fringe: a jagged edge above the brows.
    ft = np.linspace(-1.0, 1.0, _N_FRINGE)
    fx = ft * half_w * 0.88
    fy = (
        -(ident.brow_height + 0.6 * ident.brow_thickness + 0.018)
        + 0.016 * (np.arange(_N_FRINGE) % 2)
        - 0.02 * np.abs(ft) ** 2
    )
    p[_IDX["fringe"]] = np.stack([fx, fy, _on_head(fx, fy, axes, 0.008)], axis=1)

    # Beard top edge (image right -> left) and moustache, anchored on the neutral lips and nose.
    # fmt: off
    beard_off = np.array([[0.03, -0.03, -0.01], [0.02, 0.016, -0.02], [0.0, 0.012, -0.01],
                          [-0.02, 0.016, -0.02], [-0.03, -0.03, -0.01]])
    p[_IDX["beard"]] = lm[[54, 35, 33, 31, 48]] + beard_off
    mous_top = lm[[48, 49, 51, 53, 54]] + np.array(
        [[-0.022, 0.012, -0.01], [-0.004, -0.03, 0.0], [0.0, -0.036, 0.0], [0.004, -0.03, 0.0],
         [0.022, 0.012, -0.01]])
    # fmt: on
    mous_bottom = lm[[53, 52, 51, 50, 49]] + np.array([0.0, 0.003, 0.005])
    p[_IDX["moustache"]] = np.concatenate([mous_top, mous_bottom])

    neutral = p.copy()
    d_open = np.zeros_like(p)
    d_smile = np.zeros_like(p)
    d_frown = np.zeros_like(p)
    d_blink = np.zeros_like(p)

    gap = 0.085
    d_open[[55, 56, 57, 58, 59], 1] = gap * np.array([0.6, 0.9, 1.0, 0.9, 0.6])
    d_open[[65, 66, 67], 1] = gap * np.array([0.9, 1.0, 0.9])
    d_open[[61, 62, 63], 1] = -0.08 * gap
    d_open[[48, 54, 60, 64], 1] = 0.3 * gap
    d_open[[48, 60], 0] = 0.06 * hm
    d_open[[54, 64], 0] = -0.06 * hm
    # The chin follows the lower lip; the jaw hinge (points 0 and 16) stays put.
    d_open[_JAW, 1] = 0.8 * gap * s**3

    d_smile[[48, 60], :2] = [-0.014, -0.028]
    d_smile[[54, 64], :2] = [0.014, -0.028]
    d_smile[[49, 59], :2] = [-0.006, -0.012]
    d_smile[[53, 55], :2] = [0.006, -0.012]
    d_smile[[61, 63, 65, 67], 1] = -0.008
    d_smile[[40, 41, 46, 47], 1] = -0.006  # cheeks push the lower lids up
    d_frown[[48, 54, 60, 64], 1] = 0.02
    d_frown[[49, 53, 55, 59], 1] = 0.008

    for top_i, bottom_i in ((37, 41), (38, 40), (43, 47), (44, 46)):
        d_blink[top_i, 1] = p[bottom_i, 1] - p[top_i, 1]

    centroid = neutral[:68].mean(axis=0)
    anchor = np.array(_EYE_MID) + centroid[:2]

    def normal(a: int, b: int, c: int, want: FloatArray) -> FloatArray:
        n = np.cross(p[b] - p[a], p[c] - p[a])
        n = n / np.linalg.norm(n) * (1.0 if n @ want >= 0 else -1.0)
        # Bent towards the face's normal: real noses are rounded, flat facets look like paper.
        n = n + np.array([0.0, 0.0, 0.8])
        return np.asarray(n / np.linalg.norm(n), dtype=np.float64)

    nose_normals = np.stack(
        [
            normal(27, 30, 31, np.array([-1.0, 0.0, 0.5])),
            normal(27, 30, 35, np.array([1.0, 0.0, 0.5])),
            normal(31, 30, 35, np.array([0.0, 1.0, 0.3])),
        ]
    )

    skin, hair = ident.skin, ident.hair_color

    def rgba(c: RGB) -> tuple[float, float, float, float]:
        return (255.0 * c[0], 255.0 * c[1], 255.0 * c[2], 255.0)

    colours = {
        "skin": rgba(skin),
        "neck": rgba(_scale_rgb(skin, 0.82)),
        "ear": rgba(_scale_rgb(skin, 0.94)),
        "hair": rgba(hair),
        "buzz": rgba(_mix(skin, hair, 0.55)),
        "stubble": rgba(_mix(skin, hair, 0.3)),
        "brow": rgba(ident.brow_color),
        "iris": rgba(ident.iris_color),
        "pupil": rgba((0.03, 0.03, 0.04)),
        "white": rgba(_mix((0.93, 0.91, 0.88), skin, 0.15)),
        "lash": rgba(_mix((0.05, 0.04, 0.04), hair, 0.2)),
        "nostril": rgba(_scale_rgb(skin, 0.3)),
        "lip_lower": rgba(ident.lip_color),
        "lip_upper": rgba(_scale_rgb(ident.lip_color, 0.82)),
        "lip_line": rgba(_scale_rgb(ident.lip_color, 0.45)),
        "mouth": rgba((0.28, 0.07, 0.08)),
        "teeth": rgba((0.90, 0.88, 0.80)),
        "shirt": rgba(ident.shirt_color),
    }
    # The model is cached and shared between renders: freeze it.
    for arr in (neutral, d_open, d_smile, d_frown, d_blink, centroid, anchor, axes, nose_normals):
        arr.setflags(write=False)
    return _Model(
        neutral=neutral,
        d_open=d_open,
        d_smile=d_smile,
        d_frown=d_frown,
        d_blink=d_blink,
        centroid=centroid,
        anchor=anchor,
        head_centre=np.array(_HEAD_CENTRE),
        head_axes=axes,
        nose_normals=nose_normals,
        colours=colours,
    )


# --------------------------------------------------------------------------------------------
# Posing and drawing
# --------------------------------------------------------------------------------------------


def _rotation(yaw: float, pitch: float, roll: float) -> FloatArray:
    y, p, r = math.radians(yaw), math.radians(pitch), math.radians(roll)
    cy, sy = math.cos(y), math.sin(y)
    cp, sp = math.cos(p), math.sin(p)
    cr, sr = math.cos(r), math.sin(r)
    ry = np.array([[cy, 0.0, sy], [0.0, 1.0, 0.0], [-sy, 0.0, cy]])
    rx = np.array([[1.0, 0.0, 0.0], [0.0, cp, -sp], [0.0, sp, cp]])
    rz = np.array([[cr, -sr, 0.0], [sr, cr, 0.0], [0.0, 0.0, 1.0]])
    return np.asarray(rz @ rx @ ry, dtype=np.float64)


def _light(state: FaceState) -> FloatArray:
    az, el = math.radians(state.light_azimuth), math.radians(state.light_elevation)
    return np.array([math.sin(az) * math.cos(el), -math.sin(el), math.cos(az) * math.cos(el)])


def _lambert(ndotl: NDArray[np.floating], state: FaceState) -> NDArray[np.floating]:
    # A little wrap keeps the terminator soft, like skin's subsurface scattering.
    lam = np.clip((ndotl + 0.15) / 1.15, 0.0, 1.0)
    return state.ambient + state.light_strength * lam


@dataclass
class _Pose:
    xy: FloatArray  # (_N_POINTS, 2) projected points, crop units
    rot: FloatArray
    head_xy: FloatArray  # (2,) projected ellipsoid centre
    head_q: FloatArray  # (3, 3) rotated ellipsoid quadric
    sil_q: FloatArray  # (2, 2) quadric of its silhouette ellipse


def _pose(model: _Model, state: FaceState) -> _Pose:
    pts = model.neutral + state.mouth_open * model.d_open + state.blink * model.d_blink
    if state.smile > 0:
        pts = pts + state.smile * model.d_smile
    elif state.smile < 0:
        pts = pts - state.smile * model.d_frown
    # Upper teeth hang from the upper inner lip, never lower than the lower inner lip.
    upper, lower = pts[[61, 62, 63]], pts[[67, 66, 65]]
    teeth = upper.copy()
    teeth[:, 1] += np.minimum(0.02, lower[:, 1] - upper[:, 1])
    teeth[:, 2] -= 0.004
    pts[_IDX["teeth"]] = teeth

    rot = _rotation(state.yaw, state.pitch, state.roll)
    xy = (pts - model.centroid) @ rot[:2].T + model.anchor
    head_xy = rot[:2] @ (model.head_centre - model.centroid) + model.anchor
    head_q = rot @ np.diag(1.0 / model.head_axes**2) @ rot.T
    sil_q = head_q[:2, :2] - np.outer(head_q[:2, 2], head_q[2, :2]) / head_q[2, 2]
    return _Pose(xy=xy, rot=rot, head_xy=head_xy, head_q=head_q, sil_q=sil_q)


def _silhouette(pose: _Pose, roll: float, psi_deg: FloatArray, scale: float) -> FloatArray:
    """Points on the head's silhouette ellipse; psi is measured from the head's right (+x)
    towards its top, so hair keeps following the outline whichever way the head turns."""
    a = np.radians(psi_deg)
    r = math.radians(roll)
    local = np.stack([np.cos(a), -np.sin(a)], axis=1)
    rot2 = np.array([[math.cos(r), -math.sin(r)], [math.sin(r), math.cos(r)]])
    u = local @ rot2.T
    radius = 1.0 / np.sqrt(np.einsum("ni,ij,nj->n", u, pose.sil_q, u))
    return np.asarray(pose.head_xy + u * (scale * radius)[:, None], dtype=np.float64)


def _hanging(
    pose: _Pose, roll: float, down: float, angles: tuple[float, float], scale: float = 1.0
) -> FloatArray:
    """Points of the silhouette (at psi = angles) moved `down` the head: where hair that hangs
    from the sides of the head ends."""
    r = math.radians(roll)
    down_dir = np.array([-math.sin(r), math.cos(r)])
    side = _silhouette(pose, roll, np.array(angles, dtype=np.float64), scale)
    return np.asarray(side + down * down_dir, dtype=np.float64)


def _supersampling(scale: float) -> int:
    # Enough canvas pixels per output pixel to anti-alias thin features at small sizes, while
    # keeping the canvas of large renders affordable.
    if scale <= 160:
        return 4
    if scale <= 400:
        return 2
    return 1


def crop_affine(size: int) -> NDArray[np.float64]:
    """The affine from the crop's unit square to pixel coordinates of a size x size image."""
    return np.array([[size, 0.0, -0.5], [0.0, size, -0.5]], dtype=np.float64)


class _Canvas:
    """Supersampled RGBA albedo + face mask, drawing polygons given in crop units."""

    def __init__(self, shape: tuple[int, int], to_canvas: FloatArray, scale: float) -> None:
        self.rgba = np.zeros((*shape, 4), dtype=np.uint8)
        self.mask = np.zeros(shape, dtype=np.uint8)
        self.lin = to_canvas[:, :2].T.copy()
        self.off = to_canvas[:, 2].copy()
        self.scale = scale  # canvas pixels per crop unit

    def fixed(self, pts: FloatArray) -> NDArray[np.int32]:
        # 4 fractional bits: sub-pixel accurate polygons (cv2 shift=4).
        return np.round((pts @ self.lin + self.off) * 16.0).astype(np.int32)

    def fill(self, polys: list[FloatArray], colour: tuple[float, float, float, float]) -> None:
        # One call per polygon: a single fillPoly call with several polygons XORs overlaps.
        for q in polys:
            cv2.fillPoly(self.rgba, [self.fixed(q)], colour, cv2.LINE_8, 4)

    def line(self, pts: FloatArray, colour: tuple[float, ...], width: float) -> None:
        thickness = max(1, round(width * self.scale))
        cv2.polylines(self.rgba, [self.fixed(pts)], False, colour, thickness, cv2.LINE_8, 4)

    def mask_fill(self, polys: list[FloatArray], value: int) -> None:
        for q in polys:
            cv2.fillPoly(self.mask, [self.fixed(q)], value, cv2.LINE_8, 4)


def _draw(
    canvas: _Canvas, model: _Model, ident: IdentityParams, state: FaceState, pose: _Pose
) -> None:
    xy, col, roll = pose.xy, model.colours, state.roll
    style, facial = HairStyle(ident.hair_style), FacialHair(ident.facial_hair)
    vol = ident.hair_volume

    def pts(name: str) -> FloatArray:
        return xy[_IDX[name]]

    # Back: long hair behind everything, then the body, which does not turn with the head.
    if style in (HairStyle.LONG, HairStyle.BOB):
        scale = 1.06 + 0.1 * vol
        arc = _silhouette(pose, roll, np.linspace(-5.0, 185.0, 21), scale)
        length = 0.78 if style == HairStyle.LONG else 0.36
        flare = (0.05 + 0.06 * vol) if style == HairStyle.LONG else -0.03
        ends = _hanging(pose, roll, length, (185.0, -5.0))
        r = math.radians(roll)
        side = np.array([math.cos(r), math.sin(r)])
        ends = ends + np.stack([-side, side]) * flare
        canvas.fill([np.concatenate([arc, ends])], col["hair"])
    fw = ident.face_width
    # fmt: off
    neck = np.array([[-0.13 * fw, 0.16], [0.13 * fw, 0.16], [0.15 * fw, 0.72], [-0.15 * fw, 0.72]])
    shirt = np.array([[-0.8, 1.0], [-0.72, 0.74], [-0.45, 0.66], [-0.17, 0.62], [0.0, 0.72],
                      [0.17, 0.62], [0.45, 0.66], [0.72, 0.74], [0.8, 1.0]])
    # fmt: on
    body = np.array(_EYE_MID)
    canvas.fill([neck + body], col["neck"])
    canvas.fill([shirt + body], col["shirt"])

    # Head: the hull of the skull's silhouette and the jaw (the side of the head shows when it
    # turns), then the ears, then the face outline, which alone makes the mask.
    skull = _silhouette(pose, roll, np.linspace(-5.0, 185.0, 20), 1.0)
    head = cv2.convexHull(np.concatenate([skull, xy[_JAW]]).astype(np.float32))[:, 0]
    face = np.concatenate([xy[_JAW], pts("arc")])
    canvas.fill([head.astype(np.float64)], col["skin"])
    if style not in (HairStyle.LONG, HairStyle.BOB):
        canvas.fill([pts("ear_r"), pts("ear_l")], col["ear"])
    canvas.fill([face], col["skin"])
    canvas.mask_fill([face], 255)

    if facial in (FacialHair.STUBBLE, FacialHair.BEARD):
        beard = np.concatenate([xy[2:15], pts("beard")])
        canvas.fill([beard], col["stubble" if facial == FacialHair.STUBBLE else "hair"])

    # Eyes: white, iris, pupil, then the skin around them hides whatever crossed the lids.
    canvas.fill([xy[_EYE_R], xy[_EYE_L]], col["white"])
    irises = [pts("iris_r"), pts("iris_l")]
    canvas.fill(irises, col["iris"])
    canvas.fill([i.mean(axis=0) + 0.42 * (i - i.mean(axis=0)) for i in irises], col["pupil"])
    # Lid contours from the outer to the inner corner, as the lid surrounds are ordered.
    for lid, top, bottom in (
        (pts("lid_r"), xy[[36, 37, 38, 39]], xy[[36, 41, 40, 39]]),
        (pts("lid_l"), xy[[45, 44, 43, 42]], xy[[45, 46, 47, 42]]),
    ):
        above, below = lid[2:6], lid[6:10]
        canvas.fill(
            [
                np.concatenate([lid[[0]], top, lid[[1]], above[::-1]]),
                np.concatenate([lid[[0]], bottom, lid[[1]], below[::-1]]),
            ],
            col["skin"],
        )
        canvas.line(top, col["lash"], 0.011)
    canvas.fill([pts("brow_r"), pts("brow_l")], col["brow"])
    canvas.fill([pts("nostril_r"), pts("nostril_l")], col["nostril"])

    # Mouth: lower lip colour everywhere, the upper lip darker, the opening and the teeth.
    canvas.fill([xy[_OUTER_LIP]], col["lip_lower"])
    canvas.fill([xy[_UPPER_LIP]], col["lip_upper"])
    if state.mouth_open > 0.02:
        canvas.fill([xy[_INNER_LIP]], col["mouth"])
        teeth = np.concatenate([xy[[60, 61, 62, 63, 64]], pts("teeth")[::-1]])
        canvas.fill([teeth], col["teeth"])
    canvas.line(xy[[48, 60, 61, 62, 63, 64, 54]], col["lip_line"], 0.006)
    if facial in (FacialHair.MOUSTACHE, FacialHair.BEARD):
        canvas.fill([pts("moustache")], col["hair"])

    # Front hair: a cap from the hairline to a silhouette grown by the hair volume.
    if style == HairStyle.BALD:
        rings = []
        for lo_, hi_ in ((-12.0, 30.0), (150.0, 192.0)):
            a = np.linspace(lo_, hi_, 7)
            rings.append(
                np.concatenate(
                    [_silhouette(pose, roll, a, 1.01), _silhouette(pose, roll, a[::-1], 0.93)]
                )
            )
        canvas.fill(rings, col["buzz"])
        canvas.mask_fill(rings, 0)
        return
    sideburn = pts("sideburn")  # image right: top, short end, long end; then image left
    long_sides = style in (HairStyle.LONG, HairStyle.BOB)
    bottom_r, bottom_l = (sideburn[2], sideburn[5]) if long_sides else (sideburn[1], sideburn[4])
    if style == HairStyle.BUZZ:
        scale, start = 1.012, 12.0
    else:
        scale, start = 1.04 + 0.1 * vol, (-5.0 if long_sides else 12.0)
    arc = _silhouette(pose, roll, np.linspace(start, 180.0 - start, 23), scale)
    if long_sides:
        # Locks hang in front of the ears, so the side of the head never shows under long hair.
        drop_l, drop_r = _hanging(
            pose, roll, 0.42 if style == HairStyle.LONG else 0.3, (185.0, -5.0), scale
        )
        ends_l, ends_r = np.stack([drop_l, bottom_l]), np.stack([bottom_r, drop_r])
    else:
        ends_l, ends_r = bottom_l[None], bottom_r[None]
    cap = np.concatenate([arc, ends_l, sideburn[[3]], pts("hairline"), sideburn[[0]], ends_r])
    polys = [cap]
    if style == HairStyle.FRINGE:
        polys.append(
            np.concatenate([sideburn[[3]], pts("fringe"), sideburn[[0]], pts("hairline")[::-1]])
        )
    canvas.fill(polys, col["buzz" if style == HairStyle.BUZZ else "hair"])
    canvas.mask_fill(polys, 0)


def _shade(
    model: _Model,
    state: FaceState,
    pose: _Pose,
    grid_u: NDArray[np.float32],
    grid_v: NDArray[np.float32],
) -> NDArray[np.float32]:
    """Lambert shading of the head ellipsoid at the given crop-unit coordinates."""
    q = pose.head_q
    du = grid_u - np.float32(pose.head_xy[0])
    dv = grid_v - np.float32(pose.head_xy[1])
    # Front intersection of the viewing ray (along z) with the ellipsoid; rays that miss get
    # the silhouette normal (n_z = 0), which suits hair and neck beyond the outline well enough.
    a = q[2, 2]
    b = q[0, 2] * du + q[1, 2] * dv
    c = q[0, 0] * du * du + 2.0 * q[0, 1] * du * dv + q[1, 1] * dv * dv - 1.0
    dz = (np.sqrt(np.maximum(b * b - a * c, 0.0)) - b) / a
    light = _light(state)
    nx = q[0, 0] * du + q[0, 1] * dv + q[0, 2] * dz
    ny = q[1, 0] * du + q[1, 1] * dv + q[1, 2] * dz
    nz = q[2, 0] * du + q[2, 1] * dv + q[2, 2] * dz
    ndotl = (nx * light[0] + ny * light[1] + nz * light[2]) / np.sqrt(
        nx * nx + ny * ny + nz * nz + 1e-12
    )
    return np.asarray(_lambert(ndotl, state), dtype=np.float32)


def _render_region(
    ident: IdentityParams,
    state: FaceState,
    affine: FloatArray,
    roi: tuple[int, int, int, int],
    background: NDArray[np.float32],
) -> tuple[NDArray[np.uint8], NDArray[np.uint8], FloatArray]:
    """Render over `background` (the ROI's pixels, float RGB 0..255). Returns the ROI's image
    and mask and the projected points (crop units)."""
    model = _model(ident)
    pose = _pose(model, state)
    x0, y0, x1, y1 = roi
    w, h = x1 - x0, y1 - y0
    scale = math.sqrt(abs(np.linalg.det(affine[:, :2])))
    ss = _supersampling(scale)
    # Output pixel x covers canvas pixels ss*x .. ss*x+ss-1, centred at ss*x + (ss-1)/2.
    local = affine.copy()
    local[:, 2] -= (x0, y0)
    to_canvas = local * ss
    to_canvas[:, 2] += (ss - 1) / 2.0
    canvas = _Canvas((h * ss, w * ss), to_canvas, scale * ss)
    _draw(canvas, model, ident, state, pose)

    # Shading is smooth: evaluate it per output pixel and upsample; only the nose facets are
    # drawn at full resolution.
    inv = np.linalg.inv(np.vstack([local, [0.0, 0.0, 1.0]]))[:2]
    gx, gy = np.meshgrid(np.arange(w, dtype=np.float32), np.arange(h, dtype=np.float32))
    gu = np.float32(inv[0, 0]) * gx + np.float32(inv[0, 1]) * gy + np.float32(inv[0, 2])
    gv = np.float32(inv[1, 0]) * gx + np.float32(inv[1, 1]) * gy + np.float32(inv[1, 2])
    shade_lo = _shade(model, state, pose, gu, gv)
    shade = shade_lo
    if ss > 1:
        shade = np.asarray(
            cv2.resize(shade_lo, (w * ss, h * ss), interpolation=cv2.INTER_LINEAR), np.float32
        )
    facet_shade = _lambert(model.nose_normals @ pose.rot.T @ _light(state), state)
    for facet, value in zip(_NOSE_FACETS, facet_shade, strict=True):
        cv2.fillPoly(shade, [canvas.fixed(pose.xy[facet])], float(value), cv2.LINE_8, 4)

    fine = canvas.rgba.astype(np.float32)
    fine[..., :3] *= shade[..., None]
    rgba = fine
    mask_small = canvas.mask
    if ss > 1:
        rgba = np.asarray(cv2.resize(fine, (w, h), interpolation=cv2.INTER_AREA), np.float32)
        mask_small = np.asarray(
            cv2.resize(canvas.mask, (w, h), interpolation=cv2.INTER_AREA), np.uint8
        )
    if float(gv.max()) > 1.1:
        # Outside the crop (render_into margins) the body fades out instead of ending in a cut.
        fade = np.clip((1.32 - gv) / 0.2, 0.0, 1.0)[..., None]
        rgba *= fade
    alpha = rgba[..., 3:4] * np.float32(1.0 / 255.0)
    out = rgba[..., :3] + (1.0 - alpha) * background
    image = np.clip(out + 0.5, 0.0, 255.0).astype(np.uint8)
    mask = np.where(mask_small >= 128, 255, 0).astype(np.uint8)
    return image, mask, pose.xy


def _landmarks(
    xy: FloatArray, affine: FloatArray
) -> tuple[NDArray[np.float32], NDArray[np.float32]]:
    lm = (xy[:68] @ affine[:, :2].T + affine[:, 2]).astype(np.float32)
    return lm, lm[list(LANDMARKS5_FROM_68)].copy()


def _gradient(state: FaceState, size: int) -> NDArray[np.float32]:
    v = (np.arange(size, dtype=np.float32) + 0.5) / size
    u = v
    # Top brighter than bottom, and the wall brighter on the side the light comes from.
    side = 0.18 * state.light_strength * math.sin(math.radians(state.light_azimuth))
    k = (1.12 - 0.3 * v)[:, None] + side * (u - 0.5)[None, :]
    bg = np.asarray(state.background, dtype=np.float32) * 255.0
    return np.asarray(np.clip(k[..., None] * bg, 0.0, 255.0), dtype=np.float32)


def render(identity: IdentityParams, state: FaceState, size: int = 64) -> RenderedFace:
    """The aligned crop of `identity` in `state`, size x size RGB."""
    if size < 8:
        raise ValueError(f"size must be at least 8, got {size}")
    affine = crop_affine(size)
    image, mask, xy = _render_region(
        identity, state, affine, (0, 0, size, size), _gradient(state, size)
    )
    lm68, lm5 = _landmarks(xy, affine)
    return RenderedFace(image=image, landmarks68=lm68, landmarks5=lm5, mask=mask)


# How far outside the crop's unit square render_into draws (hair, neck, shoulders).
_MARGIN = (-0.35, -0.3, 1.35, 1.35)


def render_into(
    frame: NDArray[np.uint8],
    identity: IdentityParams,
    state: FaceState,
    affine: NDArray[np.floating],
) -> RenderedFace:
    """Draw the face onto a copy of `frame` (RGB uint8). `affine` (2x3) maps the crop's unit
    square to frame pixel coordinates; landmarks and mask come back in frame coordinates.
    The frame is the background: ``state.background`` is not used."""
    if frame.ndim != 3 or frame.shape[2] != 3 or frame.dtype != np.uint8:
        raise ValueError(f"frame must be (H, W, 3) uint8 RGB, got {frame.shape} {frame.dtype}")
    a = np.asarray(affine, dtype=np.float64)
    if a.shape != (2, 3) or not np.all(np.isfinite(a)) or abs(np.linalg.det(a[:, :2])) < 1e-6:
        raise ValueError(f"affine must be a finite, invertible 2x3 matrix, got {affine!r}")
    fh, fw = frame.shape[:2]
    mx0, my0, mx1, my1 = _MARGIN
    corners = np.array([[mx0, my0], [mx1, my0], [mx0, my1], [mx1, my1]]) @ a[:, :2].T + a[:, 2]
    x0 = max(0, math.floor(corners[:, 0].min()))
    y0 = max(0, math.floor(corners[:, 1].min()))
    x1 = min(fw, math.ceil(corners[:, 0].max()) + 1)
    y1 = min(fh, math.ceil(corners[:, 1].max()) + 1)
    out = frame.copy()
    mask = np.zeros((fh, fw), dtype=np.uint8)
    if x1 <= x0 or y1 <= y0:
        xy = _pose(_model(identity), state).xy
    else:
        bg = frame[y0:y1, x0:x1].astype(np.float32)
        image, mask_roi, xy = _render_region(identity, state, a, (x0, y0, x1, y1), bg)
        out[y0:y1, x0:x1] = image
        mask[y0:y1, x0:x1] = mask_roi
    lm68, lm5 = _landmarks(xy, a)
    return RenderedFace(image=out, landmarks68=lm68, landmarks5=lm5, mask=mask)


def make_states(n: int, seed: int = 0) -> list[FaceState]:
    """n random states; the same seed gives the same states whatever identity they are for,
    so make_dataset(A, n, seed=s) and make_dataset(B, n, seed=s) are paired frame by frame."""
    rng = np.random.default_rng(seed)
    return [FaceState.random(rng) for _ in range(n)]


def make_dataset(
    identity: IdentityParams, n: int, size: int = 64, seed: int = 0
) -> tuple[NDArray[np.uint8], NDArray[np.float32]]:
    """n random states of `identity`: images (n, size, size, 3) uint8 RGB and landmarks68
    (n, 68, 2) float32. Deterministic by seed; see make_states for pairing identities."""
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    images = np.empty((n, size, size, 3), dtype=np.uint8)
    landmarks = np.empty((n, 68, 2), dtype=np.float32)
    for i, state in enumerate(make_states(n, seed)):
        face = render(identity, state, size)
        images[i] = face.image
        landmarks[i] = face.landmarks68
    return images, landmarks
