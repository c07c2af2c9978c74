"""Training augmentation in torch, on whatever device the batch lives on.

All random numbers come from the caller's ``torch.Generator`` and are drawn on that
generator's device (a handful of scalars and a 5x5 grid per image), then moved to the
batch's device. So a CPU generator drives a CUDA batch, and the same seed gives the same
augmentation parameters on any device.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from .errors import InvalidInputError

__all__ = [
    "AugmentConfig",
    "TrainingPair",
    "colour_cast",
    "colour_jitter",
    "make_training_pair",
    "random_affine",
    "random_transform",
    "random_warp",
    "warp_field",
]

# faceswap perturbs its warp points by 5 px on a 256 px coverage; as a fraction of size.
DEFAULT_WARP_SCALE = 5.0 / 256.0


@dataclass(frozen=True)
class AugmentConfig:
    rotation: float = 10.0  # degrees, uniform in [-rotation, rotation]
    zoom: float = 0.05  # scale factor uniform in [1 - zoom, 1 + zoom]
    shift: float = 0.05  # fraction of the image size, each axis
    flip: float = 0.5  # probability of a horizontal flip
    warp_grid: int = 5
    warp_scale: float = DEFAULT_WARP_SCALE  # std of control-point moves, fraction of size
    brightness: float = 0.05
    contrast: float = 0.05
    saturation: float = 0.05
    # Colour cast on the encoder's input only (the target stays clean): a per-image gain
    # exp(uniform(-x, x)) and a per-channel tint exp(uniform(-x/2, x/2)). Decoders then learn
    # to draw their own person's skin whatever tone the input face has, as a swap needs.
    input_colour: float = 0.0

    def __post_init__(self) -> None:
        for name in ("rotation", "zoom", "shift", "warp_scale"):
            if getattr(self, name) < 0:
                raise InvalidInputError(f"augment {name} must be >= 0")
        for name in ("brightness", "contrast", "saturation"):
            if not 0 <= getattr(self, name) < 1:
                raise InvalidInputError(f"augment {name} must be in [0, 1)")
        if not 0.0 <= self.input_colour <= 1.0:
            raise InvalidInputError("augment input_colour must be in [0, 1]")
        if not 0.0 <= self.flip <= 1.0:
            raise InvalidInputError("augment flip is a probability in [0, 1]")
        if self.zoom >= 1:
            raise InvalidInputError("augment zoom must be < 1")
        if self.warp_grid < 2:
            raise InvalidInputError("augment warp_grid must be >= 2")


@dataclass
class TrainingPair:
    inputs: Tensor  # warped + transformed: what the encoder sees
    targets: Tensor  # transformed only: what the decoder must draw
    masks: Tensor | None  # targets' mask under the same transform


def _check_images(images: Tensor, what: str = "images") -> None:
    if images.dim() != 4 or not images.is_floating_point():
        raise InvalidInputError(
            f"{what} must be a float (N,C,H,W) tensor, got {images.dtype} {tuple(images.shape)}"
        )


def _uniform(n: int, bound: float, generator: torch.Generator, device: torch.device) -> Tensor:
    u = torch.rand(n, generator=generator, device=generator.device) * 2.0 - 1.0
    return (u * bound).to(device)


def _base_grid(n: int, h: int, w: int, device: torch.device) -> Tensor:
    """Pixel-centre coordinates in grid_sample's [-1, 1] convention (align_corners=False)."""
    ys = (torch.arange(h, device=device, dtype=torch.float32) + 0.5) * (2.0 / h) - 1.0
    xs = (torch.arange(w, device=device, dtype=torch.float32) + 0.5) * (2.0 / w) - 1.0
    gy, gx = torch.meshgrid(ys, xs, indexing="ij")
    return torch.stack((gx, gy), dim=-1).unsqueeze(0).expand(n, h, w, 2)


def _sample(images: Tensor, grid: Tensor) -> Tensor:
    # Border padding: replicating the edge looks like more face/background, whereas zeros
    # would teach the decoder to draw black corners.
    out = F.grid_sample(
        images, grid.to(images.dtype), mode="bilinear", padding_mode="border", align_corners=False
    )
    return out


def random_affine(
    n: int,
    generator: torch.Generator,
    rotation: float = 10.0,
    zoom: float = 0.05,
    shift: float = 0.05,
    flip: float = 0.5,
    device: torch.device | str | None = None,
) -> Tensor:
    """(n, 2, 3) affine_grid thetas: output coordinates -> input coordinates."""
    dev = torch.device(device) if device is not None else generator.device
    angle = _uniform(n, math.radians(rotation), generator, dev)
    scale = 1.0 + _uniform(n, zoom, generator, dev)
    tx = _uniform(n, 2.0 * shift, generator, dev)
    ty = _uniform(n, 2.0 * shift, generator, dev)
    flips = torch.rand(n, generator=generator, device=generator.device).to(dev) < flip
    fx = torch.where(flips, -1.0, 1.0)
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    row0 = torch.stack((cos * fx, -sin, tx), dim=1)
    row1 = torch.stack((sin * fx, cos, ty), dim=1)
    return torch.stack((row0, row1), dim=1)


def warp_field(
    n: int,
    size: tuple[int, int],
    generator: torch.Generator,
    grid: int = 5,
    scale: float = DEFAULT_WARP_SCALE,
    device: torch.device | str | None = None,
) -> Tensor:
    """Smooth random displacement (n, H, W, 2) in normalised units: a ``grid`` x ``grid``
    lattice of Gaussian moves, upsampled bicubically so the warp has no seams."""
    dev = torch.device(device) if device is not None else generator.device
    points = torch.randn(n, 2, grid, grid, generator=generator, device=generator.device)
    points = (points * (2.0 * scale)).to(dev)  # fraction of size -> [-1, 1] span of 2
    field = F.interpolate(points, size=size, mode="bicubic", align_corners=True)
    return field.permute(0, 2, 3, 1)


