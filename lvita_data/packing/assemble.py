"""One packed sequence from tokenized samples (pure arrays, no I/O).

Samples are concatenated in pack order. With `align > 1` (context parallelism: 2 * cp) each
sample is padded to a multiple of `align` with the pad token and label IGNORE_INDEX, so every
sample boundary falls on a chunk boundary. The tail up to `capacity` is padding too; as in the
original, it is accounted to the last sample (`cu_seqlens[-1] == capacity`), which keeps one
segment per packed sample: `cu_seqlens` has n + 1 entries for n samples. Position ids restart at 0
for every sample when `reset_positions` (Long-VITA stages 1-2; padding continues the sample's
positions), else they run 0..T-1 over the whole pack (stages 3-4).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from lvita_data.schema import IGNORE_INDEX


@dataclass(frozen=True, slots=True)
class PackedArrays:
    input_ids: np.ndarray
    """int32 [T]"""
    labels: np.ndarray
    """int32 [T], unshifted, IGNORE_INDEX where not supervised (padding included)."""
    position_ids: np.ndarray
    """int32 [T]"""
    cu_seqlens: np.ndarray
    """int32 [n + 1]: 0, end of sample 1, ..., T."""


def aligned_length(length: int, align: int) -> int:
    return -(-length // align) * align


def assemble_pack(
    samples: Sequence[tuple[np.ndarray, np.ndarray]],
    *,
    capacity: int,
    pad_id: int,
    reset_positions: bool,
    align: int = 1,
) -> PackedArrays:
    """Pack (input_ids, labels) pairs into arrays of length `capacity`."""
    if not samples:
        raise ValueError("a pack needs at least one sample")
    lengths = [aligned_length(ids.shape[0], align) for ids, _ in samples]
    total = sum(lengths)
    if total > capacity:
        raise ValueError(f"pack of {total} aligned tokens exceeds capacity {capacity}")
    input_ids = np.full(capacity, pad_id, dtype=np.int32)
    labels = np.full(capacity, IGNORE_INDEX, dtype=np.int32)
    starts = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
    for (ids, sample_labels), start in zip(samples, starts, strict=False):
        input_ids[start : start + ids.shape[0]] = ids
        labels[start : start + ids.shape[0]] = sample_labels
    cu_seqlens = starts.copy()
    cu_seqlens[-1] = capacity
    if reset_positions:
        segment_lengths = np.diff(cu_seqlens)
        # [T]: position within the segment = global index - segment start
        position_ids = np.arange(capacity, dtype=np.int32) - np.repeat(
            cu_seqlens[:-1], segment_lengths
        )
    else:
        position_ids = np.arange(capacity, dtype=np.int32)
    return PackedArrays(input_ids, labels, position_ids.astype(np.int32), cu_seqlens)
