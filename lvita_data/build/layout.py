"""The build plan: which sample goes into which pack and which shard (pure, given the plan).

`make_build_plan(stage_plan)` packs the planned lengths (`lvita_data.packing.plan.plan_packs`:
best-fit-decreasing per packing group `pack.group_by`, with `pack.align`, `pack.max_tiles` and
the stage seed's shuffle), turns the packer's rejects into counted `Reject`s, and cuts the packs
into shards of `shards.packs_per_shard`. Every packed sample is a (file index, row) pair into
`BuildPlan.files` with the row's byte offset, held as numpy columns (20 bytes per sample plus 8
per pack, instead of Python tuples), and a shard task gets only its own slice
(`BuildPlan.shard_slice`). The build plan is a pure function of the manifest and the data;
`lvita_data.build.state` saves it with the manifest's hash
(`lvita_data.build.identity.manifest_digest`) and the layout's (`BuildPlan.layout_sha256`), so a
resumed build can check it.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import numpy as np

from lvita_data.build.identity import build_identity, manifest_digest
from lvita_data.build.plan import StagePlan
from lvita_data.packing.plan import plan_packs
from lvita_data.schema import Reject, RejectReason
from lvita_data.shards.format import WRITTEN_FORMAT


@dataclass(frozen=True, slots=True)
class FileRef:
    dataset: str
    format: str
    path: str
    media_root: str | None


@dataclass(slots=True)
class BuildPlan:
    """Everything the shard tasks need (see the module docstring)."""

    manifest_sha256: str
    manifest: dict
    """The build identity (`build_identity`), so a refused resume can say what differs."""
    stage: str
    shard_format: int
    """1: images as pre-cut tiles, 2: images as source bytes (``shards.image_storage``)."""
    files: list[FileRef]
    sample_file: np.ndarray
    """int32 [samples]: file index of every packed sample, pack after pack."""
    sample_row: np.ndarray
    """int64 [samples]: its row in that file."""
    sample_offset: np.ndarray
    """int64 [samples]: where that row starts in the file (-1: no offset, read by row)."""
    pack_starts: np.ndarray
    """int64 [packs + 1]: pack p holds samples ``pack_starts[p]:pack_starts[p + 1]``."""
    packs_per_shard: int
    plan_rejects: list[Reject] = field(default_factory=list)
    pack_rejects: list[Reject] = field(default_factory=list)

    @property
    def num_packs(self) -> int:
        return int(self.pack_starts.shape[0]) - 1

    @property
    def num_shards(self) -> int:
        return -(-self.num_packs // self.packs_per_shard)

    def pack_offset(self, shard: int) -> int:
        """Global index of the first pack of `shard` (keys stay unique across shards)."""
        return shard * self.packs_per_shard

    def shard_slice(self, shard: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """(file index, row, offset, pack starts from 0) of the samples of one shard: views."""
        first = self.pack_offset(shard)
        last = min(first + self.packs_per_shard, self.num_packs)
        begin, end = int(self.pack_starts[first]), int(self.pack_starts[last])
        return (
            self.sample_file[begin:end],
            self.sample_row[begin:end],
            self.sample_offset[begin:end],
            self.pack_starts[first : last + 1] - begin,
        )

    def arrays(self) -> dict[str, np.ndarray]:
        return {
            "sample_file": self.sample_file,
            "sample_row": self.sample_row,
            "sample_offset": self.sample_offset,
            "pack_starts": self.pack_starts,
        }

    def layout_sha256(self) -> str:
        """Hash of which (file, row) goes into which pack, in order (dtypes fixed)."""
        digest = hashlib.sha256()
        for name, array in self.arrays().items():
            digest.update(name.encode() + np.ascontiguousarray(array).tobytes())
        return digest.hexdigest()


def _group_labels(plan: StagePlan, group_by: str) -> np.ndarray | None:
    if group_by == "none":
        return None
    datasets = {name: i for i, name in enumerate(d.name for d in plan.datasets)}
    files = [f for f in plan.files if not f.error]
    labels = [i if group_by == "file" else datasets[f.dataset] for i, f in enumerate(files)]
    return np.repeat(np.asarray(labels, dtype=np.int64), [f.num_samples for f in files])


def make_build_plan(plan: StagePlan) -> BuildPlan:
    """Pack the planned samples and cut the packs into shards (pure given the stage plan)."""
    manifest = plan.manifest
    entries = {d.name: d for d in manifest.datasets}
    readable = [f for f in plan.files if not f.error]
    files = [
        FileRef(f.dataset, entries[f.dataset].format, f.path, entries[f.dataset].media_root)
        for f in readable
    ]
    file_of = np.repeat(np.arange(len(readable), dtype=np.int32), [f.num_samples for f in readable])
    rows = plan.column("rows")
    lengths = plan.lengths()
    tiles = plan.column("tiles")
    config = manifest.pack
    packing = plan_packs(
        lengths,
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
            files[file_of[i]].dataset,
            files[file_of[i]].path,
            str(rows[i]),
            RejectReason(reason),
            f"{lengths[i]} tokens, {tiles[i]} tiles (after pack.align = {config.align})",
            phase="pack",
        )
        for i, reason in packing.rejected
    ]
    sizes = np.fromiter((len(p) for p in packing.packs), dtype=np.int64, count=packing.num_packs)
    order = np.fromiter(
        (i for pack in packing.packs for i in pack), dtype=np.int64, count=int(sizes.sum())
    )
    del packing  # its per-sample Python lists are the largest thing planning ever holds
    return BuildPlan(
        manifest_sha256=manifest_digest(manifest),
        manifest=build_identity(manifest),
        stage=manifest.stage,
        shard_format=WRITTEN_FORMAT,
        files=files,
        sample_file=file_of[order],
        sample_row=rows[order],
        sample_offset=plan.column("offsets")[order],
        pack_starts=np.concatenate([np.zeros(1, dtype=np.int64), np.cumsum(sizes)]),
        packs_per_shard=manifest.shards.packs_per_shard,
        plan_rejects=list(plan.rejects()),
        pack_rejects=pack_rejects,
    )
