"""The Long-VITA glue: vision features at placeholder positions, packing, loss, round trip."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from lvita_model.attention import SdpaBackend
from lvita_model.baselines import full_logits_loss
from lvita_model.config import PRESETS
from lvita_model.head import next_token_targets
from lvita_model.model import build_model
from lvita_model.vision import encode_tiles
from lvita_model.weights import load_pretrained, save_pretrained

VOCAB = 512


def make_sample(
    generator: torch.Generator, num_text: int, num_tiles: int, tokens_per_tile: int, image_size: int
):
    """(ids [n], positions of its placeholders [num_tiles, tokens_per_tile], tiles)."""
    ids = torch.randint(0, VOCAB, (num_text + num_tiles * tokens_per_tile,), generator=generator)
    placeholder = torch.arange(num_tiles * tokens_per_tile).view(num_tiles, tokens_per_tile) + 3
    tiles = torch.randn(num_tiles, 3, image_size, image_size, generator=generator)
    return ids, placeholder, tiles


def pack(samples):
    ids, positions, tiles, cu, placeholders = [], [], [], [0], []
    for sample_ids, placeholder, sample_tiles in samples:
        placeholders.append(placeholder + cu[-1])
        ids.append(sample_ids)
        positions.append(torch.arange(len(sample_ids)))
        tiles.append(sample_tiles)
        cu.append(cu[-1] + len(sample_ids))
    return (torch.cat(ids), torch.cat(positions), torch.cat(tiles), torch.cat(placeholders), cu)


@pytest.fixture
def model_and_samples(small_config):
    model = build_model(small_config, seed=1, attention_backend=SdpaBackend()).eval()
    generator = torch.Generator().manual_seed(0)
    size, per_tile = small_config.vision.image_size, small_config.tokens_per_tile
    samples = [
        make_sample(generator, 9, 2, per_tile, size),
        make_sample(generator, 20, 0, per_tile, size),
        make_sample(generator, 5, 3, per_tile, size),
    ]
    return model, samples


def test_packed_forward_equals_samples_run_separately(model_and_samples):
    model, samples = model_and_samples
    ids, positions, tiles, placeholders, cu = pack(samples)
    with torch.no_grad():
        packed = model(
            ids, positions, cu_seqlens=cu, pixel_values=tiles, image_token_positions=placeholders
        )
        for (sample_ids, placeholder, sample_tiles), start, end in zip(
            samples, cu[:-1], cu[1:], strict=True
        ):
            alone = model(
                sample_ids,
                torch.arange(len(sample_ids)),
                pixel_values=sample_tiles,
                image_token_positions=placeholder,
            )
            assert (packed[start:end] - alone).abs().max().item() <= 1e-5


def test_vision_features_overwrite_placeholders_and_only_there(model_and_samples):
    model, samples = model_and_samples
    ids, positions, tiles, placeholders, cu = pack(samples)
    with torch.no_grad():
        embeds = model.model.embed(ids, tiles, placeholders, SdpaBackend())
        text = model.model.embed_tokens(ids)
        features, _ = encode_tiles(
            model.model.vision_model,
            model.model.vision_projection,
            tiles,
            chunk_tiles=8,
            backend=SdpaBackend(),
        )
    is_placeholder = torch.zeros(len(ids), dtype=torch.bool)
    is_placeholder[placeholders.reshape(-1)] = True
    assert torch.equal(embeds[~is_placeholder], text[~is_placeholder])
    assert torch.allclose(embeds[placeholders.reshape(-1)], features.reshape(-1, 64))


def test_changing_a_tile_changes_only_its_own_sample(model_and_samples):
    model, samples = model_and_samples
    ids, positions, tiles, placeholders, cu = pack(samples)
    changed = tiles.clone()
    changed[3] += 1.0  # the first tile of the third sample
    with torch.no_grad():
        before = model(
            ids, positions, cu_seqlens=cu, pixel_values=tiles, image_token_positions=placeholders
        )
        after = model(
            ids, positions, cu_seqlens=cu, pixel_values=changed, image_token_positions=placeholders
        )
    difference = (after - before).abs().amax(-1)
    assert difference[: cu[2]].max().item() == 0.0
    first_token = placeholders[3, 0].item()
    assert difference[first_token:].min().item() > 0.0  # causal: every later token sees it
    assert difference[cu[2] : first_token].max().item() == 0.0


def test_text_only_batch_still_touches_every_vision_parameter(small_config):
    model = build_model(small_config, attention_backend=SdpaBackend())
    ids = torch.randint(0, VOCAB, (30,))
    hidden = model(ids, torch.arange(30))
    labels = torch.where(torch.arange(30) > 10, ids, -100)
    loss_sum, count = model.loss(hidden, next_token_targets(labels, [0, 30]))
    (loss_sum / count).backward()
    for name, param in model.named_parameters():
        assert param.grad is not None, name
        if ".vision_" in name:
            assert param.grad.abs().max().item() == 0.0, name


def test_loss_equals_full_logits_cross_entropy_with_next_token_targets(model_and_samples):
    model, samples = model_and_samples
    ids, positions, tiles, placeholders, cu = pack(samples)
    labels = ids.clone()
    labels[placeholders.reshape(-1)] = -100
    labels[::3] = -100
    targets = next_token_targets(labels, cu)
    hidden = model(
        ids, positions, cu_seqlens=cu, pixel_values=tiles, image_token_positions=placeholders
    )
    loss_sum, count = model.loss(hidden, targets, chunk_rows=5)
    reference_sum, reference_count = full_logits_loss(hidden, model.head_weight, targets)
    assert count.item() == reference_count.item() == int((targets != -100).sum())
    assert abs(loss_sum.item() - reference_sum.item()) <= 1e-4
    # the last token of a sample never predicts the next sample's first token
    assert all(targets[end - 1].item() == -100 for end in cu[1:])


def test_long_vita_layout_round_trip_gives_the_same_logits(tmp_path, model_and_samples):
    model, samples = model_and_samples
    ids, positions, tiles, placeholders, cu = pack(samples)
    save_pretrained(model, tmp_path, max_shard_bytes=300_000)
    loaded = load_pretrained(tmp_path, attention_backend=SdpaBackend()).eval()
    with torch.no_grad():
        before = model(
            ids, positions, cu_seqlens=cu, pixel_values=tiles, image_token_positions=placeholders
        )
        after = loaded(
            ids, positions, cu_seqlens=cu, pixel_values=tiles, image_token_positions=placeholders
        )
        # the weights are bit-identical (test_weights); BLAS may round differently for
        # tensors at other memory alignments, hence 1e-6 rather than exact equality
        assert (before - after).abs().max().item() <= 1e-6
        logits_before = model.last_logits(before, cu)
        assert (logits_before - loaded.last_logits(after, cu)).abs().max().item() <= 1e-5
        assert logits_before.shape == (3, 512) and logits_before.dtype == torch.float32


def test_build_model_is_deterministic_and_materialized(small_config):
    first = build_model(small_config, seed=5, attention_backend=SdpaBackend())
    second = build_model(small_config, seed=5, attention_backend=SdpaBackend())
    for (name, a), b in zip(first.state_dict().items(), second.state_dict().values(), strict=True):
        assert not a.is_meta and torch.equal(a, b), name
    other = build_model(small_config, seed=6, attention_backend=SdpaBackend())
    assert not torch.equal(first.lm_head.weight, other.lm_head.weight)


def test_tiny_preset_runs_a_real_448_tile_forward_and_backward():
    config = dataclasses.replace(PRESETS["tiny"], vision_chunk_tiles=1)
    model = build_model(config, attention_backend=SdpaBackend())
    generator = torch.Generator().manual_seed(0)
    ids, placeholder, tiles = make_sample(generator, 12, 2, 256, 448)
    hidden = model(
        ids, torch.arange(len(ids)), pixel_values=tiles, image_token_positions=placeholder
    )
    labels = torch.where(torch.arange(len(ids)) > 520, ids, -100)
    loss_sum, count = model.loss(hidden, next_token_targets(labels, [0, len(ids)]))
    (loss_sum / count).backward()
    grad = model.model.vision_model.embeddings.patch_embedding.weight.grad
    assert hidden.shape == (len(ids), 64) and grad.abs().sum().item() > 0
