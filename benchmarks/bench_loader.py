"""Loader throughput: tokens/s per core of `ShardLoader` against plain tar reading.

Two image-heavy builds (pack length T = 4096, stage-2 settings, PNG-1 tiles), made once in
--workdir:
  - demo:   the demo corpus' stage 2 (`manifests/demo/stage2.yaml`): drawn pictures, comics and
            video frames plus text; flat synthetic drawings compress to ~40 kB tiles and decode
            fast, so this is the easy case.
  - photo:  single-image caption samples over synthetic photo-like JPEGs (multi-octave noise
            fields: their PNG-1 tiles average ~260 kB, like the natural photos measured in
            benchmarks/results/pixels.md; 4:3 images become 4x3 grids + thumbnail, squares 1
            tile, 2:1 images 2x1 + thumbnail): the realistic, decode-bound case.
Then, in this process on one core (one thread for everything):
  1. plain tar: iterate the shards' tar members with `tarfile` and read their bytes;
  2. loader, uint8: `ShardLoader(batch_size=1, num_workers=0, normalize=False)`: read, check,
     decode the PNG tiles to uint8 (normalisation left to the accelerator);
  3. loader: the same with float32 normalisation (the default: the original's tensors).
Each pass is one epoch over all shards, best of --repeat. tokens = T * packs (padding counted);
"per core" = per CPU second (this process plus its DataLoader workers; with one process it
equals wall time on an idle machine; both are shown). --workers N adds passes with N worker
processes (torch DataLoader). A
breakdown of the loader's time (PNG decode, normalisation, the rest) comes from timing the
pieces separately. Goal from the issue: >= 30,000 tokens/s per core on an image-heavy stage.

    python benchmarks/bench_loader.py [--workdir DIR] [--photos 160] [--repeat 3] [--workers N]
"""

from __future__ import annotations

import os

for _name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "RAYON_NUM_THREADS"):
    os.environ.setdefault(_name, "1")  # one core: nothing may fan out to threads

import argparse  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import random  # noqa: E402
import resource  # noqa: E402
import tarfile  # noqa: E402
import time  # noqa: E402
from datetime import date  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from lvita_data.loader import ShardLoader  # noqa: E402
from lvita_data.media.tiles import decode_tile, normalize_tile_into  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
PHOTO_SIZES = [(640, 480), (448, 448), (896, 448), (1024, 768), (800, 800), (500, 375)]
WORDS = ["a", "photo", "of", "the", "city", "street", "at", "night", "with", "cars", "people"]
WORDS += ["lights", "near", "river", "bridge", "tree", "lake", "sky", "dog", "market", "sign"]
PHOTO_MANIFEST = """\
schema_version: 1
stage: photo
seed: 7
tokenizer: qwen2.5
pack:
  max_seq_len: 4096
  reset_attention: true
  group_by: file
image:
  max_tiles: 12
  min_tiles: 1
shards:
  packs_per_shard: 32
datasets:
  - name: photos
    format: longvita_jsonl
    path: {root}/photos.jsonl
    media_root: {root}
    ratio: 1.0
"""


