"""The KV cache and the attention callable over it (`lvita_model.inference` explains the design).

`KVCache` holds per layer K and V [capacity, Hkv, D] and the sequence index (``order``) of each
token; `CacheAttention` is the ``attention(q, k, v)`` a decoder forward receives, one forward per
``with attention.step(order_q):``. With a process group, each call's result is the LSE merge of
every rank's partial attention over its own cache (`gather_merge`: context-parallel decoding).

Shapes: c new tokens of one step, S cached tokens, Hq / Hkv query / key-value heads, D head dim,
P context-parallel ranks.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import Tensor

from lvita_model.attention import AttentionBackend, AttnMeta, cache_meta
from lvita_model.config import LLMConfig
from lvita_model.context_parallel.merge import merge_partials
from lvita_model.model import LongVitaForCausalLM
from lvita_model.qwen2 import Attention


class KVCache:
    """Per layer K and V [capacity, Hkv, D] and the sequence index (``order``) of each token."""

    def __init__(
        self,
        num_layers: int,
        num_kv_heads: int,
        head_dim: int,
        *,
        capacity: int = 0,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ) -> None:
        self.num_layers, self.num_kv_heads, self.head_dim = num_layers, num_kv_heads, head_dim
        self.dtype, self.device = dtype, torch.device(device)
        self.length = 0
        self.keys: list[Tensor] = []
        self.values: list[Tensor] = []
        self.order = torch.empty(0, dtype=torch.int64, device=self.device)
        self._allocate(capacity)

    @classmethod
    def for_model(
        cls, model: LongVitaForCausalLM, capacity: int, device: torch.device | None = None
    ) -> KVCache:
        """An empty cache shaped for `model`'s decoder, in its dtype and on its device."""
        llm: LLMConfig = model.config.llm
        weight = model.model.embed_tokens.weight
        return cls(
            llm.num_layers,
            llm.num_kv_heads,
            llm.head_dim,
            capacity=capacity,
            dtype=weight.dtype,
            device=device or weight.device,
        )

    @property
    def capacity(self) -> int:
        return int(self.order.shape[0])

    def nbytes(self) -> int:
        """Bytes of the valid K and V rows of all layers."""
        per_row = 2 * self.num_layers * self.num_kv_heads * self.head_dim
        return per_row * self.length * torch.empty((), dtype=self.dtype).element_size()

    def _allocate(self, capacity: int) -> None:
        """New buffers of `capacity` rows holding the valid rows of the old ones."""
        shape = (capacity, self.num_kv_heads, self.head_dim)
        keys = [
            torch.empty(shape, dtype=self.dtype, device=self.device) for _ in range(self.num_layers)
        ]
        values = [torch.empty_like(k) for k in keys]
        order = torch.empty(capacity, dtype=torch.int64, device=self.device)
        valid = slice(0, self.length)
        for layer, (old_k, old_v) in enumerate(zip(self.keys, self.values, strict=False)):
            keys[layer][valid], values[layer][valid] = old_k[valid], old_v[valid]
        order[valid] = self.order[valid]
        self.keys, self.values, self.order = keys, values, order

    def reserve(self, total: int) -> None:
        """Make room for `total` tokens (at least doubling, so appends are amortized O(1))."""
        if total > self.capacity:
            self._allocate(max(total, 2 * self.capacity))

    def write(self, layer: int, k: Tensor, v: Tensor) -> None:
        """Layer `layer`'s k, v [c, Hkv, D] into rows [length, length + c) (not yet committed)."""
        rows = slice(self.length, self.length + k.shape[0])
        self.keys[layer][rows] = k
        self.values[layer][rows] = v

    def view(self, layer: int, count: int) -> tuple[Tensor, Tensor]:
        """K, V [count, Hkv, D] of layer `layer` (rows [0, count), no copy)."""
        return self.keys[layer][:count], self.values[layer][:count]

    def commit(self, order: Tensor) -> None:
        """The rows written by the last step become valid; `order` [c] is their sequence index."""
        count = int(order.shape[0])
        self.order[self.length : self.length + count] = order
        self.length += count


def partial_attention(
    q: Tensor, k: Tensor, v: Tensor, meta: AttnMeta, backend: AttentionBackend, scale: float
) -> tuple[Tensor, Tensor]:
    """(out [c, Hq, D], lse fp32 [Hq, c]) over the given keys; no key: out 0, lse -inf."""
    if k.shape[0] == 0:
        lse = torch.full((q.shape[1], q.shape[0]), float("-inf"), device=q.device)
        return torch.zeros_like(q), lse
    return backend.forward(q, k, v, meta, scale)


