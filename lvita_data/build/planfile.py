"""A plan file (`lvita plan --out`) read back, so `lvita build --plan` skips the planning pass.

The file is handed over, so it is read as untrusted input, streamed and bounded: a header value
may hold at most `MAX_HEADER_VALUE` bytes, a reject `MAX_REJECT`, and each per-sample column is
parsed `CHUNK` bytes at a time with numpy (a regular expression checks each piece first) into a
column preallocated from the header's sample count: 33 bytes a sample once loaded, instead of
the several GB a `json.load` of a 17M-sample plan takes. Measured on a 1M-sample plan (38 MB,
`/tmp/scale/stage-1000000.yaml`): 0.7 s and +54 MiB peak RSS (`json.load`: 0.8 s, +190 MiB).

It is reused only when it is what planning would give now: the same lvita version, manifest
(`manifest_sha256`; the refusal lists the differing keys from ``build_identity``) and
``--verify-media``, and record files with the same identity (path, size, sha256). Nothing is
taken on trust: the files must be the manifest's, every row and byte offset in range, the
columns must hash to ``columns_sha256``, and the per-dataset reports must equal the ones
recomputed from the columns and rejects. Then, as after planning, missing inputs
(``--allow-missing``) and the reject rate are checked. Every problem is one `BuildError` line
naming the file and the field.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import BinaryIO, NoReturn

import numpy as np

from lvita_data import __version__
from lvita_data.build.identity import build_identity, listed, manifest_differences, manifest_digest
from lvita_data.build.plan import (
    MODALITIES,
    SAMPLE_COLUMNS,
    DatasetReport,
    FilePlan,
    StagePlan,
    check_reject_rate,
)
from lvita_data.errors import BuildError, MissingInputs
from lvita_data.manifest import StageManifest, expand_dataset_files
from lvita_data.schema import Reject

CHUNK = 1 << 20
"""Bytes of a column parsed at a time."""
MAX_HEADER_VALUE = 64 << 20
MAX_REJECT = 1 << 16
_INT32_MAX = np.iinfo(np.int32).max
_DECODER = json.JSONDecoder()
_NUMBER = rb"-?\d{1,18}"
_PIECES = {  # kind -> (compact, with whitespace): a piece of a column, whole elements; the
    # possessive `*+` keeps no backtracking state (a greedy `*` costs ~180 bytes per element)
    kind: (
        re.compile(rb"%s(?:,%s)*+" % (one, one)),
        re.compile(rb"\s*+%s\s*+(?:,\s*+%s\s*+)*+" % (one, one)),
    )
    for kind, one in {
        "int": _NUMBER,
        "str": rb'"\d{1,18}"',
        "modality": rb'"(?:%s)"' % "|".join(MODALITIES).encode(),
    }.items()
}
_SPACE = re.compile(rb"[ \t\r\n]*")
_HEADER_KEYS = ("tool", "manifest_sha256", "verify_media", "inputs", "columns_sha256")
_HEADER_KEYS += ("num_samples", "num_tokens", "datasets", "files")


class _Scanner:
    """Forward-only JSON over a binary file: small values decoded whole, columns in pieces."""

    def __init__(self, handle: BinaryIO, path: str) -> None:
        self.handle, self.path = handle, path
        self.buffer, self.pos, self.eof = b"", 0, False
        self.where = "(top level)"

    def fail(self, problem: str) -> NoReturn:
        raise BuildError(f"plan file {self.path}: {self.where}: {problem}")

    def fill(self, size: int) -> int:
        """Make `size` bytes available from `pos` (fewer at the end); returns how many are."""
        have = len(self.buffer) - self.pos
        if have < size and not self.eof:
            chunk = self.handle.read(max(size - have, CHUNK))
            self.eof = len(chunk) < max(size - have, CHUNK)
            self.buffer, self.pos = self.buffer[self.pos :] + chunk, 0
        return len(self.buffer) - self.pos

    def peek(self) -> bytes:
        """The next byte that is not whitespace (b"" at the end of the file)."""
        while True:
            self.pos = _SPACE.match(self.buffer, self.pos).end()  # type: ignore[union-attr]
            if self.pos < len(self.buffer) or not self.fill(1):
                return self.buffer[self.pos : self.pos + 1]

    def expect(self, token: bytes) -> None:
        found = self.peek()
        if found != token:
            self.fail(
                f"expected {token.decode()!r}, found {found.decode(errors='replace')!r}"
                if found
                else f"expected {token.decode()!r}: the file is truncated"
            )
        self.pos += 1

    def value(self, limit: int) -> object:
        """One whole JSON value of at most `limit` bytes."""
        self.peek()
        window = 4096
        while True:
            available = self.fill(window)
            raw = self.buffer[self.pos : self.pos + window]
            complete = available < window
            try:
                text = raw.decode()
            except UnicodeDecodeError as error:
                if error.start < len(raw) - 3 or complete:
                    self.fail("not UTF-8 text")
                text = raw[: error.start].decode()
            try:
                value, end = _DECODER.raw_decode(text)
                if end < len(text) or complete:
                    self.pos += len(text[:end].encode())
                    return value
            except json.JSONDecodeError as error:
                if complete:
                    self.fail(f"not JSON ({error.msg}), or the file is truncated")
            if window >= limit:
                self.fail(f"not JSON, or longer than {limit} bytes")
            window = min(window * 8, limit)

    def pieces(self):
        """The text of a JSON array of numbers or short strings, whole elements at a time."""
        self.expect(b"[")
        while True:
            self.fill(CHUNK)
            end = self.buffer.find(b"]", self.pos, self.pos + CHUNK)
            if end >= 0:
                piece, self.pos = self.buffer[self.pos : end], end + 1
                yield piece, True
                return
            cut = self.buffer.rfind(b",", self.pos, self.pos + CHUNK)
            if cut < 0:
                self.fail("the file is truncated" if self.eof else "not a column of numbers")
            piece, self.pos = self.buffer[self.pos : cut], cut + 1
            yield piece, False


def _shown(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _parse_piece(scanner: _Scanner, piece: bytes, kind: str, first_and_last: bool) -> np.ndarray:
    compact, spaced = _PIECES[kind]
    if not piece.strip() and first_and_last:
        return np.zeros(0, dtype=np.int64)
    if not compact.fullmatch(piece) and not spaced.fullmatch(piece):
        shown = piece[:40].decode(errors="replace")
        expected = {"int": "numbers", "str": "quoted row numbers", "modality": "modality names"}
        scanner.fail(f"expected {expected[kind]}: {shown!r}...")
    if kind == "str":
        piece = piece.replace(b'"', b"")
    elif kind == "modality":
        for code, name in enumerate(MODALITIES):
            piece = piece.replace(b'"%s"' % name.encode(), b"%d" % code)
    return np.fromstring(piece, dtype=np.int64, sep=",")


class _PlanFile:
    """The parts of one plan file as they are read, checked against the manifest on the way."""

    def __init__(self, path: str, manifest: StageManifest, inputs: list[list], verify_media: bool):
        self.path, self.manifest = path, manifest
        self.inputs, self.verify_media = inputs, verify_media
        self.header: dict = {}
        self.columns: dict[str, np.ndarray] = {}
        self.rejects: list[Reject] | None = None
        self.ends = np.zeros(0, dtype=np.int64)  # samples of files 0..i, cumulative
        self.checked = False

    def fail(self, where: str, problem: str) -> NoReturn:
        raise BuildError(f"plan file {self.path}: {where}: {problem}")

    def check_header(self) -> None:
        """Identity first (the refusals a user meets), then the files, before any column."""
        if self.checked:
            return
        for key in _HEADER_KEYS:
            if key not in self.header:
                self.fail(key, "missing (a plan file of an older lvita? plan again)")
        head = self.header
        if head["tool"] != f"lvita {__version__}":
            self.fail("tool", f"made by {_shown(head['tool'])}, this is lvita {__version__}")
        if head["manifest_sha256"] != manifest_digest(self.manifest):
            keys = manifest_differences(head.get("build_identity"), build_identity(self.manifest))
            raise BuildError(
                f"plan file {self.path} was planned from a different manifest (differs in: "
                f"{listed(keys) if keys else 'its shard format'}); plan it again with "
                f"lvita plan {self.manifest.source_path} --out {self.path}"
            )
        if head["verify_media"] is not self.verify_media:
            made = "with" if head["verify_media"] else "without"
            self.fail("verify_media", f"planned {made} --verify-media; build the same way")
        if head["inputs"] != self.inputs:
            listing = head["inputs"] if isinstance(head["inputs"], list) else []
            old = {json.dumps(i[:1]): i for i in listing if isinstance(i, list)}
            changed = [i[0] for i in self.inputs if old.get(json.dumps(i[:1])) != i]
            raise BuildError(
                f"plan file {self.path}: the record files changed since it was planned "
                f"({listed(changed or ['the list of files'], 3)}); plan again"
            )
        self._check_files()
        self.checked = True

    def _check_files(self) -> None:
        files, expected = (
            self.header["files"],
            [
                (entry.name, path)
                for entry in self.manifest.datasets
                for path in expand_dataset_files(entry)[0]
            ],
        )
        if not isinstance(files, list) or len(files) != len(expected):
            self.fail("files", f"expected the manifest's {len(expected)} record files")
        for i, (file, (dataset, path)) in enumerate(zip(files, expected, strict=True)):
            file = file if isinstance(file, dict) else {}
            if (file.get("dataset"), file.get("path")) != (dataset, path):
                self.fail(f"files[{i}]", f"expected {dataset} file {path}")
            counts = [file.get(key) for key in ("rows", "selected", "samples")]
            if not all(type(c) is int and 0 <= c < 1 << 62 for c in counts):
                self.fail(f"files[{i}]", "rows, selected and samples must be counts")
            if counts[2] > counts[1]:
                self.fail(f"files[{i}]", "more samples than selected rows")
        self.ends = np.cumsum([f["samples"] for f in files], dtype=np.int64)
        total = int(self.ends[-1]) if files else 0
        if self.header["num_samples"] != total:
            self.fail(
                "num_samples", f"{_shown(self.header['num_samples'])}, the files hold {total}"
            )

    def read_columns(self, scanner: _Scanner) -> None:
        self.check_header()
        scanner.expect(b"{")
        names, seen = ["file", *SAMPLE_COLUMNS], set()
        while scanner.peek() != b"}":
            if seen:
                scanner.expect(b",")
            scanner.where = "samples"
            name = scanner.value(64)
            if name not in names or name in self.columns or name in seen:
                scanner.fail(f"unknown or repeated column {name!r}")
            scanner.expect(b":")
            scanner.where = f"samples.{name}"
            seen.add(name)
            self.columns[name] = self._column(scanner, name)
        scanner.pos += 1
        self.columns.pop("file", None)  # only checked: it follows from the samples per file
        for name in SAMPLE_COLUMNS:
            if name not in self.columns:
                self.fail(f"samples.{name}", "missing (a plan file of an older lvita? plan again)")

    def _column(self, scanner: _Scanner, name: str) -> np.ndarray:
        dtype = SAMPLE_COLUMNS[name][1] if name in SAMPLE_COLUMNS else np.int32
        kind = {"record": "str", "modality": "modality"}.get(name, "int")
        total = int(self.ends[-1]) if self.ends.shape[0] else 0
        out = np.empty(total if name != "file" else 0, dtype=dtype)
        rows = np.asarray([f["rows"] for f in self.header["files"]], dtype=np.int64)
        sizes = np.asarray([i[1] for i in self.inputs], dtype=np.int64)
        done, first = 0, True
        for piece, last in scanner.pieces():
            values = _parse_piece(scanner, piece, kind, first and last)
            first = False
            if done + values.shape[0] > total:
                scanner.fail(f"more values than the {total} samples of the header")
            file = np.searchsorted(self.ends, np.arange(done, done + values.shape[0]), "right")
            low, high = {
                "file": (file, file),
                "record": (0, rows[file] - 1),
                "offset": (-1, sizes[file] - 1),
                "length": (1, _INT32_MAX),
            }.get(name, (0, _INT32_MAX))
            bad = np.flatnonzero((values < low) | (values > high))
            if bad.shape[0]:
                scanner.fail(
                    f"value {int(values[bad[0]])} of sample {done + int(bad[0])} out of range"
                )
            if name != "file":
                out[done : done + values.shape[0]] = values
            done += values.shape[0]
        if done != total:
            scanner.fail(f"{done} values, the header says {total} samples")
        return out

    def read_rejects(self, scanner: _Scanner) -> None:
        self.check_header()
        files = self.header["files"]
        owners = np.repeat(np.arange(len(files)), [f["selected"] - f["samples"] for f in files])
        scanner.expect(b"[")
        self.rejects = []
        while scanner.peek() != b"]":
            if self.rejects:
                scanner.expect(b",")
            index = len(self.rejects)
            scanner.where = f"rejects[{index}]"
            if index >= owners.shape[0]:
                scanner.fail(f"more rejects than the {owners.shape[0]} the files' counts leave")
            data = scanner.value(MAX_REJECT)
            owner = files[owners[index]]
            try:
                if not isinstance(data, dict) or not all(isinstance(v, str) for v in data.values()):
                    raise TypeError("not an object of strings")
                reject = Reject.from_json(data)
            except (TypeError, KeyError, ValueError) as error:
                scanner.fail(f"not a reject ({error})")
            if (reject.dataset, reject.file, reject.phase) != (
                owner["dataset"],
                owner["path"],
                "plan",
            ):
                scanner.fail(f"expected a plan-time reject of {owner['path']}")
            self.rejects.append(reject)
        scanner.pos += 1
        if len(self.rejects) != owners.shape[0]:
            self.fail("rejects", f"{len(self.rejects)}, the files' counts leave {owners.shape[0]}")

    def stage_plan(self) -> StagePlan:
        """The plan, once its reports and hash check out (see the module docstring)."""
        if self.rejects is None or not self.columns:
            self.fail("samples" if not self.columns else "rejects", "missing")
        files, bounds = [], np.concatenate([[0], self.ends]).tolist()
        taken = 0
        for i, data in enumerate(self.header["files"]):
            plan = FilePlan(data["dataset"], data["path"], data["rows"], data["selected"])
            for name, (attribute, _) in SAMPLE_COLUMNS.items():
                setattr(plan, attribute, self.columns[name][bounds[i] : bounds[i + 1]])
            count = data["selected"] - data["samples"]
            plan.rejects, taken = self.rejects[taken : taken + count], taken + count
            files.append(plan)
        plan = StagePlan(self.manifest, [], files, self.verify_media, self.inputs)
        if plan.columns_sha256() != self.header["columns_sha256"]:
            self.fail("columns_sha256", "the columns do not hash to it (the file was changed)")
        plan.datasets = self._reports(files)
        if plan.num_tokens != self.header["num_tokens"]:
            self.fail("num_tokens", "not the sum of the lengths")
        for report in plan.datasets:
            mine = [r for f in files if f.dataset == report.name for r in f.rejects]
            check_reject_rate(report.name, report.selected, report.rejects, self.manifest, mine)
        return plan

    def _reports(self, files: list[FilePlan]) -> list[DatasetReport]:
        saved = self.header["datasets"]
        entries = self.manifest.datasets
        if not isinstance(saved, list) or len(saved) != len(entries):
            self.fail("datasets", f"expected the manifest's {len(entries)} datasets")
        reports = []
        for i, (data, entry) in enumerate(zip(saved, entries, strict=True)):
            if not isinstance(data, dict):
                self.fail(f"datasets[{i}]", "not an object")
            lost = [data.get("files_missing"), data.get("files_failed")]
            if not all(isinstance(x, list) for x in lost):
                self.fail(f"datasets[{i}]", "files_missing and files_failed must be lists")
            lost = lost[0] + lost[1]
            if lost:
                raise MissingInputs(
                    f"plan file {self.path}: dataset {entry.name!r} was planned without "
                    f"{len(lost)} input(s) (lvita plan --allow-missing), e.g. {lost[0]}; "
                    "a build needs every input"
                )
            mine = [f for f in files if f.dataset == entry.name]
            report = DatasetReport(entry.name, entry.format, files_found=len(mine))
            for plan in mine:
                report.add(plan)
            if report.to_json() != data:
                differ = [k for k, v in report.to_json().items() if data.get(k) != v]
                self.fail(f"datasets[{i}]", f"{listed(differ, 5)} do not match the samples")
            reports.append(report)
        return reports


def read_plan_file(
    path: str, manifest: StageManifest, *, inputs: list[list], verify_media: bool
) -> StagePlan:
    """The stage plan a plan file holds, if it may be reused for `manifest` with these record
    files (`input_identity`); `BuildError` (or `MissingInputs`, `RejectRateExceeded`, as
    planning would raise them) otherwise."""
    plan = _PlanFile(path, manifest, inputs, verify_media)
    try:
        with Path(path).open("rb") as handle:
            _read(_Scanner(handle, path), plan)
    except OSError as error:
        raise BuildError(f"plan file {path}: unreadable ({error.strerror or error})") from None
    return plan.stage_plan()


def _read(scanner: _Scanner, plan: _PlanFile) -> None:
    """The top-level object: header values, then the ``samples`` columns and the rejects."""
    scanner.expect(b"{")
    seen: set[str] = set()
    while scanner.peek() != b"}":
        if seen:
            scanner.expect(b",")
        scanner.where = "(a key)"
        key = scanner.value(256)
        if not isinstance(key, str) or key in seen:
            scanner.fail(f"a repeated key or not a key: {key!r}")
        seen.add(key)
        scanner.expect(b":")
        scanner.where = key
        if key == "samples":
            plan.read_columns(scanner)
        elif key == "rejects":
            plan.read_rejects(scanner)
        else:
            plan.header[key] = scanner.value(MAX_HEADER_VALUE)
    scanner.pos += 1
    scanner.where = "(after the plan)"
    if scanner.peek():
        scanner.fail("more data after the plan's end")


__all__ = ["read_plan_file"]
