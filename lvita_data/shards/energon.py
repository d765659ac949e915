"""Megatron-Energon metadata for a build directory, written by lvita (no `energon prepare`).

What Energon 7.x reads from a prepared WebDataset directory (megatron-energon 7.4.1 source:
`flavors/webdataset/{prepare,metadata,indexing,itar,itar_reader,structs,config}.py`):
- `.nv-meta/dataset.yaml`: Energon's standard factory with lvita's sample type, sample loader
  and part filter (`DATASET_YAML`, the types of `lvita_data.energon`): each sample is one
  checked pack, batched into lvita's `PackedBatch`; `energon info` names the sample type and
  `energon lint` reads every pack through the training loader's checks. Parsed strictly. The
  raw route (`CRUDE_DATASET_YAML`: a `CrudeWebdataset` of member bytes for a task encoder's
  cookers, subflavor `lvita: packed`) is not written; save it as `.nv-meta/crude.yaml` and
  pass `dataset_config="crude.yaml"` to use it.
- `.nv-meta/.info.json`: `{"energon_version"?: str, "shard_counts": {shard: samples}}`, parsed
  strictly (no other keys). Its key order defines the `tar_file_id` of each shard.
- `.nv-meta/split.yaml`: `split_parts: {train: [shards...], val: [], test: []}` (names are
  brace-expanded; `energon lint` checks the three parts and skips an empty one, a missing one
  fails it) and `exclude: []`.
- `{shard}.tar.idx` next to each shard: little-endian uint64 byte offsets (native `struct` "Q")
  of each sample's first header block, then the offset of the end-of-archive marker (n + 1
  entries). The plain loader (`get_train_dataset` / `get_val_dataset` on the directory, via
  `ShardInfosITarReader`) cannot open a shard without it; `energon lint` checks its length.
- `.nv-meta/index.sqlite`: tables `samples(tar_file_id, sample_key UNIQUE, sample_index,
  byte_offset, byte_size)` and `sample_parts(tar_file_id, sample_index, part_name,
  content_byte_offset, content_byte_size)` with three indexes; needed for access by key
  (metadataset `aux` references, joins, `energon mount`/`preview`). A sample's byte_size runs to
  the next sample (or to the end marker); a part's offset and size are its data's.
- `.nv-meta/index.uuid`: an id of the index, used in cache keys of joined datasets. `energon
  prepare` writes a random uuid4; lvita derives a uuid5 from the index content, so the whole
  directory stays byte-reproducible (same SQLite library assumed for `index.sqlite`).
Offsets come from lvita's own tar parser (`lvita_data.shards.tar.scan_tar`), which agrees with
`tarfile` on intact archives. A shard without samples is listed in `.info.json` but left out of
the train split (Energon refuses empty shards when it prepares a directory itself).
"""

from __future__ import annotations

import hashlib
import itertools
import json
import mmap
import os
import re
import sqlite3
import struct
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import yaml

from lvita_data.errors import EnergonMetadataError
from lvita_data.fileio import temporary_name, write_bytes_atomic, write_text_atomic
from lvita_data.shards.tar import TarScan, scan_tar, split_member_name

MAIN_FOLDER = ".nv-meta"
ITAR_SUFFIX = ".idx"
"""Energon's `Path(shard).with_suffix(".tar.idx")` for a `*.tar` shard."""
DATASET_YAML = """\
sample_type:
  __module__: lvita_data.energon
  __class__: PackedSample
sample_loader:
  __module__: lvita_data.energon
  __class__: PackLoader
part_filter:
  __module__: lvita_data.energon
  __class__: AllParts
decoder: null
subflavors:
  lvita: packed
"""
"""The build's `dataset.yaml`: samples are `lvita_data.energon.PackedSample` (Energon imports
lvita's types; ``decoder: null`` hands the loader each member's bytes)."""
CRUDE_DATASET_YAML = (
    "__module__: megatron.energon\n__class__: CrudeWebdataset\nsubflavors:\n  lvita: packed\n"
)
"""A `CrudeWebdataset` view of the same build (dicts of member bytes), for cookers."""
INDEX_NAMESPACE = uuid.UUID("6f1c1d0e-3b1a-5c55-9a53-6c7669746131")

# Statements as Energon's SqliteIndexWriter issues them (sqlite_master keeps their text).
_CREATE_SAMPLES = """
                CREATE TABLE IF NOT EXISTS samples (
                    tar_file_id INTEGER NOT NULL,
                    sample_key TEXT NOT NULL UNIQUE,
                    sample_index INTEGER NOT NULL,
                    byte_offset INTEGER,
                    byte_size INTEGER
                )
                """
