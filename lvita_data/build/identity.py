"""What makes two builds, or a build and a plan file, the same: the manifest and the inputs.

`build_identity` is the manifest as the build uses it, `manifest_digest` its hash with the
shard format (saved in `.lvita-build/plan.json` and in the header of a `lvita plan --out`
file), `manifest_differences` names the keys where two identities differ (for the refusal), and
`input_identity` is the path, size and sha256 of every record file (content, not mtime).
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict

from lvita_data.errors import MissingInputs
from lvita_data.fileio import sha256_file
from lvita_data.manifest import StageManifest, expand_dataset_files
from lvita_data.shards.format import WRITTEN_FORMAT


def build_identity(manifest: StageManifest) -> dict:
    """What makes two builds the same: the manifest as the build uses it (defaults filled in,
    ``${VAR}`` expanded, paths resolved), without where its file lies (a copy elsewhere is the
    same build) and without the reject policy (it changes no byte of a shard, so a build stopped
    by ``rejects.max_rate`` finishes with ``--resume`` once the limit is raised)."""
    content = asdict(manifest)
    del content["source_path"], content["rejects"]
    return json.loads(json.dumps(content))


def manifest_digest(manifest: StageManifest) -> str:
    """Hash of the build identity and the shard format it writes."""
    content = [build_identity(manifest), WRITTEN_FORMAT]
    return hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()


def manifest_differences(saved: object, current: object, where: str = "") -> list[str]:
    """Dotted keys (``pack.max_seq_len``, ``datasets[2].ratio``) whose values differ."""
    if isinstance(saved, dict) and isinstance(current, dict):
        keys = sorted(set(saved) | set(current))
        return [
            found
            for key in keys
            for found in manifest_differences(
                saved.get(key), current.get(key), f"{where}.{key}" if where else key
            )
        ]
    if isinstance(saved, list) and isinstance(current, list) and len(saved) == len(current):
        return [
            found
            for i, (a, b) in enumerate(zip(saved, current, strict=True))
            for found in manifest_differences(a, b, f"{where}[{i}]")
        ]
    return [] if saved == current else [where or "(the whole manifest)"]


def listed(keys: list[str], limit: int = 10) -> str:
    """``a, b, c`` (the first `limit`, then how many more)."""
    more = f" and {len(keys) - limit} more" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more


def input_identity(manifest: StageManifest) -> list[list]:
    """[path, size, sha256] of every record file the manifest names, in manifest order;
    `MissingInputs` listing the files that cannot be read."""
    identity, unreadable = [], []
    for entry in manifest.datasets:
        for path in expand_dataset_files(entry)[0]:
            try:
                identity.append([path, os.path.getsize(path), sha256_file(path)])
            except OSError as error:
                unreadable.append(f"  {entry.name}: {path}: {error.strerror or error}")
    if unreadable:
        listing = "\n".join(unreadable)
        raise MissingInputs(f"{len(unreadable)} dataset file(s) could not be read:\n{listing}")
    return identity


__all__ = [
    "build_identity",
    "input_identity",
    "listed",
    "manifest_differences",
    "manifest_digest",
]
