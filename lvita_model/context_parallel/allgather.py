"""All-gather-KV context-parallel attention ("Llama-3" CP; TE's all-gather path).

Each of the P ranks holds T/P tokens (`CPShard`, zigzag or contiguous) and their q, k, v.
Forward, per group of `head_stride` KV heads (and their Hq/Hkv query heads each):

1. An all-gather (``all_gather_single``, formerly ``all_gather_into_tensor``) of this rank's K
   and V rows of those heads (stacked, one call) into a rank-major buffer [P * T/P, 2, h, D]
   (rank 0's tokens, then rank 1's, ...). The next head group's gather is started (async)
   before the current group is computed (double buffer), so at most two groups' full-sequence
   buffers live at once: gathering in head groups bounds the buffer to T x 2 x head_stride x D
   instead of all KV heads.
2. The local queries attend the gathered keys they may see (`blocks.allgather_blocks`): keys are
   read from the buffer in global order by index, per document. Zigzag causal: two calls, the
   early chunks vs each document's prefix up to the end of chunk r and the late chunks vs the
   prefix up to the end of chunk 2P-1-r, both bottom-right causal, so cu_seqlens kernels
   (flash, npu) see valid varlen batches; contiguous causal and non-causal: one call. Query rows
   of the calls are disjoint, so out and LSE need no merge.

Backward (an autograd Function) re-gathers K/V per head group (nothing full-sequence is saved),
runs the backend's block backward per call with the saved out/LSE, scatters each call's dK/dV
into an fp32 buffer shaped like the gathered one (``index_add_``; the two zigzag calls overlap
on the early prefix), and a reduce-scatter (``reduce_scatter_single``) sums the buffer over
ranks and leaves each rank its own rows (async, overlapping the next head group). Gradients
return in the inputs' dtypes.

Verified (tests/model/test_cp_attention.py, gloo on CPU, P = 2 and 4, MHA 4/4 and GQA 4/2,
head_stride 1 and all heads, zigzag and contiguous, causal and non-causal, 6 documents of raw
lengths 13/3/0/24/1/6 padded between documents and at the tail, also on CP = 2 sub-groups;
reference = `attend` with `SdpaBackend` over the whole padded sequence): max error of out,
lse, dq, dk, dv relative to the reference's largest magnitude 4.7e-7 in fp32 (tolerance 1e-5)
and 8.7e-4 in bf16 (tolerance 2e-2), with the mask reference and with a backend that reads
only cu_seqlens. Not run here: a real flash / npu kernel.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from lvita_model.attention.base import AttentionBackend
from lvita_model.context_parallel.base import BlockwiseAttention
from lvita_model.context_parallel.blocks import Block, allgather_blocks, take_rows
from lvita_model.context_parallel.sharding import CPShard
from lvita_model.errors import ContextParallelError

# torch >= 2.13 renamed the tensor collectives (the old names warn); older torch has only those.
_all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


def _head_groups(num_kv_heads: int, stride: int | None) -> list[tuple[int, int]]:
    stride = num_kv_heads if stride is None else stride
    return [(h, min(h + stride, num_kv_heads)) for h in range(0, num_kv_heads, stride)]


class _Gather:
    """Async all-gather of one head group's K/V rows: [T/P, 2, h, D] -> [T, 2, h, D]."""

    def __init__(self, k: Tensor, v: Tensor, heads: tuple[int, int], attention: Any) -> None:
        local = torch.stack([k[:, heads[0] : heads[1]], v[:, heads[0] : heads[1]]], dim=1)
        self.buffer = local.new_empty((local.shape[0] * attention.cp_size, *local.shape[1:]))
        self.request = _all_gather(self.buffer, local, group=attention.group, async_op=True)

    def result(self) -> Tensor:
        self.request.wait()
        return self.buffer


