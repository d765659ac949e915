"""Packing quality and speed: our BFD against Long-VITA's online packer and common baselines.

Distributions
  (a) A synthetic model of the Long-VITA mixture per stage (reference long-vita.md sections 2, 4
      and 5). Sample counts per source family follow the stage's ratios at full scale (about
      8.3M samples in stage 1, 15.9M in stage 2, 3.2M in stages 3-4); a run draws --num samples
      with those weights, split evenly over the family's files, in a shuffled stream.
      Token lengths (template overhead of 20 tokens included in every text part):
        - image: an image size is drawn (photos: width lognormal(ln 640, 0.3) in 200..2000 px,
          aspect 4:3 35%, 3:2 20%, 1:1 15%, 3:4 15%, 16:9 10%, 2:3 5%; documents/charts:
          width 800..1700 px, aspect 1:1.41 70%, 3:2 30%) and tiled exactly as Long-VITA does
          (`lvita_data.samples.tiling`: 258 tokens for 1 tile, 258 + rows + 258 n for n tiles,
          n <= 12);
        - caption: 1 photo + U(50, 300) text; long caption (ShareGPT4V, ALLaVA): U(150, 500);
        - instruct (ALLaVA, LVIS, the_cauldron, OneVision): 1 image (70% photo, 30% document)
          + lognormal(median 200, sigma 0.8) text in 20..3000;
        - doc (Docmatix): 1-4 pages (50/25/15/10%) of documents + lognormal(median 300) text;
        - multi-image (M4-Instruct): 2-8 photos + U(50, 500) text;
        - short text (OpenHermes, LIMA, dolly, math): lognormal(median 350, sigma 0.7), 30..4000;
        - short video (VideoGPT+, ShareGemini, M4 video): duration lognormal(median 20 s,
          sigma 0.7) in 2..180 s, 1 fps, frames capped at the stage's max (64 / 512 / 4096),
          258 tokens per frame + U(50, 300) text;
        - LLaVA-Video-178K: duration uniform within a bucket {0-30, 30-60, 60-120, 120-180 s}
          (equal weights), 1 fps capped, + U(30, 600) text;
        - long text: log-uniform 8K..100K tokens;
        - Comic-9K: 5..60 document-like pages + U(200, 1000) text;
        - MovieNet (stage 4): U(1000, 4096) frames + U(500, 3000) text; over 4,064 frames a
          movie does not fit 1M tokens, so some are rejected as too long, as in the original.
      Tiles (the ViT dimension) = tiles per image (n + 1 with the thumbnail) or frames.
  (b) The demo stages: `demo_data/plans/stage{1..4}.json` (columnar `samples.length`, groups =
      `samples.file`), if present.

Methods: ours global BFD; ours BFD per source (stages 1-2, where the original packs per source);
ours BFD windowed (10k); the original online packer (per-source buffers in stages 1-2, two global
buffers in stages 3-4); FFD (global); greedy knapsack over 100-sample buffers. Plus a 2-D run
(tile cap) and a timing run of `plan_packs` on 17M stage-2 lengths at 32K.

    python benchmarks/bench_packing.py [--num 200000] [--timing-num 17000000] [--out PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import time
from collections import Counter
from datetime import date
from pathlib import Path

import numpy as np

from lvita_data.packing.baselines import (
    LEFT_IN_BUFFER,
    pack_first_fit_decreasing,
    pack_greedy_knapsack,
    pack_original_online,
)
from lvita_data.packing.plan import TOO_LONG, plan_packs
from lvita_data.samples.tiling import choose_grid, count_image_tokens, num_tiles

ROOT = Path(__file__).resolve().parents[1]
K = 1024
CAPACITIES = {1: [16 * K, 32 * K, 128 * K], 2: [16 * K, 32 * K, 128 * K]}
CAPACITIES |= {3: [16 * K, 32 * K, 128 * K], 4: [16 * K, 32 * K, 128 * K, 1024 * K]}
MAX_FRAMES = {1: 64, 2: 64, 3: 512, 4: 4096}
TEMPLATE = 20

# (source, family, number of files, samples in thousands at ratio 1)
SHORT_SOURCES = [
    ("llava_recap", "caption", 3, 3700),
    ("allava_caption", "long_caption", 4, 900),
    ("allava_instruct", "instruct", 2, 450),
    ("allava_text", "short_text", 1, 143),
    ("sharegpt4v", "long_caption", 2, 1346),
    ("docmatix", "doc", 1, 1270),
    ("ov_mid", "instruct", 4, 450),
]
STAGE2_ONLY = [
    ("lvis", "instruct", 1, 220),
    ("the_cauldron", "instruct", 29, 1800),
    ("onevision", "instruct", 65, 3200),
    ("m4_images", "multi_image", 1, 600),
    ("m4_video", "short_video", 1, 250),
    ("openhermes", "short_text", 1, 300),
    ("lima_dolly", "short_text", 2, 16),
    ("math", "short_text", 6, 390),
    ("videogpt_plus", "short_video", 11, 500),
    ("sharegemini", "short_video", 2, 300),
]
LONG_SOURCES = [
    ("long_text", "long_text", 19, 300),
    ("comic_9k", "comic", 1, 9),
    ("llava_video_178k", "video_178k", 39, 1300),
]


def stage_sources(stage: int) -> list[tuple[str, str, int, float]]:
    if stage == 1:
        return SHORT_SOURCES
    short = SHORT_SOURCES + STAGE2_ONLY
    if stage == 2:
        return short
    scaled = [(name, fam, files, count * 0.1) for name, fam, files, count in short]
    movienet = [("movienet", "movie", 1, 1.1)] if stage == 4 else []
    return scaled + LONG_SOURCES + movienet


def image_sizes(rng: np.random.Generator, num: int, doc_share: float) -> np.ndarray:
    """(num, 2) image width/height in px, quantized to 8 px."""
    photo_w = np.clip(rng.lognormal(np.log(640), 0.3, num), 200, 2000)
    photo_aspect = rng.choice(
        [4 / 3, 3 / 2, 1, 3 / 4, 16 / 9, 2 / 3], num, p=[0.35, 0.2, 0.15, 0.15, 0.1, 0.05]
    )
    doc_w = rng.uniform(800, 1700, num)
    doc_aspect = rng.choice([1 / 1.414, 1.5], num, p=[0.7, 0.3])
    is_doc = rng.random(num) < doc_share
    width = np.where(is_doc, doc_w, photo_w)
    height = width / np.where(is_doc, doc_aspect, photo_aspect)
    return np.maximum(8, (np.stack([width, height], axis=1) // 8 * 8).astype(np.int64))


def image_tokens(
    rng: np.random.Generator, num: int, doc_share: float
) -> tuple[np.ndarray, np.ndarray]:
    """(tokens, ViT tiles) of num images, tiled exactly as Long-VITA does."""
    pairs, inverse = np.unique(image_sizes(rng, num, doc_share), axis=0, return_inverse=True)
    grids = [choose_grid(int(w), int(h)) for w, h in pairs]
    tokens = np.array([count_image_tokens(g) for g in grids], dtype=np.int64)
    tiles = np.array([num_tiles(g) for g in grids], dtype=np.int64)
    return tokens[inverse.ravel()], tiles[inverse.ravel()]


def multi_images(rng, counts: np.ndarray, doc_share: float) -> tuple[np.ndarray, np.ndarray]:
    """Sum of tokens and tiles over counts[i] images per sample."""
    tokens, tiles = image_tokens(rng, int(counts.sum()), doc_share)
    owner = np.repeat(np.arange(len(counts)), counts)
    return np.bincount(owner, tokens, len(counts)).astype(np.int64), np.bincount(
        owner, tiles, len(counts)
    ).astype(np.int64)


def text(rng, num: int, low: int, high: int) -> np.ndarray:
    return rng.integers(low, high + 1, num) + TEMPLATE


def lognormal_text(rng, num: int, median: float, sigma: float, low: int, high: int) -> np.ndarray:
    return np.clip(rng.lognormal(np.log(median), sigma, num), low, high).astype(np.int64) + TEMPLATE


def video(rng, durations: np.ndarray, max_frames: int) -> tuple[np.ndarray, np.ndarray]:
    frames = np.minimum(np.maximum(durations.astype(np.int64), 1), max_frames)
    return 258 * frames, frames


def family_lengths(rng, family: str, num: int, max_frames: int) -> tuple[np.ndarray, np.ndarray]:
    """(tokens, tiles) of num samples of one family."""
    zeros = np.zeros(num, dtype=np.int64)
    if family in ("caption", "long_caption"):
        tok, tiles = image_tokens(rng, num, 0.0)
        return tok + (
            text(rng, num, 50, 300) if family == "caption" else text(rng, num, 150, 500)
        ), tiles
    if family == "instruct":
        tok, tiles = image_tokens(rng, num, 0.3)
        return tok + lognormal_text(rng, num, 200, 0.8, 20, 3000), tiles
    if family == "doc":
        tok, tiles = multi_images(rng, rng.choice([1, 2, 3, 4], num, p=[0.5, 0.25, 0.15, 0.1]), 1.0)
        return tok + lognormal_text(rng, num, 300, 0.8, 50, 2000), tiles
    if family == "multi_image":
        tok, tiles = multi_images(rng, rng.integers(2, 9, num), 0.0)
        return tok + text(rng, num, 50, 500), tiles
    if family == "short_text":
        return lognormal_text(rng, num, 350, 0.7, 30, 4000), zeros
    if family == "short_video":
        tok, frames = video(rng, np.clip(rng.lognormal(np.log(20), 0.7, num), 2, 180), max_frames)
        return tok + text(rng, num, 50, 300), frames
    if family == "video_178k":
        bucket = rng.integers(0, 4, num)
        lo, hi = np.array([1, 30, 60, 120])[bucket], np.array([30, 60, 120, 180])[bucket]
        tok, frames = video(rng, rng.uniform(lo, hi), max_frames)
        return tok + text(rng, num, 30, 600), frames
    if family == "long_text":
        return np.exp(rng.uniform(np.log(8 * K), np.log(100 * K), num)).astype(np.int64), zeros
    if family == "comic":
        tok, tiles = multi_images(rng, rng.integers(5, 61, num), 1.0)
        return tok + text(rng, num, 200, 1000), tiles
    if family == "movie":
        tok, frames = video(rng, rng.integers(1000, 4097, num), max_frames)
        return tok + text(rng, num, 500, 3000), frames
    raise ValueError(family)


def synth_stage(stage: int, num: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(lengths, tiles, file id) of num samples of the stage model, in a shuffled stream."""
    rng = np.random.default_rng(seed)
    sources = stage_sources(stage)
    weights = np.array([count for *_, count in sources], dtype=float)
    per_source = rng.multinomial(num, weights / weights.sum())
    lengths, tiles, files = [], [], []
    file_base = 0
    for (_, family, num_files, _), count in zip(sources, per_source, strict=True):
        tok, til = family_lengths(rng, family, int(count), MAX_FRAMES[stage])
        lengths.append(tok)
        tiles.append(til)
        files.append(file_base + rng.integers(0, num_files, int(count)))
        file_base += num_files
    order = rng.permutation(num)
    return tuple(np.concatenate(x)[order] for x in (lengths, tiles, files))


