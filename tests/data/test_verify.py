"""`lvita verify` (lvita_data.verify): an intact build passes; a flipped byte anywhere in a shard
is reported with the shard and the sample key; invariant and accounting breaks are reported.

One small mixed build over the session demo corpus (captions, multi-image, parquet with embedded
images, text only, videos, bad records incl. a JPEG truncated after a valid header), `pack.align`
8 and 4 packs per shard, in shard format 3 with the default `shards.image_storage: source`
(images as source bytes, video frames as tiles) and with `tiles` (every tile stored); formats 1
and 2 are made from them (`legacy_shards`). Per-sample digests are recorded the way the build is
meant to record them (`sample_digest` of each sample dict handed to `write_shard`, into the
completion records), by wrapping `write_shard`. Tests handle a pack as one flat dict of its
members and the members of its `media.tar` (`samples_of`, `read_parts`); `packed` puts the
media back into a canonical `media.tar` for `check_sample` and `write_shard`.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import struct
import tarfile
import zipfile
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from legacy_shards import legacy_pack, write_legacy_build
from pack_media import packed

import lvita_data.build.shard as build_module
from lvita_data.build.run import STATE_DIR, build_stage
from lvita_data.fileio import sha256_file
from lvita_data.shards.format import (
    ARRAY_MEMBERS,
    ARRAYS_NPZ,
    FORMAT_MEDIA,
    FORMAT_SOURCE,
    FORMAT_TILES,
    MEDIA_NAME,
    MEDIA_TAR,
    load_npz,
    media_tar_bytes,
    meta_bytes,
    npy_bytes,
    npz_bytes,
    sample_digest,
)
from lvita_data.shards.tar import scan_tar, split_member_name
from lvita_data.shards.writer import write_shard
from lvita_data.verify import check_sample, load_settings, verify_build
from pipelines.cli import EXIT_OK, EXIT_VERIFY_PROBLEMS, run

MANIFEST = """\
schema_version: 1
stage: verifytest
seed: 7
tokenizer: qwen2.5
pack:
  max_seq_len: 4096
  reset_attention: true
  group_by: none
  align: 8
shards:
  packs_per_shard: 4
video:
  max_frames: 4
  max_fps: 1.0
rejects:
  max_rate: 0.6
datasets:
  - name: captions
    format: longvita_jsonl
    path: {root}/longvita/image_caption.jsonl
    media_root: {root}/longvita
    max_samples: 8
  - name: multi
    format: longvita_jsonl
    path: {root}/longvita/multi_image.jsonl
    media_root: {root}/longvita
    max_samples: 3
  - name: chartqa
    format: hf_parquet
    path: {root}/cauldron/chartqa-00000-of-00001.parquet
    max_samples: 3
  - name: chat
    format: text_jsonl
    path: {root}/text/short_chat.jsonl
    max_samples: 6
  - name: video
    format: longvita_jsonl
    path: {root}/longvita/video_qa.jsonl
    media_root: {root}/longvita
    max_samples: 3
  - name: bad
    format: longvita_jsonl
    path: {root}/longvita/bad_records.jsonl
    media_root: {root}/longvita