@dataclass
class _Step:
    order_q: Tensor
    store: bool
    keep: Tensor | None
    override: Attention | None
    meta: AttnMeta | None = None
    layer: int = 0


@dataclass
class CacheAttention:
    """``attention(q, k, v)`` over a `KVCache`, one forward per `step` (`lvita_model.inference`).

    With a process `group`, each call's result is the LSE merge of every rank's partial attention
    over its own cache (context-parallel decoding)."""

    cache: KVCache
    backend: AttentionBackend
    group: dist.ProcessGroup | None = None
    scale: float | None = None
    _step: _Step | None = field(default=None, init=False, repr=False)

    @contextmanager
    def step(
        self,
        order_q: Tensor,
        *,
        store: bool = True,
        keep: Tensor | None = None,
        attention: Attention | None = None,
    ) -> Iterator[CacheAttention]:
        """One forward of c = len(order_q) new tokens with sequence indices `order_q` [c].

        store: write the new k/v into the cache and attend over cache + them (causal); else
            attend over the cached keys only, all of them (a CP rank that does not keep this
            token's k/v: every cached key precedes the new tokens).
        keep: bool [c], which new tokens to store (default all; CP prefill drops its pads).
        attention: attend with this callable instead of over the cache (CP prefill: a ring or
            all-gather over the shards); the k/v are still stored.
        """
        if self._step is not None:
            raise RuntimeError("CacheAttention.step() does not nest")
        order_q = order_q.to(self.cache.device, torch.int64)
        self._step = _Step(order_q, store, keep, attention)
        try:
            yield self
            if self._step.layer != self.cache.num_layers:
                raise RuntimeError(
                    f"the forward called attention {self._step.layer} times, the cache has "
                    f"{self.cache.num_layers} layers"
                )
            if store:
                self.cache.commit(order_q if keep is None else order_q[keep.to(order_q.device)])
        finally:
            self._step = None

    def __call__(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        step = self._step
        if step is None:
            raise RuntimeError("call CacheAttention inside `with attention.step(order):`")
        if step.layer >= self.cache.num_layers:
            raise RuntimeError(f"more attention calls than the {self.cache.num_layers} layers")
        if q.shape[0] != step.order_q.shape[0]:
            raise ValueError(f"step() announced {step.order_q.shape[0]} tokens, got {q.shape[0]}")
        layer, step.layer = step.layer, step.layer + 1
        num_new = 0
        if step.store:
            new_k, new_v = (k, v) if step.keep is None else (k[step.keep], v[step.keep])
            self.cache.write(layer, new_k, new_v)
            num_new = new_k.shape[0]
        if step.override is not None:
            return step.override(q, k, v)
        keys, values = self.cache.view(layer, self.cache.length + num_new)
        if step.meta is None:  # once per step: every layer has the same layout
            order_k = self.cache.order[: self.cache.length]
            if num_new:
                order_k = torch.cat([order_k, step.order_q])
            step.meta = cache_meta(step.order_q, order_k, causal=step.store)
        scale = q.shape[-1] ** -0.5 if self.scale is None else self.scale
        out, lse = partial_attention(q, keys, values, step.meta, self.backend, scale)
        if self.group is None:
            return out
        return gather_merge(out, lse, self.group)


_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
"""torch >= 2.13 renames all_gather_into_tensor (the old name warns)."""


def gather_merge(out: Tensor, lse: Tensor, group: dist.ProcessGroup) -> Tensor:
    """All ranks' partials (out [c, Hq, D], lse [Hq, c]) merged by LSE; the same on every rank.

    One all-gather per layer: out and lse travel together as fp32 [c, Hq, D + 1]."""
    size = dist.get_world_size(group)
    num_rows, num_heads, head_dim = out.shape
    payload = torch.cat([out.float(), lse.t().unsqueeze(-1)], dim=-1)  # [c, Hq, D + 1]
    gathered = payload.new_empty((size * num_rows, num_heads, head_dim + 1))
    _all_gather_single(gathered, payload, group=group)
    gathered = gathered.view(size, num_rows, num_heads, head_dim + 1)
    outs = gathered[..., :head_dim]  # [P, c, Hq, D]
    lses = gathered[..., head_dim].transpose(1, 2)  # [P, c, Hq] -> [P, Hq, c]
    merged, _ = merge_partials(list(outs), list(lses))
    return merged.to(out.dtype)
