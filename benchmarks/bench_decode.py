"""Decode time per token: KV cache (`lvita_model.inference`) vs the original's recompute.

The original Long-VITA server keeps no KV cache under context parallelism: every decoded token
re-runs the whole sequence (prompt + tokens so far). This benchmark measures, side by side, for
each prompt length T (random token ids, greedy decoding, EOS disabled):

  1 proc, KV cache     `generate`: prefill once, then `--kv-steps` one-token decode steps;
                       reported: prefill s and mean ms per decode step
  1 proc, recompute    `generate_recompute`: `--recompute-steps` full forwards of the growing
                       sequence; reported: mean s per token
  CP=2, KV cache       `generate(group=...)` on 2 gloo ranks (`tests/model/dist_utils.py`
                       forks them): zigzag ring prefill into per-rank KV shards, decode by LSE
                       merge of the ranks' partial attention; rank 0's times
  CP=2, recompute      the original's CP inference: per token, a CP prefill (ring attention
                       over the zigzag shards) of the whole growing sequence, on 2 ranks

and checks that all four produce the same greedy tokens (over the steps they share).

Model: a decoder-only shape small enough for a 2-vCPU machine at 16K tokens, with Qwen2.5's
real vocabulary (the last-position head reads the 152,064 x H matrix every token), fp32, the
`sdpa` reference attention backend (CPU). `--threads` torch threads per process (default 1:
on the shared 2-vCPU VM a decode step took 116 ms with 2 threads and 20 ms with 1, OpenMP
barriers waiting on a busy sibling vCPU; CP=2 then uses the two cores, one rank each).

    PYTHONPATH=. python benchmarks/bench_decode.py [--lengths 2048,4096,8192,16384]
        [--kv-steps 32] [--recompute-steps 2] [--threads 1] [--no-cp] [--out PATH]

Writes the table to benchmarks/results/decode.md (machine, date, torch) and prints it.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from datetime import date
from pathlib import Path

import torch
import torch.distributed as dist

from lvita_model.attention import SdpaBackend
from lvita_model.baselines import generate_recompute
from lvita_model.config import LLMConfig, LongVitaConfig
from lvita_model.head import last_position_logits
from lvita_model.inference import generate
from lvita_model.model import build_model

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "model"))
from dist_utils import run_distributed  # noqa: E402 - the project's fork launcher for gloo ranks

SHAPE = LongVitaConfig(
    llm=LLMConfig(
        vocab_size=152064,
        hidden_size=256,
        intermediate_size=688,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
    ),
    vision=None,
)
SEED = 0
MIB = 2**20


def _prompt(length: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(length)
    return torch.randint(0, 151_000, (length,), generator=generator)


def _model():
    return build_model(SHAPE, seed=SEED, attention_backend=SdpaBackend()).eval()


def _warm_up(model, group=None) -> None:
    """One short generation first, so no measured run pays first-call costs."""
    generate(model, _prompt(64), max_new_tokens=4, eos_token_id=None, group=group)


def head_ms(repeat: int = 20) -> float:
    """ms of the last-position LM head alone (the [V, H] matrix read once per token)."""
    model = _model()
    hidden = torch.randn(1, SHAPE.llm.hidden_size)
    last_position_logits(hidden, model.head_weight, [0, 1])
    started = time.perf_counter()
    for _ in range(repeat):
        last_position_logits(hidden, model.head_weight, [0, 1])
    return 1000 * (time.perf_counter() - started) / repeat


def single_process(length: int, kv_steps: int, recompute_steps: int) -> dict:
    """KV cache and recompute in this process."""
    model, ids = _model(), _prompt(length)
    _warm_up(model)
    cached = generate(model, ids, max_new_tokens=kv_steps + 1, eos_token_id=None)
    recomputed = generate_recompute(model, ids, max_new_tokens=recompute_steps, eos_token_id=None)
    per_token = (recomputed.prefill_seconds + recomputed.decode_seconds) / recompute_steps
    return {
        "tokens": cached.tokens,
        "recompute_tokens": recomputed.tokens,
        "prefill_s": cached.prefill_seconds,
        "kv_ms": 1000 * cached.decode_seconds / kv_steps,
        "recompute_s": per_token,
        "cache_mib": cached.cache_bytes / MIB,
    }


def _cp_worker(rank: int, world_size: int, lengths, kv_steps, recompute_steps, threads) -> list:
    torch.set_num_threads(threads)
    group = dist.group.WORLD
    model, out = _model(), []
    _warm_up(model, group)
    for length in lengths:
        ids = _prompt(length)
        cached = generate(model, ids, max_new_tokens=kv_steps + 1, eos_token_id=None, group=group)
        times, tokens = [], []
        for step in range(recompute_steps):  # the original: the whole sequence again per token
            sequence = torch.cat([ids, torch.tensor(cached.tokens[:step], dtype=ids.dtype)])
            dist.barrier()
            started = time.perf_counter()
            result = generate(model, sequence, max_new_tokens=1, eos_token_id=None, group=group)
            tokens += result.tokens
            times.append(time.perf_counter() - started)
        out.append(
            {
                "tokens": cached.tokens,
                "recompute_tokens": tokens,
                "prefill_s": cached.prefill_seconds,
                "kv_ms": 1000 * cached.decode_seconds / kv_steps,
                "recompute_s": sum(times) / len(times),
                "cache_mib": cached.cache_bytes / MIB,
            }
        )
    return out


def context_parallel(lengths, kv_steps: int, recompute_steps: int, threads: int) -> list[dict]:
    per_rank = run_distributed(
        _cp_worker, 2, lengths, kv_steps, recompute_steps, threads, timeout=3600.0
    )
    for row, other in zip(per_rank[0], per_rank[1], strict=True):
        row["cache_mib"] = (row["cache_mib"], other["cache_mib"])
        row["same_on_ranks"] = row["tokens"] == other["tokens"]
    return per_rank[0]


def _tokens_equal(single: dict, cp: dict | None, recompute_steps: int) -> bool:
    reference = single["tokens"]
    checks = [single["recompute_tokens"] == reference[:recompute_steps]]
    if cp is not None:
        checks += [
            cp["tokens"] == reference,
            cp["recompute_tokens"] == reference[:recompute_steps],
            cp["same_on_ranks"],
        ]
    return all(checks)


def _table(lengths, singles, cps, recompute_steps) -> str:
    head = (
        "| prompt T | KV MiB (1 proc) | prefill s | KV decode ms/token | recompute s/token | "
        "speed-up | CP=2 KV MiB/rank | CP=2 prefill s | CP=2 KV decode ms/token | "
        "CP=2 recompute s/token | CP=2 speed-up | same tokens |\n" + "|---" * 12 + "|\n"
    )
    rows = []
    for index, length in enumerate(lengths):
        one = singles[index]
        cp = cps[index] if cps else None
        cells = [
            f"{length:,}",
            f"{one['cache_mib']:.1f}",
            f"{one['prefill_s']:.2f}",
            f"{one['kv_ms']:.1f}",
            f"{one['recompute_s']:.2f}",
            f"**{1000 * one['recompute_s'] / one['kv_ms']:.0f}x**",
        ]
        if cp is None:
            cells += ["-"] * 5
        else:
            cells += [
                " / ".join(f"{m:.1f}" for m in cp["cache_mib"]),
                f"{cp['prefill_s']:.2f}",
                f"{cp['kv_ms']:.1f}",
                f"{cp['recompute_s']:.2f}",
                f"**{1000 * cp['recompute_s'] / cp['kv_ms']:.0f}x**",
            ]
        cells.append("yes" if _tokens_equal(one, cp, recompute_steps) else "**NO**")
        rows.append("| " + " | ".join(cells) + " |")
    return head + "\n".join(rows) + "\n"


def _machine(threads: int) -> str:
    cpu = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return (
        f"{date.today().isoformat()}, {cpu}, {os.cpu_count()} CPUs, torch {torch.__version__} "
        f"({threads} thread(s) per process), Python {platform.python_version()}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--lengths", default="2048,4096,8192,16384")
    parser.add_argument("--kv-steps", type=int, default=32)
    parser.add_argument("--recompute-steps", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--no-cp", action="store_true", help="skip the CP=2 gloo runs")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "decode.md"))
    args = parser.parse_args()
    lengths = [int(x) for x in args.lengths.split(",")]
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    singles = []
    for length in lengths:
        singles.append(single_process(length, args.kv_steps, args.recompute_steps))
        print(f"T={length}: 1 proc {singles[-1]}", file=sys.stderr)
    cps = None
    if not args.no_cp:
        cps = context_parallel(lengths, args.kv_steps, args.recompute_steps, args.threads)
    table = _table(lengths, singles, cps, args.recompute_steps)
    head = head_ms()
    llm = SHAPE.llm
    report = (
        "# Decode benchmark (`benchmarks/bench_decode.py`)\n\n"
        "Time per generated token with the KV cache (`lvita_model.inference.generate`) against "
        "re-running the whole sequence per token (the original's inference under CP), in one "
        "process and over CP=2 gloo ranks; the script's docstring gives the method.\n\n"
        f"`PYTHONPATH=. python benchmarks/bench_decode.py --lengths {args.lengths} "
        f"--kv-steps {args.kv_steps} --recompute-steps {args.recompute_steps} "
        f"--threads {args.threads}`\n\n"
        f"{_machine(args.threads)}\n\n"
        f"Shape: decoder only, hidden {llm.hidden_size}, {llm.num_layers} layers, "
        f"{llm.num_heads} query / {llm.num_kv_heads} KV heads (D = {llm.head_dim}), MLP "
        f"{llm.intermediate_size}, vocabulary {llm.vocab_size:,}, fp32, `sdpa` reference "
        f"attention; KV decode = mean of {args.kv_steps} steps, recompute = mean of "
        f"{args.recompute_steps} tokens. Speed-up = recompute time / KV decode time per token. "
        "KV MiB: the cache after generation (CP=2: rank 0 / rank 1). Of each KV decode step, "
        f"the last-position LM head alone ({llm.vocab_size:,} x {llm.hidden_size} fp32, "
        f"{llm.vocab_size * llm.hidden_size * 4 / MIB:.0f} MiB read per token) takes "
        f"{head:.1f} ms.\n\n"
        f"{table}\n"
        f"Whole run: {time.perf_counter() - started:.0f} s.\n"
    )
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(report)
    print(report)


if __name__ == "__main__":
    main()
