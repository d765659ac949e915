"""The order of an epoch and its split over data-parallel (DP) ranks: pure functions of integers.

Order
-----
Packs are numbered globally in shard order (shard i, sample j, from ``index.json``). The order of
an epoch is a deterministic function of (seed, epoch): with ``shuffle`` a two-level permutation
(shard order permuted, then the samples within each shard; numpy's legacy ``RandomState``, whose
streams numpy keeps stable across versions), else the global order. The build already shuffled
the packs across shards with the stage seed, so the two levels mix as well as a global
permutation while every reader stays inside one shard at a time.

DP split (drop policy)
----------------------
Each of the W ranks gets the same number of packs per epoch, ``n = N // W``: rank r takes the
contiguous slice ``order[r * n:(r + 1) * n]`` of the epoch order, and the last ``N % W`` packs of
the order are dropped for that epoch (with ``shuffle``, different packs every epoch). Equal counts
mean every rank runs the same number of steps, so collective operations never wait for a rank
that ran out of data. Slices rather than a stride (``order[r::W]``): with a stride every rank
would open every shard and read its tar headers to use 1/W of its packs; with slices a shard is
read by about one rank. The slices still differ per step (rank r at step t reads a different
shard than rank r'), which mixes sources across the global batch. Batches are consecutive runs of
`batch_size` packs of the rank's slice; the last one is smaller unless ``drop_last`` (it is the
same on every rank, since the slices have equal sizes).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def seed_words(seed: int, epoch: int) -> list[int]:
    """The ``RandomState`` seed of (seed, epoch); raises `ValueError` if either is negative."""
    if seed < 0 or epoch < 0:
        raise ValueError(f"seed and epoch must be >= 0, got {seed}, {epoch}")
    mask = 0xFFFFFFFF
    return [seed & mask, (seed >> 32) & mask, epoch & mask, (epoch >> 32) & mask, 0x6C766C64]


def epoch_order(counts: Sequence[int], *, seed: int, epoch: int, shuffle: bool) -> np.ndarray:
    """int64 global pack indices of one epoch (before the DP split).

    Global index = packs of the earlier shards + sample number in the shard. With `shuffle`:
    shards in a permuted order, the samples of each shard permuted, from ``RandomState`` seeded
    with (seed, epoch) (legacy streams: stable across numpy versions).
    """
    counts = [int(c) for c in counts]
    total = sum(counts)
    if not shuffle:
        return np.arange(total, dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum(counts, dtype=np.int64)])
    rng = np.random.RandomState(seed_words(seed, epoch))
    parts = [np.empty(0, dtype=np.int64)]
    for shard in rng.permutation(len(counts)):
        parts.append(offsets[shard] + rng.permutation(counts[shard]).astype(np.int64))
    return np.concatenate(parts)


def rank_slice(order: np.ndarray, dp_rank: int, packs_per_rank: int) -> np.ndarray:
    """Rank `dp_rank`'s contiguous share of an epoch order (a copy); ``packs_per_rank = N // W``."""
    start = dp_rank * packs_per_rank
    return order[start : start + packs_per_rank].copy()


def num_batches(remaining: int, batch_size: int, drop_last: bool) -> int:
    """Batches of `batch_size` packs in `remaining` packs; a short last one unless `drop_last`."""
    if drop_last:
        return max(remaining, 0) // batch_size
    return -(-max(remaining, 0) // batch_size)
