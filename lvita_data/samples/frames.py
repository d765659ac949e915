"""Frame selection of Long-VITA, as pure functions of container metadata.

Video file with L frames at F fps, stage cap N frames, `max_fps` (1 in every stage):
    step = max(F / max_fps, L / (N + 1))
    indices = [int(i * step) for i in range(N)], kept while < L
so a short video is sampled at 1 fps from frame 0 and a long one gets N frames spread uniformly
(never reaching the last (N+1)-th slot). A directory of T frames is assumed to be 1 fps (2 fps
when its path contains "ShareGPTVideo"):
    target = int(min(T / fps * max_fps, N));  indices = [int(T / target) * k for k in range(target)]
The original divides by zero when target is 0; we raise `SkipSample(too_few_frames)` instead.

Beyond the original: `fit_frames_to_budget` lowers N until a sample's tokens fit the packed length
(the original drops such samples). The count of selected frames is monotone in N, so a binary
search over N finds the largest N that fits.
"""

from __future__ import annotations

from collections.abc import Callable

from lvita_data.errors import SkipSample
from lvita_data.schema import RejectReason

SHAREGPTVIDEO_MARKER = "ShareGPTVideo"


def video_frame_indices(
    num_frames: int, fps: float, *, max_frames: int, max_fps: float = 1.0
) -> list[int]:
    """Frame indices of a video file by the original formula (1 fps from 0, or N spread)."""
    if num_frames <= 0:
        return []
    step = max(fps / max_fps, num_frames / (max_frames + 1))
    return [index for index in (int(i * step) for i in range(max_frames)) if index < num_frames]


def frame_dir_fps(path: str) -> float:
    """Assumed frame rate of a directory of frames (the original's rule)."""
    return 2.0 if SHAREGPTVIDEO_MARKER in path else 1.0


def frame_dir_indices(
    num_frames: int, *, dir_fps: float, max_frames: int, max_fps: float = 1.0
) -> list[int]:
    """Indices into the naturally sorted frames of a directory (the original's rule)."""
    target = int(min(num_frames / dir_fps * max_fps, max_frames))
    if target <= 0:
        raise SkipSample(
            RejectReason.too_few_frames,
            f"{num_frames} frame(s) at {dir_fps:g} fps give 0 frames at {max_fps:g} fps "
            "(the original divides by zero here)",
        )
    stride = int(num_frames / target)
    return [stride * k for k in range(target)]


def fit_frames_to_budget(
    max_frames: int, tokens_for_cap: Callable[[int], int], budget: int
) -> int | None:
    """Largest frame cap n <= max_frames with tokens_for_cap(n) <= budget, or None.

    `tokens_for_cap(n)` is the sample's total length when every video of it is sampled with cap
    n; it must be non-decreasing in n (it is: fewer allowed frames never select more).
    """
    if tokens_for_cap(max_frames) <= budget:
        return max_frames
    low, high = 0, max_frames  # invariant: low fits (or is 0), high does not
    while high - low > 1:
        middle = (low + high) // 2
        if tokens_for_cap(middle) <= budget:
            low = middle
        else:
            high = middle
    return low or None