def run_methods(lengths, files, capacity: int, per_source: bool) -> list[dict]:
    """One row per method at one capacity."""
    methods = [("ours: BFD global", lambda: plan_packs(lengths, capacity))]
    if per_source:
        methods.append(
            ("ours: BFD per source", lambda: plan_packs(lengths, capacity, groups=files))
        )
    methods.append(("ours: BFD window 10k", lambda: plan_packs(lengths, capacity, window=10_000)))
    original = "original: per-source buffers" if per_source else "original: 2 global buffers"
    groups = files.tolist() if per_source else None
    methods.append((original, lambda: pack_original_online(lengths, capacity, groups=groups)))
    methods.append(("FFD global", lambda: pack_first_fit_decreasing(lengths, capacity)))
    methods.append(("greedy knapsack, buffer 100", lambda: pack_greedy_knapsack(lengths, capacity)))
    rows = []
    for name, run in methods:
        start = time.perf_counter()
        plan = run()
        seconds = time.perf_counter() - start
        reasons = Counter(reason for _, reason in plan.rejected)
        rows.append(
            {
                "capacity": capacity,
                "method": name,
                "packed": len(lengths) - len(plan.rejected),
                "too_long": reasons[TOO_LONG],
                "lost": reasons[LEFT_IN_BUFFER],
                "packs": plan.num_packs,
                "lower_bound": plan.lower_bound(),
                "fill": plan.fill(),
                "seconds": seconds,
            }
        )
    return rows


