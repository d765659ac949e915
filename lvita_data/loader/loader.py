"""Training loader of packed shards: `ShardLoader` yields `PackedBatch`es of numpy arrays.

Reads a build directory of `lvita build` (shard formats 1-3: `lvita_data.shards.format`), decodes
the packs and their pixels, and yields batches split by data-parallel (DP) rank and loader worker
without overlap, with an exact-resume `state_dict()` / `load_state_dict()`.

The package, one job per module:

- `lvita_data.loader.batch`: `PackedBatch` (the layout of a batch, ``to_torch``) and stacking
  checked packs into one.
- `lvita_data.loader.order`: the order of an epoch and the DP split (drop policy), pure.
- `lvita_data.loader.reader`: reading one pack from its shard (tar scan, one ``pread``).
- `lvita_data.loader.pack`: the per-pack checks (arrays, media members, placeholder count).
- `lvita_data.loader.workers`: decoding in torch DataLoader workers into shared memory.
- `lvita_data.loader.settings`: what a build's packs are checked against (`PackSettings`, from
  ``index.json``, the manifest copy and the tokenizer): the same checks for `ShardReader` and
  for a pack whose members another reader read (Megatron-Energon, `lvita_data.energon`).
- this module: `ShardLoader` (the build's ``index.json``, its special ids, the rank's position,
  iteration and resume state).

Iteration
---------
An iteration (``for batch in loader``) runs from the current position to the end of the epoch and
then advances to the next epoch (position 0), so a plain loop over epochs works; `set_epoch`
moves to the start of any epoch. The position advances when a batch is handed out, so
`state_dict()` taken after consuming k batches resumes with batch k + 1. Breaking out of a loop
keeps the position: the next iteration continues from there.

Exact resume
------------
`state_dict()` is a small JSON-able dict: epoch, position (packs consumed in this rank's slice of
the epoch), seed, shuffle, DP rank and world size, and a fingerprint of the shard list. After
`load_state_dict(state)` a new loader yields exactly the batches the saved one would have yielded
next. Loading refuses (`ValueError`) a state of a different DP world size (every rank's slice
depends on it), seed, shuffle setting or build. A different DP rank is accepted: all ranks move
in lockstep, so rank 0's state fits every rank.

Cost (``benchmarks/results/loader.md``, one core of a 2-vCPU EPYC VM): 36,000-38,000 tokens/s
with float32 tiles (41,000 with uint8) on packs of 4096 tokens holding 13.5 photo-like tiles each;
decoding the PNG tiles is ~90% of the time, so that is 1/20-1/40 of plain tar reading.

Special ids: the vision placeholder ids come from ``special_ids`` if given, else from the
tokenizer named in the build's ``manifest.yaml`` (the bundled ``qwen2.5`` has fixed ids; another
tokenizer is loaded with `lvita_data.tokenizer.tokenizer.load_tokenizer`).
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

from lvita_data.errors import LoaderError, ShardFormatError
from lvita_data.loader.batch import Allocate, PackedBatch, assemble_batch
from lvita_data.loader.order import epoch_order, num_batches, rank_slice, seed_words
from lvita_data.loader.pack import Pack
from lvita_data.loader.reader import ShardReader
from lvita_data.loader.settings import PackSettings, build_settings, read_index
from lvita_data.loader.workers import worker_batches
from lvita_data.shards.format import KEY_PATTERN
from lvita_data.shards.tar import scan_tar_file, split_member_name
from lvita_data.tokenizer.special_tokens import SpecialIds

STATE_VERSION = 1


def _check_shard_files(root: Path, shards: list) -> None:
    """Every shard of `index.json` is a regular file of the build (not a symlink: a path
    confined to the build directory) with its recorded size (one lstat each, before any step of
    training), else one error listing them all."""
    problems = []
    for shard in shards:
        name, size = shard["name"], shard["bytes"]
        try:
            status = os.lstat(root / name)
        except OSError as error:
            problems.append(f"{name} ({error.strerror})")
            continue
        if not stat.S_ISREG(status.st_mode):
            problems.append(f"{name} (not a regular file of the build)")
        elif status.st_size != size:
            problems.append(f"{name} ({status.st_size} bytes, index.json says {size})")
    if problems:
        listing = "; ".join(problems[:10]) + (
            f"; ... {len(problems) - 10} more" if len(problems) > 10 else ""
        )
        raise LoaderError(f"{root}: {len(problems)} shard(s) missing or changed: {listing}")


def first_keys(root: Path, shards: list) -> list[str | None]:
    """The first sample key of each shard (None for an empty one), from its first member's
    headers (a few blocks per shard); they must rise strictly from shard to shard, which with
    the per-shard check of `ShardReader` makes every key of the build unique."""
    keys: list[str | None] = []
    last = None
    for shard in shards:
        if shard["samples"] == 0:
            keys.append(None)
            continue
        try:
            scan = scan_tar_file(root / shard["name"], limit=1)
        except ShardFormatError as error:
            raise LoaderError(str(error)) from None
        if not scan.members:
            raise LoaderError(f"{root / shard['name']}: no member, index.json says samples")
        key = split_member_name(scan.members[0].name)[0]
        if not KEY_PATTERN.match(key) or (last is not None and int(key) <= int(last)):
            raise LoaderError(
                f"{root / shard['name']}: first sample key {key[:40]!r} is not a 9-digit key "
                f"after the previous shard's ({last})"
            )
        keys.append(key)
        last = key
    return keys


class ShardLoader:
    """Iterate `PackedBatch`es of a build directory for one DP rank (see the module docstring).

    Args:
        out_dir: a build directory (``index.json`` and the shards).
        batch_size: packs per batch.
        dp_rank, dp_world_size: this rank and the number of DP ranks.
        num_workers: 0 decodes in this process; > 0 uses a torch DataLoader with that many
            worker processes (same batches in the same order).
        shuffle, seed, epoch: the epoch order (see `epoch_order`) and the starting epoch.
        decode_pixels: decode the tiles (else ``pixel_values`` is None and ``tile_data`` holds
            the encoded bytes).
        normalize: float32 normalised CHW tiles (else uint8 HWC).
        drop_last: drop the rank's last batch when it has fewer than `batch_size` packs.
        special_ids: the tokenizer's ids (default: from the build's manifest.yaml).
        prefetch_factor, multiprocessing_context: passed to the DataLoader (workers only).
    """

    def __init__(
        self,
        out_dir: str | os.PathLike[str],
        *,
        batch_size: int = 1,
        dp_rank: int = 0,
        dp_world_size: int = 1,
        num_workers: int = 0,
        shuffle: bool = True,
        seed: int = 0,
        epoch: int = 0,
        decode_pixels: bool = True,
        normalize: bool = True,
        drop_last: bool = False,
        special_ids: SpecialIds | None = None,
        prefetch_factor: int | None = 2,
        multiprocessing_context: str | None = None,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if dp_world_size < 1 or not 0 <= dp_rank < dp_world_size:
            raise ValueError(f"need 0 <= dp_rank < dp_world_size, got {dp_rank}, {dp_world_size}")
        if num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {num_workers}")
        seed_words(seed, epoch)  # validates
        self.root = Path(out_dir)
        index = self._read_index()
        self.stage: str = index["stage"]
        self.seq_len: int = int(index["max_seq_len"])
        self.shard_names: list[str] = [s["name"] for s in index["shards"]]
        self.shard_counts: list[int] = [int(s["samples"]) for s in index["shards"]]
        self.num_packs = sum(self.shard_counts)
        self.packs_per_rank = self.num_packs // dp_world_size
        if self.packs_per_rank == 0:
            raise LoaderError(
                f"{self.root}: {self.num_packs} packs cannot feed {dp_world_size} DP ranks"
            )
        self.fingerprint = hashlib.sha256(
            json.dumps(
                [[s["name"], s["samples"], s.get("sha256")] for s in index["shards"]]
            ).encode()
        ).hexdigest()[:16]
        self.batch_size = batch_size
        self.dp_rank = dp_rank
        self.dp_world_size = dp_world_size
        self.num_workers = num_workers
        self.shuffle = shuffle
        self.seed = seed
        self.decode_pixels = decode_pixels
        self.normalize = normalize
        self.drop_last = drop_last
        self.prefetch_factor = prefetch_factor
        self.multiprocessing_context = multiprocessing_context
        self.vision_ids, self.vocab_size, self.reset_attention = build_settings(
            self.root, special_ids
        )
        self.reader = ShardReader(
            self.root,
            self.shard_names,
            self.shard_counts,
            PackSettings(self.seq_len, self.vision_ids, self.vocab_size, self.reset_attention),
            first_keys=first_keys(self.root, index["shards"]),
        )
        self._epoch = epoch
        self._position = 0
        self._order_cache: tuple[int, np.ndarray] | None = None

    # -- index, pickling ------------------------------------------------------------------

    def _read_index(self) -> dict:
        index = read_index(self.root)
        _check_shard_files(self.root, index["shards"])
        return index

    def __getstate__(self) -> dict:
        # The reader drops its own per-process caches when pickled (for the workers).
        return {name: value for name, value in vars(self).items() if name != "_order_cache"}

    def __setstate__(self, state: dict) -> None:
        vars(self).update(state)
        self._order_cache = None

    def close(self) -> None:
        """Close the shard files this process opened (reopened on demand)."""
        self.reader.close()

    # -- order ----------------------------------------------------------------------------

    @property
    def epoch(self) -> int:
        return self._epoch

    @property
    def position(self) -> int:
        """Packs of this rank's slice of the current epoch handed out so far."""
        return self._position

    def set_epoch(self, epoch: int) -> None:
        """Start `epoch` from its beginning on the next iteration."""
        self._seek(epoch, 0)

    def _seek(self, epoch: int, position: int) -> None:
        seed_words(self.seed, epoch)  # validates
        self._epoch, self._position = epoch, position

    def rank_order(self, epoch: int | None = None) -> np.ndarray:
        """int64 global pack indices of this rank's slice of `epoch` (default: the current)."""
        epoch = self._epoch if epoch is None else epoch
        if self._order_cache is None or self._order_cache[0] != epoch:
            order = epoch_order(
                self.shard_counts, seed=self.seed, epoch=epoch, shuffle=self.shuffle
            )
            self._order_cache = (epoch, rank_slice(order, self.dp_rank, self.packs_per_rank))
        return self._order_cache[1]

    def _num_batches(self, start: int) -> int:
        return num_batches(self.packs_per_rank - start, self.batch_size, self.drop_last)

    def __len__(self) -> int:
        """Batches in a full epoch for this rank."""
        return self._num_batches(0)

    # -- state ----------------------------------------------------------------------------

    def state_dict(self) -> dict:
        return {
            "version": STATE_VERSION,
            "epoch": self._epoch,
            "position": self._position,
            "packs_per_rank": self.packs_per_rank,
            "seed": self.seed,
            "shuffle": self.shuffle,
            "dp_rank": self.dp_rank,
            "dp_world_size": self.dp_world_size,
            "num_packs": self.num_packs,
            "fingerprint": self.fingerprint,
        }

    def load_state_dict(self, state: dict) -> None:
        """Continue where the saver stopped (call between iterations)."""
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"unknown loader state version {state.get('version')!r}")
        if state["dp_world_size"] != self.dp_world_size:
            raise ValueError(
                f"loader state was saved with dp_world_size={state['dp_world_size']}, this loader "
                f"has dp_world_size={self.dp_world_size}: every rank's share of the data depends "
                "on the world size, so an exact resume needs the same one"
            )
        for name in ("seed", "shuffle"):
            if state[name] != getattr(self, name):
                raise ValueError(
                    f"loader state was saved with {name}={state[name]!r}, this loader has "
                    f"{name}={getattr(self, name)!r}: the order would differ"
                )
        if state["fingerprint"] != self.fingerprint or state["num_packs"] != self.num_packs:
            raise ValueError(
                f"loader state belongs to another build ({state['num_packs']} packs, shards "
                f"{state['fingerprint']}) than {self.root} ({self.num_packs}, {self.fingerprint})"
            )
        position = int(state["position"])
        if not 0 <= position <= self.packs_per_rank:
            raise ValueError(f"position {position} outside 0..{self.packs_per_rank}")
        self._seek(int(state["epoch"]), position)

    # -- iteration ------------------------------------------------------------------------

    def __iter__(self) -> Iterator[PackedBatch]:
        epoch, start = self._epoch, self._position
        count = self._num_batches(start)
        if self.num_workers == 0:
            batches = (self.batch_at(epoch, start + k * self.batch_size) for k in range(count))
        else:
            batches = worker_batches(self, epoch, start, count)
        for batch in batches:
            self._position += batch.batch_size
            yield batch
        self._epoch, self._position = epoch + 1, 0

    def batch_at(self, epoch: int, start: int, *, allocate: Allocate = np.empty) -> PackedBatch:
        """The batch starting at pack `start` of this rank's slice of `epoch`.

        `allocate(shape, dtype)` makes the pixel array (the workers allocate shared memory).
        """
        order = self.rank_order(epoch)
        if not 0 <= start < len(order):
            raise IndexError(f"start {start} outside 0..{len(order) - 1}")
        items = order[start : start + self.batch_size]
        return self.assemble([self.read_pack(int(g)) for g in items], allocate=allocate)

    # -- reading (`ShardReader`, `assemble_batch`) ----------------------------------------

    def locate(self, global_index: int) -> tuple[int, int]:
        """(shard, sample number in the shard) of a global pack index."""
        return self.reader.locate(global_index)

    def read_raw(self, global_index: int) -> tuple[str, dict[str, memoryview]]:
        """(key, {suffix: bytes}) of one pack: one read of its byte range, sliced."""
        return self.reader.read_raw(global_index)

    def read_pack(self, global_index: int) -> Pack:
        """The checked pack of a global index."""
        return self.reader.read_pack(global_index)

    def assemble(self, packs: Sequence[Pack], *, allocate: Allocate = np.empty) -> PackedBatch:
        """Stack packs into a batch and decode their tiles (per the loader's pixel options)."""
        return assemble_batch(
            packs,
            self.seq_len,
            decode_pixels=self.decode_pixels,
            normalize=self.normalize,
            allocate=allocate,
        )


__all__ = ["STATE_VERSION", "ShardLoader"]
