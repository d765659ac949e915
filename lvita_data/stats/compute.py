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
- rejects by reason and by dataset, from `rejects.jsonl`.

The keys of the build's earlier minimal stats.json keep their meaning (stage, max_seq_len, packs,
tokens, padding_tokens, fill, planned_samples, rejects = total count, datasets[].modalities).
The output is deterministic (manifest order for datasets, sorted keys elsewhere, floats rounded
to 6 digits) and plain JSON (a JSON round trip returns an equal dict).
"""

from __future__ import annotations

import json
import os
import tarfile
from collections import Counter
from collections.abc import Iterable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from lvita_data.errors import StatsError

STATS_FORMAT_VERSION = 1
MODALITIES = ("text", "image", "multi_image", "video")
PACK_BINS = 20
"""Bins of the after-packing histogram (real tokens per pack), each T / PACK_BINS wide."""
MIN_LENGTH_EDGE = 64
"""First non-zero edge of the before-packing histogram; then powers of two up to T."""


def _round(value: float) -> float:
    return round(float(value), 6)


def sample_modality(sample: dict) -> str:
    """Modality of one packed sample's meta (as `SamplePlan.modality`)."""
    if sample.get("videos"):
        return "video"
    images = len(sample.get("images") or ())
    if images > 1:
        return "multi_image"
    return "image" if images else "text"


@dataclass(slots=True)
class _DatasetScan:
    samples: int = 0
    tokens: int = 0
    modalities: Counter = field(default_factory=Counter)
    modality_tokens: Counter = field(default_factory=Counter)
    videos: int = 0
    frames_requested: int = 0
    frames_chosen: int = 0
    videos_fitted: int = 0

    def merge(self, other: _DatasetScan) -> None:
        self.samples += other.samples
        self.tokens += other.tokens
        self.modalities.update(other.modalities)
        self.modality_tokens.update(other.modality_tokens)
        self.videos += other.videos
        self.frames_requested += other.frames_requested
        self.frames_chosen += other.frames_chosen
        self.videos_fitted += other.videos_fitted


@dataclass(slots=True)
class _ShardScan:
    """What one shard contributes (merged in shard order, so the result never depends on
    the number of worker processes)."""

    name: str
    capacity: int
    packs: int = 0
    tokens: int = 0
    alignment_padding: int = 0
    tail_padding: int = 0
    overfull: int = 0
    samples_per_pack: list[int] = field(default_factory=list)
    tiles_per_pack: list[int] = field(default_factory=list)
    pack_tokens: list[int] = field(default_factory=list)
    sample_lengths: list[int] = field(default_factory=list)
    datasets: dict[str, _DatasetScan] = field(default_factory=dict)

    def add_pack(self, meta: dict) -> None:
        samples = meta.get("samples") or []
        self.packs += 1
        real = sum(int(s["length"]) for s in samples)
        end = max((int(s["offset"]) + int(s["length"]) for s in samples), default=0)
        self.tokens += real
        self.alignment_padding += end - real
        self.tail_padding += self.capacity - end
        self.overfull += end > self.capacity
        self.samples_per_pack.append(len(samples))
        self.tiles_per_pack.append(int(meta.get("num_tiles", 0)))
        self.pack_tokens.append(real)
        for sample in samples:
            length = int(sample["length"])
            self.sample_lengths.append(length)
            scan = self.datasets.setdefault(str(sample["dataset"]), _DatasetScan())
            modality = sample_modality(sample)
            scan.samples += 1
            scan.tokens += length
            scan.modalities[modality] += 1
            scan.modality_tokens[modality] += length
            for video in sample.get("videos") or ():
                chosen = len(video.get("frames") or ())
                requested = int(video.get("requested_frames", chosen))
                scan.videos += 1
                scan.frames_requested += requested
                scan.frames_chosen += chosen
                scan.videos_fitted += chosen < requested


def read_pack_metas(path: str | os.PathLike[str]) -> Iterable[tuple[str, dict]]:
    """(key, meta) of every packed sequence of a shard, in tar order; other members are skipped
    without being read."""
    try:
        with tarfile.open(path, "r:") as tar:
            for member in tar:
                if member.isfile() and member.name.endswith(".meta.json"):
                    handle = tar.extractfile(member)
                    assert handle is not None
                    key = member.name[: -len(".meta.json")]
                    yield key, json.loads(handle.read())
    except (OSError, tarfile.TarError, ValueError) as error:
        raise StatsError(f"{path}: cannot read shard: {error}") from None


