"""Server memory while a dataset upload streams in.

    python bench/dataset_memory.py [--images 20000]

An in-process server (no encoder: uploads of aligned crops need none) takes one
UploadDataset stream of distinct 64 px crops; the server process's resident memory is
sampled every 20 ms. The images are encoded before the stream starts, so the client's own
memory does not grow during it. Uploads are staged on disk as they arrive: the growth
should not scale with the number of images.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import cv2
from facemux.client import FacemuxClient
from facemux.models import synth
from facemux.service.server import ServerThread
from facemux.service.settings import Settings


def crops(n: int) -> Iterator[bytes]:
    base, _ = synth.make_dataset(synth.identity_from_seed(31), 4, 64, seed=31)
    for i in range(n):
        img = base[i % 4].copy()
        img[0, 0] = (i % 256, i // 256 % 256, 7)  # each one a different face
        yield bytes(cv2.imencode(".png", cv2.cvtColor(img, cv2.COLOR_RGB2BGR))[1].tobytes())


def rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--images", type=int, default=20_000)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        settings = Settings(
            port=0, auth="off", store=Path(tmp), metrics_port=-1, max_dataset_faces=10**6
        )
        with ServerThread(settings) as srv, FacemuxClient(srv.target, timeout=3600) as c:
            c.upload_dataset("warm-up", list(crops(20)), aligned=True)
            images = list(crops(args.images))
            base = peak = rss()
            stop = threading.Event()

            def sample() -> None:
                nonlocal peak
                while not stop.is_set():
                    peak = max(peak, rss())
                    time.sleep(0.02)

            sampler = threading.Thread(target=sample)
            sampler.start()
            t0 = time.perf_counter()
            result = c.upload_dataset("big", iter(images), aligned=True)
            stop.set()
            sampler.join()
            print(
                f"{args.images} images, {result.accepted} accepted in "
                f"{time.perf_counter() - t0:.1f} s; resident memory grew "
                f"{(peak - base) / 2**20:.1f} MiB during the upload"
            )


if __name__ == "__main__":
    main()
