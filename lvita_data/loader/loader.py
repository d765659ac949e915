"""Training loader of packed shards: `ShardLoader` yields `PackedBatch`es of numpy arrays.

Reads a build directory of `lvita build` (shard format 1, see `lvita_data.shards.format`), decodes
the packs and their pixels, and yields batches split by data-parallel (DP) rank and loader worker
without overlap, with an exact-resume `state_dict()` / `load_state_dict()`.

Batches
-------
A batch is `batch_size` packs (default 1: packs are already full sequences) of the same length T
(the stage's ``pack.max_seq_len``). `PackedBatch` holds numpy arrays:

- ``input_ids``, ``labels``, ``position_ids``: int32 [B, T], exactly the shard's arrays (labels
  unshifted, -100 where not supervised).
- ``cu_seqlens``: int32 [S + 1], the THD layout of the flattened batch (B * T tokens): the packs'
  boundaries concatenated, pack b shifted by b * T, ending at B * T; S = all packed samples.
  ``cu_seqlens_per_pack`` keeps each pack's own int32 [n_b + 1] array; ``max_seqlen``.
- ``pixel_values``: float32 [N, 3, 448, 448], the N tiles of the batch in placeholder order,
  bit-identical to the original's normalised tensors (decoded with `pixels.decode_tile`,
  normalised with a lookup table computed by `pixels.normalize_tiles` itself). With
  ``normalize=False`` uint8 [N, 448, 448, 3] (e.g. to normalise on the accelerator); with
  ``decode_pixels=False`` None, and ``tile_data`` holds the encoded tiles.
- ``image_token_positions``: int64 [N, 256], for tile i the flat positions (into B * T) of its 256
  ``<IMG_CONTEXT>`` / ``<PATCH_CONTEXT>`` / ``<VID_CONTEXT>`` placeholders, in sequence order:
  ``embeddings.view(B * T, D)[image_token_positions[i]] = vision_features[i]``.
- ``tiles_per_pack`` int32 [B]; ``keys`` (the packs' sample keys) and ``meta`` (their meta.json).
`PackedBatch.to_torch(device)` converts to tensors (imports torch lazily); uint8 tiles are
normalised there, on the device, bit-identically (`normalize_tiles_torch`).

Every pack is checked while it is read: the four arrays are int32 [T] (cu_seqlens [n + 1] from 0
to T), the tile members are ``tile000000 .. tile{N-1}`` in the meta's format, and the number of
vision placeholders in ``input_ids`` is exactly 256 * N. A violation raises `LoaderError` naming
the shard and the key.

Order, DP split and epochs
--------------------------
Packs are numbered globally in shard order (shard i, sample j, from ``index.json``). The order of
an epoch is a deterministic function of (seed, epoch): with ``shuffle`` a two-level permutation
(shard order permuted, then the samples within each shard; numpy's legacy ``RandomState``, whose
streams numpy keeps stable across versions), else the global order. The build already shuffled
the packs across shards with the stage seed, so the two levels mix as well as a global
permutation while every reader stays inside one shard at a time.

**DP split (drop policy):** each of the W ranks gets the same number of packs per epoch,
``n = N // W``: rank r takes the contiguous slice ``order[r * n:(r + 1) * n]`` of the epoch
order, and the last ``N % W`` packs of the order are dropped for that epoch (with ``shuffle``,
different packs every epoch). Equal counts mean every rank runs the same number of steps, so
collective operations never wait for a rank that ran out of data. Slices rather than a stride
(``order[r::W]``): with a stride every rank would open every shard and read its tar headers to use
1/W of its packs; with slices a shard is read by about one rank. The slices still differ per step
(rank r at step t reads a different shard than rank r'), which mixes sources across the global
batch. Batches are consecutive runs of `batch_size` packs of the rank's slice; the last one is
smaller unless ``drop_last`` (it is the same on every rank, since the slices have equal sizes).

An iteration (``for batch in loader``) runs from the current position to the end of the epoch and
then advances to the next epoch (position 0), so a plain loop over epochs works; `set_epoch`
moves to the start of any epoch. The position advances when a batch is handed out, so
`state_dict()` taken after consuming k batches resumes with batch k + 1. Breaking out of a loop
keeps the position: the next iteration continues from there.

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

Exact resume
------------
`state_dict()` is a small JSON-able dict: epoch, position (packs consumed in this rank's slice of
the epoch), seed, shuffle, DP rank and world size, and a fingerprint of the shard list. After
`load_state_dict(state)` a new loader yields exactly the batches the saved one would have yielded
next. Loading refuses (`ValueError`) a state of a different DP world size (every rank's slice
depends on it), seed, shuffle setting or build. A different DP rank is accepted: all ranks move
in lockstep, so rank 0's state fits every rank.

Reading
-------
A process scans a shard's tar headers when it first needs the shard (`lvita_data.shards.tar`,
strict mode: ustar, pax and GNU long names; only the headers are read through a read-only map:
about 20 us per member, 0.3 ms per pack of 13 tiles; the scans of the last 4 shards are kept),
which gives every sample's byte range; a pack is then one
``pread`` of its contiguous members, sliced without copies. Members are grouped into samples by
WebDataset's rule (key = the name up to the first dot of its last path component, suffix
lower-cased, ``__*__`` metadata skipped; tested equal to ``webdataset.WebDataset``'s samples).
Packs do not go through WebDataset's tar iterators: those stream a shard from its start, so a
split by pack would make every rank read every byte; their ``tarfile`` stream parsing costs about
3 ms per pack (170 us per member); and importing ``webdataset`` imports torch, which this module
must not do at import time (nor while iterating without workers).

Cost (``benchmarks/results/loader.md``, one core of a 2-vCPU EPYC VM): 36,000-38,000 tokens/s
with float32 tiles (41,000 with uint8) on packs of 4096 tokens holding 13.5 photo-like tiles each;
decoding the PNG tiles is ~90% of the time, so that is 1/20-1/40 of plain tar reading.

Special ids: the vision placeholder ids come from ``special_ids`` if given, else from the
tokenizer named in the build's ``manifest.yaml`` (the bundled ``qwen2.5`` has fixed ids; another
tokenizer is loaded with `lvita_data.tokenizer.tokenizer.load_tokenizer`).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import re
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from lvita_data.errors import LoaderError, ShardFormatError
from lvita_data.media.tiles import decode_tile, normalize_tiles
from lvita_data.samples.tiling import TILE_SIZE, TOKENS_PER_TILE
from lvita_data.shards.format import (
    ARRAY_MEMBERS,
    BUNDLED_TOKENIZER,
    SHARD_FORMAT_VERSION,
    read_build_manifest,
)
from lvita_data.shards.tar import TarSample, group_samples, scan_tar_file
from lvita_data.tokenizer.special_tokens import (
    LONGVITA_SPECIAL_TOKENS,
    QWEN25_NUM_BPE_TOKENS,
    QWEN25_SPECIAL_TOKENS,
    SpecialIds,
)

SHARD_FORMAT = SHARD_FORMAT_VERSION
"""The shard format this loader reads."""
ARRAY_NAMES = tuple(ARRAY_MEMBERS)
STATE_VERSION = 1


# --------------------------------------------------------------------------------------------
# batches


@dataclass(slots=True)
class PackedBatch:
    """`batch_size` packs as numpy arrays; see the module docstring for the layout."""

    input_ids: np.ndarray
    """int32 [B, T]"""
    labels: np.ndarray
    """int32 [B, T], unshifted, -100 where not supervised."""
    position_ids: np.ndarray
    """int32 [B, T]"""
    cu_seqlens: np.ndarray
    """int32 [S + 1] over the flattened B * T tokens (THD layout)."""
    cu_seqlens_per_pack: list[np.ndarray]
    """int32 [n_b + 1] per pack, as stored."""
    pixel_values: np.ndarray | None
    """float32 [N, 3, 448, 448] normalised (uint8 [N, 448, 448, 3] with normalize=False)."""
    image_token_positions: np.ndarray
    """int64 [N, 256]: flat positions (into B * T) of each tile's placeholders, in order."""
    tiles_per_pack: np.ndarray
    """int32 [B]"""
    keys: list[str]
    meta: list[dict]
    tile_data: list[bytes] | None = None
    """The encoded tiles (only with decode_pixels=False)."""
    tile_format: str = "png"

    @property
    def batch_size(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def seq_len(self) -> int:
        return int(self.input_ids.shape[1])

    @property
    def num_tokens(self) -> int:
        """B * T, padding included."""
        return int(self.input_ids.size)

    @property
    def num_tiles(self) -> int:
        return int(self.image_token_positions.shape[0])

    @property
    def max_seqlen(self) -> int:
        """Longest segment of `cu_seqlens` (flash-attn's ``max_seqlen``)."""
        return int(np.diff(self.cu_seqlens).max()) if self.cu_seqlens.size > 1 else 0

    def to_torch(
        self, device: Any = None, non_blocking: bool = False, normalize_pixels: bool = True
    ) -> dict[str, Any]:
        """Tensors on `device`: ids, labels, positions int64, cu_seqlens int32, positions of the
        placeholders int64, ``max_seqlen`` an int, ``pixel_values`` float32 [N, 3, 448, 448].

        uint8 tiles (``normalize=False`` loaders) are moved as uint8 (a quarter of the bytes)
        and normalised on `device` by `normalize_tiles_torch`, bit-identical to the float32
        tiles; `normalize_pixels=False` keeps them uint8 [N, 448, 448, 3].
        """
        import torch

        def tensor(array: np.ndarray, dtype=None):
            out = torch.from_numpy(np.ascontiguousarray(array))
            if device is not None:
                out = out.to(device, non_blocking=non_blocking)
            return out if dtype is None else out.to(dtype)

        out = {
            "input_ids": tensor(self.input_ids, torch.int64),
            "labels": tensor(self.labels, torch.int64),
            "position_ids": tensor(self.position_ids, torch.int64),
            "cu_seqlens": tensor(self.cu_seqlens),
            "max_seqlen": self.max_seqlen,
            "image_token_positions": tensor(self.image_token_positions),
        }
        if self.pixel_values is not None:
            pixels = tensor(self.pixel_values)
            if pixels.dtype == torch.uint8 and normalize_pixels:
                pixels = normalize_tiles_torch(pixels)
            out["pixel_values"] = pixels
        return out


def normalize_tiles_torch(tiles):
    """torch uint8 [N, H, W, 3] -> float32 [N, 3, H, W] on the tiles' device, bit-identical to
    `lvita_data.media.tiles.normalize_tiles` (a look-up in the same float32 table)."""
    import torch

    if tiles.dtype != torch.uint8 or tiles.dim() != 4 or tiles.shape[-1] != 3:
        raise ValueError(f"expected uint8 [N, H, W, 3], got {tiles.dtype} {tuple(tiles.shape)}")
    table = torch.from_numpy(_TABLE).to(tiles.device)
    out = torch.empty(
        (tiles.shape[0], 3, tiles.shape[1], tiles.shape[2]),
        dtype=torch.float32,
        device=tiles.device,
    )
    for channel in range(3):
        out[:, channel] = table[channel][tiles[..., channel].long()]
    return out


_TILE_NAME = re.compile(r"^tile(\d+)\.([a-z0-9]+)$")


# --------------------------------------------------------------------------------------------
# order


def _seed_words(seed: int, epoch: int) -> list[int]:
    if seed < 0 or epoch < 0:
        raise ValueError(f"seed and epoch must be >= 0, got {seed}, {epoch}")
    mask = 0xFFFFFFFF
    return [seed & mask, (seed >> 32) & mask, epoch & mask, (epoch >> 32) & mask, 0x6C766C64]


def epoch_order(counts: Sequence[int], *, seed: int, epoch: int, shuffle: bool) -> np.ndarray:
    """int64 global pack indices of one epoch (before the DP split).

    Global index = packs of the earlier shards + sample number in the shard. With `shuffle`:
    shards in a permuted order, the samples of each shard permuted, from ``RandomState`` seeded
    with (seed, epoch) (legacy streams: stable across numpy versions).
    """
    counts = [int(c) for c in counts]
    total = sum(counts)
    if not shuffle:
        return np.arange(total, dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum(counts, dtype=np.int64)])
    rng = np.random.RandomState(_seed_words(seed, epoch))
    parts = [np.empty(0, dtype=np.int64)]
    for shard in rng.permutation(len(counts)):
        parts.append(offsets[shard] + rng.permutation(counts[shard]).astype(np.int64))
    return np.concatenate(parts)


