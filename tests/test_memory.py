"""Decompression bombs against a server in its own process: its peak resident memory stays
within what the pixel settings promise.

A flat image compresses to almost nothing, so one small request can carry many images that
each decode to the per-image limit. The server's peak RSS (VmHWM, reset before each case) is
read from /proc, apart from this test process. The limits go in as FACEMUX_* variables so
that a server without them still starts and shows what the bombs cost.
"""

from __future__ import annotations

import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import cv2
import grpc
import numpy as np
import pytest
from common import Models, face_image, make_store, png
from facemux.models import watermark as wm
from facemux.service.budget import BYTES_PER_PIXEL
from facemux.v1 import provenance_service_pb2 as ppb
from facemux.v1 import provenance_service_pb2_grpc as pgrpc
from facemux.v1 import swap_service_pb2 as spb
from facemux.v1 import swap_service_pb2_grpc as sgrpc
from facemux.v1 import types_pb2 as tpb
from serve_process import ServeProcess

pytestmark = pytest.mark.skipif(
    not Path("/proc/self/clear_refs").exists(), reason="needs Linux /proc peak-RSS reset"
)

SIDE = 3000  # each bomb image decodes to SIDE x SIDE
IMAGE_PIXELS = SIDE * SIDE
LIMITS = {
    "FACEMUX_MAX_IMAGE_PIXELS": str(IMAGE_PIXELS),
    "FACEMUX_MAX_VERIFY_PIXELS": str(IMAGE_PIXELS),
    "FACEMUX_MAX_REQUEST_PIXELS": str(4 * IMAGE_PIXELS),
    # One full-size image decoding at a time, server-wide.
    "FACEMUX_MAX_INFLIGHT_PIXELS": str(IMAGE_PIXELS),
    "FACEMUX_MAX_INFLIGHT_WAIT_SECONDS": "60",
}
# What the settings promise for decoded images, plus room for the messages in flight and
# the allocator's noise.
SLACK = 64 * 2**20
BOUND = BYTES_PER_PIXEL * int(LIMITS["FACEMUX_MAX_INFLIGHT_PIXELS"]) + SLACK


def _flat_png(side: int) -> bytes:
    img = np.full((side, side, 3), 128, np.uint8)
    ok, buf = cv2.imencode(".png", img, [cv2.IMWRITE_PNG_COMPRESSION, 9])
    assert ok
    return bytes(buf)


class Server:
    def __init__(self, proc: subprocess.Popen[bytes], target: str) -> None:
        self.proc = proc
        self.channel = grpc.insecure_channel(
            target, options=[("grpc.max_send_message_length", 64 * 2**20)]
        )
        self.swap = sgrpc.SwapServiceStub(self.channel)
        self.verify = pgrpc.ProvenanceServiceStub(self.channel)

    def _kib(self, key: str) -> int:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
        raise KeyError(key)

    def peak_growth(self, action: threading.Thread | list[threading.Thread]) -> int:
        """Bytes the server's peak RSS rose above its RSS at the start, over the threads."""
        threads = action if isinstance(action, list) else [action]
        before = self._kib("VmRSS")
        Path(f"/proc/{self.proc.pid}/clear_refs").write_text("5")  # VmHWM := VmRSS
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        return self._kib("VmHWM") - before


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, models: Models) -> Iterator[Server]:
    root = tmp_path_factory.mktemp("memory") / "store"
    make_store(root, models, ("alice",))
    serve = ServeProcess(root, "--auth", "off", "--audit-log", "", "--device", "cpu", env=LIMITS)
    srv = Server(serve.start().wait_ready(60).proc, serve.target)
    try:
        warm = spb.SwapRequest(
            identity="alice", faces=spb.FaceBatch(faces=[tpb.Image(encoded=png(face_image(0)))])
        )
        srv.swap.Swap(warm, timeout=30)
        yield srv
    finally:
        srv.channel.close()
        serve.stop()


def _call(fn: object, request: object, outcomes: list[str]) -> threading.Thread:
    def run() -> None:
        try:
            fn(request, timeout=120)  # type: ignore[operator]
            outcomes.append("OK")
        except grpc.RpcError as exc:
            outcomes.append(f"{exc.code().name}: {exc.details()}")

    return threading.Thread(target=run)


def test_bomb_request_is_refused_before_decoding(server: Server) -> None:
    # 64 images of 3000x3000 in a 0.4 MiB message: 576 M pixels, 1.7 GB as RGB.
    bomb = _flat_png(SIDE)
    request = spb.SwapRequest(
        identity="alice", faces=spb.FaceBatch(faces=[tpb.Image(encoded=bomb)] * 64)
    )
    outcomes: list[str] = []
    growth = server.peak_growth(_call(server.swap.Swap, request, outcomes))
    print(f"\nbomb of 64 x {SIDE}^2 PNG: peak RSS +{growth / 2**20:.0f} MiB, {outcomes}")
    assert growth < BOUND, f"peak RSS grew {growth / 2**20:.0f} MiB, bound {BOUND / 2**20:.0f}"
    assert outcomes and outcomes[0].startswith("INVALID_ARGUMENT"), outcomes
    assert "max_request_pixels" in outcomes[0]


def test_concurrent_bombs_share_the_server_budget(server: Server) -> None:
    # Six callers at once, each within every per-call limit (4 images of the largest size).
    bomb = _flat_png(SIDE)
    request = spb.SwapRequest(
        identity="alice", faces=spb.FaceBatch(faces=[tpb.Image(encoded=bomb)] * 4)
    )
    outcomes: list[str] = []
    growth = server.peak_growth([_call(server.swap.Swap, request, outcomes) for _ in range(6)])
    print(f"\n6 x 4 x {SIDE}^2 PNG at once: peak RSS +{growth / 2**20:.0f} MiB, {set(outcomes)}")
    assert outcomes == ["OK"] * 6, outcomes
    assert growth < BOUND, f"peak RSS grew {growth / 2**20:.0f} MiB, bound {BOUND / 2**20:.0f}"


def test_verify_of_a_large_image_is_bounded(server: Server) -> None:
    rng = np.random.default_rng(0)
    img = cv2.resize(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8), (SIDE, SIDE))
    ok, buf = cv2.imencode(".png", wm.embed_watermark(img, wm.payload_for("big")))
    assert ok
    request = ppb.VerifyRequest(image=tpb.Image(encoded=bytes(buf)))
    found: list[ppb.VerifyResponse] = []

    def run() -> None:
        found.append(server.verify.Verify(request, timeout=120))

    t0 = time.perf_counter()
    growth = server.peak_growth(threading.Thread(target=run))
    took = time.perf_counter() - t0
    print(f"\nVerify of a {SIDE}^2 PNG: {took:.2f} s, peak RSS +{growth / 2**20:.0f} MiB")
    assert found and found[0].watermark_found
    assert found[0].watermark_payload == wm.payload_for("big").hex()
    # The decoded image and its copies (under 10 bytes a pixel) plus a fixed-size window for
    # watermark detection; detecting over the whole image cost about 40 bytes a pixel.
    bound = 10 * IMAGE_PIXELS + len(buf) + SLACK
    assert growth < bound, f"peak RSS grew {growth / 2**20:.0f} MiB, bound {bound / 2**20:.0f}"