_CREATE_PARTS = """
                CREATE TABLE IF NOT EXISTS sample_parts (
                    tar_file_id INTEGER,
                    sample_index INTEGER,
                    part_name TEXT,
                    content_byte_offset INTEGER,
                    content_byte_size INTEGER
                )
                """
_CREATE_INDEXES = (
    "CREATE INDEX IF NOT EXISTS idx_samples_by_tar_and_idx ON samples(tar_file_id, sample_index)",
    "CREATE INDEX IF NOT EXISTS idx_sample_parts_seq ON sample_parts(tar_file_id, sample_index, "
    "content_byte_offset)",
    "CREATE INDEX IF NOT EXISTS idx_sample_parts_full ON sample_parts(tar_file_id, sample_index, "
    "part_name, content_byte_offset, content_byte_size)",
)


class _ShardLike(Protocol):
    name: str
    samples: int


@dataclass(frozen=True, slots=True)
class SampleLayout:
    key: str
    offset: int
    """Offset of the sample's first header block."""
    size: int
    """Bytes up to the next sample (or the end-of-archive marker)."""
    parts: tuple[tuple[str, int, int], ...]
    """(part name, data offset, data size) per member, in tar order."""


@dataclass(frozen=True, slots=True)
class ShardLayout:
    name: str
    samples: tuple[SampleLayout, ...]
    end: int
    """Offset of the end-of-archive marker."""

    def itar_bytes(self) -> bytes:
        offsets = [s.offset for s in self.samples] + [self.end]
        return struct.pack(f"{len(offsets)}Q", *offsets)


def layout_from_scan(name: str, scan: TarScan) -> ShardLayout:
    """Group scanned members into samples as Energon's `prepare` does (consecutive keys)."""
    groups: list[tuple[str, int, list[tuple[str, int, int]]]] = []
    for member in scan.members:
        key, part = split_member_name(member.name)
        if not groups or groups[-1][0] != key:
            groups.append((key, member.header_offset, []))
        groups[-1][2].append((part, member.data_offset, member.size))
    bounds = [offset for _, offset, _ in groups[1:]] + [scan.end]
    samples = tuple(
        SampleLayout(key, offset, stop - offset, tuple(parts))
        for (key, offset, parts), stop in zip(groups, bounds, strict=True)
    )
    return ShardLayout(name, samples, scan.end)


def read_layout(path: str | os.PathLike[str]) -> ShardLayout:
    """Sample offsets of one shard; raises `EnergonMetadataError` if the tar is damaged."""
    path = Path(path)
    with open(path, "rb") as handle:
        if os.fstat(handle.fileno()).st_size == 0:
            raise EnergonMetadataError(f"{path}: empty file")
        with mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as data:
            scan = scan_tar(data, canonical=False)
    if scan.problems:
        first = scan.problems[0]
        raise EnergonMetadataError(f"{path}: byte {first.offset}: {first.message}")
    return layout_from_scan(path.name, scan)


def _sample_rows(tar_id: int, layout: ShardLayout) -> list[tuple[int, str, int, int, int]]:
    return [(tar_id, s.key, index, s.offset, s.size) for index, s in enumerate(layout.samples)]


def _part_rows(tar_id: int, layout: ShardLayout) -> list[tuple[int, int, str, int, int]]:
    return [
        (tar_id, index, part, offset, size)
        for index, s in enumerate(layout.samples)
        for part, offset, size in s.parts
    ]


class _IndexDigest:
    """The uuid5 of the index content, fed one shard at a time (names, sample and part offsets):
    reproducible, and a build never holds the layouts of all its shards at once."""

    def __init__(self) -> None:
        self._digest = hashlib.sha256()

    def add(self, tar_id: int, layout: ShardLayout) -> None:
        self._digest.update(layout.name.encode() + b"\0" + layout.itar_bytes())
        self._digest.update(json.dumps(_part_rows(tar_id, layout)).encode())

    def uuid(self) -> str:
        return str(uuid.uuid5(INDEX_NAMESPACE, self._digest.hexdigest()))


def index_uuid(layouts: Sequence[ShardLayout]) -> str:
    """A uuid5 of the index content (names, sample and part offsets): reproducible."""
    digest = _IndexDigest()
    for tar_id, layout in enumerate(layouts):
        digest.add(tar_id, layout)
    return digest.uuid()


