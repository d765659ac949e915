"""`lvita stats`: what a build directory holds, measured from its shards.

`compute_stats(out_dir)` reads a finished build directory (`index.json`, `rejects.jsonl`,
`manifest.yaml`, the planner section of `stats.json`) and, from every shard, only the `meta.json`
member of each packed sequence (the tar headers are walked; tiles and arrays are skipped). The
build writes `stats.json` with the same function, before `index.json` exists, by passing what it
holds in memory (`shards`, `rejects`, `plan`, `manifest`), so that after a build
`compute_stats(out_dir) == json.load(open(out_dir / "stats.json"))`.

What is measured (T = pack.max_seq_len, P = packed sequences):
- fill = real tokens / (P * T); padding = P * T - real tokens, split into alignment padding
  (between samples, `pack.align`) and tail padding (after the last sample of a pack);
- samples and vision tiles per pack;
- length histograms *before packing* (the length of every packed sample; power-of-two bins up to
  T) and *after packing* (real tokens per pack; 20 bins of T / 20);
- per dataset: samples, tokens, token share, modality mix, video frames chosen vs requested,
  rejects by reason, and `selected` = packed samples + rejects (every selected row is either
  packed or rejected: at planning, at packing or when the shard was written);
- token share next to the manifest's target. The manifest does not state token shares: its
  `ratio` / `max_samples` select rows per file. The *target share* of a dataset is the share of
  the tokens that this selection yields, as planned (exact lengths, after the planner's rejects):
  `plan tokens of the dataset / plan tokens of the stage`, i.e. what the ratios asked for. The
  *share* is the same over the tokens actually packed; `share_delta` = share - target share shows
  what packing and shard writing lost (too long once aligned, too many tiles, pixels that failed
  to decode). The planner's numbers are not recoverable from the shards (a rejected row leaves no
  length), so they are kept in `stats.json` under `plan` and read back from there; without them
  the target columns are null.
- per mixture group (`group` of the manifest entries, default the entry name): the same shares;
- rejects by reason, by dataset and by phase (found while planning, packing or building; all
  count against ``rejects.max_rate``), from `rejects.jsonl`, and under `reject_examples` the
  first 3 records (file, record, reason, detail, phase) of each dataset and reason, in
  `rejects.jsonl` order (`lvita_data.stats.rejects`: memory bounded whatever the reject count).

The keys of the build's earlier minimal stats.json keep their meaning (stage, max_seq_len, packs,
tokens, padding_tokens, fill, planned_samples, rejects = total count, datasets[].modalities).
The output is deterministic (manifest order for datasets, sorted keys elsewhere, floats rounded
to 6 digits) and plain JSON (a JSON round trip returns an equal dict).
"""

from __future__ import annotations

import json
import os
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np

from lvita_data.errors import ShardFormatError, StatsError
from lvita_data.manifest import StageManifest
from lvita_data.pool import map_tasks
from lvita_data.schema import Reject
from lvita_data.shards.format import MANIFEST_COPY, ShardInfo, parse_json, read_build_manifest
from lvita_data.shards.index import check_index
from lvita_data.stats.rejects import RejectTally, read_rejects
from lvita_data.stats.scan import DatasetScan, ShardScan, scan_shard

STATS_FORMAT_VERSION = 1
PACK_BINS = 20
"""Bins of the after-packing histogram (real tokens per pack), each T / PACK_BINS wide."""
MIN_LENGTH_EDGE = 64
"""First non-zero edge of the before-packing histogram; then powers of two up to T."""


def _round(value: float) -> float:
    return round(float(value), 6)


def _histogram(values: np.ndarray, edges: Sequence[int]) -> dict:
    counts, _ = np.histogram(values, bins=np.asarray(edges, dtype=np.float64))
    return {"edges": [int(e) for e in edges], "counts": [int(c) for c in counts]}


def length_edges(capacity: int) -> list[int]:
    """0, 64, 128, ... (powers of two below T), T."""
    edges, edge = [0], MIN_LENGTH_EDGE
    while edge < capacity:
        edges.append(edge)
        edge *= 2
    return [*edges, capacity]


