"""Shared parts of the source readers: the `Source` base class and row-normalization helpers.

Every reader turns one row of a native file into a `RawRecord` or raises
`SkipSample(reason, detail)`; a file that cannot be used at all raises `SourceError` when it is
opened. Rules common to all formats:

- Roles: ``user``/``human`` -> user, ``assistant``/``gpt`` -> assistant, ``system`` -> system
  (case-insensitive); anything else is ``unknown_role``. A system turn is only allowed first
  (a later one is ``unknown_role`` too).
- Content is kept verbatim (no stripping). No turns at all is ``empty_conversation``; no assistant
  turn with non-blank content is ``no_assistant_turn``.
- The number of ``<image>`` tags over all turns must equal the number of images, and the same for
  ``<video>`` (``tag_mismatch``).
- Media paths are resolved lexically (``os.path.normpath``, symlinks are not followed) against
  ``media_root``. An absolute path, or one that leaves the root through ``..``, is
  ``media_path_escape``. When no ``media_root`` is configured, relative paths resolve against the
  directory of the source file instead, and must stay inside it. Whether the file exists is not
  checked here (the media probe does that later and rejects with ``missing_media``).
"""

from __future__ import annotations

import abc
import bisect
import os
from collections.abc import Iterable, Sequence
from typing import Any, Literal

import numpy as np
import orjson

from lvita_data.errors import SkipSample, SourceError
from lvita_data.schema import MediaRef, RawRecord, RejectReason, Role, Turn
from lvita_data.tokenizer.special_tokens import IMAGE_TAG, VIDEO_TAG

ROLE_ALIASES: dict[str, Role] = {
    "user": "user",
    "human": "user",
    "assistant": "assistant",
    "gpt": "assistant",
    "system": "system",
}


def skip(reason: RejectReason, detail: str = "") -> SkipSample:
    """A `SkipSample` for `reason` (use as ``raise skip(...)``)."""
    return SkipSample(str(reason), detail)


