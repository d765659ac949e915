"""`lvita verify` (lvita_data.verify): an intact build passes; a flipped byte anywhere in a shard
is reported with the shard and the sample key; invariant and accounting breaks are reported.

One small mixed build over the session demo corpus (captions, multi-image, parquet with embedded
images, text only, videos, bad records incl. a JPEG truncated after a valid header), `pack.align`
8 and 4 packs per shard. Per-sample digests are recorded the way the build is meant to record
them (`sample_digest` of each sample dict handed to `write_shard`, into the completion records),
by wrapping `write_shard`.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

import lvita_data.build.shard as build_module
from lvita_data.build.run import STATE_DIR, build_stage
from lvita_data.fileio import sha256_file
from lvita_data.shards.format import load_npy, npy_bytes, sample_digest
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


@pytest.fixture(scope="module")
def built(demo_corpus, tmp_path_factory) -> tuple[Path, dict[str, dict[str, str]]]:
    """(build directory as `lvita build` writes it today, digests per shard and key)."""
    root = demo_corpus[0]
    base = tmp_path_factory.mktemp("verify")
    manifest = base / "verify.yaml"
    manifest.write_text(MANIFEST.format(root=root), encoding="utf-8")
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
    """(key, {part: (data offset, size)}) per sample of a shard, in tar order."""
    scan = scan_tar(path.read_bytes())
    assert not scan.problems
    out: list[tuple[str, dict[str, tuple[int, int]]]] = []
    for member in scan.members:
        key, part = split_member_name(member.name)
        if not out or out[-1][0] != key:
            out.append((key, {}))
        out[-1][1][part] = (member.data_offset, member.size)
    return out


def read_parts(path: Path, parts: dict[str, tuple[int, int]]) -> dict[str, bytes]:
    data = path.read_bytes()
    return {part: data[offset : offset + size] for part, (offset, size) in parts.items()}


def flip(path: Path, offset: int, mask: int = 0x5A) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= mask
    path.write_bytes(bytes(data))


def problems_at(report, shard: str) -> list:
    return [p for p in report.problems if p.shard == shard]


# --------------------------------------------------------------------------------------------
# intact build


def test_intact_build_passes_everything(built, capsys):
    out, digests = built
    index = index_of(out)
    assert len(index["shards"]) >= 3, "the manifest should give several shards"
    report = verify_build(out, workers=2)
    assert report.ok, report.format()
    assert report.samples == sum(s["samples"] for s in index["shards"])
    assert report.tokens == sum(s["tokens"] for s in index["shards"])
    assert report.tiles > 0 and report.tiles_decoded
    assert report.digests_checked == report.samples  # the build records per-sample digests
    assert run(["verify", str(out)]) == EXIT_OK
    assert "OK" in capsys.readouterr().out
    assert run(["verify", str(out), "--json"]) == EXIT_OK
    payload = json.loads(capsys.readouterr().out)
    assert payload["ok"] and payload["problems"] == []
    rejects = (out / "rejects.jsonl").read_text(encoding="utf-8")
    assert "corrupt_image" in rejects  # a build-time reject is part of the accounting


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


def _npy_data_start(path: Path, parts, member: str) -> int:
    offset, size = parts[member]
    raw = path.read_bytes()[offset : offset + size]
    return offset + raw.index(b"\n") + 1


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
    ],
)
def test_flipped_byte_names_shard_and_key(built, tmp_path, where):
    out = copy_build(built, tmp_path / "b")
    name, path, key, parts, _ = _target(out)
    data = path.read_bytes()
    if where == "input_ids in a vision block":
        ids = load_npy(read_parts(path, parts)["input_ids.npy"])
        position = int(np.flatnonzero(ids == ids.max())[0])  # a vision placeholder id
        offset = _npy_data_start(path, parts, "input_ids.npy") + 4 * position
    elif where == "labels":
        offset = _npy_data_start(path, parts, "labels.npy") + 4 * 4000 + 1
    elif where == "npy header":
        offset = parts["position_ids.npy"][0] + 20
    elif where == "png tile":
        start, size = parts["tile000000.png"]
        offset = start + size // 2
    elif where == "meta.json":
        offset = parts["meta.json"][0] + 5
    elif where == "tar header name":
        offset = parts["labels.npy"][0] - 512 + 2  # a digit of the key in the name field
    elif where == "tar header of the first member":
        offset = parts["cu_seqlens.npy"][0] - 512 + 4
    elif where == "tar header size field":
        offset = parts["meta.json"][0] - 512 + 130
    elif where == "pax header":
        offset = parts["input_ids.npy"][0] - 3 * 512 + 1
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
    assert run(["verify", str(out), "--no-decode"]) == EXIT_VERIFY_PROBLEMS


def test_flip_in_end_of_archive_names_the_last_key(built, tmp_path):
    out = copy_build(built, tmp_path / "b")
    name, path, _, _, keys = _target(out)
    size = path.stat().st_size
    for offset in (size - 700, scan_tar(path.read_bytes()).end + 3):
        flip(path, offset)
        report = verify_build(out, decode_tiles=False)
        tar = [p for p in problems_at(report, name) if p.kind == "tar"]
        assert tar and tar[0].key == keys[-1], report.format()
        flip(path, offset)  # undo
    assert verify_build(out, decode_tiles=False).ok


def _user_text_byte(out: Path, path: Path) -> tuple[str, int]:
    """(key, byte offset) of the low byte of a text id in a user turn (not a special id)."""
    user = load_settings(out, index_of(out)).role_prefix["user"]
    for key, parts in samples_of(path):
        ids = load_npy(read_parts(path, parts)["input_ids.npy"])
        windows = np.lib.stride_tricks.sliding_window_view(ids, user.shape[0])
        for start in np.flatnonzero((windows == user).all(axis=1)).tolist():
            position = start + user.shape[0]
            if ids[position] < 150_000:
                return key, _npy_data_start(path, parts, "input_ids.npy") + 4 * position
    raise AssertionError("no user text token found")


def test_flip_that_passes_every_invariant_needs_the_digest(built, tmp_path):
    """A text id of a user turn turned into another id passes every content check: only the
    per-sample digests the build records locate it to the shard and the sample key."""
    copy = copy_build(built, tmp_path / "copy")
    name, path, _, _, _ = _target(copy)
    key, offset = _user_text_byte(copy, path)
    flip(path, offset, 0x01)
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
            if load_npy(members["cu_seqlens.npy"]).shape[0] > 2:
                return entry["name"], key, members
    raise AssertionError("no pack with two samples")


def test_sample_invariants(built):
    out, _ = built
    settings = load_settings(out, index_of(out))
    shard, key, members = _multi_sample_pack(out)
    assert check_sample(shard, key, members, settings)[0] == []
    ids = load_npy(members["input_ids.npy"])
    labels = load_npy(members["labels.npy"])
    cu = load_npy(members["cu_seqlens.npy"])
    meta = json.loads(members["meta.json"])

    def problems(**changes) -> str:
        found, _ = check_sample(shard, key, {**members, **changes}, settings)
        assert found, f"{list(changes)} not caught"
        assert all(p.shard == shard and p.key == key for p in found)
        return " | ".join(p.message for p in found)

    user = settings.role_prefix["user"]
    windows = np.lib.stride_tricks.sliding_window_view(ids, user.shape[0])
    user_text = int(np.flatnonzero((windows == user).all(axis=1))[0]) + user.shape[0]
    supervised_user = labels.copy()
    supervised_user[user_text] = ids[user_text]
    assert "differ from the template" in problems(**{"labels.npy": npy_bytes(supervised_user)})

    im_end = np.flatnonzero(labels == settings.special.im_end)
    unsupervised_end = labels.copy()
    unsupervised_end[im_end[0]] = -100
    assert "differ from the template" in problems(**{"labels.npy": npy_bytes(unsupervised_end)})

    flat = np.arange(ids.shape[0], dtype=np.int32)
    assert "reset_attention" in problems(**{"position_ids.npy": npy_bytes(flat)})

    short_end = cu.copy()
    short_end[-1] -= 8
    assert "end at" in problems(**{"cu_seqlens.npy": npy_bytes(short_end)})

    misaligned = cu.copy()
    misaligned[1] += 1
    assert problems(**{"cu_seqlens.npy": npy_bytes(misaligned)})

    wide = ids.astype(np.int64)
    assert "int32" in problems(**{"input_ids.npy": npy_bytes(wide)})

    meta_shifted = json.loads(json.dumps(meta))
    meta_shifted["samples"][1]["offset"] += 8
    encoded = json.dumps(meta_shifted, ensure_ascii=False, sort_keys=True).encode()
    assert "offset" in problems(**{"meta.json": encoded})

    not_canonical = json.dumps(meta, indent=1).encode()
    assert "canonical" in problems(**{"meta.json": not_canonical})

    with_tiles = next(
        (members for members in _all_samples(out) if "tile000000.png" in members), None
    )
    assert with_tiles is not None
    dropped = dict(with_tiles)
    last = max(p for p in dropped if p.startswith("tile"))
    del dropped[last]
    found, _ = check_sample(shard, key, dropped, settings)
    assert any("tile" in p.message for p in found)
    extra = {**with_tiles, "notes.txt": b"hi"}
    found, _ = check_sample(shard, key, extra, settings)
    assert [p.member for p in found] == ["notes.txt"]


def _all_samples(out: Path):
    for entry in index_of(out)["shards"]:
        for _, parts in samples_of(out / entry["name"]):
            yield read_parts(out / entry["name"], parts)


# --------------------------------------------------------------------------------------------
# files, keys, accounting


def _rewrite_shard(out: Path, name: str, samples: list[dict]) -> None:
    """Rewrite a shard and its index entry (so only the intended problem remains)."""
    info = write_shard(str(out / name), samples)
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
    head = {k: v for k, v in sample.items() if k in ("__key__", "cu_seqlens.npy")}
    tail = {k: v for k, v in sample.items() if k != "cu_seqlens.npy"}
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
