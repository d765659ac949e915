"""The build plan: which sample goes into which pack and which shard (pure, given the plan).

`make_build_plan(stage_plan)` packs the planned lengths (`lvita_data.packing.plan.plan_packs`:
best-fit-decreasing per packing group `pack.group_by`, with `pack.align`, `pack.max_tiles` and
the stage seed's shuffle), turns the packer's rejects into counted `Reject`s, and cuts the packs
into shards of `shards.packs_per_shard`. Every packed sample is a (file index, row) pair into
`BuildPlan.files`. The build plan is a pure function of the manifest and the data; it is saved as
JSON in the build's state directory with the manifest's hash (`manifest_digest`), so a resumed
build recomputes it and refuses to go on if it differs (the data changed).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field

import numpy as np

from lvita_data.build.plan import StagePlan
from lvita_data.manifest import StageManifest
from lvita_data.packing.plan import plan_packs
from lvita_data.schema import Reject, RejectReason
from lvita_data.shards.format import shard_format


@dataclass(frozen=True, slots=True)
class FileRef:
    dataset: str
    format: str
    path: str
    media_root: str | None


@dataclass(slots=True)
class BuildPlan:
    """Everything the shard tasks need; saved as JSON so a resumed build can check it."""

    manifest_sha256: str
    manifest: dict
    """The build identity (`build_identity`), so a refused resume can say what differs."""
    stage: str
    shard_format: int
    """1: images as pre-cut tiles, 2: images as source bytes (``shards.image_storage``)."""
    files: list[FileRef]
    shards: list[list[list[tuple[int, int]]]]
    """shard -> pack -> (file index, row) of each packed sample."""
    pack_offset: list[int]
    """Global index of the first pack of each shard (keys stay unique across shards)."""
    plan_rejects: list[Reject] = field(default_factory=list)
    pack_rejects: list[Reject] = field(default_factory=list)

    def to_json(self) -> dict:
        return {
            "format": self.shard_format,
            "manifest_sha256": self.manifest_sha256,
            "manifest": self.manifest,
            "stage": self.stage,
            "files": [asdict(f) for f in self.files],
            "shards": self.shards,
            "pack_offset": self.pack_offset,
        }


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
    content = [build_identity(manifest), shard_format(manifest.shards.image_storage)]
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


def _group_labels(plan: StagePlan, group_by: str) -> list[int] | None:
    if group_by == "none":
        return None
    labels = []
    datasets = {name: i for i, name in enumerate(d.name for d in plan.datasets)}
    for index, file_plan in enumerate(plan.files):
        label = index if group_by == "file" else datasets[file_plan.dataset]
        labels.extend([label] * len(file_plan.samples))
    return labels


def make_build_plan(plan: StagePlan) -> BuildPlan:
    """Pack the planned samples and cut the packs into shards (pure given the stage plan)."""
    manifest = plan.manifest
    entries = {d.name: d for d in manifest.datasets}
    files = [
        FileRef(f.dataset, entries[f.dataset].format, f.path, entries[f.dataset].media_root)
        for f in plan.files
    ]
    refs = [(i, int(s.record)) for i, f in enumerate(plan.files) for s in f.samples]
    lengths = [s.length for f in plan.files for s in f.samples]
    tiles = [s.num_tiles for f in plan.files for s in f.samples]
    config = manifest.pack
    packing = plan_packs(
        np.asarray(lengths, dtype=np.int64),
        config.max_seq_len,
        groups=_group_labels(plan, config.group_by),
        window=config.window,
        align=config.align,
        tiles=tiles if config.max_tiles is not None else None,
        max_tiles=config.max_tiles,
        seed=manifest.seed,
    )
    pack_rejects = [
        Reject(
            files[refs[i][0]].dataset,
            files[refs[i][0]].path,
            str(refs[i][1]),
            RejectReason(reason),
            f"{lengths[i]} tokens, {tiles[i]} tiles (after pack.align = {config.align})",
            phase="pack",
        )
        for i, reason in packing.rejected
    ]
    per_shard = manifest.shards.packs_per_shard
    packs = [[refs[i] for i in pack] for pack in packing.packs]
    shards = [packs[i : i + per_shard] for i in range(0, len(packs), per_shard)]
    return BuildPlan(
        manifest_sha256=manifest_digest(manifest),
        manifest=build_identity(manifest),
        stage=manifest.stage,
        shard_format=shard_format(manifest.shards.image_storage),
        files=files,
        shards=shards,
        pack_offset=list(range(0, len(packs), per_shard)),
        plan_rejects=list(plan.rejects()),
        pack_rejects=pack_rejects,
    )
