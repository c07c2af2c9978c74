"""Decompression bombs against a real server: peak resident memory and time of one request.

    python bench/bombs.py                          # 24 PNGs of 6000x6000 in one Swap; Verify
    python bench/bombs.py --images 24 --side 6000 --format JPEG
    python bench/bombs.py --concurrent 8 --images 2 --side 4000

The server runs in its own process (`facemux serve`, tiny preset, default limits unless
FACEMUX_* variables say otherwise), so its peak RSS (VmHWM, reset before each case) is
measured apart from this process. Each bomb is one small file (a flat image compresses to
almost nothing) repeated `--images` times in one request. The Verify case sends one marked
PNG of --side x --side and reports whether the watermark was still found.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

import cv2
import grpc
import numpy as np
from facemux.models import checkpoint
from facemux.models import watermark as wm
from facemux.models.config import get_preset
from facemux.models.networks import build_decoder, build_encoder
from facemux.service.store import LocalStore, VersionRecord
from facemux.v1 import (
    provenance_service_pb2,
    provenance_service_pb2_grpc,
    swap_service_pb2,
    swap_service_pb2_grpc,
    types_pb2,
)

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from serve_process import ServeProcess

CONSENT = {"attested_by": "bench", "evidence_ref": "bench", "granted_at": "2026-01-01"}


def make_store(root: Path) -> None:
    cfg = get_preset("tiny")
    store = LocalStore(root)
    enc_bytes, meta = checkpoint.encoder_to_bytes(build_encoder(cfg, seed=0), cfg)
    store.put_encoder(enc_bytes, meta.fingerprint)
    data, dmeta = checkpoint.decoder_to_bytes(
        build_decoder(cfg, seed=1), cfg, meta.fingerprint, "alice"
    )
    store.add_version("alice", data, VersionRecord.for_decoder(dmeta), consent=dict(CONSENT))


def status_kib(pid: int, key: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise KeyError(key)


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process: steadier than wall time on a shared machine."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def reset_peak(pid: int) -> None:
    """Reset VmHWM to the current RSS (Linux 4.0+: write 5 to clear_refs)."""
    Path(f"/proc/{pid}/clear_refs").write_text("5")


def flat_image(side: int, fmt: str) -> bytes:
    """A flat grey image: the largest canvas per byte of file. PNG16 is 16-bit RGBA, the
    costliest PNG to decode."""
    img = np.full((side, side, 3), 128, np.uint8)
    if fmt == "PNG16":
        img = np.full((side, side, 4), 32768, np.uint16)
    params = [cv2.IMWRITE_PNG_COMPRESSION, 9] if fmt != "JPEG" else []
    ok, buf = cv2.imencode(".jpg" if fmt == "JPEG" else ".png", img, params)
    assert ok
    return bytes(buf)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=24, help="decoded images in one request")
    p.add_argument("--side", type=int, default=6000, help="each image is side x side")
    p.add_argument("--format", default="PNG", choices=("PNG", "PNG16", "JPEG"))
    p.add_argument(
        "--frame", action="store_true", help="send one image as a full frame, not aligned crops"
    )
    p.add_argument("--concurrent", type=int, default=1, help="bomb requests sent at once")
    p.add_argument(
        "--box",
        action="store_true",
        help="with --frame: a caller-given face box over most of the frame (the face path)",
    )
    p.add_argument("--no-verify", action="store_true", help="skip the Verify case")
    args = p.parse_args()

    bomb = flat_image(args.side, args.format)
    total = len(bomb) * args.images
    print(
        f"bomb: {args.images} x {args.format} {args.side}x{args.side} = {len(bomb)} B each, "
        f"{total / 2**20:.2f} MiB per request, {args.images * args.side**2 / 1e6:.0f} M pixels"
    )
    with tempfile.TemporaryDirectory() as tmp:
        make_store(Path(tmp) / "store")
        server = ServeProcess(
            Path(tmp) / "store",
            *("--auth", "off", "--audit-log", ""),
            env={"FACEMUX_DEVICE": os.environ.get("FACEMUX_DEVICE", "cpu")},
            log=Path(tmp) / "serve.log",
        ).start()
        port, pid = server.port, server.pid
        try:
            channel = grpc.insecure_channel(
                f"127.0.0.1:{port}",
                options=[("grpc.max_send_message_length", 256 * 2**20)],
            )
            grpc.channel_ready_future(channel).result(timeout=60)
            swap = swap_service_pb2_grpc.SwapServiceStub(channel)
            verify = provenance_service_pb2_grpc.ProvenanceServiceStub(channel)
            small = flat_image(64, "PNG")
            warm = swap_service_pb2.SwapRequest(
                identity="alice",
                faces=swap_service_pb2.FaceBatch(faces=[types_pb2.Image(encoded=small)]),
            )
            for _ in range(60):  # the encoder loads in the background after start
                try:
                    swap.Swap(warm, timeout=30)
                    break
                except grpc.RpcError as exc:
                    if exc.code() != grpc.StatusCode.UNAVAILABLE:
                        raise
                    time.sleep(0.5)
            request = swap_service_pb2.SwapRequest(
                identity="alice",
                faces=swap_service_pb2.FaceBatch(
                    faces=[types_pb2.Image(encoded=bomb)] * args.images
                ),
            )
            if args.frame:
                request = swap_service_pb2.SwapRequest(
                    identity="alice", frame=types_pb2.Image(encoded=bomb)
                )
                if args.box:
                    m = args.side * 0.05
                    box = types_pb2.Box(x_min=m, y_min=m, x_max=args.side - m, y_max=args.side - m)
                    request.options.faces.append(swap_service_pb2.FaceHint(box=box))
            base = status_kib(pid, "VmRSS")
            reset_peak(pid)
            outcomes: list[str] = []

            def send() -> None:
                try:
                    swap.Swap(request, timeout=600)
                    outcomes.append("OK")
                except grpc.RpcError as exc:
                    outcomes.append(f"{exc.code().name}: {exc.details()}")

            t0, c0 = time.perf_counter(), cpu_seconds(pid)
            threads = [threading.Thread(target=send) for _ in range(args.concurrent)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            took, cpu = time.perf_counter() - t0, cpu_seconds(pid) - c0
            peak = status_kib(pid, "VmHWM")
            print(
                f"swap bomb x{args.concurrent}: {took:.2f} s ({cpu:.2f} s server CPU), "
                f"RSS {base / 1024:.0f} MiB before, peak {peak / 1024:.0f} MiB "
                f"(+{(peak - base) / 1024:.0f} MiB)"
            )
            for o in sorted(set(outcomes)):
                print(f"  {outcomes.count(o)} x {o[:200]}")

            if not args.no_verify:
                rng = np.random.default_rng(0)
                small_img = rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)
                img = cv2.resize(small_img, (args.side, args.side), interpolation=cv2.INTER_CUBIC)
                marked = wm.embed_watermark(img, wm.payload_for("bench"))
                ok, buf = cv2.imencode(".png", marked, [cv2.IMWRITE_PNG_COMPRESSION, 1])
                assert ok
                data = bytes(buf)
                del img, marked, buf
                base = status_kib(pid, "VmRSS")
                reset_peak(pid)
                t0, c0 = time.perf_counter(), cpu_seconds(pid)
                try:
                    r = verify.Verify(
                        provenance_service_pb2.VerifyRequest(image=types_pb2.Image(encoded=data)),
                        timeout=600,
                    )
                    what = f"watermark_found={r.watermark_found} z={r.watermark_confidence:.1f}"
                except grpc.RpcError as exc:
                    what = f"{exc.code().name}: {exc.details()}"
                took, cpu = time.perf_counter() - t0, cpu_seconds(pid) - c0
                peak = status_kib(pid, "VmHWM")
                print(
                    f"verify {args.side}x{args.side} PNG ({len(data) / 2**20:.1f} MiB): "
                    f"{took:.2f} s ({cpu:.2f} s server CPU), RSS {base / 1024:.0f} MiB before, "
                    f"peak {peak / 1024:.0f} MiB (+{(peak - base) / 1024:.0f} MiB); {what}"
                )
            channel.close()
        finally:
            server.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
