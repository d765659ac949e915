"""Atomic file writes and checksums: the one way lvita writes a file someone else may read.

Every file of a build (shards, JSON, text, Energon metadata), a plan, a tokenizer cache and a
training checkpoint's side files is written to a temporary name next to its final path
(`temporary_name`: ``{path}.tmp-{pid}-{random}``, recognised by `TEMP_MARKER`), flushed and
fsync'ed, then renamed over the final name (`os.replace`, atomic on POSIX within a directory).
So a reader, or a writer killed with SIGKILL, never sees a partial file; the temporary is removed
when writing fails, and a killed writer's leftovers match ``*.tmp-*`` (a resumed build deletes
them).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from typing import IO, Any

TEMP_MARKER = ".tmp-"
"""Part of every temporary file name (`temporary_name`); `*.tmp-*` files are leftovers."""


def temporary_name(path: str | os.PathLike[str]) -> str:
    """A temporary name next to `path`, unique per process and call."""
    return f"{os.fspath(path)}{TEMP_MARKER}{os.getpid()}-{secrets.token_hex(4)}"


@contextmanager
def atomic_open(path: str | os.PathLike[str], mode: str, **kwargs: Any) -> Iterator[IO]:
    """Open a temporary file for `path`; on success fsync it and rename it to `path`."""
    temporary = temporary_name(path)
    try:
        with open(temporary, mode, **kwargs) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise


def write_bytes_atomic(path: str | os.PathLike[str], data: bytes) -> None:
    with atomic_open(path, "wb") as handle:
        handle.write(data)


def write_text_atomic(path: str | os.PathLike[str], text: str) -> None:
    with atomic_open(path, "w", encoding="utf-8") as handle:
        handle.write(text)


def write_json_atomic(
    path: str | os.PathLike[str], payload: Any, *, indent: int | None = 1
) -> None:
    """JSON (keys in insertion order, UTF-8, trailing newline), written atomically."""
    with atomic_open(path, "w", encoding="utf-8") as handle:
        json.dump(payload, handle, ensure_ascii=False, indent=indent, sort_keys=False)
        handle.write("\n")


def sha256_file(path: str | os.PathLike[str], chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()
