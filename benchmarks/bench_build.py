"""Build throughput: samples/s per core of `lvita build` on an image mix vs a pixel-only floor.

Writes N JPEG photos-like images of varied sizes (grids 1x1 .. 4x3, 1 to 13 tiles with the
thumbnail), one Long-VITA JSONL record per image (caption or QA, some multi-turn) and a stage
manifest (max_seq_len 16384, group_by none, 16 packs per shard, PNG tiles) in a work directory.
Then, on one core (RAYON_NUM_THREADS=1, TOKENIZERS_PARALLELISM=false), alternating per
repetition:

  1. floor: one loop over the same images in record order: read the file's bytes, decode them
     (`Image.open` + `load`, RGB), choose the grid and cut the tiles exactly as
     `lvita_data.media.tiles` (`choose_grid` + `image_tiles`), encode every tile as PNG level 1
     (`encode_tiles`). Nothing else: no text, no packing, no tar, no disk writes.
  2. lvita: `python -m pipelines build MANIFEST --out DIR --workers 1 --quiet` in a fresh
     process, timed end to end: interpreter start, imports, tokenizer load, planning (parse,
     tokenize, probe sizes), packing, per-shard reading, tokenizing, pixels, tars, checksums,
     fsync, index / stats / Energon metadata.

samples/s per core = images (= packed samples) / wall seconds of the one core; the CPU seconds
(user + sys) of each run are reported too, as the VM is shared. Goal from the issue: lvita >=
0.7 of the floor. Results go to benchmarks/results/build.md (with `--write`).

    python benchmarks/bench_build.py [--images 600] [--repeat 2] [--workdir DIR] [--write]
                                     [--profile]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import random
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

os.environ.setdefault("RAYON_NUM_THREADS", "1")  # one core: the Rust tokenizer must not fan out
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402
import PIL  # noqa: E402
from PIL import Image  # noqa: E402

from lvita_data.media.tiles import PNG_COMPRESS_LEVEL, encode_tiles, image_tiles  # noqa: E402
from lvita_data.samples.tiling import choose_grid, num_tiles  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results" / "build.md"
GOAL = 0.7
# (width, height): grid and tiles with Long-VITA's rule (max_tiles 12), thumbnail included
SIZES = [
    (448, 448),  # 1x1: 1 tile
    (600, 600),  # 1x1: 1 tile
    (900, 450),  # 2x1: 3 tiles
    (500, 1000),  # 1x2: 3 tiles
    (1200, 400),  # 3x1: 4 tiles
    (1344, 896),  # 3x2: 7 tiles
    (336, 512),  # 2x3: 7 tiles
    (1280, 720),  # 4x2: 9 tiles
    (1000, 1000),  # 3x3: 10 tiles
    (640, 480),  # 4x3: 13 tiles
    (1024, 768),  # 4x3: 13 tiles
]
PROMPTS = [
    "Describe the image in detail.",
    "What is shown in this picture?",
    "Give a short caption for the image.",
    "What is the main object and what colour is it?",
]
_TEXT = (
    "the a image shows a scene with soft light and a blue sky over green hills while people walk "
    "near the old stone building and a red car waits at the corner of the quiet street"
)
WORDS = _TEXT.split(" ")


def sentence(rng: random.Random, low: int, high: int, words: list[str] = WORDS) -> str:
    return " ".join(rng.choice(words) for _ in range(rng.randint(low, high))).capitalize() + "."


def caption_record(
    index: int, image_name: str, rng: random.Random, words: list[str] = WORDS
) -> str:
    """One longvita_jsonl line: a question about ``images/{image_name}`` and its answer; every
    third record has a follow-up turn (also used by bench_storage)."""
    messages = [
        {"role": "user", "content": f"<image>\n{PROMPTS[index % len(PROMPTS)]}"},
        {"role": "assistant", "content": sentence(rng, 20, 60, words)},
    ]
    if index % 3 == 0:
        messages += [
            {"role": "user", "content": "And what else?"},
            {"role": "assistant", "content": sentence(rng, 10, 30, words)},
        ]
    return json.dumps({"messages": messages, "images": [f"images/{image_name}"], "videos": []})


def photo(rng: np.random.Generator, width: int, height: int) -> Image.Image:
    """A photo-like picture: smooth colour fields, some edges and mild sensor noise (JPEG q90)."""
    coarse = rng.integers(0, 256, size=(max(2, height // 64), max(2, width // 64), 3))
    base = Image.fromarray(coarse.astype(np.uint8)).resize((width, height), Image.BICUBIC)
    pixels = np.asarray(base).astype(np.int16)
    for _ in range(4):  # a few flat rectangles with hard edges
        x0, y0 = int(rng.integers(0, width - 8)), int(rng.integers(0, height - 8))
        x1, y1 = x0 + int(rng.integers(8, width // 2)), y0 + int(rng.integers(8, height // 2))
        pixels[y0:y1, x0:x1] = rng.integers(0, 256, size=3)
    pixels += rng.normal(0, 6, size=pixels.shape).astype(np.int16)
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def make_workdir(workdir: Path, count: int, seed: int = 0) -> tuple[Path, list[Path]]:
    """Images, the JSONL and the manifest (reused when the work directory already has them)."""
    images_dir = workdir / "images"
    manifest = workdir / "bench_build.yaml"
    records = workdir / "records.jsonl"
    marker = workdir / f".complete-{count}-{seed}"
    paths = [images_dir / f"{i:05d}.jpg" for i in range(count)]
    if marker.exists():
        return manifest, paths
    images_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    text_rng = random.Random(seed)
    lines = []
    for i, path in enumerate(paths):
        width, height = SIZES[i % len(SIZES)]
        photo(rng, width, height).save(path, quality=90)
        lines.append(caption_record(i, path.name, text_rng))
    records.write_text("\n".join(lines) + "\n", encoding="utf-8")
    manifest.write_text(
        f"""schema_version: 1
