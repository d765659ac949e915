"""Video I/O: probe a container, decode chosen frames, list a directory of frames.

Which frames to take is pure index math (`lvita_data.samples.frames`); this module only opens files.
Per-sample problems raise `SkipSample` with a `RejectReason`: `missing_media` for a missing
path, `bad_video` for anything FFmpeg cannot open, demux or decode up to the requested frame.

**Probe.** `probe_video` reads container metadata only: `stream.frames` when the container
stores it (MP4), else `round(duration * average_rate)` with `frames_estimated=True` (MKV,
WebM); fps = `average_rate` (else `guessed_rate`, `base_rate`). A plain `av.open` runs
`avformat_find_stream_info`, which opens the decoder with threads and decodes a frame: 22-30 ms
for a 720p H.264 MP4 on the benchmark machine (2-vCPU AMD EPYC VM). We pass it
`skip_frame=all, threads=1` (`_FAST_OPEN`): 1.7-2.5 ms per probe for 720p MP4s of 60 s and
5 min (up to 4 ms in noisy runs), 0.6-0.8 ms for a 64x48 clip. If the size is still unknown
after that, we reopen the plain way.

**Decode (PyAV, the default backend).** Two passes over the file:

1. *Index pass.* Demux every packet of the video stream without decoding and keep its pts and
   keyframe flag. Frame `i` of the video is the `i`-th smallest packet pts (presentation
   order, so B-frame reordering is handled); keyframe positions are those of keyframe packets.
   decord builds the same index when it opens a file. Cost: reading the file once, no decode
   (9,000 packets of a 5-minute 720p file, 58 MiB, in 76-130 ms from the page cache). The
   container's own index (`stream.index_entries`) is not enough: MP4 keeps decode timestamps
   there, which do not give presentation order, and MKV/WebM keep only cues. A decoded frame
   whose pts is not in the index means the file cannot be matched -> `bad_video`; so does a
   raw elementary stream (`.h264`), whose packets carry no timestamps.
2. *Decode pass*, on a fresh container, `thread_type="AUTO"`. For each target let `K` be the
   last keyframe at or before it. **Seek only if `K` lies beyond the frame right after the
   last decoded one**, i.e. only if forward decoding would cross a keyframe and decode frames
   that seeking skips; otherwise keep decoding forward. So consecutive or dense targets (1 fps,
   several per GOP) never seek or re-decode a GOP, and sparse targets skip whole GOPs. The seek
   goes to `K`'s own pts (`container.seek(pts_K, stream=stream, backward=True,
   any_frame=False)`), not to the target's: MP4 seeks over decode timestamps, and a target just
   before the next keyframe could otherwise land on that keyframe and be missed. After a seek,
   packets before the first keyframe are dropped; if that keyframe is later than `K` (MPEG-TS
   lands a few packets late) we retry from the one or two keyframes before `K`, and as a last
   resort decode from the start of a reopened file.
   On the way to a target, for codecs where this is exact (`_SKIP_NONREF_CODECS`: H.264,
   MPEG-1/2/4 Part 2) the decoder drops non-reference frames that are not targets
   (`skip_frame="NONREF"`, set per packet): no other frame uses them, so targets are
   bit-identical to a full decode (tested), and about half the frames of an x264 stream with
   B-pyramids are never decoded (17-23% less wall time in the benchmark). Only targets are
   converted to RGB.

Measured (benchmarks/bench_video_decode.py; benchmarks/results/video_decode.md), 1280x720
30 fps H.264 (x264 veryfast, keyint 250, B-frames), same decoder thread count for both
libraries, median of 5 fresh processes (the 2-vCPU VM varies +-30% run to run; the ratios are
paired per repetition):

    task (frames)          2 threads: time vs decord, peak RSS   1 thread: time, peak RSS
    16 of a 5-min video    2.95 s vs 4.36 s (0.68x), 0.31x       3.64 s vs 6.14 s (0.60x), 0.31x
    64 of a 5-min video    9.60 s vs 13.24 s (0.74x), 0.32x      12.02 s vs 16.93 s (0.68x), 0.35x
    1 fps of a 60-s clip   2.57 s vs 3.66 s (0.68x), 0.42x       3.58 s vs 4.94 s (0.75x), 0.41x

Our peak RSS growth is the returned frames plus ~24 MiB of decoder state; decord's is 2.8-5x
the frames (its batch NDArray and the numpy copy, plus its own buffers). Decoding every
frame forward with PyAV instead takes 15.4 s / 16.2 s / 3.4 s (2 threads) for the same tasks.

**Frame directories.** `list_frame_dir` walks a directory like the original
(`ImageProcessor.process_video`): every file under it whose name ends with ``png``, ``jpeg``
or ``jpg`` (case-sensitive and without a dot, exactly the original's test), naturally sorted
(`natsort.natsorted`) by full path.
"""

