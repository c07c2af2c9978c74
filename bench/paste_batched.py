"""Paste-back of one frame's faces on the tensor path: one batched inverse warp
(``paste_faces_t``) against the face-by-face loop (``paste_face_t``), on the CPU device.

    python bench/paste_batched.py [--runs 21] [--threads 1] [--size 128] [--device cpu]

Faces sit on a 4x4 grid, each a quarter of the frame's height (neighbours overlap a little),
with soft round masks, as the model's output size ``--size``. The two ways run alternately
in one process (which goes first alternates), each timed per frame; the table gives medians
in milliseconds.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import cv2
import numpy as np
import torch
from facemux.models.faces.tensor import paste_face_t, paste_faces_t
from numpy.typing import NDArray

FRAMES = ((640, 480), (1920, 1080))
COUNTS = (1, 4, 16)


def matrices(n: int, w: int, h: int, size: int) -> list[NDArray[np.float64]]:
    """Frame -> crop matrices of ``n`` faces on a 4x4 grid, each ``h / 4`` px wide."""
    side = h / 4.0
    k = size / side
    out = []
    for j in range(n):
        gx, gy = j % 4, j // 4
        x0 = (w - 4 * side) / 2 + gx * side * 0.95 + 2
        y0 = gy * side * 0.95 + 2
        out.append(np.array([[k, 0.0, -k * x0], [0.0, k, -k * y0]]))
    return out


def inputs(n: int, size: int, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    rng = np.random.default_rng(0)
    faces = torch.from_numpy(rng.random((n, 3, size, size), dtype=np.float32)).to(device)
    mask = np.zeros((size, size), np.float32)
    cv2.circle(mask, (size // 2, size // 2), int(size * 0.4), 1.0, -1)
    mask = np.asarray(cv2.GaussianBlur(mask, (0, 0), size / 20), np.float32)
    mask[mask < 1e-3] = 0
    masks = torch.from_numpy(np.stack([mask] * n))[:, None].to(device)
    return faces, masks


def timed(fn: Callable[[], torch.Tensor], device: str) -> float:
    t0 = time.perf_counter()
    fn()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=21)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print("| frame | faces | per face (ms) | batched (ms) | ratio | max abs diff |")
    print("|---|---:|---:|---:|---:|---:|")
    for w, h in FRAMES:
        frame = torch.rand((3, h, w), device=args.device)
        for n in COUNTS:
            ms = matrices(n, w, h, args.size)
            faces, masks = inputs(n, args.size, args.device)

            def loop(
                frame: torch.Tensor = frame,
                faces: torch.Tensor = faces,
                masks: torch.Tensor = masks,
                ms: list[NDArray[np.float64]] = ms,
            ) -> torch.Tensor:
                out = frame
                for j, m in enumerate(ms):
                    out = paste_face_t(out, faces[j], masks[j], m)
                return out

            def batched(
                frame: torch.Tensor = frame,
                faces: torch.Tensor = faces,
                masks: torch.Tensor = masks,
                ms: list[NDArray[np.float64]] = ms,
            ) -> torch.Tensor:
                return paste_faces_t(frame, faces, masks, ms)

            diff = float((loop() - batched()).abs().max())
            a: list[float] = []
            b: list[float] = []
            for i in range(args.runs):
                # Which goes first alternates: the second one finds the allocator warm.
                if i % 2:
                    a.append(timed(loop, args.device))
                    b.append(timed(batched, args.device))
                else:
                    b.append(timed(batched, args.device))
                    a.append(timed(loop, args.device))
            ta, tb = statistics.median(a) * 1e3, statistics.median(b) * 1e3
            print(f"| {w}x{h} | {n} | {ta:.2f} | {tb:.2f} | {ta / tb:.2f}x | {diff:.1e} |")


if __name__ == "__main__":
    main()
