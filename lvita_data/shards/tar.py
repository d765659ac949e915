"""The tar layer of a shard: the reproducible writer and the one header parser.

Writer
------
`TarWriter` writes byte for byte what ``webdataset.TarWriter(..., user="", group="",
mode=0o444, mtime=0.0)`` writes (`TAR_HEADER`), without importing webdataset (which imports
torch, 3 s per process and per worker). It hashes and counts what it writes, so a shard is never
read back to checksum it.

Parser
------
`scan_tar(data, strict=...)` walks the headers of an uncompressed tar held in memory or mapped
(`mmap`): ustar, pax (``x``; ``g`` global headers are skipped) and GNU long names (``L``, ``K``),
GNU base-256 sizes. It reads only the header blocks (about 20 us per member), plus the padding
and trailer when checking. Two modes, one walk:

- ``strict=True`` (the loader, stats, Energon indexing): the first problem raises
  `ShardFormatError` naming the byte offset; a header is accepted on its checksum alone.
- ``strict=False`` (`lvita verify`): every problem is collected as a `TarProblem` and the scan
  goes on; a damaged header does not end it (unlike `tarfile`, which silently ends an archive
  there): the parser resynchronizes on the next block that is a valid ustar header (checksum and
  magic) and reports the skipped region.

Hostile input (issue 15). Every field is checked before it is used, in both modes: a size (ustar
octal digits only, GNU base-256, or a PAX ``size`` record of decimal digits) must be >= 0 and
its member must end inside the file; a PAX record's length must be decimal digits, cover its own
``"LEN key=value\n"`` and stay inside the PAX data; a PAX or GNU long-name payload is at most
`MAX_META_BYTES`; a member name must be plain (`plain_name`: no ``/``, no ``..``, not empty, no
NUL, valid UTF-8) and its type a regular file (no links, directories, devices). Every loop
advances by at least one 512-byte block, so a scan of an n-byte file ends after at most n / 512
steps: work O(n / 512) header blocks (O(n) bytes only when checking padding, the trailer, or
resynchronizing), memory O(members) plus one `MAX_META_BYTES` payload. A size that points
backwards, a zero-length or overlong PAX record, a size of 10^18, a negative or non-numeric
size, a link or a path in a name: a `ShardFormatError` (strict) or a `TarProblem` (lenient),
naming the byte offset of the header.

Non-strict scans also require zero padding and a zero end-of-archive area; with `canonical`,
headers must be byte-identical to what `TarWriter` writes and the archive padded to a 10 KiB
record as it pads it.

`group_samples` groups the regular members into WebDataset samples by WebDataset's rule
(`split_member_name`: the key is the name up to the first dot of its last path component; names
``__*__`` are metadata and skipped); each sample gets the byte range from its first member's
first header to the end of its last member's data, so a pack is one read.
"""

from __future__ import annotations

import hashlib
import mmap
import os
import stat
import tarfile
from dataclasses import dataclass, field
from typing import BinaryIO

from lvita_data.errors import ShardFormatError

BLOCK = tarfile.BLOCKSIZE
RECORD = tarfile.RECORDSIZE
_ZERO_BLOCK = bytes(BLOCK)
REGULAR_TYPES = (b"0", b"\0", b"7")
"""Type flags of regular files (``7``: contiguous file, read as a regular one)."""
_META_TYPES = (b"x", b"g", b"L", b"K")
MAX_META_BYTES = 1 << 16
"""Largest PAX or GNU long-name payload read (lvita writes 512-byte PAX headers)."""
_OCTAL = frozenset(b"01234567")

TAR_HEADER = {"format": "pax", "mtime": 0.0, "mode": 0o444, "uid": 0, "gid": 0, "owner": ""}
"""Header fields of every member. The float mtime makes `tarfile` add a PAX record
(``mtime=0.0``) before each member: 1 KiB per member, kept so that shards stay byte-identical
to those of webdataset's writer, which the format was defined with."""


