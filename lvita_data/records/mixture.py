"""Per-file mixture selection, exactly as Long-VITA's `BaseDataset.load_data`.

For every file of a dataset entry: skip when ratio == 0 or the cap == 0; shuffle the rows with
the stage seed *twice* (the original calls `datasets.Dataset.shuffle(seed)` two times; each call
draws `np.random.default_rng(seed).permutation(n)`, so the composed order is `perm[perm]`); keep
`used = min(int(n * ratio), cap)` rows, taking row `order[i % n]` for i < used, so a ratio > 1
up-samples by cycling through the shuffled order. The cap defaults to the original's 999999999.
"""

from __future__ import annotations

import numpy as np

DEFAULT_CAP = 999_999_999


def selected_count(num_rows: int, *, ratio: float, max_samples: int | None) -> int:
    cap = DEFAULT_CAP if max_samples is None else max_samples
    if ratio == 0 or cap == 0 or num_rows == 0:
        return 0
    return min(int(num_rows * float(ratio)), cap)


def select_rows(num_rows: int, *, ratio: float, max_samples: int | None, seed: int) -> np.ndarray:
    """Row indices (int64) of one file in the order the original would yield them."""
    used = selected_count(num_rows, ratio=ratio, max_samples=max_samples)
    if used == 0:
        return np.zeros(0, dtype=np.int64)
    permutation = np.random.default_rng(seed).permutation(num_rows)
    order = permutation[permutation]
    return order[np.arange(used) % num_rows]
