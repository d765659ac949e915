"""Shard storage: source bytes vs pre-cut tiles (PNG-1 or WebP lossless), shard format 3.

Three corpora, each built three times, side by side in one run (T = pack.max_seq_len 4096,
stage-2 settings, group_by file, max_tiles 12):
  - photo:  photo-like JPEGs (multi-octave colour fields with luminance-correlated channels,
            hard-edged shapes, a slight blur and sensor noise; quality 90, 4:2:0 like cameras,
            ~2.1 bits per pixel: a 640x480 one is ~83 kB) at 640x480, 1024x768, 1280x960,
            1920x1080 and 4000x3000, weighted like COCO-heavy data (`PHOTO_MIX`);
  - screen: PNG screenshots (windows, bars, rendered text) and charts (axes, bars, lines,
            labels), plus a few WebP (lossy photos, lossless screenshots) (`SCREEN_MIX`);
  - demo:   the demo corpus' stage 2 (`make_demo_corpus` + `manifests/demo/stage2.yaml`):
            drawn pictures, comics, parquet charts, video frames, text.
One Long-VITA JSONL record per image (caption or QA, a third with two turns); every image is
deterministic (seeded numpy Generators). The three storages: `shards.image_storage: source`
(the default), `tiles` with `tile_format: png` (level 1) and `tiles` with `webp`
(lossless).

Reported per corpus and storage:
  1. bytes: the total .tar bytes of the build (arrays, meta.json, tar headers included) /
     the source media bytes (the image files the samples use; for demo the image bytes the
     `source` build stores, which are the files' and parquet cells' exact bytes, plus the video
     frames, which every storage keeps as PNG-1 / WebP tiles), split by member kind;
  2. build: `python -m pipelines build MANIFEST --out DIR --workers 1 --quiet` in a fresh
     process (one core), samples/s per CPU second (user + sys of the child) and per wall s;
  3. loader: one epoch of `ShardLoader(batch_size=1)` with float32 (`normalize=True`, the
     original's tensors) and uint8 (`normalize=False`) tiles, 0 and 2 DataLoader workers; tokens
     (= T x packs, padding counted) per CPU second of this process and its workers (and per wall
     s). Every single-process thread pool is set to one thread. The storages alternate per pass.
Then, per image kind, where the time goes: decode + cut the source (`decode_rgb` + `image_tiles`)
against decoding its PNG-1 / WebP tiles (`decode_tile`), ms per image, so the size class that
dominates a mix is visible; `--profile` adds a cProfile of one `source` epoch on the photo mix.

Goals (issue 10): shard bytes <= 1.05x the source media bytes on the photo mix; loader
tokens/s with `source` >= 1.0x the `tiles` PNG path on the same mix and >= 30,000 tokens/s per
core at T = 4096.

    python benchmarks/bench_storage.py [--workdir DIR] [--quick] [--repeat 1] [--profile]
                                       [--write]
"""

from __future__ import annotations

import os

for _name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "RAYON_NUM_THREADS"):
    os.environ.setdefault(_name, "1")  # one core: nothing may fan out to threads
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import argparse  # noqa: E402
import io  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import random  # noqa: E402
import resource  # noqa: E402
import shutil  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tarfile  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable  # noqa: E402
from datetime import date  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import PIL  # noqa: E402
from bench_build import caption_record  # noqa: E402  (this folder: the same records)
from bench_loader import loader_pass  # noqa: E402  (this folder: one loader pass for both)
from PIL import Image, ImageDraw, ImageFilter, ImageFont  # noqa: E402

