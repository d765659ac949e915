"""Offline sequence packing: sample token lengths -> packs of sample indices (pure; no I/O).

`plan_packs` runs Best-Fit-Decreasing (BFD): samples sorted by length, longest first (ties by
index); each goes into the open pack with the *least* room that still holds it, else opens a
new pack. Worked example, capacity 10, lengths [5, 9, 3, 7, 1, 8]: 9, 8, 7 and 5 open four packs
(room 1, 2, 3, 5); 3 goes to the pack with room 3 (not 5), 1 to the pack with room 1 -> 4 packs,
which is ceil(33 / 10), the optimum.

Why it is fast enough for 17M samples in pure Python: all open packs with the same remaining
room are interchangeable, so the state is `room -> list of pack ids`, with a successor query
over the rooms that exist (64-bit words + one summary int, so O(1)-ish in Python). And samples
of equal length are placed as a *class*: a pack with room r takes `r // s` of them in a row
(BFD puts the next equal sample into the pack it just shrank, as long as it still fits), and
all c packs at room r are moved together. The loop runs once per (length, room) pair touched,
not once per sample; the result is the same as per-sample BFD that breaks ties between packs of
equal room by taking the most recently moved one (a test checks this against a slow per-sample
BFD). Samples are then grouped per pack with numpy.

Options: `groups` (pack only within a group, e.g. per source file as Long-VITA stages 1-2 do),
`window` (BFD within consecutive windows of the input; memory stays bounded; each window's
packs are closed at its end - no carry-over), `align` (round each length up to a multiple, e.g.
2 x CP), and `tiles` + `max_tiles` (a second, per-pack cap on vision tiles/frames for the ViT).
In 2-D mode the fit is still best-fit on tokens: among packs that hold the sample's tokens *and*
have enough tile room, take the least token room, ties to the least tile room; equal samples
fill a pack until either dimension runs out; a max segment tree over token rooms (leaf = the
largest tile room there) skips rooms whose packs all lack tile room. Samples that cannot fit
alone are `rejected` with a reason, never dropped silently. Packs are finally shuffled with
`seed` (sorted packing puts similar lengths, hence similar sources, together); samples inside a
pack are in index order.

Measured (benchmarks/results/packing.md: synthetic Long-VITA stage mixtures, 200k samples each,
one core of a shared 2-core AMD EPYC): global BFD fills 99.87-100.00% at 16K-128K, i.e. packs =
1.0000-1.0013 x ceil(tokens / capacity) (the 1.0013 is stage 1 at 16K: mostly 3.4K-token 12-tile
images and too few short samples to close every gap; 21 tokens per pack), 99.98% at 1M. Windowed
(10k): 99.76-99.95%, 99.63% at 1M. Long-VITA's online packer: 86-99%, and it loses what is left
in its buffers; greedy knapsack over 100 samples: 65-97.5%. 17M lengths at 32K: 4.7 s end to
end (sort, BFD, 1.65M pack lists, shuffle); 19 s on the same machine under load.

The baselines the benchmark compares against (Long-VITA's online packer, FFD, greedy knapsack)
live in `lvita_data.packing.baselines`.
"""

from __future__ import annotations

import gc
from collections.abc import Hashable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np

from lvita_data.schema import RejectReason

TOO_LONG = RejectReason.too_long
"""Reject reason: the (aligned) sample is longer than the pack capacity."""
TOO_MANY_TILES = RejectReason.too_many_tiles
"""Reject reason: the sample has more vision tiles than `max_tiles`."""


