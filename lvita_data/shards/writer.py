"""Writing one shard: WebDataset samples -> one reproducible tar, atomically.

`write_shard` streams the samples (a generator is fine: one pack's members are in memory at a
time) through `lvita_data.shards.tar.TarWriter` into a temporary file that is renamed over the
shard's name when complete (`lvita_data.fileio.atomic_open`). The writer hashes and counts the
bytes as it writes them, so the returned `ShardInfo` (samples, bytes, sha256) costs no second
read of the shard.
"""

from __future__ import annotations

import os
from collections.abc import Iterable

from lvita_data.fileio import atomic_open
from lvita_data.shards.format import ShardInfo
from lvita_data.shards.tar import TarWriter


def write_shard(
    path: str, samples: Iterable[dict[str, bytes]], *, real_tokens: int = 0
) -> ShardInfo:
    """Write WebDataset samples ({"__key__": key, member: bytes}) atomically and reproducibly.

    `samples` may be a generator; `real_tokens` is stored as is in the returned `ShardInfo`.
    """
    count = 0
    with atomic_open(path, "wb", buffering=1 << 20) as handle:
        writer = TarWriter(handle)
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
