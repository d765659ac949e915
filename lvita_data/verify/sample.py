"""The per-sample checks of shard formats 1, 2 and 3 (`check_sample`): one sample's members in
memory. A pack is checked as the format `index.json` names (its meta.json must name the same).

- Members: format 3 exactly `arrays.npz`, `media.tar` and `meta.json`, `media.tar` the
  canonical tar lvita writes (`media_tar_bytes`) of image and tile members only; formats 1 and 2
  the four arrays (format 1: one `.npy` member each; format 2: exactly `arrays.npz`) and
  `meta.json` next to the media members. Media members: tiles `tile000000..` in the build's
  tile format, in formats 2 and 3 image members `image000000.{ext}..`, nothing else.
- Arrays load with allow_pickle=False, are int32 and 1-D, and are the canonical bytes lvita
  writes (each `.npy`; formats 2 and 3: `arrays.npz` is `npz_bytes` of its arrays, read by
  `load_npz` with each array's inflated size bounded by `npz_limit`); shapes [T] and [n + 1];
  `cu_seqlens` starts at 0, strictly increases and ends at T. Formats 2 and 3 report an array's
  problems in member `arrays.npz`, the message naming the array (`SampleProblems`).
- `meta.json` is the canonical JSON lvita writes, of this format, stage and tile format.
- Packed sample i starts at cu_seqlens[i] (a multiple of `pack.align`) and fills its aligned
  length; padding is the pad token with label -100; positions restart per segment when
  `pack.reset_attention`, else run 0..T-1; ids are inside the vocabulary; every label is -100 or
  its input id. Vision blocks, ChatML turns and labels: `lvita_data.verify.text`.
- Tiles: meta `num_tiles` == the tiles the samples stand for (image grids and video frames) ==
  the pack's vision placeholders / 256; the stored tiles (meta `stored_tiles`, `num_tiles` in
  format 1) == tile members == the frames of the pack's videos plus the tiles of its images
  stored as tiles (format 1, and format 3 with ``image_storage: tiles``); the image members:
  `lvita_data.verify.images`. PNG tiles pass every chunk CRC and are 448x448 RGB (and decode,
  unless `decode_tiles=False`).
"""

from __future__ import annotations

import json
import re
import zlib
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np

from lvita_data.errors import ShardFormatError
from lvita_data.samples.tiling import TILE_SIZE, TOKENS_PER_TILE
from lvita_data.schema import IGNORE_INDEX
from lvita_data.shards.format import (
    ARRAY_MEMBERS,
    ARRAYS_NPZ,
    FORMAT_MEDIA,
    FORMAT_TILES,
    MEDIA_TAR,
    PACK_MEMBERS,
    SHARD_FORMATS,
    load_npy,
    load_npz,
    media_tar_bytes,
    meta_bytes,
    npy_bytes,
    npz_bytes,
    npz_limit,
    parse_json,
    read_media_tar,
    tile_member,
)
from lvita_data.verify.images import IMAGE_PATTERN, check_images
from lvita_data.verify.report import Problem, SampleProblems
from lvita_data.verify.settings import Settings
from lvita_data.verify.text import check_text

TILE_PATTERN = re.compile(r"^tile(\d{6})\.([a-z]+)$")
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@dataclass(slots=True)
class SampleSummary:
    datasets: list[str] = field(default_factory=list)
    refs: list[tuple[str, str]] = field(default_factory=list)
    """(file, record) of each packed sample."""
    tokens: int = 0
    tiles: int = 0
    images: int = 0


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


def _int32(name: str, array: np.ndarray, out: SampleProblems) -> np.ndarray | None:
    if array.dtype != np.dtype("<i4") or array.ndim != 1:
        out.add(f"dtype {array.dtype} ndim {array.ndim}, expected int32 1-D", name)
        return None
    return array


def _load_array(name: str, data: bytes, out: SampleProblems) -> np.ndarray | None:
    try:
        array = load_npy(data)
    except Exception as error:  # any parse failure of damaged bytes
        out.add(f"does not load as .npy: {error}", name)
        return None
    if _int32(name, array, out) is None:
        return None
    if npy_bytes(array) != data:
        out.add("not the canonical .npy encoding of its array (damaged header?)", name)
    return array