from lvita_data.media.tiles import decode_rgb, decode_tile, encode_tiles, image_tiles  # noqa: E402
from lvita_data.samples.tiling import choose_grid, num_tiles  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results" / "storage.md"
SEQ_LEN = 4096
STORAGES = {  # label -> (image_storage, tile_format)
    "source": ("source", "png"),
    "tiles PNG-1": ("tiles", "png"),
    "tiles WebP": ("tiles", "webp"),
}
BASELINE = "tiles PNG-1"
# (kind, width, height, count): COCO-heavy; SAM / camera-size photos a few percent
PHOTO_MIX = [
    ("jpeg", 640, 480, 48),
    ("jpeg", 1024, 768, 16),
    ("jpeg", 1280, 960, 12),
    ("jpeg", 1920, 1080, 12),
    ("jpeg", 4000, 3000, 6),
]
SCREEN_MIX = [
    ("png screenshot", 1280, 720, 8),
    ("png screenshot", 1920, 1080, 6),
    ("png screenshot", 1366, 768, 4),
    ("png chart", 800, 600, 8),
    ("png chart", 1024, 768, 4),
    ("webp photo", 800, 600, 4),
    ("webp photo", 1024, 768, 2),
    ("webp screenshot", 1280, 720, 2),
]
QUICK_COUNTS = {"jpeg": 2, "png screenshot": 1, "png chart": 1, "webp photo": 1}
BYTES_GOAL, SPEED_GOAL, TOKENS_GOAL = 1.05, 1.0, 30_000
WORDS = (
    "the a image shows a scene with soft light and a blue sky over green hills while people walk "
    "near the old stone building and a red car waits at the corner of the quiet street chart "
    "value axis total revenue file edit view window settings open save cancel"
).split(" ")
MANIFEST = """\
schema_version: 1
stage: {stage}
seed: 7
tokenizer: qwen2.5
pack:
  max_seq_len: {seq_len}
  reset_attention: true
  group_by: file
image:
  max_tiles: 12
  min_tiles: 1
shards:
  packs_per_shard: 32
  image_storage: {storage}
  tile_format: {tile_format}
rejects:
  max_rate: 0.0
  min_selected: 1
datasets:
  - name: {stage}
    format: longvita_jsonl
    path: {root}/records.jsonl
    media_root: {root}
    ratio: 1.0
"""


# --------------------------------------------------------------------------------------------
# images


