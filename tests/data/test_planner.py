"""The planning pass end to end: accounting, exactness, determinism, loud failures."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from lvita_data.build.plan import plan_stage
from lvita_data.errors import MissingInputs, RejectRateExceeded, SkipSample
from lvita_data.manifest import expand_dataset_files, load_manifest
from lvita_data.records import open_source
from lvita_data.samples import tokenize
from lvita_data.samples.read import tokenizer_and_template
from lvita_data.samples.tokenize import SampleRules, plan_counts, plan_record, tokenize_record

REPO = Path(__file__).resolve().parents[2]
DEMO_MANIFESTS = [REPO / "manifests" / "demo" / f"stage{n}.yaml" for n in (1, 2, 3, 4)]


@pytest.fixture()
def demo_root(demo_corpus, monkeypatch) -> Path:
    monkeypatch.setenv("LVITA_DEMO_ROOT", str(demo_corpus[0]))
    return demo_corpus[0]


@pytest.fixture()
def plans(demo_root):
    return {path.stem: plan_stage(load_manifest(path), progress=False) for path in DEMO_MANIFESTS}


def test_every_selected_record_is_a_sample_or_a_reject(plans):
    for plan in plans.values():
        for report in plan.datasets:
            assert report.selected == report.samples + sum(report.rejects.values()), report.name
        for file_plan in plan.files:
            assert file_plan.num_selected == file_plan.num_samples + len(file_plan.rejects)
        payload = json.loads("".join(plan.iter_json()))
        assert len(payload["samples"]["length"]) == plan.num_samples
        assert sum(payload["samples"]["length"]) == plan.num_tokens
        assert max(payload["samples"]["length"]) <= plan.manifest.pack.max_seq_len


def test_planned_lengths_equal_materialized_samples(demo_root):
    """The length from metadata equals the length of the ids actually built, for every sample."""
    manifest = load_manifest(DEMO_MANIFESTS[1])
    tokenizer, template = tokenizer_and_template(manifest.tokenizer)
    rules = SampleRules.from_manifest(manifest, template)
    plan = plan_stage(manifest, progress=False)
    checked = 0
    for file_plan in plan.files:
        entry = next(d for d in manifest.datasets if d.name == file_plan.dataset)
        source = open_source(
            file_plan.path, fmt=entry.format, dataset=entry.name, media_root=entry.media_root
        )
        columns = zip(file_plan.rows.tolist(), file_plan.lengths, file_plan.tiles, strict=True)
        for row, length, tiles in columns:
            record = source.read(row)
            contents = tokenizer.encode_batch([t.content for t in record.turns])
            sample = tokenize_record(record, contents, rules)
            assert sample.input_ids.shape[0] == sample.plan.length == length
            assert sample.plan.num_tiles == tiles
            assert sample.labels.shape == sample.input_ids.shape
            checked += 1
    assert checked == plan.num_samples > 100


def counts_of(record, contents, rules):
    """What `plan_counts` must give: `plan_record`'s numbers, or its SkipSample."""
    try:
        plan = plan_record(record, contents, rules)
    except SkipSample as skip:
        return skip.reason, skip.detail
    frames = sum(len(v.frame_indices) for v in plan.videos)
    return plan.length, plan.num_tiles, frames, sum(v.requested_frames for v in plan.videos)