stage: bench
seed: 1
tokenizer: qwen2.5
pack:
  max_seq_len: 16384
  reset_attention: true
  group_by: none
shards:
  packs_per_shard: 16
  tile_format: png
rejects:
  max_rate: 0.0
  min_selected: 1
datasets:
  - name: photos
    format: longvita_jsonl
    path: {records}
    media_root: {workdir}
""",
        encoding="utf-8",
    )
    marker.touch()
    return manifest, paths


def _cpu_self() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _cpu_children() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def floor(paths: list[Path]) -> tuple[float, float, int]:
    """(wall s, cpu s, tiles) of read + decode + tile + PNG-1 encode of every image."""
    tiles = 0
    cpu, wall = _cpu_self(), time.perf_counter()
    for path in paths:
        data = path.read_bytes()
        image = Image.open(io.BytesIO(data))
        image.load()
        image = image if image.mode == "RGB" else image.convert("RGB")
        grid = choose_grid(*image.size, min_tiles=1, max_tiles=12)
        blobs = encode_tiles(image_tiles(image, grid), "png", compress_level=PNG_COMPRESS_LEVEL)
        tiles += len(blobs)
    return time.perf_counter() - wall, _cpu_self() - cpu, tiles


def lvita(manifest: Path, out: Path) -> tuple[float, float, dict]:
    """(wall s, cpu s, index.json) of one `lvita build --workers 1` in a fresh process."""
    shutil.rmtree(out, ignore_errors=True)
    command = [sys.executable, "-m", "pipelines", "build", str(manifest), "--out", str(out)]
    cpu, wall = _cpu_children(), time.perf_counter()
    subprocess.run([*command, "--workers", "1", "--quiet"], check=True, cwd=REPO)
    seconds, cpu_seconds = time.perf_counter() - wall, _cpu_children() - cpu
    return seconds, cpu_seconds, json.loads((out / "index.json").read_text(encoding="utf-8"))


def profile(manifest: Path, out: Path) -> dict[str, float]:
    """Seconds of an in-process build (cProfile), split into pixel work and the rest."""
    import cProfile
    import pstats

    from lvita_data.build.run import build_stage

    shutil.rmtree(out, ignore_errors=True)
    profiler = cProfile.Profile()
    started = time.perf_counter()
    profiler.enable()
    build_stage(str(manifest), str(out), workers=1, progress=False)
    profiler.disable()
    total = time.perf_counter() - started
    cumulative: dict[str, float] = {}
    for (filename, _, name), (_, _, _, cum, _) in pstats.Stats(profiler).stats.items():
        module = Path(filename).stem
        cumulative[f"{module}.{name}"] = cumulative.get(f"{module}.{name}", 0.0) + cum
    parts = {
        "build": total,
        "pixels": cumulative.get("tiles.sample_tiles", 0.0)
        + cumulative.get("tiles.encode_tiles", 0.0),
        "tokenizer load": cumulative.get("read.tokenizer_and_template", 0.0),
        "planning": cumulative.get("plan.plan_stage", 0.0),
        "shard records + tokenize": cumulative.get("shard._tokenized_samples", 0.0),
        "shard writing": cumulative.get("writer.write_shard", 0.0),
        "stats.json": cumulative.get("compute.compute_stats", 0.0),
    }
    parts["planning"] -= parts["tokenizer load"]
    parts["tar, sha256, fsync, assembly"] = parts.pop("shard writing") - parts["pixels"]
    parts["other"] = total - sum(v for k, v in parts.items() if k != "build")
    return parts


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    return (
        f"{cpu}, {os.cpu_count()} vCPU (one used), load average {load} at the end; "
        f"Python {platform.python_version()}, Pillow {PIL.__version__}, numpy {np.__version__}"
    )


CHANGES = (
    "Build-side work behind these numbers: the shard writer is our own (byte-identical to "
    "webdataset's TarWriter) because importing webdataset imports torch, 3 s per process and "
    "per worker; sha256 is computed while the tar is written (no second read of the shard); a "
    "shard task reads its records once each in (file, row) order and tokenizes them in one "
    "deduplicated batch; pool workers get the shared manifest and file list once, not per task."
)


def startup_seconds() -> float:
    """Wall seconds of a fresh interpreter importing what `lvita build` imports (best of 3)."""
    command = [sys.executable, "-c", "import pipelines.cli, lvita_data.build.run"]
    best = float("inf")
    for _ in range(3):
        started = time.perf_counter()
        subprocess.run(command, check=True, cwd=REPO)
        best = min(best, time.perf_counter() - started)
    return best


def notes(parts: dict[str, float], images: int) -> str:
    if not parts:
        return "(Run with `--profile` for the breakdown of the build's time.)"
    lines = [
        f"Where an in-process build of the same {images} images spends its time (cProfile, one "
        f"run; `build_stage` took {parts['build']:.1f} s; the CLI adds interpreter start-up and "
        f"imports: {startup_seconds():.2f} s):",
        "",
        "| part | s | share |",
        "|---|---|---|",
        *(
            f"| {name} | {seconds:.2f} | {seconds / parts['build']:.1%} |"
            for name, seconds in parts.items()
            if name != "build"
        ),
        "",
        '"pixels" is the floor\'s work (decode, tile, PNG-1 encode) inside the shard tasks; the '
        "rest is what `lvita build` adds: reading and tokenizing the records twice (planning, "
        "then per shard), the tokenizer's one-time load, packing, tar assembly with sha256 on "
        "the fly and an fsync per file, and `stats.json` (which reads every `meta.json` back).",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=600)
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--write", action="store_true", help=f"write {RESULTS}")
    parser.add_argument("--profile", action="store_true", help="also profile one build")
    args = parser.parse_args()
    workdir = args.workdir or Path(tempfile.gettempdir()) / "lvita_bench_build"
    workdir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    manifest, paths = make_workdir(workdir, args.images)
    print(f"{len(paths)} images in {workdir} ({time.perf_counter() - started:.1f} s)")
    source_bytes = sum(p.stat().st_size for p in paths)
    grids = [choose_grid(*Image.open(p).size, min_tiles=1, max_tiles=12) for p in paths]
    expected_tiles = sum(num_tiles(g) for g in grids)

    runs: list[dict] = []
    index: dict = {}
    for repetition in range(args.repeat):
        f_wall, f_cpu, tiles = floor(paths)
        assert tiles == expected_tiles
        l_wall, l_cpu, index = lvita(manifest, workdir / "out")
        run = {"floor": (f_wall, f_cpu), "lvita": (l_wall, l_cpu)}
        runs.append(run)
        print(
            f"rep {repetition + 1}: floor {len(paths) / f_wall:6.2f} samples/s "
            f"({f_wall:.1f} s wall, {f_cpu:.1f} s cpu) | lvita {len(paths) / l_wall:6.2f} "
            f"samples/s ({l_wall:.1f} s wall, {l_cpu:.1f} s cpu) | ratio {f_wall / l_wall:.3f} "
            f"wall, {f_cpu / l_cpu:.3f} cpu"
        )
    packs = sum(s["samples"] for s in index["shards"])
    shard_bytes = sum(s["bytes"] for s in index["shards"])
    stats = json.loads((workdir / "out" / "stats.json").read_text(encoding="utf-8"))
    packed_samples = sum(d.get("samples", 0) for d in stats.get("datasets", [])) or len(paths)

    best_floor = min(r["floor"][0] for r in runs)
    best_lvita = min(r["lvita"][0] for r in runs)
    best_floor_cpu = min(r["floor"][1] for r in runs)
    best_lvita_cpu = min(r["lvita"][1] for r in runs)
    wall_ratios = [r["floor"][0] / r["lvita"][0] for r in runs]
    cpu_ratios = [r["floor"][1] / r["lvita"][1] for r in runs]
    ratio = statistics.median(wall_ratios)
    cpu_ratio = statistics.median(cpu_ratios)
    verdict = "met" if min(ratio, cpu_ratio) >= GOAL else "NOT met"
    print(
        f"best: floor {len(paths) / best_floor:.2f} samples/s, lvita {len(paths) / best_lvita:.2f}"
        f" samples/s; ratio lvita/floor {ratio:.3f} (wall, median), {cpu_ratio:.3f} (cpu); "
        f"goal >= {GOAL}: {verdict}"
    )
    parts = profile(manifest, workdir / "profile") if args.profile else {}
    for name, seconds in parts.items():
        print(f"  {name:32s} {seconds:8.2f} s  {seconds / parts['build']:6.1%}")
    if not args.write:
        return
    rows = [
        f"| {i + 1} | {len(paths) / r['floor'][0]:.2f} ({r['floor'][0]:.1f} s / "
        f"{r['floor'][1]:.1f} s) | {len(paths) / r['lvita'][0]:.2f} ({r['lvita'][0]:.1f} s / "
        f"{r['lvita'][1]:.1f} s) | {w:.3f} | {c:.3f} |"
        for i, (r, w, c) in enumerate(zip(runs, wall_ratios, cpu_ratios, strict=True))
    ]
    grid_mix: dict[str, int] = {}
    for g in grids:
        grid_mix[f"{g[0]}x{g[1]}"] = grid_mix.get(f"{g[0]}x{g[1]}", 0) + 1
    mix = ", ".join(f"{k} x{v}" for k, v in sorted(grid_mix.items()))
    lines = [
        "# Build throughput (`benchmarks/bench_build.py`)",
        "",
        f"{date.today().isoformat()}. {machine()}.",
        "",
        f"Images: {len(paths)} synthetic photo-like JPEGs (q90; smooth colour fields, hard-edged "
        f"rectangles, sensor noise), {len(SIZES)} sizes from 336x512 to 1344x896, grids {mix}: "
        f"{expected_tiles} tiles with thumbnails ({expected_tiles / len(paths):.1f} per image), "
        f"{source_bytes / 1e6:.1f} MB of JPEG. One Long-VITA JSONL record per image (caption or "
        "QA, a third with two turns). Manifest: max_seq_len 16,384, group_by none, 16 packs per "
        f"shard, PNG level-1 tiles. Result: {packs} packed sequences of {packed_samples} samples "
        f"in {len(index['shards'])} shards, {shard_bytes / 1e6:.1f} MB.",
        "",
        "- **floor** = one loop over the images: read the bytes, decode (Pillow, RGB), "
        "`choose_grid` + `lvita_data.media.tiles.image_tiles`, `encode_tiles` as PNG level 1. Only "
        "the pixel work, nothing written.",
        "- **lvita** = `python -m pipelines build MANIFEST --out DIR --workers 1 --quiet` in a "
        "fresh process, end to end (start-up, imports, tokenizer load, planning, packing, shard "
        "tasks, tars, sha256, fsync, index / stats / rejects / Energon metadata).",
        "",
        "One core (`--workers 1`, `RAYON_NUM_THREADS=1`), the two alternating per repetition. "
        "Cells: samples/s per core (wall s / CPU s); ratio = lvita samples/s / floor samples/s.",
        "",
        "| rep | floor samples/s | lvita samples/s | ratio (wall) | ratio (CPU) |",
        "|---|---|---|---|---|",
        *rows,
        "",
        f"**Ratio lvita / floor: {ratio:.3f} (wall, median of {len(runs)}), {cpu_ratio:.3f} "
        f"(CPU time). Goal (>= {GOAL} of the floor): {verdict}.** Best runs: floor "
        f"{len(paths) / best_floor:.2f} samples/s ({best_floor_cpu:.1f} s CPU), lvita "
        f"{len(paths) / best_lvita:.2f} samples/s ({best_lvita_cpu:.1f} s CPU).",
        "",
        notes(parts, len(paths)),
        "",
        CHANGES,
        "",
    ]
    RESULTS.write_text("\n".join(lines), encoding="utf-8")
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
