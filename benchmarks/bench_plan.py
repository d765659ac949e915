"""Planning throughput: samples/s per core of `lvita plan` on image + text mixes.

Writes synthetic Long-VITA-style JSONL files over real JPEG files of varied sizes (85% image
samples, a third of them multi-turn; 15% text-only), in two flavours:
  - realistic: user prompts drawn from a pool of 24 instructions, as caption / QA sets have them;
  - unique:    every turn is unique text (the worst case for tokenization).
Then, on one core in this process (RAYON_NUM_THREADS=1), for each mix:
  1. floor:  read + parse the JSONL and tokenize every turn (no media, no layout, no dedup);
  2. lvita:  `plan_file` on the same file: mixture selection, parsing, tokenization, header-only
             image probing, tiling, exact length - what `lvita plan` runs per file and worker.
The two passes alternate, `--repeats` times each; every cell is the best run. Wall and CPU
(process) seconds are both kept: on a shared machine other jobs stretch wall time, so the ratio is
taken on CPU time (both passes run on one thread, so on a quiet machine the two agree).
Prints samples/s and the lvita / floor ratio. Goal from the issue: >= 20,000 samples/s per core.

    python benchmarks/bench_plan.py [--records 50000] [--images 5000] [--repeats 3] [--workdir DIR]
"""

from __future__ import annotations

import argparse
import os
import platform
import random
import time
from datetime import date
from pathlib import Path

os.environ.setdefault("RAYON_NUM_THREADS", "1")  # one core: the Rust tokenizer must not fan out
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import orjson  # noqa: E402
from PIL import Image  # noqa: E402
from synthetic_text import PROMPTS as BASE_PROMPTS  # noqa: E402  (this folder)
from synthetic_text import WORDS  # noqa: E402

from lvita_data.build.plan import plan_file  # noqa: E402
from lvita_data.manifest import DatasetEntry, PackConfig, StageManifest  # noqa: E402
from lvita_data.samples.read import tokenizer_and_template  # noqa: E402

PROMPTS = [  # the 8 instructions as they are, and each with two endings: 24 in all
    p if i < 8 else f"{p} Answer briefly." if i < 16 else f"{p} Be precise."
    for i, p in enumerate(BASE_PROMPTS * 3)
]
SIZES = [(448, 448), (900, 450), (1344, 896), (640, 480), (1024, 768), (300, 1200), (1792, 1344)]


def sentence(rng: random.Random, low: int, high: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(low, high))).capitalize() + "."


def make_images(workdir: Path, count: int) -> None:
    folder = workdir / "images"
    if len(list(folder.glob("*.jpg"))) >= count:
        return
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        width, height = SIZES[i % len(SIZES)]
        Image.new("RGB", (width, height), (i % 255, 80, 160)).save(folder / f"{i}.jpg", quality=60)


def make_mix(workdir: Path, kind: str, num_records: int, num_images: int) -> Path:
    path = workdir / f"{kind}-{num_records}-{num_images}.jsonl"
    if path.exists():
        return path
    rng = random.Random(0)
    lines = []
    for _ in range(num_records):
        draw = rng.random()
        user = (
            (lambda: rng.choice(PROMPTS)) if kind == "realistic" else (lambda: sentence(rng, 5, 30))
        )
        if draw < 0.15:
            messages = [
                {"role": "user", "content": sentence(rng, 10, 60)},
                {"role": "assistant", "content": sentence(rng, 20, 200)},
            ]
            record = {"messages": messages}
        else:
            messages = []
            for turn in range(1 if draw < 0.7 else rng.randint(2, 4)):
                prefix = "<image>\n" if turn == 0 else ""
                messages.append({"role": "user", "content": prefix + user()})
                messages.append({"role": "assistant", "content": sentence(rng, 10, 120)})
            record = {"messages": messages, "images": [f"images/{rng.randrange(num_images)}.jpg"]}
        lines.append(orjson.dumps(record))
    path.with_suffix(".tmp").write_bytes(b"\n".join(lines) + b"\n")
    os.replace(path.with_suffix(".tmp"), path)
    return path


def timed(run, *args) -> tuple[float, float, int]:
    """(wall seconds, CPU seconds, samples) of one run."""
    wall, cpu = time.perf_counter(), time.process_time()
    samples = run(*args)
    return time.perf_counter() - wall, time.process_time() - cpu, samples


def floor(path: Path) -> int:
    tokenizer, _ = tokenizer_and_template("qwen2.5")
    records = [orjson.loads(line) for line in path.read_bytes().split(b"\n") if line]
    texts = [m["content"] for r in records for m in r["messages"]]
    for i in range(0, len(texts), 2048):
        tokenizer.encode_batch(texts[i : i + 2048])
    return len(records)


def lvita(path: Path, workdir: Path) -> int:
    entry = DatasetEntry(
        name="mix", format="longvita_jsonl", path=str(path), media_root=str(workdir)
    )
    manifest = StageManifest(
        schema_version=1,
        stage="bench",
        seed=42,
        pack=PackConfig(max_seq_len=32768, reset_attention=True),
        datasets=[entry],
    )
    plan = plan_file(entry, str(path), manifest)
    assert not plan.rejects, plan.rejects[:3]
    return plan.num_samples


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--records", type=int, default=50_000)
    parser.add_argument("--images", type=int, default=5_000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--workdir", default="/tmp/lvita-bench-plan")
    args = parser.parse_args()
    workdir = Path(args.workdir)
    make_images(workdir, args.images)
    tokenizer_and_template("qwen2.5")  # load (or convert and cache) the vocabulary first
    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if "model name" in line
        ),
        platform.machine(),
    )
    python = platform.python_version()
    print(f"{date.today()}, {cpu}, {os.cpu_count()} cores (one used), Python {python}")
    print("| mix | pass | samples | wall s | CPU s | samples/s (CPU) | lvita / floor CPU |")
    print("|---|---|---|---|---|---|---|")
    for kind in ("realistic", "unique"):
        path = make_mix(workdir, kind, args.records, args.images)
        runs: dict[str, list[tuple[float, float, int]]] = {"floor": [], "lvita": []}
        for _ in range(args.repeats):
            runs["floor"].append(timed(floor, path))
            runs["lvita"].append(timed(lvita, path, workdir))
        best = {
            name: (min(r[0] for r in done), min(r[1] for r in done), done[0][2])
            for name, done in runs.items()
        }
        ratio = best["lvita"][1] / best["floor"][1]
        for name, label in (("floor", "floor: parse + tokenize"), ("lvita", "lvita plan (exact)")):
            wall, cpu, samples = best[name]
            cells = f"{samples} | {wall:.2f} | {cpu:.2f} | {samples / cpu:,.0f}"
            print(f"| {kind} | {label} | {cells} | {f'{ratio:.2f}x' if name == 'lvita' else ''} |")


if __name__ == "__main__":
    main()
