"""`PackedBatch`: `batch_size` checked packs stacked into numpy arrays, their tiles decoded.

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
  bit-identical to the original's normalised tensors: stored tiles decoded with
  `lvita_data.media.tiles.decode_tile`, source images decoded and cut with the
  original's Pillow operations (`lvita_data.media.source.source_image_tiles`, once per image and
  pack however many tiles come from it), all normalised with `lvita_data.media.tiles`' one table
  by `normalize_tile_into`. An image that no longer decodes, or decodes to another size than
  planned, raises `LoaderError` naming shard, key and member: it can never change the token
  count. With ``normalize=False`` uint8 [N, 448, 448, 3] (e.g. to normalise on the
  accelerator); with ``decode_pixels=False`` None, ``tile_data`` holds the encoded stored tiles
  and ``image_data`` each pack's source images ({member: bytes}).
- ``image_token_positions``: int64 [N, 256], for tile i the flat positions (into B * T) of its 256
  ``<IMG_CONTEXT>`` / ``<PATCH_CONTEXT>`` / ``<VID_CONTEXT>`` placeholders, in sequence order:
  ``embeddings.view(B * T, D)[image_token_positions[i]] = vision_features[i]``.
- ``tiles_per_pack`` int32 [B]; ``keys`` (the packs' sample keys) and ``meta`` (their meta.json).

`PackedBatch.to_torch(device)` converts to tensors (imports torch lazily); uint8 tiles are
normalised there, on the device, bit-identically (`normalize_tiles_torch`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image

from lvita_data.errors import LoaderError, SkipSample
from lvita_data.loader.pack import Pack
from lvita_data.media.source import source_image_tiles
from lvita_data.media.tiles import decode_tile, normalize_tile_into, normalize_tiles_torch
from lvita_data.samples.tiling import TOKENS_PER_TILE
from lvita_data.schema import TILE_SIZE

Allocate = Callable[..., np.ndarray]
"""``allocate(shape, dtype=...)`` makes the pixel array, like ``np.empty`` (the default)."""


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
    """The encoded stored tiles (only with decode_pixels=False)."""
    image_data: list[dict[str, bytes]] | None = None
    """Per pack, its source images by member (only with decode_pixels=False)."""
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


def assemble_batch(
    packs: Sequence[Pack],
    seq_len: int,
    *,
    decode_pixels: bool = True,
    normalize: bool = True,
    allocate: Allocate = np.empty,
) -> PackedBatch:
    """Stack packs of length `seq_len` into a batch and decode their tiles.

    `decode_pixels` and `normalize` are the loader's options (see the module docstring);
    `allocate` makes the pixel array (the loader's workers allocate shared memory).
    """
    cu_parts = [p.cu_seqlens[:-1] + b * seq_len for b, p in enumerate(packs)]
    cu_parts.append(np.array([len(packs) * seq_len], dtype=np.int32))
    positions = [p.placeholders + b * seq_len for b, p in enumerate(packs)]
    formats = {p.tile_format for p in packs}
    tile_format = packs[0].tile_format
    pixel_values = tile_data = image_data = None
    if decode_pixels:
        if len(formats) > 1:
            raise LoaderError(f"packs of one batch use different tile formats {formats}")
        pixel_values = _decode_tiles(packs, normalize, allocate)
    else:
        tile_data = [bytes(t) for p in packs for t in p.tiles]
        image_data = [
            {s.member: bytes(s.data) for s, _ in p.tile_sources if s is not None} for p in packs
        ]
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
        tiles_per_pack=np.array([len(p.tile_sources) for p in packs], dtype=np.int32),
        keys=[p.key for p in packs],
        meta=[p.meta for p in packs],
        tile_data=tile_data,
        image_data=image_data,
        tile_format=tile_format,
    )


def _decode_tiles(packs: Sequence[Pack], normalize: bool, allocate: Allocate) -> np.ndarray:
    """float32 [N, 3, 448, 448] normalised tiles, or uint8 [N, 448, 448, 3] without `normalize`."""
    count = sum(len(p.tile_sources) for p in packs)
    if normalize:
        out = allocate((count, 3, TILE_SIZE, TILE_SIZE), dtype=np.float32)
    else:
        out = allocate((count, TILE_SIZE, TILE_SIZE, 3), dtype=np.uint8)
    i = 0
    for pack in packs:
        for tile in _pack_tiles(pack):
            if normalize:
                normalize_tile_into(tile, out[i])
            else:
                out[i] = tile
            i += 1
    return out


def _pack_tiles(pack: Pack) -> Iterator[np.ndarray]:
    """uint8 [448, 448, 3] tiles of one pack in placeholder order; a source image is decoded
    and cut once per pack, when its first tile is needed."""
    cut: dict[str, list[Image.Image]] = {}
    for source, index in pack.tile_sources:
        if source is None:
            try:
                yield decode_tile(pack.tiles[index], pack.tile_format)
            except ValueError as error:
                member = f"tile{index:06d}.{pack.tile_format}"
                raise LoaderError(f"{pack.where}: {member}: {error}") from None
            continue
        if source.member not in cut:
            try:
                cut[source.member] = source_image_tiles(
                    bytes(source.data), source.size, source.grid, source.member
                )
            except SkipSample as error:
                raise LoaderError(f"{pack.where}: image {error.detail}") from None
        tiles = cut[source.member]
        yield np.asarray(tiles[index])
