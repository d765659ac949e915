"""Context-parallel and data-parallel process groups on a DP x CP mesh.

World size W = DP x CP. CP is the inner (fastest-varying) dimension, so the ranks of one CP
group are adjacent (same node, fastest links for the ring's P2P traffic):

    global rank = dp_rank * cp_size + cp_rank
    CP group of dp_rank d:  [d*CP, d*CP + 1, ..., d*CP + CP - 1]
    DP group of cp_rank c:  [c, CP + c, 2*CP + c, ...]

Gradients reduce over the whole world (DP x CP: every CP rank holds the full weights and its
tokens' share of the gradient); the loss as (sum, count) over both. `torch.distributed.new_group`
is collective over the *world*: every rank creates every group in the same order
(`init_cp_groups` does that) and keeps its own.

Verified (tests/model/test_cp_attention.py): the mesh arithmetic for W = 8, CP = 2/4, and the
groups of a W = 4, CP = 2 gloo world (each rank's CP and DP group members and ranks).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.distributed as dist

from lvita_model.context_parallel.sharding import CPShard
from lvita_model.errors import ContextParallelError

__all__ = [
    "ContextParallelError",
    "ParallelGroups",
    "check_shard_matches_group",
    "init_cp_groups",
    "mesh_ranks",
]


def mesh_ranks(world_size: int, cp_size: int) -> tuple[list[list[int]], list[list[int]]]:
    """(CP groups, DP groups) as lists of global ranks, CP inner (see the module docstring)."""
    if cp_size < 1 or world_size % cp_size:
        raise ContextParallelError(
            f"world size {world_size} is not a multiple of the CP size {cp_size}"
        )
    dp_size = world_size // cp_size
    cp_groups = [[d * cp_size + c for c in range(cp_size)] for d in range(dp_size)]
    dp_groups = [[d * cp_size + c for d in range(dp_size)] for c in range(cp_size)]
    return cp_groups, dp_groups


@dataclass(frozen=True)
class ParallelGroups:
    cp_group: dist.ProcessGroup
    dp_group: dist.ProcessGroup
    cp_size: int
    cp_rank: int
    dp_size: int
    dp_rank: int


def init_cp_groups(cp_size: int) -> ParallelGroups:
    """Create the CP and DP groups of an initialized default process group (collective: every
    rank calls it with the same `cp_size`)."""
    if not dist.is_initialized():
        raise ContextParallelError("torch.distributed is not initialized: init_process_group first")
    world_size, rank = dist.get_world_size(), dist.get_rank()
    cp_groups, dp_groups = mesh_ranks(world_size, cp_size)
    mine: dict[str, dist.ProcessGroup] = {}
    for ranks in cp_groups:
        group = dist.new_group(ranks)
        if rank in ranks:
            mine["cp"] = group
    for ranks in dp_groups:
        group = dist.new_group(ranks)
        if rank in ranks:
            mine["dp"] = group
    return ParallelGroups(
        cp_group=mine["cp"],
        dp_group=mine["dp"],
        cp_size=cp_size,
        cp_rank=rank % cp_size,
        dp_size=world_size // cp_size,
        dp_rank=rank // cp_size,
    )


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
