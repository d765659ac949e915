"""The tokens of one packed sample against its meta and the chat template.

- Vision: the sample's vision blocks are exactly the ids its meta implies (grid per image,
  frames per video, in `media_order`), with no other vision ids and no unexpanded
  `<image>`/`<video>` tag; its 256-placeholder groups == meta `num_tiles` == the tiles its
  images and videos stand for.
- Text: the sample parses as ChatML turns (``<|im_start|>role\\n ... <|im_end|>\\n``) and the
  labels equal the template's: assistant content + `<|im_end|>` + `\\n`, vision tokens excluded;
  -100 elsewhere.

Known limit: the ChatML parse cannot tell a turn boundary from text that itself contains the
literal special tokens `<|im_end|>\\n<|im_start|>{role}\\n` (the tokenizer turns them into
special ids); such a record would be reported as a label mismatch.
"""

from __future__ import annotations

import numpy as np

from lvita_data.samples.tiling import TOKENS_PER_TILE, num_tiles
from lvita_data.samples.vision_tokens import image_token_ids, video_token_ids
from lvita_data.schema import IGNORE_INDEX
from lvita_data.shards.format import media_order
from lvita_data.tokenizer.special_tokens import SpecialIds
from lvita_data.verify.report import SampleProblems
from lvita_data.verify.settings import Settings

MAX_GRID = 64
"""Largest cols * rows of an image accepted from a meta (Long-VITA uses at most 12)."""


def _expected_vision(
    sample: dict, version: int, special: SpecialIds, max_tiles: int
) -> list[tuple[np.ndarray, int]]:
    """(ids, tiles) of each vision block of a packed sample, in order of appearance; at most
    `max_tiles` in all (T / 256: every tile takes 256 placeholders), so a meta that claims a
    grid or a frame count of 10^18 is reported, not expanded."""
    blocks = []
    total = 0
    order = media_order(sample, version)
    for kind, index in order:
        if kind == "image":
            image = sample["images"][index]
            grid = (int(image["grid"][0]), int(image["grid"][1]))
            if min(grid) < 1 or grid[0] * grid[1] > MAX_GRID or image["tiles"] != num_tiles(grid):
                raise ValueError(f"image {index}: grid {grid} with {image['tiles']} tiles")
            tiles = num_tiles(grid)
        else:  # a video (`media_order` checked the kind)
            frames = sample["videos"][index]["frames"]
            if not frames:
                raise ValueError(f"video {index} has no frames")
            tiles = len(frames)
        total += tiles
        if total > max_tiles:
            raise ValueError(f"its media stand for more than {max_tiles} tiles (T / 256)")
        if kind == "image":
            blocks.append((image_token_ids(grid, special), tiles))
        else:
            blocks.append((video_token_ids(tiles, special), tiles))
    for kind, media in (("image", sample["images"]), ("video", sample["videos"])):
        listed = sorted(index for k, index in order if k == kind)
        if listed != list(range(len(media))):
            raise ValueError(f"media_order does not list each of the {len(media)} {kind}s once")
    return blocks


def check_text(
    number: int,
    offset: int,
    ids: np.ndarray,
    labels: np.ndarray,
    sample: dict,
    version: int,
    settings: Settings,
    out: SampleProblems,
) -> int:
    """Vision blocks, ChatML turns and labels of packed sample `number` of a pack in shard
    format `version`; returns its tiles."""
    special = settings.special
    what = f"packed sample {number} ({sample.get('dataset')}, record {sample.get('record')})"
    try:
        blocks = _expected_vision(sample, version, special, settings.max_seq_len // TOKENS_PER_TILE)
    except (KeyError, TypeError, ValueError, IndexError) as error:
        out.add(f"{what}: media metadata malformed: {error}", "meta.json")
        return 0
    tiles = sum(t for _, t in blocks)
    is_vision_id = np.isin(ids, settings.vision_ids)
    vision = np.zeros(ids.shape[0], dtype=bool)
    cursor = 0
    starts = np.flatnonzero((ids == special.img_start) | (ids == special.vid_start))
    for number_block, (block, _) in enumerate(blocks):
        following = starts[starts >= cursor]
        if following.size == 0:
            out.add(f"{what}: vision block {number_block} of its media_order is missing")
            return tiles
        start = int(following[0])
        if not np.array_equal(ids[start : start + block.shape[0]], block):
            out.add(
                f"{what}: vision block {number_block} at position {offset + start} differs "
                f"from the layout its meta implies",
                "input_ids.npy",
            )
            return tiles
        vision[start : start + block.shape[0]] = True
        cursor = start + block.shape[0]
    stray = is_vision_id & ~vision
    if stray.any():
        out.add(
            f"{what}: {int(stray.sum())} vision id(s) outside the blocks its meta implies "
            f"(first at position {offset + int(np.flatnonzero(stray)[0])})",
            "input_ids.npy",
        )
        return tiles
    tags = np.isin(ids, [special.image_tag, special.video_tag])
    if tags.any():
        out.add(f"{what}: unexpanded <image>/<video> tag id in input_ids", "input_ids.npy")
    contexts = int(np.isin(ids, special.vision_context_ids).sum())
    if contexts != TOKENS_PER_TILE * tiles or sample.get("num_tiles") != tiles:
        out.add(
            f"{what}: {contexts} vision placeholders, meta num_tiles {sample.get('num_tiles')}, "
            f"its images and videos stand for {tiles} tile(s)",
            "meta.json",
        )

    # ChatML turns: <|im_start|>role\n ... <|im_end|>\n, vision blocks inside the content
    prefixes = settings.role_prefix
    n = ids.shape[0]

    def role_at(position: int) -> str | None:
        for role, prefix in prefixes.items():
            size = prefix.shape[0]
            if position + size <= n and np.array_equal(ids[position : position + size], prefix):
                return role
        return None

    ends = np.flatnonzero((ids[:-1] == special.im_end) & (ids[1:] == special.newline))
    expected = np.full(n, IGNORE_INDEX, dtype=np.int32)
    position = 0
    while position < n:
        role = role_at(position)
        if role is None:
            out.add(
                f"{what}: no ChatML turn starts at position {offset + position}", "input_ids.npy"
            )
            return tiles
        content = position + prefixes[role].shape[0]
        end = None
        for q in ends[np.searchsorted(ends, content) :].tolist():
            if q + 2 == n or (ids[q + 2] == special.im_start and role_at(q + 2) is not None):
                end = q + 2
                break
        if end is None:
            out.add(
                f"{what}: the {role} turn at position {offset + position} never ends with "
                f"<|im_end|>\\n",
                "input_ids.npy",
            )
            return tiles
        if role == "assistant":
            expected[content:end] = np.where(vision[content:end], IGNORE_INDEX, ids[content:end])
        position = end
    wrong = np.flatnonzero(labels != expected)
    if wrong.size:
        first = int(wrong[0])
        out.add(
            f"{what}: {wrong.size} label(s) differ from the template (first at position "
            f"{offset + first}: label {int(labels[first])}, expected {int(expected[first])}, "
            f"id {int(ids[first])}{', a vision token' if vision[first] else ''})",
            "labels.npy",
        )
    return tiles