def type_name(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def normalize_role(raw: Any) -> Role:
    """Map a native role name to ``system`` / ``user`` / ``assistant``."""
    if not isinstance(raw, str):
        raise skip(RejectReason.bad_field_type, f"role must be a string, got {type_name(raw)}")
    role = ROLE_ALIASES.get(raw.strip().lower())
    if role is None:
        raise skip(RejectReason.unknown_role, f"unknown role {raw!r}")
    return role


def make_turns(pairs: Iterable[tuple[Any, Any]], *, where: str = "messages") -> list[Turn]:
    """Turns from (role, content) pairs as found in the row; types and roles are checked."""
    turns: list[Turn] = []
    for i, (raw_role, content) in enumerate(pairs):
        role = normalize_role(raw_role)
        if not isinstance(content, str):
            raise skip(
                RejectReason.bad_field_type,
                f"{where}[{i}] content must be a string, got {type_name(content)}",
            )
        turns.append(Turn(role=role, content=content))
    return turns


def _plain_turns(items: list[Any], role_key: str, content_key: str) -> list[Turn] | None:
    """The turns of the common row (mappings, role names as `ROLE_ALIASES` spells them, string
    contents) in one pass; None for anything else, which the checked path then names."""
    turns = []
    for item in items:
        if type(item) is not dict:
            return None
        raw, content = item.get(role_key), item.get(content_key)
        if type(raw) is not str or type(content) is not str or raw not in ROLE_ALIASES:
            return None
        turns.append(Turn(ROLE_ALIASES[raw], content))
    return turns


def turns_from_list(
    value: Any, *, role_key: str, content_key: str, where: str = "messages"
) -> list[Turn]:
    """Turns from a list of ``{role_key: ..., content_key: ...}`` mappings."""
    plain = _plain_turns(value, role_key, content_key) if type(value) is list else None
    if plain is not None:
        return plain
    if not isinstance(value, list):
        raise skip(RejectReason.bad_field_type, f"{where} must be a list, got {type_name(value)}")
    pairs = []
    for i, item in enumerate(value):
        if not isinstance(item, dict):
            raise skip(
                RejectReason.bad_field_type,
                f"{where}[{i}] must be a mapping, got {type_name(item)}",
            )
        pairs.append((item.get(role_key), item.get(content_key)))
    return make_turns(pairs, where=where)


def turns_from_row(row: dict[str, Any]) -> list[Turn]:
    """Turns of a JSON row: ``messages`` with role/content, else ``conversations`` with
    from/value (LLaVA style); the keys of each item are chosen by the first item."""
    if "messages" in row:
        key, value = "messages", row["messages"]
    elif "conversations" in row:
        key, value = "conversations", row["conversations"]
    else:
        raise skip(RejectReason.bad_field_type, "row has neither 'messages' nor 'conversations'")
    if isinstance(value, list) and value and isinstance(value[0], dict) and "from" in value[0]:
        return turns_from_list(value, role_key="from", content_key="value", where=key)
    return turns_from_list(value, role_key="role", content_key="content", where=key)


def validate_turns(turns: Sequence[Turn]) -> None:
    """Structure checks: non-empty, system only first, one assistant turn with content."""
    if not turns:
        raise skip(RejectReason.empty_conversation, "no turns")
    supervised = False  # an assistant turn with non-blank content (`bool(content.strip())`)
    for i, turn in enumerate(turns):
        if turn.role == "assistant":
            supervised = supervised or not (turn.content.isspace() or not turn.content)
        elif turn.role == "system" and i > 0:
            raise skip(RejectReason.unknown_role, f"system turn at position {i} (only first)")
    if not supervised:
        raise skip(RejectReason.no_assistant_turn, "no assistant turn with content")


def count_tags(turns: Sequence[Turn], tag: str) -> int:
    return sum(t.content.count(tag) for t in turns)


def check_tags(turns: Sequence[Turn], num_images: int, num_videos: int) -> None:
    images = videos = 0
    for turn in turns:
        if "<" in turn.content:  # both tags start with "<": one scan for most turns
            images += turn.content.count(IMAGE_TAG)
            videos += turn.content.count(VIDEO_TAG)
    for tag, expected, found in ((IMAGE_TAG, num_images, images), (VIDEO_TAG, num_videos, videos)):
        if found != expected:
            raise skip(
                RejectReason.tag_mismatch,
                f"{found} {tag} tag(s) in the turns but {expected} {tag[1:-1]}(s)",
            )


def prepend_to_first_user_turn(turns: list[Turn], prefix: str) -> list[Turn]:
    """Insert `prefix` at the start of the first user turn (copy of the list)."""
    for i, turn in enumerate(turns):
        if turn.role == "user":
            out = list(turns)
            out[i] = Turn(role="user", content=prefix + turn.content)
            return out
    raise skip(RejectReason.tag_mismatch, f"no user turn to attach {prefix.strip()!r} to")


def str_list(value: Any, *, field: str) -> list[str]:
    """A media field: absent/null -> [], a string -> [it], a list of strings -> it."""
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return list(value)
    raise skip(
        RejectReason.bad_field_type,
        f"{field} must be a string or a list of strings, got {type_name(value)}",
    )


def resolve_media(name: Any, kind: Literal["image", "video"], root: str) -> MediaRef:
    """A `MediaRef` with the absolute path of `name` inside `root` (an absolute directory)."""
    if not isinstance(name, str) or not name:
        raise skip(RejectReason.bad_field_type, f"{kind} path must be a non-empty string")
    if "\x00" in name:
        raise skip(RejectReason.bad_field_type, f"{kind} path contains a NUL byte")
    if os.path.isabs(name):
        raise skip(RejectReason.media_path_escape, f"absolute {kind} path {name!r}")
    path = os.path.normpath(os.path.join(root, name))
    # root is absolute and normalized, so "inside" is a prefix test (commonpath is 5x slower).
    if not path.startswith(root.rstrip(os.sep) + os.sep):
        raise skip(RejectReason.media_path_escape, f"{kind} path {name!r} leaves {root}")
    return MediaRef(kind=kind, path=path, name=name)


def _is_plain_name(name: str) -> bool:
    """A relative POSIX path without empty, "." or ".." parts, NUL or a trailing slash: joined
    to a normalized absolute base, `os.path.normpath` leaves it as it is, inside the base."""
    return (
        PLAIN_SEPARATORS
        and name != ""
        and not name.startswith(("/", "."))
        and "/." not in name
        and "//" not in name
        and not name.endswith("/")
        and "\x00" not in name
    )


PLAIN_SEPARATORS = os.sep == "/" and os.altsep is None
"""`_is_plain_name`'s test holds only where "/" is the one separator."""


def parse_json_line(line: bytes) -> Any:
    try:
        return orjson.loads(line)
    except orjson.JSONDecodeError as error:
        raise skip(RejectReason.malformed_json, str(error)) from None


def require_mapping(row: Any) -> dict[str, Any]:
    if not isinstance(row, dict):
        raise skip(RejectReason.bad_field_type, f"row must be an object, got {type_name(row)}")
    return row


class Source(abc.ABC):
    """One native file of a dataset entry: ``len()`` rows, ``read(row)`` normalizes one of them.

    Every row counts in ``len()``, malformed ones included (the mixture shuffles the indices
    ``0 .. len-1``). ``read`` raises `SkipSample` for a row that cannot become a record.
    """

    format: str = ""

    def __init__(self, path: str, *, dataset: str, media_root: str | None) -> None:
        self.path = os.path.abspath(path)
        self.dataset = dataset
        self.media_root = None if media_root is None else os.path.abspath(media_root)
        self._media_base = self.media_root or os.path.dirname(self.path)
        self._media_prefix = self._media_base.rstrip(os.sep) + os.sep

    @abc.abstractmethod
    def __len__(self) -> int: ...

    @abc.abstractmethod
    def read(self, row: int) -> RawRecord:
        """The normalized record of `row` (0-based), or `SkipSample`."""

    def offsets(self, rows: np.ndarray) -> np.ndarray:
        """Where each of `rows` starts in the file (int64), for `read_at`; -1 where the format
        has no such offset (JSON arrays, parquet)."""
        return np.full(rows.shape[0], -1, dtype=np.int64)

    def read_at(self, row: int, offset: int) -> RawRecord:
        """`read(row)` given the row's offset from `offsets` (of the same file): JSON Lines
        read that one line only. -1 falls back to `read`."""
        return self.read(row)

    def _check_row(self, row: int) -> None:
        if not 0 <= row < len(self):
            raise IndexError(f"{self.path}: row {row} out of range [0, {len(self)})")

    def resolve(self, name: Any, kind: Literal["image", "video"]) -> MediaRef:
        """Resolve a media path against ``media_root`` (or the source file's directory)."""
        if type(name) is str and _is_plain_name(name):  # normpath(join(base, name)) is a concat
            return MediaRef(kind=kind, path=self._media_prefix + name, name=name)
        return resolve_media(name, kind, self._media_base)

    def record(
        self,
        row: int,
        turns: Sequence[Turn],
        images: Sequence[MediaRef] = (),
        videos: Sequence[MediaRef] = (),
    ) -> RawRecord:
        """Validate structure and tags, then build the `RawRecord` of `row`."""
        validate_turns(turns)
        check_tags(turns, len(images), len(videos))
        return RawRecord(
            dataset=self.dataset,
            source_file=self.path,
            record_id=str(row),
            turns=tuple(turns),
            images=tuple(images),
            videos=tuple(videos),
        )

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.path!r}, dataset={self.dataset!r}, rows={len(self)})"