def _load_arrays(
    parts: Mapping[str, bytes], version: int, settings: Settings, out: SampleProblems
) -> dict[str, np.ndarray | None]:
    """The four arrays that load as int32 1-D (None for one that does not): the `.npy` members
    of format 1, or the `arrays.npz` of formats 2 and 3 (bounded inflation, CRCs checked,
    canonical)."""
    if version == FORMAT_TILES:
        return {
            name: _load_array(f"{name}.npy", parts[f"{name}.npy"], out)
            for name in ARRAY_MEMBERS
            if f"{name}.npy" in parts
        }
    if ARRAYS_NPZ not in parts:
        return {}
    data = parts[ARRAYS_NPZ]
    try:
        loaded = load_npz(data, ARRAY_MEMBERS, npz_limit(settings.max_seq_len))
    except ShardFormatError as error:  # load_npz turns every damage into this
        out.add(f"does not load as an .npz of the four arrays: {error}", ARRAYS_NPZ)
        return {}
    arrays = {name: _int32(f"{name}.npy", loaded[name], out) for name in ARRAY_MEMBERS}
    if all(array is not None for array in arrays.values()) and npz_bytes(arrays) != data:
        out.add("not the canonical arrays.npz lvita writes (damaged zip metadata?)", ARRAYS_NPZ)
    return arrays


def _meta_format(parts: Mapping[str, bytes], settings: Settings) -> int:
    """The format a pack is checked as: the index's, else what its meta.json names."""
    if settings.shard_format is not None:
        return settings.shard_format
    try:
        version = json.loads(parts["meta.json"])["format"]
    except Exception:  # missing or damaged: reported by the meta checks
        return FORMAT_TILES
    return version if version in SHARD_FORMATS else FORMAT_TILES


def _media_parts(
    parts: Mapping[str, bytes], version: int, array_parts: tuple[str, ...], out: SampleProblems
) -> Mapping[str, bytes | memoryview] | None:
    """The pack's image and tile members: those of format 3's `media.tar` (strictly scanned, and
    its bytes the canonical tar lvita writes of them), else the members next to the arrays;
    None when `media.tar` is missing or unreadable (reported once: the checks of its members
    are skipped)."""
    if version != FORMAT_MEDIA:
        return {p: data for p, data in parts.items() if p != "meta.json" and p not in array_parts}
    for part in parts:
        if part not in PACK_MEMBERS:
            out.add("unknown member", part, exact=True)
    if MEDIA_TAR not in parts:
        out.add(f"member {MEDIA_TAR} missing")
        return None
    try:
        media = read_media_tar(parts[MEDIA_TAR])
    except ShardFormatError as error:
        out.add(f"does not read as a tar of image and tile members: {error}", MEDIA_TAR)
        return None
    if media_tar_bytes({name: bytes(data) for name, data in media.items()}) != parts[MEDIA_TAR]:
        out.add("not the canonical media.tar lvita writes (damaged header or padding?)", MEDIA_TAR)
    return media


