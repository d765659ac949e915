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

import contextlib
import gc
import hashlib
import json
import os
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np
from tqdm import tqdm

from lvita_data import __version__
from lvita_data.build.identity import build_identity, input_identity, manifest_digest
from lvita_data.errors import MissingInputs, RejectRateExceeded, SourceError
from lvita_data.fileio import atomic_open
from lvita_data.manifest import DatasetEntry, StageManifest, expand_dataset_files
from lvita_data.pool import Executor, map_tasks
from lvita_data.records import open_source
from lvita_data.records.mixture import select_rows
from lvita_data.samples.read import Row, read_and_tokenize, tokenizer_and_template
from lvita_data.samples.tokenize import SampleRules, plan_counts
from lvita_data.schema import RawRecord, Reject, media_modality
from lvita_data.shards.format import WRITTEN_FORMAT

MODALITIES = ("text", "image", "multi_image", "video")
"""Modality names by the code `FilePlan.modality` stores (`schema.media_modality`)."""
_MODALITY_CODES = {name: code for code, name in enumerate(MODALITIES)}


@dataclass(slots=True)
class FilePlan:
    """The plan of one file: per planned sample (in selection order) compact numpy columns,
    about 33 bytes a sample, and the rejects; a file that could not be read has `error`."""

    dataset: str
    path: str
    num_rows: int = 0
    num_selected: int = 0
    rows: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    """Row of each sample in the file (int64); its record id."""
    offsets: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    """Byte offset of the row in the file, -1 where the format has none (`Source.offsets`):
    a shard task reads just that line."""
    lengths: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int32))
    """Exact token length (int32)."""
    modality: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.uint8))
    """Index into `MODALITIES` (uint8)."""
    tiles: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int32))
    """448 tiles the ViT encodes, video frames included (int32)."""
    frames: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int32))
    """Video frames chosen (int32)."""
    requested_frames: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int32))
    """Video frames the video rules asked for before fitting to the budget (int32)."""
    rejects: list[Reject] = field(default_factory=list)
    error: str = ""
    """Set when the whole file could not be read (SourceError)."""

    @property
    def num_samples(self) -> int:
        return int(self.rows.shape[0])


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
        self.samples += plan.num_samples
        self.tokens += int(plan.lengths.sum(dtype=np.int64))
        counts = np.bincount(plan.modality, minlength=len(MODALITIES))
        self.modalities.update({m: int(c) for m, c in zip(MODALITIES, counts, strict=True) if c})
        self.frames_requested += int(plan.requested_frames.sum(dtype=np.int64))
        self.frames_chosen += int(plan.frames.sum(dtype=np.int64))
        self.videos_fitted += int((plan.frames < plan.requested_frames).sum())
        self.rejects.update(str(r.reason) for r in plan.rejects)

    @classmethod
    def from_json(cls, data: dict) -> DatasetReport:
        """The inverse of `to_json` (a resumed build reads its saved reports)."""
        fields = {k: v for k, v in data.items() if k != "reject_rate"}
        fields["modalities"] = Counter(fields["modalities"])
        fields["rejects"] = Counter(fields["rejects"])
        return cls(**fields)

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
    verify_media: bool = False
    """Whether images were decoded while planning (``--verify-media``)."""
    inputs: list[list] | None = None
    """`input_identity` of the record files, taken before planning (`iter_json` writes it)."""

    @property
    def num_samples(self) -> int:
        return sum(d.samples for d in self.datasets)

    @property
    def num_tokens(self) -> int:
        return sum(d.tokens for d in self.datasets)

    def column(self, name: str) -> np.ndarray:
        """One `FilePlan` column over every readable file, in plan order."""
        parts = [getattr(f, name) for f in self.files if not f.error]
        return np.concatenate(parts) if parts else getattr(FilePlan("", ""), name)

    def lengths(self) -> np.ndarray:
        return self.column("lengths").astype(np.int64)

    def rejects(self) -> Iterator[Reject]:
        for plan in self.files:
            yield from plan.rejects

    def columns_sha256(self) -> str:
        """Hash of the per-sample columns (fixed dtypes) and of the samples per file: a plan file
        read back (`lvita_data.build.planfile`) must give the same."""
        files = [f for f in self.files if not f.error]
        digest = hashlib.sha256(np.asarray([f.num_samples for f in files], np.int64).tobytes())
        for name, (attribute, dtype) in SAMPLE_COLUMNS.items():
            digest.update(name.encode())
            for plan in files:
                digest.update(np.ascontiguousarray(getattr(plan, attribute), dtype).tobytes())
        return digest.hexdigest()

    def iter_json(self) -> Iterator[str]:
        """The plan as compact JSON text, in pieces: the per-sample columns (one entry per
        selected sample, selection order) are written `JSON_CHUNK` values at a time, so a 17M
        sample plan never exists as Python lists. The header also holds what `lvita build
        --plan` checks before it reuses the plan (`lvita_data.build.planfile`): the manifest's
        identity and hash, the shard format, the record files' identity (`inputs`, hashed now
        unless the planner's caller set them before planning), the tool version and the hash of
        the columns."""
        files = [f for f in self.files if not f.error]
        inputs = self.inputs if self.inputs is not None else input_identity(self.manifest)
        head = {
            "stage": self.manifest.stage,
            "manifest": self.manifest.source_path,
            "seed": self.manifest.seed,
            "tokenizer": self.manifest.tokenizer,
            "max_seq_len": self.manifest.pack.max_seq_len,
            "reset_attention": self.manifest.pack.reset_attention,
            "num_samples": self.num_samples,
            "num_tokens": self.num_tokens,
            "tool": f"lvita {__version__}",
            "format": WRITTEN_FORMAT,
            "manifest_sha256": manifest_digest(self.manifest),
            "build_identity": build_identity(self.manifest),
            "verify_media": self.verify_media,
            "inputs": inputs,
            "columns_sha256": self.columns_sha256(),
            "datasets": [d.to_json() for d in self.datasets],
            "files": [
                {
                    "dataset": f.dataset,
                    "path": f.path,
                    "rows": f.num_rows,
                    "selected": f.num_selected,
                    "samples": f.num_samples,
                }
                for f in files
            ],
        }
        yield _dumps(head)[:-1] + ',"samples":{'
        for number, name in enumerate(["file", *SAMPLE_COLUMNS]):
            yield ("," if number else "") + f'"{name}":['
            first = True
            for index, plan in enumerate(files):
                values = _column_values(name, index, plan)
                for start in range(0, plan.num_samples, JSON_CHUNK):
                    part = values[start : start + JSON_CHUNK].tolist()
                    if part:
                        yield ("" if first else ",") + _dumps(part)[1:-1]
                        first = False
            yield "]"
        yield '},"rejects":['
        yield ",".join(_dumps(r.to_json()) for r in self.rejects())
        yield "]}"

    def write_json(self, path: str) -> None:
        """`iter_json` into `path`, atomically."""
        with atomic_open(path, "w", encoding="utf-8") as handle:
            handle.writelines(self.iter_json())


