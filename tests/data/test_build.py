"""`lvita build` (lvita_data.build, lvita_data.shards.writer): determinism across worker counts and
executors, the shard format's invariants, crash safety (kill -9, then --resume) and refusals.

One small mixed manifest over the session demo corpus (captions, parquet with embedded images,
text only, videos and frame directories, a JPEG truncated after a valid header, a malformed row)
with 2 packs per shard, so the build has several shards and takes a few seconds.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
from build_tree import temporaries, tree
from pack_media import media_members

from lvita_data.build.run import STATE_DIR, build_stage, remove_temporaries
from lvita_data.errors import BuildError, MissingInputs
from lvita_data.fileio import TEMP_MARKER, sha256_file, write_json_atomic
from lvita_data.media.tiles import decode_tile
from lvita_data.samples.read import tokenizer_and_template
from lvita_data.samples.tiling import TOKENS_PER_TILE, num_tiles
from lvita_data.schema import IGNORE_INDEX
from lvita_data.shards.format import (
    ARRAY_MEMBERS,
    load_npz,
    media_tar_bytes,
    npz_bytes,
    npz_limit,
)
from lvita_data.shards.writer import write_shard

REPO = Path(__file__).resolve().parents[2]
EXIT_BUILD = 5
MAX_SEQ_LEN = 2048

MANIFEST = """\
schema_version: 1
stage: buildtest
seed: {seed}
tokenizer: qwen2.5
pack:
  max_seq_len: {max_seq_len}
  reset_attention: true
  group_by: none
  align: 2
shards:
  packs_per_shard: 2
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
  - name: custom
    format: longvita_jsonl
    path: {work}/custom.jsonl
    media_root: {root}/longvita
"""


def _row(image: str, answer: str) -> str:
    messages = [
        {"role": "user", "content": "<image>\nWhat is shown?"},
        {"role": "assistant", "content": answer},
    ]
    return json.dumps({"messages": messages, "images": [image], "videos": []})


def write_manifest(root: Path, work: Path, *, seed: int = 11, name: str = "build.yaml") -> Path:
    custom = [
        _row("images/img_2x1.jpg", "A wide picture."),
        _row("images/bad/truncated.jpg", "A picture cut short after its header."),
        '{"messages": [',  # malformed: rejected by the planner
        _row("images/img_1x1_tiny.png", "A tiny picture."),
    ]
    (work / "custom.jsonl").write_text("\n".join(custom) + "\n", encoding="utf-8")
    path = work / name
    text = MANIFEST.format(seed=seed, max_seq_len=MAX_SEQ_LEN, root=root, work=work)
    path.write_text(text, encoding="utf-8")
    return path


def cli(*args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "pipelines", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=REPO,
    )


@pytest.fixture(scope="module")
def manifest(demo_corpus, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_manifest(demo_corpus[0], tmp_path_factory.mktemp("build_manifest"))


@pytest.fixture(scope="module")
def reference(manifest: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An uninterrupted build with one worker in this process."""
    out = tmp_path_factory.mktemp("build_reference") / "out"
    build_stage(str(manifest), str(out), workers=1, progress=False)
    return out


@pytest.fixture(scope="module")
def reference_tree(reference: Path) -> dict[str, str]:
    return tree(reference)


# --------------------------------------------------------------------------------------------
# determinism


def test_reference_build_layout(reference: Path, reference_tree: dict[str, str]) -> None:
    index = json.loads((reference / "index.json").read_text(encoding="utf-8"))
    shards = [s["name"] for s in index["shards"]]
    assert len(shards) >= 4 and shards == sorted(shards)
    expected = {
        "index.json",
        "stats.json",
        "rejects.jsonl",
        "manifest.yaml",
        ".nv-meta/dataset.yaml",
        ".nv-meta/split.yaml",
        ".nv-meta/.info.json",
        ".nv-meta/index.sqlite",
        ".nv-meta/index.uuid",
        *(f"{name}.idx" for name in shards),
        f"{STATE_DIR}/plan.json",
        f"{STATE_DIR}/layout.npz",
        f"{STATE_DIR}/lock",
        *shards,
        *(f"{STATE_DIR}/done/{name}.json" for name in shards),
    }
    assert set(reference_tree) == expected
    for shard in index["shards"]:
        path = reference / shard["name"]
        assert path.stat().st_size == shard["bytes"]
        assert sha256_file(str(path)) == shard["sha256"]
    assert not temporaries(reference)


def test_worker_count_does_not_change_a_byte(
    manifest: Path, reference_tree: dict[str, str], tmp_path: Path
) -> None:
    out = tmp_path / "out"
    build_stage(str(manifest), str(out), workers=2, progress=False)
    assert tree(out) == reference_tree


@pytest.mark.slow
def test_ray_executor_matches_local(
    manifest: Path, reference_tree: dict[str, str], tmp_path: Path
) -> None:
    ray = pytest.importorskip("ray")
    out = tmp_path / "out"
    try:
        # build_stage starts a local Ray with num_cpus=workers=2 and shuts it down again
        build_stage(str(manifest), str(out), workers=2, executor="ray", progress=False)
        assert not ray.is_initialized()
    finally:
        if ray.is_initialized():
            ray.shutdown()
    assert tree(out) == reference_tree


