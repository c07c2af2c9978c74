"""Progress bars of the long CLI commands: drawn on a terminal's stderr, never into a pipe."""

from __future__ import annotations

import fcntl
import os
import pty
import select
import struct
import subprocess
import sys
import termios
from pathlib import Path

import cv2
from common import Models, face_image, make_store, png
from facemux.service.server import ServerThread

FACEMUX = str(Path(sys.executable).parent / "facemux")
# What a tqdm bar draws: its percentage and "|" frame, and carriage returns to redraw it.
BAR_MARKS = ("%|", "\r")


def _crops(tmp_path: Path, n: int) -> list[str]:
    files = []
    for i in range(n):
        files.append(str(tmp_path / f"c{i}.png"))
        Path(files[-1]).write_bytes(png(face_image(100 + i)))
    return files


def _video(tmp_path: Path, frames: int = 4) -> Path:
    video = tmp_path / "in.mp4"
    writer = cv2.VideoWriter(str(video), cv2.VideoWriter.fourcc(*"mp4v"), 10.0, (64, 64))
    for i in range(frames):
        writer.write(cv2.cvtColor(face_image(i), cv2.COLOR_RGB2BGR))
    writer.release()
    return video


def _on_a_terminal(argv: list[str]) -> tuple[int, str]:
    """Run with stderr on a pseudo-terminal (stdout piped); returns (rc, what the terminal
    showed)."""
    master, slave = pty.openpty()
    # A terminal 100 columns wide (a new pseudo-terminal reports 0, where tqdm draws nothing).
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 30, 100, 0, 0))
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=slave, stdin=subprocess.DEVNULL)
    os.close(slave)
    shown = bytearray()
    while True:
        ready, _, _ = select.select([master], [], [], 0.1)
        if ready:
            try:
                chunk = os.read(master, 65536)
            except OSError:  # the child closed its end
                break
            if not chunk:
                break
            shown += chunk
        elif proc.poll() is not None:
            break
    proc.wait(timeout=120)
    assert proc.stdout is not None
    proc.stdout.close()
    os.close(master)
    return proc.returncode, shown.decode(errors="replace")


def test_no_bar_when_stderr_is_not_a_terminal(server: ServerThread, tmp_path: Path) -> None:
    t = ["--target", server.target]
    upload = [FACEMUX, "datasets", "upload", "quiet", *_crops(tmp_path, 5), "--aligned", *t]
    r = subprocess.run(upload, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "5 added" in r.stdout
    assert not any(mark in r.stderr for mark in BAR_MARKS), r.stderr
    video = [FACEMUX, "swap-video", str(_video(tmp_path)), str(tmp_path / "o.mp4")]
    r = subprocess.run([*video, "--identity", "alice", *t], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "4 frames" in r.stdout
    assert not any(mark in r.stderr for mark in BAR_MARKS), r.stderr


def test_bar_on_a_terminal(server: ServerThread, tmp_path: Path) -> None:
    t = ["--target", server.target]
    rc, shown = _on_a_terminal(
        [FACEMUX, "datasets", "upload", "shown", *_crops(tmp_path, 5), "--aligned", *t]
    )
    assert rc == 0, shown
    assert "upload shown" in shown and "5/5" in shown and "img" in shown
    video = [FACEMUX, "swap-video", str(_video(tmp_path)), str(tmp_path / "o.mp4")]
    rc, shown = _on_a_terminal([*video, "--identity", "alice", *t])
    assert rc == 0, shown
    assert "swap-video" in shown and "4/4" in shown and "frame" in shown
    # --quiet: nothing drawn even on a terminal.
    rc, shown = _on_a_terminal([*video, "--identity", "alice", "--quiet", *t])
    assert rc == 0 and not any(mark in shown for mark in BAR_MARKS), shown


def test_export_bar_on_a_terminal(tmp_path: Path, models: Models) -> None:
    # Not on a terminal: tests/test_export.py keeps the same command's stderr free of bars.
    make_store(tmp_path / "store", models, ("alice",))
    argv = [FACEMUX, "export", "onnx", "alice", "--store", str(tmp_path / "store")]
    rc, shown = _on_a_terminal([*argv, "--no-parity", "-o", str(tmp_path / "a")])
    assert rc == 0, shown
    assert "export onnx" in shown and "2/2" in shown and "part" in shown