# --------------------------------------------------------------------------------------------
# special ids


def bundled_vision_ids() -> tuple[int, int, int]:
    """(IMG, PATCH, VID) context ids of the bundled qwen2.5 tokenizer (fixed; checked at load)."""
    first = QWEN25_NUM_BPE_TOKENS + len(QWEN25_SPECIAL_TOKENS)
    return tuple(
        first + LONGVITA_SPECIAL_TOKENS.index(token)
        for token in ("<IMG_CONTEXT>", "<PATCH_CONTEXT>", "<VID_CONTEXT>")
    )  # type: ignore[return-value]


def _vision_ids_of_build(root: Path) -> tuple[int, int, int]:
    try:
        spec = read_build_manifest(root).tokenizer_spec
    except ShardFormatError as error:
        raise LoaderError(f"{error}; pass special_ids=") from None
    if spec == BUNDLED_TOKENIZER:
        return bundled_vision_ids()
    from lvita_data.tokenizer.tokenizer import load_tokenizer

    return load_tokenizer(spec).special_ids.vision_context_ids


# --------------------------------------------------------------------------------------------
# decoding


def _normalize_table() -> np.ndarray:
    """float32 [3, 256] computed by `normalize_tiles` itself (so exact by construction)."""
    values = np.repeat(np.arange(256, dtype=np.uint8)[None, :, None, None], 3, axis=3)
    return np.ascontiguousarray(normalize_tiles(values)[0, :, :, 0])