# --------------------------------------------------------------------------------------------
# shard invariants


def read_samples(path: Path) -> list[tuple[str, dict[str, bytes]]]:
    """(key, members) in file order; asserts the tar headers are the reproducible ones."""
    samples: list[tuple[str, dict[str, bytes]]] = []
    with tarfile.open(path) as tar:
        for info in tar:
            assert info.isfile()
            assert (info.mtime, info.uid, info.gid, info.uname, info.gname, info.mode) == (
                0,
                0,
                0,
                "",
                "",
                0o444,
            )
            key, member = info.name.split(".", 1)
            if not samples or samples[-1][0] != key:
                assert key not in {k for k, _ in samples}, f"{key}: members not contiguous"
                samples.append((key, {}))
            samples[-1][1][member] = tar.extractfile(info).read()
            names = list(samples[-1][1])
            assert names == sorted(names), f"{key}: members not sorted"
    return samples


def test_shard_invariants(reference: Path, demo_corpus) -> None:
    index = json.loads((reference / "index.json").read_text(encoding="utf-8"))
    images_dir = demo_corpus[0] / "longvita" / "images"
    source_files = {p.read_bytes() for p in images_dir.rglob("*") if p.is_file()}
    source_bytes_seen = 0
    tokenizer, _ = tokenizer_and_template("qwen2.5")
    special = tokenizer.special_ids
    vision = np.array(special.vision_context_ids)
    keys: list[str] = []
    tiles_seen = images_seen = 0
    modalities: set[str] = set()
    for shard in index["shards"]:
        samples = read_samples(reference / shard["name"])
        assert len(samples) == shard["samples"]
        tokens = 0
        for key, outer in samples:
            keys.append(key)
            assert set(outer) == {"arrays.npz", "media.tar", "meta.json"}  # format 3, every pack
            media = media_members(outer["media.tar"])
            assert outer["media.tar"] == media_tar_bytes(media)  # reproducible
            members = {**outer, **media}
            assert members["arrays.npz"] == npz_bytes(  # one reproducible .npz
                arrays := load_npz(members["arrays.npz"], ARRAY_MEMBERS, npz_limit(MAX_SEQ_LEN))
            )
            assert all(a.dtype == np.int32 for a in arrays.values())
            for name in ("input_ids", "labels", "position_ids"):
                assert arrays[name].shape == (MAX_SEQ_LEN,), name
            ids, labels, positions, cu = (arrays[name] for name in ARRAY_MEMBERS)
            assert cu[0] == 0 and cu[-1] == MAX_SEQ_LEN and (np.diff(cu) > 0).all()
            meta = json.loads(members["meta.json"])
            assert meta["stage"] == "buildtest" and meta["format"] == 3
            assert meta["tile_format"] == "png"
            tiles = sorted(m for m in members if m.startswith("tile"))
            assert tiles == [f"tile{i:06d}.png" for i in range(len(tiles))]
            images = sorted(m for m in members if m.startswith("image"))
            assert images == [f"image{i:06d}.{m.split('.')[1]}" for i, m in enumerate(images)]
            assert set(media) == {*tiles, *images}
            assert meta["stored_tiles"] == len(tiles)  # the video frames
            assert np.isin(ids, vision).sum() == TOKENS_PER_TILE * meta["num_tiles"]
            assert meta["num_tiles"] == sum(s["num_tiles"] for s in meta["samples"])
            frames = sum(len(v["frames"]) for s in meta["samples"] for v in s["videos"])
            assert frames == len(tiles)
            referenced = [i["member"] for s in meta["samples"] for i in s["images"]]
            assert sorted(set(referenced)) == images  # every image member used, none missing
            for name in images:  # the exact bytes of a source file (or of a parquet cell)
                source_bytes_seen += members[name] in source_files
            assert len(meta["samples"]) == len(cu) - 1
            end = 0
            for sample, start, stop in zip(meta["samples"], cu[:-1], cu[1:], strict=True):
                assert sample["offset"] == start and start % 2 == 0  # pack.align = 2
                order = [(item["kind"], item["index"]) for item in sample["media_order"]]
                assert sorted(order) == [("image", i) for i in range(len(sample["images"]))] + [
                    ("video", i) for i in range(len(sample["videos"]))
                ]
                assert sample["length"] <= stop - start
                assert positions[start] == 0  # pack.reset_attention
                assert (labels[start + sample["length"] : stop] == IGNORE_INDEX).all()
                expected = sum(num_tiles(tuple(i["grid"])) for i in sample["images"])
                expected += sum(len(v["frames"]) for v in sample["videos"])
                assert sample["num_tiles"] == expected
                segment = ids[start : start + sample["length"]]
                assert np.isin(segment, vision).sum() == TOKENS_PER_TILE * expected
                tokens += sample["length"]
                modalities.add(
                    "video" if sample["videos"] else "image" if sample["images"] else "text"
                )
                end = start + sample["length"]
            assert (ids[end:] == special.pad).all()
            for name in tiles[:2]:
                assert decode_tile(members[name], "png").shape == (448, 448, 3)
            tiles_seen += len(tiles)
            images_seen += len(images)
        assert tokens == shard["tokens"]
    assert keys == sorted(set(keys))
    assert tiles_seen > 0 and images_seen > source_bytes_seen > 0
    assert {"image", "text", "video"} <= modalities
    rejects = [json.loads(line) for line in (reference / "rejects.jsonl").read_text().splitlines()]
    reasons = {(r["dataset"], r["record"], r["reason"]) for r in rejects}
    assert ("custom", "2", "malformed_json") in reasons  # by the planner
    assert ("custom", "1", "corrupt_image") in reasons  # a JPEG cut short: no EOI marker
    assert json.loads((reference / "stats.json").read_text(encoding="utf-8"))


