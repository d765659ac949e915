"""One pack of a shard, checked: `parse_pack` -> `Pack` (no I/O: the members are handed in).

Every pack is checked while it is read: the four arrays (inflated from ``arrays.npz`` in formats
2 and 3 with each array's size bounded before inflating, ``.npy`` members in format 1) are int32
[T] (cu_seqlens [n + 1] from 0 to T); the media members (format 3: inside ``media.tar``, read by
the strict tar scan; formats 1 and 2: next to the arrays) hold the stored tiles ``tile000000 ..
tile{M-1}`` in the meta's tile format (M = ``stored_tiles``, ``num_tiles`` in format 1), and
every image of the meta that names a ``member`` (stored as its source bytes) names an ``image*``
member, with a positive size and a grid whose tile count it states; and the number of vision
placeholders in ``input_ids`` is exactly 256 * N for the N tiles the pack's media stand for
(`Pack.tile_sources`, walked in each sample's ``media_order``). The tokens (`_check_tokens`,
O(T)): ``cu_seqlens`` rises strictly with one segment per sample of the meta, ``position_ids``
follow it, ids are in the vocabulary and every label is -100 or its input id (-100 on padding
and placeholders). A violation raises `LoaderError` naming the shard and the key. Pixels are
decoded later (`batch`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

from lvita_data.errors import LoaderError, ShardFormatError
from lvita_data.samples.tiling import TOKENS_PER_TILE, num_tiles
from lvita_data.schema import IGNORE_INDEX
from lvita_data.shards.format import (
    ARRAY_MEMBERS,
    ARRAYS_NPZ,
    FORMAT_MEDIA,
    FORMAT_TILES,
    MEDIA_TAR,
    SHARD_FORMATS,
    load_npy,
    load_npz,
    media_order,
    npz_limit,
    parse_json,
    read_media_tar,
)

ARRAY_NAMES = tuple(ARRAY_MEMBERS)

_TILE_NAME = re.compile(r"^tile(\d+)\.([a-z0-9]+)$")
_IMAGE_NAME = re.compile(r"^image\d{6}\.[a-z0-9]+$")
TILE_FORMATS = ("png", "webp", "jpeg", "raw")
"""Tile formats a pack's meta may name (`lvita_data.media.tiles`)."""
MAX_GRID_TILES = 64
"""Upper bound of cols * rows accepted from a shard (Long-VITA uses at most 12)."""


@dataclass(frozen=True, slots=True)
class SourceImage:
    """An image stored as its source bytes (formats 2 and 3): its member, its bytes, and the
    size and grid the pack's tokens were planned for."""

    member: str
    data: memoryview
    size: tuple[int, int]
    grid: tuple[int, int]


TileSource = tuple[SourceImage | None, int]
"""Where one vision tile comes from: (None, j) the stored tile j, (image, k) tile k of the
image cut with `lvita_data.media.tiles.image_tiles` (thumbnail first)."""


@dataclass(slots=True)
class Pack:
    """One checked pack: the shard's arrays, its meta.json and its encoded pixels (not decoded)."""

    key: str
    input_ids: np.ndarray
    labels: np.ndarray
    position_ids: np.ndarray
    cu_seqlens: np.ndarray
    meta: dict
    tiles: list[memoryview]
    """The stored tiles in order (video frames, and the tiles of images stored as tiles)."""
    tile_format: str
    placeholders: np.ndarray  # int64 [n_tiles, 256], positions within the pack
    tile_sources: list[TileSource]
    """One entry per vision tile, in placeholder order."""
    where: str
    """Shard and key, for errors."""


