"""`verify_build`: check a finished build directory and return its `VerifyReport`.

Reads `index.json` (its shard list and format, one of `SHARD_FORMATS`; each pack's meta.json
must name the same format) and the build settings (`load_settings`; when
they are unreadable only checksums, tar structure and digests are checked), then checks the
files (`check_files`), each shard (`verify_shard`, in `workers` processes of
`lvita_data.pool.map_tasks`), that no key is used by two shards, the accounting
(`check_accounting`) and, when `.nv-meta/` exists, the Energon metadata
(`lvita_data.shards.energon.check_energon_metadata`, only over intact shards).
"""

from __future__ import annotations

import os
from pathlib import Path

from tqdm import tqdm

from lvita_data.errors import ShardFormatError
from lvita_data.pool import map_tasks
from lvita_data.shards.energon import check_energon_metadata, layout_from_scan
from lvita_data.shards.format import STATE_DIR, parse_json
from lvita_data.shards.index import check_index
from lvita_data.verify.accounting import check_accounting, check_files, read_json
from lvita_data.verify.report import Problem, VerifyReport
from lvita_data.verify.settings import Settings, load_settings
from lvita_data.verify.shard import ShardTask, verify_shard


def _recorded_digests(out: Path, entry: dict) -> dict[str, str] | None:
    if isinstance(entry.get("digests"), dict):
        return entry["digests"]
    done = out / STATE_DIR / "done" / f"{entry['name']}.json"
    try:
        record = parse_json(done.read_bytes(), str(done))
    except (OSError, ShardFormatError):
        return None
    digests = record.get("digests") if isinstance(record, dict) else None
    return digests if isinstance(digests, dict) else None


def verify_build(
    out_dir: str | os.PathLike[str],
    *,
    workers: int = 1,
    decode_tiles: bool = True,
    progress: bool = False,
) -> VerifyReport:
    """Check a build directory (see `lvita_data.verify`); never raises for a damaged build."""
    out = Path(out_dir)
    report = VerifyReport(str(out), tiles_decoded=decode_tiles)
    problems = report.problems
    if not out.is_dir():
        problems.append(Problem("files", "not a directory"))
        return report
    index = read_json(out / "index.json", problems, "index.json")
    if index is None:
        return report
    try:  # the loader's schema: types, ranges, plain unique names (confined to the build)
        check_index(out / "index.json", index)
        for number, entry in enumerate(index["shards"]):
            if not isinstance(entry.get("sha256"), str) or type(entry.get("tokens")) is not int:
                raise ShardFormatError(f"index.json: shards[{number}] sha256 / tokens malformed")
    except ShardFormatError as error:
        problems.append(Problem("files", str(error)))
        return report
    shards = list(index["shards"])
    report.shards = len(shards)
    settings: Settings | None
    try:
        settings = load_settings(out, index, decode_tiles=decode_tiles)
    except Exception as error:  # missing/odd manifest copy, tokenizer not loadable, ...
        message = f"cannot read the build settings ({error}): only checksums and tar structure"
        problems.append(Problem("build", message))
        settings = None
    check_files(out, index, problems)
    tasks = [
        ShardTask(str(out / entry["name"]), entry, settings, _recorded_digests(out, entry))
        for entry in shards
    ]
    results = list(
        tqdm(
            map_tasks(verify_shard, tasks, workers=workers, ordered=True),
            total=len(tasks),
            desc=f"verify {out.name}",
            unit="shard",
            disable=not progress,
        )
    )
    owners: dict[str, str] = {}
    for result in results:
        problems.extend(result.problems)
        report.samples += result.samples
        report.tokens += result.tokens
        report.tiles += result.tiles
        report.images += result.images
        report.digests_checked += result.digests_checked
        for key in result.keys:
            if key in owners and owners[key] != result.name:
                problems.append(Problem("tar", f"key also used in {owners[key]}", result.name, key))
            owners.setdefault(key, result.name)
    if settings is not None:
        check_accounting(out, results, problems)
    clean = all(r.intact and r.scan is not None and not r.scan.problems for r in results)
    if clean and (out / ".nv-meta").is_dir():  # Energon's view needs every shard intact
        layouts = [layout_from_scan(r.name, r.scan) for r in results]  # type: ignore[arg-type]
        problems.extend(
            Problem("energon", message) for message in check_energon_metadata(out, layouts)
        )
    return report