def test_tiles_storage_stores_every_tile(manifest: Path, reference: Path, tmp_path: Path) -> None:
    """``shards.image_storage: tiles`` writes format 3 too, with every tile pre-cut in media.tar
    and no image member (no image names a ``member``); the same packs and ids as the reference
    (images as their bytes), several times the bytes."""
    tiles_manifest = tmp_path / "tiles.yaml"
    text = manifest.read_text(encoding="utf-8")
    tiles_manifest.write_text(text.replace("shards:\n", "shards:\n  image_storage: tiles\n"))
    out = tmp_path / "out"
    build_stage(str(tiles_manifest), str(out), workers=1, progress=False)
    index = json.loads((out / "index.json").read_text(encoding="utf-8"))
    assert index["format"] == 3
    assert ", shard format 3, from " in (out / "manifest.yaml").read_text().splitlines()[0]
    reference_index = json.loads((reference / "index.json").read_text(encoding="utf-8"))
    assert [s["samples"] for s in index["shards"]] == [
        s["samples"] for s in reference_index["shards"]
    ]
    total = {"tiles": 0, "source": 0}
    for shard, ref_shard in zip(index["shards"], reference_index["shards"], strict=True):
        samples = read_samples(out / shard["name"])
        for (key, members), (ref_key, ref_members) in zip(
            samples, read_samples(reference / ref_shard["name"]), strict=True
        ):
            meta = json.loads(members["meta.json"])
            assert key == ref_key and meta["format"] == 3 and set(members) == set(ref_members)
            media = media_members(members["media.tar"])
            assert not any(m.startswith("image") for m in media)
            assert not any("member" in i for s in meta["samples"] for i in s["images"])
            assert meta["num_tiles"] == meta["stored_tiles"] == len(media)
            assert meta["num_tiles"] == json.loads(ref_members["meta.json"])["num_tiles"]
            assert members["arrays.npz"] == ref_members["arrays.npz"]
        total["tiles"] += shard["bytes"]
        total["source"] += ref_shard["bytes"]
    assert total["tiles"] > 2 * total["source"]


def test_rejects_record_where_they_were_found(reference: Path) -> None:
    rejects = [json.loads(line) for line in (reference / "rejects.jsonl").read_text().splitlines()]
    phases = {(r["dataset"], r["record"]): r["phase"] for r in rejects}
    assert phases[("custom", "2")] == "plan"  # malformed JSON: the planner
    assert phases[("custom", "1")] == "build"  # a truncated JPEG: found when copying it
    stats = json.loads((reference / "stats.json").read_text(encoding="utf-8"))
    counts = {phase: list(phases.values()).count(phase) for phase in set(phases.values())}
    assert stats["rejects_by_phase"] == {
        p: counts[p] for p in ("plan", "pack", "build") if p in counts
    }
    assert sum(stats["rejects_by_phase"].values()) == stats["rejects"] == len(rejects)
    from lvita_data.stats.text import format_stats

    assert f"building {counts['build']}" in format_stats(stats)


# --------------------------------------------------------------------------------------------
# crash safety


