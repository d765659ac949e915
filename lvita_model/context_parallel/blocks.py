"""Which local queries see which keys in each block of a CP attention step: pure planning.

A `Block` is one backend call: query rows of this rank (``q_rows``, None = all), key rows of a
K/V buffer (``k_rows``, None = all) and the `AttnMeta` of that pair in both forms (cu_seqlens
for the varlen kernels, per-token document/order for the mask-based reference). Every meta is
built here, once per batch; no process group is touched.

Ring (`ring_blocks`, one block per source rank whose K/V this rank holds at a ring step). Zigzag,
causal, rank r holding chunks r and 2P-1-r of every document (local layout per document
[early, late], increasing global order), K/V from rank s:

    s == r   all local q vs all local k, causal (square per document, so top-left = bottom-right)
    s <  r   all local q vs s's early chunks (chunk s < r: every local query sees all of it;
             s's late chunk 2P-1-s > 2P-1-r is seen by nobody), non-causal
    s >  r   r's late chunks (2P-1-r >= P > s) vs all of s's k (chunks s and 2P-1-s < 2P-1-r),
             non-causal; r's early chunk sees none of s's keys

Contiguous, causal: s == r causal, s < r non-causal (all of s's tokens precede r's), s > r
nothing. Non-causal (ViT-like), any layout: all vs all per document. Document i of the query
side pairs with document i of the key side (zero-length where a rank holds none of it), so
documents never see each other. Blocks in which no document has both queries and keys are
dropped (None).

All-gather (`allgather_blocks`): keys are rows of the rank-major gathered buffer (rank 0's
tokens, then rank 1's, ...). Zigzag causal: two calls, the early chunks vs each document's
prefix up to the end of chunk r, the late chunks vs the prefix up to the end of chunk 2P-1-r,
both bottom-right causal (TE's all-gather CP). Contiguous causal: one call, each local
document piece vs its document's prefix up to the piece's end, bottom-right causal.
Non-causal: one call, all local q vs every key of its document.

Verified (tests/model/test_cp_attention.py): for P = 2 and 4, running every rank's blocks in
one process with the sdpa reference on either meta form (mask or cu_seqlens-derived) and
merging by LSE reproduces the full-sequence out and LSE to 1e-6 (fp32), and the distributed
ring / all-gather built on these plans match the reference (numbers there).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from lvita_model.attention.base import AttnMeta, document_ids, layout_meta
from lvita_model.context_parallel.sharding import CPShard, plan_shard
from lvita_model.errors import ContextParallelError


@dataclass(frozen=True, eq=False)
class Block:
    q_rows: Tensor | None
    """int64 local query rows of the call (None: all local rows, in local order)."""
    k_rows: Tensor | None
    """int64 rows of the K/V buffer the call reads (None: the whole buffer)."""
    meta: AttnMeta

    def num_pairs(self) -> int:
        """Documents with both queries and keys (0: the call would do nothing)."""
        cu_q, cu_k = self.meta.host_cu_seqlens_q, self.meta.host_cu_seqlens_k
        return sum(
            1 for i in range(len(cu_q) - 1) if cu_q[i + 1] > cu_q[i] and cu_k[i + 1] > cu_k[i]
        )


def _cumsum(lengths: Sequence[int]) -> tuple[int, ...]:
    out = [0]
    for length in lengths:
        out.append(out[-1] + length)
    return tuple(out)


def block_meta(
    cu_q: tuple[int, ...],
    cu_k: tuple[int, ...],
    order_q: Tensor,
    order_k: Tensor,
    doc_of: Tensor,
    causal: bool,
    device: torch.device | str,
) -> AttnMeta:
    """The meta of queries at global positions `order_q` (grouped by document as `cu_q` says)
    against keys at `order_k` (`cu_k`); `doc_of` [T] is the document of every global token."""
    if len(cu_q) != len(cu_k) or cu_q[-1] != order_q.numel() or cu_k[-1] != order_k.numel():
        raise ValueError(
            f"inconsistent block: {len(cu_q) - 1} / {len(cu_k) - 1} documents, "
            f"{cu_q[-1]} / {cu_k[-1]} rows vs {order_q.numel()} / {order_k.numel()} positions"
        )
    doc_q, doc_k = doc_of[order_q], doc_of[order_k]
    return layout_meta(cu_q, cu_k, doc_q, doc_k, order_q, order_k, causal=causal, device=device)


def _rows(rows: Tensor | None, device: torch.device | str) -> Tensor | None:
    return None if rows is None else rows.to(device)


def ring_blocks(shard: CPShard, causal: bool, device: torch.device | str) -> list[Block | None]:
    """The block rank `shard.cp_rank` computes with the K/V of each source rank (index = source
    rank), None where it computes nothing (see the module docstring)."""
    size, rank = shard.cp_size, shard.cp_rank
    doc_of = document_ids(shard.cu_seqlens)[0]
    blocks: list[Block | None] = []
    for src in range(size):
        other = shard if src == rank else plan_shard(shard.cu_seqlens, size, src, shard.layout)
        block = _ring_block(shard, other, causal, doc_of, device)
        blocks.append(block if block is not None and block.num_pairs() else None)
    return blocks


def _ring_block(
    mine: CPShard, src: CPShard, causal: bool, doc_of: Tensor, device: torch.device | str
) -> Block | None:
    rank, src_rank = mine.cp_rank, src.cp_rank
    if not causal or src_rank == rank:
        meta = block_meta(
            mine.local_cu_seqlens, src.local_cu_seqlens, mine.index, src.index, doc_of, causal,
            device,
        )  # fmt: skip
        return Block(None, None, meta)
    if mine.layout == "contiguous":
        if src_rank > rank:
            return None
        meta = block_meta(
            mine.local_cu_seqlens, src.local_cu_seqlens, mine.index, src.index, doc_of, False,
            device,
        )  # fmt: skip
        return Block(None, None, meta)
    assert mine.first_chunk is not None and mine.second_chunk is not None
    assert mine.chunk_cu_seqlens is not None
    if src_rank < rank:  # all local q vs the source's early chunks (same local positions)
        keys = src.index[mine.first_chunk]
        meta = block_meta(
            mine.local_cu_seqlens, mine.chunk_cu_seqlens, mine.index, keys, doc_of, False, device
        )
        return Block(None, _rows(mine.first_chunk, device), meta)
    queries = mine.index[mine.second_chunk]  # the late local chunks vs all of the source's k
    meta = block_meta(
        mine.chunk_cu_seqlens, src.local_cu_seqlens, queries, src.index, doc_of, False, device
    )
    return Block(_rows(mine.second_chunk, device), None, meta)


def take_rows(x: Tensor, rows: Tensor | None) -> Tensor:
    """x[rows] along dim 0 (x itself for None)."""
    return x if rows is None else x.index_select(0, rows)


def check_local_inputs(q: Tensor, k: Tensor, v: Tensor, shard: CPShard) -> None:
    if q.dim() != 3 or k.shape != v.shape or k.dim() != 3:
        raise ContextParallelError(
            f"expected q [T, Hq, D], k and v [T, Hkv, D]; got {tuple(q.shape)}, "
            f"{tuple(k.shape)}, {tuple(v.shape)}"
        )
    if q.shape[0] != shard.num_tokens or k.shape[0] != shard.num_tokens:
        raise ContextParallelError(
            f"rank {shard.cp_rank} holds {shard.num_tokens} tokens of the shard but got q with "
            f"{q.shape[0]} and k with {k.shape[0]} rows: pass the sharded tensors (shard.shard)"
        )
    if q.shape[1] % k.shape[1]:
        raise ContextParallelError(
            f"{q.shape[1]} query heads are not a multiple of {k.shape[1]} KV heads"
        )


def gathered_index(shard: CPShard) -> Tensor:
    """int64 [T]: the global index of every row of the rank-major all-gathered buffer."""
    return torch.cat(
        [
            plan_shard(shard.cu_seqlens, shard.cp_size, s, shard.layout).index
            for s in range(shard.cp_size)
        ]
    )


def allgather_blocks(shard: CPShard, causal: bool, device: torch.device | str) -> list[Block]:
    """The calls of all-gather-KV attention; `k_rows` index the rank-major gathered buffer."""
    cu = shard.cu_seqlens
    doc_of = document_ids(cu)[0]
    gathered = gathered_index(shard)
    row_of = torch.empty_like(gathered)
    row_of[gathered] = torch.arange(gathered.numel())  # global index -> gathered row

    def call(q_rows: Tensor | None, cu_q: tuple[int, ...], key_ends: list[int]) -> Block:
        """Queries vs the prefix [cu[i], key_ends[i]) of every document i, in global order."""
        keys = torch.cat(
            [torch.arange(cu[i], end) for i, end in enumerate(key_ends)]
            + [torch.zeros(0, dtype=torch.int64)]
        )
        cu_k = _cumsum([end - cu[i] for i, end in enumerate(key_ends)])
        queries = shard.index if q_rows is None else shard.index[q_rows]
        meta = block_meta(cu_q, cu_k, queries, keys, doc_of, causal, device)
        return Block(_rows(q_rows, device), row_of[keys].to(device), meta)

    num_docs = len(cu) - 1
    local = shard.local_cu_seqlens
    if not causal:
        return [call(None, local, list(cu[1:]))]
    if shard.layout == "contiguous":
        low = int(shard.index[0]) if shard.num_tokens else 0
        ends = []
        for i in range(num_docs):
            present = local[i + 1] > local[i]
            ends.append(max(cu[i], low) + local[i + 1] - local[i] if present else cu[i])
        return [call(None, local, ends)]
    assert shard.first_chunk is not None and shard.second_chunk is not None
    assert shard.chunk_cu_seqlens is not None
    size, rank = shard.cp_size, shard.cp_rank
    chunk = [(cu[i + 1] - cu[i]) // (2 * size) for i in range(num_docs)]
    early_ends = [cu[i] + (rank + 1) * chunk[i] for i in range(num_docs)]
    late_ends = [cu[i] + (2 * size - rank) * chunk[i] for i in range(num_docs)]
    return [
        call(shard.first_chunk, shard.chunk_cu_seqlens, early_ends),
        call(shard.second_chunk, shard.chunk_cu_seqlens, late_ends),
    ]