def _scan_shard(args: tuple[str, str, int]) -> _ShardScan:
    path, name, capacity = args
    scan = _ShardScan(name=name, capacity=capacity)
    for _, meta in read_pack_metas(path):
        scan.add_pack(meta)
    return scan


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


def _as_dict(item: Any) -> dict:
    return item.to_json() if hasattr(item, "to_json") else dict(item)


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as error:
        raise StatsError(f"{path}: cannot read: {error}") from None


def _read_rejects(path: Path) -> list[dict]:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise StatsError(f"{path} not found: not a finished lvita build") from None
    try:
        return [json.loads(line) for line in text.splitlines() if line.strip()]
    except ValueError as error:
        raise StatsError(f"{path}: invalid JSON line: {error}") from None


def _manifest_entries(manifest: Any, out: Path) -> list[dict]:
    """name, group, ratio, max_samples of each dataset entry, in manifest order."""
    if manifest is not None:
        return [
            {
                "name": d.name,
                "group": d.group or d.name,
                "ratio": float(d.ratio),
                "max_samples": d.max_samples,
            }
            for d in manifest.datasets
        ]
    try:
        data = yaml.safe_load((out / "manifest.yaml").read_text(encoding="utf-8"))
    except FileNotFoundError:
        return []
    except (OSError, yaml.YAMLError) as error:
        raise StatsError(f"{out / 'manifest.yaml'}: cannot read: {error}") from None
    entries = []
    for d in (data or {}).get("datasets") or []:
        name = str(d["name"])
        max_samples = d.get("max_samples")
        entries.append(
            {
                "name": name,
                "group": str(d.get("group") or name),
                "ratio": float(d.get("ratio", 1.0)),
                "max_samples": None if max_samples is None else int(max_samples),
            }
        )
    return entries


def _plan_reports(plan: Any, out: Path) -> list[dict] | None:
    if plan is not None:
        datasets = plan.datasets if hasattr(plan, "datasets") else plan
        return [_as_dict(d) for d in datasets]
    saved = _read_json(out / "stats.json")
    if not isinstance(saved, dict):
        return None
    if isinstance(saved.get("plan"), list):
        return saved["plan"]
    # stats.json of builds before `lvita stats`: the planner reports under "datasets"
    old = saved.get("datasets")
    if isinstance(old, list) and all(isinstance(d, dict) and "format" in d for d in old):
        return old
    return None


def _shard_names(shards: Sequence[Any] | None, out: Path) -> tuple[list[dict], dict | None]:
    if shards is not None:
        return [_as_dict(s) if not isinstance(s, str) else {"name": s} for s in shards], None
    index = _read_json(out / "index.json")
    if not isinstance(index, dict):
        raise StatsError(f"{out / 'index.json'} not found: not a finished lvita build")
    return [dict(s) for s in index.get("shards", [])], index


