"""Baseline packers, for `benchmarks/bench_packing.py` and the parity tests; not for production.

- `pack_original_online`: a faithful model of Long-VITA's own online packer (its buffers, its
  dict-order ties, the samples it loses when the stream ends: `LEFT_IN_BUFFER`);
- `pack_first_fit_decreasing`: NeMo's FFD, with a max segment tree over pack rooms;
- `pack_greedy_knapsack`: LLaMA-Factory's buffered greedy knapsack.

They return the same `PackPlan` as the production packer (`lvita_data.packing.plan.plan_packs`)
so the benchmark compares fill, packs and losses side by side.
"""

from __future__ import annotations

import bisect
from collections.abc import Hashable, Sequence

import numpy as np

from lvita_data.packing.plan import TOO_LONG, PackPlan, int_array

LEFT_IN_BUFFER = "left_in_buffer"
"""Loss reason of the original online packer: still buffered when the stream ended."""


def pack_original_online(
    lengths: Sequence[int] | np.ndarray,
    capacity: int,
    *,
    groups: Sequence[Hashable] | None = None,
    num_buffers: int = 2,
    num_workers: int = 1,
) -> PackPlan:
    """Long-VITA's own packer (`Qwen2Dataset.__getitem__` in long_vita/data/dataset_qwen2.py).

    Samples arrive in input order. With `groups` (stages 1-2) each group has its own buffer, so
    the "shortest" and the "longest" buffer are both the sample's own. Without (stages 3-4,
    `cross_dataset_joint`) there are `num_buffers` shared buffers kept in a dict: the shortest
    and the longest are the *first* in dict order with the min / max length, and an emitted
    buffer is popped and re-created, which moves it to the end of that order. For a sample of
    length L: L > capacity -> dropped; shortest + L > capacity -> emit the longest (padded to
    capacity) and restart it with the sample; else append to the shortest. Buffers still open
    at the end are never emitted: their samples come back rejected as `left_in_buffer`. With
    `num_workers` > 1, sample i goes to worker i % num_workers, each with its own buffers.
    """
    lengths_arr = int_array(lengths, "lengths")
    packs: list[list[int]] = []
    rejected: list[tuple[int, str]] = []
    for worker in range(num_workers):
        buffers: dict = (
            {} if groups is not None else {f"default_{b}": [0, []] for b in range(num_buffers)}
        )
        for i in range(worker, len(lengths_arr), num_workers):
            size = int(lengths_arr[i])
            if size > capacity:
                rejected.append((i, TOO_LONG))
                continue
            if groups is not None:
                short_key = long_key = groups[i]
                buffers.setdefault(short_key, [0, []])
            else:
                short_key = min(buffers, key=lambda key: buffers[key][0])  # first of the minima
                long_key = max(buffers, key=lambda key: buffers[key][0])  # first of the maxima
            if buffers[short_key][0] + size > capacity:
                packs.append(buffers.pop(long_key)[1])
                buffers[long_key] = [size, [i]]
            else:
                buffers[short_key][0] += size
                buffers[short_key][1].append(i)
        rejected += [(i, LEFT_IN_BUFFER) for _, ids in buffers.values() for i in ids]
    rejected.sort()
    return PackPlan(packs, rejected, capacity, lengths_arr, lengths_arr)


def _too_long_split(lengths, capacity: int) -> tuple[np.ndarray, list[int], list[tuple[int, str]]]:
    lengths_arr = int_array(lengths, "lengths")
    kept = np.flatnonzero(lengths_arr <= capacity).tolist()
    return lengths_arr, kept, [(int(i), TOO_LONG) for i in np.flatnonzero(lengths_arr > capacity)]


def pack_first_fit_decreasing(lengths: Sequence[int] | np.ndarray, capacity: int) -> PackPlan:
    """FFD (NeMo `first_fit_decreasing`): longest first, into the lowest-numbered pack that fits.

    A max segment tree over pack rooms finds that pack in O(log n).
    """
    lengths_arr, kept, rejected = _too_long_split(lengths, capacity)
    lens = lengths_arr.tolist()
    order = sorted(kept, key=lambda i: -lens[i])
    size = 1 << max(len(order) - 1, 0).bit_length()
    tree = [0] * (2 * size)  # leaves: room of pack j (0 = not open yet)
    packs: list[list[int]] = []
    for i in order:
        s = lens[i]
        if tree[1] >= s:
            node = 1
            while node < size:
                node = 2 * node if tree[2 * node] >= s else 2 * node + 1
            j = node - size
        else:
            j, node = len(packs), len(packs) + size
            packs.append([])
            tree[node] = capacity
        packs[j].append(i)
        tree[node] -= s
        node //= 2
        while node:
            tree[node] = max(tree[2 * node], tree[2 * node + 1])
            node //= 2
    return PackPlan([sorted(p) for p in packs], rejected, capacity, lengths_arr, lengths_arr)


def pack_greedy_knapsack(
    lengths: Sequence[int] | np.ndarray, capacity: int, *, buffer_size: int = 100
) -> PackPlan:
    """LLaMA-Factory `greedy_knapsack` over buffers of `buffer_size` samples (Megatron/Energon).

    The stream (over-long samples removed) is cut into buffers; in each, lengths sorted
    ascending, one pack at a time is filled by repeatedly taking the largest sample that still
    fits (bisect), until the buffer is empty. Nothing carries over to the next buffer.
    """
    lengths_arr, kept, rejected = _too_long_split(lengths, capacity)
    lens = lengths_arr.tolist()
    packs: list[list[int]] = []
    for start in range(0, len(kept), buffer_size):
        buf = sorted(kept[start : start + buffer_size], key=lambda i: lens[i])
        sizes = [lens[i] for i in buf]
        while buf:
            room, pack = capacity, []
            while (j := bisect.bisect_right(sizes, room)) > 0:
                room -= sizes.pop(j - 1)
                pack.append(buf.pop(j - 1))
            packs.append(sorted(pack))
    return PackPlan(packs, rejected, capacity, lengths_arr, lengths_arr)
