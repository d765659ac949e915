"""`lvita build`: a stage manifest -> packed, checksummed WebDataset shards (resumable).

1. Check the output directory before any work: a directory that holds a build needs `--resume`,
   and then the manifest hash saved with it must match; a non-empty directory that holds no build
   is refused. The build holds an exclusive lock (`.lvita-build/lock`, `lockf`) while it runs.
2. Plan (`lvita_data.build.plan.plan_stage`): exact lengths per selected sample, rejects with
   reasons. `--plan PLAN.json` reads a `lvita plan --out` file instead, when it was made from
   the same manifest and record files (`lvita_data.build.planfile`); the build is the same.
3. Pack and shard (`lvita_data.build.layout.make_build_plan`): best-fit-decreasing per packing
   group, packs shuffled with the stage seed, cut into shards; the build plan is saved in
   `.lvita-build/` (`lvita_data.build.state`: `layout.npz`, then `plan.json` with the manifest's
   hash and the identity of every record file). A resumed build whose record files are
   unchanged loads it instead of planning again; one whose files changed plans again and refuses
   to go on when the layout differs (the data changed).
4. Write: each shard is one task (`lvita_data.build.shard.build_shard`) run through
   `lvita_data.pool.map_tasks` (`--executor local`: this process or `--workers` processes;
   `--executor ray`: Ray tasks, a local Ray or the cluster of `RAY_ADDRESS`). Shard bytes depend
   only on the build plan, never on the worker count, the executor or the order tasks finish in.
5. Finish: leftover temporaries are removed, then `rejects.jsonl`, `stats.json`, `manifest.yaml`
   (a copy, tool version in its header), Energon's `.nv-meta/` and last `index.json` (per shard:
   name, samples, tokens, bytes, sha256) are written atomically.

`--resume` removes temporaries, keeps shards whose completion record and file size match (they
are not rewritten) and redoes the rest; after a `kill -9` at any point the finished directory,
`.lvita-build/` included, is byte-identical to an uninterrupted build. Pool workers exit when the
build process dies, so a killed build leaves no writer behind.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

from tqdm import tqdm

from lvita_data import __version__
from lvita_data.build.identity import (
    build_identity,
    input_identity,
    listed,
    manifest_differences,
    manifest_digest,
)
from lvita_data.build.layout import BuildPlan, make_build_plan
from lvita_data.build.plan import DatasetReport, check_reject_rate, plan_stage
from lvita_data.build.planfile import read_plan_file
from lvita_data.build.shard import BuildContext, ShardTask, build_shard, is_done
from lvita_data.build.state import (
    PlanReports,
    load_build_plan,
    read_saved,
    save_build_plan,
)
from lvita_data.errors import BuildError
from lvita_data.fileio import TEMP_MARKER, atomic_open, write_json_atomic, write_text_atomic
from lvita_data.manifest import StageManifest, load_manifest
from lvita_data.pool import EXECUTORS, Executor, executor_session, map_tasks
from lvita_data.schema import Reject
from lvita_data.shards.energon import write_energon_metadata
from lvita_data.shards.format import (
    MANIFEST_COPY,
    STATE_DIR,
    WRITTEN_FORMAT,
    ShardInfo,
    manifest_header,
    shard_name,
)
from lvita_data.stats.compute import compute_stats

LOCK_WAIT_S = 5.0
"""How long a build waits for the lock of its output directory before giving up."""


def _check_before_planning(
    out: Path, manifest: StageManifest, resume: bool, saved: dict | None
) -> None:
    """Refuse a wrong output directory at once, before the (long) planning pass."""
    if saved is not None:
        if not resume:
            raise BuildError(f"{out} holds a build already; pass --resume to finish or redo it")
        if saved["manifest_sha256"] != manifest_digest(manifest):
            keys = manifest_differences(saved.get("manifest"), build_identity(manifest))
            if not keys:  # the same manifest: an older lvita wrote another shard format
                raise BuildError(
                    f"{out} was started by an lvita writing shard format {saved.get('format')}, "
                    f"this one writes format {WRITTEN_FORMAT}: use a new --out (this lvita reads "
                    "shards of both formats)"
                )
            raise BuildError(
                f"{out} was built from a different manifest (differs in: {listed(keys)}); "
                "use a new --out"
            )
    elif out.exists() and (not out.is_dir() or any(p.name != STATE_DIR for p in out.iterdir())):
        raise BuildError(f"{out} is not empty and holds no lvita build")


def _build_plan(
    out: Path,
    manifest: StageManifest,
    workers: int,
    executor: Executor,
    progress: bool,
    verify_media: bool,
    plan_path: str | None,
) -> tuple[BuildPlan, list[DatasetReport]]:
    """The saved build plan when every record file is unchanged since it was saved, else a new
    one (which must equal the saved one, if any); see `lvita_data.build.state`. A new one comes
    from the plan file `plan_path` (`lvita_data.build.planfile`, refused unless made from this
    manifest and these record files) or from planning; with a plan file, a saved plan that
    matches it still wins, and one that does not is an error."""
    saved = read_saved(out)
    inputs = input_identity(manifest)
    if plan_path is not None:
        plan = read_plan_file(plan_path, manifest, inputs=inputs, verify_media=verify_media)
    elif saved is not None and saved.get("inputs") == inputs:
        return load_build_plan(out, saved)
    else:
        plan = plan_stage(
            manifest,
            workers=workers,
            progress=progress,
            verify_media=verify_media,
            executor=executor,
        )
    build_plan = make_build_plan(plan)
    if saved is not None and saved.get("layout_sha256") != build_plan.layout_sha256():
        if plan_path is not None:
            raise BuildError(
                f"{out} holds another build plan than plan file {plan_path} gives; "
                "use a new --out, or resume without --plan"
            )
        raise BuildError(
            f"{out} was built from different data (the build plan changed); use a new --out"
        )
    if saved is not None and saved.get("inputs") == inputs:
        return load_build_plan(out, saved)
    save_build_plan(out, build_plan, plan.datasets, inputs)
    return build_plan, plan.datasets


@contextlib.contextmanager
def _locked(out: Path) -> Iterator[None]:
    """Exclusive POSIX lock (`lockf`) on `.lvita-build/lock`, released by the kernel when this
    process dies; unlike `flock`, forked workers do not inherit it."""
    fd = os.open(out / STATE_DIR / "lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        deadline = time.monotonic() + LOCK_WAIT_S
        while True:
            try:
                fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except OSError as error:
                if error.errno not in (errno.EACCES, errno.EAGAIN):
                    raise
                if time.monotonic() > deadline:
                    raise BuildError(f"another lvita build is writing {out}") from None
                time.sleep(0.1)
        yield
    finally:
        os.close(fd)


def _tasks(out: Path, build_plan: BuildPlan) -> list[ShardTask]:
    done_dir = out / STATE_DIR / "done"
    tasks = []
    for index in range(build_plan.num_shards):
        name = shard_name(build_plan.stage, index)
        files, rows, offsets, starts = build_plan.shard_slice(index)
        tasks.append(
            ShardTask(
                index=index,
                path=str(out / name),
                done_path=str(done_dir / f"{name}.json"),
                sample_file=files,
                sample_row=rows,
                sample_offset=offsets,
                pack_starts=starts,
                pack_offset=build_plan.pack_offset(index),
            )
        )
    return tasks


def _finish(
    out: Path,
    manifest: StageManifest,
    datasets: list[DatasetReport],
    build_plan: BuildPlan,
    tasks: list[ShardTask],
    workers: int,
) -> dict:
    remove_temporaries(str(out))  # e.g. of a Ray worker that died and whose task was retried
    shards: list[ShardInfo] = []
    build_rejects: list[Reject] = []
    for task in tasks:
        record = json.loads(Path(task.done_path).read_text(encoding="utf-8"))
        shards.append(ShardInfo(**record["shard"]))
        build_rejects.extend(Reject.from_json(x) for x in record["rejects"])
    rejects = build_plan.plan_rejects + build_plan.pack_rejects + build_rejects
    index = {
        "format": build_plan.shard_format,
        "tool": f"lvita {__version__}",
        "stage": manifest.stage,
        "max_seq_len": manifest.pack.max_seq_len,
        "shards": [s.to_json() for s in shards],
    }
    with atomic_open(out / "rejects.jsonl", "w", encoding="utf-8") as handle:
        handle.writelines(json.dumps(r.to_json(), ensure_ascii=False) + "\n" for r in rejects)
    _check_all_rejects(out, manifest, datasets, build_rejects, rejects)
    write_json_atomic(
        str(out / "stats.json"),
        compute_stats(
            out,
            shards=shards,
            rejects=rejects,
            plan=PlanReports(datasets),
            manifest=manifest,
            workers=workers,
        ),
    )
    source_text = Path(manifest.source_path).read_text(encoding="utf-8")
    header = manifest_header(__version__, build_plan.shard_format, manifest.source_path)
    write_text_atomic(str(out / MANIFEST_COPY), header + source_text)
    write_energon_metadata(out, shards)
    write_json_atomic(str(out / "index.json"), index)
    return index


def _check_all_rejects(
    out: Path,
    manifest: StageManifest,
    datasets: list[DatasetReport],
    build_rejects: list[Reject],
    rejects: list[Reject],
) -> None:
    """Plan-time, packing and build-time rejects are one budget: a dataset over
    ``rejects.max_rate`` in total fails the build (exit 4) once `rejects.jsonl` is written, and
    before `index.json` marks it finished; its examples come from the build's own rejects."""
    by_dataset: dict[str, list[Reject]] = {}
    for reject in rejects:
        by_dataset.setdefault(reject.dataset, []).append(reject)
    for report in datasets:
        mine = by_dataset.get(report.name, [])
        late = [r for r in build_rejects if r.dataset == report.name]
        reasons = Counter(str(r.reason) for r in mine)
        check_reject_rate(
            report.name,
            report.selected,
            reasons,
            manifest,
            late + [r for r in mine if r.phase != "build"],  # the build's own first
            str(out / "rejects.jsonl"),
        )


