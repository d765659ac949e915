"""The schema of a build's `index.json`, checked by every reader before it uses the file.

The loader, `lvita verify` and `lvita stats` read `index.json` themselves (each with its own
size bound and error type) and then call `check_index`, which raises `ShardFormatError` naming
the field; each reader turns that into its own error (`LoaderError`, a verify problem,
`StatsError`).
"""

from __future__ import annotations

from pathlib import Path

from lvita_data.errors import ShardFormatError
from lvita_data.shards.format import SHARD_FORMATS
from lvita_data.shards.tar import BLOCK, plain_name

MAX_SEQ_LEN = 1 << 24
"""Largest ``max_seq_len`` an index.json may state (16M tokens; Long-VITA trains at 1M)."""
MAX_INDEX_BYTES = 64 << 20
"""Largest index.json read (about 200 bytes per shard: 300,000 shards)."""


def check_index(path: Path, index: object) -> dict:
    """`index.json` against its schema, before anything is used: an object with ``format`` (one
    of `SHARD_FORMATS`), ``stage`` (a string), ``max_seq_len`` (an int in 1..`MAX_SEQ_LEN`) and
    a non-empty list ``shards`` of objects with a plain, unique file ``name`` and ints
    ``samples`` >= 0 and ``bytes`` >= 512 * samples (every sample has a header block). A bool is
    not an int here. `ShardFormatError` naming the field otherwise."""

    def fail(field: str, value: object) -> ShardFormatError:
        shown = str(value)[:80]
        return ShardFormatError(f"{path}: {field} is {shown!r}, not what the format allows")

    if not isinstance(index, dict):
        raise fail("the document", type(index).__name__)
    version = index.get("format")
    if type(version) is not int or version not in SHARD_FORMATS:
        raise ShardFormatError(f"{path}: shard format {version!r}, lvita reads {SHARD_FORMATS}")
    if not isinstance(index.get("stage"), str):
        raise fail("stage", index.get("stage"))
    seq_len = index.get("max_seq_len")
    if type(seq_len) is not int or not 0 < seq_len <= MAX_SEQ_LEN:
        raise fail("max_seq_len", seq_len)
    shards = index.get("shards")
    if not isinstance(shards, list) or not shards:
        raise ShardFormatError(f"{path}: no shards")
    names = set()
    for number, shard in enumerate(shards):
        if not isinstance(shard, dict):
            raise fail(f"shards[{number}]", shard)
        name, samples, size = shard.get("name"), shard.get("samples"), shard.get("bytes")
        if not isinstance(name, str) or not plain_name(name) or name in names:
            raise ShardFormatError(
                f"{path}: shards[{number}].name {str(name)[:80]!r} is not a file name in the "
                "build (plain and unique)"
            )
        names.add(name)
        if type(samples) is not int or samples < 0:
            raise fail(f"shards[{number}].samples", samples)
        if type(size) is not int or size < BLOCK * samples:
            raise fail(f"shards[{number}].bytes", size)
    return index


__all__ = ["MAX_INDEX_BYTES", "MAX_SEQ_LEN", "check_index"]