from __future__ import annotations

import bisect
import operator
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from fractions import Fraction

import av
import natsort
import numpy as np

from lvita_data.errors import SkipSample, SourceError
from lvita_data.schema import RejectReason

FRAME_SUFFIXES = ("png", "jpeg", "jpg")
"""Accepted frame-file name endings in a frame directory (the original's test)."""


@dataclass(frozen=True, slots=True)
class VideoInfo:
    """Container metadata of the first video stream."""

    num_frames: int
    fps: float
    width: int
    height: int
    duration_s: float
    frames_estimated: bool
    """True when the container has no frame count and `num_frames` = duration * fps."""


@dataclass(slots=True)
class DecodeStats:
    """What one PyAV decode did (for tests and benchmarks)."""

    packets_indexed: int = 0
    """Packets demuxed in the index pass."""
    frames_decoded: int = 0
    """Frames the decoder produced, targets included."""
    seeks: int = 0
    """Seeks issued by the seek rule (not counting retries)."""
    seek_retries: int = 0
    """Extra seeks after a seek overshot its target."""


# --------------------------------------------------------------------------------------------
# probe


def probe_video(path: str) -> VideoInfo:
    """Frame count, fps, size and duration of `path` from container metadata (no decoding).

    Raises `SkipSample("missing_media")` for a missing file and `SkipSample("bad_video")` for
    an unreadable container, no video stream, no frame rate or zero frames.
    """
    with _open(path) as container:
        stream = _video_stream(container, path)
        if not (stream.codec_context.width and stream.codec_context.height):
            container.close()  # size only known after decoding: let FFmpeg decode while probing
            with _open(path, fast=False) as slow:
                return _info(slow, _video_stream(slow, path), path)
        return _info(container, stream, path)


def _info(container: av.container.InputContainer, stream: av.VideoStream, path: str) -> VideoInfo:
    fps = _stream_fps(stream, path)
    duration = _duration_s(container, stream)
    num_frames = stream.frames
    estimated = num_frames <= 0
    if estimated:
        num_frames = round(duration * fps) if duration else 0
    if num_frames <= 0:
        raise SkipSample(RejectReason.bad_video, f"{path}: no video frames")
    return VideoInfo(
        num_frames=int(num_frames),
        fps=fps,
        width=int(stream.codec_context.width),
        height=int(stream.codec_context.height),
        duration_s=duration if duration else num_frames / fps,
        frames_estimated=estimated,
    )


_FAST_OPEN = {"skip_frame": "all", "threads": "1"}
"""Codec options for `avformat_find_stream_info` only: it reads packet headers but decodes no
frame and starts no thread (2-4 ms instead of 24-30 ms per open of a 720p H.264 MP4). The codec
context PyAV later decodes with is created separately and does not inherit them."""