"""


def _build(demo_corpus, tmp_path_factory, storage: str):
    """(build directory as `lvita build` writes it today, digests per shard and key)."""
    root = demo_corpus[0]
    base = tmp_path_factory.mktemp(f"verify-{storage}")
    manifest = base / "verify.yaml"
    text = MANIFEST.format(root=root).replace(
        "  packs_per_shard: 4\n", f"  packs_per_shard: 4\n  image_storage: {storage}\n"
    )
    manifest.write_text(text, encoding="utf-8")
    out = base / "build"
    digests: dict[str, dict[str, str]] = {}
    real_write_shard = build_module.write_shard

    def recording_write_shard(path, samples, **kwargs):
        name = os.path.basename(path)

        def tee():
            for sample in samples:
                digests.setdefault(name, {})[sample["__key__"]] = sample_digest(sample)
                yield sample

        return real_write_shard(path, tee(), **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(build_module, "write_shard", recording_write_shard)
        build_stage(str(manifest), str(out), workers=1, progress=False)
    return out, digests


@pytest.fixture(scope="module")
def built(demo_corpus, tmp_path_factory) -> tuple[Path, dict[str, dict[str, str]]]:
    """The build in shard format 3, `shards.image_storage: source` (the default)."""
    return _build(demo_corpus, tmp_path_factory, "source")


@pytest.fixture(scope="module")
def built_tiles(demo_corpus, tmp_path_factory) -> tuple[Path, dict[str, dict[str, str]]]:
    """The same build with `shards.image_storage: tiles` (format 3, every tile stored)."""
    return _build(demo_corpus, tmp_path_factory, "tiles")


@pytest.fixture(params=["source", "tiles"])
def either(request) -> tuple[Path, dict[str, dict[str, str]]]:
    """Each of the two builds, for the checks that hold for both image storages."""
    return request.getfixturevalue("built" if request.param == "source" else "built_tiles")


def copy_build(built, destination: Path, *, with_digests: bool = False) -> Path:
    source, digests = built
    shutil.copytree(source, destination)
    if with_digests:
        for done in (destination / STATE_DIR / "done").glob("*.json"):
            record = json.loads(done.read_text(encoding="utf-8"))
            record["digests"] = digests[record["shard"]["name"]]
            done.write_text(json.dumps(record), encoding="utf-8")
    return destination


def index_of(out: Path) -> dict:
    return json.loads((out / "index.json").read_text(encoding="utf-8"))


def samples_of(path: Path) -> list[tuple[str, dict[str, tuple[int, int]]]]:
    """(key, {part: (data offset, size)}) per sample of a shard, in tar order; the members of a
    sample's media.tar (``tile000000.png``, ``image000000.jpg``, ...) are parts too, at their
    offsets in the shard."""
    data = path.read_bytes()
    scan = scan_tar(data)
    assert not scan.problems
    out: list[tuple[str, dict[str, tuple[int, int]]]] = []
    for member in scan.members:
        key, part = split_member_name(member.name)
        if not out or out[-1][0] != key:
            out.append((key, {}))
        out[-1][1][part] = (member.data_offset, member.size)
        if part == MEDIA_TAR:
            media = data[member.data_offset : member.data_offset + member.size]
            for inner in scan_tar(media, canonical=False).members:
                out[-1][1][inner.name] = (member.data_offset + inner.data_offset, inner.size)
    return out


def read_parts(path: Path, parts: dict[str, tuple[int, int]]) -> dict[str, bytes]:
    """A pack as one flat dict: its members and the members of its media.tar."""
    data = path.read_bytes()
    return {part: data[offset : offset + size] for part, (offset, size) in parts.items()}


def flip(path: Path, offset: int, mask: int = 0x5A) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= mask
    path.write_bytes(bytes(data))


def problems_at(report, shard: str) -> list:
    return [p for p in report.problems if p.shard == shard]


def arrays_of(members: dict[str, bytes]) -> dict[str, np.ndarray]:
    """The four arrays of a pack (its `arrays.npz`)."""
    return load_npz(members[ARRAYS_NPZ], ARRAY_MEMBERS, 1 << 20)


def with_arrays(members: dict[str, bytes], **changes: np.ndarray) -> dict[str, bytes]:
    """The pack's members with some arrays replaced, encoded as the build encodes them."""
    arrays = {**arrays_of(members), **changes}
    return {**members, ARRAYS_NPZ: npz_bytes({n: arrays[n] for n in ARRAY_MEMBERS})}


# --------------------------------------------------------------------------------------------
# intact build


def test_intact_build_passes_everything(built, capsys):
    out, digests = built
    index = index_of(out)
    assert index["format"] == FORMAT_MEDIA
    assert len(index["shards"]) >= 3, "the manifest should give several shards"
    report = verify_build(out, workers=2)
    assert report.ok, report.format()
    assert report.samples == sum(s["samples"] for s in index["shards"])
    assert report.tokens == sum(s["tokens"] for s in index["shards"])
    assert report.tiles > 0 and report.tiles_decoded  # the video frames
    assert report.images > 0 and "source image(s)" in report.format()
    assert report.digests_checked == report.samples  # the build records per-sample digests
    assert run(["verify", str(out)]) == EXIT_OK
    assert "OK" in capsys.readouterr().out
    assert run(["verify", str(out), "--json"]) == EXIT_OK
    payload = json.loads(capsys.readouterr().out)
    assert payload["ok"] and payload["problems"] == []
    rejects = (out / "rejects.jsonl").read_text(encoding="utf-8")
    assert "corrupt_image" in rejects  # a build-time reject is part of the accounting


def test_intact_tiles_storage_build_passes(built_tiles, built, capsys):
    out, _ = built_tiles
    index = index_of(out)
    assert index["format"] == FORMAT_MEDIA
    report = verify_build(out)
    assert report.ok, report.format()
    assert report.images == 0 and "image" not in report.format()
    assert report.digests_checked == report.samples > 0
    source = verify_build(built[0], decode_tiles=False)
    assert (report.samples, report.tokens) == (source.samples, source.tokens)
    assert report.tiles > source.tiles  # source storage stores only the video frames as tiles
    assert run(["verify", str(out), "--no-decode"]) == EXIT_OK
    assert "(tiles not decoded)" in capsys.readouterr().out


def test_intact_builds_of_older_formats_pass(built, built_tiles, tmp_path):
    """Format 2 (made from the source build) and format 1 (from the tiles build) pass every
    check, with the same samples, tokens, tiles and images as the format-3 builds."""
    for (out, _), version in ((built, FORMAT_SOURCE), (built_tiles, FORMAT_TILES)):
        legacy = write_legacy_build(out, tmp_path / f"format{version}", version)
        report = verify_build(legacy)
        assert report.ok, report.format()
        new = verify_build(out)
        assert (report.samples, report.tokens) == (new.samples, new.tokens)
        assert (report.tiles, report.images) == (new.tiles, new.images)


def test_recorded_digests_are_checked(built, tmp_path):
    out = copy_build(built, tmp_path / "b", with_digests=True)
    report = verify_build(out, decode_tiles=False)
    assert report.ok, report.format()
    assert report.digests_checked == report.samples > 0


def test_sample_digest_is_order_free_and_sensitive():
    sample = {"__key__": "000000001", "b.npy": b"xy", "a.json": b"{}"}
    assert sample_digest(sample) == sample_digest(dict(reversed(sample.items())))
    assert sample_digest(sample) != sample_digest({**sample, "b.npy": b"xz"})
    assert sample_digest(sample) != sample_digest({**sample, "__key__": "000000002"})
    # names and values are length-prefixed: moving bytes between them changes the digest
    assert sample_digest({"ab": b"c"}) != sample_digest({"a": b"bc"})


