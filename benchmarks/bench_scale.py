"""Scale: time and memory of `lvita plan` and `lvita build` from 125K to 2M selected samples.

Generates one synthetic Long-VITA-like corpus (JSON Lines in the native `longvita_jsonl` format,
`--rows-per-file` rows per file) whose records reference a pool of `--images` real JPEGs of
COCO-like sizes (so media stay small on disk) and a few tiny videos: 65% single-image captions (a
third multi-turn), 10% multi-image (2-3 images), 25% text-only, 1 in 5,000 a video. Stage N
selects the first N / rows-per-file files. For each N it runs, in a fresh process each:

  plan   `lvita plan M --out plan.json --workers W`
  build  `lvita build M --out DIR --workers W` (format 2: images stored as source bytes, so the
         build copies JPEG bytes instead of decoding pixels; video frames are decoded and tiled)

and records wall time, CPU time (the process and every worker), peak RSS of the coordinator and
of the largest worker (VmHWM, polled from /proc), the most open files, the plan JSON's size and
the size of `.lvita-build/`. `--resume-at N` also kills that build with SIGKILL when about half
of its shards are done and times `--resume` against the uninterrupted build (same index.json
required). The fit: per-sample cost and coordinator bytes per sample (least squares over N),
extrapolated to 17M samples.

    python benchmarks/bench_scale.py --workdir /tmp/scale [--sizes 125000,250000,...]
        [--workers 2] [--resume-at 1000000] [--out benchmarks/results/scale.md]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import resource
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from datetime import date
from pathlib import Path

import numpy as np
import orjson
import psutil
from PIL import Image
from synthetic_text import PROMPTS, WORDS  # this folder: the records bench_plan writes too

COCO_SIZES = [
    (640, 480),
    (480, 640),
    (640, 427),
    (427, 640),
    (500, 375),
    (375, 500),
    (640, 360),
    (612, 612),
    (640, 512),
    (334, 500),
]
TARGET_SAMPLES = 17_000_000
POLL_S = 0.05


def smooth_jpeg(rng: np.random.Generator, width: int, height: int) -> bytes:
    """A low-detail picture of the given size (a few KB: the scale run copies bytes, it does
    not measure pixel work)."""
    coarse = rng.integers(0, 256, size=(3, 4, 3)).astype(np.uint8)
    image = Image.fromarray(coarse).resize((width, height), Image.BILINEAR)
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=60)
    return buffer.getvalue()


def tiny_video(path: Path, seed: int) -> None:
    import av

    rng = np.random.default_rng(seed)
    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=8)
        stream.width, stream.height, stream.pix_fmt = 64, 64, "yuv420p"
        for _ in range(24):  # 3 s at 8 fps
            frame = rng.integers(0, 256, size=(64, 64, 3), dtype=np.uint8)
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())


def sentence(rng: np.random.Generator, low: int, high: int) -> str:
    words = rng.choice(WORDS, size=int(rng.integers(low, high + 1)))
    return " ".join(words).capitalize() + "."


def record(rng: np.random.Generator, index: int, images: int, videos: int) -> bytes:
    kind = rng.random()
    pictures: list[str] = []
    clips: list[str] = []
    if index % 5000 == 4999:
        clips = [f"videos/clip{index % videos}.mp4"]
        prompt = "<video>\nWhat happens in the video?"
    elif kind < 0.65:
        pictures = [f"images/img{int(rng.integers(images)):04d}.jpg"]
        prompt = f"<image>\n{PROMPTS[index % len(PROMPTS)]}"
    elif kind < 0.75:
        count = int(rng.integers(2, 4))
        pictures = [f"images/img{int(i):04d}.jpg" for i in rng.integers(images, size=count)]
        prompt = "<image>" * count + "\nCompare the pictures."
    else:
        prompt = sentence(rng, 8, 30)
    messages = [
        {"role": "user", "content": prompt},
        {"role": "assistant", "content": sentence(rng, 20, 60)},
    ]
    if index % 3 == 0:
        messages += [
            {"role": "user", "content": "And what else?"},
            {"role": "assistant", "content": sentence(rng, 10, 30)},
        ]
    return orjson.dumps({"messages": messages, "images": pictures, "videos": clips})


def make_corpus(root: Path, files: int, rows_per_file: int, images: int) -> None:
    """Media pool + `files` JSONL files (skipped when already there: generation is seeded)."""
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "videos").mkdir(exist_ok=True)
    (root / "data").mkdir(exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(images):
        path = root / "images" / f"img{i:04d}.jpg"
        width, height = COCO_SIZES[i % len(COCO_SIZES)]
        data = smooth_jpeg(rng, width, height)
        if not path.exists():
            path.write_bytes(data)
    for i in range(4):
        if not (root / "videos" / f"clip{i}.mp4").exists():
            tiny_video(root / "videos" / f"clip{i}.mp4", i)
    for k in range(files):
        path = root / "data" / f"part-{k:05d}.jsonl"
        if path.exists():
            continue
        rng = np.random.default_rng(1000 + k)
        lines = [record(rng, k * rows_per_file + i, images, 4) for i in range(rows_per_file)]
        partial = path.with_suffix(".partial")
        partial.write_bytes(b"\n".join(lines) + b"\n")
        partial.rename(path)


def write_manifest(root: Path, files: int, path: Path) -> None:
    listing = "\n".join(f"      - {root}/data/part-{k:05d}.jsonl" for k in range(files))
    path.write_text(
        f"""schema_version: 1
