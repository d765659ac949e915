"""The context-parallel batch step: a packed sequence -> this rank's inputs; the loss reduction.

`shard_batch` takes one packed sequence as the loader gives it (ids, positions, unshifted labels,
cu_seqlens, tiles and their placeholder positions) and returns what CP rank r of P computes on:

1. next-token targets from the labels on the **whole** sequence (the next token of a chunk's last
   token lives on another rank; documents never predict across their boundary);
2. documents padded for the layout (`sharding.pad_documents`: pad id, target -100, positions
   continuing the document);
3. the rank's tokens (`sharding.plan_shard`, zigzag by default);
4. the tiles whose placeholders fall (at least partly) on this rank, with their placeholder
   positions mapped to local positions and -1 where a placeholder lives on another rank: the
   model scatters only the local ones. A tile cut by a chunk boundary is encoded by both ranks
   (at most 2 tiles per document boundary); every other tile by exactly one rank, so the vision
   tower's work is split like the tokens' (Long-VITA's per-rank vision encoding).

`global_loss` turns the rank's (sum, count) into the loss to back-propagate: local sum divided by
the supervised-token count summed over the CP and DP groups. With gradients then **summed** over
those ranks (all-reduce SUM, not average) every parameter gets the gradient of the global mean
loss, whatever the number of supervised tokens per rank; a rank with none still runs backward.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor

from lvita_model.attention import AttentionBackend
from lvita_model.context_parallel.allgather import AllGatherKVAttention
from lvita_model.context_parallel.base import ContextParallelAttention
from lvita_model.context_parallel.ring import ZigzagRingAttention
from lvita_model.context_parallel.sharding import (
    CPShard,
    Layout,
    apply_padding,
    pad_documents,
    padded_positions,
    plan_shard,
)
from lvita_model.context_parallel.ulysses import UlyssesAttention
from lvita_model.head import IGNORE_INDEX, next_token_targets

PAD_ID = 151643
"""Qwen2.5's <|endoftext|>, the data pipeline's pad token."""


@dataclass(frozen=True, eq=False)
class LocalBatch:
    input_ids: Tensor
    """int64 [T / P]"""
    position_ids: Tensor
    """int64 [T / P]: global (RoPE) positions of the local tokens."""
    targets: Tensor
    """int64 [T / P]: next-token targets, -100 where not supervised."""
    shard: CPShard
    pixel_values: Tensor | None
    """[n, 3, S, S]: the tiles this rank encodes."""
    image_token_positions: Tensor | None
    """int64 [n, tokens_per_tile]: local positions of their placeholders, -1 if not local."""


def shard_batch(
    input_ids: Tensor,
    position_ids: Tensor,
    labels: Tensor,
    cu_seqlens: Tensor | Sequence[int],
    *,
    cp_size: int,
    cp_rank: int,
    pixel_values: Tensor | None = None,
    image_token_positions: Tensor | None = None,
    layout: Layout = "zigzag",
    pad_id: int = PAD_ID,
) -> LocalBatch:
    """This rank's part of one packed sequence (see the module docstring)."""
    targets = next_token_targets(labels, cu_seqlens)
    padded_cu, source = pad_documents(cu_seqlens, cp_size, layout)
    shard = plan_shard(padded_cu, cp_size, cp_rank, layout)
    index = shard.index.to(input_ids.device)
    source = source.to(input_ids.device)
    local_ids = apply_padding(input_ids, source, pad_id)[index]
    local_targets = apply_padding(targets, source, IGNORE_INDEX)[index]
    local_positions = padded_positions(position_ids, source)[index]
    tiles, positions = _local_tiles(pixel_values, image_token_positions, source, index)
    return LocalBatch(local_ids, local_positions, local_targets, shard, tiles, positions)


def _local_tiles(
    pixel_values: Tensor | None, image_token_positions: Tensor | None, source: Tensor, index: Tensor
) -> tuple[Tensor | None, Tensor | None]:
    if pixel_values is None or image_token_positions is None or not len(pixel_values):
        return pixel_values, image_token_positions
    kept = torch.nonzero(source >= 0).flatten()
    padded_of = torch.empty(int(source.max()) + 1, dtype=torch.long, device=source.device)
    padded_of[source[kept]] = kept  # original position -> padded position
    local_of = torch.full((source.shape[0],), -1, dtype=torch.long, device=source.device)
    local_of[index] = torch.arange(index.shape[0], device=source.device)
    local = local_of[padded_of[image_token_positions.to(source.device)]]  # [N, tokens_per_tile]
    here = (local >= 0).any(dim=1)
    return pixel_values[here.to(pixel_values.device)], local[here]


def global_loss(
    loss_sum: Tensor, count: Tensor, groups: Sequence[dist.ProcessGroup | None] = ()
) -> tuple[Tensor, Tensor]:
    """(loss to back-propagate on this rank, global mean loss for logging).

    The count is all-reduced over `groups` (e.g. the CP group and the DP group, or one group
    holding both); the local sum is divided by it. The logged mean all-reduces the sums too."""
    stats = torch.stack([loss_sum.detach().double(), count.double()])
    for group in groups:
        dist.all_reduce(stats, group=group)
    total_count = stats[1].clamp(min=1)
    return loss_sum / total_count.to(loss_sum.dtype), stats[0] / total_count


CP_ATTENTION: dict[str, type[ContextParallelAttention]] = {
    "ring": ZigzagRingAttention,
    "allgather": AllGatherKVAttention,
    "ulysses": UlyssesAttention,
}
"""The context-parallel attention of each ``method`` name (the training config's cp_method)."""


def context_parallel_inputs(
    batch: dict[str, Tensor],
    group: dist.ProcessGroup | None,
    backend: AttentionBackend,
    *,
    method: str = "ring",
    layout: Layout = "zigzag",
    pad_id: int = PAD_ID,
) -> tuple[LocalBatch, Callable[[Tensor, Tensor, Tensor], Tensor]]:
    """(this rank's inputs, the attention callable for `model(..., attention=...)`).

    `batch` holds one packed sequence as `lvita_data.loader.PackedBatch.to_torch()`
    returns it (``input_ids``, ``position_ids``, ``labels`` of shape [B, T] are flattened to
    B * T tokens with ``cu_seqlens`` over them; ``pixel_values`` and ``image_token_positions``
    optional).
    `method`: "ring" (zigzag p2p ring, KV memory 1/P), "allgather" (KV gathered per layer) or
    "ulysses" (all-to-all to head shards; the heads must divide by P, see `ulysses`)."""
    cp_size, cp_rank = dist.get_world_size(group), dist.get_rank(group)
    local = shard_batch(
        batch["input_ids"].reshape(-1),
        batch["position_ids"].reshape(-1),
        batch["labels"].reshape(-1),
        batch["cu_seqlens"],
        cp_size=cp_size,
        cp_rank=cp_rank,
        pixel_values=batch.get("pixel_values"),
        image_token_positions=batch.get("image_token_positions"),
        layout=layout,
        pad_id=pad_id,
    )
    if method not in CP_ATTENTION:
        raise ValueError(f"unknown CP attention method {method!r}: one of {tuple(CP_ATTENTION)}")
    return local, CP_ATTENTION[method](local.shard, backend, group)
