"""Context-parallel generation: zigzag-sharded prefill into per-rank caches, the last prompt
token's logits and each chosen token shared by every rank (`lvita_model.inference` explains the
design; the per-layer decode merge is `lvita_model.inference.cache.gather_merge`).

Shapes: T prompt tokens, P context-parallel ranks, V vocabulary.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.distributed as dist
from torch import Tensor

from lvita_model.attention import AttentionBackend
from lvita_model.context_parallel.batch import shard_batch
from lvita_model.context_parallel.ring import ZigzagRingAttention
from lvita_model.context_parallel.sharding import CPShard
from lvita_model.head import last_position_logits
from lvita_model.inference.cache import CacheAttention
from lvita_model.inference.steps import embed_span, encode_prompt_tiles, forward_step
from lvita_model.model import LongVitaForCausalLM
from lvita_model.qwen2 import Attention


def cp_prefill_attention(
    shard: CPShard, backend: AttentionBackend, group: dist.ProcessGroup
) -> Attention:
    """The default context-parallel prefill attention: the zigzag ring (K/V travel P-1 hops;
    `lvita_model.context_parallel.allgather.AllGatherKVAttention` has the same signature)."""
    return ZigzagRingAttention(shard, backend, group, causal=True)


def cp_prefill(
    model: LongVitaForCausalLM,
    attention: CacheAttention,
    input_ids: Tensor,
    *,
    pixel_values: Tensor | None = None,
    image_token_positions: Tensor | None = None,
    prefill_attention: Callable[..., Attention] | None = None,
) -> Tensor:
    """Context-parallel prefill of the whole prompt [T] (every rank passes all of it): this
    rank's zigzag shard of K/V goes into its cache; fp32 logits [V] of the next token, on every
    rank. `prefill_attention(shard, backend, group)` builds the CP attention (default: ring)."""
    group = attention.group
    if group is None:
        raise ValueError("cp_prefill needs a CacheAttention with a process group")
    if attention.cache.length:
        raise ValueError("prefill expects an empty cache")
    rank, size = cp_rank_size(group)
    device = attention.cache.device
    num_tokens = int(input_ids.shape[0])
    input_ids = input_ids.to(device)
    local = shard_batch(
        input_ids,
        torch.arange(num_tokens, device=device),
        torch.full_like(input_ids, -100),
        [0, num_tokens],
        cp_size=size,
        cp_rank=rank,
        pixel_values=pixel_values,
        image_token_positions=image_token_positions,
        pad_id=0,  # any valid id: the pads are never attended to nor stored
    )
    index = local.shard.index.to(device)  # [T_pad / P] global index of each local token
    keep = index < num_tokens  # the pads come after the prompt: never seen, never stored
    attention.cache.reserve(int(keep.sum()))
    features, feature_positions = encode_prompt_tiles(
        model, local.pixel_values, local.image_token_positions
    )
    embeds = embed_span(model, local.input_ids, 0, features, feature_positions)
    build = prefill_attention or cp_prefill_attention
    inner = build(local.shard, attention.backend, group)
    with attention.step(index, keep=keep, attention=inner):
        hidden = forward_step(model, attention, embeds, local.position_ids)
    return _last_token_logits(model, hidden, index == num_tokens - 1, group)


def _last_token_logits(
    model: LongVitaForCausalLM, hidden: Tensor, is_last: Tensor, group: dist.ProcessGroup
) -> Tensor:
    """fp32 logits [V] at the one local row flagged in `is_last` (on one rank), on all ranks."""
    rows = torch.nonzero(is_last).flatten()
    logits = torch.zeros(model.head_weight.shape[0], dtype=torch.float32, device=hidden.device)
    if rows.numel():
        logits = last_position_logits(hidden, model.head_weight, positions=rows)[0]
    holder = torch.tensor([dist.get_rank(group) if rows.numel() else 0], device=hidden.device)
    dist.all_reduce(holder, group=group)  # exactly one rank holds the last token
    dist.broadcast(logits, src=dist.get_global_rank(group, int(holder)), group=group)
    return logits


def cp_rank_size(group: dist.ProcessGroup | None) -> tuple[int, int]:
    """(this rank, ranks) of the CP group; (0, 1) without one."""
    if group is None:
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)


def broadcast_token(token: int, group: dist.ProcessGroup | None, device: torch.device) -> int:
    """Rank 0's choice on every rank (logits agree, but sampling must never diverge)."""
    if group is None:
        return token
    value = torch.tensor([token], dtype=torch.int64, device=device)
    dist.broadcast(value, src=dist.get_global_rank(group, 0), group=group)
    return int(value)