def compute_stats(
    out_dir: str | os.PathLike[str],
    *,
    shards: Sequence[Any] | None = None,
    rejects: Sequence[Any] | None = None,
    plan: Any = None,
    manifest: Any = None,
    workers: int = 1,
) -> dict:
    """Statistics of a build directory (see the module docstring for what each number means).

    Without keywords everything is read from `out_dir`. The build passes what it has in memory,
    before writing `index.json` and `manifest.yaml`: `shards` (ShardInfo or index.json dicts, or
    names), `rejects` (Reject or rejects.jsonl dicts), `plan` (the StagePlan, or its per-dataset
    report dicts) and `manifest` (the StageManifest). `workers` > 1 reads shards in parallel.
    """
    out = Path(out_dir)
    if not out.is_dir():
        raise StatsError(f"{out} is not a directory")
    shard_list, index = _shard_names(shards, out)
    if manifest is not None:
        stage, capacity = manifest.stage, int(manifest.pack.max_seq_len)
    elif index is not None:
        stage, capacity = str(index["stage"]), int(index["max_seq_len"])
    else:
        raise StatsError("compute_stats: pass manifest= together with shards=")
    reject_list = (
        [_as_dict(r) for r in rejects]
        if rejects is not None
        else _read_rejects(out / "rejects.jsonl")
    )
    entries = _manifest_entries(manifest, out)
    reports = _plan_reports(plan, out)

    tasks = []
    for shard in shard_list:
        path = out / shard["name"]
        if not path.is_file():
            raise StatsError(f"{path}: shard listed in the index is missing")
        tasks.append((str(path), shard["name"], capacity))
    if workers > 1 and len(tasks) > 1:
        with ProcessPoolExecutor(max_workers=min(workers, len(tasks))) as pool:
            scans = list(pool.map(_scan_shard, tasks))
    else:
        scans = [_scan_shard(task) for task in tasks]
    for shard, scan in zip(shard_list, scans, strict=True):
        expected = (shard.get("samples", scan.packs), shard.get("tokens", scan.tokens))
        if expected != (scan.packs, scan.tokens):
            raise StatsError(
                f"{scan.name}: the index lists {expected[0]} packs / {expected[1]} tokens, the "
                f"shard holds {scan.packs} / {scan.tokens}: the build directory is inconsistent"
            )
        if scan.overfull:
            raise StatsError(f"{scan.name}: {scan.overfull} pack(s) longer than T = {capacity}")
    return _assemble(stage, capacity, scans, reject_list, entries, reports)


def _assemble(
    stage: str,
    capacity: int,
    scans: list[_ShardScan],
    rejects: list[dict],
    entries: list[dict],
    reports: list[dict] | None,
) -> dict:
    packs = sum(s.packs for s in scans)
    tokens = sum(s.tokens for s in scans)
    per_pack = np.array([n for s in scans for n in s.samples_per_pack], dtype=np.int64)
    tiles = np.array([n for s in scans for n in s.tiles_per_pack], dtype=np.int64)
    pack_tokens = np.array([n for s in scans for n in s.pack_tokens], dtype=np.int64)
    lengths = np.array([n for s in scans for n in s.sample_lengths], dtype=np.int64)
    datasets: dict[str, _DatasetScan] = {}
    for scan in scans:
        for name, part in scan.datasets.items():
            datasets.setdefault(name, _DatasetScan()).merge(part)

    by_dataset: dict[str, Counter] = {}
    for reject in rejects:
        by_dataset.setdefault(str(reject["dataset"]), Counter())[str(reject["reason"])] += 1
    by_reason: Counter = Counter()
    for counts in by_dataset.values():
        by_reason.update(counts)

    planned = {str(r["name"]): r for r in reports} if reports is not None else None
    names = [e["name"] for e in entries]
    extra = set(datasets) | set(by_dataset) | set(planned or ())
    names += sorted(extra - set(names))
    entry_of = {e["name"]: e for e in entries}
    plan_total = sum(int(r.get("tokens", 0)) for r in planned.values()) if planned else 0

    rows = []
    for name in names:
        scan = datasets.get(name, _DatasetScan())
        entry = entry_of.get(name, {"group": name, "ratio": None, "max_samples": None})
        rejected = by_dataset.get(name, Counter())
        report = planned.get(name) if planned is not None else None
        share = scan.tokens / tokens if tokens else 0.0
        target_tokens = int(report.get("tokens", 0)) if report is not None else None
        target = target_tokens / plan_total if target_tokens is not None and plan_total else None
        rows.append(
            {
                "name": name,
                "group": entry["group"],
                "ratio": entry["ratio"],
                "max_samples": entry["max_samples"],
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
        )

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
        "rejects": sum(by_reason.values()),
        "rejects_by_reason": {r: by_reason[r] for r in sorted(by_reason)},
        "rejects_by_dataset": {
            name: {r: by_dataset[name][r] for r in sorted(by_dataset[name])}
            for name in names
            if name in by_dataset
        },
        "planned_samples": (
            sum(int(r.get("samples", 0)) for r in planned.values()) if planned else None
        ),
        "planned_tokens": plan_total if planned else None,
        "datasets": rows,
        "groups": list(groups.values()),
        "plan": reports,
    }
    # Plain JSON types only: a round trip through json gives back an equal dict.
    return json.loads(json.dumps(stats, ensure_ascii=False))


__all__ = [
    "STATS_FORMAT_VERSION",
    "StatsError",
    "compute_stats",
    "read_pack_metas",
    "sample_modality",
]
