"""Running the encoder and decoders on batches of aligned faces (no training here)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from facemux.models.imageio import resize_square
from facemux.models.networks import Decoder, Encoder
from facemux.models.pixels import images_to_unit, to_uint8
from torch import Tensor


def pick_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device {name} was asked for but CUDA is not available")
    return dev


def stack_faces(faces: Sequence[np.ndarray], resolution: int) -> tuple[np.ndarray, list[bool]]:
    """RGB uint8 crops of any size -> (N,R,R,3) uint8 at the model's size, and which were
    resized."""
    resized = []
    batch = np.empty((len(faces), resolution, resolution, 3), dtype=np.uint8)
    for i, face in enumerate(faces):
        batch[i], was = resize_square(face, resolution)
        resized.append(was)
    return batch, resized


def faces_to_tensor(
    faces: Sequence[np.ndarray], resolution: int, device: torch.device
) -> tuple[Tensor, list[bool]]:
    """RGB uint8 crops of any size -> (N,3,R,R) float in [0,1], and which were resized."""
    batch, resized = stack_faces(faces, resolution)
    x = images_to_unit(torch.from_numpy(batch).to(device))
    return x, resized


def tensor_to_images(x: Tensor) -> np.ndarray:
    """(N,C,H,W) in [0,1] -> (N,H,W,C) uint8, C squeezed away when it is 1."""
    out = to_uint8(x.detach()).permute(0, 2, 3, 1)
    arr = out.cpu().numpy()
    return arr[..., 0] if arr.shape[-1] == 1 else arr


@torch.inference_mode()
def encode(encoder: Encoder, x: Tensor) -> Tensor:
    return encoder(x)


@torch.inference_mode()
def decode(decoder: Decoder, z: Tensor) -> tuple[Tensor, Tensor | None]:
    return decoder(z)


def module_bytes(module: torch.nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in module.state_dict().values())
