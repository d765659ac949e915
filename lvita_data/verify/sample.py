"""`lvita verify DIR`: check a finished build byte by byte and sample by sample.

What is checked (shard format v1, see `lvita_data.shards.writer`):
1. Files: every shard of `index.json` exists with its size and sha256; no other `*.tar`, no
   leftover `*.tmp-*`; `stats.json` and `rejects.jsonl` parse.
2. Tar structure, with our own parser (Python's `tarfile` silently ends an archive at a damaged
   header): every header block has a valid checksum and is byte-identical to the header lvita's
   writer produces for that name and size; data padding and the end-of-archive area are zero;
   members of a sample are contiguous, keys are unique across shards, no unknown member names.
   So a flipped byte in any header, padding or trailer block is located exactly; a damaged header
   is attributed to its member's sample key (or the nearest key when its name is damaged too).
3. Per sample: arrays load with allow_pickle=False, int32, 1-D, canonical `.npy` bytes; shapes
   [T] and [n + 1]; `cu_seqlens` starts at 0, strictly increases, ends at T; `meta.json` is the
   canonical JSON lvita writes; sample i starts at cu_seqlens[i] (a multiple of `pack.align`)
   and fills its aligned length; padding is the pad token with label -100; positions restart per
   segment when `pack.reset_attention`, else run 0..T-1; ids are inside the vocabulary; each
   packed sample's vision blocks are exactly the ids its meta (grid per image, frames per
   video, `media_order`) implies, no other vision ids and no unexpanded `<image>`/`<video>`;
   each sample parses as ChatML turns and the labels equal the template's (assistant content +
   `<|im_end|>` + `\\n`, vision tokens excluded; -100 elsewhere); 256-placeholder groups ==
   meta `num_tiles` == tile members `tile000000..`; PNG tiles pass every chunk CRC and are
   448x448 RGB (and decode, unless `decode_tiles=False`).
4. Per-sample digests (`sample_digest`), when the build recorded them (in the completion records
   `.lvita-build/done/{shard}.json` under "digests", or per shard in `index.json` under
   "digests"): a changed byte anywhere inside a sample's member data names the shard and key
   even where the content still passes every invariant (e.g. a text id turned into another id).
5. Accounting: per dataset, the planner's selected rows (`stats.json` "plan", or "datasets" in
   builds before `lvita stats`) == packed (counted from meta.json) + rejected (`rejects.jsonl`);
   shard sample and token counts == `index.json`; totals and per-dataset samples == `stats.json`;
   with `.lvita-build/plan.json`: keys fall in their shard's pack range and every planned sample
   of a pack is either in it or rejected.
6. Energon metadata, when `.nv-meta/` exists: see `lvita_data.shards.energon.check_energon_metadata`.

Known limit: the ChatML parse cannot tell a turn boundary from text that itself contains the
literal special tokens `<|im_end|>\\n<|im_start|>{role}\\n` (the tokenizer turns them into
special ids); such a record would be reported as a label mismatch.
"""

from __future__ import annotations

import hashlib
import io
import json
import mmap
import multiprocessing
import os
import re
import zlib
from collections import Counter
from collections.abc import Mapping
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import yaml

from lvita_data.fileio import TEMP_MARKER
from lvita_data.samples.tiling import TILE_SIZE, TOKENS_PER_TILE, num_tiles
from lvita_data.samples.vision_tokens import image_token_ids, video_token_ids
from lvita_data.schema import IGNORE_INDEX
from lvita_data.shards.format import (
    ARRAY_MEMBERS,
    SHARD_FORMAT_VERSION,
    STATE_DIR,
    npy_bytes,
    sample_digest,
    shard_name,
)
from lvita_data.shards.tar import TarMember, TarProblem, TarScan, scan_tar, split_member_name
from lvita_data.tokenizer.special_tokens import SpecialIds

MAX_PROBLEMS_PER_SAMPLE = 8
MAX_PROBLEMS_PER_SHARD = 200
KEY_PATTERN = re.compile(r"^\d{9}$")
TILE_PATTERN = re.compile(r"^tile(\d{6})\.([a-z]+)$")
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
FIRST_MEMBER = min(f"{name}.npy" for name in ARRAY_MEMBERS)
"""Members are written in sorted name order: every sample starts with cu_seqlens.npy."""


# ---------------------------------------------------------------------------------------------
# Report


