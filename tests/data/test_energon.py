"""Energon compatibility (lvita_data.shards.energon): the `.nv-meta/` and `*.tar.idx` lvita
writes let the real `megatron-energon` open a build directory without `energon prepare`, agree
with what `energon prepare` writes, and are byte-reproducible. Skipped without megatron-energon."""

from __future__ import annotations

import dataclasses
import io
import json
import shutil
import sqlite3
import subprocess
import sys
import tarfile
import uuid
import warnings
from pathlib import Path

import numpy as np
import pytest
import yaml

from lvita_data.build.run import build_stage
from lvita_data.shards.energon import (
    DATASET_YAML,
    check_energon_metadata,
    index_uuid,
    read_layout,
    write_energon_metadata,
)
from lvita_data.shards.format import ARRAY_MEMBERS, ARRAYS_NPZ, FORMAT_SOURCE, ShardInfo
from lvita_data.verify import verify_build

energon = pytest.importorskip("megatron.energon")

MANIFEST = """\
schema_version: 1
stage: entest
seed: 3
tokenizer: qwen2.5
pack:
  max_seq_len: 4096
  reset_attention: true
  group_by: none
shards:
  packs_per_shard: 3
video:
  max_frames: 4
  max_fps: 1.0
datasets:
  - name: captions
    format: longvita_jsonl
    path: {root}/longvita/image_caption.jsonl
    media_root: {root}/longvita
    max_samples: 8
  - name: chat
    format: text_jsonl
    path: {root}/text/short_chat.jsonl
    max_samples: 6
  - name: video
    format: longvita_jsonl
    path: {root}/longvita/video_qa.jsonl
    media_root: {root}/longvita
    max_samples: 2
"""
META_FILES = (".info.json", "split.yaml", "dataset.yaml", "index.sqlite", "index.uuid")


@pytest.fixture(scope="module")
def built(demo_corpus, tmp_path_factory) -> Path:
    base = tmp_path_factory.mktemp("energon")
    manifest = base / "entest.yaml"
    manifest.write_text(MANIFEST.format(root=demo_corpus[0]), encoding="utf-8")
    out = base / "build"
    build_stage(str(manifest), str(out), workers=1, progress=False)
    return out


def shards_of(out: Path) -> list[ShardInfo]:
    index = json.loads((out / "index.json").read_text(encoding="utf-8"))
    return [ShardInfo(**entry) for entry in index["shards"]]


def tar_samples(out: Path) -> dict[str, dict[str, bytes]]:
    """key -> {part: bytes}, read with Python's tarfile (independent of lvita's parser)."""
    samples: dict[str, dict[str, bytes]] = {}
    for shard in shards_of(out):
        with tarfile.open(out / shard.name) as tar:
            for member in tar:
                key, _, part = member.name.partition(".")
                samples.setdefault(key, {})[part] = tar.extractfile(member).read()
    return samples


def metadata_bytes(out: Path) -> dict[str, bytes]:
    files = {f".nv-meta/{name}": (out / ".nv-meta" / name).read_bytes() for name in META_FILES}
    files.update({p.name: p.read_bytes() for p in sorted(out.glob("*.tar.idx"))})
    return files


def sqlite_dump(path: Path) -> tuple[list, list, list]:
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        return (
            db.execute(
                "SELECT type, name, tbl_name, sql FROM sqlite_master ORDER BY name"
            ).fetchall(),
            db.execute("SELECT * FROM samples ORDER BY tar_file_id, sample_index").fetchall(),
            db.execute(
                "SELECT * FROM sample_parts ORDER BY tar_file_id, sample_index, content_byte_offset"
            ).fetchall(),
        )
    finally:
        db.close()


def test_metadata_files(built):
    shards = shards_of(built)
    assert len(shards) >= 2
    meta = built / ".nv-meta"
    assert (meta / "dataset.yaml").read_text(encoding="utf-8") == DATASET_YAML
    info = json.loads((meta / ".info.json").read_text(encoding="utf-8"))
    assert info == {"shard_counts": {s.name: s.samples for s in shards}}
    split = yaml.safe_load((meta / "split.yaml").read_text(encoding="utf-8"))
    assert split == {"split_parts": {"train": [s.name for s in shards]}, "exclude": []}
    layouts = [read_layout(built / s.name) for s in shards]
    assert (meta / "index.uuid").read_text(encoding="utf-8") == index_uuid(layouts)
    assert uuid.UUID(index_uuid(layouts)).version == 5
    assert check_energon_metadata(built, layouts) == []
    report = verify_build(built, decode_tiles=False)
    assert report.ok, report.format()


def test_metadata_is_reproducible(built, tmp_path):
    before = metadata_bytes(built)
    copy = tmp_path / "copy"
    shutil.copytree(built, copy)
    for path in [*copy.glob("*.tar.idx"), *(copy / ".nv-meta").iterdir()]:
        path.unlink()
    write_energon_metadata(copy, shards_of(copy))
    assert metadata_bytes(copy) == before
    assert not list(copy.rglob("*.tmp-*"))


