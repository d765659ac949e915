"""Context-parallel attention (zigzag ring, all-gather KV, Ulysses) against the single-process
reference, on CPU with gloo (P = 2 and 4), plus the pure parts (LSE merge, block plans).

Every rank builds the same seeded q/k/v/dout over the whole padded sequence, computes the
reference (`attend` with `SdpaBackend` + autograd) and compares its local slice of out, lse,
dq, dk, dv with the CP result. Errors are max |cp - ref| / max |ref| per tensor; tolerances
1e-5 (fp32) and 2e-2 (bf16: one bf16 rounding of the output is 4e-3 relative). Documents: raw
lengths 13/3/0/24/1/6 (one empty, one of a single token), padded per document to 2P (zigzag:
padding between documents, documents shorter than a chunk before padding, documents crossing
rank boundaries) or at the tail (contiguous). All cases of one P run in one launch (0.8 s for P = 2,
1.8 s for P = 4 with every case; the whole file ~9-11 s on 2 vCPUs).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import pytest
import torch
import torch.distributed as dist
from dist_utils import DistributedTestError, run_distributed
from torch.distributed.device_mesh import init_device_mesh

from lvita_model.attention import AttnMeta, SdpaBackend, attend, packed_meta, varlen_meta
from lvita_model.attention.base import layout_meta
from lvita_model.context_parallel.allgather import AllGatherKVAttention
from lvita_model.context_parallel.blocks import (
    allgather_blocks,
    gathered_index,
    ring_blocks,
    take_rows,
)
from lvita_model.context_parallel.merge import (
    empty_accumulator,
    merge_into_,
    merge_partials,
    merge_two,
)
from lvita_model.context_parallel.ring import ZigzagRingAttention
from lvita_model.context_parallel.sharding import pad_documents, plan_shard
from lvita_model.context_parallel.ulysses import UlyssesAttention
from lvita_model.errors import ContextParallelError

RAW_LENGTHS = (13, 3, 0, 24, 1, 6)
HEAD_DIM = 8
TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 2e-2}


def raw_cu() -> tuple[int, ...]:
    cu = [0]
    for length in RAW_LENGTHS:
        cu.append(cu[-1] + length)
    return tuple(cu)


def padded_cu(cp_size: int, layout: str) -> tuple[int, ...]:
    return pad_documents(raw_cu(), cp_size, layout)[0]  # type: ignore[arg-type]


class CuSeqlensOnlyBackend(SdpaBackend):
    """The varlen kernels' view: reads only cu_seqlens (bottom-right causal), ignoring the
    meta's doc/order, so the plans' cu_seqlens form is tested too."""

    name = "cu_only"

    @staticmethod
    def from_cu(meta: AttnMeta) -> AttnMeta:
        return varlen_meta(meta.host_cu_seqlens_q, meta.host_cu_seqlens_k, causal=meta.causal)

    def forward(self, q, k, v, meta, scale):
        return super().forward(q, k, v, self.from_cu(meta), scale)

    def backward(self, dout, q, k, v, out, lse, meta, scale):
        return super().backward(dout, q, k, v, out, lse, self.from_cu(meta), scale)


BACKENDS = {"sdpa": SdpaBackend, "cu_only": CuSeqlensOnlyBackend}


def make_inputs(total: int, heads: tuple[int, int], dtype: torch.dtype, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(total, heads[0], HEAD_DIM, generator=gen)
    k = torch.randn(total, heads[1], HEAD_DIM, generator=gen)
    v = torch.randn(total, heads[1], HEAD_DIM, generator=gen)
    dout = torch.randn(total, heads[0], HEAD_DIM, generator=gen)
    return tuple(x.to(dtype) for x in (q, k, v, dout))


def reference(cu, causal: bool, q, k, v, dout) -> dict[str, torch.Tensor]:
    """Full-sequence out, lse and gradients from the sdpa reference + autograd."""
    meta = packed_meta(cu, causal=causal)
    leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    out = attend(*leaves, meta, SdpaBackend())
    out.backward(dout)
    lse = SdpaBackend().forward(q, k, v, meta, HEAD_DIM**-0.5)[1]
    grads = {name: x.grad for name, x in zip(("dq", "dk", "dv"), leaves, strict=True)}
    return {"out": out.detach(), "lse": lse, **grads}


def rel_err(value: torch.Tensor, ref: torch.Tensor) -> float:
    ref = ref.detach().float()
    diff = (value.detach().float() - ref).abs().max()
    return float(diff / ref.abs().max().clamp_min(1e-12))


# ------------------------------------------------------------------------------------------
# pure parts: merge, block plans, padding errors


def _partial(q, k, v, meta, keys, causal):
    sub = packed_meta(meta.host_cu_seqlens_q, causal=causal)
    sub = layout_meta(
        sub.host_cu_seqlens_q, sub.host_cu_seqlens_k, sub.doc_q, sub.doc_k[keys], sub.order_q,
        sub.order_k[keys], causal=causal,
    )  # fmt: skip
    return SdpaBackend().forward(q, k[keys], v[keys], sub, 0.3)


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
def test_merge_of_key_blocks_equals_attention_over_all_keys(causal):
    cu = raw_cu()
    meta = packed_meta(cu, causal=causal)
    q, k, v, _ = make_inputs(cu[-1], (4, 2), torch.float64, seed=1)
    full_out, full_lse = SdpaBackend().forward(q, k, v, meta, 0.3)
    cuts = [torch.arange(0, 10), torch.arange(10, 30), torch.arange(30, cu[-1])]
    parts = [_partial(q, k, v, meta, keys, causal) for keys in cuts]
    out2, lse2 = merge_two(*parts[0], *merge_partials(*zip(*parts[1:], strict=True)))
    out3, lse3 = merge_partials([p[0] for p in parts], [p[1] for p in parts])
    acc_out, acc_lse = empty_accumulator(cu[-1], 4, HEAD_DIM, q.device)
    for part in reversed(parts):
        merge_into_(acc_out, acc_lse, *part)
    for out, lse in ((out2, lse2), (out3, lse3), (acc_out, acc_lse)):
        assert out.dtype == lse.dtype == torch.float32
        torch.testing.assert_close(out, full_out.float(), atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(lse, full_lse.float(), atol=1e-6, rtol=1e-6)


def test_merge_keeps_rows_without_keys_at_zero_and_minus_inf():
    out_a, out_b = torch.randn(3, 2, 4), torch.zeros(3, 2, 4)
    lse_a = torch.tensor([[0.5, -math.inf, -math.inf], [1.0, 2.0, -math.inf]])
    lse_b = torch.full((2, 3), -math.inf)
    out_a[1, 0] = 0.0  # rows with lse -inf hold out = 0 (the contract)
    out_a[2] = 0.0
    out, lse = merge_two(out_a, lse_a, out_b, lse_b)
    assert not out.isnan().any() and not lse.isnan().any()
    torch.testing.assert_close(out, out_a)
    assert torch.equal(lse, lse_a)
    rows = torch.tensor([2, 0])
    acc_out, acc_lse = empty_accumulator(3, 2, 4, out.device)
    merge_into_(acc_out, acc_lse, out_b[:2], lse_b[:, :2], rows)
    assert torch.isneginf(acc_lse).all() and not acc_out.any()
    out, lse = merge_partials([out_b, out_b], [lse_b, lse_b])
    assert torch.isneginf(lse).all() and not out.any() and not out.isnan().any()


@pytest.mark.parametrize("cp_size", [2, 4])
@pytest.mark.parametrize("layout", ["zigzag", "contiguous"])
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("backend", ["sdpa", "cu_only"])
def test_block_plans_reproduce_full_attention_in_one_process(cp_size, layout, causal, backend):
    """Every rank's ring blocks (merged by LSE) and all-gather calls, run in one process with
    either meta form, give the rank's rows of the full result."""
    cu = padded_cu(cp_size, layout)
    q, k, v, _ = make_inputs(cu[-1], (4, 2), torch.float32, seed=2)
    full_out, full_lse = SdpaBackend().forward(q, k, v, packed_meta(cu, causal=causal), 0.3)
    shards = [plan_shard(cu, cp_size, rank, layout) for rank in range(cp_size)]
    impl = BACKENDS[backend]()
    gathered = gathered_index(shards[0])
    for shard in shards:
        rows = shard.index
        out, lse = empty_accumulator(shard.num_tokens, 4, HEAD_DIM, q.device)
        for src, block in enumerate(ring_blocks(shard, causal, "cpu")):
            if block is None:
                continue
            keys = take_rows(shards[src].index, block.k_rows)
            part = impl.forward(take_rows(q[rows], block.q_rows), k[keys], v[keys], block.meta, 0.3)
            merge_into_(out, lse, *part, block.q_rows)
        torch.testing.assert_close(out, full_out[rows], atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(lse, full_lse[:, rows], atol=1e-6, rtol=1e-6)
        out, lse = torch.full_like(out, math.nan), torch.full_like(lse, math.nan)
        for block in allgather_blocks(shard, causal, "cpu"):
            keys = gathered[block.k_rows]
            part_out, part_lse = impl.forward(
                take_rows(q[rows], block.q_rows), k[keys], v[keys], block.meta, 0.3
            )
            sel = slice(None) if block.q_rows is None else block.q_rows
            out[sel], lse[:, sel] = part_out, part_lse
        torch.testing.assert_close(out, full_out[rows], atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(lse, full_lse[:, rows], atol=1e-6, rtol=1e-6)


def test_zigzag_causal_ring_plan_is_balanced():
    """One causal document: zigzag gives every rank the same number of visible query-key pairs,
    contiguous gives the last rank 6.6 times the first's."""

    def pairs(layout: str) -> list[int]:
        cu = (0, 64)
        counts = []
        for rank in range(4):
            shard = plan_shard(cu, 4, rank, layout)  # type: ignore[arg-type]
            total = 0
            for block in ring_blocks(shard, True, "cpu"):
                if block is not None:
                    m = block.meta
                    visible = (m.doc_q[:, None] == m.doc_k[None]) & (
                        m.order_k[None] <= m.order_q[:, None]
                    )
                    total += int(visible.sum())
            counts.append(total)
        return counts

    zigzag, contiguous = pairs("zigzag"), pairs("contiguous")
    assert zigzag == [520] * 4  # 64 * 65 / 2 / 4
    assert contiguous == [136, 392, 648, 904]


def test_unpadded_documents_are_rejected_with_a_padding_hint():
    with pytest.raises(ContextParallelError, match="pad_documents"):
        plan_shard(raw_cu(), 2, 0, "zigzag")
    with pytest.raises(ContextParallelError, match="pad_documents"):
        plan_shard(raw_cu(), 2, 0, "contiguous")  # 47 tokens


# ------------------------------------------------------------------------------------------
# distributed: one launch per P, many cases


@dataclass(frozen=True)
class Case:
    impl: str  # ring | allgather | ulysses
    layout: str
    causal: bool
    heads: tuple[int, int]
    dtype: torch.dtype = torch.float32
    backend: str = "sdpa"

    @property
    def name(self) -> str:
        dtype = str(self.dtype).removeprefix("torch.")
        causal = "causal" if self.causal else "full"
        heads = f"{self.heads[0]}q{self.heads[1]}kv"
        return f"{self.impl}-{self.layout}-{causal}-{heads}-{dtype}-{self.backend}"


def cases() -> list[Case]:
    out = []
    for impl in ("ring", "allgather", "ulysses"):
        for layout in ("zigzag", "contiguous"):
            for causal in (True, False):
                for heads in ((4, 4), (4, 2)):
                    out.append(Case(impl, layout, causal, heads))
                    if impl != "ulysses":
                        out.append(Case(impl, layout, causal, heads, backend="cu_only"))
                out.append(Case(impl, layout, causal, (4, 2), dtype=torch.bfloat16))
    return out


CASES = cases()


def _build(case: Case, shard, group=None):
    backend = BACKENDS[case.backend]()
    if case.impl == "ring":
        return ZigzagRingAttention(shard, backend, group, causal=case.causal)
    if case.impl == "allgather":
        stride = 1 if case.backend == "cu_only" else None  # both gather granularities
        return AllGatherKVAttention(shard, backend, group, causal=case.causal, head_stride=stride)
    return UlyssesAttention(shard, backend, group, causal=case.causal)


def _run_case(case: Case, cp_size: int, cp_rank: int, group=None, seed: int = 0) -> dict:
    cu = padded_cu(cp_size, case.layout)
    q, k, v, dout = make_inputs(cu[-1], case.heads, case.dtype, seed)
    ref = _reference_cached(cu, case.causal, case.heads, case.dtype, seed)
    shard = plan_shard(cu, cp_size, cp_rank, case.layout)  # type: ignore[arg-type]
    attention = _build(case, shard, group)
    local = [shard.shard(x).requires_grad_() for x in (q, k, v)]
    if hasattr(attention, "forward_with_lse"):
        out, lse = attention.forward_with_lse(*local)
    else:
        out, lse = attention(*local), None
    out.backward(shard.shard(dout))
    assert out.dtype == case.dtype and all(x.grad.dtype == case.dtype for x in local)
    errors = {"out": rel_err(out, shard.shard(ref["out"]))}
    if lse is not None:
        errors["lse"] = rel_err(lse, ref["lse"][:, shard.index])
    for name, x in zip(("dq", "dk", "dv"), local, strict=True):
        errors[name] = rel_err(x.grad, shard.shard(ref[name]))
    return errors


@functools.cache
def _reference_cached(cu, causal, heads, dtype, seed):
    q, k, v, dout = make_inputs(cu[-1], heads, dtype, seed)
    return reference(cu, causal, q, k, v, dout)


def _error_message(fn) -> str:
    try:
        fn()
    except ContextParallelError as exc:
        return str(exc)
    return "no error"


def _errors(rank: int, world_size: int) -> dict[str, str]:
    cu = padded_cu(world_size, "zigzag")
    shard = plan_shard(cu, world_size, rank)
    other = plan_shard(cu, world_size, (rank + 1) % world_size)
    q, k, v, _ = make_inputs(cu[-1], (5, 5), torch.float32)
    ulysses = UlyssesAttention(shard, SdpaBackend())
    local = [shard.shard(x) for x in (q, k, v)]
    return {
        "wrong_shard": _error_message(lambda: ZigzagRingAttention(other, SdpaBackend())),
        "unsharded": _error_message(lambda: AllGatherKVAttention(shard, SdpaBackend())(q, k, v)),
        "ulysses_heads": _error_message(lambda: ulysses(*local)),
        "ulysses_kv_heads": _error_message(
            lambda: UlyssesAttention(shard, SdpaBackend(), replicate_kv=False)(
                local[0][:, :4].contiguous(), local[1][:, :1].contiguous(), local[2][:, :1]
            )
        ),
    }


def _subgroups(rank: int, world_size: int) -> dict:
    """World 4 as DP 2 x CP 2 (the training mesh, CP inner): each DP replica runs its own CP = 2
    ring and all-gather (with its own inputs), which exercises group-rank -> global-rank mapping
    in the p2p calls."""
    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "cp"))
    cp_group, dp_group = mesh.get_group("cp"), mesh.get_group("dp")
    cp_rank, dp_rank = mesh.get_local_rank("cp"), mesh.get_local_rank("dp")
    errors = {}
    for impl in ("ring", "allgather"):
        case = Case(impl, "zigzag", True, (4, 2))
        errors[impl] = _run_case(case, 2, cp_rank, cp_group, seed=dp_rank)
    members = dist.get_process_group_ranks(cp_group)
    return {"cp": members, "dp": dist.get_process_group_ranks(dp_group), "errors": errors}


