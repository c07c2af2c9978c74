"""Face detectors side by side: HOG + dlib's 5-point model against BlazeFace.

    python bench/detectors.py [--frames 24] [--repeats 5]

Accuracy on frames with ground truth:
- synthetic: 640x480 frames with 1-3 faces from facemux.models.synth (random people, poses
  and lighting, 90-220 px, rolled up to 15 degrees), landmarks from the renderer;
- real: skimage's astronaut as it is, mirrored, and a 1280x886 collage of it at four sizes
  (faces 40-110 px wide), ground truth HOG + the 5-point model on the original photo mapped along.

A face counts as found when a detection's box overlaps the dlib-like box around its true
landmarks by IoU >= 0.3; other detections are false positives. Landmark error: mean distance
of dlib's 5 points to the truth over the distance between the outer eye corners, on found
faces. HOG runs as the server runs it (frames shrunk to 640 px) and at full size, its best
case for small faces. "blazeface+dlib5" feeds BlazeFace's box to the 5-point model instead
of using its own fitted points. "blazeface" uses the server's default tiles (2);
"blazeface tiles=1" looks at the whole frame only.

Speed: milliseconds per 640x480 frame, one frame at a time and 8 per call (HOG runs the 8
one after another: it has no batch), the median of --repeats runs interleaved between the
detectors, all in one process.

    python bench/detectors.py --clients 8 [--calls 12] [--rounds 3] [--device cuda]

Batched detection alone: frames/s of N threads detecting at once through the server's
detection batcher (frames of concurrent callers share one network pass) against the bare
detector (one frame at a time through the network, as before the batcher), rounds
alternating in one process.
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import cv2
import numpy as np
import torch
from facemux.models import faces as fp
from facemux.models import synth
from facemux.models.faces.blazeface import BlazeFaceDetector
from facemux.service.settings import Settings
from numpy.typing import NDArray
from skimage import data

U8 = NDArray[np.uint8]
F32 = NDArray[np.float32]
Truth = list[F32]  # one (5, 2) landmark set per face


def _placement(cx: float, cy: float, size: float, roll: float) -> NDArray[np.float64]:
    t = math.radians(roll)
    a = size * np.array([[math.cos(t), -math.sin(t), 0.0], [math.sin(t), math.cos(t), 0.0]])
    a[:, 2] = np.array([cx, cy]) - a[:, :2] @ np.array([0.5, 0.5])
    return a


def synthetic(n: int, seed: int = 0) -> list[tuple[U8, Truth]]:
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        y = np.linspace(0, 1, 480, dtype=np.float32)[:, None, None]
        x = np.linspace(0, 1, 640, dtype=np.float32)[None, :, None]
        tint = rng.uniform(0.2, 1.0, 3)
        img = np.asarray(50 + 60 * y * tint + 50 * x * tint[::-1], dtype=np.uint8)
        truth: Truth = []
        slots = rng.permutation(3)[: 1 + int(rng.integers(3))]
        for s in slots:
            size = float(rng.uniform(90, 220))
            cx = 110 + 210 * float(s) + float(rng.uniform(-10, 10))
            cy = float(rng.uniform(size / 2 + 10, 480 - size / 2 - 10))
            state = synth.FaceState.random(rng)
            r = synth.render_into(
                img,
                synth.identity_from_seed(int(rng.integers(1_000_000))),
                state,
                _placement(cx, cy, size, float(rng.uniform(-15, 15))),
            )
            img = r.image
            truth.append(r.landmarks5.astype(np.float32))
        out.append((img, truth))
    return out


def real(hog: fp.HogDetector, lp5: fp.LandmarkPredictor) -> list[tuple[str, U8, Truth]]:
    photo = np.ascontiguousarray(data.astronaut())
    lm = lp5.predict(photo, hog.detect(photo)[0].box)
    w = photo.shape[1]
    mirrored = np.ascontiguousarray(photo[:, ::-1])
    lm_m = lm.copy()
    lm_m[:, 0] = w - 1 - lm_m[:, 0]
    lm_m = lm_m[[2, 3, 0, 1, 4]]  # the image-right eye is now the other one
    canvas = np.full((886, 1280, 3), 90, np.uint8)
    truth: Truth = []
    for side, (x0, y0) in zip(
        (640, 600, 240, 240), ((0, 0), (660, 0), (60, 640), (700, 640)), strict=True
    ):
        canvas[y0 : y0 + side, x0 : x0 + side] = cv2.resize(
            photo, (side, side), interpolation=cv2.INTER_AREA
        )
        f = side / w
        truth.append(((lm + 0.5) * f - 0.5 + np.array([x0, y0])).astype(np.float32))
    return [("astronaut", photo, [lm]), ("mirrored", mirrored, [lm_m]), ("collage", canvas, truth)]


@dataclass
class Score:
    truth: int = 0
    found: int = 0
    false: int = 0
    errors: list[float] | None = None

    def add(self, faces: Sequence[tuple[NDArray[np.floating], F32]], truth: Truth) -> None:
        self.errors = self.errors if self.errors is not None else []
        self.truth += len(truth)
        used: set[int] = set()
        for gt in truth:
            gbox = fp.box_from_landmarks(gt)
            best, best_iou = -1, 0.3
            for j, (box, _) in enumerate(faces):
                iou = fp.box_iou(np.asarray(box), gbox)
                if j not in used and iou >= best_iou:
                    best, best_iou = j, iou
            if best >= 0:
                used.add(best)
                self.found += 1
                eyes = float(np.linalg.norm(gt[0] - gt[2]))
                err = float(np.linalg.norm(faces[best][1] - gt, axis=1).mean())
                self.errors.append(err / eyes)
        self.false += len(faces) - len(used)

    def row(self) -> str:
        errs = self.errors or [math.nan]
        return (
            f"{self.found}/{self.truth} ({100 * self.found / max(1, self.truth):.0f}%) | "
            f"{self.false} | {statistics.mean(errs):.3f} | {max(errs):.3f}"
        )


Method = Callable[[Sequence[U8]], list[list[tuple[NDArray[np.floating], F32]]]]


def methods(
    hog: fp.HogDetector, lp5: fp.LandmarkPredictor, bf: BlazeFaceDetector
) -> dict[str, Method]:
    hog_full = fp.HogDetector(max_side=0, threshold=hog.threshold)
    whole = BlazeFaceDetector(device=bf.device, tiles=1)

    def hog5(frames: Sequence[U8]) -> list[list[tuple[NDArray[np.floating], F32]]]:
        return [[(f.box, lp5.predict(im, f.box)) for f in hog.detect(im)] for im in frames]

    def blaze(frames: Sequence[U8]) -> list[list[tuple[NDArray[np.floating], F32]]]:
        out = []
        for faces in bf.detect_batch(frames):
            out.append([(f.box, f.landmarks) for f in faces if f.landmarks is not None])
        return out

    def blaze_dlib(frames: Sequence[U8]) -> list[list[tuple[NDArray[np.floating], F32]]]:
        found = bf.detect_batch(frames)
        return [
            [(f.box, lp5.predict(im, f.box)) for f in fs]
            for im, fs in zip(frames, found, strict=True)
        ]

    def hog_full5(frames: Sequence[U8]) -> list[list[tuple[NDArray[np.floating], F32]]]:
        return [[(f.box, lp5.predict(im, f.box)) for f in hog_full.detect(im)] for im in frames]

    def blaze1(frames: Sequence[U8]) -> list[list[tuple[NDArray[np.floating], F32]]]:
        out = []
        for faces in whole.detect_batch(frames):
            out.append([(f.box, f.landmarks) for f in faces if f.landmarks is not None])
        return out

    return {
        "hog+dlib5": hog5,
        "hog full size+dlib5": hog_full5,
        "blazeface": blaze,
        "blazeface+dlib5": blaze_dlib,
        "blazeface tiles=1": blaze1,
    }


def concurrent_callers(
    frames: Sequence[U8], clients: int, calls: int, rounds: int, device: str, tiles: int
) -> None:
    """Frames/s of ``clients`` threads each detecting ``calls`` frames, through the
    detection batcher (their frames share network passes) and one at a time (the bare
    detector: its lock lets one frame through the network at a time, as the server did
    before the batcher). Rounds alternate, so load from other processes falls on both."""
    from facemux.service.detect_batcher import DetectionBatcher, DetectionStats

    det = BlazeFaceDetector(device=device, tiles=tiles)
    sizes: list[int] = []

    def observe(stats: DetectionStats) -> None:
        sizes.append(stats.frames)

    batcher = DetectionBatcher(det, max_frames=16, on_batch=observe)

    def run(detect: Callable[[U8], object]) -> float:
        def client(k: int) -> None:
            for i in range(calls):
                detect(frames[(k + i) % len(frames)])

        threads = [threading.Thread(target=client, args=(k,)) for k in range(clients)]
        t0 = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        return clients * calls / (time.perf_counter() - t0)

    run(batcher.detect)  # warm up both, and every batch size the batcher forms
    run(det.detect)
    rates: dict[str, list[float]] = {"batched": [], "one at a time": []}
    sizes.clear()
    for _ in range(rounds):
        rates["batched"].append(run(batcher.detect))
        rates["one at a time"].append(run(det.detect))
    batcher.close()
    print(
        f"\n| {clients} concurrent callers, {device}, tiles={tiles} | frames/s (median of "
        f"{rounds}) | frames per network pass |"
    )
    print("|---|---|---|")
    mean = sum(sizes) / max(1, len(sizes))
    print(f"| batched | {statistics.median(rates['batched']):.1f} | {mean:.1f} |")
    print(f"| one at a time | {statistics.median(rates['one at a time']):.1f} | 1 |")
    ratio = statistics.median(rates["batched"]) / statistics.median(rates["one at a time"])
    print(f"summary detection_batching clients={clients} {device} speedup {ratio:.2f}x")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--frames", type=int, default=24, help="synthetic frames")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument(
        "--threads", type=int, default=1, help="torch threads (dlib uses one; 0: torch's own)"
    )
    ap.add_argument(
        "--clients",
        type=int,
        default=0,
        help="only the concurrent-callers row: this many threads detecting at once",
    )
    ap.add_argument("--calls", type=int, default=12, help="frames per caller per round")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.clients:
        print(f"{os.cpu_count()} CPUs, torch threads {torch.get_num_threads()}")
        frames = [im for im, _ in synthetic(8)]
        concurrent_callers(
            frames, args.clients, args.calls, args.rounds, args.device, Settings().detector_tiles
        )
        return
    settings = Settings()
    hog = fp.HogDetector(max_side=settings.detector_max_side, threshold=settings.detector_threshold)
    lp5 = fp.LandmarkPredictor(5)
    bf = BlazeFaceDetector(tiles=settings.detector_tiles)
    print(f"{os.cpu_count()} CPUs, torch threads {torch.get_num_threads()}")

    synth_frames = synthetic(args.frames)
    photos = real(hog, lp5)
    print("\n| detector | set | found | false positives | landmark error mean | max |")
    print("|---|---|---|---|---|---|")
    for name, run in methods(hog, lp5, bf).items():
        s = Score()
        frames_in = [im for im, _ in synth_frames]
        for (_, truth), faces in zip(synth_frames, run(frames_in), strict=True):
            s.add(faces, truth)
        print(f"| {name} | synthetic ({args.frames} frames) | {s.row()} |")
        for label, im, truth in photos:
            r = Score()
            r.add(run([im])[0], truth)
            print(f"| {name} | {label} | {r.row()} |")

    frames = [im for im, _ in synth_frames[:8]]
    single = BlazeFaceDetector(tiles=1)
    timed: dict[str, Callable[[Sequence[U8]], object]] = {
        "hog (detect only)": lambda fs: [hog.detect(f) for f in fs],
        f"blazeface tiles={bf.tiles}": bf.detect_batch,
        "blazeface tiles=1": single.detect_batch,
    }
    print("\n| detector | ms/frame, batch 1 | ms/frame, batch 8 |")
    print("|---|---|---|")
    runs: dict[tuple[str, int], list[float]] = {(n, b): [] for n in timed for b in (1, 8)}
    for fn in timed.values():
        fn(frames[:1])  # warm up
    # Interleaved, so that load from other processes falls on every detector alike.
    for _ in range(args.repeats):
        for name, fn in timed.items():
            for batch in (1, 8):
                t0 = time.perf_counter()
                fn(frames[:batch])
                runs[(name, batch)].append((time.perf_counter() - t0) * 1000 / batch)
    for name in timed:
        one, eight = (statistics.median(runs[(name, b)]) for b in (1, 8))
        print(f"| {name} | {one:.1f} | {eight:.1f} |")


if __name__ == "__main__":
    main()
