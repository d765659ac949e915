"""Reference attention on any device: explicit (document, order) mask, fp32 math, own backward.

The mask comes from per-token document ids and sequence order (`AttnMeta.doc_*`, `order_*`), so
the same code is exact for a whole packed sequence, any slice of it, a zigzag CP shard or a
chunk of a prefill. Scores are computed in fp32 in blocks of `block_rows` query rows
(memory O(block_rows * S * Hq) instead of O(T * S * Hq)), and only over the keys of the
block's documents when key document ids are sorted; a query row that sees no key gets
``lse = -inf`` and ``out = 0`` (torch's SDPA would return lse = 0 there).

Backward recomputes the probabilities from the given `lse` (P = exp(S * scale - lse)), so a
ring can pass the merged output and LSE of several key blocks and get this block's share:
dV = P^T dO, dP = dO V^T, dS = P (dP - rowsum(dO * O)), dQ = dS K scale, dK = dS^T Q scale.
GQA: query head h uses key head h // (Hq / Hkv); dK and dV sum over each group. dK and dV are
returned in fp32 (a ring accumulates them); dQ in fp32 too, cast by the caller.
"""

from __future__ import annotations

import torch
from torch import Tensor

from lvita_model.attention.base import (
    AttentionBackend,
    AttnMeta,
    Capabilities,
    device_type,
    expand_kv,
    reduce_kv_grad,
)


def _block_keys(meta: AttnMeta, rows: slice, keys_sorted: bool) -> tuple[slice, Tensor]:
    """(key span, bool mask [t, span]): the keys the query rows may see.

    When the key document ids do not decrease (a packed sequence, a slice of one, a zigzag
    shard), only the span of keys of the block's documents is scored: the cost of a block is
    its documents' length, not S (a ViT call of 256 tiles scores 1 tile, not 256).
    `keys_sorted` is `_sorted(meta.doc_k)`, computed once per call rather than per block."""
    docs = meta.doc_q[rows]
    keys = slice(0, meta.doc_k.shape[0])
    if keys_sorted and docs.numel():
        bounds = torch.stack([docs.min(), docs.max()])
        first = int(torch.searchsorted(meta.doc_k, bounds[:1], side="left"))
        last = int(torch.searchsorted(meta.doc_k, bounds[1:], side="right"))
        keys = slice(first, last)
    mask = docs[:, None] == meta.doc_k[None, keys]
    if meta.causal:
        mask &= meta.order_k[None, keys] <= meta.order_q[rows, None]
    return keys, mask


def _sorted(ids: Tensor) -> bool:
    return ids.numel() < 2 or bool((ids[1:] >= ids[:-1]).all())


def _group_kv(x: Tensor, num_q_heads: int) -> Tensor:
    """[S, Hkv, D] -> [Hq, S, D] fp32 (contiguous), each KV head repeated for its group."""
    return expand_kv(x.float().transpose(0, 1), num_q_heads, dim=0).contiguous()


class SdpaBackend(AttentionBackend):
    name = "sdpa"
    capabilities = Capabilities(
        causal=True,
        varlen=True,
        lse=True,
        block_backward=True,
        devices=("cpu", "cuda", "npu"),
        dtypes=(torch.float32, torch.bfloat16, torch.float16),
    )

    def __init__(self, block_rows: int = 1024) -> None:
        self.block_rows = block_rows

    @classmethod
    def is_available(cls, device: torch.device | str | None = None) -> tuple[bool, str]:
        kind = device_type(device)  # pure torch: no optional package to import
        if kind in cls.capabilities.devices:
            return True, f"{cls.name} runs on {kind}"
        return False, f"{cls.name} runs on {cls.capabilities.devices}, not {kind!r}"

    def forward(
        self, q: Tensor, k: Tensor, v: Tensor, meta: AttnMeta, scale: float
    ) -> tuple[Tensor, Tensor]:
        num_rows, num_heads, _ = q.shape
        keys, values = _group_kv(k, num_heads), _group_kv(v, num_heads)  # [Hq, S, D]
        out = torch.empty_like(q)
        lse = torch.empty(num_heads, num_rows, dtype=torch.float32, device=q.device)
        keys_sorted = _sorted(meta.doc_k)
        for start in range(0, num_rows, self.block_rows):
            rows = slice(start, min(start + self.block_rows, num_rows))
            span, mask = _block_keys(meta, rows, keys_sorted)
            scores = torch.matmul(q[rows].float().transpose(0, 1), keys[:, span].transpose(1, 2))
            scores = scores * scale
            scores.masked_fill_(~mask[None], float("-inf"))  # [Hq, t, span]
            block_lse = torch.logsumexp(scores, dim=-1)  # [Hq, t]; -inf for empty rows
            probs = torch.exp(scores - block_lse.nan_to_num(neginf=0.0)[..., None])
            out[rows] = torch.matmul(probs, values[:, span]).transpose(0, 1).to(q.dtype)
            lse[:, rows] = block_lse
        return out, lse

    def backward(
        self,
        dout: Tensor,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        out: Tensor,
        lse: Tensor,
        meta: AttnMeta,
        scale: float,
    ) -> tuple[Tensor, Tensor, Tensor]:
        num_rows, num_heads, _ = q.shape
        keys, values = _group_kv(k, num_heads), _group_kv(v, num_heads)  # [Hq, S, D]
        dq = torch.empty(q.shape, dtype=torch.float32, device=q.device)
        dkeys = torch.zeros_like(keys)
        dvalues = torch.zeros_like(values)
        keys_sorted = _sorted(meta.doc_k)
        for start in range(0, num_rows, self.block_rows):
            rows = slice(start, min(start + self.block_rows, num_rows))
            q_block = q[rows].float().transpose(0, 1)  # [Hq, t, D]
            do_block = dout[rows].float().transpose(0, 1)
            span, mask = _block_keys(meta, rows, keys_sorted)
            scores = torch.matmul(q_block, keys[:, span].transpose(1, 2)) * scale
            scores.masked_fill_(~mask[None], float("-inf"))  # [Hq, t, span]
            probs = torch.exp(scores - lse[:, rows].nan_to_num(neginf=0.0)[..., None])
            dvalues[:, span] += torch.matmul(probs.transpose(1, 2), do_block)
            dprobs = torch.matmul(do_block, values[:, span].transpose(1, 2))  # [Hq, t, span]
            row_dot = (do_block * out[rows].float().transpose(0, 1)).sum(-1, keepdim=True)
            dscores = probs * (dprobs - row_dot) * scale
            dq[rows] = torch.matmul(dscores, keys[:, span]).transpose(0, 1)
            dkeys[:, span] += torch.matmul(dscores.transpose(1, 2), q_block)
        num_kv_heads = k.shape[1]
        # [Hq, S, D] -> [Hkv, S, D] (summed over each group) -> [S, Hkv, D]
        dk = reduce_kv_grad(dkeys, num_kv_heads, dim=0).transpose(0, 1)
        dv = reduce_kv_grad(dvalues, num_kv_heads, dim=0).transpose(0, 1)
        return dq, dk.contiguous(), dv.contiguous()
