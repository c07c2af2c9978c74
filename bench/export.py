"""What an export costs and gives: ONNX export time and parity, the TorchServe archive's size,
a real TorchServe's start-to-ready time and one call's latency over REST and gRPC.

    python bench/export.py --preset original64 --identities 2

Random weights of the preset (the figures do not depend on training). Needs the export and
torchserve extras (the dev install has both) and Java 17 for TorchServe.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import cv2
import numpy as np
from facemux.models import checkpoint
from facemux.models.config import get_preset
from facemux.models.networks import build_decoder, build_encoder
from facemux.service.export import export_onnx
from facemux.service.export_torchserve import export_torchserve
from facemux.service.store import LocalStore, VersionRecord

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from ts_server import TorchServe, grpc_modules, why_not_available

CONSENT = {"attested_by": "bench@example.com", "evidence_ref": "BENCH", "granted_at": "2026-01-01"}


def make_store(root: Path, preset: str, identities: int) -> tuple[LocalStore, list[str]]:
    cfg = get_preset(preset)
    store = LocalStore(root)
    enc_bytes, meta = checkpoint.encoder_to_bytes(build_encoder(cfg, seed=1), cfg)
    store.put_encoder(enc_bytes, meta.fingerprint)
    names = [f"id{i}" for i in range(identities)]
    for i, name in enumerate(names):
        data, dmeta = checkpoint.decoder_to_bytes(
            build_decoder(cfg, seed=10 + i), cfg, meta.fingerprint, name
        )
        store.add_version(name, data, VersionRecord.for_decoder(dmeta), consent=dict(CONSENT))
    return store, names


def _ms(samples: list[float]) -> str:
    return f"p50 {1000 * statistics.median(samples):.1f} ms"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="original64")
    p.add_argument("--identities", type=int, default=2)
    p.add_argument("--calls", type=int, default=20)
    args = p.parse_args()
    rows: list[tuple[str, str]] = []
    with tempfile.TemporaryDirectory(prefix="facemux-bench-export-") as tmp:
        root = Path(tmp)
        store, names = make_store(root / "store", args.preset, args.identities)
        t0 = time.perf_counter()
        report = export_onnx(store, names, root / "onnx", triton=True)
        rows.append(
            ("ONNX export (all graphs, with parity check)", f"{time.perf_counter() - t0:.1f} s")
        )
        rows.append(("encoder.onnx", f"{(root / 'onnx/encoder.onnx').stat().st_size / 1e6:.1f} MB"))
        worst = max(
            [report.encoder_parity_max_abs_error or 0.0]
            + [d.parity_max_abs_error or 0.0 for d in report.decoders]
        )
        rows.append(("ONNX Runtime vs torch, max abs error", f"{worst:.1e}"))
        t0 = time.perf_counter()
        mar = export_torchserve(store, names, root / "mars", batch_size=8)
        rows.append(
            (
                "TorchServe archive",
                f"{mar.size_bytes / 1e6:.1f} MB in {time.perf_counter() - t0:.1f} s",
            )
        )
        reason = why_not_available()
        if reason:
            rows.append(("TorchServe", f"not run: {reason}"))
        else:
            ts = TorchServe(root / "mars", root / "ts", {"facemux": "facemux.mar"}).start()
            try:
                rows.append(("TorchServe start to ready", f"{ts.started_s:.1f} s"))
                size = get_preset(args.preset).resolution
                face = np.random.default_rng(0).integers(0, 256, (size, size, 3), np.uint8)
                _ok, buf = cv2.imencode(".png", face)
                body = buf.tobytes()
                rest = []
                for _ in range(args.calls):
                    req = urllib.request.Request(
                        f"{ts.rest}/predictions/facemux",
                        data=body,
                        headers={
                            "X-Facemux-Identity": names[0],
                            "Content-Type": "application/octet-stream",
                        },
                    )
                    t = time.perf_counter()
                    with urllib.request.urlopen(req, timeout=60) as r:
                        r.read()
                    rest.append(time.perf_counter() - t)
                import grpc

                pb2, pb2_grpc = grpc_modules(root / "ts")
                with grpc.insecure_channel(ts.grpc_target) as channel:
                    stub = pb2_grpc.InferenceAPIsServiceStub(channel)
                    calls = []
                    for _ in range(args.calls):
                        req = pb2.PredictionsRequest(
                            model_name="facemux",
                            input={"data": body, "identity": names[0].encode()},
                        )
                        t = time.perf_counter()
                        stub.Predictions(req, timeout=60)
                        calls.append(time.perf_counter() - t)
                rows.append(("one PNG face, REST (sequential)", _ms(rest)))
                rows.append(("one PNG face, gRPC (sequential)", _ms(calls)))
            finally:
                ts.stop()
    print(f"| {args.preset}, {args.identities} identities | |\n|---|---|")
    for k, v in rows:
        print(f"| {k} | {v} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
