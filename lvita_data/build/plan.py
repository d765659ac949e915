"""Planning pass: a stage manifest -> one exact token length per selected sample, or a reject.

For each dataset entry and each of its files (in manifest order): open the native source, select
rows with the original per-file mixture rule (`mixture.select_rows`), read the selected rows
once each (ascending) and batch-tokenize their turns (`lvita_data.samples.read`), and turn every
record into an exact sample from media *metadata* only (`samples.tokenize.plan_record`).
Up-sampled rows repeat their outcome, so per dataset `selected == samples + rejects` always
holds. Files run in parallel worker processes (`workers`, `lvita_data.pool`); results are merged
in manifest order, so the plan does not depend on the worker count.
`lvita_data.build.report.format_report` renders a plan as a terminal table.

Missing inputs are loud: a pattern that matches no file is listed per dataset, and `plan_stage`
raises unless `allow_missing`. A dataset whose reject rate passes `rejects.max_rate` stops the run.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np
from tqdm import tqdm

from lvita_data.errors import MissingInputs, RejectRateExceeded, SourceError
from lvita_data.manifest import DatasetEntry, StageManifest, expand_dataset_files
from lvita_data.pool import Executor, map_tasks
from lvita_data.records import open_source
from lvita_data.records.mixture import select_rows
from lvita_data.samples.read import Row, read_and_tokenize, tokenizer_and_template
from lvita_data.samples.tokenize import SampleRules, plan_record
from lvita_data.schema import RawRecord, Reject, SamplePlan


@dataclass(frozen=True, slots=True)
class SampleRow:
    """What the plan keeps of one sample: enough to pack it and to find it again."""

    record: str
    length: int
    modality: str
    num_tiles: int
    num_frames: int
    requested_frames: int


@dataclass(slots=True)
class FilePlan:
    dataset: str
    path: str
    num_rows: int = 0
    num_selected: int = 0
    samples: list[SampleRow] = field(default_factory=list)
    rejects: list[Reject] = field(default_factory=list)
    error: str = ""
    """Set when the whole file could not be read (SourceError)."""


@dataclass(slots=True)
class DatasetReport:
    name: str
    format: str
    files_found: int = 0
    files_missing: list[str] = field(default_factory=list)
    files_failed: list[str] = field(default_factory=list)
    records: int = 0
    selected: int = 0
    samples: int = 0
    tokens: int = 0
    modalities: Counter = field(default_factory=Counter)
    rejects: Counter = field(default_factory=Counter)
    frames_requested: int = 0
    frames_chosen: int = 0
    videos_fitted: int = 0

    @property
    def reject_rate(self) -> float:
        return sum(self.rejects.values()) / self.selected if self.selected else 0.0

    def add(self, plan: FilePlan) -> None:
        if plan.error:
            self.files_failed.append(f"{plan.path}: {plan.error}")
            return
        self.records += plan.num_rows
        self.selected += plan.num_selected
        self.samples += len(plan.samples)
        for row in plan.samples:
            self.tokens += row.length
            self.modalities[row.modality] += 1
            self.frames_requested += row.requested_frames
            self.frames_chosen += row.num_frames
            self.videos_fitted += row.num_frames < row.requested_frames
        self.rejects.update(str(r.reason) for r in plan.rejects)

    def to_json(self) -> dict:
        return {
            "name": self.name,
            "format": self.format,
            "files_found": self.files_found,
            "files_missing": self.files_missing,
            "files_failed": self.files_failed,
            "records": self.records,
            "selected": self.selected,
            "samples": self.samples,
            "tokens": self.tokens,
            "modalities": dict(sorted(self.modalities.items())),
            "rejects": dict(sorted(self.rejects.items())),
            "reject_rate": round(self.reject_rate, 6),
            "frames_requested": self.frames_requested,
            "frames_chosen": self.frames_chosen,
            "videos_fitted": self.videos_fitted,
        }


@dataclass(slots=True)
class StagePlan:
    manifest: StageManifest
    datasets: list[DatasetReport]
    files: list[FilePlan]

    @property
    def num_samples(self) -> int:
        return sum(d.samples for d in self.datasets)

    @property
    def num_tokens(self) -> int:
        return sum(d.tokens for d in self.datasets)

    def lengths(self) -> np.ndarray:
        return np.array([s.length for f in self.files for s in f.samples], dtype=np.int64)

    def rejects(self) -> Iterator[Reject]:
        for plan in self.files:
            yield from plan.rejects

    def to_json(self) -> dict:
        files = [f for f in self.files if not f.error]
        return {
            "stage": self.manifest.stage,
            "manifest": self.manifest.source_path,
            "seed": self.manifest.seed,
            "tokenizer": self.manifest.tokenizer,
            "max_seq_len": self.manifest.pack.max_seq_len,
            "reset_attention": self.manifest.pack.reset_attention,
            "num_samples": self.num_samples,
            "num_tokens": self.num_tokens,
            "datasets": [d.to_json() for d in self.datasets],
            "files": [
                {
                    "dataset": f.dataset,
                    "path": f.path,
                    "rows": f.num_rows,
                    "selected": f.num_selected,
                }
                for f in files
            ],
            # Columnar, one entry per selected sample in selection order (17M rows stay compact).
            "samples": {
                "file": [i for i, f in enumerate(files) for _ in f.samples],
                "record": [s.record for f in files for s in f.samples],
                "length": [s.length for f in files for s in f.samples],
                "modality": [s.modality for f in files for s in f.samples],
                "tiles": [s.num_tiles for f in files for s in f.samples],
                "frames": [s.num_frames for f in files for s in f.samples],
            },
            "rejects": [r.to_json() for r in self.rejects()],
        }


def _sample_row(record: RawRecord, plan: SamplePlan) -> SampleRow:
    return SampleRow(
        record=record.record_id,
        length=plan.length,
        modality=plan.modality,
        num_tiles=plan.num_tiles,
        num_frames=sum(len(v.frame_indices) for v in plan.videos),
        requested_frames=sum(v.requested_frames for v in plan.videos),
    )


def plan_file(
    entry: DatasetEntry, path: str, manifest: StageManifest, *, verify_media: bool = False
) -> FilePlan:
    """Plan one file of one dataset entry (runs in a worker process)."""
    plan = FilePlan(dataset=entry.name, path=path)
    try:
        source = open_source(
            path, fmt=entry.format, dataset=entry.name, media_root=entry.media_root
        )
    except SourceError as error:
        plan.error = str(error)
        return plan
    tokenizer, template = tokenizer_and_template(manifest.tokenizer)
    rules = SampleRules.from_manifest(manifest, template, verify_media=verify_media)
    plan.num_rows = len(source)
    rows = select_rows(
        plan.num_rows, ratio=entry.ratio, max_samples=entry.max_samples, seed=manifest.seed
    )
    plan.num_selected = int(rows.shape[0])
    results = read_and_tokenize(
        (Row(row, source, path, row) for row in np.unique(rows).tolist()),
        tokenizer,
        lambda record, contents: (record, plan_record(record, contents, rules)),
    )
    summaries = {row: _sample_row(*r) for row, r in results.items() if not isinstance(r, Reject)}
    for row in rows.tolist():
        outcome = results[row]
        if isinstance(outcome, Reject):
            plan.rejects.append(outcome)
        else:
            plan.samples.append(summaries[row])
    return plan


def _plan_file_task(args: tuple[DatasetEntry, str, StageManifest, bool]) -> FilePlan:
    entry, path, manifest, verify_media = args
    return plan_file(entry, path, manifest, verify_media=verify_media)


def check_reject_rate(
    dataset: str,
    selected: int,
    reasons: Counter,
    manifest: StageManifest,
    examples: Sequence[Reject],
    listing: str = "",
) -> None:
    """`RejectRateExceeded` when a dataset's rejects pass ``rejects.max_rate`` (judged from
    ``rejects.min_selected`` selected records on), naming the top reasons, a few example records
    and, with `listing`, where all of them are written."""
    policy = manifest.rejects
    rejected = sum(reasons.values())
    rate = rejected / selected if selected else 0.0
    if selected < policy.min_selected or rate <= policy.max_rate:
        return
    top = ", ".join(f"{reason} x{count}" for reason, count in reasons.most_common(5))
    shown = "; ".join(f"{r.file} record {r.record}: {r.reason} ({r.detail})" for r in examples[:3])
    where = f"; all of them in {listing}" if listing else ""
    raise RejectRateExceeded(
        f"dataset {dataset!r}: {rejected} of {selected} selected records rejected "
        f"({rate:.1%} > rejects.max_rate {policy.max_rate:.1%}); top reasons: {top}; "
        f"e.g. {shown}{where}. Fix the data or raise rejects.max_rate in {manifest.source_path}"
    )


def _source_text(manifest: StageManifest) -> str:
    try:
        with open(manifest.source_path, encoding="utf-8") as handle:
            return handle.read()
    except OSError:
        return ""


def plan_stage(
    manifest: StageManifest,
    *,
    workers: int = 1,
    verify_media: bool = False,
    allow_missing: bool = False,
    progress: bool = True,
    executor: Executor = "local",
) -> StagePlan:
    """Plan every dataset of a stage; see the module docstring for the guarantees. Files run
    as tasks of `lvita_data.pool.map_tasks`: local processes, or Ray tasks with
    ``executor="ray"`` (the same plan either way)."""
    reports: list[DatasetReport] = []
    tasks: list[tuple[DatasetEntry, str, StageManifest, bool]] = []
    for entry in manifest.datasets:
        files, missing = expand_dataset_files(entry)
        if entry.media_root is not None and not os.path.isdir(entry.media_root):
            missing.append(f"media_root {entry.media_root} (not a directory)")
        reports.append(
            DatasetReport(entry.name, entry.format, files_found=len(files), files_missing=missing)
        )
        tasks.extend((entry, path, manifest, verify_media) for path in files)
    missing_all = [(r.name, m) for r in reports for m in r.files_missing]
    if missing_all and not allow_missing:
        listing = "\n".join(f"  {name}: {path}" for name, path in missing_all)
        hint = ""
        if "LVITA_DEMO_ROOT" in _source_text(manifest):
            hint = "; a demo manifest: set LVITA_DEMO_ROOT to a `lvita demo-data DIR` directory"
        raise MissingInputs(
            f"{len(missing_all)} dataset input(s) of {manifest.source_path} not found:\n{listing}\n"
            f"(pass --allow-missing to plan without them; they stay listed in the report{hint})"
        )
    by_name = {r.name: r for r in reports}
    file_plans: list[FilePlan] = []
    bar = tqdm(total=len(tasks), desc=f"plan {manifest.stage}", unit="file", disable=not progress)
    results = map_tasks(_plan_file_task, tasks, workers=workers, executor=executor)
    file_plans = _collect(results, by_name, manifest, bar)
    bar.close()
    failed = [(r.name, f) for r in reports for f in r.files_failed]
    if failed and not allow_missing:
        listing = "\n".join(f"  {name}: {problem}" for name, problem in failed)
        raise MissingInputs(f"{len(failed)} dataset file(s) could not be read:\n{listing}")
    for report in reports:
        examples = [r for plan in file_plans if plan.dataset == report.name for r in plan.rejects]
        check_reject_rate(report.name, report.selected, report.rejects, manifest, examples)
    return StagePlan(manifest=manifest, datasets=reports, files=file_plans)


def _collect(
    results, by_name: dict[str, DatasetReport], manifest: StageManifest, bar
) -> list[FilePlan]:
    plans = []
    for plan in results:
        by_name[plan.dataset].add(plan)
        plans.append(plan)
        bar.update(1)
        bar.set_postfix(samples=sum(r.samples for r in by_name.values()))
    return plans


def default_workers() -> int:
    return max(1, (os.cpu_count() or 1))


__all__ = [
    "DatasetReport",
    "FilePlan",
    "MissingInputs",
    "SampleRow",
    "StagePlan",
    "check_reject_rate",
    "plan_file",
    "plan_stage",
]
