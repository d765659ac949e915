"""Dynamic image tiling of Long-VITA (InternVL style), as pure arithmetic on the image size.

Candidate grids are (cols, rows) with min_tiles <= cols * rows <= max_tiles, sorted by area. The
chosen grid has the aspect ratio closest to the image's; on an exact tie the later (larger)
candidate wins when the image area exceeds half of the candidate's pixel area
(0.5 * 448^2 * cols * rows). The image is then stretched to (448 cols x 448 rows) and cut row-major.

Token layout (per image):
- 1 tile:   `<img>` + 256 x `<IMG_CONTEXT>` + `</img>`                       = 258 tokens;
- n tiles:  thumbnail as above, then per row `"\\n"` + per tile `<patch>` + 256 x
  `<PATCH_CONTEXT>` + `</patch>`                                               = 258 + rows + 258 n.
At 12 tiles that is 3,357 tokens for a 4x3 grid, but up to 3,366 for 1x12 (one "\\n" per row:
the reference's "max 3,357" holds only for 4x3). The ViT sees n + 1 tiles (thumbnail first) when
n > 1.

The candidate order reproduces the original exactly: it sorts a Python *set* of tuples by area, so
grids of equal area keep CPython's set iteration order; we build the same set the same way.
"""

from __future__ import annotations

from functools import lru_cache

from lvita_data.schema import TILE_SIZE

TOKENS_PER_TILE = 256
TILE_WRAPPED_TOKENS = TOKENS_PER_TILE + 2


@lru_cache(maxsize=64)
def candidate_grids(min_tiles: int = 1, max_tiles: int = 12) -> tuple[tuple[int, int], ...]:
    """(cols, rows) candidates in the original's order (area ascending, set order on ties)."""
    grids = set(
        (i, j)
        for n in range(min_tiles, max_tiles + 1)
        for i in range(1, n + 1)
        for j in range(1, n + 1)
        if min_tiles <= i * j <= max_tiles
    )
    return tuple(sorted(grids, key=lambda grid: grid[0] * grid[1]))


@lru_cache(maxsize=65536)
def choose_grid(
    width: int, height: int, *, min_tiles: int = 1, max_tiles: int = 12
) -> tuple[int, int]:
    """Grid (cols, rows) for an image of width x height pixels, exactly as Long-VITA chooses it."""
    if width <= 0 or height <= 0:
        raise ValueError(f"image size must be positive, got {width}x{height}")
    aspect_ratio = width / height
    area = width * height
    best_diff = float("inf")
    best = (1, 1)
    for cols, rows in candidate_grids(min_tiles, max_tiles):
        diff = abs(aspect_ratio - cols / rows)
        if diff < best_diff:
            best_diff, best = diff, (cols, rows)
        elif diff == best_diff and area > 0.5 * TILE_SIZE * TILE_SIZE * cols * rows:
            best = (cols, rows)
    return best


def num_tiles(grid: tuple[int, int]) -> int:
    """Tiles the ViT encodes for this grid: thumbnail + cols * rows, or 1 for a single tile."""
    n = grid[0] * grid[1]
    return 1 if n == 1 else n + 1


def count_image_tokens(grid: tuple[int, int]) -> int:
    """Tokens of one image in the LLM sequence: 258 or 258 + rows + 258 * cols * rows."""
    cols, rows = grid
    n = cols * rows
    return TILE_WRAPPED_TOKENS if n == 1 else TILE_WRAPPED_TOKENS + rows + TILE_WRAPPED_TOKENS * n
