"""The bare model (shared encoder + one decoder), faces/s by batch size, precision and
compilation: the ceiling the server is measured against.

    python bench/model_throughput.py --preset df128 --device cuda --batches 1,8,64
"""

from __future__ import annotations

import argparse
import time

import torch
from facemux.models import inference
from facemux.models.config import get_preset
from facemux.models.networks import build_decoder, build_encoder


def measure(
    preset: str, device: torch.device, batch: int, bf16: bool, compiled: bool, seconds: float
) -> tuple[float, float]:
    cfg = get_preset(preset)
    enc = build_encoder(cfg, seed=0).eval().to(device)
    dec = build_decoder(cfg, seed=1).eval().to(device)
    layout = "channels_last"
    if device.type == "cuda":
        enc = enc.to(memory_format=torch.channels_last)
        dec = dec.to(memory_format=torch.channels_last)
    else:  # the layout the server picks for this model on this CPU (Runtime.load)
        layout, _ = inference.faster_layout(enc, dec, cfg.resolution, batch)
    run_enc: torch.nn.Module = torch.compile(enc) if compiled else enc  # type: ignore[assignment]
    run_dec: torch.nn.Module = torch.compile(dec) if compiled else dec  # type: ignore[assignment]
    x = torch.rand(batch, 3, cfg.resolution, cfg.resolution, device=device)
    x = x.contiguous(memory_format=inference.LAYOUTS[layout])

    def step() -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            inference.decode(run_dec, inference.encode(run_enc, x))

    for _ in range(3):
        step()
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds or n < 3:
        step()
        n += 1
    sync()
    dt = time.perf_counter() - t0
    return batch * n / dt, 1000 * dt / n


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="df128")
    p.add_argument("--device", default="auto")
    p.add_argument("--batches", default="1,8,64")
    p.add_argument("--seconds", type=float, default=3.0)
    p.add_argument("--compile", action="store_true", help="also measure torch.compile")
    args = p.parse_args()
    device = inference.pick_device(args.device)
    modes = [("fp32", False, False)]
    if device.type == "cuda":
        modes.append(("bf16", True, False))
        if args.compile:
            modes.append(("bf16+compile", True, True))
    print(f"preset {args.preset} on {device}")
    print(f"{'mode':14s} {'batch':>6s} {'faces/s':>10s} {'ms/batch':>9s}")
    best = 0.0
    for name, bf16, compiled in modes:
        for b in (int(v) for v in args.batches.split(",")):
            fps, ms = measure(args.preset, device, b, bf16, compiled, args.seconds)
            best = max(best, fps)
            print(f"{name:14s} {b:6d} {fps:10.1f} {ms:9.2f}")
    print(f"summary: best {best:.0f} faces/s ({args.preset}, {device})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
