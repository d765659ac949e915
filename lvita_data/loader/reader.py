"""Reading one pack of a shard by its global number, and checking it: `ShardReader`, `parse_pack`.

Reading
-------
A process scans a shard's tar headers when it first needs the shard (`lvita_data.shards.tar`,
strict mode: ustar, pax and GNU long names; only the headers are read through a read-only map:
about 20 us per member, 0.3 ms per pack of 13 tiles; the scans of the last 4 shards are kept),
which gives every sample's byte range; a pack is then one ``pread`` of its contiguous members,
sliced without copies. Members are grouped into samples by WebDataset's rule (key = the name up
to the first dot of its last path component, suffix lower-cased, ``__*__`` metadata skipped;
tested equal to ``webdataset.WebDataset``'s samples).
Packs do not go through WebDataset's tar iterators: they stream a shard from its start (a split
by pack would make every rank read every byte), parse at ~170 us per member, and import torch.

Checks
------
Every pack is checked while it is read: the four arrays (``.npy`` members in format 1, inflated
from ``arrays.npz`` in format 2 with each array's size bounded before inflating) are int32 [T]
(cu_seqlens [n + 1] from 0 to T); the stored tile members are ``tile000000 .. tile{M-1}`` in
the meta's tile format (M = ``num_tiles`` in format 1, ``stored_tiles`` in format 2); in format
2 every image of the meta names an ``image*`` member with a positive size and a grid whose tile
count it states; and the number of vision placeholders in ``input_ids`` is exactly 256 * N for
the N tiles the pack's media stand for (`Pack.tile_sources`, walked in each sample's
``media_order``). The tokens (`_check_tokens`, O(T)): ``cu_seqlens`` rises strictly with one
segment per sample of the meta, ``position_ids`` follow it, ids are in the vocabulary and every
label is -100 or its input id (-100 on padding and placeholders). A violation raises
`LoaderError` naming the shard and the key. Pixels are decoded later (`batch`).
"""

from __future__ import annotations

import contextlib
import os
import re
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import numpy as np

from lvita_data.errors import LoaderError, ShardFormatError
from lvita_data.samples.tiling import TOKENS_PER_TILE, num_tiles
from lvita_data.schema import IGNORE_INDEX
from lvita_data.shards.format import (
    ARRAY_MEMBERS,
    ARRAYS_NPZ,
    FORMAT_SOURCE,
    FORMAT_TILES,
    KEY_PATTERN,
    SHARD_FORMATS,
    load_npy,
    load_npz,
    npz_limit,
    parse_json,
)
from lvita_data.shards.tar import TarSample, group_samples, scan_tar_file

ARRAY_NAMES = tuple(ARRAY_MEMBERS)
KEEP_SHARDS = 4
"""Shards whose tar scan and open file a process keeps (least recently used ones go)."""

_TILE_NAME = re.compile(r"^tile(\d+)\.([a-z0-9]+)$")
_IMAGE_NAME = re.compile(r"^image\d{6}\.[a-z0-9]+$")
TILE_FORMATS = ("png", "webp", "jpeg", "raw")
"""Tile formats a pack's meta may name (`lvita_data.media.tiles`)."""
MAX_GRID_TILES = 64
"""Upper bound of cols * rows accepted from a shard (Long-VITA uses at most 12)."""
_Value = TypeVar("_Value")


@dataclass(frozen=True, slots=True)
class SourceImage:
    """A format-2 image member: its bytes, and the size and grid the pack's tokens were
    planned for."""

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
    """The stored tiles in order (format 1: all tiles; format 2: video frames)."""
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
    stored = meta.get("stored_tiles") if version == FORMAT_SOURCE else meta.get("num_tiles")
    tiles = _numbered_tiles(members, stored, tile_format, where)
    if version == FORMAT_SOURCE:
        sources = _tile_sources(members, meta, len(tiles), where)
    else:
        sources = [(None, j) for j in range(len(tiles))]
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