def photo(rng: np.random.Generator, width: int, height: int) -> Image.Image:
    """A photo-like RGB picture: colour fields at five scales whose channels share a luminance
    component, hard-edged shapes, a slight blur and luminance + chroma sensor noise."""
    pixels = np.empty((height, width, 3), dtype=np.float32)
    pixels[...] = rng.uniform(60, 190, 3)
    for scale, amplitude in ((256, 45.0), (64, 30.0), (16, 18.0), (4, 12.0), (2, 6.0)):
        shape = (max(2, height // scale + 2), max(2, width // scale + 2))
        field = 0.4 * rng.normal(0, 1, (*shape, 3)) + 0.8 * rng.normal(0, 1, (*shape, 1))
        for c in range(3):
            small = Image.fromarray(field[..., c].astype(np.float32), mode="F")
            pixels[..., c] += amplitude * np.asarray(
                small.resize((width, height), Image.Resampling.BICUBIC)
            )
    image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    for _ in range(6):
        x0, y0 = int(rng.integers(0, width)), int(rng.integers(0, height))
        x1 = x0 + int(rng.integers(width // 20, width // 3))
        y1 = y0 + int(rng.integers(height // 20, height // 3))
        colour = tuple(int(v) for v in rng.integers(20, 235, 3))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)((x0, y0, x1, y1), fill=colour)
    pixels = np.asarray(image.filter(ImageFilter.GaussianBlur(0.7))).astype(np.float32)
    pixels += rng.normal(0, 3.0, (height, width, 1)).astype(np.float32)
    pixels += rng.normal(0, 1.5, pixels.shape).astype(np.float32)
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def _font(size: int) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: the fixed bitmap font
        return ImageFont.load_default()


def _words(rng: np.random.Generator, count: int) -> str:
    return " ".join(WORDS[int(i)] for i in rng.integers(0, len(WORDS), count))


def screenshot(rng: np.random.Generator, width: int, height: int) -> Image.Image:
    """A desktop screenshot: flat background, title bars, windows with text lines and buttons."""
    image = Image.new("RGB", (width, height), tuple(int(v) for v in rng.integers(200, 245, 3)))
    draw = ImageDraw.Draw(image)
    font = _font(13)
    draw.rectangle((0, 0, width, 28), fill=(40, 44, 52))
    draw.text((10, 7), _words(rng, 6), fill=(230, 230, 230), font=font)
    for _ in range(int(rng.integers(2, 5))):
        x0, y0 = int(rng.integers(0, width // 2)), int(rng.integers(30, height // 2))
        x1 = min(width - 1, x0 + int(rng.integers(width // 3, width // 2 + 1)))
        y1 = min(height - 1, y0 + int(rng.integers(height // 3, height // 2 + 1)))
        draw.rectangle((x0, y0, x1, y1), fill=(255, 255, 255), outline=(120, 120, 120))
        accent = tuple(int(v) for v in rng.integers(30, 200, 3))
        draw.rectangle((x0, y0, x1, y0 + 22), fill=accent)
        draw.text((x0 + 8, y0 + 5), _words(rng, 4), fill=(255, 255, 255), font=font)
        for y in range(y0 + 32, y1 - 30, 18):
            draw.text((x0 + 10, y), _words(rng, int(rng.integers(3, 12))), fill=(20, 20, 20),
                      font=font)  # fmt: skip
        draw.rounded_rectangle((x1 - 90, y1 - 28, x1 - 10, y1 - 6), 4, fill=accent)
    return image


def chart(rng: np.random.Generator, width: int, height: int) -> Image.Image:
    """A chart: white canvas, axes, grid lines, flat-coloured bars, a polyline, labels."""
    image = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(image)
    font = _font(14)
    left, bottom, top, right = 70, height - 60, 50, width - 30
    draw.text((left, 15), _words(rng, 5).title(), fill=(0, 0, 0), font=_font(20))
    for i in range(6):
        y = bottom - i * (bottom - top) // 5
        draw.line((left, y, right, y), fill=(220, 220, 220))
        draw.text((10, y - 8), f"{i * 20}", fill=(60, 60, 60), font=font)
    draw.line((left, top, left, bottom), fill=(0, 0, 0), width=2)
    draw.line((left, bottom, right, bottom), fill=(0, 0, 0), width=2)
    bars = int(rng.integers(5, 12))
    step = (right - left) // bars
    colours = [tuple(int(v) for v in rng.integers(30, 220, 3)) for _ in range(3)]
    points = []
    for i in range(bars):
        value = float(rng.uniform(0.1, 0.95))
        x = left + i * step + step // 4
        draw.rectangle((x, bottom - value * (bottom - top), x + step // 2, bottom), fill=colours[0])
        draw.text((x, bottom + 8), WORDS[int(rng.integers(0, len(WORDS)))], fill=(0, 0, 0),
                  font=font)  # fmt: skip
        points.append((x + step // 4, bottom - float(rng.uniform(0.1, 0.95)) * (bottom - top)))
    draw.line(points, fill=colours[1], width=3)
    for x, y in points:
        draw.ellipse((x - 4, y - 4, x + 4, y + 4), fill=colours[2])
    return image


def save_image(kind: str, rng: np.random.Generator, width: int, height: int, path: Path) -> None:
    if kind == "jpeg":
        photo(rng, width, height).save(path, "JPEG", quality=90, subsampling=2)
    elif kind == "png screenshot":
        screenshot(rng, width, height).save(path, "PNG")
    elif kind == "png chart":
        chart(rng, width, height).save(path, "PNG")
    elif kind == "webp photo":
        photo(rng, width, height).save(path, "WEBP", quality=80)
    elif kind == "webp screenshot":
        screenshot(rng, width, height).save(path, "WEBP", lossless=True)
    else:
        raise ValueError(kind)


EXTENSION = {"jpeg": "jpg", "png": "png", "webp": "webp"}


def make_corpus(root: Path, mix: list[tuple[str, int, int, int]], quick: bool, seed: int) -> dict:
    """Images, records.jsonl and one manifest per storage under `root` (reused when complete).
    Returns {"images": [(kind, path)], "manifests": {storage label: path}}."""
    entries = []
    for kind, width, height, count in mix:
        count = min(count, QUICK_COUNTS.get(kind, 1)) if quick else count
        entries += [(kind, width, height)] * count
    images = [
        (kind, root / "images" / f"{i:04d}.{EXTENSION[kind.split()[0]]}")
        for i, (kind, _, _) in enumerate(entries)
    ]
    manifests = {label: root / f"{label.replace(' ', '_')}.yaml" for label in STORAGES}
    marker = root / ".complete"
    if not marker.exists():
        (root / "images").mkdir(parents=True, exist_ok=True)
        rng = np.random.default_rng(seed)
        text = random.Random(seed)
        order = list(range(len(entries)))
        random.Random(seed).shuffle(order)  # sizes interleaved in the records, as in real data
        lines = []
        for i in order:
            kind, width, height = entries[i]
            path = images[i][1]
            save_image(kind, rng, width, height, path)
            lines.append(caption_record(i, path.name, text, WORDS))
        (root / "records.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
        for label, path in manifests.items():
            storage, tile_format = STORAGES[label]
            path.write_text(
                MANIFEST.format(
                    stage=root.name,
                    seq_len=SEQ_LEN,
                    storage=storage,
                    tile_format=tile_format,
                    root=root,
                ),
                encoding="utf-8",
            )
        marker.touch()
    return {"images": images, "manifests": manifests}


def make_demo(workdir: Path) -> dict:
    """The demo corpus and stage-2 manifests with a `shards:` section per storage."""
    from lvita_data.demo import make_demo_corpus

    root = workdir / "demo-corpus"
    if not (root / ".complete").exists():
        make_demo_corpus(root, seed=0)
        (root / ".complete").touch()
    text = (REPO / "manifests" / "demo" / "stage2.yaml").read_text(encoding="utf-8")
    assert "\nshards:" not in text, "the demo manifest grew a shards: section; merge it here"
    manifests = {}
    for label, (storage, tile_format) in STORAGES.items():
        path = workdir / f"demo-{label.replace(' ', '_')}.yaml"
        shards = f"shards:\n  image_storage: {storage}\n  tile_format: {tile_format}\n"
        path.write_text(text.replace("\ndatasets:", f"\n{shards}datasets:", 1), encoding="utf-8")
        manifests[label] = path
    return {"images": [], "manifests": manifests, "root": root}


# --------------------------------------------------------------------------------------------
# measurements


def cpu_children() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def cpu_total() -> float:
    """CPU seconds of this process and of its reaped children (builds, DataLoader workers)."""
    return time.process_time() + cpu_children()


def build(manifest: Path, out: Path, env: dict[str, str]) -> tuple[float, float]:
    """(wall s, CPU s) of one `lvita build --workers 1` in a fresh process."""
    shutil.rmtree(out, ignore_errors=True)
    command = [sys.executable, "-m", "pipelines", "build", str(manifest), "--out", str(out)]
    cpu, wall = cpu_children(), time.perf_counter()
    subprocess.run([*command, "--workers", "1", "--quiet"], check=True, cwd=REPO, env=env)
    return time.perf_counter() - wall, cpu_children() - cpu


def shard_bytes(out: Path) -> dict[str, int]:
    """Bytes of the build's tars by member kind: images and tiles (the members of each pack's
    media.tar), arrays, meta.json; ``headers`` = tar headers (the shard's and media.tar's),
    padding, ends of archive."""
    index = json.loads((out / "index.json").read_text(encoding="utf-8"))
    parts = {"total": 0, "image": 0, "tile": 0, "arrays": 0, "meta": 0}
    for shard in index["shards"]:
        parts["total"] += (out / shard["name"]).stat().st_size
        with tarfile.open(out / shard["name"]) as archive:
            for member in archive:
                name = member.name.split(".", 1)[1]
                if name == "media.tar":
                    data = io.BytesIO(archive.extractfile(member).read())
                    with tarfile.open(fileobj=data) as media:
                        for inner in media:
                            parts["image" if inner.name[:5] == "image" else "tile"] += inner.size
                elif name == "arrays.npz":
                    parts["arrays"] += member.size
                elif name == "meta.json":
                    parts["meta"] += member.size
    parts["headers"] = parts["total"] - sum(parts[k] for k in ("image", "tile", "arrays", "meta"))
    return parts


def timed(fn: Callable[[], object]) -> tuple[float, float, object]:
    wall, cpu = time.perf_counter(), cpu_total()
    result = fn()
    return time.perf_counter() - wall, cpu_total() - cpu, result


def best_of(fn: Callable[[], object], repeat: int) -> tuple[float, float, object]:
    return min((timed(fn) for _ in range(repeat)), key=lambda run: run[1])


def kind_costs(images: list[tuple[str, Path]], per_kind: int) -> list[dict]:
    """Per image kind and size: bytes and load-time ms of source vs PNG-1 / WebP tiles."""
    groups: dict[tuple[str, tuple[int, int]], list[Path]] = {}
    for kind, path in images:
        with Image.open(path) as image:
            groups.setdefault((kind, image.size), []).append(path)
    rows = []
    for (kind, size), paths in groups.items():
        grid = choose_grid(*size, min_tiles=1, max_tiles=12)
        sums = dict.fromkeys(("src", "png", "webp", "decode", "cut", "png_ms", "webp_ms"), 0.0)
        sample = paths[:per_kind]
        for path in sample:
            data = path.read_bytes()
            tiles = image_tiles(decode_rgb(io.BytesIO(data), path.name), grid)
            png, webp = encode_tiles(tiles, "png"), encode_tiles(tiles, "webp")
            sums["src"] += len(data)
            sums["png"] += sum(map(len, png))
            sums["webp"] += sum(map(len, webp))
            decode_s = min(
                timed(lambda d=data, n=path.name: decode_rgb(io.BytesIO(d), n))[0] for _ in range(2)
            )
            image = decode_rgb(io.BytesIO(data), path.name)
            cut_s = min(
                timed(lambda i=image, g=grid: [np.asarray(t) for t in image_tiles(i, g)])[0]
                for _ in range(2)
            )
            sums["decode"] += decode_s * 1e3
            sums["cut"] += cut_s * 1e3
            for fmt, blobs in (("png", png), ("webp", webp)):
                sums[f"{fmt}_ms"] += 1e3 * min(
                    timed(lambda b=blobs, f=fmt: [decode_tile(x, f) for x in b])[0]
                    for _ in range(2)
                )
        mean = {k: v / len(sample) for k, v in sums.items()}
        rows.append({"kind": kind, "size": size, "count": len(paths), "tiles": num_tiles(grid)})
        rows[-1].update(mean)
    return rows


def profile_source(out: Path, top: int = 10) -> list[str]:
    """cProfile of one uint8 epoch of a `source` build: the top functions by own time."""
    import cProfile
    import pstats

    profiler = cProfile.Profile()
    profiler.enable()
    loader_pass(out, normalize=False, workers=0)
    profiler.disable()
    stats = pstats.Stats(profiler)
    total = stats.total_tt
    rows = sorted(stats.stats.items(), key=lambda item: item[1][2], reverse=True)[:top]
    lines = [f"cProfile of one uint8 epoch of `source` on photo ({total:.2f} s profiled):", ""]
    lines += ["| function | calls | own s | share |", "|---|---|---|---|"]
    for (file, line, name), (_, calls, own, _, _) in rows:
        where = f"{Path(file).name}:{line}({name})" if line else name
        lines.append(f"| `{where}` | {calls} | {own:.2f} | {own / total:.1%} |")
    return lines


def machine(load_start: tuple[float, float, float]) -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    start, end = (", ".join(f"{x:.2f}" for x in load) for load in (load_start, os.getloadavg()))
    return (
        f"{cpu}, {os.cpu_count()} vCPU, load average {start} at the start, {end} at the end; "
        f"Python "
        f"{platform.python_version()}, numpy {np.__version__}, Pillow {PIL.__version__}"
    )


# --------------------------------------------------------------------------------------------
# the run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/lvita-bench-storage"))
    parser.add_argument("--quick", action="store_true", help="a smoke run: a few images")
    parser.add_argument("--repeat", type=int, default=1, help="loader passes: best of N")
    parser.add_argument("--workers", type=int, default=2, help="DataLoader workers (0: skip)")
    parser.add_argument("--no-demo", action="store_true", help="skip the demo stage 2")
    parser.add_argument("--profile", action="store_true", help="cProfile a source epoch")
    parser.add_argument("--write", action="store_true", help=f"write {RESULTS}")
    args = parser.parse_args()
    workdir = args.workdir / ("quick" if args.quick else "full")
    workdir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    load_start = os.getloadavg()

    corpora = {
        "photo": make_corpus(workdir / "photo", PHOTO_MIX, args.quick, seed=0),
        "screen": make_corpus(workdir / "screen", SCREEN_MIX, args.quick, seed=1),
    }
    if not args.no_demo:
        corpora["demo"] = make_demo(workdir)
    env = dict(os.environ)
    if "demo" in corpora:
        env["LVITA_DEMO_ROOT"] = str(corpora["demo"]["root"])
    print(f"corpora ready in {time.perf_counter() - started:.0f} s under {workdir}", flush=True)

    # builds: one core, storages alternating per corpus
    builds: dict[tuple[str, str], dict] = {}
    for name, corpus in corpora.items():
        for label, manifest in corpus["manifests"].items():
            out = workdir / "builds" / f"{name}-{label.replace(' ', '_')}"
            wall, cpu = build(manifest, out, env)
            index = json.loads((out / "index.json").read_text(encoding="utf-8"))
            stats = json.loads((out / "stats.json").read_text(encoding="utf-8"))
            samples = sum(d.get("samples", 0) for d in stats.get("datasets", []))
            packs = sum(s["samples"] for s in index["shards"])
            builds[name, label] = {
                "out": out,
                "wall": wall,
                "cpu": cpu,
                "samples": samples,
                "packs": packs,
                "bytes": shard_bytes(out),
            }
            print(
                f"build {name:6s} {label:12s} {samples} samples, {packs} packs: {wall:6.1f} s "
                f"wall, {cpu:6.1f} s CPU, {builds[name, label]['bytes']['total'] / 1e6:.1f} MB",
                flush=True,
            )

    # source media bytes
    media: dict[str, int] = {}
    for name, corpus in corpora.items():
        source = builds[name, "source"]["bytes"]
        if corpus["images"]:
            media[name] = sum(path.stat().st_size for _, path in corpus["images"])
            assert source["image"] == media[name], (name, source["image"], media[name])
        else:  # demo: the images' exact bytes as the source build stores them + video tiles
            media[name] = source["image"] + source["tile"]

    # loader passes, storages alternating within each pass
    passes = [("float32", True, 0), ("uint8", False, 0)]
    if args.workers:
        passes += [("float32", True, args.workers), ("uint8", False, args.workers)]
    loads: dict[tuple[str, str, str, int], tuple[float, float, int]] = {}
    for name in corpora:
        for dtype, normalize, workers in passes:
            for label in STORAGES:
                b = builds[name, label]
                wall, cpu, (packs, tiles) = best_of(
                    lambda o=b["out"], n=normalize, w=workers: loader_pass(o, n, w), args.repeat
                )
                assert packs == b["packs"], (packs, b["packs"])
                b["tiles"] = tiles
                loads[name, label, dtype, workers] = (wall, cpu, packs * SEQ_LEN)
                print(
                    f"load {name:6s} {label:12s} {dtype:7s} {workers} workers: {wall:6.2f} s "
                    f"wall, {cpu:6.2f} s CPU, {packs * SEQ_LEN / cpu:9,.0f} tokens/s per CPU s",
                    flush=True,
                )

    images = [item for name in ("photo", "screen") for item in corpora[name]["images"]]
    costs = kind_costs(images, per_kind=1 if args.quick else 3)
    profile_lines = profile_source(builds["photo", "source"]["out"]) if args.profile else []
    elapsed = time.perf_counter() - started
    report = render(args, corpora, builds, media, loads, passes, costs, profile_lines)
    report = report.replace(
        "{MACHINE}",
        f"{date.today().isoformat()}. {machine(load_start)}; whole run {elapsed / 60:.1f} min",
    )
    print()
    print(report)
    if args.write:
        RESULTS.write_text(report, encoding="utf-8")
        print(f"wrote {RESULTS}")


def render(args, corpora, builds, media, loads, passes, costs, profile_lines) -> str:
    overhead = per_pack_overhead(builds["photo", "source"])
    counts = {}
    for name in ("photo", "screen"):
        kinds: dict[str, int] = {}
        for kind, path in corpora[name]["images"]:
            with Image.open(path) as image:
                key = f"{kind} {image.size[0]}x{image.size[1]}"
            kinds[key] = kinds.get(key, 0) + 1
        counts[name] = ", ".join(f"{k} x{v}" for k, v in kinds.items())
    lines = [
        "# Shard storage: source bytes vs pre-cut tiles (`benchmarks/bench_storage.py`)",
        "",
        f"`python benchmarks/bench_storage.py{' --quick' if args.quick else ''} --repeat "
        f"{args.repeat} --workers {args.workers}{' --profile' if args.profile else ''}`, "
        "{MACHINE}. Shared VM: absolute times are indicative (+-30%), compare rows of one run.",
        "",
        f"Corpora (T = {SEQ_LEN}, stage-2 settings, group_by file, one record per image):",
        "",
        f"- **photo**: {len(corpora['photo']['images'])} photo-like JPEGs (q90, 4:2:0, ~2.1 "
        f"bits/pixel): {counts['photo']};",
        f"- **screen**: {len(corpora['screen']['images'])} images: {counts['screen']};",
    ]
    if "demo" in corpora:
        lines.append(
            "- **demo**: the demo corpus' stage 2 (`lvita demo-data`, `manifests/demo/"
            "stage2.yaml`): drawn pictures, comics, parquet charts, video frames (stored as "
            "tiles in every storage), text; its media bytes = the image bytes the `source` build "
            "stores (files' and parquet cells' exact bytes) + its PNG-1 video-frame tiles."
        )
    lines += [
        "",
        "Storages (shard format 3): `source` = `shards.image_storage: source` (the default); "
        "`tiles PNG-1` / `tiles WebP` = `image_storage: tiles` with `tile_format: png` (level 1) "
        "/ `webp` (lossless).",
        "",
        "## Summary",
        "",
        "bytes = total .tar bytes / source media bytes; build = samples/s per CPU s of `lvita "
        "build --workers 1` (fresh process, start-up and tokenizer load included); loader = "
        "tokens/s per CPU s (this process + its DataLoader workers; tokens = T x packs); "
        f"w{args.workers} = {args.workers} DataLoader workers; vs PNG = loader tokens/s per CPU s "
        "/ the `tiles PNG-1` row's, same corpus and pass.",
        "",
    ]
    header = "| corpus | storage | bytes | build samples/s | " + " | ".join(
        f"loader {d} w{w}" for d, _, w in passes
    )
    lines += [header + " |", "|---|---|---|---|" + "---|" * len(passes)]
    for name in corpora:
        for label in STORAGES:
            b = builds[name, label]
            cells = [
                name,
                label,
                f"{b['bytes']['total'] / media[name]:.3f}x",
                f"{b['samples'] / b['cpu']:.2f}",
            ]
            for dtype, _, workers in passes:
                _, cpu, tokens = loads[name, label, dtype, workers]
                _, base_cpu, _ = loads[name, BASELINE, dtype, workers]
                cell = f"{tokens / cpu:,.0f}"
                if label != BASELINE:
                    cell += f" ({base_cpu / cpu:.2f}x)"
                cells.append(cell)
            lines.append("| " + " | ".join(cells) + " |")
    lines += ["", *verdicts(builds, media, loads, passes), ""]

    lines += [
        "## Bytes",
        "",
        "MB by member kind (images and tiles: the members of each pack's media.tar; arrays: "
        "`arrays.npz`, the four int32 arrays DEFLATE level 1; headers = the shard's and "
        "media.tar's tar headers, PAX records, 512-byte padding and ends of archive).",
        "",
        "| corpus | storage | samples | packs | tiles | media MB | shard MB | images | tiles | "
        "arrays | meta.json | headers | shard / media |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name in corpora:
        for label in STORAGES:
            b = builds[name, label]
            p = b["bytes"]
            mb = [f"{p[k] / 1e6:.2f}" for k in ("total", "image", "tile", "arrays", "meta")]
            lines.append(
                f"| {name} | {label} | {b['samples']} | {b['packs']} | {b['tiles']} | "
                f"{media[name] / 1e6:.2f} | {' | '.join(mb)} | {p['headers'] / 1e6:.2f} | "
                f"{p['total'] / media[name]:.3f}x |"
            )

    lines += [
        "",
        "## Build",
        "",
        "`python -m pipelines build MANIFEST --out DIR --workers 1 --quiet`, one run each, "
        "storages alternating per corpus.",
        "",
        "| corpus | storage | samples | wall s | CPU s | samples/s per CPU s | samples/s (wall) |",
        "|---|---|---|---|---|---|---|",
    ]
    for name in corpora:
        for label in STORAGES:
            b = builds[name, label]
            lines.append(
                f"| {name} | {label} | {b['samples']} | {b['wall']:.1f} | {b['cpu']:.1f} | "
                f"{b['samples'] / b['cpu']:.2f} | {b['samples'] / b['wall']:.2f} |"
            )

    lines += [
        "",
        "## Loader",
        "",
        f"`ShardLoader(batch_size=1)`, one epoch, best of {args.repeat} (by CPU s). Single-"
        f"process passes use one core; with {args.workers} workers the main process and the "
        "workers share the VM's cores.",
        "",
        "| corpus | storage | pass | packs | tiles/pack | wall s | CPU s | tokens/s (wall) | "
        "tokens/s per CPU s | vs tiles PNG-1 |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name in corpora:
        for dtype, _, workers in passes:
            for label in STORAGES:
                wall, cpu, tokens = loads[name, label, dtype, workers]
                base_cpu = loads[name, BASELINE, dtype, workers][1]
                b = builds[name, label]
                lines.append(
                    f"| {name} | {label} | {dtype}, {workers} workers | {b['packs']} | "
                    f"{b['tiles'] / b['packs']:.1f} | {wall:.2f} | {cpu:.2f} | "
                    f"{tokens / wall:,.0f} | {tokens / cpu:,.0f} | {base_cpu / cpu:.2f}x |"
                )

    lines += [
        "",
        "## Where the loader's pixel time goes, per image kind",
        "",
        "Per image (mean of up to 3 per kind, best of 2 timings each, one core): source bytes, "
        "its PNG-1 / WebP tiles; ms to decode the source (`decode_rgb`: `Image.open` + `load` + "
        "RGB), to cut it (`image_tiles`: grid resize + thumbnail resize + crops, then "
        "`np.asarray` per tile) and to decode its stored PNG-1 / WebP tiles (`decode_tile`). "
        "Normalisation (~0.7 ms per tile) is the same for every storage and left out. share = "
        "the kind's part of its corpus' source-path pixel time (count x (decode + cut)). "
        f"bytes at 1/pack = (source kB + {overhead / 1e3:.1f} kB) / source kB: the `source` "
        "shard / media ratio of a mix of only this kind at one image per pack, with the photo "
        "`source` build's bytes per pack besides the image (arrays, meta.json, tar headers).",
        "",
        "| kind | size | count | tiles | source kB | PNG-1 kB | WebP kB | bytes at 1/pack | "
        "decode ms | cut ms | source ms | PNG-1 ms | WebP ms | source / PNG-1 time | share |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    totals: dict[str, float] = {}
    for row in costs:
        corpus = "photo" if row["kind"] == "jpeg" else "screen"
        totals[corpus] = totals.get(corpus, 0.0) + row["count"] * (row["decode"] + row["cut"])
    for row in costs:
        corpus = "photo" if row["kind"] == "jpeg" else "screen"
        source_ms = row["decode"] + row["cut"]
        lines.append(
            f"| {row['kind']} | {row['size'][0]}x{row['size'][1]} | {row['count']} | "
            f"{row['tiles']} | {row['src'] / 1e3:.0f} | {row['png'] / 1e3:.0f} | "
            f"{row['webp'] / 1e3:.0f} | {(row['src'] + overhead) / row['src']:.2f}x | "
            f"{row['decode']:.1f} | {row['cut']:.1f} | "
            f"{source_ms:.1f} | {row['png_ms']:.1f} | {row['webp_ms']:.1f} | "
            f"{source_ms / row['png_ms']:.2f} | "
            f"{row['count'] * source_ms / totals[corpus]:.0%} |"
        )
    if profile_lines:
        lines += ["", *profile_lines]
    lines.append("")
    return "\n".join(lines)


def per_pack_overhead(build: dict) -> float:
    """Bytes per pack besides images and tiles: arrays, meta.json, tar headers and padding."""
    parts = build["bytes"]
    return (parts["arrays"] + parts["meta"] + parts["headers"]) / build["packs"]


def verdicts(builds, media, loads, passes) -> list[str]:
    source = builds["photo", "source"]
    parts, packs = source["bytes"], source["packs"]
    ratio = parts["total"] / media["photo"]
    verdict = "met" if ratio <= BYTES_GOAL else f"NOT met (+{ratio / BYTES_GOAL - 1:.1%} over)"
    out = [f"- Shard bytes / source media bytes, photo, `source`: **{ratio:.3f}x** (goal <= "]
    out[-1] += f"{BYTES_GOAL}x): **{verdict}**."
    out.append(
        f"  Per pack: {media['photo'] / packs / 1e3:.0f} kB of image on average, plus "
        f"{parts['arrays'] / packs / 1e3:.1f} kB of arrays (`arrays.npz`: 3 x int32 [T] + "
        f"cu_seqlens, DEFLATE level 1; uncompressed they are 12 bytes per token), "
        f"{parts['headers'] / packs / 1e3:.1f} kB of tar headers / PAX records / "
        f"padding and {parts['meta'] / packs / 1e3:.1f} kB of meta.json."
    )
    for dtype, _, workers in passes:
        _, cpu, tokens = loads["photo", "source", dtype, workers]
        _, base_cpu, _ = loads["photo", BASELINE, dtype, workers]
        speed = base_cpu / cpu
        rate = tokens / cpu
        out.append(
            f"- Loader, photo, {dtype}, {workers} workers: `source` {rate:,.0f} tokens/s per CPU "
            f"s = **{speed:.2f}x** `tiles PNG-1` (goal >= {SPEED_GOAL}x: "
            f"**{'met' if speed >= SPEED_GOAL else 'NOT met'}**); goal >= {TOKENS_GOAL:,} "
            f"per core: **{'met' if rate >= TOKENS_GOAL else 'NOT met'}**."
        )
    return out


if __name__ == "__main__":
    main()
