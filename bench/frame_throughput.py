"""Full-frame Swap and SwapStream through gRPC: frames/s and latency for 640x480 and
1920x1080 JPEGs with one face each (detected by the server), K concurrent clients.

    python bench/frame_throughput.py --clients 4 --seconds 10

The server runs in its own process with auth, audit and provenance off (provenance is
measured in bench/watermark.py), and the tiny preset unless --preset says otherwise.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import cv2
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from facemux.client import FacemuxClient
from frame_stages import synthetic_frame
from serve_process import ServeProcess
from swap_throughput import make_store


def jpeg(rgb: np.ndarray) -> bytes:
    return bytes(cv2.imencode(".jpg", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))[1].tobytes())


def unary(target: str, frame: bytes, clients: int, seconds: float) -> tuple[float, list[float]]:
    lat: list[list[float]] = [[] for _ in range(clients)]
    stop = time.perf_counter() + seconds

    def worker(k: int) -> None:
        with FacemuxClient(target) as c:
            while time.perf_counter() < stop:
                t0 = time.perf_counter()
                r = c.swap_image(frame, "bench", output_format="jpeg")
                assert r.faces_swapped == 1
                lat[k].append(time.perf_counter() - t0)

    t0 = time.perf_counter()
    ts = [threading.Thread(target=worker, args=(k,)) for k in range(clients)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    flat = [x for v in lat for x in v]
    return len(flat) / (time.perf_counter() - t0), flat


def stream(target: str, frame: bytes, n: int) -> float:
    with FacemuxClient(target) as c:
        t0 = time.perf_counter()
        got = sum(
            1
            for r in c.swap_stream([frame] * n, "bench", output_format="jpeg")
            if r.faces_swapped == 1
        )
        assert got == n
        return n / (time.perf_counter() - t0)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="tiny")
    p.add_argument("--clients", type=int, default=4)
    p.add_argument("--seconds", type=float, default=8.0)
    p.add_argument("--stream-frames", type=int, default=60)
    p.add_argument("--device", default="auto")
    p.add_argument("--gpu-jpeg", default="auto", help="auto, on or off (nvjpeg on CUDA)")
    p.add_argument(
        "--detector-processes", type=int, default=-1, help="HOG worker processes; -1 = auto"
    )
    p.add_argument("--detector", default="hog", choices=("hog", "blazeface"))
    p.add_argument(
        "--detector-batching",
        default="on",
        choices=("on", "off"),
        help="blazeface: frames of concurrent calls detected in one pass",
    )
    args = p.parse_args()
    frames = {
        "640x480": jpeg(synthetic_frame(640, 480, 240)),
        "1920x1080": jpeg(synthetic_frame(1920, 1080, 520)),
    }
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        store = Path(tmp) / "store"
        make_store(store, args.preset)
        server = ServeProcess(
            store,
            *("--auth", "off", "--provenance", "off", "--audit-log", ""),
            *("--device", args.device, "--gpu-jpeg", args.gpu_jpeg),
            *("--detector-threshold", "-0.5"),
            *("--detector-processes", str(args.detector_processes)),
            *("--detector", args.detector, "--detector-batching", args.detector_batching),
            metrics=True,
            env={"FACEMUX_LOG_LEVEL": "WARNING"},
        ).start()
        target = server.target
        try:
            with FacemuxClient(target) as c:
                c.wait_ready(120)
                for data in frames.values():  # load the detector and the decoder
                    c.swap_image(data, "bench")
            for name, data in frames.items():
                fps, lat = unary(target, data, args.clients, args.seconds)
                sfps = stream(target, data, args.stream_frames)
                rows.append(
                    (
                        name,
                        fps,
                        1000 * statistics.median(lat),
                        1000 * float(np.percentile(lat, 99)),
                        sfps,
                    )
                )
        finally:
            server.stop()
    print(
        f"\npreset {args.preset}, device {args.device}, gpu_jpeg {args.gpu_jpeg}, "
        f"detector {args.detector} (batching {args.detector_batching}), "
        f"detector processes {args.detector_processes} (-1 = auto), "
        f"{args.clients} clients, unary Swap for {args.seconds:.0f} s; "
        f"one SwapStream of {args.stream_frames} frames; {os.cpu_count()} cores"
    )
    print(
        f"{'frame':10s} {'Swap frames/s':>14s} {'p50 ms':>8s} {'p99 ms':>8s} "
        f"{'SwapStream frames/s':>20s}"
    )
    for name, fps, p50, p99, sfps in rows:
        print(f"{name:10s} {fps:14.1f} {p50:8.1f} {p99:8.1f} {sfps:20.1f}")
    print("summary: " + ", ".join(f"{n} {f:.1f} frames/s" for n, f, *_ in rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