def parse_pack(
    key: str,
    members: dict[str, memoryview],
    *,
    where: str,
    seq_len: int,
    vision_ids: tuple[int, int, int],
    vocab_size: int | None = None,
    reset_attention: bool | None = None,
) -> Pack:
    """Check one pack's members (see the module docstring) and return it as a `Pack`.

    Args:
        key, members: the pack's sample key and {suffix: bytes}.
        where: names the pack in errors (shard and key).
        seq_len: T, the length of every array (``pack.max_seq_len`` of the build).
        vision_ids: the (IMG, PATCH, VID) context ids whose count must be 256 per tile.
        vocab_size: token ids must be below it (None: only >= 0 is checked).
        reset_attention: the build's ``pack.reset_attention`` (None: either position layout).

    Raises:
        LoaderError: a member is missing or malformed, or the tiles and placeholders disagree.
    """
    if "meta.json" not in members:
        raise LoaderError(f"{where}: missing ['meta.json']")
    try:
        meta = parse_json(members["meta.json"], "meta.json")
    except ShardFormatError as error:
        raise LoaderError(f"{where}: {error}") from None
    if not isinstance(meta, dict):
        raise LoaderError(f"{where}: meta.json is not an object")
    version = meta.get("format", FORMAT_TILES)
    if version not in SHARD_FORMATS:
        raise LoaderError(
            f"{where}: meta.json format {version!r}, this loader reads {SHARD_FORMATS}"
        )
    arrays = _arrays(members, version, seq_len, where)
    input_ids, labels, position_ids, cu_seqlens = arrays
    for name, array in zip(ARRAY_NAMES[:3], arrays[:3], strict=True):
        if array.shape[0] != seq_len:
            raise LoaderError(f"{where}: {name} has {array.shape[0]} tokens, expected {seq_len}")
    _check_tokens(arrays, meta, where, seq_len, vocab_size, reset_attention)
    tile_format = meta.get("tile_format", "png")
    if tile_format not in TILE_FORMATS:
        raise LoaderError(f"{where}: meta.json tile_format {tile_format!r}")
    media = _media(members, version, where)
    stored = meta.get("num_tiles" if version == FORMAT_TILES else "stored_tiles")
    tiles = _numbered_tiles(media, stored, tile_format, where)
    sources = _tile_sources(media, meta, version, len(tiles), where)
    if meta.get("num_tiles") != len(sources):
        raise LoaderError(
            f"{where}: the media stand for {len(sources)} tiles, meta num_tiles "
            f"{meta.get('num_tiles')}"
        )
    img, patch, vid = vision_ids
    mask = (input_ids == img) | (input_ids == patch) | (input_ids == vid)
    positions = np.flatnonzero(mask)
    if positions.shape[0] != len(sources) * TOKENS_PER_TILE:
        raise LoaderError(
            f"{where}: {positions.shape[0]} vision placeholders for {len(sources)} tiles "
            f"(expected {len(sources) * TOKENS_PER_TILE}; wrong special_ids?)"
        )
    if (labels[positions] != IGNORE_INDEX).any():
        raise LoaderError(f"{where}: labels: a vision placeholder is supervised (label != -100)")
    return Pack(
        key=key,
        input_ids=input_ids,
        labels=labels,
        position_ids=position_ids,
        cu_seqlens=cu_seqlens,
        meta=meta,
        tiles=tiles,
        tile_format=tile_format,
        placeholders=positions.reshape(len(sources), TOKENS_PER_TILE),
        tile_sources=sources,
        where=where,
    )