@dataclass(frozen=True, eq=False)
class PackPlan:
    """Which samples go into which pack; indices refer to the `lengths` given to the packer."""

    packs: list[list[int]]
    """Sample indices per pack, in pack order; inside a pack in ascending index order."""
    rejected: list[tuple[int, str]]
    """(sample index, reason) of every sample in no pack, ascending by index."""
    capacity: int
    """Token capacity of one pack; every pack is padded to it."""
    lengths: np.ndarray
    """Real token length of every input sample (int64)."""
    padded_lengths: np.ndarray
    """Length after rounding up to `align` - what the packer fitted (int64)."""
    tiles: np.ndarray | None = None
    """Vision tiles per sample when packed with a tile cap, else None."""
    max_tiles: int | None = None
    """The per-pack tile cap, or None."""

    @property
    def num_packs(self) -> int:
        return len(self.packs)

    def packed_mask(self) -> np.ndarray:
        """Bool per input sample: True when it is in a pack."""
        mask = np.ones(len(self.lengths), dtype=bool)
        mask[[i for i, _ in self.rejected]] = False
        return mask

    def packed_tokens(self) -> int:
        """Real tokens of all packed samples (alignment padding excluded)."""
        return int(self.lengths[self.packed_mask()].sum())

    def fill(self) -> float:
        """Real tokens / (num_packs * capacity); 1.0 for an empty plan."""
        return self.packed_tokens() / (self.num_packs * self.capacity) if self.packs else 1.0

    def lower_bound(self) -> int:
        """ceil(real tokens of the packed samples / capacity), or the tile bound when larger:
        no packer can put these samples into fewer packs."""
        bound = -(-self.packed_tokens() // self.capacity)
        if self.tiles is not None and self.max_tiles:
            bound = max(bound, -(-int(self.tiles[self.packed_mask()].sum()) // self.max_tiles))
        return bound

    def pack_lengths(self) -> np.ndarray:
        """Aligned tokens per pack (int64), in pack order."""
        sizes = np.fromiter((len(p) for p in self.packs), dtype=np.int64, count=self.num_packs)
        if not sizes.size:
            return sizes
        flat = np.fromiter((i for p in self.packs for i in p), dtype=np.int64, count=sizes.sum())
        return np.add.reduceat(self.padded_lengths[flat], np.cumsum(sizes) - sizes)


def plan_packs(
    lengths: Sequence[int] | np.ndarray,
    capacity: int,
    *,
    groups: Sequence[Hashable] | np.ndarray | None = None,
    window: int | None = None,
    align: int = 1,
    tiles: Sequence[int] | np.ndarray | None = None,
    max_tiles: int | None = None,
    seed: int = 0,
    shuffle: bool = True,
) -> PackPlan:
    """Best-fit-decreasing packing of samples into packs of `capacity` tokens.

    Args:
        lengths: token length (>= 1) of every sample.
        capacity: tokens per pack.
        groups: per-sample label; samples of different groups never share a pack.
        window: BFD runs on consecutive windows of this many samples (per group, in input
            order, rejected samples included in the count); None = the whole group at once.
        align: lengths are rounded up to a multiple of this before packing.
        tiles, max_tiles: per-sample vision tiles (or frames) and the per-pack cap; give both.
        seed, shuffle: the pack order is a seeded permutation when `shuffle`; otherwise packs
            come per group (sorted labels), per window, in the order they were opened.

    Raises:
        ValueError: on a length < 1, mismatched array sizes, or a bad option.
    """
    lengths_arr = int_array(lengths, "lengths")
    n = len(lengths_arr)
    if capacity < 1 or align < 1 or (window is not None and window < 1):
        raise ValueError(f"need capacity, align, window >= 1; got {capacity}, {align}, {window}")
    if capacity >= 1 << 31 or n >= 1 << 32:
        raise ValueError("capacity must be < 2**31 and the number of samples < 2**32")
    if n and lengths_arr.min() < 1:
        raise ValueError(f"lengths must be >= 1, got {int(lengths_arr.min())}")
    if (tiles is None) != (max_tiles is None):
        raise ValueError("tiles and max_tiles go together")
    padded = -(-lengths_arr // align) * align
    reason = np.zeros(n, dtype=np.int8)  # 0 = ok, 1 = too long, 2 = too many tiles
    tiles_arr = None
    if tiles is not None:
        tiles_arr = int_array(tiles, "tiles")
        if len(tiles_arr) != n or (n and tiles_arr.min() < 0) or max_tiles < 0:
            raise ValueError("tiles must be one count >= 0 per sample, and max_tiles >= 0")
        reason[tiles_arr > max_tiles] = 2
    reason[padded > capacity] = 1
    rejected = [
        (int(i), TOO_LONG if reason[i] == 1 else TOO_MANY_TILES) for i in np.flatnonzero(reason)
    ]

    bin_of = np.full(n, -1, dtype=np.int64)
    num_bins = 0
    for chunk in _chunks(n, groups, window):
        chunk = chunk[reason[chunk] == 0]
        if not chunk.size:
            continue
        num_bins += _bfd_chunk(chunk, padded, tiles_arr, capacity, max_tiles, bin_of, num_bins)
    rank = None  # new position of each pack
    if shuffle:
        rank = np.empty(num_bins, dtype=np.int64)
        rank[np.random.default_rng(seed).permutation(num_bins)] = np.arange(num_bins)
    packs = _group_by_bin(bin_of, num_bins, rank)
    return PackPlan(packs, rejected, capacity, lengths_arr, padded, tiles_arr, max_tiles)


def int_array(values: Sequence[int] | np.ndarray, name: str) -> np.ndarray:
    arr = np.asarray(values)
    if arr.ndim != 1 or (arr.size and arr.dtype.kind not in "iu"):
        raise ValueError(f"{name} must be a 1-D sequence of ints")
    return arr.astype(np.int64, copy=False)


def _chunks(n: int, groups, window: int | None) -> Iterator[np.ndarray]:
    """Ascending index arrays that are packed independently: per group, then per window."""
    if groups is None:
        per_group = [np.arange(n, dtype=np.int64)]
    else:
        codes = _group_codes(groups, n)
        order = _stable_order(codes)
        per_group = np.split(order, np.flatnonzero(np.diff(codes[order])) + 1) if n else []
    for idx in per_group:
        step = window or max(len(idx), 1)
        for start in range(0, len(idx), step):
            yield idx[start : start + step]


def _group_codes(groups, n: int) -> np.ndarray:
    """Group number per sample: sorted labels for a numeric/str array, else first appearance."""
    if len(groups) != n:
        raise ValueError(f"groups must have one label per sample ({n}), got {len(groups)}")
    if isinstance(groups, np.ndarray) and groups.ndim == 1 and groups.dtype.kind in "biuUS":
        return np.unique(groups, return_inverse=True)[1].astype(np.int64)
    first_seen: dict = {}
    return np.fromiter((first_seen.setdefault(g, len(first_seen)) for g in groups), np.int64, n)


def _stable_order(keys: np.ndarray) -> np.ndarray:
    """`np.argsort(keys, kind="stable")` for int keys in [0, 2**31) and < 2**32 of them.

    Sorting one int64 (key << 32 | position) is about 6x faster than numpy's stable argsort.
    """
    composite = (keys.astype(np.int64) << 32) | np.arange(len(keys), dtype=np.int64)
    return np.sort(composite) & 0xFFFFFFFF


def _group_by_bin(bin_of: np.ndarray, num_bins: int, rank: np.ndarray | None) -> list[list[int]]:
    """Pack lists (pack i at position rank[i]) from a sample -> pack map, indices ascending."""
    if not num_bins:
        return []
    packed = np.flatnonzero(bin_of >= 0)
    bins = bin_of[packed] if rank is None else rank[bin_of[packed]]
    packed = packed[_stable_order(bins)]
    ends = np.cumsum(np.bincount(bins, minlength=num_bins)).tolist()
    gc_was_enabled = gc.isenabled()
    gc.disable()  # a million new lists would trigger full collections: 6x slower
    try:
        flat = packed.tolist()
        return [flat[a:b] for a, b in zip([0, *ends[:-1]], ends, strict=True)]
    finally:
        if gc_was_enabled:
            gc.enable()


def _bfd_chunk(chunk, padded, tiles, capacity, max_tiles, bin_of, first_bin) -> int:
    """BFD on one chunk; writes global pack ids into `bin_of`; returns the packs it opened."""
    sizes = padded[chunk]
    if tiles is None:
        order = _stable_order(capacity - sizes)  # longest first, ties by index
        keys = (sizes[order],)
    else:
        order = np.lexsort((chunk, -tiles[chunk], -sizes))
        keys = (sizes[order], tiles[chunk][order])
    starts = np.flatnonzero(np.r_[True, np.any([k[1:] != k[:-1] for k in keys], axis=0)])
    counts = np.diff(np.r_[starts, len(order)]).tolist()
    heads = [k[starts].tolist() for k in keys]
    if tiles is None:
        out_bins, out_take, num_bins = _bfd_classes(heads[0], counts, capacity)
    else:
        out_bins, out_take, num_bins = _bfd_classes_2d(*heads, counts, capacity, max_tiles)
    # Every step took the next `take` samples of the sorted order for one pack.
    bins = np.repeat(np.asarray(out_bins, dtype=np.int64), np.asarray(out_take, dtype=np.int64))
    assert len(bins) == len(order), "BFD lost samples"
    bin_of[chunk[order]] = bins + first_bin
    return num_bins


class _RoomSet:
    """Set of ints in [0, size) with a fast 'smallest member >= x' (64-bit words + summary)."""

    __slots__ = ("words", "summary")

    def __init__(self, size: int) -> None:
        self.words = [0] * ((size >> 6) + 1)
        self.summary = 0

    def add(self, x: int) -> None:
        j = x >> 6
        if not self.words[j]:
            self.summary |= 1 << j
        self.words[j] |= 1 << (x & 63)

    def remove(self, x: int) -> None:
        j = x >> 6
        self.words[j] ^= 1 << (x & 63)
        if not self.words[j]:
            self.summary ^= 1 << j

    def first_at_least(self, x: int) -> int:
        """Smallest member >= x, or -1."""
        j = x >> 6
        if j >= len(self.words):
            return -1
        w = self.words[j] >> (x & 63)
        if w:
            return x + (w & -w).bit_length() - 1
        m = self.summary >> (j + 1)
        if not m:
            return -1
        j += (m & -m).bit_length()
        w = self.words[j]
        return (j << 6) + (w & -w).bit_length() - 1


def _bfd_classes(sizes: list[int], counts: list[int], capacity: int):
    """1-D BFD over classes of equal size (descending). Returns (pack ids, takes, num packs)."""
    rooms = _RoomSet(capacity + 1)
    at: dict[int, list[int]] = {}  # room -> pack ids with exactly that room; room 0 = closed
    out_bins: list[int] = []
    out_take: list[int] = []
    num_bins = 0

    def put(room: int, ids: list[int]) -> None:
        if room:
            if room in at:
                at[room].extend(ids)
            else:
                at[room] = ids
                rooms.add(room)

    for s, k in zip(sizes, counts, strict=True):
        r = rooms.first_at_least(s)
        while r >= 0:
            bins = at[r]
            q = r // s  # a pack at room r takes q samples of size s in a row
            c = len(bins)
            n = k // q
            if n >= c:  # every pack at room r takes q: move them all
                del at[r]
                rooms.remove(r)
                bins.reverse()  # taken from the end of the list, most recently moved first
                out_bins += bins
                out_take += [q] * c
                k -= q * c
                put(r - q * s, bins)
                if not k:
                    break
                r = rooms.first_at_least(r + 1)
                continue
            if n:
                moved = bins[c - n :]
                moved.reverse()
                del bins[c - n :]
                out_bins += moved
                out_take += [q] * n
                put(r - q * s, moved)
                k -= q * n
            if k:  # the last k < q samples go together into one more pack at room r
                b = bins.pop()
                if not bins:
                    del at[r]
                    rooms.remove(r)
                out_bins.append(b)
                out_take.append(k)
                put(r - k * s, [b])
                k = 0
            break
        if k:  # open new packs, each filled with q samples, the last with the rest
            q = capacity // s
            n = k // q
            if n:
                ids = list(range(num_bins, num_bins + n))
                num_bins += n
                out_bins += ids
                out_take += [q] * n
                put(capacity - q * s, ids)
                k -= q * n
            if k:
                out_bins.append(num_bins)
                out_take.append(k)
                put(capacity - k * s, [num_bins])
                num_bins += 1
    return out_bins, out_take, num_bins


class _MaxTree:
    """Max segment tree over token rooms 0..size-1: leaf r = largest tile room of a pack at r.

    `find(s, t)` = smallest token room >= s holding a pack with tile room >= t, in O(log size).
    """

    __slots__ = ("base", "tree")

    def __init__(self, size: int) -> None:
        self.base = 1 << max(size - 1, 1).bit_length()
        self.tree = [-1] * (2 * self.base)

    def set(self, r: int, value: int) -> None:
        tree = self.tree
        node = self.base + r
        tree[node] = value
        while node > 1:
            node >>= 1
            best = max(tree[2 * node], tree[2 * node + 1])
            if tree[node] == best:
                break
            tree[node] = best

    def find(self, s: int, t: int) -> int:
        tree = self.tree
        node = self.base + s
        if tree[node] >= t:
            return s
        while True:  # climb to the first right sibling whose subtree has room
            if not node & 1 and tree[node + 1] >= t:
                node += 1
                break
            node >>= 1
            if node <= 1:
                return -1
        while node < self.base:
            node = 2 * node if tree[2 * node] >= t else 2 * node + 1
        return node - self.base


def _bfd_classes_2d(sizes, tile_counts, counts, capacity: int, max_tiles: int):
    """2-D BFD over (tokens, tiles) classes sorted descending; same contract as `_bfd_classes`.

    State: token room -> tile room -> pack ids, plus a max tree to skip token rooms whose packs
    all lack tile room. Best fit on tokens, then on tiles; a pack takes q = min(r // s, u // t)
    equal samples in a row, since after each one it is still the best fit.
    """
    tree = _MaxTree(capacity + 1)
    at: dict[int, dict[int, list[int]]] = {}
    out_bins: list[int] = []
    out_take: list[int] = []
    num_bins = 0

    def put(room: int, tile_room: int, ids: list[int]) -> None:
        if room and ids:
            by_tiles = at.setdefault(room, {})
            if tile_room not in by_tiles and tile_room > tree.tree[tree.base + room]:
                tree.set(room, tile_room)
            by_tiles.setdefault(tile_room, []).extend(ids)

    def take(r: int, u: int, n: int) -> list[int]:
        bins = at[r][u]
        moved = bins[len(bins) - n :]
        moved.reverse()  # taken from the end: most recently moved first
        del bins[len(bins) - n :]
        if not bins:
            del at[r][u]
            if not at[r]:
                del at[r]
                tree.set(r, -1)
            elif u > max(at[r]):
                tree.set(r, max(at[r]))
        return moved

    for s, t, k in zip(sizes, tile_counts, counts, strict=True):
        while k and (r := tree.find(s, t)) >= 0:
            for u in sorted(u for u in at[r] if u >= t):
                q = r // s if not t else min(r // s, u // t)
                n = min(k // q, len(at[r][u]))
                if n:
                    moved = take(r, u, n)
                    out_bins += moved
                    out_take += [q] * n
                    put(r - q * s, u - q * t, moved)
                    k -= q * n
                if 0 < k < q and r in at and u in at[r]:  # one more pack takes the rest
                    (b,) = take(r, u, 1)
                    out_bins.append(b)
                    out_take.append(k)
                    put(r - k * s, u - k * t, [b])
                    k = 0
                if not k:
                    break
        if k:
            q = capacity // s if not t else min(capacity // s, max_tiles // t)
            n, rest = divmod(k, q)
            ids = list(range(num_bins, num_bins + n + (rest > 0)))
            num_bins += len(ids)
            out_bins += ids
            out_take += [q] * n + ([rest] if rest else [])
            put(capacity - q * s, max_tiles - q * t, ids[:n])
            if rest:
                put(capacity - rest * s, max_tiles - rest * t, ids[n:])
    return out_bins, out_take, num_bins
