"""The I/O of `lvita show`: open a build, pick one pack, read it with the loader, decode it.

The pack is read and checked by the training loader (`lvita_data.loader.ShardLoader`, shards
in ``index.json`` order, no shuffle), so `show` sees exactly the ids, labels, boundaries and
tiles training sees; its tiles are the loader's uint8 pixels (images cut from their source
bytes, stored tiles decoded). The text is decoded with the tokenizer
named in the build's ``manifest.yaml`` copy.

A pack is chosen by global index (0 .. packs - 1, shards in ``index.json`` order) or by its
sample key. lvita writes key ``{NNNNNNNNN}`` = the global index, so a key is found with one
read; a build whose keys differ is searched shard by shard (tar headers only).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lvita_data.errors import LoaderError, LvitaError, ShardFormatError, ShowError
from lvita_data.loader import ShardLoader
from lvita_data.loader.pack import Pack
from lvita_data.shards.format import read_build_manifest
from lvita_data.shards.tar import group_samples, scan_tar_file
from lvita_data.show.model import PackView, VisionIds, describe_pack
from lvita_data.tokenizer.tokenizer import LongVitaTokenizer, load_tokenizer

WRAPPER_FIELDS = ("img_start", "img_end", "patch_start", "patch_end", "vid_start", "vid_end")


@dataclass(frozen=True, slots=True)
class ShownPack:
    """A pack cut for display, and its tiles (uint8 [N, 448, 448, 3], None unless asked for)."""

    view: PackView
    tiles: np.ndarray | None


def open_build(build: str | os.PathLike[str]) -> tuple[ShardLoader, LongVitaTokenizer]:
    """The loader of a build (no shuffle, uint8 tiles) and its tokenizer.

    Raises:
        LoaderError: not a readable build, or its tokenizer cannot be loaded.
    """
    loader = ShardLoader(build, shuffle=False, normalize=False)
    try:
        tokenizer = load_tokenizer(read_build_manifest(build).tokenizer_spec)
    except LvitaError as error:
        raise LoaderError(f"{build}: cannot load the build's tokenizer: {error}") from None
    return loader, tokenizer


def find_pack(loader: ShardLoader, *, pack: int | None = None, key: str | None = None) -> int:
    """The global index of `pack` or of the pack with sample `key` (neither: pack 0).

    Raises:
        ShowError: the build has no such pack or key.
    """
    last = loader.num_packs - 1
    if key is None:
        index = 0 if pack is None else pack
        if not 0 <= index <= last:
            raise ShowError(f"pack {index} is outside 0..{last} ({loader.num_packs} packs)")
        return index
    if key.isdigit() and int(key) <= last and loader.read_raw(int(key))[0] == key:
        return int(key)
    offset = 0
    for name, count in zip(loader.shard_names, loader.shard_counts, strict=True):
        path = Path(loader.root) / name
        try:
            keys = [sample.key for sample in group_samples(scan_tar_file(path), str(path))]
        except ShardFormatError as error:
            raise LoaderError(str(error)) from None
        if key in keys:
            return offset + keys.index(key)
        offset += count
    shown = key if len(key) <= 40 else key[:40] + "..."
    raise ShowError(f"no pack has key {shown!r} ({loader.num_packs} packs)")


def vision_ids(tokenizer: LongVitaTokenizer) -> VisionIds:
    """The wrapper ids of `tokenizer`'s media blocks and all its added (special) ids."""
    special = tokenizer.special_ids
    added = tokenizer.backend.get_added_tokens_decoder()
    return VisionIds(
        wrappers=frozenset(getattr(special, name) for name in WRAPPER_FIELDS),
        specials=frozenset(added),
    )


def read_view(
    loader: ShardLoader, tokenizer: LongVitaTokenizer, index: int, *, with_tiles: bool = False
) -> ShownPack:
    """Pack `index` of the build, read and checked by `loader`, cut by `describe_pack`."""
    pack: Pack = loader.read_pack(index)
    try:
        documents = describe_pack(
            pack.input_ids,
            pack.labels,
            pack.cu_seqlens,
            pack.meta,
            pack.placeholders,
            decode=tokenizer.decode,
            ids=vision_ids(tokenizer),
        )
    except (KeyError, IndexError, TypeError, ValueError) as error:
        raise LoaderError(f"{pack.where}: meta.json and the tokens disagree: {error}") from None
    shard, _ = loader.locate(index)
    view = PackView(
        build=str(loader.root),
        shard=loader.shard_names[shard],
        key=pack.key,
        pack_index=index,
        num_packs=loader.num_packs,
        seq_len=loader.seq_len,
        documents=documents,
    )
    tiles = loader.assemble([pack]).pixel_values if with_tiles else None
    return ShownPack(view, tiles)


def show_pack(
    build: str | os.PathLike[str],
    *,
    pack: int | None = None,
    key: str | None = None,
    with_tiles: bool = False,
) -> ShownPack:
    """Open `build` and read one pack (`find_pack`, `read_view`)."""
    loader, tokenizer = open_build(build)
    try:
        return read_view(
            loader, tokenizer, find_pack(loader, pack=pack, key=key), with_tiles=with_tiles
        )
    finally:
        loader.close()
