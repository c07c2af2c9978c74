"""The frame pipeline's pixel work as tensor ops, for frames already on a GPU.

Alignment and paste-back become one `grid_sample` each, blending and colour correction
elementwise ops, so a 1080p frame never returns to the host between decode (nvjpeg) and
encode. The same functions run on the CPU device, which is how the tests hold them to the
OpenCV path (`align.warp_crop`, `blend.paste_face` feather mode, `colour.correct_colour`).

Frames are float tensors (3, H, W) in [0, 1]; affines are the same 2x3 frame -> crop pixel
matrices the OpenCV path uses (pixel centres at integer coordinates).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from facemux.models import pixels
from facemux.models.errors import InvalidInputError
from numpy.typing import NDArray
from torch import Tensor

__all__ = [
    "correct_colour_t",
    "from_uint8",
    "lab_to_rgb",
    "paste_face_t",
    "paste_faces_t",
    "refine_mask_t",
    "rgb_to_lab",
    "to_uint8",
    "to_uint8_t",
    "warp_crop_t",
    "warp_crops_t",
]


def from_uint8(rgb: NDArray[np.uint8], device: torch.device | str = "cpu") -> Tensor:
    """(H, W, 3) uint8 -> (3, H, W) float in [0, 1] on `device` (the copy moves uint8)."""
    t = torch.from_numpy(np.ascontiguousarray(rgb)).to(device)
    return pixels.to_unit(t.permute(2, 0, 1))


def to_uint8_t(t: Tensor) -> Tensor:
    """(3, H, W) float in [0, 1] -> (3, H, W) uint8, rounded, on the same device."""
    return pixels.to_uint8(t)


def to_uint8(t: Tensor) -> NDArray[np.uint8]:
    return np.ascontiguousarray(to_uint8_t(t).permute(1, 2, 0).cpu().numpy())


def _normaliser(h: int, w: int) -> NDArray[np.float64]:
    """Pixel coordinates -> grid_sample's [-1, 1] (align_corners=False: pixel centres at
    (2i + 1) / n - 1)."""
    return np.array([[2.0 / w, 0.0, 1.0 / w - 1.0], [0.0, 2.0 / h, 1.0 / h - 1.0], [0, 0, 1]])


def _h(m: NDArray[np.floating]) -> NDArray[np.float64]:
    return np.vstack([np.asarray(m, np.float64), [0.0, 0.0, 1.0]])


def _sample(src: Tensor, dst_to_src: NDArray[np.float64], out_hw: tuple[int, int]) -> Tensor:
    """Sample `src` (C, H, W) at dst pixels mapped through the 3x3 pixel matrix."""
    sh, sw = src.shape[-2:]
    oh, ow = out_hw
    theta = _normaliser(sh, sw) @ dst_to_src @ np.linalg.inv(_normaliser(oh, ow))
    th = torch.as_tensor(theta[:2], dtype=src.dtype, device=src.device).unsqueeze(0)
    grid = F.affine_grid(th, [1, src.shape[0], oh, ow], align_corners=False)
    return F.grid_sample(
        src.unsqueeze(0), grid, mode="bilinear", padding_mode="zeros", align_corners=False
    )[0]


def warp_crop_t(frame: Tensor, m: NDArray[np.floating], size: int) -> Tensor:
    """The aligned crop (3, size, size) of `frame` through the frame -> crop matrix `m`."""
    return _sample(frame, np.asarray(np.linalg.inv(_h(m)), np.float64), (size, size))


def warp_crops_t(frame: Tensor, matrices: Sequence[NDArray[np.floating]], size: int) -> Tensor:
    """The aligned crops (N, 3, size, size) of all of a frame's faces in one `grid_sample`:
    the faces' sampling grids are stacked into one tall grid over the frame, so the frame is
    neither copied nor expanded per face. The same pixels as `warp_crop_t` face by face."""
    if not matrices:
        return frame.new_zeros((0, frame.shape[0], size, size))
    sh, sw = frame.shape[-2:]
    to_unit_src = _normaliser(sh, sw)
    from_unit_dst = np.linalg.inv(_normaliser(size, size))
    thetas = np.stack([(to_unit_src @ np.linalg.inv(_h(m)) @ from_unit_dst)[:2] for m in matrices])
    th = torch.as_tensor(thetas, dtype=frame.dtype, device=frame.device)
    n = len(matrices)
    grid = F.affine_grid(th, [n, frame.shape[0], size, size], align_corners=False)
    out = F.grid_sample(
        frame.unsqueeze(0),
        grid.reshape(1, n * size, size, 2),
        mode="bilinear",
        padding_mode="zeros",
        align_corners=False,
    )[0]
    return out.reshape(frame.shape[0], n, size, size).transpose(0, 1).contiguous()


def refine_mask_t(mask: Tensor, erosion: float = 0.02, blur: float = 0.05) -> Tensor:
    """The tensor twin of `mask.refine_mask` for a float (H, W) mask in [0, 1] on any
    device: erode (dilate when < 0) with the same elliptical element, Gaussian feather with
    the same kernel (both zero outside the crop), fade at the crop's edges."""
    if not (math.isfinite(erosion) and abs(erosion) <= 0.5):
        raise InvalidInputError(f"mask erosion must be in [-0.5, 0.5], got {erosion!r}")
    if not (math.isfinite(blur) and 0.0 <= blur <= 0.5):
        raise InvalidInputError(f"mask blur must be in [0, 0.5], got {blur!r}")
    m = mask.float().clamp(0, 1)[None, None]
    h, w = int(m.shape[-2]), int(m.shape[-1])
    size = max(h, w)
    radius = round(abs(erosion) * size)
    if radius > 0:
        k = 2 * radius + 1
        element = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (k, k)).astype(bool)
        # Grey erosion/dilation: the min/max over the element's offsets, zero beyond the
        # edge (OpenCV's constant border of 0).
        patches = F.unfold(F.pad(m, (radius,) * 4, value=0.0), k)  # (1, k*k, H*W)
        sel = patches[:, torch.from_numpy(element.reshape(-1)).to(m.device)]
        pick = sel.min(dim=1).values if erosion > 0 else sel.max(dim=1).values
        m = pick.reshape(1, 1, h, w)
    width = blur * size
    if width >= 0.5:
        sigma = width / 2.0
        k = 2 * math.ceil(3.0 * sigma) + 1
        g = torch.as_tensor(
            cv2.getGaussianKernel(k, sigma, cv2.CV_64F)[:, 0], dtype=m.dtype, device=m.device
        )
        r = k // 2
        m = F.conv2d(F.pad(m, (r, r, 0, 0)), g.view(1, 1, 1, k))
        m = F.conv2d(F.pad(m, (0, 0, r, r)), g.view(1, 1, k, 1))
    edge = max(1.0, width)
    ys = torch.arange(h, device=m.device, dtype=m.dtype)
    xs = torch.arange(w, device=m.device, dtype=m.dtype)
    ramp_y = ((torch.minimum(ys, h - 1 - ys) + 0.5) / edge).clamp(0, 1)
    ramp_x = ((torch.minimum(xs, w - 1 - xs) + 0.5) / edge).clamp(0, 1)
    return (m[0, 0] * ramp_y[:, None] * ramp_x[None, :]).clamp(0, 1)


