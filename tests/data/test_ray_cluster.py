"""`lvita build --executor ray` on a real Ray cluster (issue 11): two nodes of 1 CPU on this
machine, started with ``ray start --head`` and ``ray start --address=...`` (tests/data/
ray_cluster.py), the build run as a user runs it, ``RAY_ADDRESS=... lvita build``.

The shards come out byte-identical to the local executor's, with shards written on both nodes;
a Ray worker killed with SIGKILL while it writes a shard is retried by Ray (``max_retries``) and
the output is still identical, its temporary file removed; the driver killed with SIGKILL after
some shards finished stops the cluster's work on the build, and ``--resume`` gives the identical
directory without rewriting the finished shards.

Skipped only where Ray is not installed (``pip install 'lvita[ray]'``).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("ray", reason="Ray is not installed: pip install 'lvita[ray]'")
psutil = pytest.importorskip("psutil")

from build_tree import temporaries, tree  # noqa: E402
from ray_cluster import RayCluster  # noqa: E402 (after the skip: it needs psutil)

from lvita_data.fileio import TEMP_MARKER  # noqa: E402

pytestmark = [pytest.mark.cluster, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]
STATE_DIR = ".lvita-build"

MANIFEST = """\
schema_version: 1
stage: cluster
seed: 7
tokenizer: qwen2.5
pack:
  max_seq_len: 2048
  reset_attention: true
  group_by: none
  align: 2
shards:
  packs_per_shard: 1
video:
  max_frames: 4
  max_fps: 1.0
datasets:
  - name: captions
    format: longvita_jsonl
    path: {root}/longvita/image_caption.jsonl
    media_root: {root}/longvita
    max_samples: 12
  - name: chartqa
    format: hf_parquet
    path: {root}/cauldron/chartqa-00000-of-00001.parquet
    max_samples: 3
  - name: chat
    format: text_jsonl
    path: {root}/text/short_chat.jsonl
    max_samples: 10
  - name: video
    format: longvita_jsonl
    path: {root}/longvita/video_qa.jsonl
    media_root: {root}/longvita
    max_samples: 3
"""


def build_args(manifest: Path, out: Path, executor: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "pipelines",  # the `lvita` command
        "build",
        str(manifest),
        "--out",
        str(out),
        "--executor",
        executor,
        "--workers",
        "2",
        "--quiet",
    ]


def run_build(args: list[str], env: dict[str, str], cwd: Path = REPO) -> None:
    done = subprocess.run(args, env=env, cwd=cwd, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]


@pytest.fixture(scope="module")
def manifest(demo_corpus, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("cluster_manifest") / "cluster.yaml"
    path.write_text(MANIFEST.format(root=demo_corpus[0]), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def reference(manifest: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """The tree of the same build with the local executor."""
    out = tmp_path_factory.mktemp("cluster_reference") / "out"
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
    run_build(build_args(manifest, out, "local"), env)
    assert len(list(out.glob("*.tar"))) >= 8  # several shards for each node
    return tree(out)


@pytest.fixture(scope="module")
def cluster() -> RayCluster:
    cluster = RayCluster.start(nodes=2)
    try:
        yield cluster
    finally:
        cluster.stop()
        assert not cluster.processes(), "the cluster's processes outlived its stop"


@pytest.fixture
def hook(cluster: RayCluster) -> Path:
    """The cluster's hook directory, reset: no shard calls seen, no delay."""
    (cluster.hook / "calls.jsonl").write_text("")
    (cluster.hook / "delay").unlink(missing_ok=True)
    yield cluster.hook
    (cluster.hook / "delay").unlink(missing_ok=True)


def calls(hook: Path) -> list[dict]:
    """The shard writes the cluster's workers started, in order (see ray_cluster.HOOK)."""
    text = (hook / "calls.jsonl").read_text(encoding="utf-8")
    return [json.loads(line) for line in text.split("\n")[:-1]]  # whole lines only