@pytest.fixture(scope="module")
def energon_parts(built) -> dict[str, dict[str, bytes]]:
    """key -> {part: bytes} of every sample, as the real Energon loader hands them out (a
    CrudeWebdataset cooked into raw member bytes, no decoding)."""
    from megatron.energon import (
        Cooker,
        DefaultTaskEncoder,
        Sample,
        WorkerConfig,
        basic_sample_keys,
        get_loader,
        get_val_dataset,
        stateless,
    )

    @dataclasses.dataclass
    class RawSample(Sample):
        parts: dict

    @stateless
    def cook(crude: dict) -> RawSample:
        parts = {k: v for k, v in crude.items() if not k.startswith("__")}
        return RawSample(**basic_sample_keys(crude), parts=parts)

    class RawEncoder(DefaultTaskEncoder):
        cookers = [Cooker(cook)]
        decoder = None  # raw member bytes, no image/npy decoding

    worker_config = WorkerConfig(rank=0, world_size=1, num_workers=0)
    dataset = get_val_dataset(
        built,
        split_part="train",
        worker_config=worker_config,
        batch_size=None,
        task_encoder=RawEncoder(),
    )
    loaded = {}
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "'pin_memory' argument is set as true")
        for sample in get_loader(dataset):
            assert sample.__key__ not in loaded
            assert sample.__subflavors__ == {"lvita": "packed"}
            loaded[sample.__key__] = sample.parts
    return loaded


def test_energon_loads_every_sample_byte_for_byte(built, energon_parts):
    expected = tar_samples(built)
    assert sorted(energon_parts) == sorted(expected)
    for key, parts in expected.items():
        assert energon_parts[key] == parts, key


def test_energon_hands_out_the_source_image_bytes(built, energon_parts):
    """Format 2 (the default): the parts are ``arrays.npz`` (what ``np.load`` reads: the four
    int32 arrays), ``meta.json``, ``image*`` and ``tile*``; every ``image*`` part Energon yields
    is the exact bytes of the source file its meta.json entry stands for; the video frames are
    the stored tiles."""
    index = json.loads((built / "index.json").read_text(encoding="utf-8"))
    assert index["format"] == FORMAT_SOURCE
    extensions = set()
    for key, parts in energon_parts.items():
        assert {p for p in parts if not p.startswith(("image", "tile"))} == {
            ARRAYS_NPZ,
            "meta.json",
        }, key
        meta = json.loads(parts["meta.json"])
        assert meta["format"] == FORMAT_SOURCE
        with np.load(io.BytesIO(parts[ARRAYS_NPZ]), allow_pickle=False) as arrays:
            assert sorted(arrays.files) == sorted(ARRAY_MEMBERS), key
            assert {arrays[name].dtype for name in ARRAY_MEMBERS} == {np.dtype(np.int32)}
            assert arrays["input_ids"].shape == (4096,), key
            assert arrays["cu_seqlens"].shape == (len(meta["samples"]) + 1,), key
        referenced = set()
        for sample in filter(lambda s: s["images"], meta["samples"]):
            jsonl = Path(sample["file"])  # longvita_jsonl, record = line number from 0
            line = jsonl.read_text(encoding="utf-8").splitlines()[int(sample["record"])]
            for image, path in zip(sample["images"], json.loads(line)["images"], strict=True):
                source = (jsonl.parent / path).read_bytes()
                assert parts[image["member"]] == source, (key, image["member"], path)
                referenced.add(image["member"])
                extensions.add(image["member"].rsplit(".", 1)[1])
        assert referenced == {part for part in parts if part.startswith("image")}, key
        tiles = sorted(part for part in parts if part.startswith("tile"))
        assert tiles == [f"tile{j:06d}.png" for j in range(meta["stored_tiles"])], key
    assert {"jpg", "png"} <= extensions


def test_energon_index_check(built):
    from megatron.energon.epathlib import EPath
    from megatron.energon.flavors.webdataset.indexing import SqliteIndexReader
    from megatron.energon.tools.lint import check_index

    assert check_index(EPath(built))
    reader = SqliteIndexReader(EPath(built / ".nv-meta" / "index.sqlite"))
    try:
        assert reader.db_has_sample_parts()
    finally:
        reader.close()


def test_agrees_with_energon_prepare(built, tmp_path):
    """`energon prepare` on the same tars writes the same index (its uuid is random)."""
    prepared = tmp_path / "prepared"
    prepared.mkdir()
    shards = shards_of(built)
    for shard in shards:
        shutil.copy(built / shard.name, prepared / shard.name)
    cli = "from megatron.energon.cli.main import main; main()"
    command = [
        sys.executable,
        "-c",
        cli,
        "prepare",
        str(prepared),
        "--non-interactive",
        "--split-parts",
        r"train:.*\.tar",
        "--sample-type",
        "CrudeWebdataset",
        "--num-workers",
        "1",
        "--no-progress",
    ]
    subprocess.run(command, check=True, capture_output=True, timeout=240)
    for shard in shards:
        name = f"{shard.name}.idx"
        assert (prepared / name).read_bytes() == (built / name).read_bytes(), name
    assert sqlite_dump(prepared / ".nv-meta" / "index.sqlite") == sqlite_dump(
        built / ".nv-meta" / "index.sqlite"
    )
    theirs = json.loads((prepared / ".nv-meta" / ".info.json").read_text(encoding="utf-8"))
    ours = json.loads((built / ".nv-meta" / ".info.json").read_text(encoding="utf-8"))
    assert theirs["shard_counts"] == ours["shard_counts"]
    layouts = [read_layout(built / s.name) for s in shards]
    assert check_energon_metadata(prepared, layouts) == []  # our checker accepts theirs
