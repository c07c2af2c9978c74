"""Reconstruction losses: the DeepFaceLab recipe of 10*DSSIM + 10*MSE, optionally masked,
emphasis-weighted, with an L1 term and a mask-head term.

Everything is computed in float32 whatever the prediction's dtype, so the loss is the
same under bf16 autocast.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from .errors import InvalidInputError

__all__ = [
    "LossWeights",
    "auto_ssim_window",
    "identity_confusion",
    "landmark_weight_map",
    "loss_terms",
    "psnr_from_mse",
    "reconstruction_loss",
    "ssim",
]

_EPS = 1e-8


@dataclass(frozen=True)
class LossWeights:
    dssim: float = 10.0
    mse: float = 10.0
    l1: float = 0.0
    mask: float = 10.0


def auto_ssim_window(size: int) -> int:
    """Odd Gaussian window about size/11.6 (DFL's choice; 5 at 64 px, 11 at 128 px),
    clamped to [3, 11]: 11 px at 64 px would average away the eyes."""
    w = int(size / 11.6)
    w = w if w % 2 == 1 else w - 1
    return max(3, min(11, w))


def _gaussian_kernel(window: int, sigma: float, channels: int, device: torch.device) -> Tensor:
    x = torch.arange(window, dtype=torch.float32, device=device) - (window - 1) / 2.0
    g = torch.exp(-(x**2) / (2.0 * sigma**2))
    g = g / g.sum()
    return g.view(1, 1, 1, window).expand(channels, 1, 1, window)


def _blur(x: Tensor, kernel: Tensor) -> Tensor:
    """Separable depthwise Gaussian, 'valid' padding."""
    c = x.shape[1]
    x = F.conv2d(x, kernel, groups=c)
    return F.conv2d(x, kernel.transpose(2, 3), groups=c)


def _ssim_map(a: Tensor, b: Tensor, window: int, sigma: float, data_range: float) -> Tensor:
    _, c, h, w = a.shape
    if min(h, w) < window:
        raise InvalidInputError(f"images of {h}x{w} are smaller than the SSIM window {window}")
    kernel = _gaussian_kernel(window, sigma, 5 * c, a.device)
    # One depthwise pass over all five moments instead of five convolutions.
    stats = _blur(torch.cat((a, b, a * a, b * b, a * b), dim=1), kernel)
    mu_a, mu_b, e_aa, e_bb, e_ab = stats.split(c, dim=1)
    var_a = e_aa - mu_a * mu_a
    var_b = e_bb - mu_b * mu_b
    cov = e_ab - mu_a * mu_b
    c1 = (0.01 * data_range) ** 2
    c2 = (0.03 * data_range) ** 2
    num = (2 * mu_a * mu_b + c1) * (2 * cov + c2)
    den = (mu_a * mu_a + mu_b * mu_b + c1) * (var_a + var_b + c2)
    return (num / den).mean(dim=1, keepdim=True)  # (N,1,h',w')


def ssim(
    a: Tensor,
    b: Tensor,
    window: int | None = None,
    sigma: float = 1.5,
    data_range: float = 1.0,
    weights: Tensor | None = None,
) -> Tensor:
    """Per-image mean SSIM, shape (N,). ``weights`` (N or 1, 1, H, W) turns the mean into
    a weighted mean (the weight map is blurred by the same window as the statistics)."""
    _check_pair(a, b)
    a32, b32 = a.float(), b.float()
    win = window if window is not None else auto_ssim_window(min(a.shape[-2:]))
    if win < 1 or win % 2 == 0:
        raise InvalidInputError(f"SSIM window must be a positive odd integer, got {win}")
    smap = _ssim_map(a32, b32, win, sigma, data_range)
    if weights is None:
        return smap.mean(dim=(1, 2, 3))
    w = _as_weight(weights, a, "weights")
    w = _blur(w.expand(a.shape[0], 1, *a.shape[-2:]), _gaussian_kernel(win, sigma, 1, a.device))
    return (smap * w).sum(dim=(1, 2, 3)) / (w.sum(dim=(1, 2, 3)) + _EPS)


def _check_pair(a: Tensor, b: Tensor) -> None:
    if a.dim() != 4 or a.shape != b.shape:
        raise InvalidInputError(
            f"expected two (N,C,H,W) tensors of one shape, got {tuple(a.shape)} and "
            f"{tuple(b.shape)}"
        )


def _as_weight(w: Tensor, like: Tensor, what: str) -> Tensor:
    """Normalise a per-pixel map to float32 (N or 1, 1, H, W) on ``like``'s device."""
    if w.dim() == 2:
        w = w.view(1, 1, *w.shape)
    elif w.dim() == 3:
        w = w.unsqueeze(1)
    if w.dim() != 4 or w.shape[1] != 1 or w.shape[-2:] != like.shape[-2:]:
        raise InvalidInputError(
            f"{what} must be a (N,1,H,W) map matching {tuple(like.shape)}, got {tuple(w.shape)}"
        )
    if w.shape[0] not in (1, like.shape[0]):
        raise InvalidInputError(f"{what} has batch {w.shape[0]}, images have {like.shape[0]}")
    return w.to(device=like.device, dtype=torch.float32)


def loss_terms(
    pred: Tensor,
    target: Tensor,
    mask: Tensor | None = None,
    pred_mask: Tensor | None = None,
    target_mask: Tensor | None = None,
    weights: Tensor | None = None,
    terms: LossWeights | None = None,
    window: int | None = None,
) -> dict[str, Tensor]:
    """The loss as 0-dim tensors: raw ``dssim``, ``mse``, optional ``l1`` and ``mask_mse``,
    and the weighted ``total`` to backpropagate. No host sync, so a training loop can
    defer reading them."""
    _check_pair(pred, target)
    tw = terms or LossWeights()
    p, t = pred.float(), target.float()
    pixel_w: Tensor | None = None
    if mask is not None:
        m = _as_weight(mask, p, "mask")
        # DFL's masked training: outside the face neither image counts, so the decoder
        # spends no capacity on background.
        p, t = p * m, t * m
        pixel_w = m
    if weights is not None:
        ew = _as_weight(weights, p, "weights")
        pixel_w = ew if pixel_w is None else pixel_w * ew

    out: dict[str, Tensor] = {}
    c = p.shape[1]
    sq = (p - t).square()
    if pixel_w is None:
        out["mse"] = sq.mean()
    else:
        # Weighted mean rather than mean of weighted: the loss scale does not depend on
        # how much of the crop the mask covers or how strong the emphasis is.
        pw = pixel_w.expand(p.shape[0], 1, *p.shape[-2:])
        out["mse"] = (sq * pw).sum() / (pw.sum() * c + _EPS)
    out["dssim"] = ((1.0 - ssim(p, t, window=window, weights=pixel_w)) / 2.0).mean()
    total = tw.dssim * out["dssim"] + tw.mse * out["mse"]
    if tw.l1:
        ab = (p - t).abs()
        if pixel_w is None:
            out["l1"] = ab.mean()
        else:
            pw = pixel_w.expand(p.shape[0], 1, *p.shape[-2:])
            out["l1"] = (ab * pw).sum() / (pw.sum() * c + _EPS)
        total = total + tw.l1 * out["l1"]
    if pred_mask is not None and target_mask is not None:
        if pred_mask.shape != target_mask.shape:
            raise InvalidInputError(
                f"pred_mask {tuple(pred_mask.shape)} and target_mask "
                f"{tuple(target_mask.shape)} differ in shape"
            )
        out["mask_mse"] = (pred_mask.float() - target_mask.float()).square().mean()
        total = total + tw.mask * out["mask_mse"]
    out["total"] = total
    return out


def reconstruction_loss(
    pred: Tensor,
    target: Tensor,
    mask: Tensor | None = None,
    pred_mask: Tensor | None = None,
    target_mask: Tensor | None = None,
    weights: Tensor | None = None,
    terms: LossWeights | None = None,
    window: int | None = None,
) -> tuple[Tensor, dict[str, float]]:
    """(total loss to backpropagate, its components as floats).

    ``mask`` restricts the RGB loss to the face; ``pred_mask``/``target_mask`` add a mask
    head term; ``weights`` is a per-pixel emphasis map (see ``landmark_weight_map``).
    """
    parts = loss_terms(pred, target, mask, pred_mask, target_mask, weights, terms, window)
    names = list(parts)
    # One device->host copy for all components instead of one per .item().
    values = torch.stack([parts[k].detach() for k in names]).tolist()
    return parts["total"], dict(zip(names, values, strict=True))


# dlib/iBUG 68-point indices.
_RIGHT_EYE = list(range(36, 42))
_LEFT_EYE = list(range(42, 48))
_MOUTH = list(range(48, 60))
_RIGHT_BROW = list(range(17, 22))
_LEFT_BROW = list(range(22, 27))


def landmark_weight_map(
    landmarks68: Tensor | np.ndarray,
    size: int,
    eyes: float = 3.0,
    mouth: float = 2.0,
    base: float = 1.0,
    grow: float = 0.04,
    brows: float | None = None,
) -> Tensor:
    """Emphasis map (N,1,size,size) float32: ``eyes`` inside the eye hulls, ``mouth``
    inside the mouth hull, ``brows`` (None: ``base``) inside the brow hulls, ``base``
    elsewhere. Landmarks are (68,2) or (N,68,2) pixel
    (x, y) coordinates in the aligned size x size crop; hulls are grown by ``grow`` x size
    so the eyelids and lip edges are included."""
    import cv2  # only this helper needs OpenCV

    pts = (
        landmarks68.detach().cpu().numpy()
        if isinstance(landmarks68, Tensor)
        else np.asarray(landmarks68)
    )
    if pts.ndim == 2:
        pts = pts[None]
    if pts.ndim != 3 or pts.shape[1:] != (68, 2):
        raise InvalidInputError(f"landmarks must be (68,2) or (N,68,2), got {pts.shape}")
    if not np.all(np.isfinite(pts)):
        raise InvalidInputError("landmarks contain NaN or infinity")
    if size < 1:
        raise InvalidInputError(f"size must be positive, got {size}")
    radius = max(0, round(grow * size))
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * radius + 1, 2 * radius + 1))
    out = np.full((pts.shape[0], 1, size, size), base, dtype=np.float32)
    for i, face in enumerate(pts):
        parts = [(_MOUTH, mouth), (_RIGHT_EYE, eyes), (_LEFT_EYE, eyes)]
        if brows is not None:
            parts += [(_RIGHT_BROW, brows), (_LEFT_BROW, brows)]
        for idx, value in parts:
            canvas = np.zeros((size, size), dtype=np.uint8)
            hull = cv2.convexHull(np.round(face[idx]).astype(np.int32))
            cv2.fillConvexPoly(canvas, hull, 1)
            region = cv2.dilate(canvas, kernel) if radius else canvas
            sel = np.asarray(region).astype(bool)
            out[i, 0][sel] = np.maximum(out[i, 0][sel], value)
    return torch.from_numpy(out)


def identity_confusion(logits: Tensor) -> Tensor:
    """How far a latent critic's guesses (N, K) are from a uniform guess: the cross-entropy
    against uniform minus its floor log K, so 0 means the critic cannot tell the identities
    apart. Minimised by the encoder (the critic itself minimises plain cross-entropy)."""
    if logits.dim() != 2 or logits.shape[1] < 2:
        raise InvalidInputError(f"logits must be (N, K>=2), got {tuple(logits.shape)}")
    logp = F.log_softmax(logits.float(), dim=1)
    return -logp.mean(dim=1).mean() - math.log(logits.shape[1])


def psnr_from_mse(mse: float) -> float:
    """PSNR in dB of an MSE measured on [0, 1] images."""
    return float("inf") if mse <= 0 else -10.0 * math.log10(mse)