def _check_tokens(
    arrays: list[np.ndarray],
    meta: dict,
    where: str,
    seq_len: int,
    vocab_size: int | None,
    reset_attention: bool | None,
) -> None:
    """The per-pack token checks, O(T): `cu_seqlens` strictly increasing from 0 to T, one
    segment per packed sample of the meta, each sample starting at its boundary and fitting in
    its segment; `position_ids` restarting at each boundary (reset_attention) or 0..T-1; token
    ids in [0, vocab_size); every label -100 or its input id (the documented rule: labels are
    the assistant's own tokens, unshifted), -100 on each segment's padding (and, checked with
    the placeholder count in `parse_pack`, on vision placeholders)."""
    input_ids, labels, position_ids, cu = arrays
    if cu.shape[0] < 2 or cu[0] != 0 or cu[-1] != seq_len or (np.diff(cu) <= 0).any():
        shown = cu.tolist()[:12]
        raise LoaderError(f"{where}: cu_seqlens {shown} does not rise from 0 to {seq_len}")
    samples = meta.get("samples")
    if not isinstance(samples, list) or len(samples) != cu.shape[0] - 1:
        count = len(samples) if isinstance(samples, list) else samples
        raise LoaderError(
            f"{where}: cu_seqlens has {cu.shape[0] - 1} segments, meta.json samples {count!r}"
        )
    supervised = np.zeros(seq_len, dtype=bool)
    for number, sample in enumerate(samples):
        start, stop = int(cu[number]), int(cu[number + 1])
        offset = sample.get("offset") if isinstance(sample, dict) else None
        length = sample.get("length") if isinstance(sample, dict) else None
        if offset != start or type(length) is not int or not 0 < length <= stop - start:
            raise LoaderError(
                f"{where}: meta.json samples[{number}] offset {offset!r} length {length!r} "
                f"against cu_seqlens segment [{start}, {stop})"
            )
        supervised[start : start + length] = True
    positions = np.arange(seq_len, dtype=np.int64)
    restarted = positions - np.repeat(cu[:-1].astype(np.int64), np.diff(cu))
    layouts = {True: [restarted], False: [positions], None: [restarted, positions]}
    if not any(np.array_equal(position_ids, p) for p in layouts[reset_attention]):
        raise LoaderError(
            f"{where}: position_ids do not follow cu_seqlens (reset_attention={reset_attention})"
        )
    bad = (input_ids < 0) if vocab_size is None else (input_ids < 0) | (input_ids >= vocab_size)
    if bad.any():
        first = int(np.flatnonzero(bad)[0])
        raise LoaderError(
            f"{where}: input_ids[{first}] = {int(input_ids[first])} is outside the vocabulary "
            f"(size {vocab_size})"
        )
    wrong = (labels != IGNORE_INDEX) & ((labels != input_ids) | ~supervised)
    if wrong.any():
        first = int(np.flatnonzero(wrong)[0])
        raise LoaderError(
            f"{where}: labels[{first}] = {int(labels[first])} breaks the label rule (-100, or "
            f"the input id {int(input_ids[first])} on a non-padding token)"
        )


def _pair(value: object, what: str, where: str) -> tuple[int, int]:
    if (
        not isinstance(value, list)
        or len(value) != 2
        or not all(type(v) is int and 0 < v < 1 << 20 for v in value)
    ):
        raise LoaderError(f"{where}: meta.json {what} {value!r} is not two positive ints")
    return value[0], value[1]


def _media(members: dict[str, memoryview], version: int, where: str) -> dict[str, memoryview]:
    """The pack's image and tile members: inside `MEDIA_TAR` (format 3, strictly scanned),
    else the members themselves."""
    if version != FORMAT_MEDIA:
        return members
    if MEDIA_TAR not in members:
        raise LoaderError(f"{where}: missing ['{MEDIA_TAR}']")
    try:
        return read_media_tar(members[MEDIA_TAR])
    except ShardFormatError as error:
        raise LoaderError(f"{where}: {error}") from None


def _tile_sources(
    media: dict[str, memoryview], meta: dict, version: int, stored: int, where: str
) -> list[TileSource]:
    """The source of every vision tile, walking each sample's ``media_order``: an image with a
    ``member`` is cut from it, an image without one (format 1, ``image_storage: tiles``) and a
    video take their next stored tiles."""
    sources: list[TileSource] = []
    next_stored = 0
    try:
        for sample in meta["samples"]:
            for kind, index in media_order(sample, version):
                if kind == "video":
                    count = len(sample["videos"][index]["frames"])
                else:
                    image = sample["images"][index]
                    if version != FORMAT_TILES and "member" in image:  # cut at load time
                        source = _source_image(image, media, where)
                        sources += [(source, k) for k in range(image["tiles"])]
                        continue
                    count = image["tiles"]
                    if type(count) is not int or not 0 < count <= MAX_GRID_TILES + 1:
                        raise LoaderError(f"{where}: image tiles {count!r}")
                sources += [(None, next_stored + j) for j in range(count)]  # stored tiles
                next_stored += count
    except (KeyError, IndexError, TypeError, ValueError) as error:
        raise LoaderError(
            f"{where}: meta.json does not describe the pack's media: {error!r}"
        ) from None
    if next_stored != stored:
        raise LoaderError(
            f"{where}: the media use {next_stored} stored tiles, the pack has {stored}"
        )
    return sources


