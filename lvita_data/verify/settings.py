"""The build settings verify checks against: stage, capacity, `pack.reset_attention`,
`pack.align`, tile format, and from the build's tokenizer its special ids, vocabulary size and
the ChatML role prefixes. From `index.json` where it records them, else the build's copy of its
stage manifest (`manifest.yaml`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import yaml

from lvita_data.tokenizer.special_tokens import SpecialIds


@dataclass(frozen=True, slots=True)
class Settings:
    stage: str
    max_seq_len: int
    reset_attention: bool
    align: int
    tile_format: str
    special: SpecialIds
    vocab_size: int
    role_prefix: dict[str, np.ndarray]
    decode_tiles: bool = True


def _manifest_copy(out: Path) -> tuple[dict, str | None]:
    """The YAML of `manifest.yaml` and the original manifest path from its header line."""
    text = (out / "manifest.yaml").read_text(encoding="utf-8")
    source = None
    first = text.split("\n", 1)[0]
    if first.startswith("#") and ", from " in first:
        source = first.split(", from ", 1)[1].strip()
    return yaml.safe_load(text) or {}, source


def load_settings(out: Path, index: dict, *, decode_tiles: bool = True) -> Settings:
    """Stage settings verify needs: from index.json where present, else the manifest copy."""
    from lvita_data.manifest import expand_env
    from lvita_data.samples.template import ChatTemplate
    from lvita_data.tokenizer.tokenizer import load_tokenizer

    manifest, source = _manifest_copy(out)
    pack = manifest.get("pack") or {}
    shards = manifest.get("shards") or {}
    reset = index.get("reset_attention", pack.get("reset_attention"))
    if not isinstance(reset, bool):
        raise ValueError("manifest.yaml has no boolean pack.reset_attention")
    align = int(index.get("align", pack.get("align", 1)))
    tile_format = str(index.get("tile_format", shards.get("tile_format", "png")))
    spec = str(index.get("tokenizer", manifest.get("tokenizer", "qwen2.5")))
    spec = expand_env(spec)
    if spec != "qwen2.5" and not os.path.isabs(os.path.expanduser(spec)) and source:
        spec = os.path.normpath(os.path.join(os.path.dirname(source), spec))
    tokenizer = load_tokenizer(spec)
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
        decode_tiles=decode_tiles,
    )
