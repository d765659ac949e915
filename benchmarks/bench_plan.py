"""Planning throughput: samples/s per core of `lvita plan` on an image + text mix.

Builds a synthetic Long-VITA-style JSONL (captions and multi-turn QA over real image files of
varied sizes, some text-only rows), then, on one core in this process:
  1. floor:  read + parse the JSONL and tokenize every turn (no media, no layout);
  2. lvita:  `plan_file` on the same file (selection, parsing, tokenization, header-only image
             probing, tiling, exact layout) - what `lvita plan` runs per file and worker.
Prints samples/s of both and their ratio. Goal: >= 20,000 samples/s per core for lvita.

    python benchmarks/bench_plan.py [--records 50000] [--images 2000] [--workdir /tmp/lvita-bench-plan]
"""

from __future__ import annotations

import argparse
import os
import platform
import random
import time
from pathlib import Path

os.environ.setdefault("RAYON_NUM_THREADS", "1")  # one core: the Rust tokenizer must not fan out
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import orjson  # noqa: E402
from PIL import Image  # noqa: E402

from lvita_data.manifest import DatasetEntry, ImageConfig, PackConfig, StageManifest  # noqa: E402
from lvita_data.planner import _tokenizer_and_template, plan_file  # noqa: E402

WORDS = [
    "the",
    "a",
    "image",
    "shows",
    "chart",
    "of",
    "revenue",
    "growth",
    "over",
    "time",
    "with",
    "blue",
    "bars",
    "and",
    "red",
    "line",
    "axis",
    "labels",
    "person",
    "standing",
    "near",
    "table",
    "window",
    "light",
    "sky",
    "building",
    "text",
    "document",
    "page",
    "figure",
    "describe",
    "what",
    "you",
    "see",
    "in",
    "detail",
    "answer",
    "question",
    "how",
    "many",
    "objects",
    "are",
    "there",
]
SIZES = [(448, 448), (900, 450), (1344, 896), (640, 480), (1024, 768), (300, 1200), (1792, 1344)]


def sentence(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n)).capitalize() + "."


def make_corpus(workdir: Path, num_records: int, num_images: int) -> Path:
    path = workdir / f"mix-{num_records}-{num_images}.jsonl"
    if path.exists():
        return path
    rng = random.Random(0)
    (workdir / "images").mkdir(parents=True, exist_ok=True)
    for i in range(num_images):
        w, h = SIZES[i % len(SIZES)]
        Image.new("RGB", (w, h), (i % 255, 80, 160)).save(
            workdir / "images" / f"{i}.jpg", quality=60
        )
    with open(path.with_suffix(".tmp"), "wb") as out:
        for i in range(num_records):
            kind = rng.random()
            if kind < 0.15:  # text only
                messages = [
                    {"role": "user", "content": sentence(rng, rng.randint(10, 60))},
                    {"role": "assistant", "content": sentence(rng, rng.randint(20, 200))},
                ]
                record = {"messages": messages}
            else:
                turns = 1 if kind < 0.7 else rng.randint(2, 4)
                messages = []
                for t in range(turns):
                    prefix = "<image>\n" if t == 0 else ""
                    messages.append(
                        {"role": "user", "content": prefix + sentence(rng, rng.randint(5, 30))}
                    )
                    messages.append(
                        {"role": "assistant", "content": sentence(rng, rng.randint(10, 120))}
                    )
                record = {
                    "messages": messages,
                    "images": [f"images/{rng.randrange(num_images)}.jpg"],
                }
            out.write(orjson.dumps(record) + b"\n")
    os.replace(path.with_suffix(".tmp"), path)
    return path


def floor(path: Path) -> float:
    tokenizer, _ = _tokenizer_and_template("qwen2.5")
    start = time.perf_counter()
    lines = path.read_bytes().split(b"\n")
    records = [orjson.loads(line) for line in lines if line]
    texts = [m["content"] for r in records for m in r["messages"]]
    for i in range(0, len(texts), 2048):
        tokenizer.encode_batch(texts[i : i + 2048])
    return time.perf_counter() - start


def lvita(path: Path, workdir: Path) -> tuple[float, int]:
    entry = DatasetEntry(
        name="mix", format="longvita_jsonl", path=str(path), media_root=str(workdir)
    )
    manifest = StageManifest(
        schema_version=1,
        stage="bench",
        seed=42,
        pack=PackConfig(max_seq_len=32768, reset_attention=True),
        image=ImageConfig(),
        datasets=[entry],
    )
    start = time.perf_counter()
    plan = plan_file(entry, str(path), manifest)
    seconds = time.perf_counter() - start
    assert not plan.rejects, plan.rejects[:3]
    return seconds, len(plan.samples)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--records", type=int, default=50_000)
    parser.add_argument("--images", type=int, default=2_000)
    parser.add_argument("--workdir", default="/tmp/lvita-bench-plan")
    args = parser.parse_args()
    workdir = Path(args.workdir)
    path = make_corpus(workdir, args.records, args.images)
    _tokenizer_and_template("qwen2.5")  # load (or convert and cache) the vocabulary first
    floor_s = min(floor(path) for _ in range(2))
    lvita_s, samples = min(lvita(path, workdir) for _ in range(2))
    print(
        f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, one used"
    )
    print("| pass | samples | seconds | samples/s per core |")
    print("|---|---|---|---|")
    print(
        f"| floor: parse + tokenize only | {args.records} | {floor_s:.2f} | {args.records / floor_s:,.0f} |"
    )
    print(
        f"| lvita plan_file (exact lengths) | {samples} | {lvita_s:.2f} | {samples / lvita_s:,.0f} |"
    )
    print(
        f"lvita / floor time ratio: {lvita_s / floor_s:.2f}x; goal >= 20,000 samples/s: "
        f"{'met' if samples / lvita_s >= 20_000 else 'NOT met'}"
    )


if __name__ == "__main__":
    main()