SAMPLE_COLUMNS: dict[str, tuple[str, type]] = {
    "record": ("rows", np.int64),
    "length": ("lengths", np.int32),
    "modality": ("modality", np.uint8),
    "tiles": ("tiles", np.int32),
    "frames": ("frames", np.int32),
    "offset": ("offsets", np.int64),
    "requested_frames": ("requested_frames", np.int32),
}
"""Plan-file column -> (`FilePlan` attribute, dtype); the file's ``file`` column is implied by
the samples per file. ``modality`` is written as names (`MODALITIES`), ``record`` as strings."""
JSON_CHUNK = 65536
"""Values per piece of a column in `StagePlan.iter_json`."""


def _column_values(name: str, index: int, plan: FilePlan) -> np.ndarray:
    """Plan-file column `name` of the `index`-th readable file, as the JSON holds it."""
    if name == "file":
        return np.full(plan.num_samples, index, dtype=np.int64)
    values = getattr(plan, SAMPLE_COLUMNS[name][0])
    if name == "record":
        return values.astype(str)
    if name == "modality":
        return np.asarray(MODALITIES)[values]
    return values


def _dumps(value: object) -> str:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


def _planned(
    record: RawRecord, contents: Sequence[Sequence[int]], rules: SampleRules
) -> tuple[int, int, int, int, int]:
    """(length, modality code, tiles, frames, requested frames) of one record's sample."""
    length, tiles, frames, requested = plan_counts(record, contents, rules)
    modality = _MODALITY_CODES[media_modality(len(record.images), len(record.videos))]
    return length, modality, tiles, frames, requested


@contextlib.contextmanager
def _cyclic_gc_paused() -> Iterator[None]:
    """Python's cyclic collector off while a file's records are read and planned: they make no
    reference cycles (reference counting frees them), and the collector's passes over the chunk
    of records alive at a time cost ~8% of planning (measured on `benchmarks/bench_plan.py`).
    Whatever cycles appear are collected once it is back on."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


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
    distinct = np.unique(rows)
    planned = np.zeros((distinct.shape[0], 5), dtype=np.int64)  # _planned of each distinct row
    failed: dict[int, Reject] = {}
    outcomes = read_and_tokenize(
        (Row(i, source, path, row) for i, row in enumerate(distinct.tolist())),
        tokenizer,
        lambda record, contents: _planned(record, contents, rules),
    )
    with _cyclic_gc_paused():
        for i, outcome in outcomes:
            if isinstance(outcome, Reject):
                failed[i] = outcome
            else:
                planned[i] = outcome
    position = np.searchsorted(distinct, rows)  # selection order -> distinct row
    ok = np.ones(distinct.shape[0], dtype=bool)
    ok[list(failed)] = False
    kept = position[ok[position]]
    plan.rows = distinct[kept]
    plan.offsets = source.offsets(distinct)[kept]
    plan.lengths, plan.modality, plan.tiles, plan.frames, plan.requested_frames = (
        planned[kept, column].astype(dtype)
        for column, dtype in enumerate((np.int32, np.uint8, np.int32, np.int32, np.int32))
    )
    plan.rejects = [failed[i] for i in position[~ok[position]].tolist()]
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
    return StagePlan(
        manifest=manifest, datasets=reports, files=file_plans, verify_media=verify_media
    )


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
    "MODALITIES",
    "StagePlan",
    "check_reject_rate",
    "plan_file",
    "plan_stage",
]