class _SqliteIndex:
    """Energon's `index.sqlite`, written under a temporary name one shard at a time, indexed
    and renamed into place by `commit`."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.temporary = Path(temporary_name(str(path)))
        self.db = sqlite3.connect(self.temporary)
        self.db.execute(_CREATE_SAMPLES)
        self.db.execute(_CREATE_PARTS)

    def add(self, tar_id: int, layout: ShardLayout) -> None:
        try:
            self.db.executemany(
                "INSERT INTO samples (tar_file_id, sample_key, sample_index, byte_offset, "
                "byte_size) VALUES (?, ?, ?, ?, ?)",
                _sample_rows(tar_id, layout),
            )
        except sqlite3.IntegrityError as error:
            raise EnergonMetadataError(f"duplicate sample key across shards: {error}") from None
        self.db.executemany(
            "INSERT INTO sample_parts (tar_file_id, sample_index, part_name, "
            "content_byte_offset, content_byte_size) VALUES (?, ?, ?, ?, ?)",
            _part_rows(tar_id, layout),
        )

    def commit(self) -> None:
        for statement in _CREATE_INDEXES:
            self.db.execute(statement)
        self.db.commit()
        self.db.close()
        with open(self.temporary, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(self.temporary, self.path)

    def abandon(self) -> None:
        self.db.close()
        for leftover in (self.temporary, Path(f"{self.temporary}-journal")):
            leftover.unlink(missing_ok=True)


def write_energon_metadata(
    out_dir: str | os.PathLike[str],
    shards: Sequence[_ShardLike],
    *,
    layouts: Sequence[ShardLayout] | None = None,
) -> None:
    """Write `.nv-meta/` and the `{shard}.tar.idx` files for the shards (in index order).

    `shards` need `.name` (relative to out_dir) and `.samples` (checked against the tars);
    pass `layouts` to skip re-reading the tars. Shards are read and indexed one at a time (the
    memory of one shard's layout, not of the build's). Every file is written atomically.
    """
    out = Path(out_dir)
    meta = out / MAIN_FOLDER
    meta.mkdir(exist_ok=True)
    index = _SqliteIndex(meta / "index.sqlite")
    digest = _IndexDigest()
    try:
        for tar_id, shard in enumerate(shards):
            layout = read_layout(out / shard.name) if layouts is None else layouts[tar_id]
            if shard.name != layout.name or shard.samples != len(layout.samples):
                raise EnergonMetadataError(
                    f"{shard.name}: {len(layout.samples)} samples in the tar, "
                    f"{shard.samples} expected"
                )
            write_bytes_atomic(out / f"{layout.name}{ITAR_SUFFIX}", layout.itar_bytes())
            index.add(tar_id, layout)
            digest.add(tar_id, layout)
        index.commit()
    except BaseException:
        index.abandon()
        raise
    write_text_atomic(str(meta / "index.uuid"), digest.uuid())
    info = {"shard_counts": {shard.name: shard.samples for shard in shards}}
    write_text_atomic(str(meta / ".info.json"), json.dumps(info, indent=2) + "\n")
    split = {
        "split_parts": {
            "train": [shard.name for shard in shards if shard.samples],
            "val": [],
            "test": [],
        },
        "exclude": [],
    }
    write_text_atomic(str(meta / "split.yaml"), yaml.safe_dump(split, sort_keys=False))
    write_text_atomic(str(meta / "dataset.yaml"), DATASET_YAML)


MAX_META_FILE = 16 << 20
"""Largest `.nv-meta` text file read (`.info.json` of 100,000 shards is ~5 MB)."""


def _read_small(path: Path) -> str:
    """A metadata file's text, at most `MAX_META_FILE` bytes (`ValueError` past that)."""
    with open(path, "rb") as handle:
        data = handle.read(MAX_META_FILE + 1)
    if len(data) > MAX_META_FILE:
        raise ValueError(f"{path.name} is larger than {MAX_META_FILE} bytes")
    return data.decode("utf-8")


_BRACE_RANGE = re.compile(r"\{(-?\d+)\.\.(-?\d+)(?:\.\.-?\d+)?\}|\{([^.{}])\.\.([^.{}])\}")


def _expansion_bound(pattern: str) -> int:
    """An upper bound of the names a brace pattern expands to (each range and each comma
    group multiplies), computed without expanding it."""
    bound = 1
    for match in _BRACE_RANGE.finditer(pattern):
        if match.group(1) is not None:
            bound *= abs(int(match.group(2)) - int(match.group(1))) + 1
        else:
            bound *= abs(ord(match.group(4)) - ord(match.group(3))) + 1
    return bound * (pattern.count(",") + 1)


