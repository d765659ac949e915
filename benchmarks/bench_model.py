"""Decoder training throughput on a GPU: our Qwen2 vs transformers' Qwen2ForCausalLM (SDPA).

The Qwen2.5-0.5B shape (language model only), bf16 weights, one packed sequence of --tokens
(default 32,768), forward + backward (no optimizer step), best-of-steps timing after warm-up, in
one process on one GPU:

  - transformers: `Qwen2ForCausalLM(attn_implementation="sdpa")`, one causal sequence, `labels`
    given (its loss computes logits at every position);
  - ours, one document: the same causal sequence, attention backend "auto" (flash-attn if
    installed, else torch's varlen flash kernel), logits-masked head with 10% supervised tokens;
  - ours, packed: the same tokens as 8 documents (cu_seqlens; attention within each), as the
    data pipeline packs stages 1-2.
Both sides optionally recompute each layer in backward (--checkpoint). Peak memory is
`torch.cuda.max_memory_allocated` during the timed steps. tokens/s counts every token.

    python benchmarks/bench_model.py [--tokens 32768] [--steps 5] [--checkpoint]
"""

from __future__ import annotations

import argparse
import dataclasses
import platform
import sys
import time
from datetime import date
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from lvita_model.config import PRESETS  # noqa: E402
from lvita_model.head import next_token_targets  # noqa: E402
from lvita_model.model import build_model  # noqa: E402


def timed(step, steps: int) -> tuple[float, float]:
    """(best seconds per step, peak GiB) over `steps` after two warm-up steps."""
    for _ in range(2):
        step()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    best = float("inf")
    for _ in range(steps):
        start = time.perf_counter()
        step()
        torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return best, torch.cuda.max_memory_allocated() / 2**30


def bench_transformers(config, ids: torch.Tensor, steps: int, checkpoint: bool):
    import transformers

    llm = config.llm
    hf_config = transformers.Qwen2Config(
        vocab_size=llm.vocab_size,
        hidden_size=llm.hidden_size,
        intermediate_size=llm.intermediate_size,
        num_hidden_layers=llm.num_layers,
        num_attention_heads=llm.num_heads,
        num_key_value_heads=llm.num_kv_heads,
        rope_theta=llm.rope_theta,
        tie_word_embeddings=llm.tie_word_embeddings,
        max_position_embeddings=max(llm.max_position_embeddings, ids.numel()),
    )
    model = transformers.Qwen2ForCausalLM._from_config(
        hf_config, attn_implementation="sdpa", dtype=torch.bfloat16
    ).cuda()
    if checkpoint:
        model.gradient_checkpointing_enable()
    model.train()

    def step():
        out = model(input_ids=ids[None], labels=ids[None])
        out.loss.backward()
        model.zero_grad(set_to_none=True)

    return timed(step, steps)


def bench_ours(config, ids: torch.Tensor, cu_seqlens: list[int], steps: int, checkpoint: bool):
    model = build_model(config, device="cuda", dtype=torch.bfloat16)
    model.model.checkpoint_layers = checkpoint
    model.train()
    positions = torch.cat(
        [
            torch.arange(b - a, device="cuda")
            for a, b in zip(cu_seqlens[:-1], cu_seqlens[1:], strict=True)
        ]
    )
    labels = torch.where(torch.rand(ids.shape, device="cuda") < 0.1, ids, -100)
    targets = next_token_targets(labels, cu_seqlens)

    def step():
        hidden = model(ids, positions, cu_seqlens=cu_seqlens)
        loss_sum, count = model.loss(hidden, targets)
        (loss_sum / count.clamp(min=1)).backward()
        model.zero_grad(set_to_none=True)

    return timed(step, steps), model.backend_for(ids.device, torch.bfloat16).name


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, default=32768)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--checkpoint", action="store_true")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks/results/model.md")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench_model.py measures GPU throughput; no CUDA device here")
    config = dataclasses.replace(PRESETS["qwen2.5-0.5b"], vision=None)
    torch.manual_seed(0)
    ids = torch.randint(0, 151_000, (args.tokens,), device="cuda")
    doc = args.tokens // 8
    rows = []
    try:
        hf_time, hf_mem = bench_transformers(config, ids, args.steps, args.checkpoint)
    except torch.OutOfMemoryError:
        hf_time = hf_mem = float("nan")  # reported as out of memory
    torch.cuda.empty_cache()
    rows.append(("transformers Qwen2 (sdpa), 1 causal sequence", hf_time, hf_mem))
    (one_time, one_mem), backend = bench_ours(
        config, ids, [0, args.tokens], args.steps, args.checkpoint
    )
    rows.append((f"ours ({backend}), 1 causal sequence", one_time, one_mem))
    torch.cuda.empty_cache()
    (packed_time, packed_mem), _ = bench_ours(
        config, ids, [i * doc for i in range(8)] + [args.tokens], args.steps, args.checkpoint
    )
    rows.append((f"ours ({backend}), 8 packed documents", packed_time, packed_mem))

    lines = [
        f"# Decoder fwd+bwd throughput ({date.today()})",
        "",
        f"{torch.cuda.get_device_name()}, torch {torch.__version__}, Python "
        f"{platform.python_version()}; Qwen2.5-0.5B shape (LLM only), bf16, T = {args.tokens}, "
        f"activation checkpointing {'on' if args.checkpoint else 'off'}, best of {args.steps}.",
        "",
        "| variant | s/step | tokens/s | vs transformers | peak GiB |",
        "|---|---:|---:|---:|---:|",
    ]
    for name, seconds, peak in rows:
        if seconds != seconds:  # NaN: out of memory
            lines.append(f"| {name} | out of memory (80 GB) | | | |")
            continue
        ratio = "" if hf_time != hf_time else f"{hf_time / seconds:.2f}x"
        lines.append(
            f"| {name} | {seconds:.3f} | {args.tokens / seconds:,.0f} | {ratio} | {peak:.1f} |"
        )
    text = "\n".join(lines) + "\n"
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)


if __name__ == "__main__":
    main()