def _tile_sources(
    members: dict[str, memoryview], meta: dict, stored: int, where: str
) -> list[TileSource]:
    """Format 2: the source of every vision tile, walking each sample's ``media_order``."""
    sources: list[TileSource] = []
    next_stored = 0
    try:
        for sample in meta["samples"]:
            for kind, index in sample["media_order"]:
                if kind not in ("image", "video") or type(index) is not int or index < 0:
                    raise LoaderError(f"{where}: media_order entry {[kind, index]!r}")
                if kind == "video":
                    frames = len(sample["videos"][index]["frames"])
                    sources += [(None, next_stored + j) for j in range(frames)]
                    next_stored += frames
                    continue
                image = sample["images"][index]
                member, grid = image["member"], _pair(image["grid"], "grid", where)
                if not isinstance(member, str) or not _IMAGE_NAME.match(member):
                    raise LoaderError(f"{where}: image member name {member!r}")
                if member not in members:
                    raise LoaderError(f"{where}: image member {member} is missing")
                if grid[0] * grid[1] > MAX_GRID_TILES or image["tiles"] != num_tiles(grid):
                    raise LoaderError(f"{where}: {member}: grid {grid}, tiles {image['tiles']}")
                source = SourceImage(
                    member, members[member], _pair(image["size"], "size", where), grid
                )
                sources += [(source, k) for k in range(image["tiles"])]
    except (KeyError, IndexError, TypeError, ValueError) as error:
        raise LoaderError(
            f"{where}: meta.json does not describe the pack's media: {error!r}"
        ) from None
    if next_stored != stored:
        raise LoaderError(
            f"{where}: the videos use {next_stored} stored tiles, the pack has {stored}"
        )
    return sources


def _numbered_tiles(
    members: dict[str, memoryview], expected: object, tile_format: str, where: str
) -> list[memoryview]:
    """The stored tile members in order: ``tile000000 .. tile{N-1}``, all in `tile_format`, N =
    `expected` (the meta's count)."""
    numbered = {}
    for name, data in members.items():
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
    """The four int32 arrays: one `.npy` member each (format 1) or `arrays.npz` (format 2,
    each inflated size bounded by T + 1 int32 values and the .npy header)."""
    if version == FORMAT_SOURCE:
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


