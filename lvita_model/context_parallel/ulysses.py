"""Ulysses (DeepSpeed) context-parallel attention: all-to-all from token shards to head shards.

Each of the P ranks holds T/P tokens (`CPShard`, any layout) with all heads. One
``all_to_all_single`` per tensor turns q [T/P, Hq, D] into [T, Hq/P, D] (every token, this
rank's group of Hq/P heads; rank-major token order), the rows are put in global order, the
backend attends over the whole padded sequence with its documents (plain `attend`: full
documents, so any varlen kernel works unchanged), and the inverse all-to-all returns
out [T/P, Hq, D] with all heads. Backward: the all-to-alls' adjoints are the inverse
all-to-alls (autograd Functions), the attention's is the backend's.

Heads: Hq % P == 0 is required. KV heads: Hkv % P == 0, or, with `replicate_kv` (default) and
P % Hkv == 0, each KV head is repeated P / Hkv times before the exchange (query head h still uses
its original KV head; the repeat's backward sums the copies' gradients). Anything else raises
`ContextParallelError` on the first call, on every rank alike (the check uses only shapes all
ranks share, so no rank enters an all-to-all the others skip: DeepSpeed PR #8316's hang). The
per-rank traffic falls as 1/P but P is capped by the heads (Qwen2.5-14B: 8 KV heads).

Verified (tests/model/test_cp_attention.py, gloo on CPU, P = 2 and 4, MHA 4/4, GQA 4/2
(KV replicated at P = 4), zigzag and contiguous, causal and non-causal): out, dq, dk, dv equal
the reference exactly in fp32 (the same kernel over the same documents) and within 6.4e-3 of
its largest magnitude in bf16 (replicated KV heads' gradients summed in another order); 5 heads
on P = 2 / 4 and 1 KV head with replicate_kv=False raise the error.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

from lvita_model.attention import attend, packed_meta
from lvita_model.attention.base import AttentionBackend, AttnMeta
from lvita_model.context_parallel.base import ContextParallelAttention
from lvita_model.context_parallel.blocks import check_local_inputs, gathered_index
from lvita_model.context_parallel.sharding import CPShard
from lvita_model.errors import ContextParallelError


def _tokens_to_heads(x: Tensor, group: dist.ProcessGroup | None, size: int) -> Tensor:
    """[T/P, H, D] (my tokens, all heads) -> [T, H/P, D] (all tokens rank-major, my heads)."""
    rows, heads, dim = x.shape
    send = (
        x.reshape(rows, size, heads // size, dim).transpose(0, 1).contiguous()
    )  # [P, T/P, H/P, D]
    recv = torch.empty_like(send)  # chunk s: rank s's tokens, this rank's head group
    dist.all_to_all_single(recv, send, group=group)
    return recv.reshape(size * rows, heads // size, dim)


def _heads_to_tokens(x: Tensor, group: dist.ProcessGroup | None, size: int) -> Tensor:
    """[T, H/P, D] (all tokens rank-major, my heads) -> [T/P, H, D] (my tokens, all heads)."""
    total, heads, dim = x.shape
    send = x.reshape(size, total // size, heads, dim).contiguous()  # chunk s goes to rank s
    recv = torch.empty_like(send)  # chunk s: this rank's tokens, head group s
    dist.all_to_all_single(recv, send, group=group)
    return recv.transpose(0, 1).reshape(total // size, size * heads, dim)


class _TokensToHeads(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group, size):  # type: ignore[override]
        ctx.group, ctx.size = group, size
        return _tokens_to_heads(x, group, size)

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        return _heads_to_tokens(grad.contiguous(), ctx.group, ctx.size), None, None


class _HeadsToTokens(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group, size):  # type: ignore[override]
        ctx.group, ctx.size = group, size
        return _heads_to_tokens(x, group, size)

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        return _tokens_to_heads(grad.contiguous(), ctx.group, ctx.size), None, None


class UlyssesAttention(ContextParallelAttention):
    """All-to-all attention for one batch: ``attention(q, k, v) -> out`` on this rank's tokens.

    `shard`: this rank's `CPShard` (zigzag or contiguous); `group`: the CP group (None: the
    default group); `replicate_kv`: repeat KV heads when Hkv < P (see the module docstring).
    The backend needs varlen (and causal, if asked) only: plain `attend` over whole documents.
    """

    def __init__(
        self,
        shard: CPShard,
        backend: AttentionBackend,
        group: dist.ProcessGroup | None = None,
        causal: bool = True,
        scale: float | None = None,
        replicate_kv: bool = True,
    ) -> None:
        super().__init__(shard, backend, group, causal, scale)
        self.replicate_kv = replicate_kv
        self._layout: dict[torch.device, tuple[AttnMeta, Tensor, Tensor]] = {}

    def layout(self, device: torch.device) -> tuple[AttnMeta, Tensor, Tensor]:
        """(meta of the whole padded sequence, gathered row of each global token, global index
        of each gathered row), built once per device."""
        if device not in self._layout:
            gathered = gathered_index(self.shard)
            row_of = torch.empty_like(gathered)
            row_of[gathered] = torch.arange(gathered.numel())
            meta = packed_meta(self.shard.cu_seqlens, causal=self.causal, device=device)
            self._layout[device] = (meta, row_of.to(device), gathered.to(device))
        return self._layout[device]

    def kv_repeats(self, num_heads: int, num_kv_heads: int) -> int:
        """How often each KV head is repeated before the exchange (1: not at all)."""
        size = self.cp_size
        if num_heads % size:
            raise ContextParallelError(
                f"Ulysses over CP={size} needs the query heads to divide by {size}, got "
                f"{num_heads}: use the ring or all-gather CP, or a CP size dividing {num_heads}"
            )
        if num_kv_heads % size == 0:
            return 1
        if self.replicate_kv and size % num_kv_heads == 0:
            return size // num_kv_heads
        raise ContextParallelError(
            f"Ulysses over CP={size} needs the KV heads ({num_kv_heads}) to divide by {size}"
            + (
                f", or {size} to divide by them for replication"
                if self.replicate_kv
                else " (replicate_kv=False)"
            )
        )

    def __call__(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        check_local_inputs(q, k, v, self.shard)
        repeats = self.kv_repeats(q.shape[1], k.shape[1])
        if repeats > 1:  # [T/P, Hkv, D] -> [T/P, Hkv * repeats, D]
            k, v = k.repeat_interleave(repeats, dim=1), v.repeat_interleave(repeats, dim=1)
        meta, row_of, gathered = self.layout(q.device)
        size = self.cp_size

        def to_heads(x: Tensor) -> Tensor:  # [T/P, H, D] -> [T, H/P, D] in global order
            return _TokensToHeads.apply(x, self.group, size).index_select(0, row_of)

        out = attend(to_heads(q), to_heads(k), to_heads(v), meta, self.backend, self.scale)
        out = out.index_select(0, gathered)  # global -> rank-major order
        return _HeadsToTokens.apply(out, self.group, size)  # [T/P, Hq, D]