# --------------------------------------------------------------------------------------------
# a flipped byte is reported with the shard and the sample key


def _target(out: Path) -> tuple[str, Path, str, dict[str, tuple[int, int]], list[str]]:
    """A shard, and in it a sample (not the first) that has tiles; all keys of the shard."""
    name = index_of(out)["shards"][1]["name"]
    path = out / name
    samples = samples_of(path)
    for key, parts in samples[1:]:
        if "tile000000.png" in parts:
            return name, path, key, parts, [k for k, _ in samples]
    raise AssertionError("no sample with tiles in the second shard")


def _npz_entry(path: Path, parts, name: str) -> tuple[int, int, int]:
    """(shard offset of its local zip header, of its DEFLATE data, compressed size) of array
    `name` inside the `arrays.npz` member."""
    start, _ = parts[ARRAYS_NPZ]
    data = read_parts(path, parts)[ARRAYS_NPZ]
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        info = archive.getinfo(f"{name}.npy")
    header = info.header_offset
    name_length, extra_length = struct.unpack("<HH", data[header + 26 : header + 30])
    return start + header, start + header + 30 + name_length + extra_length, info.compress_size


@pytest.mark.parametrize(
    "where",
    [
        "input_ids in a vision block",
        "labels",
        "npy header",
        "png tile",
        "meta.json",
        "tar header name",
        "tar header of the first member",
        "tar header size field",
        "pax header",
        "padding",
        "media.tar member header",
    ],
)
def test_flipped_byte_names_shard_and_key(either, tmp_path, where):
    out = copy_build(either, tmp_path / "b")
    name, path, key, parts, _ = _target(out)
    data = path.read_bytes()
    if where in ("input_ids in a vision block", "labels"):  # DEFLATE streams in arrays.npz
        array = "input_ids" if where.startswith("input_ids") else "labels"
        _, start, size = _npz_entry(path, parts, array)
        offset = start + size // 2  # caught by inflating (CRC or a bad stream)
    elif where == "npy header":  # the local header's compressed size, which zipfile
        offset = _npz_entry(path, parts, "position_ids")[0] + 20  # ignores: canonical check
    elif where in ("tar header name", "pax header"):
        offset = parts["meta.json"][0] - (512 if where == "tar header name" else 3 * 512) + 2
    elif where == "tar header of the first member":
        offset = parts[ARRAYS_NPZ][0] - 512 + 4
    elif where == "png tile":
        start, size = parts["tile000000.png"]
        offset = start + size // 2
    elif where == "meta.json":
        offset = parts["meta.json"][0] + 5
    elif where == "tar header size field":
        offset = parts["meta.json"][0] - 512 + 130
    elif where == "media.tar member header":
        offset = parts["tile000000.png"][0] - 512 + 3  # the name field of the inner header
    else:
        start, size = parts["meta.json"]
        assert size % 512, "meta.json needs padding for this case"
        offset = start + size + 1
    assert 0 <= offset < len(data)
    flip(path, offset)
    report = verify_build(out, decode_tiles=False)
    assert not report.ok
    assert any(p.kind == "checksum" and p.shard == name for p in report.problems)
    located = [p for p in problems_at(report, name) if p.kind != "checksum"]
    assert located, report.format()
    assert located[0].key == key, report.format()
    if where in ("input_ids in a vision block", "labels", "npy header"):
        arrays = [p for p in located if p.kind == "sample"]
        assert arrays and {(p.key, p.member) for p in arrays} == {(key, ARRAYS_NPZ)}, (
            report.format()
        )
        if where == "npy header":
            assert any("canonical arrays.npz" in p.message for p in arrays), report.format()
    if where == "media.tar member header":
        media = [p for p in located if p.kind == "sample"]
        assert media and {(p.key, p.member) for p in media} == {(key, MEDIA_TAR)}, report.format()
    assert run(["verify", str(out), "--no-decode"]) == EXIT_VERIFY_PROBLEMS


def test_flip_in_end_of_archive_names_the_last_key(either, tmp_path):
    out = copy_build(either, tmp_path / "b")
    name, path, _, _, keys = _target(out)
    size = path.stat().st_size
    for offset in (size - 700, scan_tar(path.read_bytes()).end + 3):
        flip(path, offset)
        report = verify_build(out, decode_tiles=False)
        tar = [p for p in problems_at(report, name) if p.kind == "tar"]
        assert tar and tar[0].key == keys[-1], report.format()
        flip(path, offset)  # undo
    assert verify_build(out, decode_tiles=False).ok


