"""Videos and frame directories for the demo corpus, encoded with PyAV.

Writes every VIDEO_SPECS mp4, ``longvita/videos/bad/`` (truncated, garbage, zero-frame mp4) and
the JPEG frame directories. Frames are drawn from the part's generator; libx264 runs with one
thread and fixed options, so the files are byte-identical in practice and decode identically.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import av
import numpy as np
from PIL import Image

from lvita_data.demo.builder import Builder
from lvita_data.demo.specs import EMPTY_FRAME_DIR, FRAME_DIRS, VIDEO_SPECS, VideoSpec


def _frame_palette(rng: np.random.Generator, seconds: int) -> np.ndarray:
    return rng.integers(30, 226, size=(max(1, seconds), 3)).astype(np.uint8)


def _video_frame(palette: np.ndarray, index: int, fps: int, width: int, height: int) -> np.ndarray:
    """Frame `index`: background colour of its second, a moving white square, an index code."""
    second = min(index // fps, len(palette) - 1)
    frame = np.empty((height, width, 3), dtype=np.uint8)
    frame[...] = palette[second]
    side = max(8, height // 6)
    x = (index * 3) % max(1, width - side)
    y = (height - side) // 2 + int((height // 4) * math.sin(index / max(1, fps)))
    frame[y : y + side, x : x + side] = 255
    cell = max(2, width // 40)
    bits = (index >> (np.arange(12 * cell) // cell)) & 1  # the frame index in binary, top left
    frame[:cell, : 12 * cell] = (bits * 255).astype(np.uint8)[None, :, None]
    return frame


def encode_video(path: Path, spec: VideoSpec, rng: np.random.Generator) -> None:
    """H.264 mp4 of `spec` (one thread, crf 30, no B-frames)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    palette = _frame_palette(rng, spec.seconds)
    with av.open(str(path), "w", format="mp4") as container:
        stream = container.add_stream(
            "libx264",
            rate=spec.fps,
            options={"crf": "30", "preset": "veryfast", "threads": "1", "bf": "0"},
        )
        stream.width, stream.height, stream.pix_fmt = spec.width, spec.height, "yuv420p"
        stream.codec_context.thread_count = 1
        for i in range(spec.frames):
            array = _video_frame(palette, i, spec.fps, spec.width, spec.height)
            frame = av.VideoFrame.from_ndarray(array, format="rgb24")
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def zero_frame_mp4(path: Path) -> None:
    """An mp4 container written without a single frame (no usable video stream)."""
    container = av.open(str(path), "w", format="mp4")
    stream = container.add_stream("libx264", rate=10)
    stream.width, stream.height, stream.pix_fmt = 160, 120, "yuv420p"
    container.start_encoding()
    container.close()


def write_videos(builder: Builder) -> list[dict[str, Any]]:
    """Every VIDEO_SPECS file, then the bad videos; returns one summary entry per spec."""
    out = []
    for spec in VIDEO_SPECS:
        encode_video(builder.root / spec.name, spec, builder.rng(spec.name))
        out.append(
            {
                "file": spec.name,
                "fps": spec.fps,
                "frames": spec.frames,
                "seconds": spec.seconds,
                "width": spec.width,
                "height": spec.height,
            }
        )
    _write_bad_videos(builder)
    return out


def _write_bad_videos(builder: Builder) -> None:
    """``longvita/videos/bad``: a third of a good mp4, 4 KiB of random bytes, a zero-frame mp4."""
    bad_dir = builder.root / "longvita/videos/bad"
    bad_dir.mkdir(parents=True, exist_ok=True)
    data = (builder.root / VIDEO_SPECS[1].name).read_bytes()
    (bad_dir / "truncated.mp4").write_bytes(data[: len(data) // 3])
    garbage = builder.rng("garbage").integers(0, 256, size=4096, dtype=np.uint8).tobytes()
    (bad_dir / "garbage.mp4").write_bytes(garbage)
    zero_frame_mp4(bad_dir / "zero_frames.mp4")


def write_frame_dirs(builder: Builder) -> list[dict[str, Any]]:
    """``frame_{1..N}.jpg`` (160x120, one colour per frame) for FRAME_DIRS, and the empty dir."""
    out = []
    for rel, count in FRAME_DIRS:
        palette = _frame_palette(builder.rng(rel), count)
        directory = builder.root / rel
        directory.mkdir(parents=True, exist_ok=True)
        for k in range(count):
            array = _video_frame(palette, k, 1, 160, 120)
            Image.fromarray(array, "RGB").save(directory / f"frame_{k + 1}.jpg", quality=85)
        out.append({"dir": rel, "frames": count})
    (builder.root / EMPTY_FRAME_DIR).mkdir(parents=True, exist_ok=True)
    return out