def check_sample(
    shard: str, key: str, parts: Mapping[str, bytes], settings: Settings
) -> tuple[list[Problem], SampleSummary]:
    """Every per-sample invariant of shard formats 1, 2 and 3 (see the module docstring)."""
    version = _meta_format(parts, settings)
    out = SampleProblems(shard, key, None if version == FORMAT_TILES else ARRAYS_NPZ)
    summary = SampleSummary()
    array_parts = (
        tuple(f"{n}.npy" for n in ARRAY_MEMBERS) if version == FORMAT_TILES else (ARRAYS_NPZ,)
    )
    for part in array_parts:
        if part not in parts:
            out.add(f"member {part} missing")
    if "meta.json" not in parts:
        out.add("member meta.json missing")
    media = _media_parts(parts, version, array_parts, out)
    tile_names, image_names = [], []
    for part in media or ():
        match = TILE_PATTERN.match(part)
        if match:
            tile_names.append(part)
            if match.group(2) != settings.tile_format:
                out.add(f"tile format {match.group(2)!r}, the build uses {settings.tile_format}")
        elif version != FORMAT_TILES and IMAGE_PATTERN.match(part):
            image_names.append(part)
        else:
            out.add("unknown member", part, exact=True)
    arrays = _load_arrays(parts, version, settings, out)
    meta = None
    if "meta.json" in parts:
        try:
            meta = parse_json(parts["meta.json"], "meta.json")
        except ShardFormatError as error:
            out.add(f"does not parse: {error}", "meta.json")
        else:
            canonical = meta_bytes(meta)
            if canonical != parts["meta.json"]:
                out.add("not the canonical JSON lvita writes (damaged?)", "meta.json")
    stored_field = "num_tiles" if version == FORMAT_TILES else "stored_tiles"
    if meta is not None:
        try:
            samples = list(meta["samples"])
            if meta["format"] != version or meta["stage"] != settings.stage:
                out.add(f"format {meta['format']} stage {meta['stage']!r}", "meta.json")
            if meta["tile_format"] != settings.tile_format:
                out.add(f"tile_format {meta['tile_format']!r}", "meta.json")
            summary.datasets = [str(s["dataset"]) for s in samples]
            summary.refs = [(str(s["file"]), str(s["record"])) for s in samples]
            summary.tokens = sum(int(s["length"]) for s in samples)
            meta_tiles = int(meta["num_tiles"])
            meta_stored = int(meta[stored_field])
            most = settings.max_seq_len // TOKENS_PER_TILE
            if not (0 <= meta_stored <= most and 0 <= meta_tiles <= most):
                raise ValueError(f"tile counts {meta_tiles} / {meta_stored} outside 0..{most}")
        except (KeyError, TypeError, ValueError, OverflowError) as error:
            out.add(f"malformed: missing or bad field {error}", "meta.json")
            meta = None
    # tiles: names, count, bytes
    if meta is not None and media is not None:
        expected_names = [tile_member(i, settings.tile_format) for i in range(meta_stored)]
        if sorted(tile_names) != expected_names:
            said = "says" if version == FORMAT_TILES else "stored_tiles"
            out.add(f"{len(tile_names)} tile member(s), meta.json {said} {meta_stored}")
    for part in sorted(tile_names):
        data = bytes(media[part])
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
    summary.images = len(image_names)
    if meta is not None and media is not None and version != FORMAT_TILES:
        source = version != FORMAT_MEDIA or settings.image_storage == "source"
        check_images(samples, media, image_names, source, settings, out)

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
        tiles += check_text(
            number, start, ids[start:end], labels[start:end], sample, version, settings, out
        )
    placeholders = int(np.isin(ids, settings.special.vision_context_ids).sum())
    if tiles != meta_tiles or placeholders != TOKENS_PER_TILE * meta_tiles:
        out.add(
            f"its samples stand for {tiles} tile(s), meta num_tiles {meta_tiles}, "
            f"{placeholders} vision placeholders ({TOKENS_PER_TILE} per tile)",
            "meta.json",
        )
    stored = _stored_tiles(samples) if media is not None else None
    if stored is not None and (stored != meta_stored or stored != len(tile_names)):
        out.add(
            f"its videos' frames and the tiles of its images stored as tiles are {stored}, meta "
            f"{stored_field} {meta_stored}, {len(tile_names)} tile member(s)",
            "meta.json",
        )
    return out.problems, summary


def _stored_tiles(samples: list) -> int | None:
    """The tiles a pack stores: every video frame, and the tiles of every image without a
    ``member`` (stored as tiles); None when the meta is malformed (reported by `check_text`)."""
    try:
        frames = sum(len(video["frames"]) for sample in samples for video in sample["videos"])
        return frames + sum(
            int(image["tiles"])
            for sample in samples
            for image in sample["images"]
            if "member" not in image
        )
    except (KeyError, TypeError, ValueError):
        return None