def _change_user_text_id(out: Path, path: Path) -> str:
    """Turn a text id of a user turn (not a special id) into another text id in place, the
    member keeping its size: the canonical arrays.npz of an id that compresses to the same size.
    Returns the key."""
    user = load_settings(out, index_of(out)).role_prefix["user"]
    for key, parts in samples_of(path):
        members = read_parts(path, parts)
        ids = arrays_of(members)["input_ids"]
        windows = np.lib.stride_tricks.sliding_window_view(ids, user.shape[0])
        for start in np.flatnonzero((windows == user).all(axis=1)).tolist():
            position = start + user.shape[0]
            if ids[position] >= 150_000:
                continue
            offset, size = parts[ARRAYS_NPZ]
            for mask in range(1, 256):
                changed = ids.copy()
                changed[position] ^= mask
                data = with_arrays(members, input_ids=changed)[ARRAYS_NPZ]
                if len(data) == size and changed[position] < 150_000:
                    shard = bytearray(path.read_bytes())
                    shard[offset : offset + size] = data
                    path.write_bytes(bytes(shard))
                    return key
    raise AssertionError("no user text token found")


def test_flip_that_passes_every_invariant_needs_the_digest(either, tmp_path):
    """A text id of a user turn turned into another id passes every content check: only the
    per-sample digests the build records locate it to the shard and the sample key."""
    copy = copy_build(either, tmp_path / "copy")
    name, path, _, _, _ = _target(copy)
    key = _change_user_text_id(copy, path)
    report = verify_build(copy, decode_tiles=False)
    digest = [p for p in report.problems if p.kind == "digest"]
    assert [(p.shard, p.key) for p in digest] == [(name, key)], report.format()
    assert all(p.kind in ("checksum", "digest") for p in problems_at(report, name))


# --------------------------------------------------------------------------------------------
# invariants (checked on re-encoded members, no tar involved)


def _multi_sample_pack(out: Path):
    for entry in index_of(out)["shards"]:
        for key, parts in samples_of(out / entry["name"]):
            members = read_parts(out / entry["name"], parts)
            if arrays_of(members)["cu_seqlens"].shape[0] > 2:
                return entry["name"], key, members
    raise AssertionError("no pack with two samples")


def test_sample_invariants(either):
    out, _ = either
    settings = load_settings(out, index_of(out))
    shard, key, members = _multi_sample_pack(out)
    assert check_sample(shard, key, packed(members), settings)[0] == []
    arrays = arrays_of(members)
    ids, labels, cu = arrays["input_ids"], arrays["labels"], arrays["cu_seqlens"]
    meta = json.loads(members["meta.json"])

    def problems(changed: dict[str, bytes], member: str | None = None) -> str:
        """The messages of what `changed` breaks; `member`: the array all of them name."""
        found, _ = check_sample(shard, key, packed(changed), settings)
        assert found, "not caught"
        assert all(p.shard == shard and p.key == key for p in found)
        if member is not None:
            assert {p.member for p in found} == {ARRAYS_NPZ}, found
        return " | ".join(p.message for p in found)

    user = settings.role_prefix["user"]
    windows = np.lib.stride_tricks.sliding_window_view(ids, user.shape[0])
    user_text = int(np.flatnonzero((windows == user).all(axis=1))[0]) + user.shape[0]
    supervised_user = labels.copy()
    supervised_user[user_text] = ids[user_text]
    assert "differ from the template" in problems(with_arrays(members, labels=supervised_user))

    im_end = np.flatnonzero(labels == settings.special.im_end)
    unsupervised_end = labels.copy()
    unsupervised_end[im_end[0]] = -100
    assert "differ from the template" in problems(with_arrays(members, labels=unsupervised_end))

    flat = np.arange(ids.shape[0], dtype=np.int32)
    flat_positions = problems(with_arrays(members, position_ids=flat), "position_ids")
    assert "reset_attention" in flat_positions

    short_end = cu.copy()
    short_end[-1] -= 8
    assert "end at" in problems(with_arrays(members, cu_seqlens=short_end), "cu_seqlens")

    misaligned = cu.copy()
    misaligned[1] += 1
    assert problems(with_arrays(members, cu_seqlens=misaligned))

    unsigned = ids.astype(np.uint32)  # int64 inflates past the npz bound: see below
    assert "int32" in problems(with_arrays(members, input_ids=unsigned), "input_ids")

    meta_shifted = json.loads(json.dumps(meta))
    meta_shifted["samples"][1]["offset"] += 8
    encoded = json.dumps(meta_shifted, ensure_ascii=False, sort_keys=True).encode()
    assert "offset" in problems({**members, "meta.json": encoded})

    not_canonical = json.dumps(meta, indent=1).encode()
    assert "canonical" in problems({**members, "meta.json": not_canonical})

    with_tiles = next(
        (members for members in _all_samples(out) if "tile000000.png" in members), None
    )
    assert with_tiles is not None
    dropped = dict(with_tiles)
    last = max(p for p in dropped if p.startswith("tile"))
    del dropped[last]
    found, _ = check_sample(shard, key, packed(dropped), settings)
    assert any("tile" in p.message for p in found)
    extra = {**with_tiles, "notes.txt": b"hi"}
    found, _ = check_sample(shard, key, packed(extra), settings)
    assert [p.member for p in found] == ["notes.txt"]