def read_bytes(path: str) -> bytes:
    try:
        with open(path, "rb") as handle:
            return handle.read()
    except OSError as error:
        raise SourceError(f"{path}: cannot read source file: {error}") from None


SPLIT_SLICE = 1 << 24
"""Bytes of a JSON Lines file scanned for newlines at a time (bounds the scan's mask)."""


class JsonRows:
    """Rows of a JSONL file (raw line bytes, parsed lazily) or of a JSON array (loaded whole).

    A ``.jsonl`` file is always JSON Lines. Another file whose content starts with ``[`` must be
    one JSON array (else `SourceError`); one that parses as a single non-array value is a
    `SourceError`; anything else is read as JSON Lines. JSON Lines are split on ``\\n``; only a
    final empty line is dropped, so a blank line in the middle is a row (``malformed_json``).

    The file is read when a row count or an indexed row is first needed; `line_at` reads one
    line at a byte offset the planner recorded (`starts`) without reading the rest, which is how
    a shard task reads its few rows of a large file.
    """

    def __init__(self, path: str) -> None:
        self.path = path
        self._loaded = False
        self._items: list[Any] | None = None
        self._data = b""
        self._starts: np.ndarray = np.zeros(0, dtype=np.int64)
        self._ends: np.ndarray = np.zeros(0, dtype=np.int64)
        self._handle: Any = None
        if not path.endswith(".jsonl"):
            self._load()  # JSON array or JSON Lines: the content decides
        else:
            self._open()  # a missing or unreadable file is a SourceError now, not later

    def _open(self) -> Any:
        if self._handle is None:
            try:
                self._handle = open(self.path, "rb")  # noqa: SIM115 (lives with the source)
            except OSError as error:
                raise SourceError(f"{self.path}: cannot read source file: {error}") from None
        return self._handle

    def _load(self) -> None:
        if self._loaded:
            return
        self._loaded = True
        data = read_bytes(self.path)
        if not self.path.endswith(".jsonl") and data.lstrip()[:1] in (b"[", b"{"):
            parsed = self._try_whole(data)
            if parsed is not None:
                return
        self._split_lines(data)

    def _try_whole(self, data: bytes) -> Any:
        try:
            parsed = orjson.loads(data)
        except orjson.JSONDecodeError as error:
            if data.lstrip()[:1] == b"[":
                raise SourceError(f"{self.path}: invalid JSON array: {error}") from None
            return None  # JSON Lines with several objects
        if not isinstance(parsed, list):
            raise SourceError(
                f"{self.path}: top-level JSON must be an array, got {type_name(parsed)}"
            )
        self._items = parsed
        return parsed

    def _split_lines(self, data: bytes) -> None:
        self._data = data
        view = np.frombuffer(data, dtype=np.uint8)
        newlines = np.concatenate(  # in slices: the mask of a 500 MB file is not held at once
            [np.zeros(0, dtype=np.int64)]
            + [
                np.flatnonzero(view[start : start + SPLIT_SLICE] == 0x0A).astype(np.int64) + start
                for start in range(0, len(data), SPLIT_SLICE)
            ]
        )
        starts = np.concatenate([np.zeros(1, dtype=np.int64), newlines + 1])
        ends = np.concatenate([newlines, np.array([len(data)], dtype=np.int64)])
        if starts[-1] == len(data):  # the file ends with "\n" (or is empty): no last row
            starts, ends = starts[:-1], ends[:-1]
        self._starts, self._ends = starts, ends

    @property
    def is_array(self) -> bool:
        self._load()
        return self._items is not None

    @property
    def starts(self) -> np.ndarray | None:
        """Byte offset of every JSON Lines row (int64), None for a JSON array."""
        return None if self.is_array else self._starts

    def __len__(self) -> int:
        self._load()
        return len(self._items) if self._items is not None else len(self._starts)

    def line(self, row: int) -> bytes:
        """Raw bytes of a JSONL row (without the newline)."""
        self._load()
        return self._data[int(self._starts[row]) : int(self._ends[row])]

    def line_at(self, offset: int) -> bytes:
        """The JSON Lines row that starts at byte `offset` (without its newline)."""
        if self._loaded:
            end = self._data.find(b"\n", offset)
            return self._data[offset : None if end < 0 else end]
        handle = self._open()
        handle.seek(offset)
        return handle.readline().removesuffix(b"\n")

    def get(self, row: int) -> dict[str, Any]:
        """The row as a mapping (`SkipSample` if it does not parse or is not an object)."""
        if not self._loaded:
            self._load()
        if self._items is not None:
            return require_mapping(self._items[row])
        line = self._data[int(self._starts[row]) : int(self._ends[row])]
        return require_mapping(parse_json_line(line))


class JsonSource(Source):
    """Base of the JSON / JSONL readers: rows come from `JsonRows`."""

    def __init__(self, path: str, *, dataset: str, media_root: str | None) -> None:
        super().__init__(path, dataset=dataset, media_root=media_root)
        self._rows = JsonRows(self.path)

    def __len__(self) -> int:
        return len(self._rows)

    def read(self, row: int) -> RawRecord:
        self._check_row(row)
        return self.normalize(row, self._rows.get(row))

    def offsets(self, rows: np.ndarray) -> np.ndarray:
        starts = self._rows.starts
        return super().offsets(rows) if starts is None else starts[rows]

    def read_at(self, row: int, offset: int) -> RawRecord:
        if offset < 0:
            return self.read(row)
        return self.normalize(row, require_mapping(parse_json_line(self._rows.line_at(offset))))

    @abc.abstractmethod
    def normalize(self, row: int, data: dict[str, Any]) -> RawRecord:
        """Turn one parsed row into a record (or `SkipSample`)."""


def row_group_index(offsets: list[int], row: int) -> int:
    """Index of the row group holding `row`, given the cumulative start offsets of the groups."""
    return bisect.bisect_right(offsets, row) - 1