def photo(rng: np.random.Generator, width: int, height: int) -> Image.Image:
    """A photo-like RGB image: smooth structure at three scales plus sensor-like noise."""
    image = np.full((height, width, 3), 128.0, dtype=np.float32)
    for scale, amplitude in ((64, 70.0), (16, 35.0), (4, 18.0)):
        small = rng.normal(0, 1, (max(2, height // scale), max(2, width // scale), 3))
        for c in range(3):
            field = Image.fromarray(small[..., c].astype(np.float32), mode="F")
            image[..., c] += amplitude * np.asarray(
                field.resize((width, height), Image.Resampling.BICUBIC)
            )
    image += rng.normal(0, 4.0, image.shape).astype(np.float32)
    return Image.fromarray(np.clip(image, 0, 255).astype(np.uint8))


def make_photo_corpus(root: Path, count: int) -> Path:
    manifest = root / "photo.yaml"
    if manifest.exists():
        return manifest
    (root / "images").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    text = random.Random(0)
    rows = []
    for i in range(count):
        width, height = PHOTO_SIZES[i % len(PHOTO_SIZES)]
        photo(rng, width, height).save(root / "images" / f"{i}.jpg", quality=90)
        caption = " ".join(text.choice(WORDS) for _ in range(text.randint(20, 60)))
        messages = [
            {"role": "user", "content": "<image>\nDescribe the photo."},
            {"role": "assistant", "content": caption.capitalize() + "."},
        ]
        rows.append(json.dumps({"messages": messages, "images": [f"images/{i}.jpg"]}))
    (root / "photos.jsonl").write_text("\n".join(rows) + "\n", encoding="utf-8")
    manifest.write_text(PHOTO_MANIFEST.format(root=root), encoding="utf-8")
    return manifest


def build(manifest: Path, out: Path, workers: int) -> None:
    from lvita_data.build.run import build_stage

    if (out / "index.json").exists():
        return
    build_stage(str(manifest), str(out), workers=workers, progress=False)


def prepare(workdir: Path, photos: int, workers: int) -> dict[str, Path]:
    demo_root, demo_out = workdir / "demo-corpus", workdir / "demo-stage2"
    if not (demo_out / "index.json").exists():
        from lvita_data.demo import make_demo_corpus

        if not (demo_root / "longvita").exists():
            make_demo_corpus(demo_root, seed=0)
        os.environ["LVITA_DEMO_ROOT"] = str(demo_root)
        build(REPO / "manifests/demo/stage2.yaml", demo_out, workers)
    photo_root = workdir / f"photo-corpus-{photos}"
    photo_out = workdir / f"photo-build-{photos}"
    build(make_photo_corpus(photo_root, photos), photo_out, workers)
    return {"demo": demo_out, "photo": photo_out}


def cpu_seconds() -> float:
    """CPU time of this process and of its finished children (the DataLoader workers)."""
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.process_time() + children.ru_utime + children.ru_stime


def timed(fn) -> tuple[float, float, object]:
    wall, cpu = time.perf_counter(), cpu_seconds()
    result = fn()
    return time.perf_counter() - wall, cpu_seconds() - cpu, result


def best(fn, repeat: int) -> tuple[float, float, object]:
    runs = [timed(fn) for _ in range(repeat)]
    return min(runs, key=lambda run: run[0])


def plain_tar(out: Path) -> int:
    index = json.loads((out / "index.json").read_text())
    total = 0
    for shard in index["shards"]:
        with tarfile.open(out / shard["name"], "r|") as archive:
            for member in archive:
                if member.isreg():
                    total += len(archive.extractfile(member).read())
    return total


def loader_pass(out: Path, normalize: bool, workers: int) -> tuple[int, int]:
    loader = ShardLoader(out, batch_size=1, normalize=normalize, num_workers=workers, seed=1)
    packs = tiles = 0
    for batch in loader:
        packs += batch.batch_size
        tiles += batch.num_tiles
    loader.close()
    return packs, tiles


def breakdown(out: Path) -> dict[str, float]:
    """Seconds for the pieces of one epoch: read+check, PNG decode, normalisation."""
    loader = ShardLoader(out, batch_size=1, seed=1)
    read_s, _, packs = timed(lambda: [loader.read_pack(int(g)) for g in loader.rank_order()])
    blobs = [tile for pack in packs for tile in pack.tiles]
    decode_s, _, tiles = timed(lambda: [decode_tile(blob, "png") for blob in blobs])
    out_buffer = np.empty((3, 448, 448), dtype=np.float32)
    norm_s, _, _ = timed(lambda: [normalize_tile_into(tile, out_buffer) for tile in tiles])
    sizes = [len(blob) for blob in blobs]
    return {
        "read": read_s,
        "decode": decode_s,
        "normalize": norm_s,
        "tiles": len(blobs),
        "tile_kb": float(np.mean(sizes)) / 1000 if sizes else 0.0,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workdir", default="/tmp/lvita-bench-loader")
    parser.add_argument("--photos", type=int, default=160)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--build-workers", type=int, default=2)
    parser.add_argument(
        "--workers", type=int, default=0, help="also time num_workers=N (total, not per core)"
    )
    args = parser.parse_args()
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    builds = prepare(workdir, args.photos, args.build_workers)
    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if "model name" in line
        ),
        platform.machine(),
    )
    import PIL

    print(
        f"{date.today()}, {cpu}, {os.cpu_count()} cores (one used), Python "
        f"{platform.python_version()}, numpy {np.__version__}, Pillow {PIL.__version__}, "
        f"load average {os.getloadavg()[0]:.2f}"
    )
    print()
    print(
        "| build | packs | T | tiles/pack | kB/tile | pass | seconds | CPU s | tokens/s | "
        "tokens/s per CPU s | vs plain tar |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    details = {}
    for name, out in builds.items():
        index = json.loads((out / "index.json").read_text())
        length = index["max_seq_len"]
        packs = sum(s["samples"] for s in index["shards"])
        tokens = packs * length
        parts = breakdown(out)
        details[name] = parts
        tiles_per_pack = parts["tiles"] / packs
        head = f"| {name} | {packs} | {length} | {tiles_per_pack:.1f} | {parts['tile_kb']:.0f}"
        plain_s, plain_cpu, _ = best(lambda out=out: plain_tar(out), args.repeat)
        print(
            f"{head} | plain tar (read members) | {plain_s:.2f} | {plain_cpu:.2f} | "
            f"{tokens / plain_s:,.0f} | {tokens / plain_cpu:,.0f} | 1 |"
        )
        passes = [("loader, uint8 tiles", False, 0), ("loader, float32 normalised", True, 0)]
        if args.workers:
            passes.append((f"loader, {args.workers} workers, uint8", False, args.workers))
            passes.append((f"loader, {args.workers} workers, float32", True, args.workers))
        for label, normalize, workers in passes:
            seconds, cpu_s, (got, _) = best(
                lambda out=out, n=normalize, w=workers: loader_pass(out, n, w), args.repeat
            )
            assert got == packs, (got, packs)
            print(
                f"{head} | {label} | {seconds:.2f} | {cpu_s:.2f} | {tokens / seconds:,.0f} | "
                f"{tokens / cpu_s:,.0f} | {plain_s / seconds:.3f} |"
            )
    print()
    print("Breakdown of one loader epoch (separately timed pieces, ms per pack):")
    print()
    print("| build | read + parse + checks | PNG decode | normalise | ms/tile decode+normalise |")
    print("|---|---|---|---|---|")
    for name, parts in details.items():
        index = json.loads((builds[name] / "index.json").read_text())
        packs = sum(s["samples"] for s in index["shards"])
        per_tile = (parts["decode"] + parts["normalize"]) / max(parts["tiles"], 1) * 1e3
        print(
            f"| {name} | {parts['read'] / packs * 1e3:.2f} | {parts['decode'] / packs * 1e3:.1f} "
            f"| {parts['normalize'] / packs * 1e3:.1f} | {per_tile:.2f} |"
        )


if __name__ == "__main__":
    main()