class ShardReader:
    """Packs of a build's shards by global number, with per-process caches of the last
    `KEEP_SHARDS` shards' tar scans and open files (dropped when pickled, reopened on demand).

    Args:
        root: the build directory.
        shard_names, shard_counts: the shards of ``index.json`` in order, and their packs.
        seq_len: T of every pack.
        vision_ids: the (IMG, PATCH, VID) context ids (see `parse_pack`).
    """

    def __init__(
        self,
        root: Path,
        shard_names: Sequence[str],
        shard_counts: Sequence[int],
        *,
        seq_len: int,
        vision_ids: tuple[int, int, int],
        vocab_size: int | None = None,
        reset_attention: bool | None = None,
        first_keys: Sequence[str | None] | None = None,
    ) -> None:
        self.root = root
        self.shard_names = list(shard_names)
        self.shard_counts = list(shard_counts)
        self.seq_len = seq_len
        self.vision_ids = vision_ids
        self.vocab_size = vocab_size
        self.reset_attention = reset_attention
        self.first_keys = list(first_keys) if first_keys is not None else None
        """Each shard's first key (`lvita_data.loader.loader.first_keys`): a shard's keys must
        lie between its own and the next shard's."""
        self.offsets = np.concatenate([[0], np.cumsum(self.shard_counts, dtype=np.int64)])
        self._scans: OrderedDict[int, list[TarSample]] = OrderedDict()
        self._files: OrderedDict[int, int] = OrderedDict()

    @property
    def num_packs(self) -> int:
        return int(self.offsets[-1])

    def __getstate__(self) -> dict:
        return {k: v for k, v in vars(self).items() if k not in ("_scans", "_files")}

    def __setstate__(self, state: dict) -> None:
        vars(self).update(state)
        self._scans = OrderedDict()
        self._files = OrderedDict()

    def close(self) -> None:
        """Close the shard files this process opened (reopened on demand)."""
        while self._files:
            _, fd = self._files.popitem()
            os.close(fd)

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self.close()

    def locate(self, global_index: int) -> tuple[int, int]:
        """(shard, sample number in the shard) of a global pack index."""
        if not 0 <= global_index < self.num_packs:
            raise IndexError(f"pack {global_index} outside 0..{self.num_packs - 1}")
        shard = int(np.searchsorted(self.offsets, global_index, side="right")) - 1
        return shard, global_index - int(self.offsets[shard])

    def read_raw(self, global_index: int) -> tuple[str, dict[str, memoryview]]:
        """(key, {suffix: bytes}) of one pack: one read of its byte range, sliced."""
        shard, number = self.locate(global_index)
        sample = _recent(self._scans, shard, lambda: self._scan(shard))[number]
        size = sample.end - sample.start
        path = self.root / self.shard_names[shard]
        try:
            fd = _recent(
                self._files,
                shard,
                lambda: os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0)),
                evict=os.close,
            )
            data = os.pread(fd, size, sample.start)
        except OSError as error:
            raise LoaderError(f"{path}: {error.strerror}") from None
        if len(data) != size:
            raise LoaderError(f"{self.shard_names[shard]}: short read of sample {sample.key}")
        view = memoryview(data)
        members = {name: view[off : off + n] for name, (off, n) in sample.members.items()}
        return sample.key, members

    def read_pack(self, global_index: int) -> Pack:
        """The checked pack of a global index (`read_raw` + `parse_pack`)."""
        key, members = self.read_raw(global_index)
        where = f"{self.root / self.shard_names[self.locate(global_index)[0]]} sample {key}"
        return parse_pack(
            key,
            members,
            where=where,
            seq_len=self.seq_len,
            vision_ids=self.vision_ids,
            vocab_size=self.vocab_size,
            reset_attention=self.reset_attention,
        )

    def _scan(self, shard: int) -> list[TarSample]:
        path = self.root / self.shard_names[shard]
        try:
            samples = group_samples(scan_tar_file(path), str(path))
        except ShardFormatError as error:
            raise LoaderError(str(error)) from None
        if len(samples) != self.shard_counts[shard]:
            raise LoaderError(
                f"{path}: {len(samples)} samples, index.json says {self.shard_counts[shard]}"
            )
        if self.first_keys is not None:
            self._check_keys(shard, [sample.key for sample in samples], path)
        return samples

    def _check_keys(self, shard: int, keys: list[str], path: Path) -> None:
        """9-digit keys rising strictly, from this shard's first key to below the next
        non-empty shard's: no key of the build is used twice."""
        assert self.first_keys is not None
        after = next((k for k in self.first_keys[shard + 1 :] if k is not None), None)
        previous = -1
        for key in keys:
            number = int(key) if KEY_PATTERN.match(key) else -1
            bad = number <= previous or (after is not None and number >= int(after))
            if bad or (previous < 0 and key != self.first_keys[shard]):
                raise LoaderError(
                    f"{path}: sample key {key[:40]!r} is not a 9-digit key after {previous} "
                    f"and before the next shard's {after}: keys must be unique in the build"
                )
            previous = number


def _recent(
    cache: OrderedDict[int, _Value],
    shard: int,
    make: Callable[[], _Value],
    evict: Callable[[_Value], object] | None = None,
) -> _Value:
    """`cache[shard]`, made on a miss; keeps the `KEEP_SHARDS` most recently used entries and
    hands the ones it drops to `evict`."""
    value = cache.get(shard)
    if value is not None:
        cache.move_to_end(shard)
        return value
    value = cache[shard] = make()
    while len(cache) > KEEP_SHARDS:
        dropped = cache.popitem(last=False)[1]
        if evict is not None:
            evict(dropped)
    return value
