"""Full-frame swap quality, through the real server and client.

    facemux demo                                   # trains avery and blake, leaves a store
    python bench/frame_quality.py --store facemux-demo/store

1. Real photo (skimage's astronaut): the face is found; pixels change only near it; the
   landmarks re-detected on the swapped photo stay within a few pixels of the original's
   (the swap keeps the pose).
2. Synthetic frames: person A composited into a 640x480 background at a known place, its
   ground-truth landmarks sent by the caller, swapped to B; the face region is scored (PSNR,
   SSIM) against B rendered in the same state at the same place, and against the unswapped
   input as the baseline.
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

import cv2
import numpy as np
from facemux.client import FacemuxClient
from facemux.models import faces as facelib
from facemux.models import synth
from facemux.service.server import ServerThread
from facemux.service.settings import Settings
from facemux.v1 import swap_service_pb2 as spb
from facemux.v1 import types_pb2 as tpb
from skimage import data
from skimage.metrics import structural_similarity

A_SEED, B_SEED = 5, 4  # the demo's avery and blake


def _png(rgb: np.ndarray) -> bytes:
    return bytes(cv2.imencode(".png", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))[1].tobytes())


def _decode(b: bytes) -> np.ndarray:
    img = cv2.imdecode(np.frombuffer(b, np.uint8), cv2.IMREAD_COLOR)
    if img is None:
        raise ValueError("the server returned an undecodable frame")
    return cv2.cvtColor(img, cv2.COLOR_BGR2RGB)


def _psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return 99.0 if mse == 0 else 10 * float(np.log10(255**2 / mse))


def astronaut(client: FacemuxClient, identity: str) -> None:
    img = data.astronaut()
    res = client.swap_image(
        _png(img),
        identity,
        output_format="png",
        options=spb.SwapOptions(selection=spb.FACE_SELECTION_LARGEST),
    )
    assert res.frame is not None
    out = _decode(res.frame)
    face = next(r for r in res.response.results if r.swapped)
    box = np.array([face.box.x_min, face.box.y_min, face.box.x_max, face.box.y_max])
    changed = np.any(out != img, axis=2)
    ys, xs = np.nonzero(changed)
    detector, landmarks = facelib.HogDetector(), facelib.LandmarkPredictor(5)
    before = landmarks.predict(img, box)
    found = detector.detect(out)
    after = landmarks.predict(out, found[0].box if found else box)
    shift = np.linalg.norm(after - before, axis=1)
    print("astronaut (512x512)")
    print(
        f"  faces found {len(res.response.results)}, swapped {res.faces_swapped}, "
        f"face box {box.round().astype(int).tolist()}"
    )
    print(
        f"  changed pixels: {changed.sum()} inside x {xs.min()}-{xs.max()}, "
        f"y {ys.min()}-{ys.max()}; unchanged elsewhere"
    )
    print(
        f"  re-detected on the output: {'yes' if found else 'no'}; 5-point landmark shift "
        f"mean {shift.mean():.2f} px, max {shift.max():.2f} px (face width "
        f"{box[2] - box[0]:.0f} px)"
    )


def box_of(lm: np.ndarray) -> np.ndarray:
    return facelib.box_from_landmarks(lm)


def synthetic(client: FacemuxClient, identity: str, n: int, save: Path | None) -> None:
    rng = np.random.default_rng(7)
    landmarks = facelib.LandmarkPredictor(5)
    shifts: list[float] = []
    base_shifts: list[float] = []
    a, b = synth.identity_from_seed(A_SEED), synth.identity_from_seed(B_SEED)
    rows = []
    for i in range(n):
        state = synth.FaceState.random(rng)
        bg = np.full((480, 640, 3), rng.integers(40, 200, 3), np.uint8)
        s = float(rng.uniform(140, 260))
        x, y = float(rng.uniform(20, 640 - s - 20)), float(rng.uniform(20, 480 - s - 20))
        affine = np.array([[s, 0, x], [0, s, y]])
        src = synth.render_into(bg, a, state, affine)
        truth = synth.render_into(bg, b, state, affine)
        hint = spb.FaceHint(
            landmarks=[tpb.Point(x=float(p[0]), y=float(p[1])) for p in src.landmarks5]
        )
        res = client.swap_image(
            _png(src.image), identity, output_format="png", options=spb.SwapOptions(faces=[hint])
        )
        assert res.frame is not None
        out = _decode(res.frame)
        inside = truth.mask > 0
        x0, y0, w, h = cv2.boundingRect(inside.astype(np.uint8))
        crop = (slice(y0, y0 + h), slice(x0, x0 + w))

        def ssim(
            img: np.ndarray, crop: tuple[slice, slice] = crop, ref: np.ndarray = truth.image
        ) -> float:
            return float(structural_similarity(img[crop], ref[crop], channel_axis=2))

        if save is not None and i < 3:
            strip = np.concatenate([src.image[crop], out[crop], truth.image[crop]], axis=1)
            cv2.imwrite(str(save / f"synthetic_{i}.png"), cv2.cvtColor(strip, cv2.COLOR_RGB2BGR))
        pred = landmarks.predict(out, box_of(truth.landmarks5))
        shifts.append(float(np.linalg.norm(pred - truth.landmarks5, axis=1).mean()))
        base_shifts.append(
            float(
                np.linalg.norm(
                    landmarks.predict(truth.image, box_of(truth.landmarks5)) - truth.landmarks5,
                    axis=1,
                ).mean()
            )
        )
        rows.append(
            (
                _psnr(out[inside], truth.image[inside]),
                _psnr(src.image[inside], truth.image[inside]),
                ssim(out),
                ssim(src.image),
            )
        )
    wins = sum(r[0] > r[1] for r in rows)
    print(
        f"\nsynthetic frames (640x480, faces {140}-{260} px, caller landmarks), A -> B, {n} states"
    )
    print(f"  {'':12s} {'swap':>8s} {'no swap':>8s}")
    print(
        f"  {'PSNR dB':12s} {statistics.mean(r[0] for r in rows):8.2f} "
        f"{statistics.mean(r[1] for r in rows):8.2f}"
    )
    print(
        f"  {'SSIM':12s} {statistics.mean(r[2] for r in rows):8.3f} "
        f"{statistics.mean(r[3] for r in rows):8.3f}"
    )
    print(
        f"  5-point landmarks predicted on the swapped frame vs the truth's: mean "
        f"{statistics.mean(shifts):.2f} px (predictor on the truth itself: "
        f"{statistics.mean(base_shifts):.2f} px)"
    )
    print(f"summary: swap beats the unswapped input on {wins}/{n} frames (face-region PSNR)")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--store", type=Path, default=Path("facemux-demo/store"))
    p.add_argument("--identity", default="blake")
    p.add_argument("--frames", type=int, default=24)
    p.add_argument("--save", type=Path, help="write a few input|swap|truth strips here")
    args = p.parse_args()
    settings = Settings(port=0, auth="off", store=args.store, metrics_port=-1)
    with ServerThread(settings) as srv, FacemuxClient(srv.target) as client:
        client.wait_ready(60)
        astronaut(client, args.identity)
        synthetic(client, args.identity, args.frames, args.save)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