def _open(path: str, *, fast: bool = True) -> av.container.InputContainer:
    if not os.path.exists(path):
        raise SkipSample(RejectReason.missing_media, path)
    if os.path.isdir(path):
        raise SkipSample(RejectReason.bad_video, f"{path}: is a directory, not a video file")
    try:
        return av.open(path, mode="r", options=_FAST_OPEN if fast else None)
    except FileNotFoundError as e:  # vanished between the check and the open
        raise SkipSample(RejectReason.missing_media, path) from e
    except av.FFmpegError as e:
        raise SkipSample(RejectReason.bad_video, f"{path}: cannot open container: {e}") from e


def _video_stream(container: av.container.InputContainer, path: str) -> av.VideoStream:
    if not container.streams.video:
        raise SkipSample(RejectReason.bad_video, f"{path}: no video stream")
    return container.streams.video[0]


def _stream_fps(stream: av.VideoStream, path: str) -> float:
    for rate in (stream.average_rate, stream.guessed_rate, stream.base_rate):
        if rate:  # None or 0 fall through
            return float(rate)
    raise SkipSample(RejectReason.bad_video, f"{path}: no frame rate in the container")


def _duration_s(container: av.container.InputContainer, stream: av.VideoStream) -> float | None:
    if stream.duration and stream.time_base:
        return float(stream.duration * stream.time_base)
    if container.duration:
        return float(Fraction(container.duration, av.time_base))
    return None


# --------------------------------------------------------------------------------------------
# decode


def decode_frames(
    path: str,
    indices: Sequence[int],
    *,
    backend: str = "pyav",
    num_threads: int = 0,
) -> list[np.ndarray]:
    """Decode the frames at `indices` (ascending, unique) of `path` as RGB uint8 HxWx3 arrays.

    Frame `i` is the `i`-th frame in presentation order. `backend` is ``"pyav"`` (seek-aware,
    see the module docstring) or ``"decord"`` (optional dependency). `num_threads` is the
    decoder thread count; 0 lets FFmpeg choose (one per core).

    Raises `ValueError` for bad `indices`, `SkipSample("missing_media")` for a missing file,
    `SkipSample("bad_video")` for a file that cannot be decoded up to the last index, and
    `SourceError` when the decord backend is asked for but not installed.
    """
    if backend == "pyav":
        return _decode_with_stats(path, indices, num_threads=num_threads)[0]
    if backend == "decord":
        return _decode_decord(path, _check_indices(indices), num_threads)
    raise ValueError(f"unknown video backend {backend!r}; expected 'pyav' or 'decord'")


def _check_indices(indices: Sequence[int]) -> list[int]:
    out = [operator.index(i) for i in indices]  # ints (numpy ints too), never floats
    if any(i < 0 for i in out):
        raise ValueError(f"frame indices must be >= 0, got {out}")
    if any(b <= a for a, b in zip(out, out[1:], strict=False)):
        raise ValueError(f"frame indices must be sorted ascending and unique, got {out}")
    return out


def _decode_with_stats(
    path: str, indices: Sequence[int], *, num_threads: int = 0
) -> tuple[list[np.ndarray], DecodeStats]:
    """PyAV backend of `decode_frames`, also returning what it did."""
    wanted = _check_indices(indices)
    stats = DecodeStats()
    with _open(path) as container:
        index = _index_packets(container, _video_stream(container, path), path, stats)
    if not wanted:
        return [], stats
    if wanted[-1] >= len(index.frame_pts):
        raise SkipSample(
            RejectReason.bad_video,
            f"{path}: frame {wanted[-1]} requested, the stream has {len(index.frame_pts)} frames",
        )
    decoder = _ForwardDecoder(path, index, wanted, num_threads, stats)
    try:
        return decoder.take(wanted), stats
    except av.FFmpegError as e:
        raise SkipSample(RejectReason.bad_video, f"{path}: decoding failed: {e}") from e
    finally:
        decoder.close()


@dataclass(frozen=True, slots=True)
class _PacketIndex:
    frame_pts: list[int]
    """pts of every frame, ascending: frame i of the video has pts frame_pts[i]."""
    key_frames: list[int]
    """Frame indices of the keyframes, ascending."""


