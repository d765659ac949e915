"""What a build keeps in `.lvita-build/` to be resumed: its build plan and the inputs it read.

`save_build_plan` writes ``layout.npz`` (the build plan's three columns, `BuildPlan.arrays`,
reproducible bytes) and then ``plan.json``: the manifest's hash and identity, the files, the
layout's hash, the planner's per-dataset reports, the plan-time and packing rejects, and the
identity of every record file the plan read (path, size, sha256 of its bytes: content, not
mtime, so a copied or touched file is the same input). ``plan.json`` is written last, so its
presence means the state is complete.

A resumed build (`lvita build --resume`) whose record files all still have the saved identity
loads this state instead of planning again (`load_build_plan`): what it costs before the first
remaining shard is one sha256 pass over the record files (about 1 s per GB), reading the two
files and one hash of the columns (the bounded re-check; measured in BENCHMARKS.md, "Scale").
Media are not re-read then: a changed image is still caught by the shard task that reads it
(size and container checks, `lvita_data.media.source`). When a record file changed, the stage
is planned again and the new layout's hash must equal the saved one, else the build refuses to
go on (the data changed).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

from lvita_data.build.layout import BuildPlan, FileRef
from lvita_data.build.plan import DatasetReport
from lvita_data.errors import BuildError, ShardFormatError
from lvita_data.fileio import write_bytes_atomic, write_text_atomic
from lvita_data.schema import Reject
from lvita_data.shards.format import STATE_DIR, load_npz, npz_bytes

PLAN_JSON = "plan.json"
LAYOUT_NPZ = "layout.npz"
LAYOUT_COLUMNS = ("sample_file", "sample_row", "sample_offset", "pack_starts")


@dataclass(frozen=True, slots=True)
class PlanReports:
    """The planner's per-dataset reports, what `compute_stats` and the reject budget read."""

    datasets: list[DatasetReport]


def plan_json_path(out: Path) -> Path:
    return out / STATE_DIR / PLAN_JSON


def read_saved(out: Path) -> dict | None:
    """The saved ``plan.json`` (None when there is none); `BuildError` when it is unreadable."""
    path = plan_json_path(out)
    if not path.exists():
        return None
    try:
        state = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(state, dict) or not isinstance(state["manifest_sha256"], str):
            raise TypeError("not a build state")
        return state
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise BuildError(f"{path} is unreadable ({error}); use a new --out") from None


def save_build_plan(
    out: Path, plan: BuildPlan, datasets: list[DatasetReport], inputs: list[list]
) -> None:
    """Write ``layout.npz`` and then ``plan.json`` (see the module docstring)."""
    state_dir = out / STATE_DIR
    write_bytes_atomic(str(state_dir / LAYOUT_NPZ), npz_bytes(plan.arrays()))
    state = {
        "format": plan.shard_format,
        "manifest_sha256": plan.manifest_sha256,
        "manifest": plan.manifest,
        "stage": plan.stage,
        "files": [asdict(f) for f in plan.files],
        "packs": plan.num_packs,
        "samples": int(plan.sample_file.shape[0]),
        "packs_per_shard": plan.packs_per_shard,
        "layout_sha256": plan.layout_sha256(),
        "inputs": inputs,
        "datasets": [d.to_json() for d in datasets],
        "rejects": [r.to_json() for r in plan.plan_rejects + plan.pack_rejects],
    }
    write_text_atomic(str(state_dir / PLAN_JSON), json.dumps(state, ensure_ascii=False))


def load_build_plan(out: Path, state: dict) -> tuple[BuildPlan, list[DatasetReport]]:
    """The saved build plan and reports (`BuildError` when the state does not check out)."""
    path = out / STATE_DIR / LAYOUT_NPZ
    try:
        bound = 8 * (max(int(state["samples"]), int(state["packs"]) + 1)) + 1024
        columns = load_npz(path.read_bytes(), LAYOUT_COLUMNS, bound)
        rejects = [Reject.from_json(r) for r in state["rejects"]]
        plan = BuildPlan(
            manifest_sha256=state["manifest_sha256"],
            manifest=state["manifest"],
            stage=state["stage"],
            shard_format=int(state["format"]),
            files=[FileRef(**f) for f in state["files"]],
            sample_file=columns["sample_file"],
            sample_row=columns["sample_row"],
            sample_offset=columns["sample_offset"],
            pack_starts=columns["pack_starts"],
            packs_per_shard=int(state["packs_per_shard"]),
            plan_rejects=[r for r in rejects if r.phase == "plan"],
            pack_rejects=[r for r in rejects if r.phase == "pack"],
        )
        datasets = [DatasetReport.from_json(d) for d in state["datasets"]]
    except (OSError, ValueError, KeyError, TypeError, ShardFormatError) as error:
        problem = f"saved build plan unreadable ({error})"
        raise BuildError(f"{path}: {problem}; use a new --out") from None
    if plan.layout_sha256() != state["layout_sha256"]:
        raise BuildError(f"{path} does not match its plan.json (layout hash); use a new --out")
    return plan, datasets


__all__ = [
    "PlanReports",
    "load_build_plan",
    "read_saved",
    "save_build_plan",
]
