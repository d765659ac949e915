"""Vision token layout of Long-VITA as id arrays (pure; no tokenizer, no pixels).

`image_token_ids(grid)` and `video_token_ids(num_frames)` return exactly the ids that replace one
`<image>` / `<video>` tag (see `lvita_data.samples.tiling` for the image layout). A video frame is
one 448 tile: `<vid>` + 256 x `<VID_CONTEXT>` + `</vid>` = 258 tokens, no timestamps or separators.
Arrays are cached per (grid, ids) and per frame count, so assembling a sample is a concatenation.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np

from lvita_data.samples.tiling import TILE_WRAPPED_TOKENS, TOKENS_PER_TILE
from lvita_data.tokenizer.special_tokens import SpecialIds

FRAME_TOKENS = TILE_WRAPPED_TOKENS


def count_video_tokens(num_frames: int) -> int:
    return FRAME_TOKENS * num_frames


def _wrapped(start: int, context: int, end: int) -> np.ndarray:
    block = np.full(TILE_WRAPPED_TOKENS, context, dtype=np.int32)
    block[0], block[-1] = start, end
    return block


@lru_cache(maxsize=256)
def image_token_ids(grid: tuple[int, int], ids: SpecialIds) -> np.ndarray:
    """int32 ids of one image with this (cols, rows) grid; read-only (shared cache)."""
    cols, rows = grid
    parts = [_wrapped(ids.img_start, ids.img_context, ids.img_end)]
    if cols * rows > 1:
        tile = _wrapped(ids.patch_start, ids.patch_context, ids.patch_end)
        row = np.concatenate([np.array([ids.newline], dtype=np.int32)] + [tile] * cols)
        parts.extend([row] * rows)
    out = np.concatenate(parts)
    out.flags.writeable = False
    return out


@lru_cache(maxsize=4096)
def video_token_ids(num_frames: int, ids: SpecialIds) -> np.ndarray:
    """int32 ids of a video of num_frames frames; read-only (shared cache)."""
    out = np.tile(_wrapped(ids.vid_start, ids.vid_context, ids.vid_end), num_frames)
    out.flags.writeable = False
    return out


def vision_placeholder_positions(input_ids: np.ndarray, ids: SpecialIds) -> np.ndarray:
    """Positions of the context tokens that vision features overwrite, in sequence order."""
    return np.flatnonzero(np.isin(input_ids, ids.vision_context_ids))


def num_vision_tiles_in(input_ids: np.ndarray, ids: SpecialIds) -> int:
    """Number of 448 tiles / frames the ids stand for (256 placeholders each)."""
    count = int(np.isin(input_ids, ids.vision_context_ids).sum())
    if count % TOKENS_PER_TILE:
        raise ValueError(f"{count} vision placeholders is not a multiple of {TOKENS_PER_TILE}")
    return count // TOKENS_PER_TILE