def _wait_for(predicate, process: subprocess.Popen, timeout: float = 120.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        if process.poll() is not None:
            return False
        time.sleep(0.002)
    raise AssertionError("the build neither reached the kill point nor finished")


def _ctrl_c_default() -> None:
    """In the child before exec: Ctrl-C as in a terminal, whatever this process inherited."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


KILL_POINTS = {
    # the state directory appears right before planning starts
    "planning": lambda out: (out / STATE_DIR).is_dir(),
    # a shard tar is being written
    "writing": lambda out: any(out.glob(f"*.tar{TEMP_MARKER}*")),
    "first_done": lambda out: any((out / STATE_DIR / "done").glob("*.json")),
}


@pytest.mark.slow
@pytest.mark.parametrize("point", list(KILL_POINTS))
def test_kill_9_then_resume_is_byte_identical(
    point: str, manifest: Path, reference_tree: dict[str, str], tmp_path: Path
) -> None:
    psutil = pytest.importorskip("psutil")
    out = tmp_path / "out"
    args = ["build", str(manifest), "--out", str(out), "--workers", "2", "--quiet"]
    process = subprocess.Popen(
        [sys.executable, "-m", "pipelines", *args],
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    children = []
    try:
        if _wait_for(lambda: KILL_POINTS[point](out), process):
            children = psutil.Process(process.pid).children(recursive=True)
        process.send_signal(signal.SIGKILL)
    finally:
        process.wait(timeout=60)
    _, alive = psutil.wait_procs(children, timeout=10)
    for leftover in alive:  # the planner's pool workers (lvita_data.build.plan) outlive a kill -9
        leftover.kill()
    if point != "planning":  # the shard workers notice that the build died and stop writing
        assert not alive, f"workers outlived the killed build: {alive}"
    done_dir = out / STATE_DIR / "done"
    kept = {}
    if done_dir.is_dir():
        for record in done_dir.glob("*.json"):
            shard = out / record.name.removesuffix(".json")
            stat = shard.stat()
            kept[shard.name] = (stat.st_ino, stat.st_mtime_ns)

    resumed = cli(*args, "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert tree(out) == reference_tree
    assert not temporaries(out)
    for name, identity in kept.items():  # completed shards were not written again
        stat = (out / name).stat()
        assert (stat.st_ino, stat.st_mtime_ns) == identity, name


def test_resume_of_a_finished_build_rewrites_no_shard(
    reference: Path, reference_tree: dict[str, str], manifest: Path, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    shutil.copytree(reference, out)
    before = {p.name: p.stat().st_ino for p in out.glob("*.tar")}
    (out / "index.json").unlink()  # as if killed while finishing
    (out / f"stats.json{TEMP_MARKER}123-abcd").write_text("partial")
    build_stage(str(manifest), str(out), resume=True, progress=False)
    assert tree(out) == reference_tree
    assert {p.name: p.stat().st_ino for p in out.glob("*.tar")} == before


def test_a_broken_shard_is_redone(
    reference: Path, reference_tree: dict[str, str], manifest: Path, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    shutil.copytree(reference, out)
    first = sorted(out.glob("*.tar"))[0]
    first.write_bytes(first.read_bytes()[:1000])  # truncated: the size no longer matches
    (out / STATE_DIR / "done" / f"{sorted(out.glob('*.tar'))[1].name}.json").unlink()
    build_stage(str(manifest), str(out), resume=True, progress=False)
    assert tree(out) == reference_tree


@pytest.mark.parametrize(("sent", "code"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_an_interrupted_build_says_how_to_resume_and_keeps_its_shards(
    sent: signal.Signals, code: int, manifest: Path, reference_tree: dict[str, str], tmp_path: Path
) -> None:
    """Ctrl-C or SIGTERM: one line naming the command that resumes (no traceback), exit
    130 / 143, finished shards kept; the resumed build is the uninterrupted one."""
    out = tmp_path / "out"
    args = ["build", str(manifest), "--out", str(out), "--workers", "2", "--quiet"]
    process = subprocess.Popen(
        [sys.executable, "-m", "pipelines", *args],
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # its own process group, as a build started from a terminal
        preexec_fn=_ctrl_c_default,  # pytest may run as a background job, which ignores Ctrl-C
    )
    try:
        assert _wait_for(lambda: KILL_POINTS["first_done"](out), process), "the build ended first"
        if sent == signal.SIGINT:  # Ctrl-C reaches the whole group: the pool workers too
            os.killpg(process.pid, sent)
        else:  # a scheduler's SIGTERM reaches the build process
            process.send_signal(sent)
        _, stderr = process.communicate(timeout=120)
    finally:
        process.kill()
    assert process.returncode == code
    assert "Traceback" not in stderr and len(stderr.strip().splitlines()) == 1
    assert f"lvita build {manifest} --out {out} --workers 2 --quiet --resume" in stderr
    assert any((out / STATE_DIR / "done").glob("*.json"))
    build_stage(str(manifest), str(out), resume=True, progress=False)
    assert tree(out) == reference_tree


SLOW_TASKS = """\
# Imported at start-up by every Python process of the test (PYTHONPATH): each local pool task
# sleeps first, so that the command is surely interrupted while its workers run.
import time

import lvita_data.pool as pool

_call = pool._call


def slow_call(fn, task):
    time.sleep(3)
    return _call(fn, task)


pool._call = slow_call
"""


@pytest.mark.parametrize(
    ("command", "sent", "code"), [("plan", signal.SIGINT, 130), ("verify", signal.SIGTERM, 143)]
)
def test_an_interrupted_plan_or_verify_ends_in_one_line(
    command: str, sent: signal.Signals, code: int, manifest: Path, reference: Path, tmp_path: Path
) -> None:
    """Ctrl-C (to the whole process group) or SIGTERM (to the command) while pool workers run:
    exit 130 / 143, one line with the command to run again, no traceback, no worker left."""
    psutil = pytest.importorskip("psutil")
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(SLOW_TASKS, encoding="utf-8")
    target = str(manifest) if command == "plan" else str(reference)
    args = [command, target, "--workers", "2", "--quiet"]
    process = subprocess.Popen(
        [sys.executable, "-m", "pipelines", *args],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": os.pathsep.join([str(hook), str(REPO)])},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
        preexec_fn=_ctrl_c_default,  # pytest may run as a background job, which ignores Ctrl-C
    )
    try:
        parent = psutil.Process(process.pid)
        assert _wait_for(lambda: len(parent.children()) >= 2, process), "no workers started"
        workers = parent.children(recursive=True)
        time.sleep(1.0)  # the workers are inside their (slow) first task
        if sent == signal.SIGINT:
            os.killpg(process.pid, sent)
        else:
            process.send_signal(sent)
        _, stderr = process.communicate(timeout=120)
    finally:
        process.kill()
    assert process.returncode == code, stderr
    assert "Traceback" not in stderr and len(stderr.strip().splitlines()) == 1, stderr
    what = "interrupted" if sent == signal.SIGINT else "terminated"
    assert f"lvita {command}: {what}" in stderr and f"lvita {shlex.join(args)}" in stderr
    _, alive = psutil.wait_procs(workers, timeout=10)
    assert not alive, f"workers outlived the command: {alive}"


def test_a_closed_pipe_ends_the_output_quietly(manifest: Path) -> None:
    process = subprocess.Popen(
        [sys.executable, "-m", "pipelines", "plan", str(manifest), "--quiet"],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    process.stdout.readline()
    process.stdout.close()  # like `lvita plan ... | head -1`
    stderr = process.stderr.read().decode()
    process.wait(timeout=120)
    assert "Traceback" not in stderr and "BrokenPipe" not in stderr
    assert process.returncode in (0, 141)  # 0 when it wrote everything before the close


def test_build_time_rejects_count_against_the_reject_rate(
    manifest: Path, reference_tree: dict[str, str], tmp_path: Path
) -> None:
    """Rejects found while building (a truncated JPEG) share one budget with the planner's:
    over ``rejects.max_rate`` the build fails with exit 4 after writing rejects.jsonl, naming an
    example; raising the limit, --resume finishes the same build without redoing a shard."""
    strict = tmp_path / "strict.yaml"
    text = manifest.read_text(encoding="utf-8")
    strict.write_text(text.replace("  max_rate: 0.6\n", "  max_rate: 0.3\n  min_selected: 1\n"))
    out = tmp_path / "out"
    failed = cli("build", str(strict), "--out", str(out), "--quiet")
    assert failed.returncode == 4, failed.stderr
    assert "dataset 'custom': 2 of 4 selected records rejected (50.0% > rejects.max_rate" in (
        failed.stderr
    )
    assert "truncated.jpg" in failed.stderr and str(out / "rejects.jsonl") in failed.stderr
    assert (out / "rejects.jsonl").exists() and not (out / "index.json").exists()
    shards = {p.name: p.stat().st_mtime_ns for p in out.glob("*.tar")}
    strict.write_text(text)  # the limit raised back: the same build, resumed
    build_stage(str(strict), str(out), resume=True, progress=False)
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("*.tar")} == shards
    assert {k: v for k, v in tree(out).items() if k != "manifest.yaml"} == {
        k: v for k, v in reference_tree.items() if k != "manifest.yaml"
    }


CRASHING_WORKER = """\
# Imported at start-up by every Python process of the test (PYTHONPATH): the build's pool
# workers are spawned, so a monkeypatch of the test process would not reach them.
import lvita_data.build.shard as shard

_encode, _calls = shard.encode_tiles, []


def crash_on_the_fifth_sample(tiles, fmt):
    _calls.append(fmt)
    if len(_calls) == 5:
        raise RuntimeError("decoder crashed")
    return _encode(tiles, fmt=fmt)


shard.encode_tiles = crash_on_the_fifth_sample
"""


@pytest.mark.parametrize("workers", [1, 2])
def test_a_failing_task_leaves_no_temporaries_and_resume_finishes(
    workers: int, manifest: Path, reference_tree: dict[str, str], tmp_path: Path, monkeypatch
) -> None:
    """A task that raises (not a counted reject) stops the build, in this process or in a pool
    worker, leaves no temporary file, and --resume then finishes the identical build."""
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(CRASHING_WORKER)
    out = tmp_path / "out"
    with monkeypatch.context() as patch:
        patch.setenv("PYTHONPATH", os.pathsep.join([str(hook), os.environ.get("PYTHONPATH", "")]))
        if workers == 1:  # in this process: install the same crash here
            namespace: dict = {}
            exec(compile(CRASHING_WORKER, "crashing_worker", "exec"), namespace)
            patch.setattr(
                "lvita_data.build.shard.encode_tiles", namespace["crash_on_the_fifth_sample"]
            )
        with pytest.raises(RuntimeError, match="decoder crashed"):
            build_stage(str(manifest), str(out), workers=workers, progress=False)
    assert not temporaries(out)
    assert not (out / "index.json").exists()
    build_stage(str(manifest), str(out), resume=True, progress=False)
    assert tree(out) == reference_tree


# --------------------------------------------------------------------------------------------
# refusals


def test_existing_build_needs_resume_and_the_same_manifest(
    reference: Path, reference_tree: dict[str, str], manifest: Path, demo_corpus, tmp_path: Path
) -> None:
    again = cli("build", str(manifest), "--out", str(reference), "--quiet")
    assert again.returncode == EXIT_BUILD
    assert "--resume" in again.stderr
    other = write_manifest(demo_corpus[0], manifest.parent, seed=12, name="other.yaml")
    resumed = cli("build", str(other), "--out", str(reference), "--resume", "--quiet")
    assert resumed.returncode == EXIT_BUILD
    assert "different manifest (differs in: seed)" in resumed.stderr
    # the same content at another path is the same build: its resume rewrites nothing
    elsewhere = manifest.parent / "copies" / "same.yaml"
    elsewhere.parent.mkdir(exist_ok=True)
    elsewhere.write_text(manifest.read_text(encoding="utf-8"), encoding="utf-8")
    copy = tmp_path / "copy"
    shutil.copytree(reference, copy)
    build_stage(str(elsewhere), str(copy), resume=True, progress=False)
    assert {k: v for k, v in tree(copy).items() if k != "manifest.yaml"} == {
        k: v for k, v in reference_tree.items() if k != "manifest.yaml"
    }
    assert tree(reference) == reference_tree


def test_a_build_started_in_an_older_shard_format_is_refused_on_resume(
    reference: Path, manifest: Path, tmp_path: Path
) -> None:
    """The same manifest, but the saved state says an older lvita wrote shard format 2 there:
    the refusal says so (not "a different manifest" with no key that differs)."""
    from lvita_data.build.identity import build_identity
    from lvita_data.manifest import load_manifest

    out = tmp_path / "out"
    shutil.copytree(reference, out)
    plan_path = out / STATE_DIR / "plan.json"
    saved = json.loads(plan_path.read_text(encoding="utf-8"))
    identity = build_identity(load_manifest(str(manifest)))
    saved["format"] = 2
    saved["manifest_sha256"] = hashlib.sha256(
        json.dumps([identity, 2], sort_keys=True).encode()
    ).hexdigest()
    write_json_atomic(str(plan_path), saved, indent=None)
    with pytest.raises(BuildError, match=r"shard format 2, this one writes format 3: use a new"):
        build_stage(str(manifest), str(out), resume=True, progress=False)


def test_changed_data_is_refused_on_resume(reference: Path, manifest: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    shutil.copytree(reference, out)
    plan_path = out / STATE_DIR / "plan.json"
    saved = json.loads(plan_path.read_text(encoding="utf-8"))
    saved["inputs"][0][2] = "0" * 64  # a record file changed since: the stage is planned again
    saved["layout_sha256"] = "0" * 64  # and the planner gives another layout: other data
    write_json_atomic(str(plan_path), saved, indent=None)
    with pytest.raises(BuildError, match="different data"):
        build_stage(str(manifest), str(out), resume=True, progress=False)


def test_resume_reuses_the_saved_plan_while_the_record_files_are_unchanged(
    reference: Path, reference_tree: dict[str, str], manifest: Path, tmp_path: Path, monkeypatch
) -> None:
    import lvita_data.build.run as build

    out = tmp_path / "out"
    shutil.copytree(reference, out)
    for name in ("index.json", "stats.json"):  # unfinished: two shards left to write
        (out / name).unlink()
    shards = sorted(p for p in out.glob("*.tar"))
    for shard in shards[:2]:
        shard.unlink()
    calls = []
    real_plan_stage = build.plan_stage
    monkeypatch.setattr(
        build, "plan_stage", lambda *a, **k: calls.append(1) or real_plan_stage(*a, **k)
    )
    build_stage(str(manifest), str(out), resume=True, progress=False)
    assert calls == [] and tree(out) == reference_tree  # no planning pass, same bytes
    # a record file rewritten with the same content (new mtime) is the same input
    saved = json.loads((out / STATE_DIR / "plan.json").read_text(encoding="utf-8"))
    source = Path(saved["inputs"][0][0])
    source.write_bytes(source.read_bytes())
    shards[0].unlink()
    build_stage(str(manifest), str(out), resume=True, progress=False)
    assert calls == [] and tree(out) == reference_tree


def test_foreign_directory_is_refused(manifest: Path, tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(BuildError, match="not empty"):
        build_stage(str(manifest), str(tmp_path), progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]
    with pytest.raises(BuildError, match="unknown executor"):
        build_stage(str(manifest), str(tmp_path / "x"), executor="spark", progress=False)


def test_a_second_build_into_the_same_directory_is_refused(
    reference: Path, manifest: Path, tmp_path: Path, monkeypatch
) -> None:
    import lvita_data.build.run as build

    out = tmp_path / "out"
    shutil.copytree(reference, out)
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import fcntl, os, sys, time; fd = os.open(sys.argv[1], os.O_RDWR); "
            "fcntl.lockf(fd, fcntl.LOCK_EX); print('locked', flush=True); time.sleep(60)",
            str(out / STATE_DIR / "lock"),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        monkeypatch.setattr(build, "LOCK_WAIT_S", 0.3)
        with pytest.raises(BuildError, match="another lvita build"):
            build_stage(str(manifest), str(out), resume=True, progress=False)
    finally:
        holder.kill()
        holder.wait()


# --------------------------------------------------------------------------------------------
# the shard writer


def _samples(n: int):
    for i in range(n):
        yield {"__key__": f"{i:09d}", "b.npy": bytes([i]) * 700, "a.json": b"{}"}


def test_write_shard_is_reproducible_and_hashes_what_it_wrote(tmp_path: Path) -> None:
    first, second = tmp_path / "a.tar", tmp_path / "b.tar"
    info = write_shard(str(first), _samples(3), real_tokens=7)
    write_shard(str(second), _samples(3))
    assert first.read_bytes() == second.read_bytes()
    assert (info.name, info.samples, info.tokens) == ("a.tar", 3, 7)
    assert info.bytes == first.stat().st_size
    assert info.sha256 == hashlib.sha256(first.read_bytes()).hexdigest()
    with tarfile.open(fileobj=io.BytesIO(first.read_bytes())) as tar:
        assert tar.getnames()[:2] == ["000000000.a.json", "000000000.b.npy"]
    assert not temporaries(tmp_path)


def test_write_shard_failure_leaves_nothing(tmp_path: Path) -> None:
    def failing():
        yield from _samples(2)
        raise RuntimeError("decoder crashed")

    with pytest.raises(RuntimeError):
        write_shard(str(tmp_path / "s.tar"), failing())
    assert list(tmp_path.iterdir()) == []


def test_tar_bytes_are_webdatasets(tmp_path: Path) -> None:
    wds = pytest.importorskip("webdataset")
    ours = tmp_path / "ours.tar"
    write_shard(str(ours), _samples(5))
    buffer = io.BytesIO()
    writer = wds.TarWriter(buffer, user="", group="", mode=0o444, mtime=0.0, encoder=False)
    for sample in _samples(5):
        writer.write(sample)
    writer.close()
    assert ours.read_bytes() == buffer.getvalue()


def test_remove_temporaries(tmp_path: Path) -> None:
    (tmp_path / "sub").mkdir()
    (tmp_path / f"x.tar{TEMP_MARKER}1-ab").write_bytes(b"")
    (tmp_path / "sub" / f"y.json{TEMP_MARKER}2-cd").write_bytes(b"")
    (tmp_path / "keep.tar").write_bytes(b"")
    assert remove_temporaries(str(tmp_path)) == 2
    assert [p.name for p in tmp_path.rglob("*") if p.is_file()] == ["keep.tar"]


# --------------------------------------------------------------------------------------------
# lvita build --plan: a plan file of the same manifest and record files, reused


@pytest.fixture(scope="module")
def plan_file(manifest: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from lvita_data.build.plan import plan_stage
    from lvita_data.manifest import load_manifest

    path = tmp_path_factory.mktemp("plan_file") / "plan.json"
    plan_stage(load_manifest(str(manifest)), progress=False).write_json(str(path))
    return path


def _no_planning(monkeypatch) -> None:
    import lvita_data.build.run as build

    def refuse(*args, **kwargs):
        raise AssertionError("planned again although a plan file was given")

    monkeypatch.setattr(build, "plan_stage", refuse)


def test_build_from_a_plan_file_is_byte_identical(
    manifest: Path, plan_file: Path, reference_tree: dict[str, str], tmp_path: Path, monkeypatch
) -> None:
    header = json.loads(plan_file.read_text(encoding="utf-8"))
    assert {"manifest_sha256", "build_identity", "format", "inputs", "columns_sha256"} <= set(
        header
    )
    assert len(header["samples"]["offset"]) == header["num_samples"] > 0
    _no_planning(monkeypatch)
    out = tmp_path / "out"
    build_stage(str(manifest), str(out), plan=str(plan_file), progress=False)
    assert tree(out) == reference_tree
    # the same plan re-indented (say by jq) is read the same
    from lvita_data.build.identity import input_identity
    from lvita_data.build.planfile import read_plan_file
    from lvita_data.manifest import load_manifest

    pretty = tmp_path / "pretty.json"
    pretty.write_text(json.dumps(header, indent=1), encoding="utf-8")
    loaded = load_manifest(str(manifest))
    read = read_plan_file(str(pretty), loaded, inputs=input_identity(loaded), verify_media=False)
    assert read.columns_sha256() == header["columns_sha256"]


def test_resume_with_a_plan_file_keeps_the_saved_plan_or_refuses_another(
    reference: Path, reference_tree: dict[str, str], manifest: Path, plan_file: Path, tmp_path
) -> None:
    out = tmp_path / "out"
    shutil.copytree(reference, out)
    (out / "index.json").unlink()
    sorted(out.glob("*.tar"))[0].unlink()
    build_stage(str(manifest), str(out), resume=True, plan=str(plan_file), progress=False)
    assert tree(out) == reference_tree
    state = out / STATE_DIR / "plan.json"
    saved = json.loads(state.read_text(encoding="utf-8"))
    saved["layout_sha256"] = "0" * 64  # the saved build plan is not the one the file gives
    write_json_atomic(str(state), saved, indent=None)
    with pytest.raises(BuildError, match="another build plan than plan file"):
        build_stage(str(manifest), str(out), resume=True, plan=str(plan_file), progress=False)


def _edited(plan_file: Path, tmp_path: Path, edit) -> Path:
    payload = json.loads(plan_file.read_text(encoding="utf-8"))
    edit(payload)
    path = tmp_path / "edited.json"
    path.write_text(json.dumps(payload, separators=(",", ":")), encoding="utf-8")
    return path


def test_a_plan_of_another_manifest_or_of_changed_files_is_refused(
    demo_corpus, manifest: Path, plan_file: Path, tmp_path: Path
) -> None:
    def other_seed(payload: dict) -> None:
        payload["build_identity"]["seed"] = 12
        payload["manifest_sha256"] = "0" * 64

    edited = _edited(plan_file, tmp_path, other_seed)
    with pytest.raises(BuildError, match=r"different manifest \(differs in: seed\)"):
        build_stage(str(manifest), str(tmp_path / "a"), plan=str(edited), progress=False)
    # a record file changed after planning (its own manifest: the shared one's files stay)
    from lvita_data.build.plan import plan_stage
    from lvita_data.manifest import load_manifest

    own = write_manifest(demo_corpus[0], tmp_path)
    plan_path = tmp_path / "own.json"
    plan_stage(load_manifest(str(own)), progress=False).write_json(str(plan_path))
    with (tmp_path / "custom.jsonl").open("a", encoding="utf-8") as handle:
        handle.write(_row("images/img_2x1.jpg", "One more.") + "\n")
    with pytest.raises(BuildError, match=r"record files changed .*custom\.jsonl"):
        build_stage(str(own), str(tmp_path / "b"), plan=str(plan_path), progress=False)


def _set_first(column: str, value):
    return lambda p: p["samples"][column].__setitem__(0, value)


DAMAGES = {
    "truncated": lambda text: text[: len(text) // 2],
    "one byte short": lambda text: text[:-1],
    "empty": lambda text: "",
    "not json": lambda text: "plan: yes\n",
    "a list": lambda text: "[1, 2]",
    "trailing data": lambda text: text + "{}",
    "sample count a string": lambda text: text.replace('"num_samples":', '"num_samples":"1', 1),
}
EDITS = {
    "file index out of range": ("samples.file", _set_first("file", 99)),
    "record out of range": ("samples.record", _set_first("record", "999999")),
    "record a number": ("samples.record", _set_first("record", 0)),
    "negative length": ("samples.length", _set_first("length", -3)),
    "float tiles": ("samples.tiles", _set_first("tiles", 1.5)),
    "unknown modality": ("samples.modality", _set_first("modality", "audio")),
    "offset past the file": ("samples.offset", _set_first("offset", 1 << 40)),
    "a column missing": ("samples.frames", lambda p: p["samples"].pop("frames")),
    "one value too many": ("samples.length", lambda p: p["samples"]["length"].append(5)),
    "files not a list": ("files", lambda p: p.__setitem__("files", 3)),
    "inputs not a list": ("record files changed", lambda p: p.__setitem__("inputs", {"a": 1})),
    "a reject of another file": ("rejects[0]", lambda p: p["rejects"][0].update(file="/x")),
    "a reject too many": ("rejects", lambda p: p["rejects"].append(p["rejects"][0])),
    "a changed length": ("columns_sha256", _set_first("length", 7)),
    "report counts": ("datasets[0]", lambda p: p["datasets"][0].update(tokens=1)),
    "reports not objects": ("datasets[1]", lambda p: p["datasets"].__setitem__(1, [])),
}


@pytest.mark.parametrize("damage", [*DAMAGES, *EDITS])
def test_a_damaged_plan_file_is_one_line_naming_the_field(
    manifest: Path, plan_file: Path, tmp_path: Path, damage: str
) -> None:
    if damage in DAMAGES:
        path = tmp_path / "damaged.json"
        path.write_text(DAMAGES[damage](plan_file.read_text(encoding="utf-8")), encoding="utf-8")
        field = "plan file"
    else:
        field, edit = EDITS[damage]
        path = _edited(plan_file, tmp_path, edit)
    with pytest.raises(BuildError) as raised:
        build_stage(str(manifest), str(tmp_path / "out"), plan=str(path), progress=False)
    message = str(raised.value)
    assert str(path) in message and field in message and "\n" not in message


def test_cli_build_with_a_plan_and_its_exit_codes(
    demo_corpus, manifest: Path, reference_tree: dict[str, str], tmp_path: Path
) -> None:
    plan_path = tmp_path / "plan.json"
    planned = cli("plan", str(manifest), "--out", str(plan_path), "--quiet")
    assert planned.returncode == 0, planned.stderr
    built = cli("build", str(manifest), "--out", str(tmp_path / "out"), "--plan", str(plan_path))
    assert built.returncode == 0, built.stderr
    assert tree(tmp_path / "out") == reference_tree
    other = write_manifest(demo_corpus[0], manifest.parent, seed=12, name="other.yaml")
    refused = cli("build", str(other), "--out", str(tmp_path / "o"), "--plan", str(plan_path))
    assert refused.returncode == EXIT_BUILD and "differs in: seed" in refused.stderr
    broken = tmp_path / "broken.json"
    broken.write_bytes(plan_path.read_bytes()[:-5])
    damaged = cli("build", str(manifest), "--out", str(tmp_path / "d"), "--plan", str(broken))
    assert damaged.returncode == EXIT_BUILD and "Traceback" not in damaged.stderr
    assert len(damaged.stderr.strip().splitlines()) == 1 and str(broken) in damaged.stderr
    missing = cli("build", str(manifest), "--out", str(tmp_path / "m"), "--plan", "/nonexistent")
    assert missing.returncode == EXIT_BUILD and "unreadable" in missing.stderr


def test_an_unreadable_record_file_is_a_missing_input(manifest: Path, monkeypatch) -> None:
    """Hashing the inputs (the identity a resume and `--plan` check) names a record file it
    cannot read, as planning does (exit 3), instead of an OSError traceback."""
    import lvita_data.build.identity as identity
    from lvita_data.manifest import load_manifest

    def unreadable(path: str) -> str:
        raise PermissionError(13, "Permission denied", path)

    monkeypatch.setattr(identity, "sha256_file", unreadable)
    with pytest.raises(MissingInputs, match=r"could not be read:\n.*Permission denied"):
        identity.input_identity(load_manifest(str(manifest)))
