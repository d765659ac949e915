"""What the packs of a build are checked against: `PackSettings` (T, the vision context ids, the
vocabulary size, ``pack.reset_attention``), read from the build's ``index.json`` (`read_index`),
its manifest copy and tokenizer (`build_settings`).

`ShardLoader` hands its settings to its `ShardReader`; readers that get a pack's members from
another tar reader (Megatron-Energon's sample loader in `lvita_data.energon`, plain
``webdataset``) use `PackSettings.of_build(out_dir)`: `settings.parse(key, members)` gives the
checked `Pack` and `assemble_batch([pack], settings.seq_len)` the `PackedBatch` that
``ShardLoader`` yields for that pack (the same functions, so the same arrays and pixels bit for
bit, and the same `LoaderError` on a damaged pack).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from lvita_data.errors import LoaderError, LvitaError, ShardFormatError
from lvita_data.loader.pack import Pack, parse_pack
from lvita_data.shards.format import BUNDLED_TOKENIZER, parse_json, read_build_manifest
from lvita_data.shards.index import MAX_INDEX_BYTES, check_index
from lvita_data.tokenizer.special_tokens import (
    LONGVITA_SPECIAL_TOKENS,
    QWEN25_NUM_BPE_TOKENS,
    QWEN25_SPECIAL_TOKENS,
    SpecialIds,
)


def bundled_vocab_size() -> int:
    """Ids of the bundled qwen2.5 tokenizer: BPE, Qwen's specials and Long-VITA's."""
    return QWEN25_NUM_BPE_TOKENS + len(QWEN25_SPECIAL_TOKENS) + len(LONGVITA_SPECIAL_TOKENS)


def bundled_vision_ids() -> tuple[int, int, int]:
    """(IMG, PATCH, VID) context ids of the bundled qwen2.5 tokenizer (fixed; checked at load)."""
    first = QWEN25_NUM_BPE_TOKENS + len(QWEN25_SPECIAL_TOKENS)
    return tuple(
        first + LONGVITA_SPECIAL_TOKENS.index(token)
        for token in ("<IMG_CONTEXT>", "<PATCH_CONTEXT>", "<VID_CONTEXT>")
    )  # type: ignore[return-value]


def build_settings(
    root: Path, special_ids: SpecialIds | None
) -> tuple[tuple[int, int, int], int | None, bool | None]:
    """(vision ids, vocabulary size, pack.reset_attention) of a build, from its manifest copy
    and tokenizer. With `special_ids` the manifest may be unreadable (then the vocabulary is
    unknown and either position layout is accepted)."""
    try:
        manifest = read_build_manifest(root)
        pack = manifest.data.get("pack")
        reset = pack.get("reset_attention") if isinstance(pack, dict) else None
        reset = reset if isinstance(reset, bool) else None
        spec = manifest.tokenizer_spec
        if spec == BUNDLED_TOKENIZER:
            vision_ids, vocab = bundled_vision_ids(), bundled_vocab_size()
        else:
            from lvita_data.tokenizer.tokenizer import load_tokenizer

            tokenizer = load_tokenizer(spec)
            vision_ids, vocab = tokenizer.special_ids.vision_context_ids, tokenizer.vocab_size
    except LvitaError as error:  # an unreadable copy, an unset ${VAR}, no such tokenizer, ...
        if special_ids is None:
            raise LoaderError(f"{error}; pass special_ids=") from None
        return tuple(special_ids.vision_context_ids), None, None  # type: ignore[return-value]
    if special_ids is not None:
        vision_ids = special_ids.vision_context_ids
    return tuple(vision_ids), vocab, reset  # type: ignore[return-value]


def read_index(root: Path) -> dict:
    """The build's `index.json`, at most `MAX_INDEX_BYTES`, checked by `check_index`
    (`LoaderError` otherwise)."""
    path = root / "index.json"
    try:
        with open(path, "rb") as handle:
            data = handle.read(MAX_INDEX_BYTES + 1)
        if len(data) > MAX_INDEX_BYTES:
            raise LoaderError(f"{path}: larger than {MAX_INDEX_BYTES} bytes")
        return check_index(path, parse_json(data, str(path)))
    except OSError as error:
        raise LoaderError(f"{path}: {error.strerror}") from None
    except ShardFormatError as error:
        raise LoaderError(str(error)) from None


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


__all__ = ["PackSettings", "build_settings", "bundled_vision_ids", "read_index"]
