"""The checks of one shard (`verify_shard`, one task of `verify_build`'s pool).

- Checksum: the shard's size and sha256 are those of `index.json`.
- Tar structure, with the lenient `lvita_data.shards.tar.scan_tar` (Python's `tarfile` silently
  ends an archive at a damaged header): every header block has a valid checksum and is
  byte-identical to the header lvita's writer produces for that name and size; data padding and
  the end-of-archive area are zero. So a flipped byte in any header, padding or trailer block is
  located exactly; a damaged header is attributed to its member's sample key (or the nearest key
  when its name is damaged too).
- Members: those of a sample are contiguous and not repeated, keys are 9 digits; each sample
  passes `check_sample` when the build settings are readable.
- Per-sample digests (`sample_digest`), when the build recorded them (in the completion records
  `.lvita-build/done/{shard}.json` under "digests", or per shard in `index.json` under
  "digests"): a changed byte anywhere inside a sample's member data names the shard and key even
  where the content still passes every invariant (e.g. a text id turned into another id).
- Counts: the shard's samples and real tokens are those of `index.json`.
"""

from __future__ import annotations

import hashlib
import mmap
import os
import re
import stat
from collections import Counter
from dataclasses import dataclass, field

from lvita_data.shards.format import ARRAY_MEMBERS, ARRAYS_NPZ, sample_digest
from lvita_data.shards.tar import TarMember, TarProblem, TarScan, scan_tar, split_member_name
from lvita_data.verify.report import Problem
from lvita_data.verify.sample import SampleSummary, check_sample
from lvita_data.verify.settings import Settings

MAX_PROBLEMS_PER_SHARD = 200
KEY_PATTERN = re.compile(r"^\d{9}$")
FIRST_MEMBERS = (min(f"{name}.npy" for name in ARRAY_MEMBERS), ARRAYS_NPZ)
"""Members are written in sorted name order: every sample starts with cu_seqlens.npy (format 1)
or arrays.npz (formats 2 and 3)."""


@dataclass(slots=True)
class ShardResult:
    """What one shard contributes to the report (problems, counts) and to the build-wide checks
    (keys, packed samples per dataset and their (file, record) refs, the tar scan)."""

    name: str
    problems: list[Problem] = field(default_factory=list)
    keys: list[str] = field(default_factory=list)
    samples: int = 0
    tokens: int = 0
    tiles: int = 0
    images: int = 0
    digests_checked: int = 0
    datasets: Counter = field(default_factory=Counter)
    refs: dict[str, list[tuple[str, str]]] = field(default_factory=dict)
    scan: TarScan | None = None
    intact: bool = False
    """sha256 and size match index.json."""


@dataclass(frozen=True, slots=True)
class ShardTask:
    """One shard to check: its path, its `index.json` entry, the build settings, its digests."""

    path: str
    entry: dict
    settings: Settings | None
    """None: the build settings are unreadable; only checksums, tar structure and digests."""
    digests: dict[str, str] | None
    """The per-sample digests the build recorded for this shard; None when it recorded none."""


def _attribute(scan: TarScan, problem: TarProblem) -> tuple[str | None, str | None]:
    """(key, member name) a tar-level problem belongs to, the nearest key when damaged."""
    if problem.member_index is not None and 0 <= problem.member_index < len(scan.members):
        name = scan.members[problem.member_index].name
        return split_member_name(name)[0], name
    before = scan.members[problem.before] if problem.before is not None else None
    after = next((m for m in scan.members if m.header_offset > problem.offset), None)
    before_key = split_member_name(before.name)[0] if before else None
    after_key = split_member_name(after.name)[0] if after else None
    if problem.name:
        key, part = split_member_name(problem.name)
        if key in (before_key, after_key) and KEY_PATTERN.match(key or ""):
            return key, problem.name
        if "PaxHeader" in problem.name and after is not None:
            return after_key, after.name  # a PAX header belongs to the member after it
        if part in FIRST_MEMBERS and after_key:
            return after_key, None  # the first member of every sample
        if before is not None and after is not None and before_key != after_key:
            # members are sorted per sample: a part after `before`'s continues its sample, one
            # before `after`'s starts `after`'s (e.g. meta.json, the last member of format 3)
            joins_before = part > split_member_name(before.name)[1]
            joins_after = part < split_member_name(after.name)[1]
            if joins_before != joins_after:
                return (before_key if joins_before else after_key), None
    if before_key is None or before_key == after_key:
        return after_key, None
    if after_key is None:
        return before_key, None
    return f"{before_key} or {after_key}", None


