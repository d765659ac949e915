"""Training steps of `lvita train` on one GPU: tokens/s, MFU and peak memory at 32K packed.

The loop's own pieces (`pipelines.train.loop.prepare_model` and `train_step`: FSDP2 over a world
of one, fp32 master weights with bf16 compute, activation checkpointing per decoder layer, the
logits-masked head, the stage-3 recipe: projector + LLM trainable, AdamW, clip 1.0) on the
Qwen2.5-0.5B-shaped Long-VITA (`qwen2.5-0.5b` preset: InternViT-300M + projector + 0.5B decoder),
attention backend "auto" (the fastest one the machine has). Synthetic packed sequences of
--tokens tokens (token ids uniform, 25% supervised, no tiles: the tower runs its zero-tile
dummy), either one causal document (stages 3-4) or --docs documents (stages 1-2). --steps timed
optimizer steps after one warm-up step; peak = torch.cuda.max_memory_allocated over them; MFU
from `pipelines.train.metrics.step_flops` against the device's bf16 peak.

    PYTHONPATH=. python benchmarks/bench_train.py [--tokens 32768] [--docs 1] [--steps 4]
"""

from __future__ import annotations

import argparse
import sys
import time
from datetime import date
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from lvita_data.strict_yaml import build_dataclass  # noqa: E402
from lvita_model.config import PRESETS  # noqa: E402
from pipelines.runtime import init_runtime, shutdown  # noqa: E402
from pipelines.train.config import TrainConfig  # noqa: E402
from pipelines.train.loop import prepare_model, train_step  # noqa: E402
from pipelines.train.metrics import peak_flops, step_flops, vision_params  # noqa: E402
from pipelines.train.recipes import make_optimizer, make_scheduler, resolve_recipe  # noqa: E402


def synthetic_batch(tokens: int, docs: int, device: torch.device, seed: int) -> dict:
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 151_000, (1, tokens), generator=generator)
    labels = torch.where(torch.rand(1, tokens, generator=generator) < 0.25, ids, -100)
    bounds = torch.linspace(0, tokens, docs + 1).long()
    positions = torch.cat(
        [torch.arange(int(b - a)) for a, b in zip(bounds[:-1], bounds[1:], strict=True)]
    )
    return {
        "input_ids": ids.to(device),
        "labels": labels.to(device),
        "position_ids": positions[None].to(device),
        "cu_seqlens": bounds.to(torch.int32).to(device),
        "image_token_positions": torch.zeros(0, 256, dtype=torch.long, device=device),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, default=32768)
    parser.add_argument("--docs", type=int, default=1)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench_train.py measures GPU training steps; no CUDA device here")
    config = build_dataclass(
        TrainConfig,
        {
            "schema_version": 1,
            "stage": 3,
            "data": {"shards": "unused"},
            "model": {"name": "qwen2.5-0.5b"},
            "output": {"dir": "unused"},
            "recipe": {"iterations": 100, "global_batch": 1},
        },
    )
    recipe = resolve_recipe(config)
    runtime = init_runtime(1)
    module = prepare_model(config, recipe, runtime)
    optimizer = make_optimizer(module.model, recipe)
    scheduler = make_scheduler(optimizer, recipe)
    backend = module.model.backend_for(runtime.device, torch.bfloat16).name
    times, losses = [], []
    for step in range(args.steps + 1):
        batch = synthetic_batch(args.tokens, args.docs, runtime.device, seed=step)
        if step == 1:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        stats = train_step(module, [batch], runtime, optimizer, scheduler, recipe.clip_grad_norm)
        torch.cuda.synchronize()
        if step:
            times.append(time.perf_counter() - start)
        losses.append(stats.loss)
    seconds = sorted(times)[len(times) // 2]
    flops = step_flops(
        PRESETS["qwen2.5-0.5b"],
        vision_parameters=vision_params(module.model),
        tokens=args.tokens,
        supervised=stats.supervised,
        squared_lengths=stats.squared_lengths,
        tiles=0,
    )
    peak = peak_flops(runtime.device)
    mfu = f"{flops / seconds / peak:.1%}" if peak else "n/a"
    text = (
        f"# lvita train step, {torch.cuda.get_device_name()} ({date.today()})\n\n"
        f"torch {torch.__version__}; qwen2.5-0.5b preset (InternViT-300M + 0.5B decoder), stage-3 "
        f"recipe, FSDP2 world 1, bf16 compute / fp32 master, activation checkpointing, attention "
        f"backend {backend}; T = {args.tokens:,} in {args.docs} document(s), 25% supervised.\n\n"
        "| median s/step | tokens/s | MFU | peak GiB | losses |\n|---:|---:|---:|---:|---|\n"
        f"| {seconds:.3f} | {args.tokens / seconds:,.0f} | {mfu} | "
        f"{torch.cuda.max_memory_allocated() / 2**30:.1f} | "
        f"{', '.join(f'{x:.3f}' for x in losses)} |\n"
    )
    print(text)
    if args.out:
        args.out.write_text(text)
    shutdown(runtime)


if __name__ == "__main__":
    main()
