"""Per-file mixture selection: exact parity with the original's HF-datasets calls."""

import numpy as np
import pytest

from lvita_data.records.mixture import select_rows, selected_count


def original_selection(num_rows: int, ratio: float, cap: int | None, seed: int) -> list[int]:
    """What Long-VITA's BaseDataset.load_data does, run with the real `datasets` package."""
    datasets = pytest.importorskip("datasets")
    data = datasets.Dataset.from_dict({"row": list(range(num_rows))})
    data = data.shuffle(seed=seed)
    data = data.shuffle(seed=seed)
    used = min(int(num_rows * float(ratio)), 999999999 if cap is None else cap)
    return data.select([x % num_rows for x in range(used)])["row"]


@pytest.mark.parametrize(
    ("num_rows", "ratio", "cap", "seed"),
    [
        (25, 1.0, None, 42),
        (25, 0.1, None, 4242),
        (7, 2.5, None, 424242),
        (1000, 1.0, 300, 42),
        (13, 3, 20, 42424242),
    ],
)
def test_matches_original_datasets_semantics(num_rows, ratio, cap, seed):
    ours = select_rows(num_rows, ratio=ratio, max_samples=cap, seed=seed).tolist()
    assert ours == original_selection(num_rows, ratio, cap, seed)


def test_counts_and_upsampling():
    assert selected_count(25, ratio=0.1, max_samples=None) == 2
    assert selected_count(1000, ratio=1.0, max_samples=300) == 300
    assert selected_count(10, ratio=0.0, max_samples=None) == 0
    assert selected_count(10, ratio=1.0, max_samples=0) == 0
    rows = select_rows(4, ratio=2.5, max_samples=None, seed=1)
    assert rows.shape == (10,)
    assert sorted(rows[:4].tolist()) == [0, 1, 2, 3]  # every row once before any repeats
    np.testing.assert_array_equal(rows[4:8], rows[:4])


def test_seed_changes_order_and_is_deterministic():
    a = select_rows(100, ratio=1.0, max_samples=None, seed=1)
    assert (a == select_rows(100, ratio=1.0, max_samples=None, seed=1)).all()
    assert (a != select_rows(100, ratio=1.0, max_samples=None, seed=2)).any()
