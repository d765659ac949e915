"""Decoding batches in worker processes: a torch DataLoader over a map-style view, shared memory.

Workers (``num_workers > 0``)
-----------------------------
Batches are decoded in a ``torch.utils.data.DataLoader`` (torch is imported only then) over a
map-style view of the remaining batches of the epoch: batch k is a pure function of (epoch, k);
the DataLoader hands index k to worker ``k % num_workers`` (its round-robin dispatch) and returns
the results in index order. So the sequence of batches is identical to ``num_workers=0`` (tested),
and the resume state (the per-rank position, counted in the main process as batches are handed
out) is the same. Workers decode the pixels straight into shared memory, which reaches the main
process as a handle (a numpy array would be pickled through a pipe) and is handed out as a numpy
array without a copy. Workers are started for each iteration (epoch) and stopped at its end or
when the loop is left. Fresh shared memory costs page faults: on the benchmark VM float32 batches
cost 35-80% more CPU with workers than in one process, uint8 batches 10-60%.
So with workers prefer ``normalize=False``: uint8 tiles are a quarter of the bytes (in shared
memory and over PCIe) and `PackedBatch.to_torch` normalises them on the device, bit-identically.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Protocol

import numpy as np

from lvita_data.loader.batch import Allocate, PackedBatch


class BatchSource(Protocol):
    """What the workers need of a `lvita_data.loader.loader.ShardLoader` (which is pickled to
    each worker): its batches by (epoch, start pack) and the DataLoader settings."""

    batch_size: int
    num_workers: int
    prefetch_factor: int | None
    multiprocessing_context: str | None

    def batch_at(self, epoch: int, start: int, *, allocate: Allocate = ...) -> PackedBatch: ...


def worker_batches(
    loader: BatchSource, epoch: int, start: int, count: int
) -> Iterator[PackedBatch]:
    """The `count` batches of `loader`'s rank slice of `epoch` from pack `start`, decoded by
    ``loader.num_workers`` DataLoader workers and yielded in order (pixels as numpy arrays)."""
    from torch.utils.data import DataLoader

    view = _BatchView(loader, epoch, start, count)
    data_loader = DataLoader(
        view,
        batch_size=None,
        shuffle=False,
        num_workers=loader.num_workers,
        collate_fn=_identity,
        prefetch_factor=loader.prefetch_factor,
        multiprocessing_context=loader.multiprocessing_context,
    )
    iterator = iter(data_loader)
    try:
        for batch in iterator:
            if batch.pixel_values is not None and not isinstance(batch.pixel_values, np.ndarray):
                batch.pixel_values = batch.pixel_values.numpy()  # shared memory, no copy
            yield batch
    finally:
        shutdown = getattr(iterator, "_shutdown_workers", None)
        if shutdown is not None:
            shutdown()


def _identity(batch):
    return batch


class _BatchView:
    """Map-style view for torch's DataLoader: item k = the k-th remaining batch of an epoch."""

    def __init__(self, loader: BatchSource, epoch: int, start: int, count: int) -> None:
        self.loader, self.epoch, self.start, self.count = loader, epoch, start, count

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, k: int) -> PackedBatch:
        if not 0 <= k < self.count:
            raise IndexError(k)
        import torch

        shared = []

        def allocate(shape, dtype):
            # The pixels are decoded straight into shared memory: a tensor in shared memory
            # crosses to the main process as a handle (torch's reductions), where a numpy array
            # would be pickled through a pipe (32 MB for 13 tiles).
            tensor = _shared_tensor(torch, shape, np.dtype(dtype))
            shared.append(tensor)
            return tensor.numpy()

        batch = self.loader.batch_at(
            self.epoch, self.start + k * self.loader.batch_size, allocate=allocate
        )
        if shared:
            batch.pixel_values = shared[0]
        return batch


def _shared_tensor(torch, shape: tuple[int, ...], dtype: np.dtype):
    """An uninitialised tensor allocated in shared memory.

    ``torch.empty(...).share_memory_()`` allocates twice and copies; the storage is created in
    shared memory directly when this torch has ``UntypedStorage._new_shared`` (5x less user time
    per 32 MB batch here; the page faults of fresh shared memory remain).
    """
    torch_dtype = getattr(torch, dtype.name)
    new_shared = getattr(torch.UntypedStorage, "_new_shared", None)
    if new_shared is not None:
        try:
            storage = new_shared(int(np.prod(shape)) * dtype.itemsize)
            return torch.empty(0, dtype=torch_dtype).set_(storage, 0, shape)
        except (RuntimeError, TypeError):
            pass
    return torch.empty(shape, dtype=torch_dtype).share_memory_()
