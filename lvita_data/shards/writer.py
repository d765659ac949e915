"""WebDataset shard format of lvita (SHARD FORMAT version 1) and its deterministic writer.

A build directory holds `{stage}-{NNNNNN}.tar` shards; one WebDataset sample per packed sequence,
key `{NNNNNNNNN}` (the global pack index), members (all `.npy` load with allow_pickle=False):
- `input_ids.npy`    int32 [T]  (T = pack.max_seq_len; padding = pad token `<|endoftext|>`)
- `labels.npy`       int32 [T]  unshifted, -100 where not supervised (padding included)
- `position_ids.npy` int32 [T]  restarting per sample when pack.reset_attention, else 0..T-1
- `cu_seqlens.npy`   int32 [n+1] boundaries of the n packed samples, the tail padding accounted to
                     the last one (as the original), so cu_seqlens[-1] == T
- `meta.json`        stage, tile format, and per packed sample: dataset, file, record, length,
                     offset, images (size, grid, tiles), videos (frames chosen / requested, fps)
- `tile000000.png`.. the vision tiles in order of their placeholders in `input_ids` (per image:
                     thumbnail first when tiled, then row-major tiles; per video: one per frame),
                     448x448 RGB, lossless: the loader's normalization reproduces the original's
                     float32 tensors exactly (`lvita_data.media.tiles.normalize_tiles`).
Tars are byte-reproducible: members sorted per sample, mtime 0 (PAX record ``mtime=0.0``),
uid/gid 0, empty user/group names, mode 0444, samples in pack order (`tar_header`). The writer is
our own (`_TarWriter`), byte-identical to webdataset's TarWriter with those settings, because
importing webdataset imports torch (3 s per process and per worker). Every file of a build
(shards, JSON, text) is written to a temporary name (`temporary_name`:
``{path}.tmp-{pid}-{random}``, recognised by `TEMP_MARKER`), flushed to disk and renamed over its
final name, so a reader (or a killed writer) never sees a partial file; the temporary is removed
if writing fails.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import secrets
import tarfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass

import numpy as np

SHARD_FORMAT_VERSION = 1
ARRAY_MEMBERS = ("input_ids", "labels", "position_ids", "cu_seqlens")
TEMP_MARKER = ".tmp-"
"""Part of every temporary file name (`temporary_name`); `*.tmp-*` files are leftovers."""


def shard_name(stage: str, index: int) -> str:
    return f"{stage}-{index:06d}.tar"


def sample_key(pack_index: int) -> str:
    return f"{pack_index:09d}"


def tile_member(index: int, tile_format: str) -> str:
    return f"tile{index:06d}.{tile_format}"


def npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


def load_npy(data: bytes) -> np.ndarray:
    return np.load(io.BytesIO(data), allow_pickle=False)


@dataclass(frozen=True, slots=True)
class ShardInfo:
    name: str
    samples: int
    tokens: int
    """Real (non-padding) tokens of the packed samples in this shard."""
    bytes: int
    sha256: str

    def to_json(self) -> dict:
        return asdict(self)


def sha256_file(path: str, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def temporary_name(path: str) -> str:
    """A temporary name next to `path`, unique per process and call."""
    return f"{path}{TEMP_MARKER}{os.getpid()}-{secrets.token_hex(4)}"


@contextmanager
def _atomic(path: str, mode: str, **kwargs) -> Iterator:
    """Open a temporary file for `path`; on success fsync it and rename it to `path`."""
    temporary = temporary_name(path)
    try:
        with open(temporary, mode, **kwargs) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise


TAR_HEADER = {"format": "pax", "mtime": 0.0, "mode": 0o444, "uid": 0, "gid": 0, "owner": ""}
"""Header fields of every member. The float mtime makes `tarfile` add a PAX record
(``mtime=0.0``) before each member: 1 KiB per member, kept so that shards stay byte-identical
to those of webdataset's writer, which the format was defined with."""


def tar_header(name: str, size: int) -> bytes:
    """Header block(s) of one member, PAX record included (`TAR_HEADER`)."""
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = size, TAR_HEADER["mtime"], TAR_HEADER["mode"]
    info.uid, info.gid = TAR_HEADER["uid"], TAR_HEADER["gid"]
    info.uname = info.gname = TAR_HEADER["owner"]
    return info.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape")


class _TarWriter:
    """A minimal, reproducible tar writer, byte for byte what ``webdataset.TarWriter(...,
    user="", group="", mode=0o444, mtime=0.0)`` writes (`TAR_HEADER`), without importing
    webdataset (which imports torch). It hashes and counts what it writes, so a shard is never
    read back to checksum it."""

    def __init__(self, handle) -> None:
        self._handle = handle
        self.digest = hashlib.sha256()
        self.size = 0

    def _write(self, data: bytes) -> None:
        self.digest.update(data)
        self._handle.write(data)
        self.size += len(data)

    def add(self, name: str, data: bytes) -> None:
        self._write(tar_header(name, len(data)))
        self._write(data)
        self._write(bytes(-len(data) % tarfile.BLOCKSIZE))

    def write_sample(self, sample: dict[str, bytes]) -> None:
        """Members ``{key}.{name}`` in sorted name order (as WebDataset's TarWriter)."""
        key = sample["__key__"]
        for name in sorted(sample):
            if name != "__key__":
                self.add(f"{key}.{name}", sample[name])

    def close(self) -> None:
        self._write(bytes(2 * tarfile.BLOCKSIZE))
        self._write(bytes(-self.size % tarfile.RECORDSIZE))


def write_shard(
    path: str, samples: Iterable[dict[str, bytes]], *, real_tokens: int = 0
) -> ShardInfo:
    """Write WebDataset samples ({"__key__": key, member: bytes}) atomically and reproducibly.

    `samples` may be a generator; `real_tokens` is stored as is in the returned `ShardInfo`.
    """
    count = 0
    with _atomic(path, "wb", buffering=1 << 20) as handle:
        writer = _TarWriter(handle)
        for sample in samples:
            writer.write_sample(sample)
            count += 1
        writer.close()
    return ShardInfo(
        name=os.path.basename(path),
        samples=count,
        tokens=real_tokens,
        bytes=writer.size,
        sha256=writer.digest.hexdigest(),
    )


def write_bytes_atomic(path: str, data: bytes) -> None:
    with _atomic(path, "wb") as handle:
        handle.write(data)


def write_json_atomic(path: str, payload, *, indent: int | None = 1) -> None:
    """JSON (keys in insertion order, UTF-8, trailing newline), written atomically."""
    with _atomic(path, "w", encoding="utf-8") as handle:
        json.dump(payload, handle, ensure_ascii=False, indent=indent, sort_keys=False)
        handle.write("\n")


def write_text_atomic(path: str, text: str) -> None:
    with _atomic(path, "w", encoding="utf-8") as handle:
        handle.write(text)