def _all(rank: int, world_size: int) -> dict:
    torch.manual_seed(0)
    results = {case.name: _run_case(case, world_size, rank) for case in CASES}
    results["__errors__"] = _errors(rank, world_size)
    if world_size == 4:
        results["__subgroups__"] = _subgroups(rank, world_size)
    return results


@functools.cache
def launch(world_size: int) -> list[dict]:
    return run_distributed(_all, world_size, timeout=240)


def _check(errors: dict[str, float], tolerance: float, label: str) -> None:
    bad = {name: err for name, err in errors.items() if not err <= tolerance}
    assert not bad, f"{label}: errors above {tolerance:g}: {bad} (all: {errors})"


@pytest.mark.parametrize("cp_size", [2, 4])
@pytest.mark.parametrize("case", CASES, ids=[case.name for case in CASES])
def test_cp_attention_matches_reference(cp_size, case):
    for rank, result in enumerate(launch(cp_size)):
        _check(result[case.name], TOLERANCE[case.dtype], f"P={cp_size} rank {rank} {case.name}")


@pytest.mark.parametrize("cp_size", [2, 4])
def test_impossible_configs_raise_clear_errors(cp_size):
    for rank, result in enumerate(launch(cp_size)):
        messages = result["__errors__"]
        assert f"shard is for CP rank {(rank + 1) % cp_size}" in messages["wrong_shard"]
        assert "pass the sharded tensors" in messages["unsharded"]
        assert f"query heads to divide by {cp_size}" in messages["ulysses_heads"]
        assert "replicate_kv=False" in messages["ulysses_kv_heads"]


def test_cp_groups_on_a_dp_by_cp_mesh():
    for rank, result in enumerate(launch(4)):
        sub = result["__subgroups__"]
        assert sub["cp"] == [rank - rank % 2, rank - rank % 2 + 1]
        assert sub["dp"] == [rank % 2, rank % 2 + 2]
        for impl, errors in sub["errors"].items():
            _check(errors, TOLERANCE[torch.float32], f"DP2xCP2 rank {rank} {impl}")


def _fail_on_rank_one(rank: int, world_size: int) -> int:
    if rank == 1:
        raise ValueError("boom on purpose")
    return rank


def test_run_distributed_reraises_a_rank_failure_with_its_traceback():
    with pytest.raises(DistributedTestError, match=r"rank 1 of 2 failed(.|\n)*boom on purpose"):
        run_distributed(_fail_on_rank_one, 2, timeout=60)
