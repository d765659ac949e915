"""The CP batch step without processes: every rank's inputs, simulated one rank at a time."""

from __future__ import annotations

import pytest
import torch

from lvita_model.attention import SdpaBackend
from lvita_model.context_parallel.batch import PAD_ID, global_loss, shard_batch
from lvita_model.context_parallel.sharding import pad_documents, padded_positions
from lvita_model.head import next_token_targets
from lvita_model.model import build_model

PER_TILE = 4  # small_config: 56-px tiles


def packed_sequence(
    generator: torch.Generator, lengths: list[int], tiles_at: list[int], supervised: float = 0.6
):
    """ids, positions (restarting per document), labels, cu_seqlens, tiles, placeholder
    positions: a tile's PER_TILE placeholders start at each global position in `tiles_at`."""
    total = sum(lengths)
    ids = torch.randint(0, 512, (total,), generator=generator)
    positions = torch.cat([torch.arange(n) for n in lengths])
    labels = torch.where(torch.rand(total, generator=generator) < supervised, ids, -100)
    placeholders = torch.stack([torch.arange(s, s + PER_TILE) for s in tiles_at])
    labels[placeholders.reshape(-1)] = -100
    cu = [0]
    for n in lengths:
        cu.append(cu[-1] + n)
    tiles = torch.randn(len(tiles_at), 3, 56, 56, generator=generator)
    return ids, positions, labels, cu, tiles, placeholders


@pytest.mark.parametrize(("cp_size", "layout"), [(2, "zigzag"), (4, "zigzag"), (2, "contiguous")])
def test_ranks_together_hold_the_padded_sequence_once(cp_size, layout):
    generator = torch.Generator().manual_seed(cp_size)
    ids, positions, labels, cu, tiles, placeholders = packed_sequence(
        generator, [13, 30, 5], [2, 15, 25, 40], supervised=0.9
    )
    padded_cu, source = pad_documents(cu, cp_size, layout)
    locals_ = [
        shard_batch(
            ids,
            positions,
            labels,
            cu,
            cp_size=cp_size,
            cp_rank=r,
            layout=layout,
            pixel_values=tiles,
            image_token_positions=placeholders,
        )
        for r in range(cp_size)
    ]
    index = torch.cat([b.shard.index for b in locals_])
    assert sorted(index.tolist()) == list(range(padded_cu[-1]))
    assert {b.input_ids.shape[0] for b in locals_} == {padded_cu[-1] // cp_size}
    # targets were shifted on the whole sequence, then sharded
    global_targets = next_token_targets(labels, cu)
    for batch in locals_:
        src = source[batch.shard.index]
        expected = torch.where(src >= 0, global_targets[src.clamp(min=0)], -100)
        assert torch.equal(batch.targets, expected)
        assert torch.equal(batch.input_ids, torch.where(src >= 0, ids[src.clamp(min=0)], PAD_ID))
        assert torch.equal(
            batch.position_ids, padded_positions(positions, source)[batch.shard.index]
        )
    # some supervised targets come from tokens held by another rank
    remote = 0
    for batch in locals_:
        held = set(batch.shard.index.tolist())
        for local, global_index in enumerate(batch.shard.index.tolist()):
            remote += int(batch.targets[local] != -100 and global_index + 1 not in held)
    assert remote > 0
    # every placeholder is local on exactly one rank
    seen = torch.zeros(padded_cu[-1], dtype=torch.long)
    for batch in locals_:
        local = batch.image_token_positions
        seen[batch.shard.index[local[local >= 0]]] += 1
    assert int(seen.sum()) == placeholders.numel() and int(seen.max()) == 1


def test_local_embeddings_are_the_global_ones(small_config):
    model = build_model(small_config, attention_backend=SdpaBackend())
    generator = torch.Generator().manual_seed(0)
    # CP=2 cuts document 0 (32 tokens) into 4 chunks of 8: the tile at 6..9 straddles the
    # boundary between rank 0's chunk 0 and rank 1's chunk 1
    ids, positions, labels, cu, tiles, placeholders = packed_sequence(
        generator, [32, 16], [6, 14, 36]
    )
    with torch.no_grad():
        reference = model.model.embed(ids, tiles, placeholders, SdpaBackend())
        encoded = 0
        for rank in range(2):
            batch = shard_batch(
                ids,
                positions,
                labels,
                cu,
                cp_size=2,
                cp_rank=rank,
                pixel_values=tiles,
                image_token_positions=placeholders,
            )
            local = model.model.embed(
                batch.input_ids, batch.pixel_values, batch.image_token_positions, SdpaBackend()
            )
            _, source = pad_documents(cu, 2)
            src = source[batch.shard.index]
            assert torch.allclose(local[src >= 0], reference[src[src >= 0]], atol=1e-6)
            encoded += batch.pixel_values.shape[0]
    assert encoded == 4  # 3 tiles, the straddling one on both ranks


def test_text_only_rank_and_global_loss_without_groups():
    generator = torch.Generator().manual_seed(1)
    ids, positions, labels, cu, tiles, placeholders = packed_sequence(generator, [16], [0])
    batch = shard_batch(
        ids,
        positions,
        labels,
        cu,
        cp_size=2,
        cp_rank=1,
        pixel_values=tiles,
        image_token_positions=placeholders,
    )
    assert batch.pixel_values.shape[0] == 0 and batch.image_token_positions.shape == (0, 4)
    loss_sum = torch.tensor(6.0, requires_grad=True)
    loss, mean = global_loss(loss_sum, torch.tensor(3))
    assert loss.item() == 2.0 and mean.item() == 2.0
    zero, _ = global_loss(loss_sum * 0, torch.tensor(0))
    zero.backward()
    assert loss_sum.grad.item() == 0.0
