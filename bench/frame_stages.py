"""Where the time goes when one frame is face-swapped on this machine, stage by stage.

    python bench/frame_stages.py [--runs 15] [--threads 1] [--points 5] [--blend feather]

Frames: 640x480 and 1920x1080 JPEGs with one synthetic face each, and skimage's astronaut
(512x512, a real photo). The model is the "tiny" preset with random weights, run through
facemux.models.inference exactly as the service runs it (its mask head supplies the mask).
Each column is the median over --runs runs after one warm-up run; stages are those of
FaceSwapper.swap plus decoding and encoding the JPEG around it.

Threads: by default OpenCV and torch get 1 thread each, the cost of one request on one
core (the server runs requests side by side; dlib is single-threaded anyway).
"""

from __future__ import annotations

import argparse
import math
import statistics
import time
from collections.abc import Callable

import cv2
import numpy as np
import torch
from facemux.models import inference, synth
from facemux.models.config import get_preset
from facemux.models.faces import STAGES, FaceSwapper, HogDetector, LandmarkPredictor, SwapOptions
from facemux.models.imageio import decode_image, encode_image
from facemux.models.networks import build_decoder, build_encoder
from numpy.typing import NDArray

ROWS = ("decode", *STAGES, "encode")
MAX_PIXELS = 40_000_000


def synthetic_frame(width: int, height: int, face_px: float, seed: int = 6) -> NDArray[np.uint8]:
    """A frame with one synthetic face whose crop is ``face_px`` wide, slightly off centre."""
    y = np.linspace(0.0, 1.0, height, dtype=np.float32)[:, None, None]
    x = np.linspace(0.0, 1.0, width, dtype=np.float32)[None, :, None]
    bg = np.asarray(70 + 60 * y * np.array([1.0, 0.7, 0.4]) + 40 * x, dtype=np.uint8)
    t = math.radians(6.0)
    a = face_px * np.array([[math.cos(t), -math.sin(t), 0.0], [math.sin(t), math.cos(t), 0.0]])
    a[:, 2] = np.array([0.45 * width, 0.5 * height]) - a[:, :2] @ np.array([0.5, 0.5])
    return synth.render_into(bg, synth.identity_from_seed(seed), synth.FaceState(), a).image


def astronaut() -> NDArray[np.uint8]:
    from skimage import data

    return np.ascontiguousarray(data.astronaut())


def make_model(preset: str) -> Callable[[list[NDArray[np.uint8]]], tuple[list, list | None]]:
    cfg = get_preset(preset)
    encoder, decoder = build_encoder(cfg, seed=1).eval(), build_decoder(cfg, seed=2).eval()
    device = torch.device("cpu")

    def swap_crops(crops: list[NDArray[np.uint8]]) -> tuple[list, list | None]:
        x, _ = inference.faces_to_tensor(crops, cfg.resolution, device)
        rgb, mask = inference.decode(decoder, inference.encode(encoder, x))
        faces = list(inference.tensor_to_images(rgb))
        masks = None if mask is None else list(inference.tensor_to_images(mask))
        return faces, masks

    return swap_crops


def measure(
    jpeg: bytes,
    swapper: FaceSwapper,
    model: Callable[[list[NDArray[np.uint8]]], tuple[list, list | None]],
    options: SwapOptions,
    runs: int,
) -> tuple[dict[str, float], int]:
    samples: dict[str, list[float]] = {row: [] for row in ROWS}
    faces = 0
    for i in range(runs + 1):
        t0 = time.perf_counter()
        rgb = decode_image(jpeg, MAX_PIXELS).rgb
        t1 = time.perf_counter()
        result = swapper.swap(rgb, model, options)
        t2 = time.perf_counter()
        encode_image(result.frame, "JPEG", quality=90)
        t3 = time.perf_counter()
        if i == 0:  # warm-up: first-call allocations, OpenCV's lazy tables
            faces = sum(f.swapped for f in result.faces)
            continue
        samples["decode"].append(t1 - t0)
        samples["encode"].append(t3 - t2)
        for stage in STAGES:
            samples[stage].append(result.timings[stage])
    return {row: statistics.median(v) for row, v in samples.items()}, faces


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--runs", type=int, default=15, help="timed runs per frame (median)")
    parser.add_argument("--threads", type=int, default=1, help="OpenCV and torch threads")
    parser.add_argument("--points", type=int, default=5, choices=(5, 68), help="landmarks")
    parser.add_argument("--blend", default="feather", choices=("feather", "seamless"))
    parser.add_argument("--colour", default="reinhard", choices=("none", "average", "reinhard"))
    parser.add_argument("--preset", default="tiny", help="model preset (random weights)")
    args = parser.parse_args(argv)

    cv2.setNumThreads(args.threads)
    torch.set_num_threads(args.threads)
    cfg = get_preset(args.preset)
    frames = {
        "640x480 synth": synthetic_frame(640, 480, 240.0),
        "1920x1080 synth": synthetic_frame(1920, 1080, 600.0),
        "512x512 astronaut": astronaut(),
    }
    swapper = FaceSwapper(HogDetector(), LandmarkPredictor(args.points))
    model = make_model(args.preset)
    options = SwapOptions(crop_size=cfg.resolution, blend=args.blend, colour=args.colour)

    columns: dict[str, dict[str, float]] = {}
    swapped: dict[str, int] = {}
    for name, rgb in frames.items():
        jpeg = encode_image(rgb, "JPEG", quality=90)
        columns[name], swapped[name] = measure(jpeg, swapper, model, options, args.runs)

    width = max(len(n) for n in columns) + 2
    print(
        f"per-stage median ms over {args.runs} runs; {args.threads} OpenCV/torch thread(s), "
        f"HOG detector (max_side 640), {args.points}-point landmarks, {args.preset} model "
        f"({cfg.resolution} px), {args.colour} colour, {args.blend} blend"
    )
    print(f"{'stage':<12}" + "".join(f"{n:>{width}}" for n in columns))
    for row in ROWS:
        print(f"{row:<12}" + "".join(f"{1000 * c[row]:>{width}.2f}" for c in columns.values()))
    print(f"{'faces':<12}" + "".join(f"{swapped[n]:>{width}d}" for n in columns))
    totals = {n: sum(c.values()) for n, c in columns.items()}
    print(f"{'total':<12}" + "".join(f"{1000 * t:>{width}.2f}" for t in totals.values()))
    summary = ", ".join(
        f"{n}: {1000 * t:.1f} ms = {1 / t:.1f} frames/s "
        f"(detect {100 * columns[n]['detect'] / t:.0f} %)"
        for n, t in totals.items()
    )
    print(f"summary: {summary}")


if __name__ == "__main__":
    main()