_TABLE = _normalize_table()


def normalize_tile_into(tile: np.ndarray, out: np.ndarray) -> None:
    """uint8 [448, 448, 3] -> `out` float32 [3, 448, 448]; equal to `normalize_tiles`.

    Transposing the uint8 tile to CHW first makes the three table look-ups contiguous: about
    0.7 ms per tile against 3-8 ms for `normalize_tiles`' strided look-ups on large batches.
    """
    chw = np.ascontiguousarray(tile.transpose(2, 0, 1))
    for channel in range(3):
        np.take(_TABLE[channel], chw[channel], out=out[channel], mode="clip")


@dataclass(slots=True)
class _Pack:
    key: str
    input_ids: np.ndarray
    labels: np.ndarray
    position_ids: np.ndarray
    cu_seqlens: np.ndarray
    meta: dict
    tiles: list[memoryview]
    tile_format: str
    placeholders: np.ndarray  # int64 [n_tiles, 256], positions within the pack


def _npy(data: memoryview, name: str, where: str) -> np.ndarray:
    """An int32 1-D array from .npy bytes (allow_pickle=False semantics: plain dtypes only)."""
    try:
        array = np.load(io.BytesIO(data), allow_pickle=False)
    except ValueError as error:
        raise LoaderError(f"{where}: {name}.npy: {error}") from None
    if array.dtype != np.int32 or array.ndim != 1:
        raise LoaderError(f"{where}: {name}.npy is {array.dtype} {array.shape}, expected int32 1-D")
    return array