def wait_for(predicate, process: subprocess.Popen, what: str, timeout: float = 120.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := predicate():
            return value
        if process.poll() is not None:
            raise AssertionError(f"the build ended ({process.returncode}) before {what}")
        time.sleep(0.01)
    raise AssertionError(f"no {what} within {timeout} s")


def test_cluster_build_matches_local(
    cluster: RayCluster, hook: Path, manifest: Path, reference: dict[str, str], tmp_path: Path
) -> None:
    """Also with a relative --out: the tasks work in the driver's directory (lvita_data.pool),
    not in the one `ray start` ran in."""
    (hook / "delay").write_text("0.2")  # every shard a little work: both nodes get some
    run_build(build_args(manifest, Path("out"), "ray"), cluster.env, cwd=tmp_path)
    assert tree(tmp_path / "out") == reference
    seen = calls(hook)
    assert sorted(c["shard"] for c in seen) == sorted(p for p in reference if p.endswith(".tar"))
    assert len({c["node"] for c in seen}) == 2, "the shards were not written on both nodes"


def test_a_killed_worker_is_retried(
    cluster: RayCluster, hook: Path, manifest: Path, reference: dict[str, str], tmp_path: Path
) -> None:
    """SIGKILL to the Ray worker writing the first shard, mid-write (its temporary file exists):
    Ray runs the task again (max_retries), the build finishes with the identical output and the
    killed task's temporary file is gone."""
    (hook / "delay").write_text("1.0")
    out = tmp_path / "out"
    process = subprocess.Popen(
        build_args(manifest, out, "ray"),
        env=cluster.env,
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        first = wait_for(lambda: calls(hook)[:1], process, "a shard task started")[0]
        victim = psutil.Process(first["pid"])
        assert "".join(victim.cmdline()).startswith("ray::build_shard")  # a Ray worker's title
        assert list(out.glob(f"{first['shard']}{TEMP_MARKER}{victim.pid}-*")), "not mid-write"
        victim.send_signal(signal.SIGKILL)
        (hook / "delay").unlink()
        _, stderr = process.communicate(timeout=240)
    finally:
        process.kill()
    assert process.returncode == 0, stderr[-3000:]
    assert tree(out) == reference
    assert not temporaries(out)
    again = [c for c in calls(hook) if c["shard"] == first["shard"]]
    assert len(again) == 2 and again[1]["pid"] != victim.pid, again  # retried by Ray


def test_a_killed_driver_resumes_to_the_identical_directory(
    cluster: RayCluster, hook: Path, manifest: Path, reference: dict[str, str], tmp_path: Path
) -> None:
    """SIGKILL to `lvita build` (the Ray driver) once some shards are finished: Ray ends the
    job's tasks, and `lvita build --resume` on the cluster finishes the identical directory
    without writing the finished shards again."""
    (hook / "delay").write_text("0.5")
    out = tmp_path / "out"
    args = build_args(manifest, out, "ray")
    process = subprocess.Popen(
        args, env=cluster.env, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        wait_for(lambda: any((out / STATE_DIR / "done").glob("*.json")), process, "a shard done")
        process.send_signal(signal.SIGKILL)
    finally:
        process.kill()
        process.wait(timeout=60)
    kept = {}
    for record in (out / STATE_DIR / "done").glob("*.json"):
        stat = (out / record.name.removesuffix(".json")).stat()
        kept[record.name.removesuffix(".json")] = (stat.st_ino, stat.st_mtime_ns)
    assert 0 < len(kept) < len([p for p in reference if p.endswith(".tar")])
    deadline = time.monotonic() + 30
    while running := cluster.titled("ray::build_shard"):  # Ray ends a dead driver's tasks
        assert time.monotonic() < deadline, f"shard tasks outlived their driver: {running}"
        time.sleep(0.1)

    (hook / "delay").unlink()
    run_build([*args, "--resume"], cluster.env)
    assert tree(out) == reference
    assert not temporaries(out)
    for name, identity in kept.items():  # finished shards were not written again
        stat = (out / name).stat()
        assert (stat.st_ino, stat.st_mtime_ns) == identity, name
