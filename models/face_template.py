"""The mean aligned face: where alignment puts the 68 landmarks of every face, in unit crop
coordinates (0..1 across the crop; pixel ``i`` of a ``size`` crop has its centre at
``u = (i + 0.5) / size``).

A model is trained on crops framed by one template, so the template belongs to the model:
encoder checkpoints carry it in their metadata (see facemux.models.checkpoint) and serving
aligns frames with the loaded model's. ``TEMPLATE_68`` is the template of every model
trained so far, and the fallback for checkpoints made before they carried one.

It is the mean of the 68 landmarks of the first 64 synthetic identities of
facemux.models.synth at ``FaceState.neutral()`` (the mean moves by < 0.002 crop units
beyond ~50 identities), computed once and written out here so that serving never renders a
face::

    from facemux.models import synth
    size, n = 8, 64  # landmarks do not depend on the render size
    t = sum((synth.render(synth.identity_from_seed(s), synth.FaceState.neutral(), size)
             .landmarks68.astype("float64") + 0.5) / size for s in range(n)) / n

tests/test_faces.py checks that this still equals what synth renders.

No torch, OpenCV or synth here: checkpoints and the serving path import this.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from numpy.typing import NDArray

from .errors import InvalidInputError

__all__ = ["LANDMARKS5_FROM_68", "TEMPLATE_68", "as_template", "default_template", "points_of"]

# Indices into the 68 points giving dlib's 5-point order (shape_predictor_5_face_landmarks):
# image-right eye outer then inner corner, image-left eye outer then inner corner, nose base.
LANDMARKS5_FROM_68: tuple[int, int, int, int, int] = (45, 42, 36, 39, 33)

TEMPLATE_68: tuple[tuple[float, float], ...] = (
    (0.12490453408099711, 0.41999998688697815),
    (0.1381445736042224, 0.498717132024467),
    (0.169182836310938, 0.5769070256501436),
    (0.2129687462002039, 0.6501719364896417),
    (0.26512194867245853, 0.7150993384420872),
    (0.32186081423424184, 0.7687952499836683),
    (0.3804026707075536, 0.8089068429544568),
    (0.4392127636820078, 0.8336903089657426),
    (0.5, 0.8420722763985395),
    (0.5607872353866696, 0.8336903089657426),
    (0.6195973260328174, 0.8089068429544568),
    (0.6781391818076372, 0.7687952499836683),
    (0.7348780520260334, 0.7150993384420872),
    (0.7870312547311187, 0.6501719364896417),
    (0.8308171629905701, 0.5769070256501436),
    (0.8618554277345538, 0.498717132024467),
    (0.8750954680144787, 0.41999998688697815),
    (0.2669882024638355, 0.3155000116676092),
    (0.3086194808129221, 0.30773371853865683),
    (0.35025075916200876, 0.304937990847975),
    (0.39188203774392605, 0.30917169945314527),
    (0.4335133167915046, 0.3183759720996022),
    (0.5664866818115115, 0.3183759720996022),
    (0.6081179631873965, 0.30917169945314527),
    (0.649749243631959, 0.304937990847975),
    (0.691380518488586, 0.30773371853865683),
    (0.7330117970705032, 0.3155000116676092),
    (0.5, 0.3700000047683716),
    (0.5, 0.43568201130256057),
    (0.5, 0.49175373977050185),
    (0.5, 0.5478254719637334),
    (0.45087148947641253, 0.568215190898627),
    (0.4754357426427305, 0.5835074824281037),
    (0.5, 0.5886049102991819),
    (0.5245642573572695, 0.5835074824281037),
    (0.5491285105235875, 0.568215190898627),
    (0.28898820257745683, 0.3996058292686939),
    (0.33139624050818384, 0.37202782602980733),
    (0.38175578182563186, 0.3734406032599509),
    (0.4215133162215352, 0.40039416775107384),
    (0.38175578182563186, 0.41904249554499984),
    (0.33139624050818384, 0.41973686777055264),
    (0.5784866837784648, 0.40039416775107384),
    (0.6182442205026746, 0.3734406032599509),
    (0.6686037601903081, 0.37202782602980733),
    (0.7110117999836802, 0.3996058292686939),
    (0.6686037601903081, 0.41973686777055264),
    (0.6182442205026746, 0.41904249554499984),
    (0.3876571338623762, 0.6747838128358126),
    (0.4348411373794079, 0.6541116936132312),
    (0.4775314265862107, 0.6504636714234948),
    (0.5, 0.6548413001000881),
    (0.5224685734137893, 0.6504636714234948),
    (0.5651588616892695, 0.6541116936132312),
    (0.6123428707942367, 0.6747838128358126),
    (0.5674057230353355, 0.7007253067567945),
    (0.5314560034312308, 0.7062378730624914),
    (0.5, 0.7072106841951609),
    (0.4685439965687692, 0.7062378730624914),
    (0.43259428022429347, 0.7007253067567945),
    (0.40113827772438526, 0.6747838128358126),
    (0.45506285410374403, 0.6747838128358126),
    (0.5, 0.6747838128358126),
    (0.544937145896256, 0.6747838128358126),
    (0.5988617213442922, 0.6747838128358126),
    (0.544937145896256, 0.6747838128358126),
    (0.5, 0.6747838128358126),
    (0.45506285410374403, 0.6747838128358126),
)


def default_template() -> NDArray[np.float64]:
    """``TEMPLATE_68`` as a read-only (68, 2) array."""
    return _DEFAULT


def as_template(value: Any, what: str = "face template") -> NDArray[np.float64]:
    """A template from untrusted data (a checkpoint header): 68 finite (x, y) pairs inside
    a generous margin around the crop, as a read-only array; InvalidInputError otherwise."""
    try:
        arr = np.array(value, dtype=np.float64)
    except (TypeError, ValueError):
        raise InvalidInputError(f"{what} must be 68 (x, y) number pairs") from None
    if arr.shape != (68, 2) or not np.isfinite(arr).all():
        raise InvalidInputError(f"{what} must be 68 finite (x, y) pairs, got shape {arr.shape}")
    if arr.min() < -1.0 or arr.max() > 2.0:
        raise InvalidInputError(f"{what} lies outside the crop (unit coordinates, 0..1)")
    if float(np.ptp(arr, axis=0).min()) < 0.05:
        raise InvalidInputError(f"{what} is degenerate (its points nearly coincide)")
    arr.flags.writeable = False
    return arr


def points_of(template68: NDArray[np.float64], points: int) -> NDArray[np.float64]:
    """The template's 68 points, or its 5 in dlib's 5-point order (a copy)."""
    if points == 68:
        return template68.copy()
    if points == 5:
        return template68[list(LANDMARKS5_FROM_68)].copy()
    raise InvalidInputError(f"landmarks must have 5 or 68 points, got {points}")


_DEFAULT = as_template(TEMPLATE_68)
