"""The checks of a build as a whole: its files and its accounting.

- Files: every shard of `index.json` has its canonical name; no other `*.tar` or `*.tar.idx`, no
  leftover temporary file; `stats.json` and `rejects.jsonl` parse.
- Accounting: per dataset, the planner's selected rows (`stats.json` "plan", or "datasets" in
  builds before `lvita stats`) == packed (counted from meta.json) + rejected (`rejects.jsonl`);
  totals and per-dataset samples == `stats.json`; with `.lvita-build/plan.json`: keys fall in
  their shard's pack range and every planned sample of a pack is either in it or rejected.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

from lvita_data.errors import ShardFormatError
from lvita_data.fileio import TEMP_MARKER
from lvita_data.shards.format import STATE_DIR, parse_json, shard_name
from lvita_data.verify.report import Problem
from lvita_data.verify.shard import KEY_PATTERN, ShardResult


def read_json(path: Path, problems: list[Problem], what: str) -> Any:
    """The JSON of `path`, or None with a ``files`` problem naming `what` as missing or broken."""
    try:
        return parse_json(path.read_bytes(), what)
    except FileNotFoundError:
        problems.append(Problem("files", f"{what} is missing"))
    except OSError as error:
        problems.append(Problem("files", f"{what} cannot be read: {error.strerror}"))
    except ShardFormatError as error:
        problems.append(Problem("files", f"{what} does not parse: {error}"))
    return None


def check_files(out: Path, index: dict, problems: list[Problem]) -> None:
    """Shard names of `index.json`; unlisted shards and Energon indexes; leftover temporaries."""
    listed = {s["name"] for s in index["shards"]}
    stage = index.get("stage", "")
    for number, entry in enumerate(index["shards"]):
        if entry["name"] != shard_name(stage, number):
            problems.append(
                Problem("files", f"shard {number} is named {entry['name']!r} in index.json")
            )
    for path in sorted(out.iterdir()):
        if path.name.endswith(".tar") and path.name not in listed:
            problems.append(Problem("files", "shard not listed in index.json", path.name))
        if path.name.endswith(".tar.idx") and path.name[: -len(".idx")] not in listed:
            problems.append(Problem("files", "Energon index of an unlisted shard", path.name))
    for path in sorted(out.rglob(f"*{TEMP_MARKER}*")):
        problems.append(Problem("files", f"leftover temporary {path.relative_to(out)}"))


def check_accounting(out: Path, results: list[ShardResult], problems: list[Problem]) -> None:
    """`stats.json` and `rejects.jsonl` against the counts of the shards, then `plan.json`."""
    stats = read_json(out / "stats.json", problems, "stats.json")
    rejects: list[dict] = []
    try:
        lines = (out / "rejects.jsonl").read_bytes().splitlines()
    except OSError:
        problems.append(Problem("files", "rejects.jsonl is missing"))
        lines = []
    for number, line in enumerate(lines, 1):
        if line.strip():
            try:
                reject = parse_json(line, f"rejects.jsonl line {number}")
            except ShardFormatError as error:
                problems.append(Problem("files", str(error)))
                continue
            if not isinstance(reject, dict):
                problems.append(Problem("files", f"rejects.jsonl line {number}: not an object"))
                continue
            rejects.append(reject)
    packed = Counter()
    for result in results:
        packed.update(result.datasets)
    rejected = Counter(str(r.get("dataset")) for r in rejects)
    if not isinstance(stats, dict):
        return
    try:
        # the planner's selection (`plan` since `lvita stats`; `datasets` in older builds) is
        # independent of the shards; `datasets[].selected` is now derived from them
        planned = stats["plan"] if isinstance(stats.get("plan"), list) else stats["datasets"]
        selected = {str(d["name"]): int(d["selected"]) for d in planned}
        measured = {str(d["name"]): int(d["samples"]) for d in stats["datasets"] if "samples" in d}
        total_packs, total_tokens = int(stats["packs"]), int(stats["tokens"])
        stats_rejects = int(stats["rejects"])
    except (KeyError, TypeError, ValueError, OverflowError) as error:
        problems.append(Problem("files", f"stats.json lacks field {error}"))
        return
    for dataset, count in selected.items():
        if packed[dataset] + rejected[dataset] != count:
            problems.append(
                Problem(
                    "accounting",
                    f"dataset {dataset}: {count} selected != {packed[dataset]} packed + "
                    f"{rejected[dataset]} rejected",
                )
            )
    for dataset, count in measured.items():
        if isinstance(stats.get("plan"), list) and count != packed[dataset]:
            problems.append(
                Problem(
                    "accounting",
                    f"dataset {dataset}: stats.json says {count} packed, the shards hold "
                    f"{packed[dataset]}",
                )
            )
    for dataset in sorted((set(packed) | set(rejected)) - set(selected)):
        problems.append(
            Problem("accounting", f"dataset {dataset!r} is packed or rejected but not in stats")
        )
    intact = all(r.scan is not None for r in results)
    if intact and sum(r.samples for r in results) != total_packs:
        problems.append(
            Problem(
                "accounting",
                f"{sum(r.samples for r in results)} packed sequences, stats.json says "
                f"{total_packs}",
            )
        )
    if intact and sum(r.tokens for r in results) != total_tokens:
        problems.append(
            Problem(
                "accounting",
                f"{sum(r.tokens for r in results)} real tokens, stats.json says {total_tokens}",
            )
        )
    if stats_rejects != len(rejects):
        problems.append(
            Problem(
                "accounting", f"rejects.jsonl has {len(rejects)} lines, stats.json {stats_rejects}"
            )
        )
    _check_plan(out, results, rejects, problems)


def _check_plan(
    out: Path, results: list[ShardResult], rejects: list[dict], problems: list[Problem]
) -> None:
    """Keys inside their shard's pack range; planned = packed + build-rejected, per pack."""
    try:
        plan = parse_json((out / STATE_DIR / "plan.json").read_bytes(), "plan.json")
    except (OSError, ShardFormatError):
        return  # no saved plan (e.g. a copied dataset): nothing to compare with
    if not isinstance(plan, dict) or not {"files", "shards", "pack_offset"} <= set(plan):
        return  # a plan of another layout (the columnar plan): nothing to compare with
    try:
        _compare_plan(plan, results, rejects, problems)
    except (KeyError, TypeError, ValueError, IndexError, AttributeError, OverflowError) as error:
        problems.append(Problem("plan", f".lvita-build/plan.json is malformed ({error!r})"))