def test_plan_counts_equal_the_plan_of_every_demo_record(demo_root, monkeypatch):
    """The planner's direct sums (`plan_counts`) against the plan objects, every record of the
    demo stages (images, videos, text, rejects), also with a lower max_seq_len; its per-file
    image sizes start over every 3 images here."""
    monkeypatch.setattr(tokenize, "IMAGE_SIZES", 3)
    checked = 0
    for manifest_path in DEMO_MANIFESTS:
        manifest = load_manifest(manifest_path)
        tokenizer, template = tokenizer_and_template(manifest.tokenizer)
        for max_seq_len in (manifest.pack.max_seq_len, 2048):
            pack = dataclasses.replace(manifest.pack, max_seq_len=max_seq_len)
            rules = SampleRules.from_manifest(dataclasses.replace(manifest, pack=pack), template)
            for entry in manifest.datasets:
                for path in expand_dataset_files(entry)[0]:
                    source = open_source(
                        path, fmt=entry.format, dataset=entry.name, media_root=entry.media_root
                    )
                    for row in range(len(source)):
                        try:
                            record = source.read(row)
                        except SkipSample:
                            continue
                        contents = tokenizer.encode_batch([t.content for t in record.turns])
                        try:
                            got = plan_counts(record, contents, rules)
                        except SkipSample as skip:
                            got = skip.reason, skip.detail
                        assert got == counts_of(record, contents, rules), (path, row)
                        assert len(rules.image_sizes) <= 3
                        checked += 1
    assert checked > 500


def test_video_frames_lowered_to_fit_are_recorded(plans):
    stage2 = {d.name: d for d in plans["stage2"].datasets}
    video = stage2["lv_video_qa"]
    assert video.videos_fitted > 0 and video.frames_chosen < video.frames_requested
    assert all((f.frames <= f.requested_frames).all() for f in plans["stage2"].files)


def test_same_plan_whatever_the_worker_count(demo_root):
    manifest = load_manifest(DEMO_MANIFESTS[2])
    one = "".join(plan_stage(manifest, workers=1, progress=False).iter_json())
    two = "".join(plan_stage(manifest, workers=2, progress=False).iter_json())
    assert one == two and json.loads(one)["num_samples"] > 0


def test_ray_tasks_plan_byte_for_byte_as_local_processes(demo_root, tmp_path):
    ray = pytest.importorskip("ray")
    outs = {}
    for executor in ("local", "ray"):
        outs[executor] = tmp_path / f"{executor}.json"
        result = subprocess.run(
            [sys.executable, "-m", "pipelines", "plan", str(DEMO_MANIFESTS[2]), "--quiet"]
            + ["--workers", "2", "--executor", executor, "--out", str(outs[executor])],
            capture_output=True,
            text=True,
            env={**os.environ, "LVITA_DEMO_ROOT": str(demo_root)},
            timeout=300,
        )
        assert result.returncode == 0, result.stderr
    assert outs["ray"].read_bytes() == outs["local"].read_bytes()
    assert not ray.is_initialized()


def copy_manifest(tmp_path: Path, demo_root: Path, edit) -> Path:
    text = (
        DEMO_MANIFESTS[1].read_text().replace("${LVITA_DEMO_ROOT:-../../demo_data}", str(demo_root))
    )
    path = tmp_path / "stage.yaml"
    path.write_text(edit(text))
    return path


def test_missing_dataset_file_is_loud(tmp_path, demo_root):
    path = copy_manifest(tmp_path, demo_root, lambda t: t.replace("short_chat.jsonl", "gone.jsonl"))
    with pytest.raises(MissingInputs, match="gone.jsonl"):
        plan_stage(load_manifest(path), progress=False)
    plan = plan_stage(load_manifest(path), allow_missing=True, progress=False)
    report = next(d for d in plan.datasets if d.name == "short_chat")
    assert report.files_missing and report.files_missing[0].endswith("gone.jsonl")
    assert report.samples == 0


def test_unreadable_file_is_loud(tmp_path, demo_root):
    broken = tmp_path / "broken.parquet"
    broken.write_bytes(b"not parquet")
    cauldron = str(demo_root / "cauldron" / "chartqa-00000-of-00001.parquet")
    path = copy_manifest(tmp_path, demo_root, lambda t: t.replace(cauldron, str(broken)))
    assert str(broken) in path.read_text()
    with pytest.raises(MissingInputs, match="could not be read"):
        plan_stage(load_manifest(path), progress=False)


