"""Readers of native dataset files, one module per format, all yielding `RawRecord`.

`open_source(path, fmt=..., dataset=..., media_root=...)` returns a `Source`: ``len()`` is the
number of rows of the file (malformed ones included), ``read(row)`` normalizes one row or raises
`SkipSample`. A file that cannot be opened raises `SourceError`. Formats:

- ``longvita_jsonl``: Long-VITA-Training-Data annotations (`longvita_jsonl`);
- ``llava_json``: ShareGPT4V / LLaVA-ReCap / LLaVA-Video-178K JSON arrays or JSONL (`llava_json`);
- ``hf_parquet``: the_cauldron and LLaVA-OneVision-Data parquet files (`hf_parquet`);
- ``text_jsonl``: long-text sets, ``messages`` or Alpaca style (`text_jsonl`).
"""

from __future__ import annotations

from lvita_data.errors import SourceError
from lvita_data.records.base import Source
from lvita_data.records.hf_parquet import HfParquetSource
from lvita_data.records.llava_json import LlavaJsonSource
from lvita_data.records.longvita_jsonl import LongVitaJsonlSource
from lvita_data.records.text_jsonl import TextJsonlSource

READERS: dict[str, type[Source]] = {
    "longvita_jsonl": LongVitaJsonlSource,
    "llava_json": LlavaJsonSource,
    "hf_parquet": HfParquetSource,
    "text_jsonl": TextJsonlSource,
}


def open_source(path: str, *, fmt: str, dataset: str, media_root: str | None) -> Source:
    """Open one native file of a dataset entry with the reader of `fmt`."""
    try:
        reader = READERS[fmt]
    except KeyError:
        raise SourceError(
            f"{path}: unknown format {fmt!r}, expected one of {sorted(READERS)}"
        ) from None
    return reader(str(path), dataset=dataset, media_root=media_root)


__all__ = ["READERS", "Source", "open_source"]