def _compare_plan(
    plan: Any, results: list[ShardResult], rejects: list[dict], problems: list[Problem]
) -> None:
    files = [str(f["path"]) for f in plan["files"]]
    shards, offsets = plan["shards"], plan["pack_offset"]
    if len(shards) != len(results):
        problems.append(
            Problem("plan", f"plan.json has {len(shards)} shard(s), index.json {len(results)}")
        )
        return
    rejected = Counter((str(r.get("file")), str(r.get("record"))) for r in rejects)
    for number, (result, packs) in enumerate(zip(results, shards, strict=True)):
        first = int(offsets[number])
        for key, refs in result.refs.items():
            try:
                pack = int(key) - first
            except ValueError:
                continue
            if not 0 <= pack < len(packs):
                problems.append(
                    Problem("plan", "key outside the shard's planned pack range", result.name, key)
                )
                continue
            planned = Counter((files[f], str(row)) for f, row in packs[pack])
            missing = planned - Counter(refs)
            extra = Counter(refs) - planned
            unexplained = missing - rejected
            if extra or unexplained:
                problems.append(
                    Problem(
                        "plan",
                        f"packed samples differ from plan.json: {sum(extra.values())} unplanned, "
                        f"{sum(unexplained.values())} planned but neither packed nor rejected",
                        result.name,
                        key,
                    )
                )
        ordered = [int(k) for k in result.keys if KEY_PATTERN.match(k)]
        if ordered != sorted(ordered):
            problems.append(Problem("plan", "keys are not in pack order", result.name))
