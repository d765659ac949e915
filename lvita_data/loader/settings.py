"""A pack of a build from member bytes read elsewhere, checked as `ShardLoader` checks it.

For readers that get a pack's members from another tar reader (Megatron-Energon's sample
loader in `lvita_data.energon`, plain ``webdataset``): `PackSettings.of_build(out_dir)` reads
once what the checks need, `settings.parse(key, members)` gives the checked `Pack`, and
`assemble_batch([pack], settings.seq_len)` the `PackedBatch` that ``ShardLoader`` yields for
that pack (the same functions, so the same arrays and pixels bit for bit, and the same
`LoaderError` on a damaged pack).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from lvita_data.loader.loader import build_settings, read_index
from lvita_data.loader.pack import Pack, parse_pack


@dataclass(frozen=True, slots=True)
class PackSettings:
    """What `ShardLoader` checks each pack of a build against (`parse_pack`'s arguments)."""

    seq_len: int
    vision_ids: tuple[int, int, int]
    vocab_size: int | None
    reset_attention: bool | None

    @classmethod
    def of_build(cls, out_dir: str | os.PathLike[str]) -> PackSettings:
        """T from the build's `index.json`, the rest from its manifest copy and tokenizer, as
        `ShardLoader(out_dir)` reads them (`LoaderError` if they cannot be read)."""
        root = Path(out_dir)
        seq_len = int(read_index(root)["max_seq_len"])
        return cls(seq_len, *build_settings(root, None))

    def parse(self, key: str, members: dict[str, memoryview], *, where: str) -> Pack:
        """One pack from its members ({suffix: bytes}), checked as `ShardLoader` checks it;
        `assemble_batch([pack], settings.seq_len)` decodes it to the loader's batch."""
        return parse_pack(
            key,
            members,
            where=where,
            seq_len=self.seq_len,
            vision_ids=self.vision_ids,
            vocab_size=self.vocab_size,
            reset_attention=self.reset_attention,
        )


__all__ = ["PackSettings"]