def verify_shard(task: ShardTask) -> ShardResult:
    """Checksum, tar structure, per-sample checks and digests of one shard."""
    name = task.entry["name"]
    result = ShardResult(name)
    problems = result.problems
    path = task.path
    try:
        status = os.lstat(path)
    except OSError:
        problems.append(Problem("files", "shard listed in index.json is missing", name))
        return result
    if not stat.S_ISREG(status.st_mode):  # a symlink could point outside the build
        problems.append(Problem("files", "shard is not a regular file of the build", name))
        return result
    size = status.st_size
    with open(path, "rb") as handle:
        if size == 0:
            problems.append(Problem("files", "shard is empty", name))
            return result
        with mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as data:
            digest = hashlib.sha256(data).hexdigest()
            result.intact = size == task.entry["bytes"] and digest == task.entry["sha256"]
            if size != task.entry["bytes"]:
                problems.append(
                    Problem(
                        "checksum", f"{size} bytes, index.json says {task.entry['bytes']}", name
                    )
                )
            elif digest != task.entry["sha256"]:
                problems.append(Problem("checksum", "sha256 differs from index.json", name))
            scan = scan_tar(data)
            result.scan = scan
            for tar_problem in scan.problems:
                key, member = _attribute(scan, tar_problem)
                message = tar_problem.message
                if member is None and tar_problem.name and "PaxHeader" not in tar_problem.name:
                    message += f" (its name field reads {tar_problem.name!r})"
                problems.append(Problem("tar", message, name, key, member, tar_problem.offset))
            _check_members(data, scan, task, result)
    if not result.intact and len(problems) == 1:
        problems.append(
            Problem(
                "checksum",
                "the damage could not be located: every member passes its checks"
                + ("" if task.digests else " and this build has no per-sample digests"),
                name,
            )
        )
    if len(problems) > MAX_PROBLEMS_PER_SHARD:
        extra = len(problems) - MAX_PROBLEMS_PER_SHARD
        del problems[MAX_PROBLEMS_PER_SHARD:]
        problems.append(Problem("tar", f"... {extra} more problem(s) in this shard", name))
    return result


def _check_members(data, scan: TarScan, task: ShardTask, result: ShardResult) -> None:
    name, settings = result.name, task.settings
    groups: list[tuple[str, dict[str, TarMember]]] = []
    seen: set[str] = set()
    for member in scan.members:
        key, part = split_member_name(member.name)
        if not groups or groups[-1][0] != key:
            if key in seen:
                result.problems.append(
                    Problem("tar", "members of this key are not contiguous", name, key, part)
                )
            seen.add(key)
            groups.append((key, {}))
        if part in groups[-1][1]:
            result.problems.append(Problem("tar", "duplicate member", name, key, part))
        groups[-1][1][part] = member
    for key, members in groups:  # one sample's bytes in memory at a time
        parts = {
            part: bytes(data[m.data_offset : m.data_offset + m.size]) for part, m in members.items()
        }
        if not KEY_PATTERN.match(key):
            result.problems.append(Problem("sample", "key is not 9 digits", name, key))
        if settings is not None:
            problems, summary = check_sample(name, key, parts, settings)
            result.problems.extend(problems)
        else:
            summary = SampleSummary()
        if task.digests is not None:
            expected = task.digests.get(key)
            if expected is None:
                result.problems.append(Problem("digest", "no recorded digest", name, key))
            elif sample_digest({"__key__": key, **parts}) != expected:
                result.problems.append(
                    Problem(
                        "digest",
                        "member bytes differ from what the build wrote (sample digest mismatch)",
                        name,
                        key,
                    )
                )
            result.digests_checked += 1
        result.keys.append(key)
        result.samples += 1
        result.tokens += summary.tokens
        result.tiles += summary.tiles
        result.images += summary.images
        result.datasets.update(summary.datasets)
        result.refs[key] = summary.refs
    if task.digests is not None:
        missing = sorted(set(task.digests) - set(result.keys))
        if missing:
            result.problems.append(
                Problem("digest", f"recorded samples missing from the shard: {missing[:5]}", name)
            )
    entry = task.entry
    if result.samples != entry["samples"]:
        result.problems.append(
            Problem(
                "accounting", f"{result.samples} samples, index.json says {entry['samples']}", name
            )
        )
    if settings is not None and result.tokens != entry["tokens"]:
        result.problems.append(
            Problem(
                "accounting",
                f"{result.tokens} real tokens, index.json says {entry['tokens']}",
                name,
            )
        )
