"""Read rows of native files and tokenize them: the one step planning and the build share.

`read_and_tokenize(rows, tokenizer, convert)` reads every row once, in the order given (callers
go file by file in ascending rows, so a parquet row group or a JSONL line index is visited once),
encodes the distinct turn texts of each chunk of `ENCODE_CHUNK` records with one
`encode_batch` call (prompts repeat a lot in real sets, "Describe the image."), and hands every
record with its per-turn ids to `convert`: `plan_record` when planning (lengths from media
metadata), `tokenize_record` when building (the ids themselves). It yields ``(key, outcome)``
chunk by chunk, so at most one chunk of records is alive at a time: planning a 1M-row file
keeps only what the caller keeps of each outcome (measured: 3.4 kB per row when every record
was held until the file ended). A row that cannot be read or
converted raises `SkipSample` in the readers and the sample rules; it becomes its counted
`Reject` here, and only here. Other errors (a file that vanished, a bug) propagate: a system
error is never a reject.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Iterable, Iterator, Sequence
from functools import lru_cache
from typing import Generic, NamedTuple, TypeVar

from lvita_data.errors import SkipSample
from lvita_data.records.base import Source
from lvita_data.samples.template import ChatTemplate
from lvita_data.schema import RawRecord, Reject, RejectReason
from lvita_data.tokenizer.tokenizer import LongVitaTokenizer, load_tokenizer

ENCODE_CHUNK = 2048
"""Records whose (deduplicated) turns are tokenized in one `encode_batch` call."""

K = TypeVar("K", bound=Hashable)
T = TypeVar("T")


class Row(NamedTuple, Generic[K]):
    """One row to read: `key` names its outcome, `path` is the file as the plan names it (what
    a reject reports), `offset` where the row starts in the file when the plan knows it
    (`Source.offsets`; -1: find it by row number). A named tuple: the planner makes one per
    row, at a third of a frozen dataclass's cost."""

    key: K
    source: Source
    path: str
    row: int
    offset: int = -1

    def reject(self, skip: SkipSample) -> Reject:
        reason = RejectReason(skip.reason)
        return Reject(self.source.dataset, self.path, str(self.row), reason, skip.detail)


@lru_cache(maxsize=4)
def tokenizer_and_template(spec: str) -> tuple[LongVitaTokenizer, ChatTemplate]:
    """The tokenizer of a manifest's ``tokenizer`` spec and its ChatML template (cached)."""
    tokenizer = load_tokenizer(spec)
    return tokenizer, ChatTemplate.from_encoder(tokenizer.special_ids, tokenizer.encode)


def read_and_tokenize(
    rows: Iterable[Row[K]],
    tokenizer: LongVitaTokenizer,
    convert: Callable[[RawRecord, Sequence[Sequence[int]]], T],
    *,
    chunk: int = ENCODE_CHUNK,
) -> Iterator[tuple[K, T | Reject]]:
    """``(row.key, convert(record, per-turn ids) or its Reject)`` for every row, one chunk of
    rows at a time (see the module docstring)."""
    records: list[tuple[Row[K], RawRecord]] = []
    for row in rows:
        try:
            if row.offset < 0:
                records.append((row, row.source.read(row.row)))
            else:
                records.append((row, row.source.read_at(row.row, row.offset)))
        except SkipSample as skip:
            yield row.key, row.reject(skip)
        if len(records) == chunk:
            yield from _convert_chunk(records, tokenizer, convert)
            records = []
    yield from _convert_chunk(records, tokenizer, convert)


def _convert_chunk(
    records: list[tuple[Row[K], RawRecord]],
    tokenizer: LongVitaTokenizer,
    convert: Callable[[RawRecord, Sequence[Sequence[int]]], T],
) -> Iterator[tuple[K, T | Reject]]:
    texts = list(dict.fromkeys(turn.content for _, record in records for turn in record.turns))
    encoded = dict(zip(texts, tokenizer.encode_batch(texts), strict=True)) if texts else {}
    for row, record in records:
        try:
            outcome = convert(record, [encoded[t.content] for t in record.turns])
        except SkipSample as skip:
            outcome = row.reject(skip)
        yield row.key, outcome