@dataclass(frozen=True, slots=True)
class Problem:
    kind: str
    """files | checksum | tar | sample | digest | accounting | plan | energon | build"""
    message: str
    shard: str | None = None
    key: str | None = None
    member: str | None = None
    offset: int | None = None
    """Byte offset inside the shard, where known."""

    def to_json(self) -> dict:
        return {k: v for k, v in asdict(self).items() if v is not None}

    def __str__(self) -> str:
        where = []
        if self.shard:
            where.append(self.shard)
        if self.key:
            where.append(f"sample {self.key}")
        if self.member:
            where.append(self.member)
        if self.offset is not None:
            where.append(f"byte {self.offset}")
        prefix = ": ".join(where)
        return f"[{self.kind}] {prefix + ': ' if prefix else ''}{self.message}"


@dataclass(slots=True)
class VerifyReport:
    out_dir: str
    shards: int = 0
    samples: int = 0
    tokens: int = 0
    tiles: int = 0
    digests_checked: int = 0
    tiles_decoded: bool = True
    problems: list[Problem] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def to_json(self) -> dict:
        return {
            "out_dir": self.out_dir,
            "ok": self.ok,
            "shards": self.shards,
            "samples": self.samples,
            "tokens": self.tokens,
            "tiles": self.tiles,
            "tiles_decoded": self.tiles_decoded,
            "digests_checked": self.digests_checked,
            "problems": [p.to_json() for p in self.problems],
        }

    def format(self, limit: int = 200) -> str:
        lines = [
            f"lvita verify {self.out_dir}: {self.shards} shard(s), {self.samples} packed "
            f"sequence(s), {self.tokens:,} tokens, {self.tiles} tile(s)"
            + ("" if self.tiles_decoded else " (tiles not decoded)")
            + f", {self.digests_checked} sample digest(s) checked"
        ]
        if self.ok:
            lines.append("OK: checksums, tar structure, per-sample invariants and accounting")
            return "\n".join(lines)
        lines.append(f"{len(self.problems)} problem(s):")
        lines.extend(f"  {p}" for p in self.problems[:limit])
        if len(self.problems) > limit:
            lines.append(f"  ... and {len(self.problems) - limit} more (use --json for all)")
        return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Build settings


@dataclass(frozen=True, slots=True)
class Settings:
    stage: str
    max_seq_len: int
    reset_attention: bool
    align: int
    tile_format: str
    special: SpecialIds
    vocab_size: int
    role_prefix: dict[str, np.ndarray]
    decode_tiles: bool = True


def _manifest_copy(out: Path) -> tuple[dict, str | None]:
    """The YAML of `manifest.yaml` and the original manifest path from its header line."""
    text = (out / "manifest.yaml").read_text(encoding="utf-8")
    source = None
    first = text.split("\n", 1)[0]
    if first.startswith("#") and ", from " in first:
        source = first.split(", from ", 1)[1].strip()
    return yaml.safe_load(text) or {}, source


def load_settings(out: Path, index: dict, *, decode_tiles: bool = True) -> Settings:
    """Stage settings verify needs: from index.json where present, else the manifest copy."""
    from lvita_data.manifest import expand_env
    from lvita_data.samples.template import ChatTemplate
    from lvita_data.tokenizer.tokenizer import load_tokenizer

    manifest, source = _manifest_copy(out)
    pack = manifest.get("pack") or {}
    shards = manifest.get("shards") or {}
    reset = index.get("reset_attention", pack.get("reset_attention"))
    if not isinstance(reset, bool):
        raise ValueError("manifest.yaml has no boolean pack.reset_attention")
    align = int(index.get("align", pack.get("align", 1)))
    tile_format = str(index.get("tile_format", shards.get("tile_format", "png")))
    spec = str(index.get("tokenizer", manifest.get("tokenizer", "qwen2.5")))
    spec = expand_env(spec)
    if spec != "qwen2.5" and not os.path.isabs(os.path.expanduser(spec)) and source:
        spec = os.path.normpath(os.path.join(os.path.dirname(source), spec))
    tokenizer = load_tokenizer(spec)
    template = ChatTemplate.from_encoder(tokenizer.special_ids, tokenizer.encode)
    if int(pack.get("max_seq_len", index["max_seq_len"])) != index["max_seq_len"]:
        raise ValueError("manifest.yaml pack.max_seq_len differs from index.json max_seq_len")
    return Settings(
        stage=index["stage"],
        max_seq_len=int(index["max_seq_len"]),
        reset_attention=reset,
        align=align,
        tile_format=tile_format,
        special=tokenizer.special_ids,
        vocab_size=tokenizer.vocab_size,
        role_prefix=dict(template.role_prefix),
        decode_tiles=decode_tiles,
    )