def paste_face_t(frame: Tensor, face: Tensor, mask: Tensor, m: NDArray[np.floating]) -> Tensor:
    """`frame` with `face` (3, S, S) warped back and alpha-blended under `mask` (1, S, S) in
    [0, 1]. Pixels outside the warped mask's support are returned untouched (the blend
    multiplies them by exactly 1)."""
    if face.shape[-2:] != mask.shape[-2:]:
        raise InvalidInputError("face and mask crops must be the same size")
    (roi,) = _rois(mask[None], [m], (int(frame.shape[1]), int(frame.shape[2])))
    out = frame.clone()
    if roi is None:
        return out
    x0, y0, x1, y1 = roi
    # ROI pixel -> frame pixel -> crop pixel.
    roi_to_crop = _h(m) @ np.array([[1.0, 0, x0], [0, 1.0, y0], [0, 0, 1.0]])
    both = _sample(torch.cat([face, mask]), roi_to_crop, (y1 - y0, x1 - x0))
    warped, alpha = both[:3], both[3:4]
    region = out[:, y0:y1, x0:x1]
    out[:, y0:y1, x0:x1] = region + (warped - region) * alpha
    return out


def _rois(
    masks: Tensor, matrices: Sequence[NDArray[np.floating]], frame_hw: tuple[int, int], pad: int = 2
) -> list[tuple[int, int, int, int] | None]:
    """The frame rectangle each face's mask support lands in (only it is resampled and
    blended; None: an empty mask or one off the frame). The masks' row and column supports
    come to the host in one copy: one device sync for the frame, not one per face."""
    support = masks[:, 0] > 0  # (N, S, S)
    rows_cols = torch.cat([support.any(dim=2), support.any(dim=1)], dim=1).cpu().numpy()
    out: list[tuple[int, int, int, int] | None] = []
    h, w = frame_hw
    for rc, m in zip(rows_cols, matrices, strict=True):
        ys, xs = np.flatnonzero(rc[: masks.shape[-2]]), np.flatnonzero(rc[masks.shape[-2] :])
        if ys.size == 0:
            out.append(None)
            continue
        y0, y1, x0, x1 = int(ys[0]), int(ys[-1]), int(xs[0]), int(xs[-1])
        corners = np.array(
            [[x0 - 1, y0 - 1, 1], [x1 + 1, y0 - 1, 1], [x0 - 1, y1 + 1, 1], [x1 + 1, y1 + 1, 1]],
            np.float64,
        )
        pts = corners @ np.linalg.inv(_h(m)).T
        fx0 = max(0, math.floor(pts[:, 0].min()) - pad)
        fy0 = max(0, math.floor(pts[:, 1].min()) - pad)
        fx1 = min(w, math.ceil(pts[:, 0].max()) + pad + 1)
        fy1 = min(h, math.ceil(pts[:, 1].max()) + pad + 1)
        out.append(None if fx1 <= fx0 or fy1 <= fy0 else (fx0, fy0, fx1, fy1))
    return out


