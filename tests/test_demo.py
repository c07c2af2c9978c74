"""The demo end to end, shortened: renders, trains, serves, registers, swaps, writes a grid."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import cv2
import pytest

pytestmark = pytest.mark.slow


def test_demo_writes_the_grid(tmp_path: Path) -> None:
    exe = Path(sys.executable).parent / "facemux"
    out = subprocess.run(
        [str(exe), "demo", "--out", str(tmp_path), "--seconds", "4", "--faces", "48"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr
    grid = tmp_path / "demo_grid.png"
    assert f"before/after grid: {grid.resolve()}" in out.stdout
    img = cv2.imread(str(grid))
    assert img is not None and img.shape[0] > 8 * 64 and img.shape[1] > 8 * 64
    assert "avery -> blake" in out.stdout and "blake -> avery" in out.stdout
    assert (tmp_path / "decoders" / "avery.safetensors").exists()