# ---------------------------------------------------------------------------------------------
# Per-sample checks


@dataclass(slots=True)
class SampleSummary:
    datasets: list[str] = field(default_factory=list)
    refs: list[tuple[str, str]] = field(default_factory=list)
    """(file, record) of each packed sample."""
    tokens: int = 0
    tiles: int = 0


class _Collector:
    def __init__(self, shard: str, key: str) -> None:
        self.shard, self.key = shard, key
        self.problems: list[Problem] = []

    def add(self, message: str, member: str | None = None, kind: str = "sample") -> None:
        if len(self.problems) < MAX_PROBLEMS_PER_SAMPLE:
            self.problems.append(Problem(kind, message, self.shard, self.key, member))


def _png_problem(data: bytes) -> str | None:
    """Why bytes are not an intact 448x448 8-bit RGB PNG (every chunk CRC checked), or None."""
    if not data.startswith(_PNG_SIGNATURE):
        return "not a PNG (bad signature)"
    pos, first = len(_PNG_SIGNATURE), True
    while pos + 12 <= len(data):
        length = int.from_bytes(data[pos : pos + 4], "big")
        kind = data[pos + 4 : pos + 8]
        end = pos + 12 + length
        if end > len(data):
            return f"PNG chunk {kind!r} at byte {pos} runs past the member"
        if zlib.crc32(data[pos + 4 : end - 4]) != int.from_bytes(data[end - 4 : end], "big"):
            return f"PNG chunk {kind!r} at byte {pos}: CRC mismatch"
        if first:
            if kind != b"IHDR" or length != 13:
                return "PNG does not start with IHDR"
            width = int.from_bytes(data[pos + 8 : pos + 12], "big")
            height = int.from_bytes(data[pos + 12 : pos + 16], "big")
            depth, color = data[pos + 16], data[pos + 17]
            if (width, height, depth, color) != (TILE_SIZE, TILE_SIZE, 8, 2):
                return f"PNG is {width}x{height}, depth {depth}, color type {color}; want RGB 448"
            first = False
        if kind == b"IEND":
            return None if end == len(data) else f"{len(data) - end} byte(s) after IEND"
        pos = end
    return "PNG has no IEND chunk (truncated)"


def _load_array(name: str, data: bytes, out: _Collector) -> np.ndarray | None:
    try:
        array = np.load(io.BytesIO(data), allow_pickle=False)
    except Exception as error:  # any parse failure of damaged bytes
        out.add(f"does not load as .npy: {error}", name)
        return None
    if array.dtype != np.dtype("<i4") or array.ndim != 1:
        out.add(f"dtype {array.dtype} ndim {array.ndim}, expected int32 1-D", name)
        return None
    if npy_bytes(array) != data:
        out.add("not the canonical .npy encoding of its array (damaged header?)", name)
    return array


def _expected_vision(sample: dict, special: SpecialIds) -> list[tuple[np.ndarray, int]]:
    """(ids, tiles) of each vision block of a packed sample, in order of appearance."""
    blocks = []
    for kind, index in sample["media_order"]:
        if kind == "image":
            image = sample["images"][index]
            grid = (int(image["grid"][0]), int(image["grid"][1]))
            if min(grid) < 1 or image["tiles"] != num_tiles(grid):
                raise ValueError(f"image {index}: grid {grid} with {image['tiles']} tiles")
            blocks.append((image_token_ids(grid, special), num_tiles(grid)))
        elif kind == "video":
            frames = sample["videos"][index]["frames"]
            if not frames:
                raise ValueError(f"video {index} has no frames")
            blocks.append((video_token_ids(len(frames), special), len(frames)))
        else:
            raise ValueError(f"unknown media kind {kind!r}")
    for kind, media in (("image", sample["images"]), ("video", sample["videos"])):
        listed = sorted(index for k, index in sample["media_order"] if k == kind)
        if listed != list(range(len(media))):
            raise ValueError(f"media_order does not list each of the {len(media)} {kind}s once")
    return blocks


