"""The build settings verify checks against: shard format, stage, capacity,
`pack.reset_attention`, `pack.align`, tile format, image storage, and from the build's
tokenizer its special ids, vocabulary size and the ChatML role prefixes. From `index.json`
where it records them, else the build's copy of its stage manifest (`manifest.yaml`).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from lvita_data.shards.format import SHARD_FORMATS, read_build_manifest
from lvita_data.tokenizer.special_tokens import SpecialIds


@dataclass(frozen=True, slots=True)
class Settings:
    """What a sample is checked against; `decode_tiles=False` skips decoding the tiles and the
    source images."""

    stage: str
    max_seq_len: int
    reset_attention: bool
    align: int
    tile_format: str
    special: SpecialIds
    vocab_size: int
    role_prefix: dict[str, np.ndarray]
    vision_ids: np.ndarray
    """The 9 vision placeholder ids (`ChatTemplate.reserved_set`), sorted, int32."""
    decode_tiles: bool = True
    image_storage: str = "source"
    """``shards.image_storage`` of the build: in format 3 an image names its ``member`` exactly
    when it is ``source``."""
    shard_format: int | None = None
    """The format `index.json` names; None when it names none lvita reads (reported by
    `verify_build`; each pack is then checked as the format its meta.json names)."""


def load_settings(out: Path, index: dict, *, decode_tiles: bool = True) -> Settings:
    """Stage settings verify needs: from index.json where present, else the manifest copy.

    The tokenizer is resolved as the build resolved it (`BuildManifest.tokenizer_spec`: ``${VAR}``
    expanded, a relative directory against the source manifest's); a ``tokenizer`` recorded in
    index.json takes the place of the manifest's."""
    from lvita_data.samples.template import ChatTemplate
    from lvita_data.tokenizer.tokenizer import load_tokenizer

    manifest = read_build_manifest(out)
    pack = manifest.data.get("pack") or {}
    shards = manifest.data.get("shards") or {}
    reset = index.get("reset_attention", pack.get("reset_attention"))
    if not isinstance(reset, bool):
        raise ValueError("manifest.yaml has no boolean pack.reset_attention")
    align = int(index.get("align", pack.get("align", 1)))
    tile_format = str(index.get("tile_format", shards.get("tile_format", "png")))
    if "tokenizer" in index:
        manifest = replace(manifest, data={**manifest.data, "tokenizer": index["tokenizer"]})
    tokenizer = load_tokenizer(manifest.tokenizer_spec)
    template = ChatTemplate.from_encoder(tokenizer.special_ids, tokenizer.encode)
    if int(pack.get("max_seq_len", index["max_seq_len"])) != index["max_seq_len"]:
        raise ValueError("manifest.yaml pack.max_seq_len differs from index.json max_seq_len")
    return Settings(
        stage=index["stage"],
        max_seq_len=int(index["max_seq_len"]),
        reset_attention=reset,
        align=align,
        tile_format=tile_format,
        special=tokenizer.special_ids,
        vocab_size=tokenizer.vocab_size,
        role_prefix=dict(template.role_prefix),
        vision_ids=np.array(sorted(template.reserved_set), dtype=np.int32),
        decode_tiles=decode_tiles,
        image_storage=str(shards.get("image_storage", "source")),
        shard_format=index.get("format") if index.get("format") in SHARD_FORMATS else None,
    )
