"""JPEG decode and encode of video frames: OpenCV on one host core against nvjpeg on the GPU
(through facemux's batched codec, and torchvision's list call as the bare baseline), one run.

    python bench/jpeg_codec.py [--frames 64] [--clients 16]

Without CUDA and torchvision only the OpenCV rows are printed.
"""

from __future__ import annotations

import argparse
import statistics
import threading
import time
from collections.abc import Callable

import cv2
import numpy as np
import torch
from facemux.models import imageio
from facemux.models.faces import gpu_codec


def per_frame_ms(fn: Callable[[], object], n: int) -> float:
    fn()
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) / n)
    return 1000 * statistics.median(times)


def concurrent_ms(fn: Callable[[int], object], n: int, clients: int) -> float:
    """Per-frame time when `clients` threads share `n` calls of `fn`."""

    def run() -> None:
        ts = [
            threading.Thread(target=lambda k=k: [fn(i) for i in range(k, n, clients)])
            for k in range(clients)
        ]
        for t in ts:
            t.start()
        for t in ts:
            t.join()

    return per_frame_ms(run, n)


def bench_size(
    w: int, h: int, args: argparse.Namespace, codec: gpu_codec.JpegCodec | None
) -> list[tuple[str, str, float, float, int]]:
    rng = np.random.default_rng(0)
    # Smooth content with some detail: closer to video than noise (which JPEG hates).
    base = cv2.resize(rng.integers(0, 256, (h // 16, w // 16, 3), np.uint8), (w, h))
    frame = np.clip(base + rng.normal(0, 4, base.shape), 0, 255).astype(np.uint8)
    data = imageio.encode_image(frame, "JPEG", args.quality)
    n, q, size = args.frames, args.quality, f"{w}x{h}"
    rows = [
        (
            size,
            "OpenCV, 1 core",
            per_frame_ms(lambda: [imageio.decode_image(data, 10**8) for _ in range(n)], n),
            per_frame_ms(lambda: [imageio.encode_image(frame, "JPEG", q) for _ in range(n)], n),
            len(imageio.encode_image(frame, "JPEG", q)),
        )
    ]
    if codec is None:
        return rows
    import torchvision.io as tvio

    dev = codec.decode(data, 10**8)
    blobs = [torch.frombuffer(bytearray(data), dtype=torch.uint8)] * n

    def bare_decode() -> None:
        tvio.decode_jpeg(blobs, mode=tvio.ImageReadMode.RGB, device="cuda")
        torch.cuda.synchronize()

    def bare_encode() -> None:
        tvio.encode_jpeg([dev] * n, quality=q)
        torch.cuda.synchronize()

    nbytes = len(codec.encode(dev, q))  # 4:4:4 chroma: larger than OpenCV's 4:2:0
    bare = (per_frame_ms(bare_decode, n), per_frame_ms(bare_encode, n), nbytes)
    rows.append((size, f"nvjpeg, one list of {n}", *bare))
    rows.append(
        (
            size,
            f"nvjpeg, facemux codec, {args.clients} threads",
            concurrent_ms(lambda _i: codec.decode(data, 10**8), n, args.clients),
            concurrent_ms(lambda _i: codec.encode(dev, q), n, args.clients),
            nbytes,
        )
    )
    rows.append(
        (
            size,
            "nvjpeg, facemux codec, 1 thread",
            per_frame_ms(lambda: [codec.decode(data, 10**8) for _ in range(n)], n),
            per_frame_ms(lambda: [codec.encode(dev, q) for _ in range(n)], n),
            nbytes,
        )
    )
    return rows


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--frames", type=int, default=64)
    p.add_argument("--clients", type=int, default=16, help="threads calling the batched codec")
    p.add_argument("--quality", type=int, default=90)
    args = p.parse_args()
    cv2.setNumThreads(1)
    codec = gpu_codec.JpegCodec("cuda", max_batch=64) if gpu_codec.available("cuda") else None
    rows = [r for w, h in ((640, 480), (1920, 1080)) for r in bench_size(w, h, args, codec)]
    print(f"{'frame':10s} {'codec':40s} {'decode ms':>10s} {'encode ms':>10s} {'file KB':>8s}")
    for size, name, d, e, b in rows:
        print(f"{size:10s} {name:40s} {d:10.3f} {e:10.3f} {b / 1024:8.0f}")
    summary = {f"{s} {n}": (round(d, 3), round(e, 3)) for s, n, d, e, _ in rows}
    print(f"summary: per-frame (decode ms, encode ms) {summary}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