def _check_text(
    number: int,
    offset: int,
    ids: np.ndarray,
    labels: np.ndarray,
    sample: dict,
    settings: Settings,
    out: _Collector,
) -> int:
    """Vision blocks, ChatML turns and labels of packed sample `number`; returns its tiles."""
    special = settings.special
    what = f"packed sample {number} ({sample.get('dataset')}, record {sample.get('record')})"
    try:
        blocks = _expected_vision(sample, special)
    except (KeyError, TypeError, ValueError, IndexError) as error:
        out.add(f"{what}: media metadata malformed: {error}", "meta.json")
        return 0
    vision_ids = np.array(
        [
            special.img_start,
            special.img_end,
            special.img_context,
            special.patch_start,
            special.patch_end,
            special.patch_context,
            special.vid_start,
            special.vid_end,
            special.vid_context,
        ],
        dtype=np.int32,
    )
    tiles = sum(t for _, t in blocks)
    is_vision_id = np.isin(ids, vision_ids)
    vision = np.zeros(ids.shape[0], dtype=bool)
    cursor = 0
    starts = np.flatnonzero((ids == special.img_start) | (ids == special.vid_start))
    for number_block, (block, _) in enumerate(blocks):
        following = starts[starts >= cursor]
        if following.size == 0:
            out.add(f"{what}: vision block {number_block} of its media_order is missing")
            return tiles
        start = int(following[0])
        if not np.array_equal(ids[start : start + block.shape[0]], block):
            out.add(
                f"{what}: vision block {number_block} at position {offset + start} differs "
                f"from the layout its meta implies",
                "input_ids.npy",
            )
            return tiles
        vision[start : start + block.shape[0]] = True
        cursor = start + block.shape[0]
    stray = is_vision_id & ~vision
    if stray.any():
        out.add(
            f"{what}: {int(stray.sum())} vision id(s) outside the blocks its meta implies "
            f"(first at position {offset + int(np.flatnonzero(stray)[0])})",
            "input_ids.npy",
        )
        return tiles
    tags = np.isin(ids, [special.image_tag, special.video_tag])
    if tags.any():
        out.add(f"{what}: unexpanded <image>/<video> tag id in input_ids", "input_ids.npy")
    contexts = int(np.isin(ids, special.vision_context_ids).sum())
    if contexts != TOKENS_PER_TILE * tiles or sample.get("num_tiles") != tiles:
        out.add(
            f"{what}: {contexts} vision placeholders, meta num_tiles {sample.get('num_tiles')}, "
            f"its images and videos stand for {tiles} tile(s)",
            "meta.json",
        )

    # ChatML turns: <|im_start|>role\n ... <|im_end|>\n, vision blocks inside the content
    prefixes = settings.role_prefix
    n = ids.shape[0]

    def role_at(position: int) -> str | None:
        for role, prefix in prefixes.items():
            size = prefix.shape[0]
            if position + size <= n and np.array_equal(ids[position : position + size], prefix):
                return role
        return None

    ends = np.flatnonzero((ids[:-1] == special.im_end) & (ids[1:] == special.newline))
    expected = np.full(n, IGNORE_INDEX, dtype=np.int32)
    position = 0
    while position < n:
        role = role_at(position)
        if role is None:
            out.add(
                f"{what}: no ChatML turn starts at position {offset + position}", "input_ids.npy"
            )
            return tiles
        content = position + prefixes[role].shape[0]
        end = None
        for q in ends[np.searchsorted(ends, content) :].tolist():
            if q + 2 == n or (ids[q + 2] == special.im_start and role_at(q + 2) is not None):
                end = q + 2
                break
        if end is None:
            out.add(
                f"{what}: the {role} turn at position {offset + position} never ends with "
                f"<|im_end|>\\n",
                "input_ids.npy",
            )
            return tiles
        if role == "assistant":
            expected[content:end] = np.where(vision[content:end], IGNORE_INDEX, ids[content:end])
        position = end
    wrong = np.flatnonzero(labels != expected)
    if wrong.size:
        first = int(wrong[0])
        out.add(
            f"{what}: {wrong.size} label(s) differ from the template (first at position "
            f"{offset + first}: label {int(labels[first])}, expected {int(expected[first])}, "
            f"id {int(ids[first])}{', a vision token' if vision[first] else ''})",
            "labels.npy",
        )
    return tiles


