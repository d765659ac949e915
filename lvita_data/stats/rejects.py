"""The rejects of a build as `lvita stats` reports them: counts by dataset and reason and by
phase, and the first few records of each (dataset, reason) as examples.

`RejectTally.add` takes one reject at a time, either from the build's `Reject` objects
(`RejectTally.of`) or from the lines of `rejects.jsonl` (`read_rejects`, streamed), so that both
give the same statistics. Memory is O(datasets x reasons x MAX_EXAMPLES) whatever the number of
rejects (a build can reject 100K+ records): the examples are the first `MAX_EXAMPLES` of each
(dataset, reason) in `rejects.jsonl` order, which is the order of the build's list.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from lvita_data.errors import ShardFormatError, StatsError
from lvita_data.schema import Reject
from lvita_data.shards.format import parse_json

MAX_EXAMPLES = 3
"""Example records kept per (dataset, reason): the first ones, in `rejects.jsonl` order."""
MAX_EXAMPLE_CHARS = 500
"""Longer file, record or detail strings of an example are cut to this many characters."""
PHASES = ("plan", "pack", "build")
"""Where a reject was found, in build order (`Reject.phase`)."""


def _clip(text: str) -> str:
    """`text` as plain, writable JSON: a lone surrogate (from a JSON escape in an untrusted
    `rejects.jsonl`) spelled out as ``\\udc80``, at most `MAX_EXAMPLE_CHARS` characters."""
    text = text.encode("utf-8", "backslashreplace").decode("utf-8")
    if len(text) > MAX_EXAMPLE_CHARS:
        text = text[: MAX_EXAMPLE_CHARS - 1] + "…"
    return text


@dataclass(slots=True)
class RejectTally:
    """Reject counts by dataset and reason and by phase, plus the examples."""

    by_dataset: dict[str, Counter] = field(default_factory=dict)
    by_phase: Counter = field(default_factory=Counter)
    examples: dict[tuple[str, str], list[dict[str, str]]] = field(default_factory=dict)
    """(dataset, reason) -> its first MAX_EXAMPLES rejects: file, record, reason, detail, phase."""

    @classmethod
    def of(cls, rejects: Iterable[Reject]) -> RejectTally:
        tally = cls()
        for r in rejects:
            tally.add(
                r.dataset, str(r.reason), r.phase, file=r.file, record=r.record, detail=r.detail
            )
        return tally

    def add(
        self, dataset: str, reason: str, phase: str, *, file: str, record: str, detail: str
    ) -> None:
        counts = self.by_dataset.setdefault(dataset, Counter())
        counts[reason] += 1
        self.by_phase[phase] += 1
        if counts[reason] <= MAX_EXAMPLES:
            self.examples.setdefault((dataset, reason), []).append(
                {
                    "file": _clip(file),
                    "record": _clip(record),
                    "reason": reason,
                    "detail": _clip(detail),
                    "phase": phase,
                }
            )

    def to_json(self, names: Sequence[str]) -> dict:
        """The reject keys of stats.json; datasets in the order of `names` (every dataset with
        rejects is in it), reasons sorted."""
        by_reason: Counter = Counter()
        for counts in self.by_dataset.values():
            by_reason.update(counts)
        datasets = [name for name in names if name in self.by_dataset]
        return {
            "rejects": sum(by_reason.values()),
            "rejects_by_reason": {r: by_reason[r] for r in sorted(by_reason)},
            "rejects_by_phase": {p: self.by_phase[p] for p in PHASES if self.by_phase[p]},
            "rejects_by_dataset": {
                name: {r: self.by_dataset[name][r] for r in sorted(self.by_dataset[name])}
                for name in datasets
            },
            "reject_examples": {
                name: {r: self.examples[name, r] for r in sorted(self.by_dataset[name])}
                for name in datasets
            },
        }


def read_rejects(path: Path) -> RejectTally:
    """The tally of `rejects.jsonl`, read line by line; each line must be an object with a
    dataset and a reason (a build written before the phase was recorded: "plan")."""
    tally = RejectTally()
    try:
        with open(path, "rb") as handle:
            for number, line in enumerate(handle, 1):
                if not line.strip():
                    continue
                try:
                    reject = parse_json(line, f"{path} line {number}")
                except ShardFormatError as error:
                    raise StatsError(str(error)) from None
                if (
                    not isinstance(reject, dict)
                    or "dataset" not in reject
                    or "reason" not in reject
                ):
                    raise StatsError(f"{path} line {number}: not a reject (dataset, reason)")
                tally.add(
                    str(reject["dataset"]),
                    str(reject["reason"]),
                    str(reject.get("phase", "plan")),
                    file=str(reject.get("file", "")),
                    record=str(reject.get("record", "")),
                    detail=str(reject.get("detail", "")),
                )
    except FileNotFoundError:
        raise StatsError(f"{path} not found: not a finished lvita build") from None
    except OSError as error:
        raise StatsError(f"{path}: cannot read: {error.strerror}") from None
    return tally


__all__ = ["MAX_EXAMPLES", "MAX_EXAMPLE_CHARS", "PHASES", "RejectTally", "read_rejects"]
