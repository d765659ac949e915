"""Zigzag ring attention over a CP process group: K/V travel P-1 hops, partials merge by LSE.

Each of the P ranks holds T/P tokens of the packed sequence (`CPShard`, zigzag per document or
contiguous) and their q, k, v. Forward, at ring step s = 0 .. P-1 rank r holds the K/V of
source rank (r - s) mod P: it starts sending that K/V to r+1 (and receiving the next from r-1,
one ``dist.batch_isend_irecv`` of K and V stacked into one buffer) *before* computing the block
of that source (`blocks.ring_blocks`: step 0 local causal, an earlier source's early chunks
for all local queries, a later source's whole K/V for the late local chunks), so the transfer
overlaps the block's compute. Each block's (out, lse) is merged into an fp32 accumulator by LSE
(`merge`); rows that see no key keep lse = -inf and out = 0.

Backward (an autograd Function) re-runs the ring: at each step the backend's block backward
gets the block's q/k/v rows and the **merged** out and LSE (so each block's share of the
gradient is exact). dQ accumulates locally in fp32. dK/dV of the source's K/V are accumulated in
fp32 in a buffer that travels around the ring with K/V: the running sum that arrives from r-1
at step s (for the K/V rank r holds at step s) gets this rank's block gradient added and goes
on to r+1; after the last step one more hop brings every rank its own dK/dV summed over all P
ranks. K/V for the next step and the previous step's dK/dV are in flight during the block's
backward compute (two tags, so gloo matches them; NCCL matches by issue order, the same on all
ranks). Gradients return in the inputs' dtypes.

Layouts: zigzag (balanced; every document a multiple of 2P, `sharding.pad_documents`) and
contiguous (unbalanced for causal: rank r computes r+1 blocks). Both are expressed in both meta
forms, so varlen kernels (flash, npu) and the mask reference both work. Non-causal (ViT-like,
per-document bidirectional) works with either layout.

Verified (tests/model/test_cp_attention.py, gloo on CPU, P = 2 and 4, MHA 4/4 and GQA 4/2, 6
documents of raw lengths 13/3/0/24/1/6 tokens padded per document (zigzag) or at the tail
(contiguous), causal and non-causal, also on the CP = 2 sub-groups of a DP 2 x CP 2 world;
reference = `attend` with `SdpaBackend` over the whole padded sequence + autograd): max error of
out, lse, dq, dk, dv relative to the reference's largest magnitude 7e-7 in fp32 (tolerance
1e-5) and 6.8e-3 in bf16 (tolerance 2e-2), with the mask reference and with a backend that
reads only cu_seqlens (the varlen kernels' view). Not run here: a real flash / npu kernel.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from lvita_model.attention.base import AttentionBackend
from lvita_model.context_parallel.base import BlockwiseAttention
from lvita_model.context_parallel.blocks import Block, ring_blocks, take_rows
from lvita_model.context_parallel.merge import empty_accumulator, merge_into_

KV_TAG = 0
DKV_TAG = 1


class _RingExchange:
    """Send a buffer to the next rank and receive the same-shaped one from the previous."""

    def __init__(self, group: dist.ProcessGroup | None) -> None:
        self.group = group
        rank, size = dist.get_rank(group), dist.get_world_size(group)
        group_obj = group if group is not None else dist.group.WORLD
        self.next = dist.get_global_rank(group_obj, (rank + 1) % size)
        self.prev = dist.get_global_rank(group_obj, (rank - 1) % size)

    def start(self, send: Tensor, tag: int) -> tuple[Tensor, list[Any]]:
        recv = torch.empty_like(send)
        ops = [
            dist.P2POp(dist.isend, send, self.next, self.group, tag),
            dist.P2POp(dist.irecv, recv, self.prev, self.group, tag),
        ]
        return recv, dist.batch_isend_irecv(ops)


def _wait(requests: list[Any]) -> None:
    for request in requests:
        request.wait()


class _RingAttentionFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, ring, scale):  # type: ignore[override]
        blocks = ring.blocks(q.device)
        exchange = _RingExchange(ring.group) if ring.cp_size > 1 else None
        out, lse = empty_accumulator(q.shape[0], q.shape[1], v.shape[-1], q.device)
        kv = torch.stack([k, v])  # [2, T, Hkv, D]
        for step in range(ring.cp_size):
            src = (ring.cp_rank - step) % ring.cp_size
            last = step + 1 == ring.cp_size
            if not last:
                next_kv, requests = exchange.start(kv, KV_TAG)
            block = blocks[src]
            if block is not None:
                block_out, block_lse = ring.backend.forward(
                    take_rows(q, block.q_rows), take_rows(kv[0], block.k_rows),
                    take_rows(kv[1], block.k_rows), block.meta, scale,
                )  # fmt: skip
                merge_into_(out, lse, block_out, block_lse, block.q_rows)
            if not last:
                _wait(requests)
                kv = next_kv
        out = out.to(q.dtype)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.ring, ctx.scale = ring, scale
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def backward(ctx, dout, _dlse):  # type: ignore[override]
        q, k, v, out, lse = ctx.saved_tensors
        ring = ctx.ring
        dout = dout.contiguous()
        blocks = ring.blocks(q.device)
        exchange = _RingExchange(ring.group) if ring.cp_size > 1 else None
        dq = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
        kv = torch.stack([k, v])  # [2, T, Hkv, D]
        dkv_requests: list[Any] = []
        dkv_in: Tensor | None = None
        for step in range(ring.cp_size):
            src = (ring.cp_rank - step) % ring.cp_size
            last = step + 1 == ring.cp_size
            if not last:
                next_kv, kv_requests = exchange.start(kv, KV_TAG)
            dkv = torch.zeros(kv.shape, dtype=torch.float32, device=kv.device)  # [2, T, Hkv, D]
            block = blocks[src]
            if block is not None:
                _block_backward(ring.backend, ctx.scale, block, dout, q, kv, out, lse, dq, dkv)
            if step > 0:  # the running dK/dV of this source from the ranks before this one
                _wait(dkv_requests)
                dkv += dkv_in
            if not last:
                _wait(kv_requests)
                kv = next_kv
            if exchange is not None:
                dkv_in, dkv_requests = exchange.start(dkv, DKV_TAG)
        if exchange is not None:  # the last hop: every rank's own dK/dV, summed over all ranks
            _wait(dkv_requests)
            dkv = dkv_in
        return dq.to(q.dtype), dkv[0].to(k.dtype), dkv[1].to(v.dtype), None, None


def _block_backward(
    backend: AttentionBackend,
    scale: float,
    block: Block,
    dout: Tensor,
    q: Tensor,
    kv: Tensor,
    out: Tensor,
    lse: Tensor,
    dq: Tensor,
    dkv: Tensor,
) -> None:
    """Add one block's dQ (into `dq`, local rows) and dK/dV (into `dkv`, source rows)."""
    rows = block.q_rows
    block_lse = lse if rows is None else lse.index_select(1, rows)
    block_dq, block_dk, block_dv = backend.backward(
        take_rows(dout, rows), take_rows(q, rows), take_rows(kv[0], block.k_rows),
        take_rows(kv[1], block.k_rows), take_rows(out, rows), block_lse, block.meta, scale,
    )  # fmt: skip
    if rows is None:
        dq += block_dq.float()
    else:
        dq.index_add_(0, rows, block_dq.float())
    if block.k_rows is None:
        dkv[0] += block_dk.float()
        dkv[1] += block_dv.float()
    else:
        dkv[0].index_add_(0, block.k_rows, block_dk.float())
        dkv[1].index_add_(0, block.k_rows, block_dv.float())


class ZigzagRingAttention(BlockwiseAttention):
    """Ring attention (see the module docstring and `BlockwiseAttention`)."""

    function = _RingAttentionFn

    def plan_blocks(self, device: torch.device) -> list[Block | None]:
        """The block computed with each source rank's K/V (None: nothing to compute)."""
        return ring_blocks(self.shard, self.causal, device)