def check_sample(
    shard: str, key: str, parts: Mapping[str, bytes], settings: Settings
) -> tuple[list[Problem], SampleSummary]:
    """Every per-sample invariant of shard format v1 (see the module docstring)."""
    out = _Collector(shard, key)
    summary = SampleSummary()
    for name in ARRAY_MEMBERS:
        if f"{name}.npy" not in parts:
            out.add(f"member {name}.npy missing")
    if "meta.json" not in parts:
        out.add("member meta.json missing")
    tile_names = []
    for part in parts:
        match = TILE_PATTERN.match(part)
        if match:
            tile_names.append(part)
            if match.group(2) != settings.tile_format:
                out.add(f"tile format {match.group(2)!r}, the build uses {settings.tile_format}")
        elif part not in ("meta.json", *(f"{n}.npy" for n in ARRAY_MEMBERS)):
            out.add("unknown member", part)
    arrays = {}
    for name in ARRAY_MEMBERS:
        if f"{name}.npy" in parts:
            arrays[name] = _load_array(f"{name}.npy", parts[f"{name}.npy"], out)
    meta = None
    if "meta.json" in parts:
        try:
            meta = json.loads(parts["meta.json"])
        except (ValueError, UnicodeError) as error:
            out.add(f"does not parse: {error}", "meta.json")
        else:
            canonical = json.dumps(meta, ensure_ascii=False, sort_keys=True).encode()
            if canonical != parts["meta.json"]:
                out.add("not the canonical JSON lvita writes (damaged?)", "meta.json")
    if meta is not None:
        try:
            samples = list(meta["samples"])
            if meta["format"] != SHARD_FORMAT_VERSION or meta["stage"] != settings.stage:
                out.add(f"format {meta['format']} stage {meta['stage']!r}", "meta.json")
            if meta["tile_format"] != settings.tile_format:
                out.add(f"tile_format {meta['tile_format']!r}", "meta.json")
            summary.datasets = [str(s["dataset"]) for s in samples]
            summary.refs = [(str(s["file"]), str(s["record"])) for s in samples]
            summary.tokens = sum(int(s["length"]) for s in samples)
            meta_tiles = int(meta["num_tiles"])
        except (KeyError, TypeError, ValueError) as error:
            out.add(f"malformed: missing or bad field {error}", "meta.json")
            meta = None
    # tiles: names, count, bytes
    if meta is not None:
        expected_names = [f"tile{i:06d}.{settings.tile_format}" for i in range(meta_tiles)]
        if sorted(tile_names) != expected_names:
            out.add(f"{len(tile_names)} tile member(s), meta.json says {meta_tiles}")
    for part in sorted(tile_names):
        data = parts[part]
        problem = _png_problem(data) if part.endswith(".png") else None
        if problem is None and (settings.decode_tiles or not part.endswith(".png")):
            from lvita_data.media.tiles import decode_tile

            try:
                decode_tile(data, part.rsplit(".", 1)[1])
            except ValueError as error:
                problem = str(error)
        if problem:
            out.add(problem, part)
    summary.tiles = len(tile_names)

    capacity = settings.max_seq_len
    if meta is None or any(arrays.get(n) is None for n in ARRAY_MEMBERS):
        return out.problems, summary
    ids, labels, positions, cu = (arrays[n] for n in ARRAY_MEMBERS)
    shapes_ok = True
    for name, array in (("input_ids", ids), ("labels", labels), ("position_ids", positions)):
        if array.shape != (capacity,):
            out.add(f"shape {array.shape}, expected ({capacity},)", f"{name}.npy")
            shapes_ok = False
    if not shapes_ok:
        return out.problems, summary
    n = len(samples)
    if cu.shape != (n + 1,) or n == 0:
        out.add(f"{cu.shape[0]} entries for {n} packed samples", "cu_seqlens.npy")
        return out.problems, summary
    if cu[0] != 0 or cu[-1] != capacity or not bool(np.all(np.diff(cu) > 0)):
        out.add(
            f"must start at 0, strictly increase and end at {capacity}: {cu.tolist()[:12]}",
            "cu_seqlens.npy",
        )
        return out.problems, summary
    if settings.reset_attention:
        expected_positions = np.arange(capacity, dtype=np.int32) - np.repeat(cu[:-1], np.diff(cu))
    else:
        expected_positions = np.arange(capacity, dtype=np.int32)
    if not np.array_equal(positions, expected_positions):
        first = int(np.flatnonzero(positions != expected_positions)[0])
        out.add(
            f"position {first} is {int(positions[first])}, expected "
            f"{int(expected_positions[first])} (reset_attention={settings.reset_attention})",
            "position_ids.npy",
        )
    bad_ids = (ids < 0) | (ids >= settings.vocab_size)
    if bad_ids.any():
        first = int(np.flatnonzero(bad_ids)[0])
        out.add(f"id {int(ids[first])} at position {first} is outside the vocabulary")
    supervised_wrong = (labels != IGNORE_INDEX) & (labels != ids)
    if supervised_wrong.any():
        first = int(np.flatnonzero(supervised_wrong)[0])
        out.add(
            f"{int(supervised_wrong.sum())} label(s) neither -100 nor the input id "
            f"(first at position {first}: label {int(labels[first])}, id {int(ids[first])})",
            "labels.npy",
        )
    align = settings.align
    tiles = 0
    for number, sample in enumerate(samples):
        start, stop = int(cu[number]), int(cu[number + 1])
        try:
            offset, length = int(sample["offset"]), int(sample["length"])
        except (KeyError, TypeError, ValueError) as error:
            out.add(f"packed sample {number}: bad offset/length {error}", "meta.json")
            continue
        aligned = -(-length // align) * align
        if offset != start or length < 1 or start % align:
            out.add(
                f"packed sample {number}: offset {offset}, length {length}; cu_seqlens[{number}] "
                f"= {start}, align {align}",
                "meta.json",
            )
            continue
        if (number < n - 1 and stop - start != aligned) or start + aligned > stop:
            out.add(
                f"packed sample {number}: segment of {stop - start} tokens for length {length} "
                f"(aligned {aligned})",
                "cu_seqlens.npy",
            )
            continue
        end = start + length
        if np.any(ids[end:stop] != settings.special.pad) or np.any(
            labels[end:stop] != IGNORE_INDEX
        ):
            out.add(
                f"packed sample {number}: padding [{end}, {stop}) is not pad id / label -100",
                "input_ids.npy",
            )
        tiles += _check_text(
            number, start, ids[start:end], labels[start:end], sample, settings, out
        )
    if tiles != meta_tiles or tiles != len(tile_names):
        out.add(
            f"its samples stand for {tiles} tile(s), meta num_tiles {meta_tiles}, "
            f"{len(tile_names)} tile member(s)",
            "meta.json",
        )
    return out.problems, summary


# ---------------------------------------------------------------------------------------------
# Per shard


@dataclass(slots=True)
class ShardResult:
    name: str
    problems: list[Problem] = field(default_factory=list)
    keys: list[str] = field(default_factory=list)
    samples: int = 0
    tokens: int = 0
    tiles: int = 0
    digests_checked: int = 0
    datasets: Counter = field(default_factory=Counter)
    refs: dict[str, list[tuple[str, str]]] = field(default_factory=dict)
    scan: TarScan | None = None
    intact: bool = False
    """sha256 and size match index.json."""


@dataclass(frozen=True, slots=True)
class _ShardTask:
    path: str
    entry: dict
    settings: Settings | None
    """None: the build settings are unreadable; only checksums, tar structure and digests."""
    digests: dict[str, str] | None


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
        if part == FIRST_MEMBER and after_key:
            return after_key, None  # cu_seqlens.npy is the first member of every sample
    if before_key is None or before_key == after_key:
        return after_key, None
    if after_key is None:
        return before_key, None
    return f"{before_key} or {after_key}", None


def verify_shard(task: _ShardTask) -> ShardResult:
    """Checksum, tar structure, per-sample checks and digests of one shard."""
    name = task.entry["name"]
    result = ShardResult(name)
    problems = result.problems
    path = task.path
    try:
        size = os.path.getsize(path)
    except OSError:
        problems.append(Problem("files", "shard listed in index.json is missing", name))
        return result
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


def _check_members(data, scan: TarScan, task: _ShardTask, result: ShardResult) -> None:
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


# ---------------------------------------------------------------------------------------------
# The whole build


def _read_json(path: Path, problems: list[Problem], what: str):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        problems.append(Problem("files", f"{what} is missing"))
    except (OSError, ValueError) as error:
        problems.append(Problem("files", f"{what} does not parse: {error}"))
    return None


def _recorded_digests(out: Path, entry: dict) -> dict[str, str] | None:
    if isinstance(entry.get("digests"), dict):
        return entry["digests"]
    done = out / STATE_DIR / "done" / f"{entry['name']}.json"
    try:
        record = json.loads(done.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    digests = record.get("digests")
    return digests if isinstance(digests, dict) else None


def _check_files(out: Path, index: dict, problems: list[Problem]) -> None:
    listed = {s["name"] for s in index["shards"]}
    stage = index.get("stage", "")
    for number, entry in enumerate(index["shards"]):
        if entry["name"] != shard_name(stage, number):
            problems.append(
                Problem("files", f"shard {number} is named {entry['name']!r} in index.json")
            )
    for path in sorted(out.iterdir()):
        if path.name.endswith(".tar") and path.name not in listed:
            problems.append(Problem("files", "shard not listed in index.json", path.name))
        if path.name.endswith(".tar.idx") and path.name[: -len(".idx")] not in listed:
            problems.append(Problem("files", "Energon index of an unlisted shard", path.name))
    for path in sorted(out.rglob(f"*{TEMP_MARKER}*")):
        problems.append(Problem("files", f"leftover temporary {path.relative_to(out)}"))


def _check_accounting(
    out: Path, index: dict, results: list[ShardResult], problems: list[Problem]
) -> None:
    stats = _read_json(out / "stats.json", problems, "stats.json")
    rejects: list[dict] = []
    try:
        for number, line in enumerate(
            (out / "rejects.jsonl").read_text(encoding="utf-8").splitlines(), 1
        ):
            if line.strip():
                try:
                    rejects.append(json.loads(line))
                except ValueError as error:
                    problems.append(Problem("files", f"rejects.jsonl line {number}: {error}"))
    except OSError:
        problems.append(Problem("files", "rejects.jsonl is missing"))
    packed = Counter()
    for result in results:
        packed.update(result.datasets)
    rejected = Counter(str(r.get("dataset")) for r in rejects)
    if not isinstance(stats, dict):
        return
    try:
        # the planner's selection (`plan` since `lvita stats`; `datasets` in older builds) is
        # independent of the shards; `datasets[].selected` is now derived from them
        planned = stats["plan"] if isinstance(stats.get("plan"), list) else stats["datasets"]
        selected = {str(d["name"]): int(d["selected"]) for d in planned}
        measured = {str(d["name"]): int(d["samples"]) for d in stats["datasets"] if "samples" in d}
        total_packs, total_tokens = int(stats["packs"]), int(stats["tokens"])
        stats_rejects = int(stats["rejects"])
    except (KeyError, TypeError, ValueError) as error:
        problems.append(Problem("files", f"stats.json lacks field {error}"))
        return
    for dataset, count in selected.items():
        if packed[dataset] + rejected[dataset] != count:
            problems.append(
                Problem(
                    "accounting",
                    f"dataset {dataset}: {count} selected != {packed[dataset]} packed + "
                    f"{rejected[dataset]} rejected",
                )
            )
    for dataset, count in measured.items():
        if isinstance(stats.get("plan"), list) and count != packed[dataset]:
            problems.append(
                Problem(
                    "accounting",
                    f"dataset {dataset}: stats.json says {count} packed, the shards hold "
                    f"{packed[dataset]}",
                )
            )
    for dataset in sorted((set(packed) | set(rejected)) - set(selected)):
        problems.append(
            Problem("accounting", f"dataset {dataset!r} is packed or rejected but not in stats")
        )
    intact = all(r.scan is not None for r in results)
    if intact and sum(r.samples for r in results) != total_packs:
        problems.append(
            Problem(
                "accounting",
                f"{sum(r.samples for r in results)} packed sequences, stats.json says "
                f"{total_packs}",
            )
        )
    if intact and sum(r.tokens for r in results) != total_tokens:
        problems.append(
            Problem(
                "accounting",
                f"{sum(r.tokens for r in results)} real tokens, stats.json says {total_tokens}",
            )
        )
    if stats_rejects != len(rejects):
        problems.append(
            Problem(
                "accounting", f"rejects.jsonl has {len(rejects)} lines, stats.json {stats_rejects}"
            )
        )
    _check_plan(out, results, rejects, problems)


def _check_plan(
    out: Path, results: list[ShardResult], rejects: list[dict], problems: list[Problem]
) -> None:
    """Keys inside their shard's pack range; planned = packed + build-rejected, per pack."""
    try:
        plan = json.loads((out / STATE_DIR / "plan.json").read_text(encoding="utf-8"))
        files = [f["path"] for f in plan["files"]]
        shards, offsets = plan["shards"], plan["pack_offset"]
    except (OSError, ValueError, KeyError, TypeError):
        return  # no saved plan (e.g. a copied dataset): nothing to compare with
    if len(shards) != len(results):
        problems.append(
            Problem("plan", f"plan.json has {len(shards)} shard(s), index.json {len(results)}")
        )
        return
    rejected = Counter((str(r.get("file")), str(r.get("record"))) for r in rejects)
    for number, (result, packs) in enumerate(zip(results, shards, strict=True)):
        first = offsets[number]
        for key, refs in result.refs.items():
            try:
                pack = int(key) - first
            except ValueError:
                continue
            if not 0 <= pack < len(packs):
                problems.append(
                    Problem("plan", "key outside the shard's planned pack range", result.name, key)
                )
                continue
            planned = Counter((files[f], str(row)) for f, row in packs[pack])
            missing = planned - Counter(refs)
            extra = Counter(refs) - planned
            unexplained = missing - rejected
            if extra or unexplained:
                problems.append(
                    Problem(
                        "plan",
                        f"packed samples differ from plan.json: {sum(extra.values())} unplanned, "
                        f"{sum(unexplained.values())} planned but neither packed nor rejected",
                        result.name,
                        key,
                    )
                )
        ordered = [int(k) for k in result.keys if KEY_PATTERN.match(k)]
        if ordered != sorted(ordered):
            problems.append(Problem("plan", "keys are not in pack order", result.name))


def verify_build(
    out_dir: str | os.PathLike[str], *, workers: int = 1, decode_tiles: bool = True
) -> VerifyReport:
    """Check a build directory (see the module docstring); never raises for a damaged build."""
    out = Path(out_dir)
    report = VerifyReport(str(out), tiles_decoded=decode_tiles)
    problems = report.problems
    if not out.is_dir():
        problems.append(Problem("files", "not a directory"))
        return report
    index = _read_json(out / "index.json", problems, "index.json")
    try:
        shards = list(index["shards"])
        for entry in shards:
            entry["name"], entry["bytes"], entry["sha256"], entry["samples"], entry["tokens"]
        if index["format"] != SHARD_FORMAT_VERSION:
            problems.append(Problem("files", f"index.json format {index['format']}"))
    except (TypeError, KeyError) as error:
        if index is not None:
            problems.append(Problem("files", f"index.json lacks field {error}"))
        return report
    report.shards = len(shards)
    settings: Settings | None
    try:
        settings = load_settings(out, index, decode_tiles=decode_tiles)
    except Exception as error:  # missing/odd manifest copy, tokenizer not loadable, ...
        message = f"cannot read the build settings ({error}): only checksums and tar structure"
        problems.append(Problem("build", message))
        settings = None
    _check_files(out, index, problems)
    tasks = [
        _ShardTask(str(out / entry["name"]), entry, settings, _recorded_digests(out, entry))
        for entry in shards
    ]
    if workers > 1 and len(tasks) > 1:
        # spawn, not fork: a forked child can inherit locks held by threads of this process
        # (PyAV's decoder threads, the tokenizer's pool) and deadlock when it touches them
        context = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(min(workers, len(tasks)), mp_context=context) as pool:
            results = list(pool.map(verify_shard, tasks))
    else:
        results = [verify_shard(task) for task in tasks]
    owners: dict[str, str] = {}
    for result in results:
        problems.extend(result.problems)
        report.samples += result.samples
        report.tokens += result.tokens
        report.tiles += result.tiles
        report.digests_checked += result.digests_checked
        for key in result.keys:
            if key in owners and owners[key] != result.name:
                problems.append(Problem("tar", f"key also used in {owners[key]}", result.name, key))
            owners.setdefault(key, result.name)
    if settings is not None:
        _check_accounting(out, index, results, problems)
    if (out / ".nv-meta").is_dir():
        from lvita_data.shards.energon import check_energon_metadata, layout_from_scan

        if all(r.intact and r.scan is not None and not r.scan.problems for r in results):
            layouts = [layout_from_scan(r.name, r.scan) for r in results]  # type: ignore[arg-type]
            problems.extend(
                Problem("energon", message) for message in check_energon_metadata(out, layouts)
            )
    return report


__all__ = [
    "Problem",
    "VerifyReport",
    "check_sample",
    "verify_build",
    "verify_shard",
]
