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
                     float32 tensors exactly (`lvita_data.pixels.normalize_tiles`).
Tars are byte-reproducible: members sorted per sample, mtime 0, uid/gid 0, empty user/group
names, mode 0444, samples in pack order. Every shard is written to a temporary name and renamed.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from collections.abc import Iterable
from dataclasses import asdict, dataclass

import numpy as np
import webdataset as wds

SHARD_FORMAT_VERSION = 1
ARRAY_MEMBERS = ("input_ids", "labels", "position_ids", "cu_seqlens")


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


def write_shard(path: str, samples: Iterable[dict[str, bytes]], *, real_tokens: int) -> ShardInfo:
    """Write WebDataset samples ({"__key__": key, member: bytes}) atomically and reproducibly."""
    temporary = f"{path}.tmp-{os.getpid()}"
    count = 0
    with open(temporary, "wb") as handle:
        writer = wds.TarWriter(handle, user="", group="", mode=0o444, mtime=0.0, encoder=False)
        for sample in samples:
            writer.write(sample)
            count += 1
        writer.close()
        handle.flush()
        os.fsync(handle.fileno())
    info = ShardInfo(
        name=os.path.basename(path),
        samples=count,
        tokens=real_tokens,
        bytes=os.path.getsize(temporary),
        sha256=sha256_file(temporary),
    )
    os.replace(temporary, path)
    return info


def write_json_atomic(path: str, payload, *, indent: int | None = 1) -> None:
    temporary = f"{path}.tmp-{os.getpid()}"
    with open(temporary, "w", encoding="utf-8") as handle:
        json.dump(payload, handle, ensure_ascii=False, indent=indent, sort_keys=False)
        handle.write("\n")
    os.replace(temporary, path)


def write_text_atomic(path: str, text: str) -> None:
    temporary = f"{path}.tmp-{os.getpid()}"
    with open(temporary, "w", encoding="utf-8") as handle:
        handle.write(text)
    os.replace(temporary, path)
