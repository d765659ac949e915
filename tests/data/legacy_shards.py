"""Builds in the shard formats lvita wrote before format 3, made from a format-3 build: the same
packs with their members laid out as the old writers laid them out (format 2 for
``image_storage: source``, format 1 for ``tiles``), so tests can check that every reader still
reads them. Not a converter users need: `lvita build` writes format 3 only.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from lvita_data.shards.format import (
    ARRAY_MEMBERS,
    ARRAYS_NPZ,
    FORMAT_TILES,
    MEDIA_TAR,
    load_npz,
    meta_bytes,
    npy_bytes,
    npz_limit,
    read_media_tar,
)
from lvita_data.shards.tar import group_samples, scan_tar_file
from lvita_data.shards.writer import write_shard

BUILD_FILES = ("manifest.yaml", "stats.json", "rejects.jsonl")


def legacy_pack(members: dict[str, bytes], version: int, max_seq_len: int) -> dict[str, bytes]:
    """One format-3 pack's members ({suffix: bytes}) as format `version` (1 or 2) wrote them."""
    meta = json.loads(members["meta.json"])
    meta["format"] = version
    for sample in meta["samples"]:
        sample["media_order"] = [[item["kind"], item["index"]] for item in sample["media_order"]]
    out = {name: bytes(data) for name, data in read_media_tar(members[MEDIA_TAR]).items()}
    if version == FORMAT_TILES:
        del meta["stored_tiles"]
        arrays = load_npz(members[ARRAYS_NPZ], ARRAY_MEMBERS, npz_limit(max_seq_len))
        out.update({f"{name}.npy": npy_bytes(arrays[name]) for name in ARRAY_MEMBERS})
    else:
        out[ARRAYS_NPZ] = members[ARRAYS_NPZ]
    out["meta.json"] = meta_bytes(meta)
    return out


def write_legacy_build(build: Path, out: Path, version: int) -> Path:
    """A copy of `build` (format 3) in format `version`: shards rewritten pack by pack,
    ``index.json`` with the new format, sizes and checksums, the manifest copy, stats and
    rejects as they were (no Energon metadata, no per-sample digests)."""
    out.mkdir(parents=True)
    index = json.loads((build / "index.json").read_text(encoding="utf-8"))
    for entry in index["shards"]:
        path = build / entry["name"]
        data = path.read_bytes()
        packs = []
        for sample in group_samples(scan_tar_file(path)):
            members = {
                name: data[sample.start + offset : sample.start + offset + size]
                for name, (offset, size) in sample.members.items()
            }
            pack = legacy_pack(members, version, index["max_seq_len"])
            packs.append({"__key__": sample.key, **pack})
        info = write_shard(str(out / entry["name"]), packs, real_tokens=entry["tokens"])
        entry.update(bytes=info.bytes, sha256=info.sha256)
        entry.pop("digests", None)
    index["format"] = version
    (out / "index.json").write_text(json.dumps(index, indent=1), encoding="utf-8")
    for name in BUILD_FILES:
        if (build / name).exists():
            shutil.copy2(build / name, out / name)
    return out