def _index_packets(
    container: av.container.InputContainer, stream: av.VideoStream, path: str, stats: DecodeStats
) -> _PacketIndex:
    """Demux (no decoding) every packet of `stream`: frame pts in presentation order, keyframes."""
    frame_pts: list[int] = []
    key_pts: list[int] = []
    try:
        for packet in container.demux(stream):
            if packet.size == 0 or packet.is_discard:  # flush packet at EOF / edit-list drop
                continue
            if packet.pts is None:
                raise SkipSample(RejectReason.bad_video, f"{path}: packet without a timestamp")
            frame_pts.append(packet.pts)
            if packet.is_keyframe:
                key_pts.append(packet.pts)
    except av.FFmpegError as e:
        raise SkipSample(RejectReason.bad_video, f"{path}: demuxing failed: {e}") from e
    stats.packets_indexed = len(frame_pts)
    if not frame_pts:
        raise SkipSample(RejectReason.bad_video, f"{path}: no video frames")
    if not key_pts:
        raise SkipSample(RejectReason.bad_video, f"{path}: no keyframe in the stream")
    frame_pts.sort()
    key_frames = sorted(bisect.bisect_left(frame_pts, p) for p in key_pts)
    return _PacketIndex(frame_pts, key_frames)


_SKIP_NONREF_CODECS = frozenset({"h264", "mpeg1video", "mpeg2video", "mpeg4"})
"""Decoders whose non-reference frames (H.264 nal_ref_idc 0; MPEG-1/2/4 B-frames) no other frame
uses. Not HEVC: its sub-layer non-reference pictures can be referenced by higher temporal layers."""


class _Overshoot(Exception):
    """A seek landed after the keyframe it aimed at."""