def test_arrays_npz_invariants(built, built_tiles):
    """Exactly one arrays.npz holding exactly the four arrays, read with bounded inflation and
    checked to be the canonical bytes lvita writes; no .npy array member."""
    out, _ = built
    settings = load_settings(out, index_of(out))
    shard, key, members = _multi_sample_pack(out)
    assert ARRAYS_NPZ in members and not [p for p in members if p.endswith(".npy")]
    arrays = arrays_of(members)
    npy_members = {f"{n}.npy": npy_bytes(arrays[n]) for n in ARRAY_MEMBERS}

    def found(changed: dict[str, bytes]) -> list[tuple[str | None, str]]:
        problems, _ = check_sample(shard, key, packed(changed), settings)
        assert problems, "not caught"
        assert all(p.shard == shard and p.key == key for p in problems)
        return [(p.member, p.message) for p in problems]

    def npz_problem(changed: dict[str, bytes]) -> str:
        problems = found(changed)
        assert {member for member, _ in problems} == {ARRAYS_NPZ}, problems
        return " | ".join(message for _, message in problems)

    without = {k: v for k, v in members.items() if k != ARRAYS_NPZ}
    assert (None, "member arrays.npz missing") in found(without)
    as_format_1 = found({**without, **npy_members})  # the format-1 layout in a format-3 pack
    assert (None, "member arrays.npz missing") in as_format_1
    assert {(name, "unknown member") for name in npy_members} <= set(as_format_1)
    both = found({**members, "labels.npy": npy_members["labels.npy"]})
    assert both == [("labels.npy", "unknown member")]

    data = members[ARRAYS_NPZ]
    reordered = npz_bytes({n: arrays[n] for n in reversed(ARRAY_MEMBERS)})
    assert "not the canonical arrays.npz" in npz_problem({**members, ARRAYS_NPZ: reordered})
    buffer = io.BytesIO()
    np.savez_compressed(buffer, **arrays)  # what numpy writes: loads, but not lvita's bytes
    assert "not the canonical" in npz_problem({**members, ARRAYS_NPZ: buffer.getvalue()})
    extra = npz_bytes({**arrays, "extra": arrays["cu_seqlens"]})
    assert "npz members" in npz_problem({**members, ARRAYS_NPZ: extra})
    three = npz_bytes({n: arrays[n] for n in ARRAY_MEMBERS[:3]})
    assert "npz members" in npz_problem({**members, ARRAYS_NPZ: three})
    truncated = data[: len(data) // 2]
    assert "does not load" in npz_problem({**members, ARRAYS_NPZ: truncated})
    flipped = bytearray(data)
    flipped[len(data) // 3] ^= 0x5A  # inside a DEFLATE stream: CRC or inflate error
    assert "does not load" in npz_problem({**members, ARRAYS_NPZ: bytes(flipped)})
    assert "does not load" in npz_problem({**members, ARRAYS_NPZ: b"not a zip"})
    # bounded: an array larger than T + 1 int32 values is refused before it is inflated
    wide = arrays["input_ids"].astype(np.int64)
    assert "inflate past" in npz_problem(with_arrays(members, input_ids=wide))
    bomb = np.zeros(4_000_000, dtype=np.int32)  # 16 MB of zeros, ~16 kB compressed
    bomb_npz = with_arrays(members, labels=bomb)[ARRAYS_NPZ]
    assert len(bomb_npz) < 100_000
    assert "inflate past" in npz_problem({**members, ARRAYS_NPZ: bomb_npz})
    short = arrays["labels"][:-8]
    assert "labels.npy: shape" in npz_problem(with_arrays(members, labels=short))

    # arrays.npz has no place in a format-1 pack
    tiles_out, _ = built_tiles
    tiles_settings = replace(load_settings(tiles_out, index_of(tiles_out)), shard_format=1)
    tiles_members = legacy_pack(packed(_pack_members(tiles_out, shard, key)), 1, 4096)
    assert not [p for p in tiles_members if p.endswith(".npz")]
    assert check_sample(shard, key, tiles_members, tiles_settings)[0] == []
    problems, _ = check_sample(shard, key, {**tiles_members, ARRAYS_NPZ: data}, tiles_settings)
    assert [(p.member, p.message) for p in problems] == [(ARRAYS_NPZ, "unknown member")]


def test_media_tar_invariants(built):
    """Format 3's media.tar: present, a tar the strict scan reads of image and tile members
    only, each once, and the canonical bytes lvita writes (ustar, sorted, no record padding)."""
    out, _ = built
    settings = load_settings(out, index_of(out))
    name, _, key, _, _ = _target(out)
    flat = _pack_members(out, name, key)
    members = packed(flat)
    assert members[MEDIA_TAR] == flat[MEDIA_TAR]  # the build's bytes are canonical
    assert check_sample(name, key, members, settings)[0] == []
    media = {part: data for part, data in flat.items() if MEDIA_NAME.match(part)}

    def found(data: bytes) -> list[tuple[str | None, str]]:
        problems, _ = check_sample(name, key, {**members, MEDIA_TAR: data}, settings)
        assert problems, "not caught"
        assert all(p.shard == name and p.key == key for p in problems)
        return [(p.member, p.message) for p in problems]

    without = found(media_tar_bytes({}))  # an empty media.tar: the tiles are missing
    assert any("tile member(s)" in message for _, message in without), without
    missing = found(b"")
    assert any(m == MEDIA_TAR for m, _ in missing) or any("tile" in t for _, t in missing)
    foreign = found(media_tar_bytes({**media, "notes.txt": b"hi"}))
    assert (MEDIA_TAR, "does not read as a tar") in [(m, t[:22]) for m, t in foreign], foreign
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as archive:
        for part in sorted(media):
            info = tarfile.TarInfo(part)
            info.size = len(media[part])
            archive.addfile(info, io.BytesIO(media[part]))
    assert found(buffer.getvalue()) == [
        (MEDIA_TAR, "not the canonical media.tar lvita writes (damaged header or padding?)")
    ]
    garbage = bytearray(members[MEDIA_TAR])
    garbage[100:108] = b"9999999\0"  # the mode field: the header checksum no longer matches
    assert any(m == MEDIA_TAR and "does not read" in t for m, t in found(bytes(garbage)))
    problems, _ = check_sample(
        name, key, {k: v for k, v in members.items() if k != MEDIA_TAR}, settings
    )
    assert (None, f"member {MEDIA_TAR} missing") in [(p.member, p.message) for p in problems]


def _all_samples(out: Path):
    for entry in index_of(out)["shards"]:
        for _, parts in samples_of(out / entry["name"]):
            yield read_parts(out / entry["name"], parts)


# --------------------------------------------------------------------------------------------
# files, keys, accounting


def _rewrite_shard(out: Path, name: str, samples: list[dict]) -> None:
    """Rewrite a shard (flat samples, `packed`) and its index entry (so only the intended
    problem remains)."""
    info = write_shard(str(out / name), [packed(sample) for sample in samples])
    index = index_of(out)
    for entry in index["shards"]:
        if entry["name"] == name:
            entry.update(bytes=info.bytes, sha256=sha256_file(str(out / name)))
    (out / "index.json").write_text(json.dumps(index), encoding="utf-8")


def _samples_as_dicts(path: Path) -> list[dict]:
    return [{"__key__": key, **read_parts(path, parts)} for key, parts in samples_of(path)]


def test_duplicate_and_non_contiguous_keys(built, tmp_path):
    out = copy_build(built, tmp_path / "b")
    shards = [entry["name"] for entry in index_of(out)["shards"]]
    first = _samples_as_dicts(out / shards[0])
    second = _samples_as_dicts(out / shards[1])
    _rewrite_shard(out, shards[1], [*second, first[0]])
    report = verify_build(out, decode_tiles=False)
    duplicate = [p for p in report.problems if "also used in" in p.message]
    assert [(p.shard, p.key) for p in duplicate] == [(shards[1], first[0]["__key__"])]

    out = copy_build(built, tmp_path / "c")
    sample = second[0]
    first_part = min(k for k in sample if k != "__key__")  # arrays.npz
    head = {k: v for k, v in sample.items() if k in ("__key__", first_part)}
    tail = {k: v for k, v in sample.items() if k != first_part}
    _rewrite_shard(out, shards[1], [head, *second[1:2], tail, *second[2:]])
    report = verify_build(out, decode_tiles=False)
    assert any(
        p.key == sample["__key__"] and "not contiguous" in p.message for p in report.problems
    ), report.format()


def test_missing_extra_and_temporary_files(built, tmp_path):
    out = copy_build(built, tmp_path / "b")
    shards = [entry["name"] for entry in index_of(out)["shards"]]
    (out / shards[-1]).unlink()
    shutil.copy(out / shards[0], out / "verifytest-999999.tar")
    (out / "stats.json.tmp-123-abcd").write_text("{}", encoding="utf-8")
    report = verify_build(out, decode_tiles=False)
    text = report.format()
    assert any(p.shard == shards[-1] and "missing" in p.message for p in report.problems), text
    assert any(p.shard == "verifytest-999999.tar" for p in report.problems), text
    assert any("leftover temporary" in p.message for p in report.problems), text


def test_accounting_breaks(built, tmp_path):
    out = copy_build(built, tmp_path / "b")
    lines = (out / "rejects.jsonl").read_text(encoding="utf-8").splitlines(keepends=True)
    dropped = json.loads(lines[0])["dataset"]
    (out / "rejects.jsonl").write_text("".join(lines[1:]), encoding="utf-8")
    stats = json.loads((out / "stats.json").read_text(encoding="utf-8"))
    stats["packs"] += 1
    (out / "stats.json").write_text(json.dumps(stats), encoding="utf-8")
    report = verify_build(out, decode_tiles=False)
    messages = [p.message for p in report.problems if p.kind == "accounting"]
    assert any(m.startswith(f"dataset {dropped}:") for m in messages), messages
    assert any("stats.json says" in m for m in messages), messages
    assert any("rejects.jsonl has" in m for m in messages), messages


def test_not_a_build(tmp_path):
    report = verify_build(tmp_path)
    assert not report.ok and "index.json is missing" in report.format()
    assert run(["verify", str(tmp_path / "nowhere")]) == EXIT_VERIFY_PROBLEMS


def test_without_manifest_copy_checksums_and_tar_are_still_checked(built, tmp_path):
    out = copy_build(built, tmp_path / "b")
    (out / "manifest.yaml").unlink()
    report = verify_build(out, decode_tiles=False)
    assert [p.kind for p in report.problems] == ["build"]
    name, path, key, parts, _ = _target(out)
    flip(path, parts["meta.json"][0] - 512 + 150)  # the checksum field of a header
    report = verify_build(out, decode_tiles=False)
    assert any(p.kind == "tar" and p.shard == name and p.key == key for p in report.problems)


# --------------------------------------------------------------------------------------------
# the source image members


def _image_target(out: Path) -> tuple[str, Path, str, dict[str, tuple[int, int]]]:
    """A shard and in it a sample (not the first) with a JPEG and a PNG image member."""
    name = index_of(out)["shards"][1]["name"]
    path = out / name
    for key, parts in samples_of(path)[1:]:
        if "image000000.jpg" in parts and any(p.startswith("image") for p in parts if ".png" in p):
            return name, path, key, parts
    raise AssertionError("no sample with a JPEG and a PNG image member in the second shard")


def _sof_height(data: bytes) -> int:
    """Offset of the low byte of a JPEG's height in its start-of-frame segment."""
    for marker in (b"\xff\xc0", b"\xff\xc1", b"\xff\xc2"):
        at = data.find(marker)
        if at >= 0:
            return at + 6
    raise AssertionError("no SOF marker")


@pytest.mark.parametrize("where", ["jpeg size field", "jpeg scan data", "png data"])
def test_flipped_image_byte_names_shard_key_and_member(built, tmp_path, where):
    out = copy_build(built, tmp_path / "b")
    name, path, key, parts = _image_target(out)
    png = next(p for p in sorted(parts) if p.startswith("image") and p.endswith(".png"))
    member = png if where == "png data" else "image000000.jpg"
    start, size = parts[member]
    if where == "jpeg size field":
        offset = start + _sof_height(read_parts(path, parts)[member])
    else:
        offset = start + size // 2
    flip(path, offset, 0x01 if where == "jpeg size field" else 0x5A)
    shallow = verify_build(out, decode_tiles=False)
    deep = verify_build(out)
    for report in (shallow, deep):
        assert any(p.kind == "checksum" and p.shard == name for p in report.problems)
        digest = [(p.shard, p.key) for p in report.problems if p.kind == "digest"]
        assert digest == [(name, key)], report.format()
    image = [(p.shard, p.key, p.member) for p in deep.problems if p.kind == "sample"]
    if where == "jpeg scan data":  # header and container intact: the digest tells (a JPEG
        assert not [p for p in shallow.problems if p.kind == "sample"], shallow.format()
        assert set(image) <= {(name, key, member)}, deep.format()  # decoder may take it)
        return
    assert set(image) == {(name, key, member)}, deep.format()  # once per reference at most
    if where == "jpeg size field":  # the header is read without decoding a pixel
        assert all("meta.json plans" in p.message for p in deep.problems if p.kind == "sample")
        assert {p.member for p in shallow.problems if p.kind == "sample"} == {member}
    else:  # PNG data inside its container: found by decoding it, as the loader would
        assert any("does not decode" in p.message for p in deep.problems), deep.format()
        assert not [p for p in shallow.problems if p.kind == "sample"], shallow.format()


def _pack_members(out: Path, shard: str, key: str) -> dict[str, bytes]:
    path = out / shard
    return read_parts(path, dict(samples_of(path))[key])


def _with_meta(members: dict[str, bytes], change) -> dict[str, bytes]:
    meta = json.loads(members["meta.json"])
    change(meta)
    return {**members, "meta.json": meta_bytes(meta)}


def test_image_member_invariants(built, built_tiles):
    out, _ = built
    settings = load_settings(out, index_of(out))
    assert settings.shard_format == FORMAT_MEDIA and settings.image_storage == "source"
    name, _, key, _ = _image_target(out)
    members = _pack_members(out, name, key)
    assert check_sample(name, key, packed(members), settings)[0] == []
    images = sorted(p for p in members if p.startswith("image"))
    jpeg, png = images[0], next(p for p in images if p.endswith(".png"))

    def found(changed: dict[str, bytes], decode: bool = False) -> list[tuple[str | None, str]]:
        problems, _ = check_sample(
            name, key, packed(changed), replace(settings, decode_tiles=decode)
        )
        assert problems, "not caught"
        assert all(p.shard == name and p.key == key for p in problems)
        return [(p.member, p.message) for p in problems]

    def member_of(image_entry: int):
        def change(meta):
            meta["samples"][0]["images"][image_entry]["member"] = "image000005.jpg"

        return change

    missing = found({k: v for k, v in members.items() if k != png})
    assert (png, f"image member is missing ({_first_reference(members, png)} refers to it)") in (
        missing
    )
    extra = found({**members, "image000009.jpg": members[jpeg]})
    assert extra == [("image000009.jpg", "image member no image entry of meta.json refers to")]
    renamed = {k: v for k, v in members.items() if k != png}
    renamed["image000042.png"] = members[png]
    messages = found(renamed)
    assert any(m == png and "missing" in text for m, text in messages), messages
    assert any(m == "image000042.png" and "refers to" in text for m, text in messages), messages
    dangling = found(_with_meta(members, member_of(0)))
    assert any(m == "image000005.jpg" and "missing" in text for m, text in dangling), dangling
    assert any(m == "meta.json" and "numbered by first" in text for m, text in dangling), dangling

    def no_member(meta):
        del meta["samples"][0]["images"][0]["member"]

    assert any("member, size or grid" in text for _, text in found(_with_meta(members, no_member)))

    def as_png(meta):
        for sample in meta["samples"]:
            for image in sample["images"]:
                if image["member"] == jpeg:
                    image["member"] = jpeg.replace(".jpg", ".png")

    relabelled = _with_meta({k: v for k, v in members.items() if k != jpeg}, as_png)
    relabelled[jpeg.replace(".jpg", ".png")] = members[jpeg]
    assert any("JPEG data in a .png member" in text for _, text in found(relabelled))

    truncated = found({**members, jpeg: members[jpeg][: len(members[jpeg]) // 2]}, decode=True)
    assert (jpeg, "JPEG data is incomplete (truncated?)") in truncated

    def wider(meta):
        for sample in meta["samples"]:
            for image in sample["images"]:
                if image["member"] == png:
                    image["size"][0] += 1

    wide = found(_with_meta(members, wider))
    assert any(m == png and "meta.json plans" in text for m, text in wide), wide

    def more_tiles(meta):
        meta["num_tiles"] += 1

    assert any("stand for" in text for _, text in found(_with_meta(members, more_tiles)))

    def format_1(meta):
        meta["format"] = FORMAT_TILES

    assert any("format 1 stage" in text for _, text in found(_with_meta(members, format_1)))

    # with image_storage: tiles, no image is a member (every tile is stored)
    tiles_out, _ = built_tiles
    tiles_settings = load_settings(tiles_out, index_of(tiles_out))
    assert tiles_settings.image_storage == "tiles"
    tiles_members = _pack_members(tiles_out, name, key)
    assert check_sample(name, key, packed(tiles_members), tiles_settings)[0] == []
    problems, _ = check_sample(
        name, key, packed({**tiles_members, jpeg: members[jpeg]}), tiles_settings
    )
    unreferenced = "image member no image entry of meta.json refers to"
    assert [(p.member, p.message) for p in problems] == [(jpeg, unreferenced)]

    def named(meta):
        meta["samples"][0]["images"][0]["member"] = jpeg

    problems, _ = check_sample(name, key, packed(_with_meta(tiles_members, named)), tiles_settings)
    assert any("names a member, the build stores images as tiles" in p.message for p in problems)


def _first_reference(members: dict[str, bytes], member: str) -> str:
    for number, sample in enumerate(json.loads(members["meta.json"])["samples"]):
        for index, image in enumerate(sample["images"]):
            if image["member"] == member:
                return f"packed sample {number} image {index}"
    raise AssertionError(member)


def test_stored_tiles_are_the_video_frames(built):
    out, _ = built
    settings = load_settings(out, index_of(out))
    name, _, key, _, _ = _target(out)  # a pack with a video
    members = _pack_members(out, name, key)
    meta = json.loads(members["meta.json"])
    frames = sum(len(v["frames"]) for s in meta["samples"] for v in s["videos"])
    assert meta["stored_tiles"] == frames == sum(p.startswith("tile") for p in members) > 0
    assert meta["num_tiles"] > frames or any(s["images"] for s in meta["samples"])
    assert check_sample(name, key, packed(members), settings)[0] == []

    def fewer(meta):
        meta["stored_tiles"] -= 1

    problems, _ = check_sample(name, key, packed(_with_meta(members, fewer)), settings)
    messages = [p.message for p in problems]
    assert f"{frames} tile member(s), meta.json stored_tiles {frames - 1}" in messages, messages
    assert any("its videos' frames and the tiles" in m for m in messages), messages
    last = max(p for p in members if p.startswith("tile"))
    dropped = packed({k: v for k, v in members.items() if k != last})
    problems, _ = check_sample(name, key, dropped, settings)
    assert any("tile member(s), meta.json stored_tiles" in p.message for p in problems)


@pytest.mark.parametrize("change", ["missing", "extra", "renamed"])
def test_image_member_changes_in_a_shard(built, tmp_path, change):
    out = copy_build(built, tmp_path / "b")
    name, path, key, parts = _image_target(out)
    samples = _samples_as_dicts(path)
    sample = next(s for s in samples if s["__key__"] == key)
    png = next(p for p in sorted(sample) if p.startswith("image") and p.endswith(".png"))
    if change == "missing":
        del sample[png]
        wanted = png
    elif change == "extra":
        sample["image000099.png"] = sample[png]
        wanted = "image000099.png"
    else:
        sample["image000077.png"] = sample.pop(png)
        wanted = "image000077.png"
    _rewrite_shard(out, name, samples)
    report = verify_build(out, decode_tiles=False)
    located = [(p.kind, p.shard, p.key, p.member) for p in report.problems]
    assert ("sample", name, key, wanted) in located, report.format()
    assert ("digest", name, key, None) in located, report.format()
    assert {p.key for p in report.problems if p.kind != "energon"} == {key}, report.format()


def test_index_and_meta_formats(built, tmp_path):
    out = copy_build(built, tmp_path / "b")
    index = index_of(out)
    index["format"] = 4
    (out / "index.json").write_text(json.dumps(index), encoding="utf-8")
    report = verify_build(out, decode_tiles=False)
    assert len(report.problems) == 1, report.format()
    assert report.problems[0].message.endswith("index.json: shard format 4, lvita reads (1, 2, 3)")
    index["format"] = FORMAT_TILES  # a format-3 build that calls itself format 1
    (out / "index.json").write_text(json.dumps(index), encoding="utf-8")
    report = verify_build(out, decode_tiles=False)
    assert report.problems and all(p.key for p in report.problems), report.format()
    assert any("format 3 stage" in p.message for p in report.problems)
    assert any(p.message == "unknown member" for p in report.problems)
