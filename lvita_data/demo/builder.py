"""State shared by the demo writers (root, seed, bad records, image list) and the file writers.

Each part of the corpus draws from its own generator, seeded by (seed, sha256 of the part's name),
so parts are independent of each other and of the order they are written in.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pyarrow as pa
import pyarrow.parquet as pq


class Builder:
    """Where the corpus goes and what the writers record about it for the summary."""

    def __init__(self, root: Path, seed: int) -> None:
        self.root = root
        self.seed = seed
        self.bad: list[dict[str, Any]] = []
        """Deliberately bad records: file, row, kind, expected reject reason."""
        self.images: list[dict[str, Any]] = []
        """``longvita/images`` files with width, height and intended grid."""
        self.descriptions: dict[str, str] = {}
        """Image reference -> what is drawn on it (for captions)."""

    def rng(self, part: str) -> np.random.Generator:
        digest = hashlib.sha256(part.encode()).digest()
        return np.random.default_rng([self.seed, int.from_bytes(digest[:8], "little")])

    def mark_bad(self, file: str, row: int, kind: str, reason: str) -> None:
        self.bad.append({"file": file, "row": row, "kind": kind, "reason": reason})


def write_jsonl(path: Path, rows: Sequence[Any]) -> None:
    """Rows are dicts (dumped) or bytes (written verbatim, for malformed lines)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as handle:
        for row in rows:
            handle.write(row if isinstance(row, bytes) else orjson.dumps(row))
            handle.write(b"\n")


def write_parquet(path: Path, table: pa.Table) -> None:
    """Row groups of 8, so readers see several groups in a small file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path, row_group_size=8)


def msg(role: str, content: str) -> dict[str, str]:
    """A turn in the ``messages`` (role/content) schema."""
    return {"role": role, "content": content}


def conv(sender: str, value: str) -> dict[str, str]:
    """A turn in the LLaVA ``conversations`` (from/value) schema."""
    return {"from": sender, "value": value}
