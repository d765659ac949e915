"""Baselines and oracles: the original Long-VITA's ways, kept to test against and to measure by.

Nothing in training or generation calls these; tests compare the production code with them and
the benchmarks time it against them.

- `original_head_targets`: the original's selection of supervised positions, which loses the
  first answer token of every turn (`lvita_model.head` shows the defect on a worked example).
- `full_logits_loss`: logits at every position and ``F.cross_entropy``, the reference the
  chunked, logits-masked `lvita_model.head.masked_lm_loss` equals (benchmarks/bench_head.py).
- `generate_recompute`: decoding without a KV cache, the whole sequence re-run per token, as
  the original does under context parallelism; the oracle of `lvita_model.inference.generate`
  and the baseline of benchmarks/bench_decode.py.
"""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F
from torch import Tensor

from lvita_model.head import (
    IGNORE_INDEX,
    accum_dtype,
    check_head_inputs,
    last_position_logits,
    supervised_positions,
)
from lvita_model.inference.generate import IM_END_ID, Generation
from lvita_model.inference.sampling import GREEDY, Sampling, choose_token
from lvita_model.model import LongVitaForCausalLM


def original_head_targets(labels: Tensor) -> Tensor:
    """int64 [T]: the original Long-VITA selection, kept only to document its defect.

    It selects the positions p with labels[p] != -100 (unshifted), then shifts the compacted
    arrays: the j-th selected position predicts the label of the (j + 1)-th, however far away
    and in whatever document. Do not train with it; use `next_token_targets`.
    """
    positions = supervised_positions(labels)  # [M]
    targets = torch.full(labels.shape, IGNORE_INDEX, dtype=torch.int64, device=labels.device)
    targets[positions[:-1]] = labels[positions[1:]].long()
    return targets


def full_logits_loss(hidden: Tensor, weight: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
    """Naive reference: logits for all T positions, F.cross_entropy(sum) in fp32; (sum, count)."""
    check_head_inputs(hidden, weight, targets)
    logits = (hidden @ weight.t()).to(accum_dtype(hidden.dtype))  # [T, V]
    loss_sum = F.cross_entropy(logits, targets, ignore_index=IGNORE_INDEX, reduction="sum")
    return loss_sum, (targets != IGNORE_INDEX).sum()


@torch.no_grad()
def generate_recompute(
    model: LongVitaForCausalLM,
    input_ids: Tensor,
    *,
    pixel_values: Tensor | None = None,
    image_token_positions: Tensor | None = None,
    max_new_tokens: int = 32,
    sampling: Sampling = GREEDY,
    eos_token_id: int | None = IM_END_ID,
    keep_logits: bool = False,
) -> Generation:
    """The original's decoding: no cache, the whole sequence (tiles included) re-run per token.

    The test oracle for `generate` and the benchmark baseline."""
    device = model.model.embed_tokens.weight.device
    sequence = input_ids.to(device)
    generator = torch.Generator().manual_seed(sampling.seed)
    tokens: list[int] = []
    kept: list[Tensor] = []
    times: list[float] = []
    for _ in range(max_new_tokens):
        started = time.perf_counter()
        hidden = model(
            sequence,
            torch.arange(sequence.shape[0], device=device),
            pixel_values=pixel_values,
            image_token_positions=image_token_positions,
        )
        logits = last_position_logits(hidden, model.head_weight, [0, hidden.shape[0]])[0]
        times.append(time.perf_counter() - started)
        token = choose_token(logits, sampling, generator)
        tokens.append(token)
        if keep_logits:
            kept.append(logits)
        if token == eos_token_id:
            break
        sequence = torch.cat([sequence, sequence.new_tensor([token])])
    return Generation(
        tokens=tokens,
        prompt_tokens=int(input_ids.shape[0]),
        stopped_at_eos=tokens[-1] == eos_token_id,
        prefill_seconds=times[0],
        decode_seconds=sum(times[1:]),
        logits=kept,
    )
