"""`generate`: prefill (chunked, or context-parallel over a process group), then one decode step
per token with the KV cache, until EOS or ``max_new_tokens`` (`lvita_model.inference` explains
the design and gives the measurements).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import Tensor

from lvita_model.inference.cache import CacheAttention, KVCache
from lvita_model.inference.context_parallel import broadcast_token, cp_prefill, cp_rank_size
from lvita_model.inference.sampling import GREEDY, Sampling, choose_token
from lvita_model.inference.steps import decode_step, prefill
from lvita_model.model import LongVitaForCausalLM
from lvita_model.qwen2 import Attention

IM_END_ID = 151645
"""``<|im_end|>``: Long-VITA's end of an assistant turn (EOS)."""


@dataclass
class Generation:
    tokens: list[int]
    """Generated ids, EOS included when it was produced."""
    prompt_tokens: int
    stopped_at_eos: bool
    prefill_seconds: float
    decode_seconds: float
    """Time of the decode steps (one per generated token after the first)."""
    logits: list[Tensor] = field(default_factory=list)
    """fp32 [V] logits each token was chosen from (only with ``keep_logits``)."""
    cache_bytes: int = 0
    """Bytes of this rank's K/V after generation."""


@torch.no_grad()
def generate(
    model: LongVitaForCausalLM,
    input_ids: Tensor,
    *,
    pixel_values: Tensor | None = None,
    image_token_positions: Tensor | None = None,
    max_new_tokens: int = 32,
    prefill_chunk: int | None = None,
    sampling: Sampling = GREEDY,
    eos_token_id: int | None = IM_END_ID,
    keep_logits: bool = False,
    group: dist.ProcessGroup | None = None,
    prefill_attention: Callable[..., Attention] | None = None,
) -> Generation:
    """Generate after the prompt `input_ids` [T] (with its tiles [N, 3, S, S] and their
    placeholder positions [N, tokens_per_tile]) with a KV cache.

    Every rank of a context-parallel `group` calls this with the same full prompt; the cache is
    sharded (see `lvita_model.inference`) and every rank returns the same tokens.
    `prefill_attention` (CP only) builds the prefill attention from the shard; default:
    `cp_prefill_attention`.
    `prefill_chunk` applies to a single process.
    """
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    rank, size = cp_rank_size(group)
    weight = model.model.embed_tokens.weight
    backend = model.backend_for(weight.device, weight.dtype)
    num_prompt = int(input_ids.shape[0])
    capacity = -(-num_prompt // size) + 2 * size + -(-max_new_tokens // size)
    cache = KVCache.for_model(model, capacity)
    attention = CacheAttention(cache, backend, group=group if size > 1 else None)
    started = time.perf_counter()
    if size > 1:
        logits = cp_prefill(
            model,
            attention,
            input_ids,
            pixel_values=pixel_values,
            image_token_positions=image_token_positions,
            prefill_attention=prefill_attention,
        )
    else:
        logits = prefill(
            model,
            attention,
            input_ids,
            pixel_values=pixel_values,
            image_token_positions=image_token_positions,
            chunk_size=prefill_chunk,
        )
    prefill_seconds = time.perf_counter() - started
    generator = torch.Generator().manual_seed(sampling.seed)
    tokens: list[int] = []
    kept: list[Tensor] = []
    started = time.perf_counter()
    for step in range(max_new_tokens):
        token = broadcast_token(choose_token(logits, sampling, generator), group, cache.device)
        tokens.append(token)
        if keep_logits:
            kept.append(logits)
        if token == eos_token_id or step == max_new_tokens - 1:
            break
        owner = step % size  # round-robin: the rank that keeps this token's k/v
        logits = decode_step(model, attention, token, num_prompt + step, store=owner == rank)
    return Generation(
        tokens=tokens,
        prompt_tokens=num_prompt,
        stopped_at_eos=bool(tokens) and tokens[-1] == eos_token_id,
        prefill_seconds=prefill_seconds,
        decode_seconds=time.perf_counter() - started,
        logits=kept,
        cache_bytes=cache.nbytes(),
    )
