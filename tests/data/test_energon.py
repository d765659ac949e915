"""Energon compatibility (lvita_data.shards.energon, lvita_data.energon): the `.nv-meta/` and
`*.tar.idx` lvita writes let the real `megatron-energon` open a build directory without `energon
prepare` (`energon info`, `energon lint`, `get_train_dataset` yielding lvita's batches equal to
`ShardLoader`'s), agree with what `energon prepare` writes, and are byte-reproducible; the crude
route (`CRUDE_DATASET_YAML`) hands out every member's bytes. Skipped without megatron-energon."""

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
from pack_media import flat

from lvita_data.build.run import build_stage
from lvita_data.loader import ShardLoader
from lvita_data.shards.energon import (
    CRUDE_DATASET_YAML,
    DATASET_YAML,
    check_energon_metadata,
    index_uuid,
    read_layout,
    write_energon_metadata,
)
from lvita_data.shards.format import ARRAY_MEMBERS, ARRAYS_NPZ, FORMAT_MEDIA, MEDIA_TAR, ShardInfo
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
    train = [s.name for s in shards]
    assert split == {"split_parts": {"train": train, "val": [], "test": []}, "exclude": []}
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
def energon_parts(built, tmp_path_factory) -> dict[str, dict[str, bytes]]:
    """key -> {part: bytes} of every sample, as the real Energon loader hands them out through
    the crude route (`CRUDE_DATASET_YAML` saved as ``crude.yaml`` in a copy of the build; a
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

    crude = tmp_path_factory.mktemp("crude") / "build"
    shutil.copytree(built, crude)
    (crude / ".nv-meta" / "crude.yaml").write_text(CRUDE_DATASET_YAML, encoding="utf-8")
    worker_config = WorkerConfig(rank=0, world_size=1, num_workers=0)
    dataset = get_val_dataset(
        crude,
        split_part="train",
        worker_config=worker_config,
        batch_size=None,
        task_encoder=RawEncoder(),
        dataset_config="crude.yaml",
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
    """Format 3: the parts are ``arrays.npz`` (what ``np.load`` reads: the four int32 arrays),
    ``media.tar`` and ``meta.json``; every ``image*`` member of the ``media.tar`` Energon yields
    is the exact bytes of the source file its meta.json entry stands for; the video frames are
    the stored tiles."""
    index = json.loads((built / "index.json").read_text(encoding="utf-8"))
    assert index["format"] == FORMAT_MEDIA
    extensions = set()
    for key, outer in energon_parts.items():
        assert set(outer) == {ARRAYS_NPZ, MEDIA_TAR, "meta.json"}, key
        parts = flat(outer)
        meta = json.loads(parts["meta.json"])
        assert meta["format"] == FORMAT_MEDIA
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


def energon_cli(*args: str) -> subprocess.CompletedProcess:
    cli = "from megatron.energon.cli.main import main; main()"
    command = [sys.executable, "-c", cli, *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=240)


def test_energon_info_names_lvitas_sample_type(built):
    count = sum(shard.samples for shard in shards_of(built))
    result = energon_cli("info", str(built))
    assert result.returncode == 0, result.stderr[-2000:]
    assert f"({count:,} samples" in result.stdout
    assert "PackedSample <lvita_data.energon.PackedSample>" in result.stdout
    assert f"`train`: 100%, {count:,} samples in {len(shards_of(built))} shards" in result.stdout


def test_energon_lint_reads_every_pack(built):
    count = sum(shard.samples for shard in shards_of(built))
    result = energon_cli("lint", str(built))
    assert result.returncode == 0, result.stderr[-2000:]
    assert f"{count}/{count} [" in result.stderr  # tqdm: every pack of the train part
    assert "Skipping empty split part val" in result.stdout


def test_energon_lint_reports_a_damaged_pack(built, tmp_path):
    """Lint loads each pack through `PackLoader` (the training loader's checks): a pack whose
    meta.json no longer parses is reported with its shard and key, and skipped. (Energon 7.4's
    lint still exits 0 then: it ignores its own handler for the worker config's, which logs.)"""
    damaged = tmp_path / "damaged"
    shutil.copytree(built, damaged)
    shard = shards_of(built)[0].name
    sample = read_layout(damaged / shard).samples[1]
    offset = next(off for part, off, _ in sample.parts if part == "meta.json")
    with open(damaged / shard, "r+b") as handle:
        handle.seek(offset)
        assert handle.read(1) == b"{"
        handle.seek(offset)
        handle.write(b"[")
    count = sum(shard.samples for shard in shards_of(built))
    result = energon_cli("lint", str(damaged))
    assert f"{damaged / shard} sample {sample.key}: meta.json: not JSON" in result.stderr
    assert f"{count - 1}/{count} [" in result.stderr  # tqdm: one pack fewer than the split
    assert f"{count}/{count} [" not in result.stderr


def test_train_dataset_yields_shardloaders_batches(built):
    """The README's snippet (run as written, on this build): Energon's `get_train_dataset`
    with its default task encoder yields lvita's `PackedBatch`es, bit for bit the batches
    `ShardLoader` gives for the same keys; an epoch covers every pack."""
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text(encoding="utf-8")
    start = readme.index("```python\nfrom megatron.energon import WorkerConfig, get_loader")
    snippet = readme[start + len("```python\n") : readme.index("```", start + 9)]
    from megatron.energon import get_loader

    namespace: dict = {}
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "'pin_memory' argument is set as true")
        exec(snippet.replace('"shards/stage3"', repr(str(built))), namespace)  # noqa: S102
        batches = [namespace["batch"]]
        assert set(namespace["inputs"]) >= {"input_ids", "labels", "cu_seqlens", "pixel_values"}
        count = sum(shard.samples for shard in shards_of(built))
        more = zip(range(count), get_loader(namespace["dataset"]), strict=False)
        batches += [batch for _, batch in more]
    reference = {b.keys[0]: b for b in ShardLoader(built, shuffle=False)}
    assert {key for batch in batches for key in batch.keys} == set(reference)
    names = ("input_ids", "labels", "position_ids", "cu_seqlens", "pixel_values")
    for batch in batches:
        assert type(batch).__name__ == "PackedBatch" and len(batch.keys) == 1
        expected = reference[batch.keys[0]]
        for name in (*names, "image_token_positions", "tiles_per_pack"):
            ours, theirs = getattr(batch, name), getattr(expected, name)
            assert ours.dtype == theirs.dtype and np.array_equal(ours, theirs), (batch.keys, name)
        assert batch.meta == expected.meta
    assert sum(batch.num_tiles for batch in batches) > 0  # pixels were compared


def test_packed_task_encoder_batches_uint8_tiles(built):
    from megatron.energon import WorkerConfig, get_loader, get_val_dataset

    from lvita_data.energon import PackedTaskEncoder

    dataset = get_val_dataset(
        built,
        split_part="train",
        batch_size=2,
        worker_config=WorkerConfig(rank=0, world_size=1, num_workers=0),
        task_encoder=PackedTaskEncoder(normalize=False),
    )
    loader = ShardLoader(built, shuffle=False, normalize=False)
    seen = []
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "'pin_memory' argument is set as true")
        for batch in get_loader(dataset):
            expected = loader.assemble([loader.read_pack(int(key)) for key in batch.keys])
            assert batch.pixel_values.dtype == np.uint8
            for name in ("input_ids", "cu_seqlens", "pixel_values", "image_token_positions"):
                assert np.array_equal(getattr(batch, name), getattr(expected, name)), name
            seen += batch.keys
    assert sorted(seen) == [f"{i:09d}" for i in range(loader.num_packs)]


def test_lvita_imports_energon_only_in_lvita_data_energon():
    code = (
        "import sys, lvita_data, lvita_data.loader, lvita_data.shards.energon, "
        "lvita_data.verify; print([m for m in sys.modules if m.startswith('megatron')])"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


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
