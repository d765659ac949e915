"""lvita_data.media.video on tiny synthetic videos written with PyAV (CPU, each test < 1 s).

Every frame carries its own number as a 4x3 grid of 16-px black/white blocks (12 bits), which
survives lossy compression, so a decoded frame can be identified without trusting timestamps.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import av
import numpy as np
import pytest

from lvita_data.errors import SkipSample, SourceError
from lvita_data.media import video
from lvita_data.media.video import (
    VideoInfo,
    _decode_with_stats,
    decode_frames,
    list_frame_dir,
    probe_video,
)

W, H, BLOCK = 64, 48, 16
COLS, ROWS = W // BLOCK, H // BLOCK


def _pattern(i: int) -> np.ndarray:
    bits = [(i >> b) & 1 for b in range(COLS * ROWS)]
    grid = np.array(bits, dtype=np.uint8).reshape(ROWS, COLS) * 255
    img = np.kron(grid, np.ones((BLOCK, BLOCK), dtype=np.uint8))
    return np.repeat(img[:, :, None], 3, axis=2)


def frame_number(rgb: np.ndarray) -> int:
    assert rgb.shape == (H, W, 3) and rgb.dtype == np.uint8
    centers = rgb[BLOCK // 2 :: BLOCK, BLOCK // 2 :: BLOCK].mean(axis=2)
    bits = (centers > 128).astype(int).ravel()
    return int(sum(b << k for k, b in enumerate(bits)))


def make_video(
    path: Path,
    n: int,
    *,
    fps: int = 30,
    codec: str = "libx264",
    gop: int = 12,
    fmt: str | None = None,
    bframes: int = 0,
) -> Path:
    with av.open(str(path), "w", format=fmt) as out:
        stream = out.add_stream(codec, rate=fps)
        stream.width, stream.height, stream.pix_fmt = W, H, "yuv420p"
        stream.codec_context.gop_size = gop
        if codec == "libx264":  # fixed GOPs: no extra keyframes at "scene cuts"
            stream.options = {"x264-params": f"scenecut=0:min-keyint={gop}"}
        if bframes:  # libx264 uses B-frames by default; other encoders only when asked
            stream.codec_context.max_b_frames = bframes
        for i in range(n):
            frame = av.VideoFrame.from_ndarray(_pattern(i), format="rgb24")
            out.mux(stream.encode(frame))
        out.mux(stream.encode(None))
    return path


@pytest.fixture(scope="module")
def videos(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("videos")
    return {
        "gop12": make_video(d / "gop12.mp4", 300, gop=12),
        "gop250": make_video(d / "gop250.mp4", 600, gop=250, fps=24),
        "mpeg4": make_video(d / "mpeg4.mp4", 120, codec="mpeg4", gop=10, fps=10, bframes=2),
        "mkv": make_video(d / "x264.mkv", 90, gop=12, fmt="matroska"),
    }


def numbers(frames: list[np.ndarray]) -> list[int]:
    return [frame_number(f) for f in frames]


# --------------------------------------------------------------------------------------------
# probe


@pytest.mark.parametrize("fps", [10, 24, 30])
def test_probe_mp4_reports_written_frames_and_fps(tmp_path, fps):
    path = make_video(tmp_path / "v.mp4", 3 * fps + 1, fps=fps)
    info = probe_video(str(path))
    assert info == VideoInfo(
        num_frames=3 * fps + 1,
        fps=float(fps),
        width=W,
        height=H,
        duration_s=pytest.approx((3 * fps + 1) / fps, abs=1e-6),
        frames_estimated=False,
    )


@pytest.mark.parametrize(
    ("name", "codec", "fmt"), [("v.mkv", "libx264", "matroska"), ("v.webm", "libvpx", "webm")]
)
def test_probe_estimates_frames_when_container_has_no_count(tmp_path, name, codec, fmt):
    path = make_video(tmp_path / name, 75, fps=25, codec=codec, fmt=fmt)
    info = probe_video(str(path))
    assert info.frames_estimated
    assert abs(info.num_frames - 75) <= 1
    assert info.fps == 25.0
    assert (info.width, info.height) == (W, H)
    assert info.duration_s == pytest.approx(3.0, abs=0.05)


# --------------------------------------------------------------------------------------------
# decode: correct frames, seek only when it skips a GOP


def test_sparse_indices_across_gops_seek(videos):
    idx = [0, 37, 90, 151, 222, 299]
    frames, stats = _decode_with_stats(str(videos["gop12"]), idx)
    assert numbers(frames) == idx
    assert stats.seeks == 5  # every target after the first lies GOPs ahead
    assert stats.frames_decoded < 6 * 12 + 6  # at most one GOP per target
    assert all(f.shape == (H, W, 3) and f.dtype == np.uint8 for f in frames)


def test_dense_consecutive_indices_never_seek(videos):
    idx = list(range(5, 45))  # crosses three keyframes
    frames, stats = _decode_with_stats(str(videos["gop12"]), idx)
    assert numbers(frames) == idx
    assert stats.seeks == 0
    assert stats.frames_decoded <= 45


def test_targets_within_next_gop_boundary(videos):
    # 11 is the last frame of GOP 0, 12 the keyframe of GOP 1, 23 the frame before GOP 2.
    idx = [11, 12, 23, 24, 60]
    frames, stats = _decode_with_stats(str(videos["gop12"]), idx)
    assert numbers(frames) == idx
    assert stats.seeks == 1  # only 60 (GOP 5) is beyond the next keyframe


def test_first_and_last_frame(videos):
    frames, stats = _decode_with_stats(str(videos["gop12"]), [0, 299])
    assert numbers(frames) == [0, 299]
    assert stats.seeks == 1


def test_b_frames_are_mapped_in_presentation_order(videos):
    path = str(videos["gop12"])
    with av.open(path) as c:
        packets = [p for p in c.demux(c.streams.video[0]) if p.size]
        assert c.streams.video[0].codec_context.has_b_frames
    assert any(p.pts != p.dts for p in packets)  # decode order != presentation order
    idx = [1, 2, 3, 13, 14, 50, 51, 52, 53, 100, 298]
    assert numbers(decode_frames(path, idx)) == idx


def test_frames_are_bit_identical_to_a_full_forward_decode(videos):
    path = str(videos["gop12"])
    with av.open(path) as c:
        every = [f.to_ndarray(format="rgb24") for f in c.decode(video=0)]
    idx = [3, 40, 41, 100, 250, 299]
    for got, i in zip(decode_frames(path, idx), idx, strict=True):
        np.testing.assert_array_equal(got, every[i])


@pytest.mark.parametrize(("name", "target"), [("gop12", 203), ("gop250", 240), ("mpeg4", 56)])
def test_non_reference_frames_are_skipped_exactly(videos, name, target):
    """Frames between the keyframe and the target that no frame references are not decoded."""
    path = str(videos[name])
    with av.open(path) as c:
        packets = [p for p in c.demux(video=0) if p.size]
    with av.open(path) as c:
        every = [f.to_ndarray(format="rgb24") for f in c.decode(video=0)]
    pts = sorted(p.pts for p in packets)
    key = max(pts.index(p.pts) for p in packets if p.is_keyframe and pts.index(p.pts) <= target)
    (frame,), stats = _decode_with_stats(path, [target])
    np.testing.assert_array_equal(frame, every[target])
    assert target - key >= 5
    assert stats.frames_decoded < target - key + 1  # fewer than keyframe..target


def test_long_gop_sparse_targets(videos):
    idx = [10, 260, 300, 520, 599]
    frames, stats = _decode_with_stats(str(videos["gop250"]), idx)
    assert numbers(frames) == idx
    assert stats.seeks == 2  # into GOP 1 (260) and GOP 2 (520); 300 and 599 decode forward


@pytest.mark.parametrize(
    ("name", "codec", "fmt", "bframes"),
    [
        ("v.mkv", "libx264", "matroska", 0),
        ("v.ts", "libx264", "mpegts", 0),  # MPEG-TS seeks land after the keyframe: retries
        ("v.avi", "mpeg4", "avi", 2),
        ("v.webm", "libvpx-vp9", "webm", 0),
    ],
)
def test_containers_decode_bit_exact(tmp_path, name, codec, fmt, bframes):
    path = str(
        make_video(tmp_path / name, 60, fps=25, codec=codec, fmt=fmt, gop=10, bframes=bframes)
    )
    with av.open(path) as c:
        every = [f.to_ndarray(format="rgb24") for f in c.decode(video=0)]
    for idx in ([0, 13, 37, 50, 59], [9, 10, 11, 29, 30, 31, 58], [49]):
        frames, stats = _decode_with_stats(path, idx)
        assert numbers(frames) == idx
        for got, i in zip(frames, idx, strict=True):
            np.testing.assert_array_equal(got, every[i])
        assert stats.seeks >= 1


def test_seek_that_never_lands_falls_back_to_decoding_from_the_start(videos, monkeypatch):
    forward = video._ForwardDecoder._decode

    def always_late(self, seek_key_pts):
        if seek_key_pts is not None:
            raise video._Overshoot
        yield from forward(self, seek_key_pts)

    monkeypatch.setattr(video._ForwardDecoder, "_decode", always_late)
    frames, stats = _decode_with_stats(str(videos["gop12"]), [5, 100])
    assert numbers(frames) == [5, 100]
    assert stats.seeks == 1 and stats.seek_retries == 3  # two earlier keyframes, then reopen


def test_mpeg4_and_mkv(videos):
    assert numbers(decode_frames(str(videos["mpeg4"]), [0, 9, 10, 55, 119])) == [0, 9, 10, 55, 119]
    assert numbers(decode_frames(str(videos["mkv"]), [2, 30, 31, 89])) == [2, 30, 31, 89]


def test_empty_indices_and_thread_count(videos):
    assert decode_frames(str(videos["gop12"]), []) == []
    assert numbers(decode_frames(str(videos["gop12"]), [7, 70], num_threads=1)) == [7, 70]


# --------------------------------------------------------------------------------------------
# errors


def _reason(fn, *args) -> str:
    with pytest.raises(SkipSample) as e:
        fn(*args)
    return e.value.reason


def test_missing_file(tmp_path):
    missing = str(tmp_path / "nope.mp4")
    assert _reason(probe_video, missing) == "missing_media"
    assert _reason(decode_frames, missing, [0]) == "missing_media"


def test_truncated_mp4_is_bad_video(tmp_path):
    path = make_video(tmp_path / "t.mp4", 90)
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * 0.3)])
    assert _reason(probe_video, str(path)) == "bad_video"
    assert _reason(decode_frames, str(path), [0]) == "bad_video"


def test_truncated_mkv_is_bad_video_on_decode(tmp_path):
    path = make_video(tmp_path / "t.mkv", 90, fmt="matroska")
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * 0.3)])
    probe_video(str(path))  # the header survives, so probe still answers (estimated count)
    assert _reason(decode_frames, str(path), [0, 89]) == "bad_video"


def test_garbage_bytes_and_directory_are_bad_video(tmp_path):
    junk = tmp_path / "junk.mp4"
    junk.write_bytes(os.urandom(4096))
    assert _reason(probe_video, str(junk)) == "bad_video"
    assert _reason(decode_frames, str(junk), [0]) == "bad_video"
    assert _reason(probe_video, str(tmp_path)) == "bad_video"


@pytest.mark.parametrize("fmt", ["mp4", "matroska"])
def test_container_without_video_frames(tmp_path, fmt):
    path = tmp_path / f"empty.{fmt}"
    with av.open(str(path), "w", format=fmt) as out:
        stream = out.add_stream("libx264", rate=30)
        stream.width, stream.height, stream.pix_fmt = W, H, "yuv420p"
        out.start_encoding()  # header with a video track, then no frame at all
    assert path.stat().st_size > 0
    assert _reason(probe_video, str(path)) == "bad_video"
    assert _reason(decode_frames, str(path), [0]) == "bad_video"


def test_audio_only_container_has_no_video_stream(tmp_path):
    path = tmp_path / "a.wav"
    with av.open(str(path), "w") as out:
        stream = out.add_stream("pcm_s16le", rate=8000)
        frame = av.AudioFrame.from_ndarray(
            np.zeros((1, 800), np.int16), format="s16", layout="mono"
        )
        frame.sample_rate = 8000
        out.mux(stream.encode(frame))
        out.mux(stream.encode(None))
    with pytest.raises(SkipSample, match="no video stream") as e:
        probe_video(str(path))
    assert e.value.reason == "bad_video"


def test_index_beyond_last_frame_is_bad_video(videos):
    with pytest.raises(SkipSample, match="300 frames") as e:
        decode_frames(str(videos["gop12"]), [10, 300])
    assert e.value.reason == "bad_video"


@pytest.mark.parametrize("idx", [[5, 3], [2, 2], [-1, 4]])
def test_bad_indices_raise_value_error(videos, idx):
    with pytest.raises(ValueError):
        decode_frames(str(videos["gop12"]), idx)


def test_non_integer_indices_raise_type_error(videos):
    with pytest.raises(TypeError):
        decode_frames(str(videos["gop12"]), [0, 1.5])
    assert numbers(decode_frames(str(videos["gop12"]), np.array([4, 8]))) == [4, 8]


def test_unknown_backend(videos):
    with pytest.raises(ValueError, match="backend"):
        decode_frames(str(videos["gop12"]), [0], backend="opencv")


# --------------------------------------------------------------------------------------------
# decord backend


@pytest.mark.skipif(importlib.util.find_spec("decord") is None, reason="decord not installed")
def test_decord_backend_matches(videos):
    idx = [0, 37, 90, 299]
    assert numbers(decode_frames(str(videos["gop12"]), idx, backend="decord")) == idx


def test_decord_missing_raises_source_error(videos, monkeypatch):
    monkeypatch.setitem(sys.modules, "decord", None)  # makes `import decord` raise ImportError
    with pytest.raises(SourceError, match=r"pip install lvita\[decord\]"):
        decode_frames(str(videos["gop12"]), [0], backend="decord")


# --------------------------------------------------------------------------------------------
# frame directories


def _touch(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"")


def test_frame_dir_natural_sort_extensions_and_recursion(tmp_path):
    names = ["frame_10.jpg", "frame_2.jpg", "frame_1.png", "sub/frame_3.jpeg", "notes.txt"]
    names += ["frame_4.JPG", "thumbs.db", "sub/deeper/frame_11.jpg"]
    for n in names:
        _touch(tmp_path / n)
    got = [os.path.relpath(p, tmp_path) for p in list_frame_dir(str(tmp_path))]
    # Natural sort over full paths (as the original); ".JPG" is not a frame (case-sensitive).
    assert got == [
        "frame_1.png",
        "frame_2.jpg",
        "frame_10.jpg",
        os.path.join("sub", "deeper", "frame_11.jpg"),
        os.path.join("sub", "frame_3.jpeg"),
    ]


def test_frame_dir_empty_and_missing(tmp_path):
    _touch(tmp_path / "only.txt")
    assert _reason(list_frame_dir, str(tmp_path)) == "empty_frame_dir"
    assert _reason(list_frame_dir, str(tmp_path / "missing")) == "missing_media"