stage: scale
seed: 7
tokenizer: qwen2.5
pack:
  max_seq_len: 16384
  reset_attention: true
  group_by: none
image:
  max_tiles: 12
video:
  max_frames: 16
rejects:
  max_rate: 0.01
datasets:
  - name: scale
    format: longvita_jsonl
    media_root: {root}
    path:
{listing}
""",
        encoding="utf-8",
    )


@dataclass
class Run:
    """What one command cost."""

    wall_s: float = 0.0
    cpu_s: float = 0.0
    coordinator_rss: int = 0
    worker_rss: int = 0
    open_files: int = 0
    returncode: int = 0


def _hwm(process: psutil.Process) -> int:
    """Peak resident set (VmHWM) of a live process, in bytes (0 when it is gone)."""
    try:
        with open(f"/proc/{process.pid}/status", encoding="ascii") as handle:
            for line in handle:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def measure(command: list[str], *, kill_when=None) -> Run:
    """Run `command` in its own process group and poll it and its children until it exits
    (or `kill_when()` is true: then the whole group gets SIGKILL)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    child = subprocess.Popen(command, start_new_session=True, stdout=subprocess.DEVNULL)
    parent = psutil.Process(child.pid)
    run = Run()
    while child.poll() is None:
        run.coordinator_rss = max(run.coordinator_rss, _hwm(parent))
        try:
            workers = parent.children(recursive=True)
            run.open_files = max(run.open_files, parent.num_fds())
        except psutil.Error:
            workers = []
        for worker in workers:
            run.worker_rss = max(run.worker_rss, _hwm(worker))
        if kill_when is not None and kill_when():
            os.killpg(child.pid, signal.SIGKILL)
            child.wait()
            break
        time.sleep(POLL_S)
    run.wall_s = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    run.cpu_s = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    run.returncode = child.returncode
    return run


def tree_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def lvita(*args: str) -> list[str]:
    return [str(Path(sys.executable).parent / "lvita"), *args, "--quiet"]


def scale_point(root: Path, n: int, rows_per_file: int, workers: int) -> dict:
    files = n // rows_per_file
    manifest = root / f"stage-{n}.yaml"
    write_manifest(root, files, manifest)
    plan_json = root / f"plan-{n}.json"
    plan = measure(lvita("plan", str(manifest), "--out", str(plan_json), "--workers", str(workers)))
    out = root / f"build-{n}"
    shutil.rmtree(out, ignore_errors=True)
    build = measure(lvita("build", str(manifest), "--out", str(out), "--workers", str(workers)))
    index = json.loads((out / "index.json").read_text())
    point = {
        "n": n,
        "files": files,
        "plan": asdict(plan),
        "build": asdict(build),
        "plan_json_bytes": plan_json.stat().st_size,
        "state_dir_bytes": tree_bytes(out / ".lvita-build"),
        "shards": len(index["shards"]),
        "packed_samples": sum(s["samples"] for s in index["shards"]),
        "shard_bytes": sum(s["bytes"] for s in index["shards"]),
    }
    plan_json.unlink()
    return point


def resume_point(root: Path, n: int, workers: int) -> dict:
    """Kill the build of stage `n` at about half its shards, then time `--resume`."""
    manifest = root / f"stage-{n}.yaml"
    full = root / f"build-{n}"
    expected = json.loads((full / "index.json").read_text())
    half = len(expected["shards"]) // 2
    out = root / f"resume-{n}"
    shutil.rmtree(out, ignore_errors=True)
    done = out / ".lvita-build" / "done"

    def half_done() -> bool:
        return done.is_dir() and sum(1 for _ in done.iterdir()) >= half

    command = lvita("build", str(manifest), "--out", str(out), "--workers", str(workers))
    killed = measure(command, kill_when=half_done)
    finished_before = sum(1 for _ in done.iterdir())
    resumed = measure([*command, "--resume"])
    same = json.loads((out / "index.json").read_text()) == expected
    shutil.rmtree(out)
    return {
        "n": n,
        "shards": len(expected["shards"]),
        "finished_before_kill": finished_before,
        "killed": asdict(killed),
        "resume": asdict(resumed),
        "identical_index": same,
    }


