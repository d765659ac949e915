"""Generation: chunked prefill, KV-cache decoding vs the original's recompute, CP decoding, CLI."""

from __future__ import annotations

import pytest
import torch

from lvita_model.attention import SdpaBackend
from lvita_model.inference import (
    CacheAttention,
    KVCache,
    Sampling,
    decode_step,
    generate,
    generate_recompute,
    prefill,
)
from lvita_model.model import build_model

TOL = 1e-5
TEXT_TOKENS = 23


def make_prompt(config, seed: int = 0, num_tiles: int = 2):
    """(ids [T], tiles [N, 3, S, S], placeholder positions [N, tokens_per_tile]): text, then the
    tiles' placeholders, then more text."""
    generator = torch.Generator().manual_seed(seed)
    per_tile, size = config.tokens_per_tile, config.vision.image_size
    num_tokens = TEXT_TOKENS + num_tiles * per_tile
    ids = torch.randint(0, config.llm.vocab_size, (num_tokens,), generator=generator)
    placeholders = torch.arange(num_tiles * per_tile).view(num_tiles, per_tile) + 7
    tiles = torch.randn(num_tiles, 3, size, size, generator=generator)
    return ids, tiles, placeholders


@pytest.fixture
def model_and_prompt(small_config):
    model = build_model(small_config, seed=3, attention_backend=SdpaBackend()).eval()
    return model, make_prompt(small_config)


def _prefill(model, ids, tiles, placeholders, chunk):
    cache = KVCache.for_model(model, capacity=4)  # small: exercises growth
    attention = CacheAttention(cache, SdpaBackend())
    with torch.no_grad():
        logits = prefill(
            model,
            attention,
            ids,
            pixel_values=tiles,
            image_token_positions=placeholders,
            chunk_size=chunk,
        )
    return logits, cache


def test_chunked_prefill_equals_one_shot(model_and_prompt):
    model, (ids, tiles, placeholders) = model_and_prompt
    one_shot, cache = _prefill(model, ids, tiles, placeholders, None)
    with torch.no_grad():
        hidden = model(
            ids, torch.arange(len(ids)), pixel_values=tiles, image_token_positions=placeholders
        )
        full = model.last_logits(hidden, [0, len(ids)])[0]
    assert (one_shot - full).abs().max().item() <= TOL
    assert cache.length == len(ids) and cache.order[: len(ids)].tolist() == list(range(len(ids)))
    for chunk in (1, 5, 16):
        logits, chunked = _prefill(model, ids, tiles, placeholders, chunk)
        assert (logits - one_shot).abs().max().item() <= TOL, chunk
        for layer in range(model.config.llm.num_layers):
            pairs = zip(chunked.view(layer, len(ids)), cache.view(layer, len(ids)), strict=True)
            for got, want in pairs:
                assert (got - want).abs().max().item() <= TOL, (chunk, layer)


def test_vision_features_change_the_prompt(model_and_prompt):
    """The tiles reach the cache: without them the logits differ (the scatter is not lost)."""
    model, (ids, tiles, placeholders) = model_and_prompt
    with_tiles, _ = _prefill(model, ids, tiles, placeholders, 5)
    without, _ = _prefill(model, ids, None, None, 5)
    assert (with_tiles - without).abs().max().item() > 1e-3


def test_kv_cache_greedy_equals_recompute(model_and_prompt):
    model, (ids, tiles, placeholders) = model_and_prompt
    kwargs = dict(pixel_values=tiles, image_token_positions=placeholders, keep_logits=True)
    cached = generate(model, ids, max_new_tokens=10, prefill_chunk=7, **kwargs)
    recomputed = generate_recompute(model, ids, max_new_tokens=10, **kwargs)
    assert len(cached.tokens) == 10 and not cached.stopped_at_eos
    assert cached.tokens == recomputed.tokens
    for got, want in zip(cached.logits, recomputed.logits, strict=True):
        assert (got - want).abs().max().item() <= TOL
    assert len(set(cached.tokens)) > 1  # not a degenerate repetition


def test_sampling_is_seeded_and_equals_recompute(model_and_prompt):
    model, (ids, _, _) = model_and_prompt
    sampling = Sampling(temperature=1.5, top_k=50, seed=7)
    first = generate(model, ids, max_new_tokens=8, sampling=sampling)
    again = generate(model, ids, max_new_tokens=8, sampling=sampling)
    recomputed = generate_recompute(model, ids, max_new_tokens=8, sampling=sampling)
    other_seed = generate(model, ids, max_new_tokens=8, sampling=Sampling(1.5, 50, seed=8))
    assert first.tokens == again.tokens == recomputed.tokens
    assert first.tokens != other_seed.tokens


def test_generation_stops_at_eos(model_and_prompt):
    model, (ids, _, _) = model_and_prompt
    greedy = generate(model, ids, max_new_tokens=6, eos_token_id=None).tokens
    stopped = generate(model, ids, max_new_tokens=6, eos_token_id=greedy[2])
    assert stopped.tokens == greedy[: greedy.index(greedy[2]) + 1] and stopped.stopped_at_eos


def test_attention_callable_through_model_forward(model_and_prompt):
    """`model(..., attention=cache_attention)` (text only) equals the decode path."""
    model, (ids, _, _) = model_and_prompt
    with torch.no_grad():
        logits = []
        for use_forward in (False, True):
            cache = KVCache.for_model(model, capacity=len(ids) + 1)
            attention = CacheAttention(cache, SdpaBackend())
            prefill(model, attention, ids[:-1], chunk_size=8)
            if use_forward:
                position = torch.tensor([len(ids) - 1])
                with attention.step(position):
                    hidden = model(ids[-1:], position, attention=attention)
                logits.append(model.last_logits(hidden, [0, 1])[0])
            else:
                logits.append(decode_step(model, attention, int(ids[-1]), len(ids) - 1))
            assert cache.length == len(ids)
    assert (logits[0] - logits[1]).abs().max().item() <= TOL


def test_step_misuse_is_an_error(model_and_prompt):
    model, (ids, _, _) = model_and_prompt
    cache = KVCache.for_model(model, capacity=8)
    attention = CacheAttention(cache, SdpaBackend())
    q = torch.zeros(1, 4, 16)
    k = torch.zeros(1, 2, 16)
    with pytest.raises(RuntimeError, match="inside"):
        attention(q, k, k)
    with (
        pytest.raises(RuntimeError, match="called attention 1 times"),
        attention.step(torch.tensor([0])),
    ):
        attention(q, k, k)
    assert cache.length == 0  # an incomplete step commits nothing
    with (
        pytest.raises(ValueError, match="announced 2 tokens"),
        attention.step(torch.tensor([0, 1])),
    ):
        attention(q, k, k)