class _AllGatherKVFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, attention, scale):  # type: ignore[override]
        blocks = attention.blocks(q.device)
        groups = _head_groups(k.shape[1], attention.head_stride)
        per_kv = q.shape[1] // k.shape[1]  # query heads per KV head
        out = torch.empty(q.shape[0], q.shape[1], v.shape[-1], dtype=q.dtype, device=q.device)
        lse = torch.empty(q.shape[1], q.shape[0], dtype=torch.float32, device=q.device)
        gather = _Gather(k, v, groups[0], attention)
        for index, heads in enumerate(groups):
            gathered = gather.result()  # [T, 2, h, D]
            if index + 1 < len(groups):
                gather = _Gather(k, v, groups[index + 1], attention)
            q_heads = slice(heads[0] * per_kv, heads[1] * per_kv)
            q_group = q[:, q_heads].contiguous()
            for block in blocks:
                kv = gathered.index_select(0, block.k_rows)  # [S, 2, h, D]
                block_out, block_lse = attention.backend.forward(
                    take_rows(q_group, block.q_rows), kv[:, 0].contiguous(), kv[:, 1].contiguous(),
                    block.meta, scale,
                )  # fmt: skip
                rows = slice(None) if block.q_rows is None else block.q_rows
                out[rows, q_heads] = block_out.to(q.dtype)
                lse[q_heads, rows] = block_lse.float()
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.attention, ctx.scale = attention, scale
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def backward(ctx, dout, _dlse):  # type: ignore[override]
        q, k, v, out, lse = ctx.saved_tensors
        attention, scale = ctx.attention, ctx.scale
        dout = dout.contiguous()
        blocks = attention.blocks(q.device)
        groups = _head_groups(k.shape[1], attention.head_stride)
        per_kv = q.shape[1] // k.shape[1]
        dq = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
        dkv = torch.zeros(k.shape[0], 2, *k.shape[1:], dtype=torch.float32, device=k.device)
        pending: tuple[Any, Tensor, tuple[int, int]] | None = None
        gather = _Gather(k, v, groups[0], attention)
        for index, heads in enumerate(groups):
            gathered = gather.result()  # [T, 2, h, D]
            if index + 1 < len(groups):
                gather = _Gather(k, v, groups[index + 1], attention)
            q_heads = slice(heads[0] * per_kv, heads[1] * per_kv)
            grads = torch.zeros(gathered.shape, dtype=torch.float32, device=q.device)
            for block in blocks:
                _block_backward(
                    attention.backend, scale, block, q_heads, dout, q, gathered, out, lse, dq,
                    grads,
                )  # fmt: skip
            if pending is not None:  # the previous group's reduce-scatter overlapped this one
                _finish(pending, dkv)
            pending = _ReduceScatter.start(grads, heads, attention.group)
        _finish(pending, dkv)
        return dq.to(q.dtype), dkv[:, 0].to(k.dtype), dkv[:, 1].to(v.dtype), None, None


def _finish(pending: tuple[Any, Tensor, tuple[int, int]] | None, dkv: Tensor) -> None:
    """Wait for a head group's reduce-scatter and store its rows into dkv [T/P, 2, Hkv, D]."""
    assert pending is not None
    request, local, heads = pending
    request.wait()
    dkv[:, :, heads[0] : heads[1]] = local


class _ReduceScatter:
    @staticmethod
    def start(
        grads: Tensor, heads: tuple[int, int], group: dist.ProcessGroup | None
    ) -> tuple[Any, Tensor, tuple[int, int]]:
        """Sum grads [T, 2, h, D] over ranks, keep this rank's rows [T/P, 2, h, D] (async)."""
        size = dist.get_world_size(group)
        local = grads.new_empty((grads.shape[0] // size, *grads.shape[1:]))
        request = _reduce_scatter(local, grads, op=dist.ReduceOp.SUM, group=group, async_op=True)
        return request, local, heads


def _block_backward(
    backend: AttentionBackend,
    scale: float,
    block: Block,
    q_heads: slice,
    dout: Tensor,
    q: Tensor,
    gathered: Tensor,
    out: Tensor,
    lse: Tensor,
    dq: Tensor,
    grads: Tensor,
) -> None:
    """One call's dQ (into `dq`, local rows, this head group) and dK/dV (into `grads`, the
    gathered rows, fp32)."""
    rows = block.q_rows
    kv = gathered.index_select(0, block.k_rows)  # [S, 2, h, D]
    block_lse = lse[q_heads] if rows is None else lse[q_heads].index_select(1, rows)
    block_dq, block_dk, block_dv = backend.backward(
        take_rows(dout[:, q_heads], rows).contiguous(), take_rows(q[:, q_heads], rows).contiguous(),
        kv[:, 0].contiguous(), kv[:, 1].contiguous(), take_rows(out[:, q_heads], rows).contiguous(),
        block_lse.contiguous(), block.meta, scale,
    )  # fmt: skip
    if rows is None:
        dq[:, q_heads] += block_dq.float()
    else:
        dq[:, q_heads].index_add_(0, rows, block_dq.float())
    grads[:, 0].index_add_(0, block.k_rows, block_dk.float())
    grads[:, 1].index_add_(0, block.k_rows, block_dv.float())


class AllGatherKVAttention(BlockwiseAttention):
    """All-gather-KV attention for one batch: ``attention(q, k, v) -> out`` on this rank's
    tokens.

    `shard` is this rank's `CPShard` (zigzag or contiguous), `group` the CP process group (None:
    the default group). `head_stride`: KV heads gathered at a time (None: all), bounding the
    full-sequence buffer; it must divide nothing, the last group may be smaller. `causal`:
    per-document causal or bidirectional. `scale` defaults to D ** -0.5. The calls' metas are
    built once per device, on the first call.
    """

    function = _AllGatherKVFn

    def __init__(
        self,
        shard: CPShard,
        backend: AttentionBackend,
        group: dist.ProcessGroup | None = None,
        causal: bool = True,
        head_stride: int | None = None,
        scale: float | None = None,
    ) -> None:
        if head_stride is not None and head_stride < 1:
            raise ContextParallelError(f"head_stride must be >= 1 (or None), got {head_stride}")
        super().__init__(shard, backend, group, causal, scale)
        self.head_stride = head_stride

    def plan_blocks(self, device: torch.device) -> list[Block]:
        return allgather_blocks(self.shard, self.causal, device)
