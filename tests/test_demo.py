"""The demo end to end, shortened: renders, trains, serves, registers, swaps, writes a grid."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import cv2
import pytest
from facemux.models import checkpoint, demo_encoder

pytestmark = pytest.mark.slow


def _demo(out: Path, *flags: str) -> str:
    exe = Path(sys.executable).parent / "facemux"
    run = subprocess.run(
        [str(exe), "demo", "--out", str(out), "--faces", "32", *flags],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr
    grid = out / "demo_grid.png"
    assert f"before/after grid: {grid.resolve()}" in run.stdout
    img = cv2.imread(str(grid))
    assert img is not None and img.shape[0] > 8 * 64 and img.shape[1] > 8 * 64
    # The score table: SSIM / PSNR of swap, no swap and wrong state for both directions.
    for pair in ("avery -> blake", "blake -> avery"):
        row = re.search(rf"{pair}\s+(.*)", run.stdout)
        assert row is not None, run.stdout
        cells = re.findall(r"(-?\d\.\d{3}) / (\d+\.\d\d)", row.group(1))
        assert len(cells) == 3 and all(-1 <= float(s) <= 1 for s, _ in cells), row.group(0)
    return run.stdout


def test_demo_trains_decoders_against_the_shipped_encoder(tmp_path: Path) -> None:
    stdout = _demo(tmp_path, "--seconds", "2")
    assert f"shipped tiny encoder {demo_encoder.FINGERPRINT[:16]}" in stdout
    assert "latents moved towards other people's" in stdout
    assert f"serving encoder {demo_encoder.FINGERPRINT[:16]}" in stdout
    # The store serves the shipped file as it is, and both decoders were made for it.
    store = tmp_path / "store" / "encoders"
    assert (store / "DEFAULT").read_text() == demo_encoder.FINGERPRINT
    served = (store / demo_encoder.FINGERPRINT / "encoder.safetensors").read_bytes()
    assert served == demo_encoder.ASSET.read_bytes()
    for name in ("avery", "blake"):
        meta = checkpoint.read_metadata(tmp_path / "decoders" / f"{name}.safetensors")
        assert isinstance(meta, checkpoint.DecoderMeta)
        assert meta.encoder_fingerprint == demo_encoder.FINGERPRINT


def test_demo_from_scratch_trains_its_own_encoder(tmp_path: Path) -> None:
    stdout = _demo(tmp_path, "--seconds", "1", "--encoder", "scratch", "--threads", "1")
    served = re.search(r"serving encoder ([0-9a-f]{16})", stdout)
    assert served is not None and served.group(1) != demo_encoder.FINGERPRINT[:16]
    assert "1 CPU thread(s)" in stdout
    meta = checkpoint.read_metadata(tmp_path / "decoders" / "avery.safetensors")
    assert isinstance(meta, checkpoint.DecoderMeta)
    assert meta.encoder_fingerprint[:16] == served.group(1)