def check_energon_metadata(
    out_dir: str | os.PathLike[str], layouts: Sequence[ShardLayout]
) -> list[str]:
    """Problems of an existing `.nv-meta/` (ours or `energon prepare`'s) against the tars."""
    import braceexpand

    out = Path(out_dir)
    meta = out / MAIN_FOLDER
    problems: list[str] = []
    names = [layout.name for layout in layouts]
    try:
        info = json.loads(_read_small(meta / ".info.json"))
        counts = dict(info["shard_counts"])
        if set(info) - {"energon_version", "shard_counts"}:
            problems.append(f".info.json has keys Energon rejects: {sorted(info)}")
        expected = {layout.name: len(layout.samples) for layout in layouts}
        if list(counts.items()) != list(expected.items()):
            problems.append(".info.json shard_counts differ from the shards (names, order, counts)")
    except (OSError, ValueError, KeyError, TypeError, RecursionError) as error:
        problems.append(f".info.json unreadable: {error!r}")
    try:
        split = yaml.safe_load(_read_small(meta / "split.yaml"))
        # brace patterns expand combinatorially ("{1..99999999}"): stop past what could match
        most = len(names) + 1
        listed = set()
        for part in split["split_parts"].values():
            for pattern in part:
                if _expansion_bound(str(pattern)) > most:  # braceexpand materializes ranges
                    raise ValueError(f"pattern {str(pattern)[:60]!r} expands past {most} names")
                for name in itertools.islice(braceexpand.braceexpand(str(pattern)), most + 1):
                    listed.add(name)
                if len(listed) > most:
                    raise ValueError(f"its patterns expand to more than {most} names")
        if listed - set(names):
            problems.append(f"split.yaml lists unknown shards: {sorted(listed - set(names))[:5]}")
        unlisted = {layout.name for layout in layouts if layout.samples} - listed
        if unlisted:
            problems.append(f"split.yaml leaves out shards: {sorted(unlisted)[:5]}")
    except (OSError, ValueError, KeyError, TypeError, AttributeError, yaml.YAMLError) as error:
        problems.append(f"split.yaml unreadable: {error!r}")
    except RecursionError:
        problems.append("split.yaml unreadable: nested too deep")
    try:
        dataset = yaml.safe_load(_read_small(meta / "dataset.yaml"))
        if not isinstance(dataset, dict) or not (
            "__class__" in dataset or "sample_type" in dataset
        ):
            problems.append("dataset.yaml names no Energon dataset class or sample type")
    except (OSError, ValueError, yaml.YAMLError) as error:
        problems.append(f"dataset.yaml unreadable: {error!r}")
    except RecursionError:
        problems.append("dataset.yaml unreadable: nested too deep")
    for layout in layouts:
        path = out / f"{layout.name}{ITAR_SUFFIX}"
        expected = layout.itar_bytes()
        try:
            if path.stat().st_size != len(expected) or path.read_bytes() != expected:
                problems.append(f"{path.name}: sample offsets differ from the tar")
        except OSError:
            problems.append(f"{path.name} is missing (Energon cannot open {layout.name})")
    try:
        uuid.UUID(_read_small(meta / "index.uuid").strip())
    except (OSError, ValueError):
        problems.append("index.uuid is missing or not a UUID")
    sqlite_path = meta / "index.sqlite"
    if not sqlite_path.is_file():
        problems.append("index.sqlite is missing")
        return problems
    try:
        db = sqlite3.connect(f"file:{sqlite_path}?mode=ro&immutable=1", uri=True)
        try:
            samples = db.execute(
                "SELECT tar_file_id, sample_key, sample_index, byte_offset, byte_size FROM samples "
                "ORDER BY tar_file_id, sample_index"
            ).fetchall()
            parts = db.execute(
                "SELECT tar_file_id, sample_index, part_name, content_byte_offset, "
                "content_byte_size FROM sample_parts "
                "ORDER BY tar_file_id, sample_index, content_byte_offset"
            ).fetchall()
        finally:
            db.close()
    except sqlite3.Error as error:
        problems.append(f"index.sqlite unreadable: {error}")
        return problems
    if samples != [row for i, layout in enumerate(layouts) for row in _sample_rows(i, layout)]:
        problems.append("index.sqlite samples table differs from the tars")
    if parts != [row for i, layout in enumerate(layouts) for row in _part_rows(i, layout)]:
        problems.append("index.sqlite sample_parts table differs from the tars")
    return problems


__all__ = [
    "CRUDE_DATASET_YAML",
    "DATASET_YAML",
    "EnergonMetadataError",
    "ShardLayout",
    "SampleLayout",
    "check_energon_metadata",
    "index_uuid",
    "layout_from_scan",
    "read_layout",
    "write_energon_metadata",
]
