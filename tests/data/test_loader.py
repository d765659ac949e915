"""ShardLoader: build -> load round trip, pixels, placeholders, DP split, order, exact resume."""

from __future__ import annotations

import dataclasses
import io
import json
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
from legacy_shards import write_legacy_build
from pack_media import media_members

from lvita_data.build.run import build_stage
from lvita_data.errors import LoaderError, ShardFormatError
from lvita_data.loader import PackedBatch, ShardLoader, epoch_order
from lvita_data.loader.batch import assemble_batch
from lvita_data.loader.pack import ARRAY_NAMES, parse_pack
from lvita_data.loader.settings import bundled_vision_ids
from lvita_data.media.tiles import decode_tiles, image_tiles, normalize_tiles, tiles_array
from lvita_data.shards.format import media_tar_bytes, read_media_tar
from lvita_data.shards.tar import group_samples, scan_tar_file
from lvita_data.tokenizer.special_tokens import SpecialIds
from lvita_data.tokenizer.tokenizer import load_tokenizer

MANIFEST = """\
schema_version: 1
stage: loadertest
seed: 11
tokenizer: qwen2.5
pack:
  max_seq_len: 2048
  reset_attention: true
  group_by: none
image:
  max_tiles: 4
  min_tiles: 1
video:
  max_frames: 3
  max_fps: 1.0
  fit_to_budget: true
rejects:
  max_rate: 0.5
  min_selected: 1
shards:
  packs_per_shard: 5
  image_storage: {storage}
datasets:
  - name: lv_image_caption
    format: longvita_jsonl
    path: {root}/longvita/image_caption.jsonl
    media_root: {root}/longvita
    ratio: 0.5
  - name: lv_video_qa
    format: longvita_jsonl
    path: {root}/longvita/video_qa.jsonl
    media_root: {root}/longvita
    ratio: 0.3
  - name: short_chat
    format: text_jsonl
    path: {root}/text/short_chat.jsonl
    ratio: 0.5
"""


@pytest.fixture(scope="module")
def builds(demo_corpus, tmp_path_factory) -> dict[str, Path]:
    """The same small image + video + text stage (16 packs of 2048 tokens in shards of 5, 5, 5,
    1) built with each image storage: "source" (format 2) and "tiles" (format 1)."""
    root = demo_corpus[0]
    work = tmp_path_factory.mktemp("loader")
    out = {}
    for storage in ("source", "tiles"):
        manifest = work / f"loadertest-{storage}.yaml"
        manifest.write_text(MANIFEST.format(root=root, storage=storage), encoding="utf-8")
        out[storage] = work / storage
        build_stage(str(manifest), str(out[storage]), workers=1, progress=False)
    return out


@pytest.fixture(scope="module", params=["source", "tiles"])
def build(builds, request) -> Path:
    """Each loader test runs on both shard formats."""
    return builds[request.param]


@pytest.fixture(scope="module")
def tar_packs(build) -> dict[str, dict[str, bytes]]:
    """Every pack's members read independently with `tarfile`: key -> {suffix: bytes}."""
    index = json.loads((build / "index.json").read_text())
    packs: dict[str, dict[str, bytes]] = {}
    for shard in index["shards"]:
        with tarfile.open(build / shard["name"]) as archive:
            for member in archive:
                key, suffix = member.name.split(".", 1)
                packs.setdefault(key, {})[suffix] = archive.extractfile(member).read()
    return packs


def npy(data: bytes) -> np.ndarray:
    return np.load(io.BytesIO(data), allow_pickle=False)


def pack_arrays(members: dict[str, bytes]) -> dict[str, np.ndarray]:
    """The four arrays of a pack read with numpy alone: `.npy` members (format 1) or the members
    of `arrays.npz` (format 2)."""
    if "arrays.npz" in members:
        with np.load(io.BytesIO(members["arrays.npz"]), allow_pickle=False) as npz:
            return {name: npz[name] for name in ARRAY_NAMES}
    return {name: npy(members[f"{name}.npy"]) for name in ARRAY_NAMES}


def all_batches(loader: ShardLoader) -> list[PackedBatch]:
    return list(loader)


def keys_of(batches: list[PackedBatch]) -> list[str]:
    return [key for batch in batches for key in batch.keys]


