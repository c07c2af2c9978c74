"""The demo end to end, shortened: renders, trains, serves, registers, swaps, writes a grid."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import cv2
import pytest
from facemux.models import checkpoint, demo_encoder
from facemux.service.demo import DemoRecipe

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


def _served_encoder(out: Path, stdout: str) -> checkpoint.EncoderMeta:
    """The store's default encoder, checked against what the demo said it serves, and both
    decoders made for it."""
    store = out / "store" / "encoders"
    fp = (store / "DEFAULT").read_text()
    assert f"serving encoder {fp[:16]}" in stdout
    meta = checkpoint.read_metadata(store / fp / "encoder.safetensors")
    assert isinstance(meta, checkpoint.EncoderMeta) and meta.fingerprint == fp
    for name in ("avery", "blake"):
        dec = checkpoint.read_metadata(out / "decoders" / f"{name}.safetensors")
        assert isinstance(dec, checkpoint.DecoderMeta)
        assert dec.encoder_fingerprint == fp
    return meta


def test_demo_trains_the_shipped_encoder_on_with_the_decoders(tmp_path: Path) -> None:
    stdout = _demo(tmp_path, "--max-steps", "2")
    assert f"from the shipped tiny encoder {demo_encoder.FINGERPRINT[:16]}" in stdout
    assert "a latent critic keeping the two people's latents alike" in stdout
    # A trained encoder is a new one, and says which it started from.
    meta = _served_encoder(tmp_path, stdout)
    assert meta.fingerprint != demo_encoder.FINGERPRINT
    assert meta.summary["started_from_encoder"] == demo_encoder.FINGERPRINT
    assert meta.summary["encoder_lr"] == DemoRecipe.encoder_lr


def test_demo_with_the_shipped_encoder_frozen(tmp_path: Path) -> None:
    stdout = _demo(tmp_path, "--max-steps", "2", "--encoder", "frozen")
    assert "the encoder frozen, each decoder shown its person's latents moved" in stdout
    # The store serves the shipped file as it is.
    meta = _served_encoder(tmp_path, stdout)
    assert meta.fingerprint == demo_encoder.FINGERPRINT
    served = tmp_path / "store" / "encoders" / meta.fingerprint / "encoder.safetensors"
    assert served.read_bytes() == demo_encoder.ASSET.read_bytes()


def test_demo_from_scratch_trains_its_own_encoder(tmp_path: Path) -> None:
    stdout = _demo(tmp_path, "--max-steps", "2", "--encoder", "scratch", "--threads", "1")
    assert "1 CPU thread(s)" in stdout
    meta = _served_encoder(tmp_path, stdout)
    assert meta.fingerprint != demo_encoder.FINGERPRINT
    assert "started_from_encoder" not in meta.summary
