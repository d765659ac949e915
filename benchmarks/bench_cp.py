"""Context parallelism: per-rank peak memory of a training step at CP = 1, 2, 4, and the analytic
cost table of the 14B model at 128K and 1M tokens.

Memory: one packed sequence of --tokens tokens (one causal document, Long-VITA stages 3-4), a
decoder of --layers layers (hidden 512, 8 query / 2 KV heads, SwiGLU 1536, vocabulary 8,192: small
weights, so activations dominate as they do at long context), fp32, forward + backward with the
logits-masked head (10% supervised), attention through the zigzag ring (and the all-gather-KV
variant) with the reference backend on CPU and gloo between forked ranks. Each rank measures its
own resident-set high-water mark: reset (`/proc/self/clear_refs` = 5) after the model and the
inputs exist, then VmHWM minus VmRSS at that point; glibc returns freed blocks above 1 MiB to the
system (mallopt M_MMAP_THRESHOLD), as a GPU caching allocator's max_memory_allocated would not
count them. The goal (issue 5): peak per rank at CP = 4 <= 0.35x CP = 1.

The analytic table comes from `lvita_model.flops` (no hand-typed numbers).

    python benchmarks/bench_cp.py [--tokens 8192] [--layers 4] [--out benchmarks/results/cp.md]
"""

from __future__ import annotations

import argparse
import ctypes
import os
import platform
import sys
import time
from datetime import date
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests" / "model"))  # the gloo launcher of the CP tests

from dist_utils import run_distributed  # noqa: E402

from lvita_model.attention import SdpaBackend  # noqa: E402
from lvita_model.config import PRESETS, LLMConfig, LongVitaConfig  # noqa: E402
from lvita_model.context_parallel.batch import context_parallel_inputs, global_loss  # noqa: E402
from lvita_model.flops import format_cp_table  # noqa: E402
from lvita_model.model import build_model  # noqa: E402

M_MMAP_THRESHOLD = -3


def status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def measure(rank: int, world_size: int, tokens: int, layers: int, method: str) -> dict:
    ctypes.CDLL("libc.so.6").mallopt(M_MMAP_THRESHOLD, 1 << 20)
    config = LongVitaConfig(
        llm=LLMConfig(
            vocab_size=8192,
            hidden_size=512,
            intermediate_size=1536,
            num_layers=layers,
            num_heads=8,
            num_kv_heads=2,
        ),
        vision=None,
    )
    model = build_model(config, attention_backend=SdpaBackend())
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 8192, (tokens,), generator=generator)
    labels = torch.where(torch.rand(tokens, generator=generator) < 0.1, ids, -100)
    batch = {
        "input_ids": ids,
        "position_ids": torch.arange(tokens),
        "labels": labels,
        "cu_seqlens": torch.tensor([0, tokens], dtype=torch.int32),
    }
    backend = SdpaBackend(block_rows=256)
    local, attention = context_parallel_inputs(batch, None, backend, method=method, pad_id=0)
    Path("/proc/self/clear_refs").write_text("5")
    base = status_kib("VmRSS")
    start = time.perf_counter()
    hidden = model(local.input_ids, local.position_ids, attention=attention)
    loss_sum, count = model.loss(hidden, local.targets)
    loss, mean = global_loss(loss_sum, count, [None])
    loss.backward()
    seconds = time.perf_counter() - start
    return {
        "peak_mib": (status_kib("VmHWM") - base) / 1024,
        "seconds": seconds,
        "loss": mean.item(),
        "local_tokens": int(local.input_ids.shape[0]),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks/results/cp.md")
    args = parser.parse_args()
    rows = []
    for method in ("ring", "allgather"):
        for cp_size in (1, 2, 4):
            results = run_distributed(
                measure, cp_size, args.tokens, args.layers, method, timeout=1800
            )
            peak = max(r["peak_mib"] for r in results)
            rows.append(
                (
                    method,
                    cp_size,
                    peak,
                    max(r["seconds"] for r in results),
                    results[0]["loss"],
                    results[0]["local_tokens"],
                )
            )
    lines = [
        f"# Context parallelism ({date.today()})",
        "",
        f"`python benchmarks/bench_cp.py --tokens {args.tokens} --layers {args.layers}` on "
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch "
        f"{torch.__version__}, gloo, reference attention backend (block_rows 256).",
        "",
        "## Peak memory per rank, forward + backward",
        "",
        f"One causal document of {args.tokens:,} tokens, {args.layers} layers (hidden 512, 8/2 "
        "heads), fp32, logits-masked head; peak RSS above the model and inputs, worst rank.",
        "",
        "| method | CP | tokens / rank | peak MiB / rank | vs CP = 1 | step s (worst) | loss |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for method, cp_size, peak, seconds, loss, local_tokens in rows:
        base = next(r[2] for r in rows if r[0] == method and r[1] == 1)
        lines.append(
            f"| {method} | {cp_size} | {local_tokens:,} | {peak:,.0f} | "
            f"{peak / base:.2f}x | {seconds:.1f} | {loss:.5f} |"
        )
    lines += [
        "",
        "## Analytic costs, Long-VITA 14B (Qwen2.5-14B decoder), bf16 KV",
        "",
        "`lvita_model.flops.format_cp_table`; training FLOPs = 3x dense + 3.5x "
        "causal attention; logits at every position in fp32 vs one 4,096-row chunk of the "
        "logits-masked head; traffic per layer per rank, forward.",
        "",
        format_cp_table(PRESETS["long-vita-14b"].llm, [131072, 1_048_576], [2, 8, 16]),
    ]
    text = "\n".join(lines) + "\n"
    print(text)
    args.out.write_text(text)


if __name__ == "__main__":
    main()