def pack_edges(capacity: int) -> list[int]:
    """PACK_BINS + 1 integer edges from 0 to T."""
    return sorted({capacity * i // PACK_BINS for i in range(PACK_BINS + 1)})


def _summary(values: np.ndarray) -> dict:
    if values.size == 0:
        return {"min": 0, "mean": 0.0, "p50": 0, "p90": 0, "max": 0}
    return {
        "min": int(values.min()),
        "mean": _round(values.mean()),
        "p50": int(np.percentile(values, 50, method="lower")),
        "p90": int(np.percentile(values, 90, method="lower")),
        "max": int(values.max()),
    }


class _DatasetReport(Protocol):
    def to_json(self) -> dict: ...


class PlanReports(Protocol):
    """What compute_stats reads of the planner's `StagePlan`: its per-dataset reports."""

    @property
    def datasets(self) -> Sequence[_DatasetReport]: ...


@dataclass(frozen=True, slots=True)
class _Entry:
    """A dataset entry of the manifest, as the statistics name it."""

    name: str
    group: str
    ratio: float | None
    max_samples: int | None


def _read_json(path: Path) -> object:
    try:
        return parse_json(path.read_bytes(), str(path))
    except FileNotFoundError:
        return None
    except OSError as error:
        raise StatsError(f"{path}: cannot read: {error.strerror}") from None
    except ShardFormatError as error:
        raise StatsError(str(error)) from None


def _manifest_entries(manifest: StageManifest | None, out: Path) -> list[_Entry]:
    """name, group, ratio, max_samples of each dataset entry, in manifest order: from the
    manifest in memory, else from the build's `manifest.yaml` copy (none without one)."""
    if manifest is not None:
        return [
            _Entry(d.name, d.group or d.name, float(d.ratio), d.max_samples)
            for d in manifest.datasets
        ]
    if not (out / MANIFEST_COPY).is_file():
        return []
    try:
        data = read_build_manifest(out).data
    except ShardFormatError as error:
        raise StatsError(str(error)) from None
    entries = []
    try:
        for d in data.get("datasets") or []:
            name = str(d["name"])
            max_samples = d.get("max_samples")
            entries.append(
                _Entry(
                    name,
                    str(d.get("group") or name),
                    float(d.get("ratio", 1.0)),
                    None if max_samples is None else int(max_samples),
                )
            )
    except (KeyError, TypeError, ValueError, AttributeError, OverflowError) as error:
        raise StatsError(f"{out / MANIFEST_COPY}: malformed datasets entry ({error!r})") from None
    return entries


def _plan_reports(plan: PlanReports | None, out: Path) -> list[dict] | None:
    """The planner's per-dataset reports: from the plan in memory, else from the `plan` key of
    the build's `stats.json` (None without one)."""
    if plan is not None:
        return [d.to_json() for d in plan.datasets]
    saved = _read_json(out / "stats.json")
    if not (isinstance(saved, dict) and isinstance(saved.get("plan"), list)):
        return None
    for number, report in enumerate(saved["plan"]):
        if not (
            isinstance(report, dict)
            and isinstance(report.get("name"), str)
            and all(
                type(report.get(field, 0)) is int and report.get(field, 0) >= 0
                for field in ("tokens", "samples")
            )
        ):
            raise StatsError(f"{out / 'stats.json'}: plan[{number}] is not a planner report")
    return saved["plan"]


def _index_shards(out: Path) -> tuple[list[ShardInfo], str, int]:
    """The shards, stage and T of a finished build's `index.json`."""
    index = _read_json(out / "index.json")
    if index is None:
        raise StatsError(f"{out / 'index.json'} not found: not a finished lvita build")
    try:  # the loader's schema: types, ranges, plain unique shard names
        check_index(out / "index.json", index)
    except ShardFormatError as error:
        raise StatsError(str(error)) from None
    assert isinstance(index, dict)
    shards = []
    for number, s in enumerate(index["shards"]):
        if (
            type(s.get("tokens")) is not int
            or not 0 <= s["tokens"] <= s["samples"] * (index["max_seq_len"])
        ):
            raise StatsError(f"{out / 'index.json'}: shards[{number}].tokens {s.get('tokens')!r}")
        shards.append(
            ShardInfo(
                name=s["name"],
                samples=s["samples"],
                tokens=s["tokens"],
                bytes=s["bytes"],
                sha256=str(s.get("sha256", "")),
            )
        )
    return shards, index["stage"], index["max_seq_len"]


def compute_stats(
    out_dir: str | os.PathLike[str],
    *,
    shards: Sequence[ShardInfo] | None = None,
    rejects: Sequence[Reject] | None = None,
    plan: PlanReports | None = None,
    manifest: StageManifest | None = None,
    workers: int = 1,
) -> dict:
    """Statistics of a build directory (see the module docstring for what each number means).

    Without keywords everything is read from `out_dir`. The build passes what it has in memory,
    before writing `index.json` and `manifest.yaml`: `shards`, `rejects`, `plan` (the
    `StagePlan`) and `manifest`; `shards` needs `manifest`. `workers` > 1 reads shards in
    parallel (`lvita_data.pool.map_tasks`).
    """
    out = Path(out_dir)
    if not out.is_dir():
        raise StatsError(f"{out} is not a directory")
    if shards is None:
        shard_list, stage, capacity = _index_shards(out)
        if manifest is not None:
            stage, capacity = manifest.stage, int(manifest.pack.max_seq_len)
    elif manifest is not None:
        shard_list, stage, capacity = list(shards), manifest.stage, int(manifest.pack.max_seq_len)
    else:
        raise StatsError("compute_stats: pass manifest= together with shards=")
    tally = RejectTally.of(rejects) if rejects is not None else read_rejects(out / "rejects.jsonl")
    entries = _manifest_entries(manifest, out)
    reports = _plan_reports(plan, out)

    tasks = []
    for shard in shard_list:
        path = out / shard.name
        if not path.is_file() or path.is_symlink():
            raise StatsError(f"{path}: shard listed in the index is missing (or not a file)")
        tasks.append((str(path), shard.name, capacity))
    scans = list(map_tasks(scan_shard, tasks, workers=workers))
    for shard, scan in zip(shard_list, scans, strict=True):
        expected = (shard.samples, shard.tokens)
        if expected != (scan.packs, scan.tokens):
            raise StatsError(
                f"{scan.name}: the index lists {expected[0]} packs / {expected[1]} tokens, the "
                f"shard holds {scan.packs} / {scan.tokens}: the build directory is inconsistent"
            )
        if scan.overfull:
            raise StatsError(f"{scan.name}: {scan.overfull} pack(s) longer than T = {capacity}")
    return _assemble(stage, capacity, scans, tally, entries, reports)


def _dataset_row(
    name: str,
    scan: DatasetScan,
    entry: _Entry,
    rejected: Counter,
    target_tokens: int | None,
    tokens: int,
    plan_total: int,
) -> dict:
    """One dataset's row: what was packed next to what the plan asked for (see the module doc)."""
    share = scan.tokens / tokens if tokens else 0.0
    target = target_tokens / plan_total if target_tokens is not None and plan_total else None
    return {
        "name": name,
        "group": entry.group,
        "ratio": entry.ratio,
        "max_samples": entry.max_samples,
        "selected": scan.samples + sum(rejected.values()),
        "samples": scan.samples,
        "tokens": scan.tokens,
        "share": _round(share),
        "target_tokens": target_tokens,
        "target_share": None if target is None else _round(target),
        "share_delta": None if target is None else _round(share - target),
        "mean_length": _round(scan.tokens / scan.samples) if scan.samples else 0.0,
        "modalities": {m: scan.modalities[m] for m in sorted(scan.modalities)},
        "frames": {
            "videos": scan.videos,
            "requested": scan.frames_requested,
            "chosen": scan.frames_chosen,
            "videos_fitted": scan.videos_fitted,
        },
        "rejects": {r: rejected[r] for r in sorted(rejected)},
    }


def _group_rows(rows: list[dict], tokens: int, plan_total: int) -> list[dict]:
    """The mixture groups (manifest `group`, default the entry name) of the dataset rows."""
    groups: dict[str, dict] = {}
    for row in rows:
        group = groups.setdefault(
            row["group"],
            {"name": row["group"], "datasets": [], "samples": 0, "tokens": 0, "target_tokens": 0},
        )
        group["datasets"].append(row["name"])
        group["samples"] += row["samples"]
        group["tokens"] += row["tokens"]
        if row["target_tokens"] is None or group["target_tokens"] is None:
            group["target_tokens"] = None
        else:
            group["target_tokens"] += row["target_tokens"]
    for group in groups.values():
        share = group["tokens"] / tokens if tokens else 0.0
        group["share"] = _round(share)
        if group["target_tokens"] is None or not plan_total:
            group["target_tokens"] = group["target_share"] = group["share_delta"] = None
        else:
            target = group["target_tokens"] / plan_total
            group["target_share"] = _round(target)
            group["share_delta"] = _round(share - target)
    return list(groups.values())


def _assemble(
    stage: str,
    capacity: int,
    scans: list[ShardScan],
    rejects: RejectTally,
    entries: list[_Entry],
    reports: list[dict] | None,
) -> dict:
    packs = sum(s.packs for s in scans)
    tokens = sum(s.tokens for s in scans)
    per_pack = np.array([n for s in scans for n in s.samples_per_pack], dtype=np.int64)
    tiles = np.array([n for s in scans for n in s.tiles_per_pack], dtype=np.int64)
    pack_tokens = np.array([n for s in scans for n in s.pack_tokens], dtype=np.int64)
    lengths = np.array([n for s in scans for n in s.sample_lengths], dtype=np.int64)
    datasets: dict[str, DatasetScan] = {}
    for scan in scans:
        for name, part in scan.datasets.items():
            datasets.setdefault(name, DatasetScan()).merge(part)

    by_dataset = rejects.by_dataset
    planned = {str(r["name"]): r for r in reports} if reports is not None else None
    names = [e.name for e in entries]
    extra = set(datasets) | set(by_dataset) | set(planned or ())
    names += sorted(extra - set(names))
    entry_of = {e.name: e for e in entries}
    plan_total = sum(int(r.get("tokens", 0)) for r in planned.values()) if planned else 0

    rows = []
    for name in names:
        report = planned.get(name) if planned is not None else None
        rows.append(
            _dataset_row(
                name,
                datasets.get(name, DatasetScan()),
                entry_of.get(name, _Entry(name, name, None, None)),
                by_dataset.get(name, Counter()),
                int(report.get("tokens", 0)) if report is not None else None,
                tokens,
                plan_total,
            )
        )

    modality_samples: Counter = Counter()
    modality_tokens: Counter = Counter()
    for scan in datasets.values():
        modality_samples.update(scan.modalities)
        modality_tokens.update(scan.modality_tokens)
    frames = {
        "videos": sum(d.videos for d in datasets.values()),
        "requested": sum(d.frames_requested for d in datasets.values()),
        "chosen": sum(d.frames_chosen for d in datasets.values()),
        "videos_fitted": sum(d.videos_fitted for d in datasets.values()),
    }
    total_capacity = packs * capacity
    spp_counts = Counter(per_pack.tolist())
    stats = {
        "stats_format": STATS_FORMAT_VERSION,
        "stage": stage,
        "max_seq_len": capacity,
        "shards": len(scans),
        "packs": packs,
        "samples": int(lengths.size),
        "tokens": tokens,
        "capacity_tokens": total_capacity,
        "padding_tokens": total_capacity - tokens,
        "alignment_padding_tokens": sum(s.alignment_padding for s in scans),
        "tail_padding_tokens": sum(s.tail_padding for s in scans),
        "fill": _round(tokens / total_capacity) if total_capacity else 0.0,
        "samples_per_pack": {
            "mean": _round(per_pack.mean()) if packs else 0.0,
            "min": int(per_pack.min()) if packs else 0,
            "max": int(per_pack.max()) if packs else 0,
            "histogram": {str(n): spp_counts[n] for n in sorted(spp_counts)},
        },
        "tiles_per_pack": {
            "total": int(tiles.sum()),
            "mean": _round(tiles.mean()) if packs else 0.0,
            "max": int(tiles.max()) if packs else 0,
        },
        "sample_lengths": {
            **_summary(lengths),
            "histogram": _histogram(lengths, length_edges(capacity)),
        },
        "pack_tokens": {
            **_summary(pack_tokens),
            "histogram": _histogram(pack_tokens, pack_edges(capacity)),
        },
        "modalities": {
            m: {
                "samples": modality_samples[m],
                "tokens": modality_tokens[m],
                "share": _round(modality_tokens[m] / tokens) if tokens else 0.0,
            }
            for m in sorted(modality_samples)
        },
        "frames": frames,
        **rejects.to_json(names),  # rejects, by reason, phase and dataset, examples
        "planned_samples": (
            sum(int(r.get("samples", 0)) for r in planned.values()) if planned else None
        ),
        "planned_tokens": plan_total if planned else None,
        "datasets": rows,
        "groups": _group_rows(rows, tokens, plan_total),
        "plan": reports,
    }
    # Plain JSON types only: a round trip through json gives back an equal dict.
    return json.loads(json.dumps(stats, ensure_ascii=False))


__all__ = [
    "STATS_FORMAT_VERSION",
    "PlanReports",
    "StatsError",
    "compute_stats",
    "length_edges",
    "pack_edges",
]