def table(rows: list[dict]) -> list[str]:
    out = [
        "| capacity | method | packed | too long | lost | packs | LB | packs / LB | fill | time |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        ratio = r["packs"] / r["lower_bound"] if r["lower_bound"] else 1.0
        bold = "**" if r["method"] == "ours: BFD global" else ""
        out.append(
            f"| {r['capacity'] // K}K | {bold}{r['method']}{bold} | {r['packed']:,} "
            f"| {r['too_long']:,} | {r['lost']:,} | {r['packs']:,} | {r['lower_bound']:,} "
            f"| {ratio:.4f} "
            f"| {bold}{100 * r['fill']:.2f}%{bold} | {r['seconds']:.2f} s |"
        )
    return out


def describe(lengths: np.ndarray, files: np.ndarray) -> str:
    q = np.percentile(lengths, [50, 90, 99]).astype(int)
    return (
        f"{len(lengths):,} samples in {len(np.unique(files))} files, "
        f"{int(lengths.sum()):,} tokens; length mean {lengths.mean():,.0f}, "
        f"p50 {q[0]:,}, p90 {q[1]:,}, p99 {q[2]:,}, max {lengths.max():,}"
    )


def synthetic_section(num: int, seed: int) -> tuple[list[str], list[dict]]:
    out = ["## (a) Synthetic Long-VITA mixture, per stage", ""]
    all_rows = []
    for stage in (1, 2, 3, 4):
        lengths, _, files = synth_stage(stage, num, seed + stage)
        out += [f"### Stage {stage} model", "", describe(lengths, files), ""]
        rows = [
            row | {"stage": stage}
            for cap in CAPACITIES[stage]
            for row in run_methods(lengths, files, cap, stage <= 2)
        ]
        out += table(rows) + [""]
        all_rows += rows
        print("\n".join(out[-len(rows) - 3 :]), flush=True)
    return out, all_rows


def summary(rows: list[dict]) -> list[str]:
    """Ranges per method over the synthetic stages at 16K-128K (1M listed apart)."""
    out = [
        "## Summary (synthetic stages)",
        "",
        "| method | capacities | fill | packs / LB | samples lost |",
        "|---|---|---|---|---|",
    ]
    for method in dict.fromkeys(r["method"] for r in rows):
        for label, keep in (("16K-128K", lambda c: c <= 128 * K), ("1M", lambda c: c > 128 * K)):
            sel = [r for r in rows if r["method"] == method and keep(r["capacity"])]
            if not sel:
                continue
            fills = [100 * r["fill"] for r in sel]
            ratios = [r["packs"] / r["lower_bound"] for r in sel]
            worst = max(sel, key=lambda r: r["packs"] / r["lower_bound"])
            lost = sum(r["lost"] for r in sel)
            out.append(
                f"| {method} | {label} | {min(fills):.2f}-{max(fills):.2f}% "
                f"| {min(ratios):.4f}-{max(ratios):.4f} (worst: stage {worst['stage']} at "
                f"{worst['capacity'] // K}K) | {lost:,} in {len(sel)} runs |"
            )
    return out + [""]


def demo_section() -> list[str]:
    out = ["## (b) Demo stages (`demo_data/plans`)", ""]
    for stage in (1, 2, 3, 4):
        path = ROOT / "demo_data" / "plans" / f"stage{stage}.json"
        if not path.exists():
            out += [
                f"- stage {stage}: {path.relative_to(ROOT)} not found, skipped (run `make demo`)."
            ]
            continue
        plan = json.loads(path.read_text())
        lengths = np.asarray(plan["samples"]["length"], dtype=np.int64)
        files = np.asarray(plan["samples"]["file"], dtype=np.int64)
        caps = sorted({int(plan["max_seq_len"]), 16 * K, 32 * K})
        out += [
            f"### Demo stage {stage} (plan max_seq_len {plan['max_seq_len']:,})",
            "",
            describe(lengths, files),
            "",
        ]
        rows = [row for cap in caps for row in run_methods(lengths, files, cap, stage <= 2)]
        out += table(rows) + [""]
    return out


def tiles_section(num: int, seed: int) -> list[str]:
    """2-D packing: the same stage-2 model with a per-pack ViT tile cap."""
    lengths, tiles, _ = synth_stage(2, num, seed + 2)
    out = ["## 2-D packing: token capacity + ViT tile cap (stage 2 model)", ""]
    out += [
        "| capacity | max tiles | packs | lower bound (tokens, tiles) | packs / LB | fill | time |",
        "|---|---|---|---|---|---|---|",
    ]
    for capacity, max_tiles in [(16 * K, 64), (32 * K, 64), (32 * K, 128), (128 * K, 512)]:
        start = time.perf_counter()
        plan = plan_packs(lengths, capacity, tiles=tiles, max_tiles=max_tiles)
        seconds = time.perf_counter() - start
        mask = plan.packed_mask()
        token_lb = -(-int(lengths[mask].sum()) // capacity)
        tile_lb = -(-int(tiles[mask].sum()) // max_tiles)
        out.append(
            f"| {capacity // K}K | {max_tiles} | {plan.num_packs:,} | {token_lb:,}, {tile_lb:,} "
            f"| {plan.num_packs / plan.lower_bound():.4f} | {100 * plan.fill():.2f}% "
            f"| {seconds:.2f} s |"
        )
    print("\n".join(out), flush=True)
    return out + [""]


def timing_section(num: int, seed: int) -> list[str]:
    """One run of plan_packs on num stage-2 lengths at 32K, timed end to end."""
    lengths, _, _ = synth_stage(2, num, seed + 100)
    load = os.getloadavg()[0]
    start, cpu_start = time.perf_counter(), time.process_time()
    plan = plan_packs(lengths, 32 * K)
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
    ratio = plan.num_packs / plan.lower_bound()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    start = time.perf_counter()
    windowed = plan_packs(lengths, 32 * K, window=10_000)
    win_seconds = time.perf_counter() - start
    out = [
        f"## Timing: {num:,} stage-2 lengths at 32K, one core, one run each",
        "",
        f"- global BFD: **{seconds:.1f} s** wall, {cpu_seconds:.1f} s CPU (goal < 60 s), "
        "end to end: sort, BFD, pack lists, "
        f"shuffle; {plan.num_packs:,} packs, {ratio:.5f} x lower bound, "
        f"fill {100 * plan.fill():.3f}%.",
        f"- windowed BFD (10k): {win_seconds:.1f} s; {windowed.num_packs:,} packs, "
        f"fill {100 * windowed.fill():.3f}%.",
        f"- peak RSS of the process (lengths + plan as Python lists): {peak:.1f} GiB; "
        f"1-minute load average at start {load:.2f} on this shared machine.",
        "",
    ]
    print("\n".join(out), flush=True)
    return out


def machine() -> list[str]:
    cpuinfo = Path("/proc/cpuinfo").read_text().splitlines()
    cpu = next((x.split(":", 1)[1].strip() for x in cpuinfo if "model name" in x), "unknown")
    stamp = subprocess.run(["date"], capture_output=True, text=True).stdout.strip()
    return [
        "## Machine",
        "",
        f"- Date: {date.today()} (`date`: {stamp})",
        f"- CPU: {cpu}, {os.cpu_count()} logical cores (one used); "
        f"{platform.system()} {platform.release()}",
        f"- Python {platform.python_version()}, numpy {np.__version__}",
        "",
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--num", type=int, default=200_000, help="samples per synthetic stage")
    parser.add_argument("--timing-num", type=int, default=17_000_000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "packing.md")
    args = parser.parse_args()
    lines = [
        "# Packing benchmark",
        "",
        "Generated by `benchmarks/bench_packing.py` (its docstring gives the synthetic model). "
        "fill = real tokens / (packs x capacity); lower bound (LB) = ceil(tokens of the packed "
        "samples / capacity); `too long` = rejected (longer than the capacity); `lost` = left in "
        "the original's buffers when the stream ends. Time: one run on one core.",
        "",
    ]
    synthetic, rows = synthetic_section(args.num, args.seed)
    lines += summary(rows) + synthetic
    lines += demo_section()
    lines += tiles_section(args.num, args.seed)
    lines += timing_section(args.timing_num, args.seed)
    lines += machine()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
