"""The default process group as checkpoints use it: a single process without a group is rank 0
of 1, and every helper is then a no-op (so checkpoint code has one path for both)."""

from __future__ import annotations

from typing import Any

import torch.distributed as dist


def active() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if active() else 0


def world_size() -> int:
    return dist.get_world_size() if active() else 1


def barrier() -> None:
    if active():
        dist.barrier()


def gather(value: Any) -> list[Any]:
    """Every rank's `value` (picklable), in rank order, on every rank."""
    if not active():
        return [value]
    values: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(values, value)
    return values


def from_rank0(value: Any) -> Any:
    """Rank 0's `value` on every rank (the others pass anything)."""
    if not active():
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]
