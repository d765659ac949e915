"""One process's steps: the prompt's vision features, embeddings of a span, chunked prefill into an
empty cache and one decode step (`lvita_model.inference` explains the design).

Shapes: T prompt tokens, c new tokens of one step, H hidden size, V vocabulary.
"""

from __future__ import annotations

import torch
from torch import Tensor

from lvita_model.head import last_position_logits
from lvita_model.inference.cache import CacheAttention
from lvita_model.model import LongVitaForCausalLM
from lvita_model.vision import encode_tiles


def encode_prompt_tiles(
    model: LongVitaForCausalLM,
    pixel_values: Tensor | None,
    image_token_positions: Tensor | None,
) -> tuple[Tensor | None, Tensor | None]:
    """(features [N * tokens_per_tile, H], their positions [N * tokens_per_tile]) or (None,
    None) without tiles; positions < 0 are placeholders held elsewhere (CP) and are dropped."""
    if pixel_values is None or pixel_values.shape[0] == 0:
        return None, None
    if model.config.vision is None:
        raise ValueError("this model has no vision tower but the prompt has images")
    if image_token_positions is None or image_token_positions.shape[0] != pixel_values.shape[0]:
        raise ValueError("image_token_positions [N, tokens_per_tile] must come with the tiles")
    weight = model.model.embed_tokens.weight
    features, _ = encode_tiles(
        model.model.vision_model,
        model.model.vision_projection,
        pixel_values.to(weight.device, weight.dtype),
        chunk_tiles=model.config.vision_chunk_tiles,
        backend=model.backend_for(weight.device, weight.dtype),
    )
    flat = features.reshape(-1, features.shape[-1]).to(weight.dtype)  # [N * tpt, H]
    positions = image_token_positions.reshape(-1).to(weight.device)  # [N * tpt]
    here = positions >= 0
    return flat[here], positions[here]


def embed_span(
    model: LongVitaForCausalLM,
    input_ids: Tensor,
    start: int,
    features: Tensor | None = None,
    feature_positions: Tensor | None = None,
) -> Tensor:
    """[c, H] embeddings of tokens [start, start + c) with the vision features that land there."""
    embeds = model.model.embed_tokens(input_ids)
    if features is None or feature_positions is None:
        return embeds
    local = feature_positions - start
    inside = (local >= 0) & (local < input_ids.shape[0])
    if not bool(inside.any()):
        return embeds
    return embeds.index_copy(0, local[inside], features[inside])


def forward_step(
    model: LongVitaForCausalLM, attention: CacheAttention, embeds: Tensor, positions: Tensor
) -> Tensor:
    """Hidden states [c, H] of one step of new tokens (the caller holds the step context)."""
    return model.model.decode(embeds, positions, attention)


def decode_step(
    model: LongVitaForCausalLM,
    attention: CacheAttention,
    token: int,
    position: int,
    *,
    store: bool = True,
) -> Tensor:
    """Feed one token at sequence index `position`; fp32 logits [V] for the next one."""
    device = attention.cache.device
    ids = torch.tensor([token], dtype=torch.int64, device=device)
    positions = torch.tensor([position], dtype=torch.int64, device=device)
    with attention.step(positions, store=store):
        hidden = forward_step(model, attention, model.model.embed_tokens(ids), positions)
    return last_position_logits(hidden, model.head_weight, [0, 1])[0]


def prefill(
    model: LongVitaForCausalLM,
    attention: CacheAttention,
    input_ids: Tensor,
    *,
    pixel_values: Tensor | None = None,
    image_token_positions: Tensor | None = None,
    chunk_size: int | None = None,
) -> Tensor:
    """Run the prompt [T] into an empty cache in chunks of `chunk_size` tokens (None: one shot);
    fp32 logits [V] of the token after it."""
    if attention.cache.length:
        raise ValueError("prefill expects an empty cache")
    num_tokens = int(input_ids.shape[0])
    if num_tokens == 0:
        raise ValueError("the prompt is empty")
    chunk = num_tokens if chunk_size is None else chunk_size
    if chunk < 1:
        raise ValueError(f"prefill chunk must be >= 1, got {chunk}")
    device = attention.cache.device
    input_ids = input_ids.to(device)
    attention.cache.reserve(num_tokens)
    features, feature_positions = encode_prompt_tiles(model, pixel_values, image_token_positions)
    hidden = None
    for start in range(0, num_tokens, chunk):
        end = min(start + chunk, num_tokens)
        positions = torch.arange(start, end, device=device)
        embeds = embed_span(model, input_ids[start:end], start, features, feature_positions)
        with attention.step(positions):
            hidden = forward_step(model, attention, embeds, positions)
    assert hidden is not None
    return last_position_logits(hidden, model.head_weight, [0, hidden.shape[0]])[0]