# --------------------------------------------------------------------------------------------
# the loader


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
        _seed_words(seed, epoch)  # validates
        self.root = Path(out_dir)
        index = self._read_index()
        self.stage: str = index["stage"]
        self.seq_len: int = int(index["max_seq_len"])
        self.shard_names: list[str] = [s["name"] for s in index["shards"]]
        self.shard_counts: list[int] = [int(s["samples"]) for s in index["shards"]]
        self._offsets = np.concatenate([[0], np.cumsum(self.shard_counts, dtype=np.int64)])
        self.num_packs = int(self._offsets[-1])
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
        if special_ids is not None:
            self.vision_ids = tuple(special_ids.vision_context_ids)
        else:
            self.vision_ids = _vision_ids_of_build(self.root)
        self._epoch = epoch
        self._position = 0
        self._order_cache: tuple[int, np.ndarray] | None = None
        self._scans: OrderedDict[int, list[TarSample]] = OrderedDict()
        self._files: OrderedDict[int, int] = OrderedDict()

    # -- index, pickling ------------------------------------------------------------------

    def _read_index(self) -> dict:
        path = self.root / "index.json"
        try:
            index = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as error:
            raise LoaderError(f"{path}: {error}") from None
        if index.get("format") != SHARD_FORMAT:
            raise LoaderError(
                f"{path}: shard format {index.get('format')!r}, this loader reads {SHARD_FORMAT}"
            )
        if not index.get("shards"):
            raise LoaderError(f"{path}: no shards")
        return index

    def __getstate__(self) -> dict:
        state = {name: getattr(self, name) for name in self._picklable()}
        return state

    def __setstate__(self, state: dict) -> None:
        for name, value in state.items():
            setattr(self, name, value)
        self._order_cache = None
        self._scans = OrderedDict()
        self._files = OrderedDict()

    def _picklable(self) -> list[str]:
        skip = {"_order_cache", "_scans", "_files"}
        return [name for name in vars(self) if name not in skip]

    def close(self) -> None:
        """Close the shard files this process opened (reopened on demand)."""
        while self._files:
            _, fd = self._files.popitem()
            os.close(fd)

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self.close()

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
        _seed_words(self.seed, epoch)
        self._epoch, self._position = epoch, 0

    def rank_order(self, epoch: int | None = None) -> np.ndarray:
        """int64 global pack indices of this rank's slice of `epoch` (default: the current)."""
        epoch = self._epoch if epoch is None else epoch
        if self._order_cache is None or self._order_cache[0] != epoch:
            order = epoch_order(
                self.shard_counts, seed=self.seed, epoch=epoch, shuffle=self.shuffle
            )
            start = self.dp_rank * self.packs_per_rank
            self._order_cache = (epoch, order[start : start + self.packs_per_rank].copy())
        return self._order_cache[1]

    def _num_batches(self, start: int) -> int:
        remaining = self.packs_per_rank - start
        if self.drop_last:
            return max(remaining, 0) // self.batch_size
        return -(-max(remaining, 0) // self.batch_size)

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
        _seed_words(self.seed, int(state["epoch"]))
        self._epoch, self._position = int(state["epoch"]), position

    # -- iteration ------------------------------------------------------------------------

    def __iter__(self) -> Iterator[PackedBatch]:
        epoch, start = self._epoch, self._position
        count = self._num_batches(start)
        if self.num_workers == 0:
            batches = (self.batch_at(epoch, start + k * self.batch_size) for k in range(count))
        else:
            batches = self._worker_batches(epoch, start, count)
        for batch in batches:
            self._position += batch.batch_size
            yield batch
        self._epoch, self._position = epoch + 1, 0

    def _worker_batches(self, epoch: int, start: int, count: int) -> Iterator[PackedBatch]:
        from torch.utils.data import DataLoader

        view = _BatchView(self, epoch, start, count)
        loader = DataLoader(
            view,
            batch_size=None,
            shuffle=False,
            num_workers=self.num_workers,
            collate_fn=_identity,
            prefetch_factor=self.prefetch_factor,
            multiprocessing_context=self.multiprocessing_context,
        )
        iterator = iter(loader)
        try:
            for batch in iterator:
                if batch.pixel_values is not None and not isinstance(
                    batch.pixel_values, np.ndarray
                ):
                    batch.pixel_values = batch.pixel_values.numpy()  # shared memory, no copy
                yield batch
        finally:
            shutdown = getattr(iterator, "_shutdown_workers", None)
            if shutdown is not None:
                shutdown()

    def batch_at(self, epoch: int, start: int, *, allocate=np.empty) -> PackedBatch:
        """The batch starting at pack `start` of this rank's slice of `epoch`.

        `allocate(shape, dtype)` makes the pixel array (the workers allocate shared memory).
        """
        order = self.rank_order(epoch)
        if not 0 <= start < len(order):
            raise IndexError(f"start {start} outside 0..{len(order) - 1}")
        items = order[start : start + self.batch_size]
        return self.assemble([self.read_pack(int(g)) for g in items], allocate=allocate)

    # -- reading --------------------------------------------------------------------------

    def locate(self, global_index: int) -> tuple[int, int]:
        """(shard, sample number in the shard) of a global pack index."""
        if not 0 <= global_index < self.num_packs:
            raise IndexError(f"pack {global_index} outside 0..{self.num_packs - 1}")
        shard = int(np.searchsorted(self._offsets, global_index, side="right")) - 1
        return shard, global_index - int(self._offsets[shard])

    def _scan(self, shard: int) -> list[TarSample]:
        samples = self._scans.get(shard)
        if samples is None:
            path = self.root / self.shard_names[shard]
            try:
                samples = group_samples(scan_tar_file(path), str(path))
            except ShardFormatError as error:
                raise LoaderError(str(error)) from None
            if len(samples) != self.shard_counts[shard]:
                raise LoaderError(
                    f"{path}: {len(samples)} samples, index.json says {self.shard_counts[shard]}"
                )
            self._scans[shard] = samples
            while len(self._scans) > 4:
                self._scans.popitem(last=False)
        else:
            self._scans.move_to_end(shard)
        return samples

    def _fd(self, shard: int) -> int:
        fd = self._files.get(shard)
        if fd is None:
            fd = os.open(self.root / self.shard_names[shard], os.O_RDONLY)
            self._files[shard] = fd
            while len(self._files) > 4:
                os.close(self._files.popitem(last=False)[1])
        else:
            self._files.move_to_end(shard)
        return fd

    def read_raw(self, global_index: int) -> tuple[str, dict[str, memoryview]]:
        """(key, {suffix: bytes}) of one pack: one read of its byte range, sliced."""
        shard, number = self.locate(global_index)
        sample = self._scan(shard)[number]
        size = sample.end - sample.start
        data = os.pread(self._fd(shard), size, sample.start)
        if len(data) != size:
            raise LoaderError(f"{self.shard_names[shard]}: short read of sample {sample.key}")
        view = memoryview(data)
        members = {name: view[off : off + n] for name, (off, n) in sample.members.items()}
        return sample.key, members

    def read_pack(self, global_index: int) -> _Pack:
        key, members = self.read_raw(global_index)
        where = f"{self.shard_names[self.locate(global_index)[0]]} sample {key}"
        missing = [f"{n}.npy" for n in ARRAY_NAMES if f"{n}.npy" not in members]
        if "meta.json" not in members:
            missing.append("meta.json")
        if missing:
            raise LoaderError(f"{where}: missing {missing}")
        arrays = [_npy(members[f"{n}.npy"], n, where) for n in ARRAY_NAMES]
        input_ids, labels, position_ids, cu_seqlens = arrays
        length = self.seq_len
        for name, array in zip(ARRAY_NAMES[:3], arrays[:3], strict=True):
            if array.shape[0] != length:
                raise LoaderError(f"{where}: {name} has {array.shape[0]} tokens, expected {length}")
        if (
            cu_seqlens.shape[0] < 2
            or cu_seqlens[0] != 0
            or cu_seqlens[-1] != length
            or (np.diff(cu_seqlens) < 0).any()
        ):
            raise LoaderError(f"{where}: cu_seqlens {cu_seqlens.tolist()} is not 0 .. {length}")
        try:
            meta = json.loads(bytes(members["meta.json"]))
        except ValueError as error:
            raise LoaderError(f"{where}: meta.json: {error}") from None
        tile_format = meta.get("tile_format", "png")
        numbered = {}
        for name, data in members.items():
            match = _TILE_NAME.match(name)
            if match is None:
                continue
            if match.group(2) != tile_format:
                raise LoaderError(f"{where}: {name} is not in the tile format {tile_format!r}")
            numbered[int(match.group(1))] = data
        num_tiles = len(numbered)
        if sorted(numbered) != list(range(num_tiles)) or meta.get("num_tiles") != num_tiles:
            raise LoaderError(
                f"{where}: tiles {sorted(numbered)} do not match meta num_tiles "
                f"{meta.get('num_tiles')}"
            )
        img, patch, vid = self.vision_ids
        mask = (input_ids == img) | (input_ids == patch) | (input_ids == vid)
        positions = np.flatnonzero(mask)
        if positions.shape[0] != num_tiles * TOKENS_PER_TILE:
            raise LoaderError(
                f"{where}: {positions.shape[0]} vision placeholders for {num_tiles} tiles "
                f"(expected {num_tiles * TOKENS_PER_TILE}; wrong special_ids?)"
            )
        return _Pack(
            key=key,
            input_ids=input_ids,
            labels=labels,
            position_ids=position_ids,
            cu_seqlens=cu_seqlens,
            meta=meta,
            tiles=[numbered[i] for i in range(num_tiles)],
            tile_format=tile_format,
            placeholders=positions.reshape(num_tiles, TOKENS_PER_TILE),
        )

    def assemble(self, packs: Sequence[_Pack], *, allocate=np.empty) -> PackedBatch:
        """Stack packs into a batch and decode their tiles."""
        length = self.seq_len
        cu_parts = [p.cu_seqlens[:-1] + b * length for b, p in enumerate(packs)]
        cu_parts.append(np.array([len(packs) * length], dtype=np.int32))
        positions = [p.placeholders + b * length for b, p in enumerate(packs)]
        blobs = [t for p in packs for t in p.tiles]
        formats = {p.tile_format for p in packs}
        tile_format = packs[0].tile_format
        pixel_values = tile_data = None
        if self.decode_pixels:
            if len(formats) > 1:
                raise LoaderError(f"packs of one batch use different tile formats {formats}")
            pixel_values = self._decode(blobs, tile_format, allocate)
        else:
            tile_data = [bytes(b) for b in blobs]
        return PackedBatch(
            input_ids=np.stack([p.input_ids for p in packs]),
            labels=np.stack([p.labels for p in packs]),
            position_ids=np.stack([p.position_ids for p in packs]),
            cu_seqlens=np.concatenate(cu_parts).astype(np.int32, copy=False),
            cu_seqlens_per_pack=[p.cu_seqlens for p in packs],
            pixel_values=pixel_values,
            image_token_positions=(
                np.concatenate(positions).astype(np.int64, copy=False)
                if positions
                else np.empty((0, TOKENS_PER_TILE), dtype=np.int64)
            ),
            tiles_per_pack=np.array([len(p.tiles) for p in packs], dtype=np.int32),
            keys=[p.key for p in packs],
            meta=[p.meta for p in packs],
            tile_data=tile_data,
            tile_format=tile_format,
        )

    def _decode(self, blobs: Sequence[memoryview], tile_format: str, allocate) -> np.ndarray:
        if not self.normalize:
            out = allocate((len(blobs), TILE_SIZE, TILE_SIZE, 3), dtype=np.uint8)
            for i, blob in enumerate(blobs):
                out[i] = decode_tile(blob, tile_format)
            return out
        out = allocate((len(blobs), 3, TILE_SIZE, TILE_SIZE), dtype=np.float32)
        for i, blob in enumerate(blobs):
            normalize_tile_into(decode_tile(blob, tile_format), out[i])
        return out


def _identity(batch):
    return batch


class _BatchView:
    """Map-style view for torch's DataLoader: item k = the k-th remaining batch of an epoch."""

    def __init__(self, loader: ShardLoader, epoch: int, start: int, count: int) -> None:
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


__all__ = [
    "LoaderError",
    "PackedBatch",
    "ShardLoader",
    "TarSample",
    "bundled_vision_ids",
    "epoch_order",
    "normalize_tile_into",
    "normalize_tiles_torch",
]
