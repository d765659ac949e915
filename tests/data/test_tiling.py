"""Dynamic tiling and vision token counts against long-vita.md section 2."""

import itertools

import numpy as np
import pytest

from lvita_data.samples.tiling import candidate_grids, choose_grid, count_image_tokens, num_tiles
from lvita_data.samples.vision_tokens import (
    image_token_ids,
    video_token_ids,
    vision_placeholder_positions,
)
from lvita_data.tokenizer.special_tokens import SpecialIds

IDS = SpecialIds(*range(1000, 1015))


def reference_grid(width: int, height: int, max_num: int = 12) -> tuple[int, int]:
    """Transcription of the rule in the reference (InternVL's find_closest_aspect_ratio)."""
    ratios = set(
        (i, j)
        for n in range(1, max_num + 1)
        for i in range(1, n + 1)
        for j in range(1, n + 1)
        if 1 <= i * j <= max_num
    )
    ratios = sorted(ratios, key=lambda x: x[0] * x[1])
    best_diff, best = float("inf"), (1, 1)
    for ratio in ratios:
        diff = abs(width / height - ratio[0] / ratio[1])
        if diff < best_diff:
            best_diff, best = diff, ratio
        elif diff == best_diff and width * height > 0.5 * 448 * 448 * ratio[0] * ratio[1]:
            best = ratio
    return best


@pytest.mark.parametrize(
    ("size", "grid"),
    [
        ((448, 448), (1, 1)),  # square, small: tie with 2x2 lost on area
        ((896, 896), (2, 2)),  # square, area > 0.5 * 448^2 * 4: larger grid wins the tie
        ((1344, 1344), (3, 3)),
        ((32, 32), (1, 1)),
        ((900, 450), (2, 1)),  # 2:1, area too small for the 4x2 tie
        ((1800, 900), (4, 2)),  # 2:1, big enough for 4x2
        ((448, 900), (1, 2)),
        ((1792, 1344), (4, 3)),
        ((1344, 1792), (3, 4)),
        ((300, 1200), (1, 4)),
        ((2000, 500), (4, 1)),
        ((1344, 896), (3, 2)),
        ((5000, 400), (12, 1)),
        ((640, 480), (4, 3)),
    ],
)
def test_grid_anchors(size, grid):
    assert choose_grid(*size) == grid
    assert reference_grid(*size) == grid


def test_grid_matches_reference_rule_on_many_sizes():
    sizes = list(itertools.product(range(16, 4000, 97), range(16, 4000, 89)))
    assert len(sizes) > 1500
    for width, height in sizes:
        assert choose_grid(width, height) == reference_grid(width, height), (width, height)
    grids = {choose_grid(w, h) for w, h in sizes}
    assert {(1, 1), (2, 1), (1, 2), (3, 2), (4, 3), (3, 4), (2, 2), (3, 3)} <= grids


def test_candidates_sorted_by_area_and_bounded():
    grids = candidate_grids(1, 12)
    areas = [c * r for c, r in grids]
    assert areas == sorted(areas) and max(areas) == 12 and min(areas) == 1
    assert (
        len(grids)
        == len(set(grids))
        == sum(1 for c in range(1, 13) for r in range(1, 13) if c * r <= 12)
    )


@pytest.mark.parametrize(
    ("grid", "tokens", "tiles"),
    [
        ((1, 1), 258, 1),
        ((2, 1), 258 + 1 + 516, 3),
        ((1, 2), 258 + 2 + 516, 3),
        ((4, 3), 3357, 13),
        ((3, 4), 3358, 13),
        ((1, 12), 3366, 13),
    ],
)
def test_token_counts(grid, tokens, tiles):
    cols, rows = grid
    n = cols * rows
    expected = 258 if n == 1 else 258 + rows + 258 * n
    assert count_image_tokens(grid) == expected == tokens
    assert num_tiles(grid) == tiles
    assert image_token_ids(grid, IDS).shape[0] == tokens


def test_image_layout_is_thumbnail_then_rows():
    ids = image_token_ids((2, 2), IDS)
    assert ids[0] == IDS.img_start and ids[257] == IDS.img_end
    assert (ids[1:257] == IDS.img_context).all()
    row = 258
    for _ in range(2):
        assert ids[row] == IDS.newline
        for tile in range(2):
            start = row + 1 + tile * 258
            assert ids[start] == IDS.patch_start and ids[start + 257] == IDS.patch_end
            assert (ids[start + 1 : start + 257] == IDS.patch_context).all()
        row += 1 + 2 * 258
    assert row == ids.shape[0]
    assert vision_placeholder_positions(ids, IDS).shape[0] == 256 * 5


def test_video_layout():
    ids = video_token_ids(3, IDS)
    assert ids.shape[0] == 3 * 258
    blocks = ids.reshape(3, 258)  # [frames, 258]
    assert (blocks[:, 0] == IDS.vid_start).all() and (blocks[:, -1] == IDS.vid_end).all()
    assert (blocks[:, 1:-1] == IDS.vid_context).all()
    assert not ids.flags.writeable
    np.testing.assert_array_equal(video_token_ids(4096, IDS).shape, (1_056_768,))
