"""`lvita stats`, per shard: what the `meta.json` of every packed sequence adds up to.

`scan_shard` walks a shard's tar headers (`lvita_data.shards.tar`, strict: a damaged header is
a `StatsError`, not a silent end of the shard), reads only the `meta.json` member of each pack
(tiles and arrays are skipped) and counts tokens, padding (alignment and tail), samples and
tiles per pack, and per dataset samples, tokens, modalities and video frames. Shard scans are
merged in shard order by `lvita_data.stats.compute`.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field

from lvita_data.errors import ShardFormatError, StatsError
from lvita_data.samples.tiling import TOKENS_PER_TILE
from lvita_data.schema import media_modality
from lvita_data.shards.format import parse_json
from lvita_data.shards.tar import group_samples, scan_tar_file

MAX_META_BYTES = 1 << 20
"""Largest pack meta.json read (lvita writes a few hundred bytes per packed sample)."""


@dataclass(slots=True)
class DatasetScan:
    """What the packed samples of one dataset add up to (within one shard, then merged)."""

    samples: int = 0
    tokens: int = 0
    modalities: Counter = field(default_factory=Counter)
    modality_tokens: Counter = field(default_factory=Counter)
    videos: int = 0
    frames_requested: int = 0
    frames_chosen: int = 0
    videos_fitted: int = 0

    def merge(self, other: DatasetScan) -> None:
        self.samples += other.samples
        self.tokens += other.tokens
        self.modalities.update(other.modalities)
        self.modality_tokens.update(other.modality_tokens)
        self.videos += other.videos
        self.frames_requested += other.frames_requested
        self.frames_chosen += other.frames_chosen
        self.videos_fitted += other.videos_fitted


@dataclass(slots=True)
class ShardScan:
    """What one shard contributes (merged in shard order, so the result never depends on
    the number of worker processes)."""

    name: str
    capacity: int
    packs: int = 0
    tokens: int = 0
    alignment_padding: int = 0
    tail_padding: int = 0
    overfull: int = 0
    samples_per_pack: list[int] = field(default_factory=list)
    tiles_per_pack: list[int] = field(default_factory=list)
    pack_tokens: list[int] = field(default_factory=list)
    sample_lengths: list[int] = field(default_factory=list)
    datasets: dict[str, DatasetScan] = field(default_factory=dict)

    def add_pack(self, meta: dict) -> None:
        """Add one pack's meta (checked by `check_meta` first)."""
        samples = meta.get("samples") or []
        self.packs += 1
        real = sum(int(s["length"]) for s in samples)
        end = max((int(s["offset"]) + int(s["length"]) for s in samples), default=0)
        self.tokens += real
        self.alignment_padding += end - real
        self.tail_padding += self.capacity - end
        self.overfull += end > self.capacity
        self.samples_per_pack.append(len(samples))
        self.tiles_per_pack.append(int(meta.get("num_tiles", 0)))
        self.pack_tokens.append(real)
        for sample in samples:
            length = int(sample["length"])
            self.sample_lengths.append(length)
            scan = self.datasets.setdefault(str(sample["dataset"]), DatasetScan())
            modality = media_modality(
                len(sample.get("images") or ()), len(sample.get("videos") or ())
            )
            scan.samples += 1
            scan.tokens += length
            scan.modalities[modality] += 1
            scan.modality_tokens[modality] += length
            for video in sample.get("videos") or ():
                chosen = len(video.get("frames") or ())
                requested = int(video.get("requested_frames", chosen))
                scan.videos += 1
                scan.frames_requested += requested
                scan.frames_chosen += chosen
                scan.videos_fitted += chosen < requested


def read_pack_metas(path: str | os.PathLike[str]) -> Iterator[tuple[str, dict]]:
    """(key, meta) of every packed sequence of a shard, in tar order: the headers are walked by
    `lvita_data.shards.tar` (strict: a damaged header is an error, not the end of the archive)
    and only the `meta.json` members are read, each at most `MAX_META_BYTES`."""
    try:
        scan = scan_tar_file(path)
        with open(path, "rb") as handle:
            for sample in group_samples(scan, where=os.fspath(path)):
                member = sample.members.get("meta.json")
                if member is None:
                    raise StatsError(f"{path}: sample {sample.key}: no meta.json")
                offset, size = member
                if size > MAX_META_BYTES:
                    raise StatsError(f"{path}: sample {sample.key}: meta.json of {size} bytes")
                handle.seek(sample.start + offset)
                yield sample.key, parse_json(handle.read(size), f"sample {sample.key} meta.json")
    except (OSError, ShardFormatError) as error:
        raise StatsError(f"{path}: cannot read shard: {error}") from None


def check_meta(meta: object, capacity: int) -> str | None:
    """Why a pack's meta.json cannot be counted (None when it can): an object whose
    ``samples`` is a non-empty list of objects with int ``length`` > 0 and ``offset`` >= 0
    ending inside T, a ``dataset``, lists ``images`` / ``videos`` (videos: objects with a list
    ``frames`` and an int ``requested_frames`` >= 0 when present), and an int ``num_tiles`` in
    0..T / 256. A bool is not an int here."""
    if not isinstance(meta, dict):
        return "not an object"
    tiles = meta.get("num_tiles", 0)
    if type(tiles) is not int or not 0 <= tiles <= capacity // TOKENS_PER_TILE:
        return f"num_tiles {tiles!r}"
    samples = meta.get("samples")
    if not isinstance(samples, list) or not samples:
        return "samples is not a non-empty list"
    for number, sample in enumerate(samples):
        if not isinstance(sample, dict) or "dataset" not in sample:
            return f"samples[{number}] is not an object with a dataset"
        length, offset = sample.get("length"), sample.get("offset")
        if type(length) is not int or type(offset) is not int or length < 1 or offset < 0:
            return f"samples[{number}] length {length!r} offset {offset!r}"
        if offset + length > capacity:
            return f"samples[{number}] ends at {offset + length}, past T = {capacity}"
        for media in ("images", "videos"):
            if not isinstance(sample.get(media) or [], list):
                return f"samples[{number}].{media} is not a list"
        for video in sample.get("videos") or ():
            requested = video.get("requested_frames", 0) if isinstance(video, dict) else None
            if not isinstance(video, dict) or not isinstance(video.get("frames") or [], list):
                return f"samples[{number}].videos has an entry without a frame list"
            if type(requested) is not int or requested < 0:
                return f"samples[{number}].videos requested_frames {requested!r}"
    return None


def scan_shard(task: tuple[str, str, int]) -> ShardScan:
    """The `ShardScan` of one shard; `task` is (path, name, T)."""
    path, name, capacity = task
    scan = ShardScan(name=name, capacity=capacity)
    for key, meta in read_pack_metas(path):
        problem = check_meta(meta, capacity)
        if problem is not None:
            raise StatsError(f"{path}: sample {key}: meta.json: {problem}")
        scan.add_pack(meta)
    return scan


__all__ = ["DatasetScan", "ShardScan", "read_pack_metas", "scan_shard"]
