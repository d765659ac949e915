"""Frame index formulas of long-vita.md section 2 and the fit-to-budget search."""

import pytest

from lvita_data.errors import SkipSample
from lvita_data.samples.frames import (
    fit_frames_to_budget,
    frame_dir_fps,
    frame_dir_indices,
    video_frame_indices,
)


def test_short_video_is_one_fps_from_frame_zero():
    assert video_frame_indices(300, 30.0, max_frames=64) == list(range(0, 300, 30))


def test_long_video_spreads_n_frames_past_n_plus_one():
    num_frames, n = 9000, 16
    step = num_frames / (n + 1)
    expected = [int(i * step) for i in range(n)]
    assert video_frame_indices(num_frames, 30.0, max_frames=n) == expected
    assert expected[-1] < num_frames - step  # the (N+1)-th slot is never reached


def test_boundary_between_rules():
    # 65 s at 30 fps with N = 64: L / (N + 1) = 30 = F / max_fps exactly.
    assert video_frame_indices(1950, 30.0, max_frames=64) == [30 * i for i in range(64)]
    # One more second: spread wins.
    got = video_frame_indices(1980, 30.0, max_frames=64)
    assert len(got) == 64 and got[1] == int(1980 / 65)


def test_4096_frame_cap_at_one_fps():
    assert len(video_frame_indices(90_000, 25.0, max_frames=4096)) == 3600
    assert len(video_frame_indices(25 * 3 * 3600, 25.0, max_frames=4096)) == 4096


def test_fractional_fps_and_max_fps():
    got = video_frame_indices(100, 29.97, max_frames=8, max_fps=2.0)
    step = max(29.97 / 2.0, 100 / 9)
    assert got == [int(i * step) for i in range(8) if int(i * step) < 100]


def test_empty_video():
    assert video_frame_indices(0, 30.0, max_frames=8) == []


def test_frame_dirs():
    assert frame_dir_fps("/data/ShareGPTVideo/train/abc") == 2.0
    assert frame_dir_fps("/data/other/abc") == 1.0
    assert frame_dir_indices(12, dir_fps=1.0, max_frames=64) == list(range(12))
    assert frame_dir_indices(100, dir_fps=1.0, max_frames=16) == [6 * k for k in range(16)]
    assert frame_dir_indices(10, dir_fps=2.0, max_frames=64) == [2 * k for k in range(5)]


def test_frame_dir_division_by_zero_is_a_reject():
    with pytest.raises(SkipSample) as info:
        frame_dir_indices(1, dir_fps=2.0, max_frames=64)
    assert info.value.reason == "too_few_frames"


def test_fit_frames_to_budget_finds_largest_fitting_cap():
    def length(cap: int) -> int:
        return 100 + 258 * len(video_frame_indices(9000, 30.0, max_frames=cap))

    assert fit_frames_to_budget(64, length, 10**9) == 64
    budget = 100 + 258 * 20
    fitted = fit_frames_to_budget(64, length, budget)
    assert fitted == 20 and length(fitted) <= budget < length(fitted + 1)
    assert fit_frames_to_budget(64, length, 50) is None
