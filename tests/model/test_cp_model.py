"""Context parallelism on the whole tiny Long-VITA model: CP=2 / CP=4 loss and every parameter
gradient (after the CP all-reduce) equal the single-process step, with gloo on CPU, for each CP
attention (ring, all-gather, Ulysses)."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from dist_utils import run_distributed

from lvita_model.attention import SdpaBackend
from lvita_model.config import LLMConfig, LongVitaConfig, VisionConfig
from lvita_model.context_parallel.batch import context_parallel_inputs, global_loss
from lvita_model.head import next_token_targets
from lvita_model.model import build_model

CONFIG = LongVitaConfig(
    llm=LLMConfig(
        vocab_size=512,
        hidden_size=64,
        intermediate_size=96,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
    ),
    vision=VisionConfig(
        image_size=56,
        patch_size=14,
        hidden_size=32,
        intermediate_size=64,
        num_layers=2,
        num_heads=2,
    ),
    vision_chunk_tiles=2,
)
PER_TILE = 4


def make_batch(reset_attention: bool) -> dict[str, torch.Tensor]:
    """One packed sequence: 3 samples with 0-2 tiles each (stages 1-2: positions restart and
    attention is per sample; stages 3-4: one causal document, positions 0..T-1)."""
    generator = torch.Generator().manual_seed(7)
    lengths, tiles_at = [23, 9, 34], [3, 8, 41, 50]
    total = sum(lengths)
    ids = torch.randint(0, 512, (total,), generator=generator)
    labels = torch.where(torch.rand(total, generator=generator) < 0.7, ids, -100)
    placeholders = torch.stack([torch.arange(s, s + PER_TILE) for s in tiles_at])
    labels[placeholders.reshape(-1)] = -100
    cu = torch.tensor([0, 23, 32, 66], dtype=torch.int32)
    if reset_attention:
        positions = torch.cat([torch.arange(n) for n in lengths])
    else:
        positions, cu = torch.arange(total), torch.tensor([0, total], dtype=torch.int32)
    return {
        "input_ids": ids[None],
        "position_ids": positions[None],
        "labels": labels[None],
        "cu_seqlens": cu,
        "pixel_values": torch.randn(len(tiles_at), 3, 56, 56, generator=generator),
        "image_token_positions": placeholders,
    }


def reference_step(batch):
    model = build_model(CONFIG, seed=3, attention_backend=SdpaBackend())
    hidden = model(
        batch["input_ids"][0],
        batch["position_ids"][0],
        cu_seqlens=batch["cu_seqlens"],
        pixel_values=batch["pixel_values"],
        image_token_positions=batch["image_token_positions"],
    )
    loss_sum, count = model.loss(
        hidden, next_token_targets(batch["labels"][0], batch["cu_seqlens"])
    )
    (loss_sum / count).backward()
    return (loss_sum / count).item(), {n: p.grad.clone() for n, p in model.named_parameters()}


def cp_step(batch, method: str):
    model = build_model(CONFIG, seed=3, attention_backend=SdpaBackend())
    local, attention = context_parallel_inputs(batch, None, SdpaBackend(), method=method, pad_id=0)
    hidden = model(
        local.input_ids,
        local.position_ids,
        attention=attention,
        pixel_values=local.pixel_values,
        image_token_positions=local.image_token_positions,
    )
    loss_sum, count = model.loss(hidden, local.targets)
    loss, mean = global_loss(loss_sum, count, [None])
    loss.backward()
    grads = {}
    for name, param in model.named_parameters():
        dist.all_reduce(param.grad)  # SUM over the CP group
        grads[name] = param.grad
    return mean.item(), grads, int(local.pixel_values.shape[0])


def compare(rank: int, world_size: int) -> list[tuple]:
    """Every case on this rank: (case, loss error, worst relative gradient error, its name,
    tiles this rank encoded)."""
    rows = []
    for reset in (True, False):
        batch = make_batch(reset)
        ref_loss, ref_grads = reference_step(batch)
        for method in ("ring", "allgather", "ulysses"):
            loss, grads, tiles = cp_step(batch, method)
            worst, worst_name = 0.0, ""
            for name, ref in ref_grads.items():
                error = (grads[name] - ref).abs().max().item() / (ref.abs().max().item() + 1e-30)
                if error > worst:
                    worst, worst_name = error, name
            rows.append(((reset, method), abs(loss - ref_loss), worst, worst_name, tiles))
    return rows


@pytest.mark.parametrize("cp_size", [2, 4])
def test_cp_loss_and_gradients_equal_the_single_process_step(cp_size):
    results = run_distributed(compare, cp_size, timeout=240)
    for rank_rows in results:
        for case, loss_error, grad_error, name, _ in rank_rows:
            assert loss_error <= 1e-5, case
            assert grad_error <= 1e-5, (case, name, grad_error)
    tiles = [sum(row[4] for row in rank_rows) for rank_rows in results]
    assert min(tiles) < sum(tiles) / len(tiles) * 2  # the vision work is split, not replicated