def assert_batches_equal(a: list[PackedBatch], b: list[PackedBatch]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        assert x.keys == y.keys
        for name in (
            "input_ids",
            "labels",
            "position_ids",
            "cu_seqlens",
            "image_token_positions",
            "tiles_per_pack",
        ):
            np.testing.assert_array_equal(getattr(x, name), getattr(y, name))
        assert (x.pixel_values is None) == (y.pixel_values is None)
        if x.pixel_values is not None:
            assert np.array_equal(x.pixel_values, y.pixel_values)


# --------------------------------------------------------------------------------------------
# reading


def test_constants_match_the_shard_writer(build):
    from lvita_data.shards import format as shards

    assert shards.SHARD_FORMATS == (1, 2, 3)
    index = json.loads((build / "index.json").read_text())
    assert index["format"] == shards.WRITTEN_FORMAT == 3  # with either image storage
    assert tuple(shards.ARRAY_MEMBERS) == ARRAY_NAMES


def test_bundled_vision_ids_are_the_tokenizers():
    assert bundled_vision_ids() == load_tokenizer("qwen2.5").special_ids.vision_context_ids


def test_scan_matches_tarfile(build):
    for path in sorted(build.glob("*.tar")):
        samples = group_samples(scan_tar_file(path))
        with tarfile.open(path) as archive:
            members = [m for m in archive if m.isreg()]
        assert sum(len(s.members) for s in samples) == len(members)
        found = {
            f"{s.key}.{suffix}": (s.start + offset, size)
            for s in samples
            for suffix, (offset, size) in s.members.items()
        }
        assert found == {m.name: (m.offset_data, m.size) for m in members}
        for before, after in zip(samples, samples[1:], strict=False):
            assert before.end == after.start  # samples tile the archive


@pytest.mark.parametrize("fmt", [tarfile.GNU_FORMAT, tarfile.PAX_FORMAT])
def test_scan_reads_long_names(tmp_path, fmt):
    path = tmp_path / "t.tar"
    names = ["k1.a.npy", "k1.b.json", "k2.a.npy", "f" * 120 + ".Long.PNG"]  # GNU L / pax path
    with tarfile.open(path, "w", format=fmt) as archive:
        for i, name in enumerate(names):
            info = tarfile.TarInfo(name)
            info.size = 700 * i + 1
            archive.addfile(info, io.BytesIO(bytes([i]) * info.size))
    samples = group_samples(scan_tar_file(path))
    with tarfile.open(path) as archive:
        offsets = {m.name: (m.offset_data, m.size) for m in archive if m.isreg()}
    assert [s.key for s in samples] == ["k1", "k2", "f" * 120]
    assert sorted(samples[0].members) == ["a.npy", "b.json"]
    assert list(samples[-1].members) == ["long.png"]
    for sample in samples:
        for suffix, (offset, size) in sample.members.items():
            original = next(n for n in names if n.lower() == f"{sample.key}.{suffix}".lower())
            assert offsets[original] == (sample.start + offset, size)


@pytest.mark.parametrize("fmt", [tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT])
@pytest.mark.parametrize(
    ("name", "kind"),
    [
        ("somedir", tarfile.DIRTYPE),
        ("k1.link", tarfile.SYMTYPE),
        ("k1.hard", tarfile.LNKTYPE),
        ("d" * 60 + "/" + "e" * 60 + "/k1.a.npy", tarfile.REGTYPE),  # ustar prefix, long name
        ("../k1.a.npy", tarfile.REGTYPE),
        ("/abs/k1.a.npy", tarfile.REGTYPE),
    ],
)
def test_scan_refuses_links_directories_and_paths(tmp_path, fmt, name, kind):
    """The strict reader takes plain regular members only: anything else names the offset."""
    path = tmp_path / "t.tar"
    with tarfile.open(path, "w", format=fmt) as archive:
        archive.addfile(tarfile.TarInfo("k0.a.npy"), io.BytesIO(b""))
        info = tarfile.TarInfo(name)
        info.type, info.linkname = kind, "k0.a.npy" if kind != tarfile.REGTYPE else ""
        archive.addfile(info, io.BytesIO(b""))
    with pytest.raises(ShardFormatError, match=r"t\.tar: .* \(at byte \d+\)"):
        scan_tar_file(path)


def test_samples_match_webdataset(build):
    webdataset = pytest.importorskip("webdataset")
    index = json.loads((build / "index.json").read_text())
    urls = [str(build / s["name"]) for s in index["shards"]]
    expected = list(webdataset.WebDataset(urls, shardshuffle=False, empty_check=False))
    loader = ShardLoader(build, shuffle=False)
    assert len(expected) == loader.num_packs
    for number, sample in enumerate(expected):
        key, members = loader.read_raw(number)
        assert key == sample["__key__"]
        got = {name: bytes(data) for name, data in members.items()}
        assert got == {k: v for k, v in sample.items() if not k.startswith("__")}


def _readme_snippet(first_line: str) -> str:
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text(encoding="utf-8")
    start = readme.index(f"```python\n{first_line}")
    return readme[start + len("```python\n") : readme.index("```", start + 9)]


def test_hf_datasets_reads_every_pack(build, tmp_path, monkeypatch):
    """The README's snippet, run as written on this build: HF `datasets`' webdataset builder
    streams every pack of every shard, and its arrays, meta and media are the loader's; loaded
    without streaming, every field gets one Arrow type (the same members in every pack, one
    JSON type per meta field)."""
    import datasets

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    namespace: dict = {}
    snippet = _readme_snippet("import glob")
    exec(snippet.replace('"shards/stage3/*.tar"', repr(str(build / "*.tar"))), namespace)  # noqa: S102
    assert all(name.startswith(("image", "tile")) for name in namespace["files"])
    loader = ShardLoader(build, shuffle=False)
    packs = list(namespace["packs"])
    assert len(packs) == loader.num_packs
    for number, pack in enumerate(packs):
        key, members = loader.read_raw(number)
        checked = loader.read_pack(number)
        assert pack["__key__"] == key
        assert set(pack) - {"__key__", "__url__"} == {"arrays.npz", "media.tar", "meta.json"}
        for name in ARRAY_NAMES:
            np.testing.assert_array_equal(pack["arrays.npz"][name], getattr(checked, name))
        assert pack["meta.json"] == checked.meta
        files = media_members(pack["media.tar"])
        ours = read_media_tar(members["media.tar"])
        assert files == {name: bytes(data) for name, data in ours.items()}
    kinds = {s["modality"] for p in packs for s in _modalities(p["meta.json"])}
    assert kinds == {"image", "video", "text"}  # every kind of pack went through
    table = datasets.load_dataset(
        "webdataset",
        data_files={"train": sorted(str(p) for p in build.glob("*.tar"))},
        split="train",
        cache_dir=str(tmp_path / "hf"),
    )
    assert table.num_rows == loader.num_packs
    assert table[loader.num_packs - 1]["__key__"] == loader.read_raw(loader.num_packs - 1)[0]


def _modalities(meta: dict) -> list[dict]:
    return [
        {"modality": "video" if s["videos"] else "image" if s["images"] else "text"}
        for s in meta["samples"]
    ]


def test_older_shard_formats_load_the_same(builds, tmp_path):
    """Builds in formats 1 (``.npy`` members, every tile a member) and 2 (``arrays.npz``, one
    member per image and tile, ``media_order`` pairs) give the batches of the format-3 build
    they were made from."""
    for storage, version in (("tiles", 1), ("source", 2)):
        legacy = write_legacy_build(builds[storage], tmp_path / storage, version)
        assert json.loads((legacy / "index.json").read_text())["format"] == version
        key, members = ShardLoader(legacy, shuffle=False).read_raw(0)
        assert "media.tar" not in members and ("arrays.npz" in members) == (version == 2)
        assert_batches_equal(
            all_batches(ShardLoader(legacy, shuffle=False, batch_size=2)),
            all_batches(ShardLoader(builds[storage], shuffle=False, batch_size=2)),
        )


def test_import_and_numpy_iteration_do_not_import_torch(build):
    code = (
        "import sys; from lvita_data.loader import ShardLoader; "
        f"assert 'torch' not in sys.modules; loader = ShardLoader({str(build)!r}, shuffle=False); "
        "batch = next(iter(loader)); print('torch' in sys.modules, 'webdataset' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"]


# --------------------------------------------------------------------------------------------
# round trip


def test_round_trip_arrays_equal_the_tar(build, tar_packs):
    loader = ShardLoader(build, shuffle=False, batch_size=3)
    batches = all_batches(loader)
    assert keys_of(batches) == sorted(tar_packs) == [f"{i:09d}" for i in range(16)]
    assert [b.batch_size for b in batches] == [3, 3, 3, 3, 3, 1]  # the short tail is kept
    length = loader.seq_len
    for batch in batches:
        assert batch.input_ids.shape == (batch.batch_size, length)
        assert batch.input_ids.dtype == batch.labels.dtype == batch.position_ids.dtype == np.int32
        flat_cu = [0]
        for b, key in enumerate(batch.keys):
            members = tar_packs[key]
            arrays = pack_arrays(members)
            for name in ARRAY_NAMES[:3]:
                np.testing.assert_array_equal(getattr(batch, name)[b], arrays[name])
            cu = arrays["cu_seqlens"]
            np.testing.assert_array_equal(batch.cu_seqlens_per_pack[b], cu)
            flat_cu.extend((cu[1:] + b * length).tolist())
            assert batch.meta[b] == json.loads(members["meta.json"])
        assert batch.cu_seqlens.dtype == np.int32
        assert batch.cu_seqlens.tolist() == flat_cu
        assert batch.cu_seqlens[-1] == batch.num_tokens == batch.batch_size * length
        assert batch.max_seqlen == int(np.diff(batch.cu_seqlens).max())


def expected_tiles(members: dict[str, bytes]) -> tuple[np.ndarray, list[bytes]]:
    """(uint8 tiles of a pack in placeholder order, its stored tile members), computed from the
    members with the original's operations: stored tiles decoded; an image stored as its bytes
    opened with Pillow, ``convert("RGB")`` and cut for its grid, independently of the loader's
    code path."""
    from PIL import Image

    meta = json.loads(members["meta.json"])
    media = media_members(members["media.tar"])
    stored = [media[f"tile{i:06d}.png"] for i in range(meta["stored_tiles"])]
    tiles, next_stored = [], 0
    for sample in meta["samples"]:
        for item in sample["media_order"]:
            kind, index = item["kind"], item["index"]
            count = (
                len(sample["videos"][index]["frames"])
                if kind == "video"
                else sample["images"][index]["tiles"]
            )
            if kind == "video" or "member" not in sample["images"][index]:
                tiles.extend(decode_tiles(stored[next_stored : next_stored + count], "png"))
                next_stored += count
            else:
                image = sample["images"][index]
                rgb = Image.open(io.BytesIO(media[image["member"]])).convert("RGB")
                assert list(rgb.size) == image["size"]
                tiles.extend(tiles_array(image_tiles(rgb, tuple(image["grid"]))))
    return np.stack(tiles) if tiles else np.empty((0, 448, 448, 3), np.uint8), stored


def test_pixels_equal_normalize_tiles_of_decode(build, tar_packs):
    loader = ShardLoader(build, shuffle=False, batch_size=2)
    raw = ShardLoader(build, shuffle=False, batch_size=2, normalize=False)
    undecoded = ShardLoader(build, shuffle=False, batch_size=2, decode_pixels=False)
    total = images = 0
    for batch, uint8, encoded in zip(loader, raw, undecoded, strict=True):
        expected_parts, blobs = [], []
        for key in batch.keys:
            pack_tiles, stored = expected_tiles(tar_packs[key])
            expected_parts.append(pack_tiles)
            blobs.extend(stored)
        expected_uint8 = np.concatenate(expected_parts)
        expected = normalize_tiles(expected_uint8)
        count = expected.shape[0]
        assert batch.pixel_values.dtype == np.float32
        assert batch.pixel_values.shape == (count, 3, 448, 448)
        assert np.array_equal(batch.pixel_values, expected)  # bit-identical
        assert np.array_equal(uint8.pixel_values, expected_uint8)
        assert encoded.pixel_values is None and encoded.tile_data == blobs
        for key, sources in zip(batch.keys, encoded.image_data, strict=True):
            assert sources == {
                k: v
                for k, v in media_members(tar_packs[key]["media.tar"]).items()
                if k[:5] == "image"
            }
            images += len(sources)
        # one tile per placeholder group, per pack and in all
        assert batch.num_tiles == count == int(batch.tiles_per_pack.sum())
        assert batch.image_token_positions.shape == (count, 256)
        total += count
    assert total > 50
    assert (images > 10) == (build.name == "source")  # images stored as their bytes


def test_both_storages_give_bit_identical_batches(builds):
    source = all_batches(ShardLoader(builds["source"], shuffle=False, batch_size=2))
    tiles = all_batches(ShardLoader(builds["tiles"], shuffle=False, batch_size=2))
    assert_batches_equal(source, tiles)
    assert sum(b.num_tiles for b in source) > 50
    size = {k: sum(p.stat().st_size for p in v.glob("*.tar")) for k, v in builds.items()}
    assert size["source"] < size["tiles"] / 2  # the demo's small PNGs: ~4x smaller


def test_each_image_is_stored_once_per_pack(builds, demo_corpus, tmp_path):
    """Two tags of one image in a sample (and the same image in two samples of a pack) store
    its bytes once; the loader cuts it once and gives both uses the same tiles."""
    root = demo_corpus[0]
    record = {
        "messages": [
            {"role": "user", "content": "<image>\n<image>\nSame twice?"},
            {"role": "assistant", "content": "Yes."},
        ],
        "images": ["images/img_1x2.jpg", "images/img_1x2.jpg"],
        "videos": [],
    }
    data = tmp_path / "twice.jsonl"
    data.write_text(json.dumps(record) + "\n")
    manifest = tmp_path / "twice.yaml"
    text = MANIFEST.format(root=root, storage="source").split("datasets:")[0]
    text += f"datasets:\n  - name: twice\n    format: longvita_jsonl\n    path: {data}\n"
    text += f"    media_root: {root}/longvita\n"
    manifest.write_text(text)
    build_stage(str(manifest), str(tmp_path / "out"), workers=1, progress=False)
    import lvita_data.loader.batch as batch_module

    cuts = []
    real_cut = batch_module.source_image_tiles

    def counting_cut(*args):
        cuts.append(args[3])
        return real_cut(*args)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(batch_module, "source_image_tiles", counting_cut)
        batch = next(iter(ShardLoader(tmp_path / "out", shuffle=False)))
    assert cuts == ["image000000.jpg"]  # decoded and cut once for both of its uses
    members = ShardLoader(tmp_path / "out", shuffle=False, decode_pixels=False)
    images = next(iter(members)).image_data[0]
    assert list(images) == ["image000000.jpg"]
    half = batch.num_tiles // 2
    assert half > 1 and np.array_equal(batch.pixel_values[:half], batch.pixel_values[half:])


def test_a_damaged_arrays_npz_is_a_loader_error_never_another_exception(builds):
    """Every single-byte change of a real arrays.npz either still loads the same arrays (the
    change hit bytes zip readers ignore) or raises LoaderError: bounded, no other exception."""
    loader = ShardLoader(builds["source"], shuffle=False)
    key, members = loader.read_raw(0)
    data = bytes(members["arrays.npz"])
    intact = parse_pack(
        key, dict(members), where="w", seq_len=2048, vision_ids=bundled_vision_ids()
    )
    outcomes = {"same": 0, "error": 0}
    for position in range(len(data)):
        damaged = bytearray(data)
        damaged[position] ^= 0x55
        try:
            pack = parse_pack(
                key,
                {**members, "arrays.npz": memoryview(bytes(damaged))},
                where="w",
                seq_len=2048,
                vision_ids=bundled_vision_ids(),
            )
        except LoaderError:
            outcomes["error"] += 1
            continue
        outcomes["same"] += 1
        assert np.array_equal(pack.input_ids, intact.input_ids)
        assert np.array_equal(pack.labels, intact.labels)
    assert outcomes["error"] > len(data) // 2  # did it run: most flips are caught


def _first_image_pack(build: Path) -> tuple[str, dict[str, memoryview], dict[str, bytes], str]:
    """(key, members, media members, first image member) of the first pack with an image."""
    loader = ShardLoader(build, shuffle=False)
    for number in range(loader.num_packs):
        key, members = loader.read_raw(number)
        media = media_members(bytes(members["media.tar"]))
        images = [name for name in media if name.startswith("image")]
        if images:
            return key, dict(members), media, images[0]
    raise AssertionError("no pack with a source image")


def _load(members: dict[str, memoryview], key: str, media: dict[str, bytes]) -> None:
    members = {**members, "media.tar": memoryview(media_tar_bytes(media))}
    pack = parse_pack(
        key, members, where=f"shard sample {key}", seq_len=2048, vision_ids=bundled_vision_ids()
    )
    assemble_batch([pack], 2048)


def test_a_changed_or_damaged_source_image_raises(builds):
    """An image member that decodes to another size than planned, or not at all, is a
    LoaderError naming the shard, the key and the member: never a changed token count."""
    from PIL import Image

    key, members, media, name = _first_image_pack(builds["source"])
    _load(members, key, media)  # intact
    image = Image.open(io.BytesIO(media[name]))
    smaller = io.BytesIO()
    image.resize((image.width - 1, image.height)).save(smaller, image.format)
    with pytest.raises(LoaderError, match=rf"shard sample {key}: image {name}: size"):
        _load(members, key, {**media, name: smaller.getvalue()})
    data = media[name]
    with pytest.raises(LoaderError, match=rf"shard sample {key}: image {name}"):
        _load(members, key, {**media, name: data[: len(data) // 2]})
    del media[name]
    with pytest.raises(LoaderError, match=rf"image member {name} is missing"):
        _load(members, key, media)


def expected_contexts(meta: dict, ids: SpecialIds) -> list[int]:
    """The context id of each tile of a pack, from its meta (thumbnail first, then patches)."""
    out = []
    for sample in meta["samples"]:
        for item in sample["media_order"]:
            kind, index = item["kind"], item["index"]
            if kind == "video":
                out.extend([ids.vid_context] * len(sample["videos"][index]["frames"]))
            else:
                tiles = sample["images"][index]["tiles"]
                out.extend([ids.img_context] + [ids.patch_context] * (tiles - 1))
    return out


def test_image_token_positions_point_at_placeholders_in_order(build):
    ids = load_tokenizer("qwen2.5").special_ids
    seen = set()
    for batch in ShardLoader(build, shuffle=False, batch_size=3):
        flat = batch.input_ids.reshape(-1)
        positions = batch.image_token_positions
        assert positions.dtype == np.int64
        # every placeholder of the batch exactly once, in sequence order
        mask = np.isin(flat, ids.vision_context_ids)
        np.testing.assert_array_equal(positions.reshape(-1), np.flatnonzero(mask))
        # each tile's 256 placeholders are one contiguous run after its start token
        assert (np.diff(positions, axis=1) == 1).all()
        starts = flat[positions[:, 0] - 1]
        ends = flat[positions[:, -1] + 1]
        contexts = flat[positions[:, 0]]
        assert (flat[positions] == contexts[:, None]).all()
        expected = [c for meta in batch.meta for c in expected_contexts(meta, ids)]
        assert contexts.tolist() == expected
        start_of = {
            ids.img_context: ids.img_start,
            ids.patch_context: ids.patch_start,
            ids.vid_context: ids.vid_start,
        }
        end_of = {
            ids.img_context: ids.img_end,
            ids.patch_context: ids.patch_end,
            ids.vid_context: ids.vid_end,
        }
        assert starts.tolist() == [start_of[c] for c in contexts.tolist()]
        assert ends.tolist() == [end_of[c] for c in contexts.tolist()]
        # tiles of pack b point into rows b of the flattened batch
        owner = np.repeat(np.arange(batch.batch_size), batch.tiles_per_pack)
        assert (positions // batch.seq_len == owner[:, None]).all()
        seen.update(contexts.tolist())
    assert seen == set(ids.vision_context_ids)  # images, tiled images and video frames


# --------------------------------------------------------------------------------------------
# order and DP split


def test_epoch_order_is_a_deterministic_two_level_permutation():
    counts = [5, 5, 5, 1]
    order = epoch_order(counts, seed=3, epoch=0, shuffle=True)
    assert sorted(order.tolist()) == list(range(16))
    assert order.tolist() == epoch_order(counts, seed=3, epoch=0, shuffle=True).tolist()
    assert order.tolist() != epoch_order(counts, seed=3, epoch=1, shuffle=True).tolist()
    assert order.tolist() != epoch_order(counts, seed=4, epoch=0, shuffle=True).tolist()
    assert epoch_order(counts, seed=3, epoch=0, shuffle=False).tolist() == list(range(16))
    # shard by shard: each shard's packs are consecutive in the order
    shard = np.searchsorted(np.cumsum(counts), order, side="right")
    assert (np.diff(shard) != 0).sum() == len(counts) - 1
    # pinned values: the legacy RandomState streams must not change under us
    assert epoch_order([3, 2], seed=0, epoch=0, shuffle=True).tolist() == PINNED_ORDER


PINNED_ORDER = [4, 3, 1, 0, 2]


def test_seeds_and_epochs_change_the_order_deterministically(build):
    def keys(**kwargs):
        return keys_of(all_batches(ShardLoader(build, decode_pixels=False, **kwargs)))

    base = keys(seed=1)
    assert base == keys(seed=1)
    assert sorted(base) == sorted(keys(seed=2)) == sorted(keys(seed=1, epoch=1))
    assert base != keys(seed=2)
    assert base != keys(seed=1, epoch=1)
    assert keys(shuffle=False) == sorted(base)


@pytest.mark.parametrize("world", [2, 3])
def test_dp_ranks_get_disjoint_equal_shares(build, world):
    per_rank = []
    for rank in range(world):
        loader = ShardLoader(
            build,
            dp_rank=rank,
            dp_world_size=world,
            seed=5,
            epoch=2,
            batch_size=2,
            decode_pixels=False,
        )
        per_rank.append(keys_of(all_batches(loader)))
        assert len(loader) == len(all_batches(loader))
    n = 16 // world
    assert all(len(keys) == n for keys in per_rank)
    union = set().union(*map(set, per_rank))
    assert len(union) == world * n  # disjoint
    order = epoch_order([5, 5, 5, 1], seed=5, epoch=2, shuffle=True)
    dropped = {f"{i:09d}" for i in order[world * n :]}
    assert union | dropped == {f"{i:09d}" for i in range(16)}
    assert not union & dropped
    assert len(dropped) == 16 % world
    # the same number of batches everywhere (no rank waits for another at the end)
    counts = {
        len(ShardLoader(build, dp_rank=r, dp_world_size=world, batch_size=2)) for r in range(world)
    }
    assert len(counts) == 1


def test_drop_last(build):
    loader = ShardLoader(build, batch_size=3, drop_last=True, decode_pixels=False)
    batches = all_batches(loader)
    assert len(batches) == len(loader) == 5 and all(b.batch_size == 3 for b in batches)


def test_too_many_ranks(build):
    with pytest.raises(LoaderError, match="cannot feed"):
        ShardLoader(build, dp_world_size=17)


# --------------------------------------------------------------------------------------------
# epochs and exact resume


def test_iteration_advances_the_epoch(build):
    loader = ShardLoader(build, seed=9, decode_pixels=False)
    first = keys_of(all_batches(loader))
    assert loader.state_dict()["epoch"] == 1 and loader.position == 0
    second = keys_of(all_batches(loader))
    assert second == keys_of(all_batches(ShardLoader(build, seed=9, epoch=1, decode_pixels=False)))
    assert first != second
    loader.set_epoch(0)
    assert keys_of(all_batches(loader)) == first


@pytest.mark.parametrize("consumed", [0, 1, 2, 4])
def test_exact_resume(build, consumed):
    kwargs = dict(dp_rank=1, dp_world_size=2, batch_size=2, seed=13, epoch=3)
    uninterrupted = all_batches(ShardLoader(build, **kwargs))
    assert len(uninterrupted) == 4
    loader = ShardLoader(build, **kwargs)
    iterator = iter(loader)
    head = [next(iterator) for _ in range(consumed)]
    state = json.loads(json.dumps(loader.state_dict()))  # JSON-able
    assert state["position"] == 2 * consumed
    resumed_loader = ShardLoader(build, dp_rank=1, dp_world_size=2, batch_size=2, seed=13)
    resumed_loader.load_state_dict(state)
    resumed = all_batches(resumed_loader)
    assert_batches_equal(head + resumed, uninterrupted)
    assert resumed_loader.state_dict()["epoch"] == 4  # and the next epoch follows
    next_epoch = ShardLoader(build, **{**kwargs, "epoch": 4}, decode_pixels=False)
    assert keys_of(all_batches(resumed_loader)) == keys_of(all_batches(next_epoch))


def test_break_keeps_the_position(build):
    loader = ShardLoader(build, seed=2, decode_pixels=False)
    expected = keys_of(all_batches(ShardLoader(build, seed=2, decode_pixels=False)))
    got = []
    for batch in loader:
        got.extend(batch.keys)
        if len(got) == 5:
            break
    got.extend(keys_of(all_batches(loader)))
    assert got == expected


def test_state_of_rank_0_fits_other_ranks(build):
    rank0 = ShardLoader(build, dp_rank=0, dp_world_size=2, decode_pixels=False)
    iterator = iter(rank0)
    for _ in range(3):
        next(iterator)
    rank1 = ShardLoader(build, dp_rank=1, dp_world_size=2, decode_pixels=False)
    rank1.load_state_dict(rank0.state_dict())
    full = keys_of(all_batches(ShardLoader(build, dp_rank=1, dp_world_size=2, decode_pixels=False)))
    assert keys_of(all_batches(rank1)) == full[3:]


def test_load_state_rejects_a_different_world_size(build):
    state = ShardLoader(build, dp_world_size=2).state_dict()
    with pytest.raises(ValueError, match="dp_world_size=2.*dp_world_size=4"):
        ShardLoader(build, dp_world_size=4).load_state_dict(state)
    with pytest.raises(ValueError, match="seed"):
        ShardLoader(build, dp_world_size=2, seed=1).load_state_dict(state)
    with pytest.raises(ValueError, match="shuffle"):
        ShardLoader(build, dp_world_size=2, shuffle=False).load_state_dict(state)
    with pytest.raises(ValueError, match="another build"):
        ShardLoader(build, dp_world_size=2).load_state_dict({**state, "fingerprint": "x"})
    with pytest.raises(ValueError, match="position"):
        ShardLoader(build, dp_world_size=2).load_state_dict({**state, "position": 99})


# --------------------------------------------------------------------------------------------
# worker processes (torch DataLoader)


@pytest.mark.filterwarnings("ignore:This DataLoader will create")
def test_workers_yield_the_same_batches_in_the_same_order(build):
    pytest.importorskip("torch")
    kwargs = dict(batch_size=2, seed=21, dp_rank=0, dp_world_size=1)
    single = all_batches(ShardLoader(build, **kwargs))
    multi = all_batches(ShardLoader(build, num_workers=3, **kwargs))
    assert_batches_equal(multi, single)
    # resume with workers: state counted in the main process, remaining order unchanged
    loader = ShardLoader(build, num_workers=2, **kwargs)
    iterator = iter(loader)
    head = [next(iterator) for _ in range(3)]
    del iterator
    state = loader.state_dict()
    assert state["position"] == 6
    resumed = ShardLoader(build, num_workers=2, **kwargs)
    resumed.load_state_dict(state)
    assert_batches_equal(head + all_batches(resumed), single)


def test_to_torch(build):
    torch = pytest.importorskip("torch")
    batch = next(iter(ShardLoader(build, shuffle=False, batch_size=2)))
    tensors = batch.to_torch()
    assert tensors["input_ids"].dtype == torch.int64
    assert tensors["labels"].dtype == torch.int64
    assert tensors["cu_seqlens"].dtype == torch.int32
    assert tensors["pixel_values"].dtype == torch.float32
    assert tensors["pixel_values"].shape == batch.pixel_values.shape
    assert tensors["image_token_positions"].dtype == torch.int64
    assert tensors["max_seqlen"] == batch.max_seqlen
    # uint8 tiles are normalised by to_torch, bit-identically
    raw = next(iter(ShardLoader(build, shuffle=False, batch_size=2, normalize=False)))
    assert raw.pixel_values.dtype == np.uint8
    assert np.array_equal(raw.to_torch()["pixel_values"].numpy(), batch.pixel_values)
    assert raw.to_torch(normalize_pixels=False)["pixel_values"].dtype == torch.uint8


# --------------------------------------------------------------------------------------------
# errors


def test_wrong_special_ids_are_caught(build):
    ids = load_tokenizer("qwen2.5").special_ids
    wrong = dataclasses.replace(ids, img_context=ids.im_end)
    with pytest.raises(LoaderError, match="vision placeholders"):
        all_batches(ShardLoader(build, shuffle=False, special_ids=wrong, decode_pixels=False))


def test_bad_build_directories(build, tmp_path):
    with pytest.raises(LoaderError, match="index.json"):
        ShardLoader(tmp_path)
    copy = tmp_path / "copy"
    shutil.copytree(build, copy)
    first = sorted(copy.glob("*.tar"))[0]
    data = first.read_bytes()
    first.write_bytes(data[: len(data) // 2])  # truncated shard: refused before any batch
    with pytest.raises(LoaderError, match="missing or changed"):
        ShardLoader(copy, shuffle=False, decode_pixels=False)
    first.write_bytes(data[: len(data) // 2] + bytes(len(data) - len(data) // 2))  # same size
    with pytest.raises(LoaderError):
        all_batches(ShardLoader(copy, shuffle=False, decode_pixels=False))
    index = json.loads((copy / "index.json").read_text())
    index["format"] = 99
    (copy / "index.json").write_text(json.dumps(index))
    with pytest.raises(LoaderError, match="shard format 99"):
        ShardLoader(copy)


def test_missing_or_changed_shards_are_named_before_any_batch(build, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(build, copy)
    shards = sorted(copy.glob("*.tar"))
    shards[1].unlink()
    with shards[2].open("ab") as handle:
        handle.write(b"\0" * 512)
    with pytest.raises(LoaderError, match="2 shard\\(s\\) missing or changed") as error:
        ShardLoader(copy)
    assert shards[1].name in str(error.value) and shards[2].name in str(error.value)
    index = json.loads((copy / "index.json").read_text())
    index["shards"][0]["name"] = "../" + index["shards"][0]["name"]
    (copy / "index.json").write_text(json.dumps(index))
    with pytest.raises(LoaderError, match="is not a file name in the build"):
        ShardLoader(copy)


def test_a_loader_batch_is_the_model_input_contract(build):
    """The README's path: a packed batch from the shards runs through the tiny Long-VITA model
    (ids, positions, cu_seqlens, tiles scattered at their placeholders, next-token loss)."""
    import torch

    from lvita_model.attention import SdpaBackend
    from lvita_model.head import next_token_targets
    from lvita_model.model import build_model

    loader = ShardLoader(build, batch_size=1)
    batch = next(batch for batch in loader if batch.num_tiles > 0).to_torch()
    model = build_model("tiny", attention_backend=SdpaBackend())
    hidden = model(
        batch["input_ids"][0],
        batch["position_ids"][0],
        cu_seqlens=batch["cu_seqlens"],
        pixel_values=batch["pixel_values"],
        image_token_positions=batch["image_token_positions"],
    )
    targets = next_token_targets(batch["labels"][0], batch["cu_seqlens"])
    loss_sum, count = model.loss(hidden, targets)
    assert count.item() > 0 and torch.isfinite(loss_sum)
    # an untrained model is near uniform over the 152,064-token vocabulary
    assert abs(loss_sum.item() / count.item() - np.log(152064)) < 1.0
    (loss_sum / count).backward()
    assert model.model.vision_projection.mlp[2].weight.grad.abs().sum().item() > 0
