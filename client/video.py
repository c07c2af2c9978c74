"""Swap a whole video file through SwapStream: frames out in order, same size and rate, audio
kept when ffmpeg is available. Needs OpenCV on the client (`pip install "facemux[video]"`)."""

from __future__ import annotations

import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from facemux.client import progress
from facemux.client.client import FacemuxClient


@dataclass
class VideoSummary:
    frames: int
    faces_swapped: int
    frame_errors: int
    fps: float
    seconds: float
    audio: str  # "kept", "none in source", or why not


def _cv2() -> Any:
    try:
        import cv2
    except ImportError:
        raise SystemExit(
            "swap-video needs OpenCV on the client: pip install 'facemux[video]'"
        ) from None
    return cv2


def _mux_audio(video_only: Path, source: Path, out: Path) -> str:
    ffmpeg = shutil.which("ffmpeg")
    if ffmpeg is None:
        shutil.move(str(video_only), out)
        return "dropped: ffmpeg is not on the PATH, so the output has no audio track"
    probe = subprocess.run(
        [ffmpeg, "-hide_banner", "-i", str(source)], capture_output=True, text=True
    )
    has_audio = "Audio:" in probe.stderr
    if not has_audio:
        shutil.move(str(video_only), out)
        return "none in source"
    cmd = [
        ffmpeg,
        "-y",
        "-loglevel",
        "error",
        "-i",
        str(video_only),
        "-i",
        str(source),
        "-map",
        "0:v:0",
        "-map",
        "1:a:0",
        "-c:v",
        "copy",
        "-c:a",
        "aac",
        "-shortest",
        str(out),
    ]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        shutil.move(str(video_only), out)
        return f"dropped: ffmpeg failed ({done.stderr.strip()[:200]})"
    return "kept"


def swap_video(
    client: FacemuxClient,
    source: str | Path,
    out: str | Path,
    identity: str,
    version: int = 0,
    *,
    detect_every: int = 0,
    quality: int = 95,
    show_progress: bool = True,
) -> VideoSummary:
    cv2 = _cv2()
    source, out = Path(source), Path(out)
    cap = cv2.VideoCapture(str(source))
    if not cap.isOpened():
        raise ValueError(f"{source}: OpenCV cannot open this video")
    fps = float(cap.get(cv2.CAP_PROP_FPS)) or 25.0
    width = int(cap.get(cv2.CAP_PROP_FRAME_WIDTH))
    height = int(cap.get(cv2.CAP_PROP_FRAME_HEIGHT))
    total = int(cap.get(cv2.CAP_PROP_FRAME_COUNT))
    originals: dict[int, np.ndarray] = {}

    def frames() -> Iterator[bytes]:
        index = 0
        while True:
            ok, bgr = cap.read()
            if not ok:
                return
            originals[index] = bgr  # kept until its answer arrives, for error fallback
            index += 1
            ok, buf = cv2.imencode(".jpg", bgr, [cv2.IMWRITE_JPEG_QUALITY, quality])
            yield bytes(buf.tobytes())

    with tempfile.TemporaryDirectory(dir=out.parent if out.parent.exists() else None) as tmp:
        video_only = Path(tmp) / ("video" + (out.suffix or ".mp4"))
        writer = cv2.VideoWriter(
            str(video_only), cv2.VideoWriter_fourcc(*"mp4v"), fps, (width, height)
        )
        if not writer.isOpened():
            raise ValueError(f"OpenCV cannot write {out.suffix or '.mp4'} video here")
        written = swapped = errors = 0
        t0 = time.perf_counter()
        # Drawn only on a terminal (progress.bar); the frame count may be unknown (0).
        bar = progress.bar(total or None, desc="swap-video", unit="frame", quiet=not show_progress)
        try:
            stream = client.swap_stream(
                frames(),
                identity,
                version,
                output_format="jpeg",
                quality=quality,
                detect_every=detect_every,
                timeout=None,
            )
            for resp in stream:
                original = originals.pop(int(resp.frame_index))
                if resp.HasField("error"):
                    errors += 1  # keep the original frame: the video stays complete
                    frame = original
                else:
                    data = np.frombuffer(resp.frame.encoded, np.uint8)
                    frame = cv2.imdecode(data, cv2.IMREAD_COLOR)
                    swapped += resp.faces_swapped
                writer.write(frame)
                written += 1
                bar.update()
                if swapped or errors:
                    bar.set_postfix(faces=swapped, errors=errors, refresh=False)
        finally:
            bar.close()
            writer.release()
            cap.release()
        seconds = time.perf_counter() - t0
        audio = _mux_audio(video_only, source, out)
    return VideoSummary(written, swapped, errors, fps, seconds, audio)