def paste_faces_t(
    frame: Tensor, faces: Tensor, masks: Tensor, matrices: Sequence[NDArray[np.floating]]
) -> Tensor:
    """`paste_face_t` for all of a frame's faces (N, 3, S, S) under their masks (N, 1, S, S),
    in order: the same frame as pasting them one by one, where a later face is blended over
    an earlier one it overlaps. The inverse warps of all faces and masks are one
    `grid_sample` (each face sampled over the largest face's region; the rest is not read),
    and the frame is copied once, not once per face."""
    n = len(matrices)
    if faces.shape[0] != n or masks.shape[0] != n:
        raise InvalidInputError(f"{faces.shape[0]} faces and {masks.shape[0]} masks for {n} faces")
    if faces.shape[-2:] != masks.shape[-2:]:
        raise InvalidInputError("face and mask crops must be the same size")
    out = frame.clone()
    if n == 0:
        return out
    fh, fw = int(frame.shape[1]), int(frame.shape[2])
    rois = _rois(masks, matrices, (fh, fw))
    live = [j for j, r in enumerate(rois) if r is not None]
    if not live:
        return out
    boxes = [rois[j] for j in live]
    oh = max(b[3] - b[1] for b in boxes if b is not None)
    ow = max(b[2] - b[0] for b in boxes if b is not None)
    sh, sw = int(faces.shape[-2]), int(faces.shape[-1])
    to_unit_src = _normaliser(sh, sw)
    from_unit_dst = np.linalg.inv(_normaliser(oh, ow))
    thetas = []
    for j, b in zip(live, boxes, strict=True):
        assert b is not None
        # (oh, ow) grid pixel -> frame pixel (offset by the face's ROI corner) -> crop pixel.
        roi_to_crop = _h(matrices[j]) @ np.array([[1.0, 0, b[0]], [0, 1.0, b[1]], [0, 0, 1.0]])
        thetas.append((to_unit_src @ roi_to_crop @ from_unit_dst)[:2])
    th = torch.as_tensor(np.stack(thetas), dtype=frame.dtype, device=frame.device)
    src = torch.cat([faces[live], masks[live].to(faces.dtype)], dim=1)
    grid = F.affine_grid(th, [len(live), 4, oh, ow], align_corners=False)
    both = F.grid_sample(src, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    for k, b in enumerate(boxes):
        assert b is not None
        x0, y0, x1, y1 = b
        warped = both[k, :3, : y1 - y0, : x1 - x0]
        alpha = both[k, 3:4, : y1 - y0, : x1 - x0]
        region = out[:, y0:y1, x0:x1]
        out[:, y0:y1, x0:x1] = region + (warped - region) * alpha
    return out


# CIELAB with D65 white, sRGB transfer curve: the conversion OpenCV applies to float RGB.
_RGB2XYZ = torch.tensor(
    [
        [0.412453, 0.357580, 0.180423],
        [0.212671, 0.715160, 0.072169],
        [0.019334, 0.119193, 0.950227],
    ],
    dtype=torch.float64,
)
_WHITE = (0.950456, 1.0, 1.088754)


def rgb_to_lab(rgb: Tensor) -> Tensor:
    """(3, H, W) sRGB in [0, 1] -> L in [0, 100], a and b."""
    lin = torch.where(rgb <= 0.04045, rgb / 12.92, ((rgb + 0.055) / 1.055) ** 2.4)
    xyz = torch.einsum("ij,jhw->ihw", _RGB2XYZ.to(rgb), lin)
    white = torch.tensor(_WHITE, dtype=rgb.dtype, device=rgb.device).view(3, 1, 1)
    t = xyz / white
    f = torch.where(t > 0.008856, t.clamp_min(1e-12) ** (1 / 3), 7.787 * t + 16 / 116)
    lum = torch.where(t[1] > 0.008856, 116 * f[1] - 16, 903.3 * t[1])
    return torch.stack([lum, 500 * (f[0] - f[1]), 200 * (f[1] - f[2])])


def lab_to_rgb(lab: Tensor) -> Tensor:
    fy = (lab[0] + 16) / 116
    fx, fz = fy + lab[1] / 500, fy - lab[2] / 200
    f = torch.stack([fx, fy, fz])
    t = torch.where(f > 0.206893, f**3, (f - 16 / 116) / 7.787)
    white = torch.tensor(_WHITE, dtype=lab.dtype, device=lab.device).view(3, 1, 1)
    lin = torch.einsum("ij,jhw->ihw", torch.linalg.inv(_RGB2XYZ).to(lab), t * white)
    lin = lin.clamp(0, 1)
    return torch.where(lin <= 0.0031308, lin * 12.92, 1.055 * lin ** (1 / 2.4) - 0.055)


def _stats(x: Tensor, w: Tensor) -> tuple[Tensor, Tensor]:
    total = w.sum()
    mean = (x * w).sum(dim=(1, 2), keepdim=True) / total
    var = (((x - mean) ** 2) * w).sum(dim=(1, 2), keepdim=True) / total
    return mean, var.sqrt()


def correct_colour_t(
    face: Tensor, target: Tensor, mask: Tensor, method: str = "reinhard"
) -> Tensor:
    """The tensor twin of `colour.correct_colour`: match `face` to `target` inside `mask`
    (1, S, S) by channel means ("average") or LAB means and deviations ("reinhard")."""
    if method == "none" or float(mask.sum()) < 1.0:
        return face
    if method == "average":
        mf, _ = _stats(face, mask)
        mt, _ = _stats(target, mask)
        return (face + (mt - mf)).clamp(0, 1)
    if method != "reinhard":
        raise InvalidInputError(f"unknown colour correction {method!r}")
    lf, lt = rgb_to_lab(face), rgb_to_lab(target)
    mf, sf = _stats(lf, mask)
    mt, st = _stats(lt, mask)
    gain = (st / sf.clamp_min(1e-3)).clamp_max(4.0)
    return lab_to_rgb((lf - mf) * gain + mt).clamp(0, 1)
