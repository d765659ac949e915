"""assemble_pack: layout of one packed sequence."""

import numpy as np
import pytest

from lvita_data.packing.assemble import aligned_length, assemble_pack
from lvita_data.schema import IGNORE_INDEX


def sample(length: int, base: int) -> tuple[np.ndarray, np.ndarray]:
    ids = np.arange(base, base + length, dtype=np.int32)
    labels = ids.copy()
    labels[: length // 2] = IGNORE_INDEX
    return ids, labels


def test_reset_positions_and_tail_padding_on_last_sample():
    packed = assemble_pack(
        [sample(3, 10), sample(4, 20)], capacity=10, pad_id=0, reset_positions=True
    )
    assert packed.input_ids.tolist() == [10, 11, 12, 20, 21, 22, 23, 0, 0, 0]
    assert packed.cu_seqlens.tolist() == [0, 3, 10]
    assert packed.position_ids.tolist() == [0, 1, 2, 0, 1, 2, 3, 4, 5, 6]
    assert (packed.labels[7:] == IGNORE_INDEX).all()
    assert all(
        a.dtype == np.int32
        for a in (packed.input_ids, packed.labels, packed.position_ids, packed.cu_seqlens)
    )


def test_continuous_positions_and_alignment():
    packed = assemble_pack(
        [sample(3, 10), sample(5, 20)], capacity=16, pad_id=7, reset_positions=False, align=4
    )
    assert packed.cu_seqlens.tolist() == [0, 4, 16]
    assert packed.input_ids[:9].tolist() == [10, 11, 12, 7, 20, 21, 22, 23, 24]
    assert packed.labels[3] == IGNORE_INDEX
    assert packed.position_ids.tolist() == list(range(16))
    assert aligned_length(5, 4) == 8 and aligned_length(8, 4) == 8


def test_overflow_and_empty_are_errors():
    with pytest.raises(ValueError, match="exceeds capacity"):
        assemble_pack([sample(6, 0), sample(6, 0)], capacity=10, pad_id=0, reset_positions=True)
    with pytest.raises(ValueError, match="at least one"):
        assemble_pack([], capacity=10, pad_id=0, reset_positions=True)