def tar_header(name: str, size: int) -> bytes:
    """Header block(s) of one member, PAX record included (`TAR_HEADER`)."""
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = size, TAR_HEADER["mtime"], TAR_HEADER["mode"]
    info.uid, info.gid = TAR_HEADER["uid"], TAR_HEADER["gid"]
    info.uname = info.gname = TAR_HEADER["owner"]
    return info.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape")


def padded(size: int) -> int:
    """`size` rounded up to whole 512-byte blocks."""
    return -(-size // BLOCK) * BLOCK


class TarWriter:
    """A minimal, reproducible tar writer over an open binary file (see the module docstring)."""

    def __init__(self, handle: BinaryIO) -> None:
        self._handle = handle
        self.digest = hashlib.sha256()
        self.size = 0

    def _write(self, data: bytes) -> None:
        self.digest.update(data)
        self._handle.write(data)
        self.size += len(data)

    def add(self, name: str, data: bytes) -> None:
        self._write(tar_header(name, len(data)))
        self._write(data)
        self._write(bytes(-len(data) % BLOCK))

    def write_sample(self, sample: dict[str, bytes]) -> None:
        """Members ``{key}.{name}`` in sorted name order (as WebDataset's TarWriter)."""
        key = sample["__key__"]
        for name in sorted(sample):
            if name != "__key__":
                self.add(f"{key}.{name}", sample[name])

    def close(self) -> None:
        self._write(bytes(2 * BLOCK))
        self._write(bytes(-self.size % RECORD))


# ---------------------------------------------------------------------------------------------
# Parser


@dataclass(frozen=True, slots=True)
class TarMember:
    name: str
    header_offset: int
    """Offset of the member's first header block (its PAX header when it has one)."""
    data_offset: int
    size: int
    kind: bytes = b"0"
    """The type flag of its header (`REGULAR_TYPES` for files)."""


@dataclass(frozen=True, slots=True)
class TarProblem:
    offset: int
    message: str
    name: str | None = None
    """The member name as read from a damaged header (may itself be damaged)."""
    member_index: int | None = None
    """Index into `TarScan.members` of the member the problem belongs to, when known."""
    before: int | None = None
    """Index of the last good member before a damaged region (attribution when unknown)."""


@dataclass(slots=True)
class TarScan:
    members: list[TarMember]
    end: int
    """Offset of the end-of-archive marker (Energon's last `.tar.idx` entry)."""
    problems: list[TarProblem]


def _nts(field_bytes: bytes) -> str:
    end = field_bytes.find(b"\0")
    return (field_bytes if end < 0 else field_bytes[:end]).decode("utf-8", "surrogateescape")


def _number(field_bytes: bytes) -> int:
    """An octal header field (octal digits only, NUL/space padded), or GNU base-256 (first
    byte 0x80 positive, 0xFF negative). `ValueError` otherwise."""
    if field_bytes and field_bytes[0] & 0x80:
        if field_bytes[0] not in (0x80, 0xFF):
            raise ValueError(f"bad base-256 number {field_bytes!r}")
        value = int.from_bytes(field_bytes[1:], "big")
        return value if field_bytes[0] == 0x80 else -value
    end = field_bytes.find(b"\0")
    digits = (field_bytes if end < 0 else field_bytes[:end]).strip(b" ")
    if not set(digits) <= _OCTAL:
        raise ValueError(f"not an octal number: {field_bytes!r}")
    return int(digits, 8) if digits else 0


def plain_name(name: str) -> bool:
    """A member name lvita accepts: one path component, not ``.``/``..``, no NUL, valid UTF-8
    (`_nts` decodes with surrogateescape: an invalid byte becomes a lone surrogate)."""
    if not name or name in (".", "..") or "/" in name or "\0" in name or "\\" in name:
        return False
    try:
        name.encode("utf-8")
    except UnicodeError:
        return False
    return True


def _checksum_ok(block: bytes) -> bool:
    try:
        stored = _number(block[148:156])
    except ValueError:
        return False
    return stored == sum(block[:148]) + 8 * 32 + sum(block[156:])


def _header_ok(block: bytes) -> bool:
    """A valid ustar header: checksum and magic (what resynchronization looks for)."""
    return _checksum_ok(block) and block[257:262] == b"ustar"


def _pax_records(data: bytes) -> dict[str, str]:
    """The ``"LEN key=value\\n"`` records of a PAX payload; `ValueError` on a record whose
    length is not decimal digits, does not cover its own key, runs past the payload or does
    not end in a newline (each record advances by its length, > 0: the loop ends)."""
    records, pos = {}, 0
    while pos < len(data) and data[pos] != 0:
        space = data.find(b" ", pos, pos + 20)
        if space < 0 or not data[pos:space].isdigit():
            raise ValueError(f"bad PAX record length at byte {pos} of the PAX data")
        length = int(data[pos:space])
        if length <= space - pos + 2 or pos + length > len(data) or data[pos + length - 1] != 10:
            raise ValueError(f"bad PAX record length {length} at byte {pos} of the PAX data")
        key, equals, value = data[space + 1 : pos + length - 1].partition(b"=")
        if not equals or not key:
            raise ValueError(f"PAX record at byte {pos} has no key=value")
        records[key.decode("utf-8", "surrogateescape")] = value.decode("utf-8", "surrogateescape")
        pos += length
    return records


class _Scanner:
    """One walk over the headers; `problem` raises in strict mode and records otherwise."""

    def __init__(
        self,
        data: bytes | mmap.mmap,
        strict: bool,
        canonical: bool,
        where: str,
        limit: int | None = None,
    ) -> None:
        self.data, self.strict, self.canonical, self.where = data, strict, canonical, where
        self.limit = limit
        """Stop after this many members (the loader reads each shard's first key)."""
        self.total = len(data)
        self.check_zeros = canonical or not strict
        """Padding and end-of-archive bytes must be zero (read only when checking)."""
        self.members: list[TarMember] = []
        self.problems: list[TarProblem] = []

    def block(self, pos: int) -> bytes:
        return bytes(self.data[pos : pos + BLOCK])

    def problem(self, problem: TarProblem) -> None:
        if self.strict:
            where = f"{self.where}: " if self.where else ""
            raise ShardFormatError(f"{where}{problem.message} (at byte {problem.offset})")
        self.problems.append(problem)

    def last(self) -> int | None:
        return len(self.members) - 1 if self.members else None

    def resync(self, pos: int) -> int | None:
        """Offset of the next valid ustar header after `pos`, None when none follows."""
        resync = pos + BLOCK
        while resync + BLOCK <= self.total and not _header_ok(self.block(resync)):
            resync += BLOCK
        return resync if resync + BLOCK <= self.total else None

    def run(self) -> TarScan:
        pos = start = 0  # start: first header block of the member being read (PAX included)
        pax: dict[str, str] = {}
        long_name: str | None = None
        resynced = False  # the member after a damaged block lost its PAX header: not canonical
        while True:
            if pos + BLOCK > self.total:
                message = "archive ends without an end-of-archive marker (truncated)"
                self.problem(TarProblem(pos, message))
                return TarScan(self.members, pos, self.problems)
            block = self.block(pos)
            if block == _ZERO_BLOCK and not pax and long_name is None:
                break
            good = _checksum_ok(block) if self.strict else _header_ok(block)
            if not good:
                name = _nts(block[:100]) if block != _ZERO_BLOCK else None
                resync = None if self.strict else self.resync(pos)
                if resync is None and not self.strict:
                    message = "damaged block in the end-of-archive area (after the last member)"
                    self.problem(TarProblem(pos, message, before=self.last()))
                    return TarScan(self.members, pos, self.problems)
                skipped = (
                    ""
                    if resync is None
                    else f"; {resync - pos} byte(s) up to the next valid header skipped"
                )
                message = f"damaged tar header block (bad checksum or magic){skipped}"
                self.problem(TarProblem(pos, message, name=name, before=self.last()))
                pos = start = resync  # type: ignore[assignment]  (strict raised above)
                pax, long_name, resynced = {}, None, True
                continue
            kind = block[156:157]
            try:
                size = _number(block[124:136])
            except ValueError:
                size = -1
            data_offset = pos + BLOCK
            if size < 0 or data_offset + size > self.total:
                shown = "unreadable" if size == -1 else size
                message = f"member size {shown} is negative, not a number or runs past the file"
                self.problem(TarProblem(pos, message))
                return TarScan(self.members, pos, self.problems)
            if kind in _META_TYPES:
                if size > MAX_META_BYTES:
                    message = f"PAX/long-name header of {size} bytes (at most {MAX_META_BYTES})"
                    self.problem(TarProblem(pos, message))
                    return TarScan(self.members, pos, self.problems)
                payload = bytes(self.data[data_offset : data_offset + size])
                try:
                    if kind == b"x":
                        pax.update(_pax_records(payload))
                    elif kind == b"L":
                        long_name = _nts(payload)
                except (ValueError, UnicodeError) as error:
                    self.problem(TarProblem(pos, f"unreadable PAX/long-name header: {error}"))
                if kind in (b"g", b"K") and not self.strict:  # lvita's writer writes neither
                    self.problem(TarProblem(pos, f"unexpected tar entry type {kind!r}"))
                if kind == b"g":  # archive-wide: not part of the next member
                    start = data_offset + padded(size)
                pos = data_offset + padded(size)
                continue
            name = pax.get("path") or long_name or _nts(block[:100])
            prefix = _nts(block[345:500]) if block[257:262] == b"ustar" else ""
            if prefix and "path" not in pax and long_name is None:
                name = f"{prefix}/{name}"
            if "size" in pax:
                text = pax["size"]
                size = int(text) if text.isascii() and text.isdigit() else -1
                if size < 0 or data_offset + size > self.total:
                    message = f"PAX size {text[:40]!r} is not a size inside the file"
                    self.problem(TarProblem(start, message, name=name))
                    return TarScan(self.members, start, self.problems)
            index = len(self.members)
            self.members.append(TarMember(name, start, data_offset, size, kind))
            named = plain_name(name)
            if kind not in (REGULAR_TYPES if self.strict else (b"0", b"\0")):
                message = f"unexpected tar entry type {kind!r} (only regular files)"
                self.problem(TarProblem(start, message, name=name, member_index=index))
            elif not named:
                message = f"member name {name[:120]!r} is not a plain file name"
                self.problem(TarProblem(start, message, name=name, member_index=index))
            elif self.canonical and not resynced:
                self.check_header(index)
            end = data_offset + padded(size)
            if end > self.total:
                self.problem(TarProblem(data_offset, "member data truncated", name, index))
                return TarScan(self.members, self.total, self.problems)
            if self.check_zeros:
                self.check_padding(index)
            if self.limit is not None and len(self.members) >= self.limit:
                return TarScan(self.members, end, self.problems)
            pos = start = end
            pax, long_name, resynced = {}, None, False
        if self.check_zeros:
            self.check_trailer(pos)
        return TarScan(self.members, pos, self.problems)

    def check_header(self, index: int) -> None:
        member = self.members[index]
        written = bytes(self.data[member.header_offset : member.data_offset])
        try:
            expected = tar_header(member.name, member.size)
        except (ValueError, UnicodeError):
            expected = b""
        if written != expected:
            message = (
                "tar header differs from the one lvita's writer produces (checksum still valid)"
            )
            self.problem(TarProblem(member.header_offset, message, member.name, index))

    def check_padding(self, index: int) -> None:
        member = self.members[index]
        end = member.data_offset + member.size
        padding = bytes(self.data[end : member.data_offset + padded(member.size)])
        if padding.count(0) != len(padding):
            bad = end + next(i for i, b in enumerate(padding) if b)
            message = "non-zero byte in the member's padding"
            self.problem(TarProblem(bad, message, member.name, index))

    def check_trailer(self, end: int) -> None:
        expected_total = -(-(end + 2 * BLOCK) // RECORD) * RECORD
        trailer = bytes(self.data[end:])
        if trailer.count(0) != len(trailer):
            bad = end + next(i for i, b in enumerate(trailer) if b)
            message = "non-zero byte in the end-of-archive area"
            self.problem(TarProblem(bad, message, before=self.last()))
        elif self.canonical and self.total != expected_total:
            message = f"archive is {self.total} bytes, the writer pads it to {expected_total}"
            self.problem(TarProblem(end, message, before=self.last()))


def scan_tar(
    data: bytes | mmap.mmap,
    *,
    strict: bool = False,
    canonical: bool = True,
    where: str = "",
    limit: int | None = None,
) -> TarScan:
    """Members of a tar held in memory (or mapped), with its structural problems.

    ``strict``: raise `ShardFormatError` (prefixed with `where`) at the first problem instead of
    collecting it. ``canonical``: also require `TarWriter`'s exact bytes (see the module doc).
    ``limit``: stop after that many members (no end-of-archive check then).
    """
    return _Scanner(data, strict, canonical, where, limit).run()


def scan_tar_file(
    path: str | os.PathLike[str], *, canonical: bool = False, limit: int | None = None
) -> TarScan:
    """`scan_tar(strict=True)` of a regular file (a symlink or anything else is an error),
    through a read-only map (only headers are touched)."""
    where = os.fspath(path)
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    except OSError as error:
        raise ShardFormatError(f"{where}: cannot open: {error.strerror}") from None
    with open(fd, "rb") as handle:
        status = os.fstat(handle.fileno())
        if not stat.S_ISREG(status.st_mode):
            raise ShardFormatError(f"{where}: not a regular file")
        if status.st_size == 0:
            return scan_tar(b"", strict=True, canonical=canonical, where=where, limit=limit)
        with mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as data:
            return scan_tar(data, strict=True, canonical=canonical, where=where, limit=limit)


def split_member_name(name: str) -> tuple[str, str]:
    """(key, part) as WebDataset and Energon split it: the key is everything before the first
    dot of the base name."""
    directory, _, base = name.rpartition("/")
    stem, dot, part = base.partition(".")
    key = f"{directory}/{stem}" if directory else stem
    return key, part if dot else ""


@dataclass(slots=True)
class TarSample:
    """One WebDataset sample of a tar: its key, byte range and members (offset, size) relative
    to the range's start; member names are the lower-cased parts after the key."""

    key: str
    start: int
    end: int
    members: dict[str, tuple[int, int]] = field(default_factory=dict)


def is_metadata(name: str) -> bool:
    """WebDataset's ``skip_meta`` rule: a name whose first path component is ``__*__``."""
    first = name.split("/", 1)[0]
    return len(first) >= 4 and first.startswith("__") and first.endswith("__")


def group_samples(scan: TarScan, where: str = "") -> list[TarSample]:
    """The WebDataset samples of a scan: consecutive regular members with one key.

    Raises `ShardFormatError` on a member name twice in one sample."""
    samples: list[TarSample] = []
    for member in scan.members:
        if member.kind not in REGULAR_TYPES or is_metadata(member.name):
            continue
        key, part = split_member_name(member.name)
        if not part or not key.rpartition("/")[2]:
            continue
        if not samples or samples[-1].key != key:
            samples.append(TarSample(key, member.header_offset, member.header_offset))
        sample = samples[-1]
        part = part.lower()
        if part in sample.members:
            prefix = f"{where}: " if where else ""
            raise ShardFormatError(f"{prefix}duplicate member {member.name!r} in sample {key!r}")
        sample.members[part] = (member.data_offset - sample.start, member.size)
        sample.end = member.data_offset + padded(member.size)
    return samples
