"""The contract of the context-parallel attentions: ``attention(q, k, v) -> out`` on this rank's
tokens of one batch, the same call a model makes for single-process attention.

Shapes: T/P local tokens of this rank (its `CPShard`), Hq / Hkv query / key-value heads, D head
dim, P ranks of the CP group.

`ContextParallelAttention` holds what every strategy shares: the shard (checked against the
process group: its size and this rank's position must be the shard's), the backend (checked for
the capabilities the strategy needs), causality and the softmax scale. Three strategies:

- `ring.ZigzagRingAttention`: K/V travel P-1 hops; partials merge by LSE (KV memory 1/P).
- `allgather.AllGatherKVAttention`: K/V all-gathered per head group (Llama-3 CP).
- `ulysses.UlyssesAttention`: all-to-all from token shards to head shards (heads must divide).

The first two are `BlockwiseAttention`: the local queries attend blocks of keys planned once
per device (`blocks`), through the backend's block forward / backward with an external out and
LSE, inside an autograd Function; they also return the LSE (`forward_with_lse`). Ulysses calls
plain `attend` over whole documents, so any varlen backend works.

`lvita_model.context_parallel.batch.CP_ATTENTION` maps the method names of the training config
(``parallel.cp_method``: "ring", "allgather", "ulysses") to these classes.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import ClassVar

import torch
import torch.distributed as dist
from torch import Tensor

from lvita_model.attention.base import AttentionBackend
from lvita_model.attention.registry import assert_supports
from lvita_model.context_parallel.blocks import Block, check_local_inputs
from lvita_model.context_parallel.sharding import CPShard
from lvita_model.errors import ContextParallelError


def check_shard_matches_group(shard: CPShard, group: dist.ProcessGroup | None) -> None:
    """Raise `ContextParallelError` unless the shard was planned for this rank of `group`."""
    if not dist.is_initialized():
        raise ContextParallelError("torch.distributed is not initialized: init_process_group first")
    size, rank = dist.get_world_size(group), dist.get_rank(group)
    if (shard.cp_size, shard.cp_rank) != (size, rank):
        raise ContextParallelError(
            f"the shard is for CP rank {shard.cp_rank} of {shard.cp_size}, but this process is "
            f"rank {rank} of a CP group of {size}: plan_shard(cu_seqlens, {size}, {rank})"
        )


class ContextParallelAttention(ABC):
    """``attention(q, k, v) -> out`` on this rank's tokens of one batch.

    `shard` is this rank's `CPShard` (zigzag or contiguous), `group` the CP process group (None:
    the default group); its size and this rank's position must equal the shard's. `causal`:
    per-document causal (decoder) or bidirectional (ViT-like). `scale` defaults to D ** -0.5.
    """

    needs: ClassVar[dict[str, bool]] = {}
    """Backend capabilities the strategy needs beyond causal (if asked) and varlen."""

    def __init__(
        self,
        shard: CPShard,
        backend: AttentionBackend,
        group: dist.ProcessGroup | None = None,
        causal: bool = True,
        scale: float | None = None,
    ) -> None:
        check_shard_matches_group(shard, group)
        assert_supports(backend, causal=causal, varlen=True, **self.needs)
        self.shard = shard
        self.backend = backend
        self.group = group
        self.causal = causal
        self.scale = scale
        self.cp_size, self.cp_rank = shard.cp_size, shard.cp_rank

    @abstractmethod
    def __call__(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        """out [T/P, Hq, D] in q's dtype from q [T/P, Hq, D], k and v [T/P, Hkv, D]."""


class BlockwiseAttention(ContextParallelAttention):
    """The ring and all-gather strategies: blocks of (local queries, keys) run through the
    backend's block forward and backward inside `function` (an autograd Function taking
    ``(q, k, v, self, scale)``). The blocks (`plan_blocks`) and their metas are built once per
    device, on the first call."""

    needs: ClassVar[dict[str, bool]] = {"lse": True, "block_backward": True}
    function: ClassVar[type[torch.autograd.Function]]

    def __init__(
        self,
        shard: CPShard,
        backend: AttentionBackend,
        group: dist.ProcessGroup | None = None,
        causal: bool = True,
        scale: float | None = None,
    ) -> None:
        super().__init__(shard, backend, group, causal, scale)
        self._blocks: dict[torch.device, list[Block | None]] = {}

    @abstractmethod
    def plan_blocks(self, device: torch.device) -> list[Block | None]:
        """The blocks this rank computes (None: nothing to compute with that source)."""

    def blocks(self, device: torch.device) -> list[Block | None]:
        if device not in self._blocks:
            self._blocks[device] = self.plan_blocks(device)
        return self._blocks[device]

    def forward_with_lse(self, q: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """(out [T, Hq, D] in q's dtype, lse [Hq, T] fp32, not differentiable)."""
        check_local_inputs(q, k, v, self.shard)
        scale = q.shape[-1] ** -0.5 if self.scale is None else self.scale
        return self.function.apply(q, k, v, self, scale)

    def __call__(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        return self.forward_with_lse(q, k, v)[0]