def test_reject_rate_over_threshold_stops_the_run(tmp_path, demo_root):
    path = copy_manifest(tmp_path, demo_root, lambda t: t.replace("max_rate: 0.5", "max_rate: 0.1"))
    with pytest.raises(RejectRateExceeded, match="lv_bad_records"):
        plan_stage(load_manifest(path), progress=False)


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_rejects_of_stage_rules(tmp_path, demo_root):
    """Reasons decided by the stage rather than the reader: no video stage, reserved tokens,
    too-few frames in a frame directory, text longer than the packed length."""
    frames = tmp_path / "media" / "ShareGPTVideo" / "one"
    frames.mkdir(parents=True)
    shutil.copy(next((demo_root / "longvita" / "images").glob("*.jpg")), frames / "frame_1.jpg")
    video = next((demo_root / "longvita" / "videos").glob("*.mp4"))
    shutil.copy(video, tmp_path / "media" / "clip.mp4")
    ask = {"role": "user", "content": "<video>\nWhat happens?"}
    answer = {"role": "assistant", "content": "Things."}
    rows = [
        {"messages": [ask, answer], "videos": ["ShareGPTVideo/one"]},
        {"messages": [{"role": "user", "content": "a <IMG_CONTEXT> b"}, answer]},
        {"messages": [{"role": "user", "content": "word " * 6000}, answer]},
        {"messages": [ask, answer], "videos": ["clip.mp4"]},
    ]
    write_jsonl(tmp_path / "rules.jsonl", rows)
    manifest_text = """
schema_version: 1
stage: rules
seed: 1
pack: {max_seq_len: 4096, reset_attention: true}
VIDEO
rejects: {max_rate: 1.0}
datasets:
  - {name: rules, format: longvita_jsonl, path: rules.jsonl, media_root: media}
"""
    for video_section, expected in [
        ("video: {max_frames: 8}", ["too_few_frames", "reserved_token", "too_long"]),
        ("", ["reserved_token", "too_long", "video_not_allowed", "video_not_allowed"]),
    ]:
        path = tmp_path / "rules.yaml"
        path.write_text(manifest_text.replace("VIDEO", video_section))
        plan = plan_stage(load_manifest(path), progress=False)
        assert sorted(str(r.reason) for r in plan.rejects()) == sorted(expected)


def test_cli_plan_writes_json_and_exit_codes(tmp_path, demo_root):
    out = tmp_path / "plan.json"
    env = {"LVITA_DEMO_ROOT": str(demo_root), "PATH": "/usr/bin:/bin"}
    cli = [sys.executable, "-m", "pipelines"]
    done = subprocess.run(
        [*cli, "plan", str(DEMO_MANIFESTS[0]), "--out", str(out), "--quiet"],
        capture_output=True,
        text=True,
        env=env,
    )
    assert done.returncode == 0, done.stderr
    assert "lv_image_caption" in done.stdout and "TOTAL" in done.stdout
    payload = json.loads(out.read_text())
    assert payload["stage"] == "stage1" and payload["num_samples"] == len(
        payload["samples"]["length"]
    )
    bad = tmp_path / "bad.yaml"
    bad.write_text("schema_version: 1\nstage: x\nnonsense: 1\n")
    done = subprocess.run([*cli, "plan", str(bad)], capture_output=True, text=True, env=env)
    assert done.returncode == 2 and "nonsense" in done.stderr
    missing = copy_manifest(
        tmp_path, demo_root, lambda t: t.replace("short_chat.jsonl", "gone.jsonl")
    )
    done = subprocess.run(
        [*cli, "plan", str(missing), "--quiet"], capture_output=True, text=True, env=env
    )
    assert done.returncode == 3 and "gone.jsonl" in done.stderr
    strict = copy_manifest(
        tmp_path, demo_root, lambda t: t.replace("max_rate: 0.5", "max_rate: 0.1")
    )
    done = subprocess.run(
        [*cli, "plan", str(strict), "--quiet"], capture_output=True, text=True, env=env
    )
    assert done.returncode == 4 and "rejects.max_rate" in done.stderr