def fit(points: list[dict], phase: str, key: str) -> tuple[float, float]:
    """Least-squares (slope per sample, intercept) of `phase.key` over N."""
    n = np.array([p["n"] for p in points], dtype=np.float64)
    y = np.array([p[phase][key] for p in points], dtype=np.float64)
    slope, intercept = np.polyfit(n, y, 1)
    return float(slope), float(intercept)


def report(points: list[dict], resume: dict | None, workers: int) -> str:
    mib = 1 << 20
    lines = [
        f"{date.today()}, {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} vCPU, Python {platform.python_version()}, --workers {workers}",
        "",
        "| N selected | phase | wall s | CPU s | CPU us/sample | coordinator peak RSS MiB | "
        "worker peak RSS MiB | open files | plan JSON MiB | .lvita-build MiB |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for p in points:
        for phase in ("plan", "build"):
            r = p[phase]
            lines.append(
                f"| {p['n']:,} | {phase} | {r['wall_s']:.1f} | {r['cpu_s']:.1f} | "
                f"{1e6 * r['cpu_s'] / p['n']:.0f} | {r['coordinator_rss'] / mib:.0f} | "
                f"{r['worker_rss'] / mib:.0f} | {r['open_files']} | "
                + (f"{p['plan_json_bytes'] / mib:.1f} | |" if phase == "plan" else "")
                + (f" | {p['state_dir_bytes'] / mib:.1f} |" if phase == "build" else "")
            )
    lines.append("")
    for phase in ("plan", "build"):
        rss_slope, rss_base = fit(points, phase, "coordinator_rss")
        cpu_slope, cpu_base = fit(points, phase, "cpu_s")
        wall_slope, wall_base = fit(points, phase, "wall_s")
        first, last = points[0], points[-1]
        ratio = (last[phase]["cpu_s"] / last["n"]) / (first[phase]["cpu_s"] / first["n"])
        lines.append(
            f"- {phase}: coordinator {rss_slope:.0f} B/sample beyond a base of "
            f"{rss_base / mib:.0f} MiB -> {(rss_base + rss_slope * TARGET_SAMPLES) / 2**30:.1f} "
            f"GiB at 17M; CPU {1e6 * cpu_slope:.0f} us/sample -> "
            f"{(cpu_base + cpu_slope * TARGET_SAMPLES) / 3600:.1f} core-hours at 17M, wall "
            f"{(wall_base + wall_slope * TARGET_SAMPLES) / 3600:.1f} h with {workers} workers; "
            f"per-sample CPU at {last['n']:,} / at {first['n']:,} = {ratio:.2f}"
        )
    if resume:
        full = next(p for p in points if p["n"] == resume["n"])["build"]
        lines.append(
            f"- resume at {resume['n']:,}: killed (SIGKILL) with {resume['finished_before_kill']}"
            f" of {resume['shards']} shards done after {resume['killed']['wall_s']:.0f} s; "
            f"`--resume` took {resume['resume']['wall_s']:.0f} s wall / "
            f"{resume['resume']['cpu_s']:.0f} s CPU (uninterrupted build: {full['wall_s']:.0f} s /"
            f" {full['cpu_s']:.0f} s); index.json identical: {resume['identical_index']}"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workdir", type=Path, required=True)
    parser.add_argument("--sizes", default="125000,250000,500000,1000000,2000000")
    parser.add_argument("--rows-per-file", type=int, default=25_000)
    parser.add_argument("--images", type=int, default=300)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--resume-at", type=int, default=0)
    parser.add_argument("--keep", action="store_true", help="keep the builds")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    root = args.workdir.resolve()
    make_corpus(root, max(sizes) // args.rows_per_file, args.rows_per_file, args.images)
    points = []
    for n in sizes:
        points.append(scale_point(root, n, args.rows_per_file, args.workers))
        print(json.dumps(points[-1]), flush=True)
        if n != args.resume_at and not args.keep:
            shutil.rmtree(root / f"build-{n}")
    resume = resume_point(root, args.resume_at, args.workers) if args.resume_at else None
    if resume:
        print(json.dumps(resume), flush=True)
    text = report(points, resume, args.workers)
    print(text)
    if args.out:
        args.out.write_text(text, encoding="utf-8")
        args.out.with_suffix(".json").write_text(
            json.dumps({"points": points, "resume": resume}, indent=1), encoding="utf-8"
        )


if __name__ == "__main__":
    main()
