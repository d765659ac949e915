"""One shard task: read, tokenize, tile and pack its samples, write the tar and its record.

A task (`ShardTask`: the shard's own slice of the build plan's columns) runs in the build process, a
local pool worker or a Ray worker (`lvita_data.pool.map_tasks`, with the `BuildContext` sent once
per worker). It reads its records once each in (file, row) order and tokenizes them
(`lvita_data.samples.read`), decodes and tiles the pixels (the only place pixels are touched),
assembles the packs (`lvita_data.packing.assemble`), writes the tar under a temporary name and
renames it (`lvita_data.shards.writer`), then writes its completion record
``.lvita-build/done/{shard}.json`` (atomically too) and returns it as a plain dict: the shard's
`ShardInfo`, the rejects found while building, and each pack's `sample_digest`. A sample whose
pixels fail to decode here (e.g. a JPEG truncated after a valid header) leaves its pack with a
counted reject. Shard bytes depend only on the build plan, never on the worker count, the
executor or the order tasks finish in.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from functools import lru_cache

import numpy as np

from lvita_data.build.layout import FileRef
from lvita_data.errors import SkipSample
from lvita_data.fileio import write_json_atomic
from lvita_data.manifest import ShardConfig, StageManifest
from lvita_data.media.source import read_source_image
from lvita_data.media.tiles import encode_tiles, sample_tiles, video_tiles
from lvita_data.packing.assemble import assemble_pack
from lvita_data.records import open_source
from lvita_data.samples.read import Row, read_and_tokenize, tokenizer_and_template
from lvita_data.samples.tokenize import SampleRules, tokenize_record
from lvita_data.schema import Reject, TokenizedSample
from lvita_data.shards.format import (
    ARRAY_MEMBERS,
    ARRAYS_NPZ,
    MEDIA_TAR,
    WRITTEN_FORMAT,
    image_member,
    media_tar_bytes,
    meta_bytes,
    npz_bytes,
    sample_digest,
    sample_key,
    tile_member,
)
from lvita_data.shards.writer import write_shard


@dataclass(frozen=True, slots=True)
class BuildContext:
    """What every shard task of a build shares (sent once per worker, not once per task)."""

    files: list[FileRef]
    manifest: StageManifest


@dataclass(frozen=True, slots=True)
class ShardTask:
    index: int
    path: str
    done_path: str
    sample_file: np.ndarray
    """int32: file index of each sample of the shard, pack after pack."""
    sample_row: np.ndarray
    """int64: its row."""
    sample_offset: np.ndarray
    """int64: where the row starts in its file (-1: read by row number)."""
    pack_starts: np.ndarray
    """int64 [packs + 1], from 0: pack p holds samples ``pack_starts[p]:pack_starts[p + 1]``."""
    pack_offset: int

    @property
    def packs(self) -> list[list[tuple[int, int]]]:
        """(file index, row) of each sample, per pack."""
        pairs = list(zip(self.sample_file.tolist(), self.sample_row.tolist(), strict=True))
        bounds = self.pack_starts.tolist()
        return [pairs[begin:end] for begin, end in zip(bounds, bounds[1:], strict=False)]


@lru_cache(maxsize=16)
def _open_cached(ref: FileRef, identity: tuple[int, int, int]):
    del identity  # part of the cache key only: a file changed on disk is opened again
    return open_source(ref.path, fmt=ref.format, dataset=ref.dataset, media_root=ref.media_root)


def _open(ref: FileRef):
    try:
        stat = os.stat(ref.path)
        identity = (stat.st_ino, stat.st_size, stat.st_mtime_ns)
    except OSError:
        identity = (0, 0, 0)  # open_source reports the problem
    return _open_cached(ref, identity)


@dataclass(frozen=True, slots=True)
class SamplePixels:
    """What a sample puts into its pack's `media.tar` besides its ids: stored tiles in
    placeholder order (every tile with ``image_storage: tiles``, else the video frames) and,
    with ``source``, the (bytes, extension) of each of its images."""

    tiles: list[bytes]
    images: list[tuple[bytes, str]]


def sample_pixels(sample: TokenizedSample, shards: ShardConfig) -> SamplePixels:
    """Decode, tile and encode what the storage stores (the only place pixels are touched);
    `SkipSample` for an image or video that cannot be used."""
    if shards.image_storage == "tiles":
        return SamplePixels(encode_tiles(sample_tiles(sample), fmt=shards.tile_format), [])
    images = [read_source_image(plan) for plan in sample.plan.images]
    frames = [
        tile
        for kind, index in sample.media_order
        if kind == "video"
        for tile in video_tiles(sample.plan.videos[index])
    ]
    return SamplePixels(encode_tiles(frames, fmt=shards.tile_format), images)


def _sample_meta(
    sample: TokenizedSample, ref: FileRef, offset: int, image_members: Sequence[str]
) -> dict:
    images = [
        {"size": [p.width, p.height], "grid": list(p.grid), "tiles": p.num_tiles}
        for p in sample.plan.images
    ]
    for image, member in zip(images, image_members, strict=False):
        image["member"] = member
    return {
        "dataset": sample.dataset,
        "file": ref.path,
        "record": sample.record_id,
        "length": sample.plan.length,
        "offset": offset,
        "num_tiles": sample.plan.num_tiles,
        "media_order": [{"kind": kind, "index": index} for kind, index in sample.media_order],
        "images": images,
        "videos": [
            {
                "frames": list(v.frame_indices),
                "requested_frames": v.requested_frames,
                "source_frames": v.num_source_frames,
                "fps": v.fps,
            }
            for v in sample.plan.videos
        ],
    }


def _pack_sample(
    key: str,
    members: Sequence[tuple[TokenizedSample, FileRef, SamplePixels]],
    manifest: StageManifest,
    pad_id: int,
) -> tuple[dict[str, bytes], int]:
    config = manifest.pack
    arrays = assemble_pack(
        [(s.input_ids, s.labels) for s, _, _ in members],
        capacity=config.max_seq_len,
        pad_id=pad_id,
        reset_positions=config.reset_attention,
        align=config.align,
    )
    tile_format = manifest.shards.tile_format
    out: dict[str, bytes] = {"__key__": key}  # type: ignore[dict-item]
    out[ARRAYS_NPZ] = npz_bytes({name: getattr(arrays, name) for name in ARRAY_MEMBERS})
    media: dict[str, bytes] = {}
    metas, tile_index = [], 0
    image_names: dict[bytes, str] = {}  # sha256 of the bytes -> member: each image stored once
    for (sample, ref, pixels), offset in zip(members, arrays.cu_seqlens[:-1].tolist(), strict=True):
        names = []
        for data, extension in pixels.images:
            digest = hashlib.sha256(data).digest()
            if digest not in image_names:
                image_names[digest] = image_member(len(image_names), extension)
                media[image_names[digest]] = data
            names.append(image_names[digest])
        metas.append(_sample_meta(sample, ref, offset, names))
        for blob in pixels.tiles:
            media[tile_member(tile_index, tile_format)] = blob
            tile_index += 1
    meta = {
        "stage": manifest.stage,
        "format": WRITTEN_FORMAT,
        "tile_format": tile_format,
        "num_tiles": sum(s.plan.num_tiles for s, _, _ in members),
        "stored_tiles": tile_index,
        "samples": metas,
    }
    out[MEDIA_TAR] = media_tar_bytes(media)
    out["meta.json"] = meta_bytes(meta)
    return out, sum(s.plan.length for s, _, _ in members)


def _tokenized_samples(
    task: ShardTask, context: BuildContext, tokenizer, rules: SampleRules
) -> dict[tuple[int, int], TokenizedSample | Reject]:
    """Every distinct record of the shard, read in (file, row) order (each file and parquet row
    group once) and tokenized in batches; a record that fails becomes its `Reject`."""
    located = zip(
        task.sample_file.tolist(),
        task.sample_row.tolist(),
        task.sample_offset.tolist(),
        strict=True,
    )
    rows = (
        Row(
            (file_index, row),
            _open(context.files[file_index]),
            context.files[file_index].path,
            row,
            offset,
        )
        for file_index, row, offset in sorted(set(located))
    )
    return dict(
        read_and_tokenize(
            rows, tokenizer, lambda record, contents: tokenize_record(record, contents, rules)
        )
    )


def build_shard(task: ShardTask, context: BuildContext) -> dict:
    """Write one shard and its completion record; returns the record (a plain dict)."""
    manifest = context.manifest
    tokenizer, template = tokenizer_and_template(manifest.tokenizer)
    rules = SampleRules.from_manifest(manifest, template)
    samples = _tokenized_samples(task, context, tokenizer, rules)
    rejects: list[Reject] = []
    digests: dict[str, str] = {}
    real_tokens = 0

    def packed_samples() -> Iterator[dict[str, bytes]]:
        nonlocal real_tokens
        for pack_number, pack in enumerate(task.packs):
            members = []
            for file_index, row in pack:
                ref, sample = context.files[file_index], samples[file_index, row]
                if isinstance(sample, Reject):
                    rejects.append(replace(sample, phase="build"))
                    continue
                try:
                    pixels = sample_pixels(sample, manifest.shards)
                except SkipSample as skip:
                    reject = Row((file_index, row), _open(ref), ref.path, row).reject(skip)
                    rejects.append(replace(reject, phase="build"))
                    continue
                members.append((sample, ref, pixels))
            if members:
                key = sample_key(task.pack_offset + pack_number)
                packed, tokens = _pack_sample(key, members, manifest, tokenizer.special_ids.pad)
                real_tokens += tokens
                digests[key] = sample_digest(packed)
                yield packed

    info = write_shard(task.path, packed_samples())
    info = replace(info, tokens=real_tokens)
    record = {
        "shard": info.to_json(),
        "rejects": [r.to_json() for r in rejects],
        "digests": digests,
    }
    write_json_atomic(task.done_path, record)
    return record


def is_done(task: ShardTask) -> bool:
    """The shard's completion record exists and names the shard file at its recorded size."""
    try:
        with open(task.done_path, encoding="utf-8") as handle:
            shard = json.load(handle)["shard"]
        return shard["name"] == os.path.basename(task.path) and (
            os.path.getsize(task.path) == shard["bytes"]
        )
    except (OSError, ValueError, KeyError, TypeError):
        return False