def _source_image(image: dict, media: dict[str, memoryview], where: str) -> SourceImage:
    """An image entry of the meta stored as its source bytes: its member present, its grid
    within `MAX_GRID_TILES` and giving the tile count the entry states."""
    member, grid = image["member"], _pair(image["grid"], "grid", where)
    if not isinstance(member, str) or not _IMAGE_NAME.match(member):
        raise LoaderError(f"{where}: image member name {member!r}")
    if member not in media:
        raise LoaderError(f"{where}: image member {member} is missing")
    if grid[0] * grid[1] > MAX_GRID_TILES or image["tiles"] != num_tiles(grid):
        raise LoaderError(f"{where}: {member}: grid {grid}, tiles {image['tiles']}")
    return SourceImage(member, media[member], _pair(image["size"], "size", where), grid)


def _numbered_tiles(
    media: dict[str, memoryview], expected: object, tile_format: str, where: str
) -> list[memoryview]:
    """The stored tile members in order: ``tile000000 .. tile{N-1}``, all in `tile_format`, N =
    `expected` (the meta's count)."""
    numbered = {}
    for name, data in media.items():
        match = _TILE_NAME.match(name)
        if match is None:
            continue
        if match.group(2) != tile_format:
            raise LoaderError(f"{where}: {name} is not in the tile format {tile_format!r}")
        numbered[int(match.group(1))] = data
    num_tiles = len(numbered)
    if sorted(numbered) != list(range(num_tiles)) or expected != num_tiles:
        raise LoaderError(f"{where}: tiles {sorted(numbered)} do not match the meta's {expected}")
    return [numbered[i] for i in range(num_tiles)]


def _arrays(
    members: dict[str, memoryview], version: int, seq_len: int, where: str
) -> list[np.ndarray]:
    """The four int32 arrays: `arrays.npz` (formats 2 and 3, each inflated size bounded by
    T + 1 int32 values and the .npy header) or one `.npy` member each (format 1)."""
    if version != FORMAT_TILES:
        if ARRAYS_NPZ not in members:
            raise LoaderError(f"{where}: missing ['{ARRAYS_NPZ}']")
        try:
            loaded = load_npz(bytes(members[ARRAYS_NPZ]), ARRAY_NAMES, npz_limit(seq_len))
        except ShardFormatError as error:
            raise LoaderError(f"{where}: {ARRAYS_NPZ}: {error}") from None
        return [_int32(loaded[name], name, where) for name in ARRAY_NAMES]
    missing = [f"{n}.npy" for n in ARRAY_NAMES if f"{n}.npy" not in members]
    if missing:
        raise LoaderError(f"{where}: missing {missing}")
    return [_npy(members[f"{n}.npy"], n, where) for n in ARRAY_NAMES]


def _npy(data: memoryview, name: str, where: str) -> np.ndarray:
    """An int32 1-D array from .npy bytes (`load_npy`: header validated, plain dtypes only)."""
    try:
        array = load_npy(data)
    except ShardFormatError as error:
        raise LoaderError(f"{where}: {name}.npy: {error}") from None
    return _int32(array, name, where)


def _int32(array: np.ndarray, name: str, where: str) -> np.ndarray:
    if array.dtype != np.int32 or array.ndim != 1:
        raise LoaderError(f"{where}: {name}.npy is {array.dtype} {array.shape}, expected int32 1-D")
    return array