class _ForwardDecoder:
    """Decodes forward through one stream, seeking only to skip frames up to a keyframe."""

    def __init__(
        self,
        path: str,
        index: _PacketIndex,
        wanted: list[int],
        num_threads: int,
        stats: DecodeStats,
    ) -> None:
        self.path, self.index, self.num_threads, self.stats = path, index, num_threads, stats
        self.target_pts = frozenset(index.frame_pts[i] for i in wanted)
        self.container: av.container.InputContainer | None = None
        self._restart()

    def _restart(self) -> None:
        """Open a fresh container: decoding starts at the first packet."""
        self.close()
        self.container = _open(self.path)
        self.stream = _video_stream(self.container, self.path)
        ctx = self.stream.codec_context
        ctx.thread_type = "AUTO"
        ctx.thread_count = self.num_threads
        self.skip_nonref = ctx.name in _SKIP_NONREF_CODECS
        self.frames = self._decode(seek_key_pts=None)
        self.pos = -1
        """Frame index of the last decoded frame; -1 for a decoder at the stream start."""

    def close(self) -> None:
        if self.container is not None:
            self.container.close()

    def take(self, wanted: list[int]) -> list[np.ndarray]:
        keys = self.index.key_frames
        out = []
        for target in wanted:
            k = bisect.bisect_right(keys, target) - 1  # last keyframe at or before the target
            if k >= 0 and keys[k] > self.pos + 1:  # forward decoding would waste frames
                self.stats.seeks += 1
                frame = self._seek_and_find(k, target)
            else:
                frame = self._find(target)
            out.append(frame.to_ndarray(format="rgb24"))
        return out

    def _decode(self, seek_key_pts: int | None) -> Iterator[av.VideoFrame]:
        """Frames from the demuxer's current position.

        After a seek, packets before the first keyframe are dropped (not decodable), and
        `_Overshoot` is raised if that keyframe lies after `seek_key_pts`, the keyframe the
        target needs (some demuxers, e.g. MPEG-TS, land a few packets late). Where exact
        (`_SKIP_NONREF_CODECS`), the decoder drops non-reference frames that are not targets
        (`skip_frame="NONREF"`, set per packet): no other frame depends on them, so every
        target decodes bit-identically.
        """
        ctx = self.stream.codec_context
        waiting = seek_key_pts is not None
        for packet in self.container.demux(self.stream):
            if waiting and packet.size:
                if not packet.is_keyframe:
                    continue
                if packet.pts is None or packet.pts > seek_key_pts:
                    raise _Overshoot
                waiting = False
            if self.skip_nonref:
                ctx.skip_frame = "DEFAULT" if packet.pts in self.target_pts else "NONREF"
            yield from packet.decode()
        if waiting:  # no keyframe between the landing point and the end of the stream
            raise _Overshoot

    def _seek_and_find(self, k: int, target: int) -> av.VideoFrame:
        keys, frame_pts = self.index.key_frames, self.index.frame_pts
        # Aim at the keyframe itself, then at the two before it (decoding must start at a
        # keyframe no later than keys[k]); last resort: decode from the start of a freshly
        # opened file (slow but exact).
        for attempt in dict.fromkeys((k, max(k - 1, 0), max(k - 2, 0))):
            self.stats.seek_retries += attempt != k
            offset = frame_pts[keys[attempt]]
            self.container.seek(offset, stream=self.stream, backward=True, any_frame=False)
            self.frames = self._decode(seek_key_pts=frame_pts[keys[k]])
            self.pos = keys[attempt] - 1
            try:
                return self._find(target)
            except _Overshoot:
                continue
        self.stats.seek_retries += 1
        self._restart()
        return self._find(target)

    def _find(self, target: int) -> av.VideoFrame:
        """Decode forward to frame `target`."""
        frame_pts = self.index.frame_pts
        for frame in self.frames:
            self.stats.frames_decoded += 1
            i = bisect.bisect_left(frame_pts, frame.pts) if frame.pts is not None else -1
            if i < 0 or i >= len(frame_pts) or frame_pts[i] != frame.pts:
                raise SkipSample(
                    RejectReason.bad_video,
                    f"{self.path}: decoded frame pts {frame.pts} not in the stream",
                )
            self.pos = i
            if i == target:
                return frame
            if i > target:
                raise SkipSample(RejectReason.bad_video, f"{self.path}: frame {target} not decoded")
        raise SkipSample(RejectReason.bad_video, f"{self.path}: stream ended before frame {target}")


def _decode_decord(path: str, indices: list[int], num_threads: int) -> list[np.ndarray]:
    try:
        import decord
    except Exception as e:  # ImportError, or a broken native library
        raise SourceError("decord backend needs 'decord': pip install lvita[decord]") from e
    if not os.path.exists(path):
        raise SkipSample(RejectReason.missing_media, path)
    try:
        reader = decord.VideoReader(path, ctx=decord.cpu(0), num_threads=num_threads)
        if indices and indices[-1] >= len(reader):
            raise SkipSample(
                RejectReason.bad_video,
                f"{path}: frame {indices[-1]} requested, the stream has {len(reader)}",
            )
        if not indices:
            return []
        batch = reader.get_batch(indices).asnumpy()
    except (decord.DECORDError, RuntimeError) as e:
        raise SkipSample(RejectReason.bad_video, f"{path}: decord: {e}") from e
    return list(batch)


# --------------------------------------------------------------------------------------------
# frame directories


def list_frame_dir(path: str) -> list[str]:
    """Frame files under `path` (recursive), naturally sorted, as the original collects them.

    Raises `SkipSample("missing_media")` if `path` is not a directory and
    `SkipSample("empty_frame_dir")` if it holds no frame file.
    """
    if not os.path.isdir(path):
        raise SkipSample(RejectReason.missing_media, path)
    files = [
        os.path.join(root, name)
        for root, _dirs, names in os.walk(path)
        for name in names
        if name.endswith(FRAME_SUFFIXES)
    ]
    if not files:
        raise SkipSample(RejectReason.empty_frame_dir, f"{path}: no png/jpeg/jpg files")
    return natsort.natsorted(files)
