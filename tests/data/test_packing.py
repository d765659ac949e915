"""Packing: invariants of `plan_packs`, exact BFD behaviour, and the baselines' semantics."""

import subprocess
import sys
from collections import Counter

import numpy as np
import pytest

from lvita_data.packing.baselines import (
    LEFT_IN_BUFFER,
    pack_first_fit_decreasing,
    pack_greedy_knapsack,
    pack_original_online,
)
from lvita_data.packing.plan import TOO_LONG, TOO_MANY_TILES, plan_packs


def synthetic_mix(num: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(lengths, tiles): 60% tiled images, 15% short text, 20% video (<= 60 f), 5% long text."""
    rng = np.random.default_rng(seed)
    tiles_img = rng.integers(1, 13, num)
    image = 258 * tiles_img + (tiles_img > 1) * 3 + rng.integers(50, 600, num)
    text = rng.integers(100, 1500, num)
    frames = np.minimum(rng.lognormal(3.0, 0.8, num).astype(np.int64) + 1, 60)
    video = 258 * frames + rng.integers(50, 300, num)
    long_text = rng.integers(4_000, 16_000, num)
    kind = rng.random(num)
    lengths = np.select([kind < 0.6, kind < 0.75, kind < 0.95], [image, text, video], long_text)
    tiles = np.select([kind < 0.6, kind < 0.75, kind < 0.95], [tiles_img, 0, frames], 0)
    return lengths, tiles


def check_plan(plan, *, capacity, max_tiles=None, tiles=None):
    """Every sample in exactly one pack or rejected; no pack over either cap."""
    n = len(plan.lengths)
    packed = [i for p in plan.packs for i in p]
    rejected = [i for i, _ in plan.rejected]
    assert sorted(packed + rejected) == list(range(n))
    assert all(p == sorted(p) and p for p in plan.packs)
    assert all(reason in (TOO_LONG, TOO_MANY_TILES) for _, reason in plan.rejected)
    assert plan.pack_lengths().max(initial=0) <= capacity
    assert all(sum(plan.padded_lengths[i] for i in p) <= capacity for p in plan.packs[:200])
    for i, reason in plan.rejected:
        if reason == TOO_LONG:
            assert plan.padded_lengths[i] > capacity
        else:
            assert tiles[i] > max_tiles
    if max_tiles is not None:
        assert max(sum(tiles[i] for i in p) for p in plan.packs) <= max_tiles
    assert plan.num_packs >= plan.lower_bound()


def slow_bfd(lengths, capacity, tiles=None, max_tiles=0):
    """Per-sample BFD: least token room that fits, then least tile room, then most recent."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], -(tiles or lengths)[i], i))
    bins = []  # [token room, tile room, items, last touched]
    for step, i in enumerate(order):
        t = tiles[i] if tiles else 0
        fits = [b for b in bins if b[0] >= lengths[i] and b[1] >= t]
        b = min(fits, key=lambda b: (b[0], b[1], -b[3])) if fits else None
        if b is None:
            b = [capacity, max_tiles, [], 0]
            bins.append(b)
        b[0] -= lengths[i]
        b[1] -= t
        b[2].append(i)
        b[3] = step
    return sorted(sorted(b[2]) for b in bins)


def test_hand_case_is_optimal_and_exact():
    lengths = [5, 9, 3, 7, 1, 8]
    plan = plan_packs(lengths, 10, shuffle=False)
    assert plan.packs == [[1, 4], [5], [2, 3], [0]]  # 9+1, 8, 7+3, 5: ceil(33 / 10) packs
    assert plan.num_packs == plan.lower_bound() == 4
    assert plan.pack_lengths().tolist() == [10, 8, 10, 5]
    assert plan.fill() == pytest.approx(33 / 40)


def test_best_fit_beats_first_fit():
    lengths = [2, 2, 8, 5, 12, 3]  # FFD puts 3 next to 12 and strands a 2; BFD fills both
    bfd = plan_packs(lengths, 16)
    ffd = pack_first_fit_decreasing(lengths, 16)
    assert (bfd.num_packs, ffd.num_packs) == (2, 3)
    assert sorted(bfd.packs) == [[0, 1, 4], [2, 3, 5]]


@pytest.mark.parametrize("two_d", [False, True])
def test_class_batching_equals_per_sample_bfd(two_d):
    rng = np.random.default_rng(7)
    for _ in range(150):
        capacity = int(rng.integers(10, 200))
        n = int(rng.integers(1, 120))
        lengths = rng.integers(1, capacity + 1, n)
        if rng.random() < 0.5:  # few distinct lengths: long classes
            lengths = rng.choice(rng.integers(1, capacity + 1, 4), n)
        tiles, max_tiles = (
            (rng.integers(0, 6, n), int(rng.integers(5, 15))) if two_d else (None, None)
        )
        plan = plan_packs(lengths, capacity, tiles=tiles, max_tiles=max_tiles)
        ref_tiles = tiles.tolist() if two_d else None
        expected = slow_bfd(lengths.tolist(), capacity, ref_tiles, max_tiles or 0)
        assert sorted(plan.packs) == expected


@pytest.mark.parametrize(
    "options",
    [
        {},
        {"window": 500},
        {"align": 16},
        {"groups": "by_kind"},
        {"groups": "by_kind", "window": 300, "align": 8},
        {"max_tiles": 40},
        {"max_tiles": 40, "window": 700, "align": 4},
    ],
)
def test_invariants(options):
    lengths, tiles = synthetic_mix(3000, seed=1)
    lengths[[5, 77]] = 20_000  # over capacity
    options = dict(options)
    if options.get("groups") == "by_kind":
        options["groups"] = np.where(tiles == 0, "text", "vision")
    if "max_tiles" in options:
        tiles[9] = 41  # over the tile cap
        options["tiles"] = tiles
    plan = plan_packs(lengths, 16_384, **options)
    check_plan(plan, capacity=16_384, max_tiles=options.get("max_tiles"), tiles=tiles)
    reasons = dict(plan.rejected)
    assert reasons[5] == reasons[77] == TOO_LONG
    assert plan.num_packs > 100
    if "max_tiles" in options:
        assert reasons[9] == TOO_MANY_TILES
    if "groups" in options:
        for pack in plan.packs:
            assert len({options["groups"][i] for i in pack}) == 1


def test_determinism_and_seeded_pack_order():
    lengths, _ = synthetic_mix(5000, seed=2)
    a = plan_packs(lengths, 32_768, seed=1)
    b = plan_packs(lengths, 32_768, seed=1)
    c = plan_packs(lengths, 32_768, seed=2)
    unshuffled = plan_packs(lengths, 32_768, shuffle=False)
    assert a.packs == b.packs
    assert a.packs != c.packs and a.packs != unshuffled.packs
    assert sorted(a.packs) == sorted(c.packs) == sorted(unshuffled.packs)
    # Sorted packing opens packs longest-first; the shuffle must break that order.
    firsts = [max(lengths[p]) for p in unshuffled.packs]
    assert firsts == sorted(firsts, reverse=True)
    assert [max(lengths[p]) for p in a.packs] != firsts


def test_groups_never_mix_and_accept_any_hashable_labels():
    lengths = [6, 4, 6, 4, 3]
    groups = [("src", 1), ("src", 2), ("src", 1), ("src", 2), ("src", 2)]
    assert plan_packs(lengths, 10).num_packs == 3  # mixed: 6+4 | 6+4 | 3
    plan = plan_packs(lengths, 10, groups=groups)
    assert sorted(plan.packs) == [[0], [1, 3], [2], [4]]  # 6 | 6 | 4+4 (+3 > 10) | 3
    for pack in plan.packs:
        assert len({groups[i] for i in pack}) == 1
    with pytest.raises(ValueError, match="one label per sample"):
        plan_packs(lengths, 10, groups=groups[:-1])


def test_window_packs_only_within_windows():
    lengths, _ = synthetic_mix(4000, seed=3)
    plan = plan_packs(lengths, 16_384, window=1000)
    assert {min(p) // 1000 for p in plan.packs} == {0, 1, 2, 3}
    assert all(min(p) // 1000 == max(p) // 1000 for p in plan.packs)
    whole = plan_packs(lengths, 16_384)
    assert whole.num_packs <= plan.num_packs
    assert any(min(p) // 1000 != max(p) // 1000 for p in whole.packs)  # not trivially true


def test_window_applies_per_group():
    lengths = np.full(12, 3)
    groups = np.array([0, 1] * 6)
    plan = plan_packs(lengths, 9, groups=groups, window=3, shuffle=False)
    # Group 0 = samples 0,2,4,6,8,10 -> windows (0,2,4), (6,8,10); likewise for group 1.
    assert plan.packs == [[0, 2, 4], [6, 8, 10], [1, 3, 5], [7, 9, 11]]


def test_align_rounds_up_and_rejects_on_aligned_length():
    plan = plan_packs([9, 3, 4, 8, 1], 10, align=4, shuffle=False)
    assert plan.padded_lengths.tolist() == [12, 4, 4, 8, 4]
    assert plan.rejected == [(0, TOO_LONG)]  # 9 fits 10 only before alignment
    assert plan.packs == [[3], [1, 2], [4]]  # 8 | 4+4 | 4 (8 + 4 > 10)
    assert plan.packed_tokens() == 16 and plan.fill() == pytest.approx(16 / 30)


def test_tile_cap_is_a_second_dimension():
    plan = plan_packs([10] * 6, 100, tiles=[2] * 6, max_tiles=4)
    assert plan.num_packs == plan.lower_bound() == 3  # tokens alone would fit in one pack
    plan = plan_packs([10, 10, 10], 100, tiles=[5, 0, 1], max_tiles=4)
    assert plan.rejected == [(0, TOO_MANY_TILES)] and plan.packs == [[1, 2]]
    with pytest.raises(ValueError, match="go together"):
        plan_packs([10], 100, tiles=[1])


def test_bad_inputs_raise_and_empty_input_plans_nothing():
    with pytest.raises(ValueError, match=">= 1"):
        plan_packs([3, 0, 2], 10)
    with pytest.raises(ValueError):
        plan_packs([3], 0)
    empty = plan_packs([], 10)
    assert empty.packs == [] and empty.rejected == [] and empty.fill() == 1.0


def test_global_bfd_fill_on_100k_mix():
    lengths, _ = synthetic_mix(100_000, seed=4)
    plan = plan_packs(lengths, 16_384)
    assert not plan.rejected and plan.num_packs > 10_000
    assert plan.fill() >= 0.999
    assert plan.num_packs <= 1.001 * plan.lower_bound()


def test_original_packer_two_global_buffers_hand_trace():
    # capacity 10. b0/b1 = default_0/1, kept in dict order; an emitted buffer moves to the end.
    #  0:6 -> b0=6 | 1:3 -> b1=3 | 2:5 -> b1=8 | 3:4 -> b0=10 | 4:2 -> b1=10
    #  5:7 -> shortest is b0 (first of 10,10), 17 > 10: emit the longest, b0 (first) = [0, 3];
    #         b0=[5], order now b1, b0
    #  6:12 -> dropped | 7:1 -> b0=8 | 8:2 -> b0=10
    #  9:3 -> shortest is b1 (first in the new order): emit the longest, b1 = [1, 2, 4]
    #  end: b0=[5, 7, 8] and b1=[9] are never emitted
    plan = pack_original_online([6, 3, 5, 4, 2, 7, 12, 1, 2, 3], 10)
    assert plan.packs == [[0, 3], [1, 2, 4]]
    assert plan.rejected == [
        (5, LEFT_IN_BUFFER),
        (6, TOO_LONG),
        (7, LEFT_IN_BUFFER),
        (8, LEFT_IN_BUFFER),
        (9, LEFT_IN_BUFFER),
    ]
    assert plan.fill() == pytest.approx(20 / 20)


def test_original_packer_per_source_hand_trace():
    # Buffers per source: a sample only ever meets its own source's buffer.
    #  a:6 -> a=6 | b:4 -> b=4 | a:5 -> 11 > 10, emit [0], a=[2] | b:5 -> b=9 | a:3 -> a=8
    #  b:2 -> 11 > 10, emit [1, 3], b=[5] | a:11 dropped | b:1 -> b=3 | end: [2, 4], [5, 7] lost
    groups = ["a", "b", "a", "b", "a", "b", "a", "b"]
    plan = pack_original_online([6, 4, 5, 5, 3, 2, 11, 1], 10, groups=groups)
    assert plan.packs == [[0], [1, 3]]
    lost = [i for i, reason in plan.rejected if reason == LEFT_IN_BUFFER]
    assert lost == [2, 4, 5, 7] and (6, TOO_LONG) in plan.rejected
    assert plan.fill() == pytest.approx(15 / 20)


def test_original_packer_accounts_for_every_sample():
    lengths, _ = synthetic_mix(20_000, seed=5)
    groups = np.random.default_rng(0).integers(0, 7, len(lengths))
    for plan in (
        pack_original_online(lengths, 16_384),
        pack_original_online(lengths, 16_384, groups=groups, num_workers=3),
    ):
        reasons = Counter(reason for _, reason in plan.rejected)
        assert reasons[LEFT_IN_BUFFER] > 0 and plan.num_packs > 1000
        packed = [i for p in plan.packs for i in p]
        assert sorted(packed + [i for i, _ in plan.rejected]) == list(range(len(lengths)))
        assert plan.pack_lengths().max() <= 16_384
        assert plan.fill() < plan_packs(lengths, 16_384).fill()


def test_greedy_knapsack_hand_case_and_ffd_invariants():
    # Buffers of 3: [6, 5, 4] -> largest that fits: 6+4, then 5; [7, 3, 2] -> 7+3, then 2.
    plan = pack_greedy_knapsack([6, 5, 4, 7, 3, 2], 10, buffer_size=3)
    assert plan.packs == [[0, 2], [1], [3, 4], [5]]
    lengths, _ = synthetic_mix(5000, seed=6)
    for baseline in (
        pack_first_fit_decreasing(lengths, 16_384),
        pack_greedy_knapsack(lengths, 16_384),
    ):
        check_plan(baseline, capacity=16_384)
        assert baseline.num_packs >= plan_packs(lengths, 16_384).num_packs


def test_packing_imports_neither_torch_nor_media_libraries():
    code = "import sys, lvita_data.packing.plan; print(sorted(sys.modules))"
    modules = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout
    assert "'numpy'" in modules  # the probe itself worked
    assert "'torch'" not in modules and "lvita_model" not in modules
    assert "'av'" not in modules and "'PIL'" not in modules