def random_warp(
    images: Tensor,
    generator: torch.Generator,
    grid: int = 5,
    scale: float = DEFAULT_WARP_SCALE,
) -> Tensor:
    """faceswap-style elastic warp of (N,C,H,W) float images."""
    _check_images(images)
    n, _, h, w = images.shape
    disp = warp_field(n, (h, w), generator, grid, scale, device=images.device)
    return _sample(images, _base_grid(n, h, w, images.device) + disp)


def _apply_affine(grid: Tensor, theta: Tensor) -> Tensor:
    # grid (N,H,W,2) @ theta[:, :, :2]^T + t  ==  what affine_grid does to its base grid.
    lin = theta[:, :, :2].transpose(1, 2).unsqueeze(1)  # (N,1,2,2)
    return torch.matmul(grid, lin) + theta[:, :, 2].view(-1, 1, 1, 2)


def random_transform(
    images: Tensor,
    generator: torch.Generator,
    rotation: float = 10.0,
    zoom: float = 0.05,
    shift: float = 0.05,
    flip: float = 0.5,
    masks: Tensor | None = None,
) -> tuple[Tensor, Tensor | None]:
    """Random rotation/zoom/shift/flip; ``masks`` (N,1,H,W) get the identical transform."""
    _check_images(images)
    n, c, h, w = images.shape
    if masks is not None:
        _check_images(masks, "masks")
        if masks.shape[0] != n or masks.shape[2:] != images.shape[2:]:
            raise InvalidInputError(
                f"masks {tuple(masks.shape)} do not match images {tuple(images.shape)}"
            )
    theta = random_affine(n, generator, rotation, zoom, shift, flip, device=images.device)
    grid = _apply_affine(_base_grid(n, h, w, images.device), theta)
    src = images if masks is None else torch.cat((images, masks.to(images.dtype)), dim=1)
    out = _sample(src, grid)
    if masks is None:
        return out, None
    return out[:, :c], out[:, c:]


def colour_jitter(
    images: Tensor,
    generator: torch.Generator,
    brightness: float = 0.05,
    contrast: float = 0.05,
    saturation: float = 0.05,
) -> Tensor:
    """Per-image brightness shift, contrast and saturation scale of RGB in [0, 1]."""
    _check_images(images)
    n = images.shape[0]
    dev = images.device
    b = _uniform(n, brightness, generator, dev).view(n, 1, 1, 1)
    c = (1.0 + _uniform(n, contrast, generator, dev)).view(n, 1, 1, 1)
    s = (1.0 + _uniform(n, saturation, generator, dev)).view(n, 1, 1, 1)
    mean = images.mean(dim=(1, 2, 3), keepdim=True)
    out = (images - mean) * c + mean + b
    if images.shape[1] == 3:
        luma = (out * out.new_tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)).sum(1, keepdim=True)
        out = luma + (out - luma) * s
    return out.clamp(0.0, 1.0)


def colour_cast(images: Tensor, generator: torch.Generator, strength: float) -> Tensor:
    """Per-image gain exp(uniform(-strength, strength)) times per-channel tint (half that
    range) of RGB in [0, 1]: a face of one skin tone made to look like another's."""
    _check_images(images)
    n, c = images.shape[:2]
    dev = images.device
    gain = _uniform(n, strength, generator, dev).view(n, 1, 1, 1)
    tint = _uniform(n * c, strength / 2.0, generator, dev).view(n, c, 1, 1)
    return (images * torch.exp(gain + tint)).clamp(0.0, 1.0)


def make_training_pair(
    images: Tensor,
    generator: torch.Generator,
    config: AugmentConfig | None = None,
    warp: bool = True,
    masks: Tensor | None = None,
) -> TrainingPair:
    """(warped + transformed input, transformed clean target[, transformed mask]).

    The input is sampled once through the composed warp-then-transform grid rather than
    resampled twice, so it is no blurrier than the target.
    """
    cfg = config or AugmentConfig()
    _check_images(images)
    n, c, h, w = images.shape
    if masks is not None:
        _check_images(masks, "masks")
        if masks.shape[0] != n or masks.shape[2:] != images.shape[2:]:
            raise InvalidInputError(
                f"masks {tuple(masks.shape)} do not match images {tuple(images.shape)}"
            )
    dev = images.device
    if cfg.brightness or cfg.contrast or cfg.saturation:
        images = colour_jitter(images, generator, cfg.brightness, cfg.contrast, cfg.saturation)
    theta = random_affine(n, generator, cfg.rotation, cfg.zoom, cfg.shift, cfg.flip, device=dev)
    base = _base_grid(n, h, w, dev)
    src = images if masks is None else torch.cat((images, masks.to(images.dtype)), dim=1)
    target_all = _sample(src, _apply_affine(base, theta))
    targets = target_all[:, :c]
    out_masks = target_all[:, c:] if masks is not None else None
    if warp:
        disp = warp_field(n, (h, w), generator, cfg.warp_grid, cfg.warp_scale, device=dev)
        inputs = _sample(images, _apply_affine(base + disp, theta))
    else:
        inputs = targets
    if cfg.input_colour:
        inputs = colour_cast(inputs, generator, cfg.input_colour)
    return TrainingPair(inputs=inputs, targets=targets, masks=out_masks)