def build_stage(
    manifest_path: str,
    out_dir: str,
    *,
    workers: int = 1,
    executor: str = "local",
    resume: bool = False,
    progress: bool = True,
    verify_media: bool = False,
    plan: str | None = None,
) -> dict:
    """Build (or finish) the shards of a stage; returns the index written to index.json.

    `plan` is a plan file of `lvita plan --out` to build from instead of planning again
    (`lvita build --plan`; `lvita_data.build.planfile` says when it is refused).

    `verify_media` decodes every image while planning (`lvita build --verify-media`), so an
    image truncated after a valid header is rejected there instead of reaching a shard as
    bytes; otherwise the shard tasks check sizes and containers (`media.source`).
    """
    if executor not in EXECUTORS:
        raise BuildError(f"unknown executor {executor!r}; expected one of {sorted(EXECUTORS)}")
    with executor_session(executor, workers):  # one Ray for planning and the shards
        return _build(
            manifest_path, Path(out_dir), workers, executor, resume, progress, verify_media, plan
        )


def _build(
    manifest_path: str,
    out: Path,
    workers: int,
    executor: Executor,
    resume: bool,
    progress: bool,
    verify_media: bool,
    plan_path: str | None,
) -> dict:
    manifest = load_manifest(manifest_path)
    _check_before_planning(out, manifest, resume, read_saved(out))
    (out / STATE_DIR / "done").mkdir(parents=True, exist_ok=True)
    with _locked(out):
        remove_temporaries(str(out))
        build_plan, datasets = _build_plan(
            out, manifest, workers, executor, progress, verify_media, plan_path
        )
        tasks = _tasks(out, build_plan)
        todo = [t for t in tasks if not is_done(t)]
        context = BuildContext(files=build_plan.files, manifest=manifest)
        bar = tqdm(
            total=len(tasks),
            initial=len(tasks) - len(todo),
            desc=f"shards {manifest.stage}",
            unit="shard",
            disable=not progress,
        )
        for _ in map_tasks(
            build_shard, todo, workers=workers, executor=executor, shared=context, ordered=False
        ):
            bar.update(1)
        bar.close()
        return _finish(out, manifest, datasets, build_plan, tasks, workers)


def remove_temporaries(out_dir: str) -> int:
    """Delete the temporary files (`*.tmp-*`) a killed build left behind; returns how many."""
    removed = 0
    for path in Path(out_dir).rglob(f"*{TEMP_MARKER}*"):
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
            removed += 1
    return removed


__all__ = [
    "BuildContext",
    "BuildError",
    "BuildPlan",
    "ShardTask",
    "build_shard",
    "build_stage",
    "make_build_plan",
    "remove_temporaries",
]
