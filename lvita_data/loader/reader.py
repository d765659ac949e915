"""Reading one pack of a shard by its global number: `ShardReader` (its checks:
`lvita_data.loader.pack`).

A process scans a shard's tar headers when it first needs the shard (`lvita_data.shards.tar`,
strict mode: ustar, pax and GNU long names; only the headers are read through a read-only map:
about 20 us per member, 0.3 ms per pack of 13 tiles; the scans of the last 4 shards are kept),
which gives every sample's byte range; a pack is then one ``pread`` of its contiguous members,
sliced without copies. Members are grouped into samples by WebDataset's rule (key = the name up
to the first dot of its last path component, suffix lower-cased, ``__*__`` metadata skipped;
tested equal to ``webdataset.WebDataset``'s samples).
Packs do not go through WebDataset's tar iterators: they stream a shard from its start (a split
by pack would make every rank read every byte), parse at ~170 us per member, and import torch.
"""

from __future__ import annotations

import contextlib
import os
from collections import OrderedDict
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TypeVar

import numpy as np

from lvita_data.errors import LoaderError, ShardFormatError
from lvita_data.loader.pack import Pack
from lvita_data.loader.settings import PackSettings
from lvita_data.shards.format import KEY_PATTERN
from lvita_data.shards.tar import TarSample, group_samples, scan_tar_file

KEEP_SHARDS = 4
"""Shards whose tar scan and open file a process keeps (least recently used ones go)."""
_Value = TypeVar("_Value")


class ShardReader:
    """Packs of a build's shards by global number, with per-process caches of the last
    `KEEP_SHARDS` shards' tar scans and open files (dropped when pickled, reopened on demand).

    Args:
        root: the build directory.
        shard_names, shard_counts: the shards of ``index.json`` in order, and their packs.
        settings: what every pack is checked against (T, vision ids, vocabulary, positions).
    """

    def __init__(
        self,
        root: Path,
        shard_names: Sequence[str],
        shard_counts: Sequence[int],
        settings: PackSettings,
        *,
        first_keys: Sequence[str | None] | None = None,
    ) -> None:
        self.root = root
        self.shard_names = list(shard_names)
        self.shard_counts = list(shard_counts)
        self.settings = settings
        self.first_keys = list(first_keys) if first_keys is not None else None
        """Each shard's first key (`lvita_data.loader.loader.first_keys`): a shard's keys must
        lie between its own and the next shard's."""
        self.offsets = np.concatenate([[0], np.cumsum(self.shard_counts, dtype=np.int64)])
        self._scans: OrderedDict[int, list[TarSample]] = OrderedDict()
        self._files: OrderedDict[int, int] = OrderedDict()

    @property
    def num_packs(self) -> int:
        return int(self.offsets[-1])

    def __getstate__(self) -> dict:
        return {k: v for k, v in vars(self).items() if k not in ("_scans", "_files")}

    def __setstate__(self, state: dict) -> None:
        vars(self).update(state)
        self._scans = OrderedDict()
        self._files = OrderedDict()

    def close(self) -> None:
        """Close the shard files this process opened (reopened on demand)."""
        while self._files:
            _, fd = self._files.popitem()
            os.close(fd)

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self.close()

    def locate(self, global_index: int) -> tuple[int, int]:
        """(shard, sample number in the shard) of a global pack index."""
        if not 0 <= global_index < self.num_packs:
            raise IndexError(f"pack {global_index} outside 0..{self.num_packs - 1}")
        shard = int(np.searchsorted(self.offsets, global_index, side="right")) - 1
        return shard, global_index - int(self.offsets[shard])

    def read_raw(self, global_index: int) -> tuple[str, dict[str, memoryview]]:
        """(key, {suffix: bytes}) of one pack: one read of its byte range, sliced."""
        shard, number = self.locate(global_index)
        sample = _recent(self._scans, shard, lambda: self._scan(shard))[number]
        size = sample.end - sample.start
        path = self.root / self.shard_names[shard]
        try:
            fd = _recent(
                self._files,
                shard,
                lambda: os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0)),
                evict=os.close,
            )
            data = os.pread(fd, size, sample.start)
        except OSError as error:
            raise LoaderError(f"{path}: {error.strerror}") from None
        if len(data) != size:
            raise LoaderError(f"{self.shard_names[shard]}: short read of sample {sample.key}")
        view = memoryview(data)
        members = {name: view[off : off + n] for name, (off, n) in sample.members.items()}
        return sample.key, members

    def read_pack(self, global_index: int) -> Pack:
        """The checked pack of a global index (`read_raw` + `PackSettings.parse`)."""
        key, members = self.read_raw(global_index)
        where = f"{self.root / self.shard_names[self.locate(global_index)[0]]} sample {key}"
        return self.settings.parse(key, members, where=where)

    def _scan(self, shard: int) -> list[TarSample]:
        path = self.root / self.shard_names[shard]
        try:
            samples = group_samples(scan_tar_file(path), str(path))
        except ShardFormatError as error:
            raise LoaderError(str(error)) from None
        if len(samples) != self.shard_counts[shard]:
            raise LoaderError(
                f"{path}: {len(samples)} samples, index.json says {self.shard_counts[shard]}"
            )
        if self.first_keys is not None:
            self._check_keys(shard, [sample.key for sample in samples], path)
        return samples

    def _check_keys(self, shard: int, keys: list[str], path: Path) -> None:
        """9-digit keys rising strictly, from this shard's first key to below the next
        non-empty shard's: no key of the build is used twice."""
        assert self.first_keys is not None
        after = next((k for k in self.first_keys[shard + 1 :] if k is not None), None)
        previous = -1
        for key in keys:
            number = int(key) if KEY_PATTERN.match(key) else -1
            bad = number <= previous or (after is not None and number >= int(after))
            if bad or (previous < 0 and key != self.first_keys[shard]):
                raise LoaderError(
                    f"{path}: sample key {key[:40]!r} is not a 9-digit key after {previous} "
                    f"and before the next shard's {after}: keys must be unique in the build"
                )
            previous = number


def _recent(
    cache: OrderedDict[int, _Value],
    shard: int,
    make: Callable[[], _Value],
    evict: Callable[[_Value], object] | None = None,
) -> _Value:
    """`cache[shard]`, made on a miss; keeps the `KEEP_SHARDS` most recently used entries and
    hands the ones it drops to `evict`."""
    value = cache.get(shard)
    if value is not None:
        cache.move_to_end(shard)
        return value
    value = cache[shard] = make()
    while len(cache) > KEEP_SHARDS:
        dropped = cache.popitem(last=False)[1]
        if evict is not None:
            evict(dropped)
    return value
