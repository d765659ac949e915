"""Merge partial attention results over disjoint key sets by their log-sum-exp, in fp32.

Attention of a query row over keys K = K_a + K_b (disjoint) from the two partial results
(out_a, lse_a) over K_a and (out_b, lse_b) over K_b:

    lse = log(exp(lse_a) + exp(lse_b))          (torch.logaddexp: max + log1p(exp(-|a - b|)))
    out = exp(lse_a - lse) out_a + exp(lse_b - lse) out_b

Both weights lie in [0, 1] (they are sigmoid(lse_a - lse_b) and its complement), so nothing
overflows. A row that sees no key in a block has ``lse = -inf`` and ``out = 0`` (the backend
contract): its weight is exp(-inf) = 0. A row that sees no key in *either* block keeps
``lse = -inf`` and ``out = 0``: the LSE used for the weights is replaced by 0 there, so no
``-inf - (-inf) = nan`` appears. Everything is computed in fp32 whatever the partials' dtype
(ring-flash-attn #42: bf16 partials lose accuracy as the ring grows).

Used by the zigzag ring (one key block per ring step, merged into the rows the block covers)
and by context-parallel decoding (each rank's partial over its KV shard).

Verified (tests/model/test_cp_attention.py): merging two or three key blocks of the sdpa
reference equals attention over all keys to 1e-6 (fp64 inputs), rows empty in one block or in
all blocks (out 0, lse -inf, no NaN), and the ring/all-gather results built on it.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor


def _weights(lse_part: Tensor, lse: Tensor) -> Tensor:
    """[Hq, T] LSEs -> [T, Hq, 1] fp32 weights exp(lse_part - lse); 0 where lse is -inf."""
    safe = lse.masked_fill(torch.isneginf(lse), 0.0)
    return torch.exp(lse_part.float() - safe).transpose(0, 1).unsqueeze(-1)


def merge_two(out_a: Tensor, lse_a: Tensor, out_b: Tensor, lse_b: Tensor) -> tuple[Tensor, Tensor]:
    """(out [T, Hq, D] fp32, lse [Hq, T] fp32) of the union of two disjoint key sets."""
    lse = torch.logaddexp(lse_a.float(), lse_b.float())  # -inf where both are -inf
    out = _weights(lse_a, lse) * out_a.float() + _weights(lse_b, lse) * out_b.float()
    return out, lse


def merge_partials(outs: Sequence[Tensor], lses: Sequence[Tensor]) -> tuple[Tensor, Tensor]:
    """(out fp32, lse fp32) of N partial results over disjoint key sets (e.g. one per CP rank
    when decoding against a sharded KV cache): outs [T, Hq, D] each, lses [Hq, T] each."""
    if not outs or len(outs) != len(lses):
        raise ValueError(f"need as many outs as lses (>= 1), got {len(outs)} and {len(lses)}")
    stacked = torch.stack([lse.float() for lse in lses])  # [N, Hq, T]
    lse = torch.logsumexp(stacked, dim=0)  # -inf where every partial is -inf
    out = torch.zeros(outs[0].shape, dtype=torch.float32, device=outs[0].device)
    for part_out, part_lse in zip(outs, stacked, strict=True):
        out += _weights(part_lse, lse) * part_out.float()
    return out, lse


def merge_into_(
    out: Tensor, lse: Tensor, block_out: Tensor, block_lse: Tensor, rows: Tensor | None = None
) -> None:
    """Merge a block's partial result into the running fp32 (out [T, Hq, D], lse [Hq, T]) in
    place; `rows` (int64 local row indices) when the block covers only some query rows."""
    if rows is None:
        merged_out, merged_lse = merge_two(out, lse, block_out, block_lse)
        out.copy_(merged_out)
        lse.copy_(merged_lse)
        return
    merged_out, merged_lse = merge_two(out[rows], lse[:, rows], block_out, block_lse)
    out[rows] = merged_out
    lse[:, rows] = merged_lse


def empty_accumulator(
    num_rows: int, num_heads: int, head_dim: int, device: torch.device
) -> tuple[Tensor, Tensor]:
    """(out zeros [T, Hq, D] fp32, lse -inf [Hq, T] fp32): the merge of no block at all."""
    out = torch.zeros(num_rows, num_heads, head_dim, dtype=torch.float32, device=device)
    lse = torch.full((num_heads, num_rows), float("-inf"), dtype=torch.float32, device=device)
    return out, lse
