"""Generation: chunked prefill, KV-cache decoding vs the original's recompute, CP decoding, CLI."""

from __future__ import annotations

import pytest
import torch

from lvita_model.attention import SdpaBackend
from lvita_model.baselines import generate_recompute
from lvita_model.inference import (
    CacheAttention,
    KVCache,
    Sampling,
    decode_step,
    generate,
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


# ----------------------------------------------------------------------------------------------
# Context parallelism: P gloo ranks, one launch per P


def _allgather_prefill(shard, backend, group):
    from lvita_model.context_parallel.allgather import AllGatherKVAttention

    return AllGatherKVAttention(shard, backend, group, causal=True)


CP_NEW_TOKENS = 9


def _cp_cases(config):
    """(name, ids, tiles, placeholders, sampling, prefill factory): the 31-token prompt with two
    tiles (tile 0 is cut by a chunk boundary for P = 2 and 4), a 3-token prompt (P = 4: rank 3
    holds only pads, so it starts decoding with an empty cache), and sampling."""
    ids, tiles, placeholders = make_prompt(config)
    short = ids[:3]
    greedy, sampled = Sampling(), Sampling(temperature=1.0, top_k=20, seed=5)
    return [
        ("ring", ids, tiles, placeholders, greedy, None),
        ("allgather", ids, tiles, placeholders, greedy, _allgather_prefill),
        ("short", short, None, None, greedy, None),
        ("sampled", ids, tiles, placeholders, sampled, None),
    ]


def _generate_case(model, case, group=None):
    _, ids, tiles, placeholders, sampling, factory = case
    result = generate(
        model,
        ids,
        pixel_values=tiles,
        image_token_positions=placeholders,
        max_new_tokens=CP_NEW_TOKENS,
        sampling=sampling,
        eos_token_id=None,
        keep_logits=True,
        group=group,
        prefill_attention=factory,
    )
    # numpy: tensors sent back through a queue would travel as shared-memory handles that die
    # with the worker process
    return result.tokens, torch.stack(result.logits).numpy(), result.cache_bytes


def _cp_worker(rank, world_size, config):
    import torch.distributed as dist

    model = build_model(config, seed=3, attention_backend=SdpaBackend()).eval()
    return [_generate_case(model, case, dist.group.WORLD) for case in _cp_cases(config)]


@pytest.mark.parametrize("world_size", [2, 4])
def test_context_parallel_generation_equals_one_process(small_config, world_size):
    from dist_utils import run_distributed

    model = build_model(small_config, seed=3, attention_backend=SdpaBackend()).eval()
    cases = _cp_cases(small_config)
    expected = [_generate_case(model, case) for case in cases]
    per_rank = run_distributed(_cp_worker, world_size, small_config)
    for index, (name, ids, *_) in enumerate(cases):
        tokens, logits, _ = expected[index]
        for rank in range(world_size):
            got_tokens, got_logits, _ = per_rank[rank][index]
            assert got_tokens == tokens, (name, rank)
            assert abs(got_logits - logits).max() <= TOL, (name, rank)
            assert (got_logits == per_rank[0][index][1]).all(), (name, rank)  # bit-identical
        # the cache is sharded: every rank holds a part, together exactly the sequence
        row_bytes = expected[index][2] // (len(ids) + CP_NEW_TOKENS - 1)
        held = [per_rank[rank][index][2] // row_bytes for rank in range(world_size)]
        assert sum(held) == len(ids) + CP_NEW_TOKENS - 1, (name, held)
        if len(ids) >= 2 * world_size:
            assert max(held) - min(held) <= 2 + CP_NEW_TOKENS // world_size, (name, held)


# ----------------------------------------------------------------------------------------------
# The command line


def test_cli_generate_with_a_random_preset(capsys):
    from pipelines.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["generate", "tiny", "--prompt", "Hello there", "--max-new-tokens", "3"])
    assert exit_info.value.code == 0
    out, err = capsys.readouterr()
    assert "RANDOM weights" in err and "generated 3 token(s)" in err
    assert "prompt 10 token(s)" in err  # 3 + "Hello there" (2) + 2 + <|im_start|>assistant\n
    assert out.endswith("\n")


def test_prompt_layout_is_the_data_pipelines(tmp_path):
    """ChatML user turn + assistant header; an image's and a video's tokens and tiles as
    `lvita_data` lays them out (thumbnail first, 258 tokens per frame)."""
    import numpy as np
    from PIL import Image

    from lvita_data.samples.tiling import choose_grid, count_image_tokens, num_tiles
    from lvita_data.tokenizer.tokenizer import load_tokenizer
    from pipelines.generate import build_prompt

    tokenizer = load_tokenizer()
    special = tokenizer.special_ids
    text = build_prompt(tokenizer, "Hello there").input_ids.tolist()
    header = [special.im_start, *tokenizer.encode("assistant"), special.newline]
    user = [special.im_start, *tokenizer.encode("user"), special.newline]
    assert text == [
        *user,
        *tokenizer.encode("Hello there"),
        special.im_end,
        special.newline,
        *header,
    ]

    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (300, 700, 3), dtype=np.uint8)).save(tmp_path / "a.png")
    frames = tmp_path / "frames"
    frames.mkdir()
    for i in range(4):
        pixels = rng.integers(0, 255, (60, 80, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(frames / f"{i:03d}.png")
    prompt = build_prompt(
        tokenizer, "Compare.", images=[str(tmp_path / "a.png")], videos=[str(frames)], max_frames=2
    )
    grid = choose_grid(700, 300)
    ids = prompt.input_ids
    tiles = num_tiles(grid) + 2
    assert prompt.pixel_values.shape == (tiles, 3, 448, 448)
    assert prompt.image_token_positions.shape == (tiles, 256)
    content = tokenizer.encode("<image>\n<video>\nCompare.")  # the tags are put in front
    assert len(ids) == 8 + len(content) - 2 + count_image_tokens(grid) + 2 * 258
    placeholders = ids[prompt.image_token_positions]
    assert (placeholders[0] == special.img_context).all()  # the thumbnail comes first
    assert (placeholders[1 : num_tiles(grid)] == special.patch_context).all()
    assert (placeholders[-2:] == special.vid_context).all()
    assert ids[-3:].tolist() == header


def test_cli_generate_reports_a_bad_model(tmp_path, capsys):
    from pipelines.cli import main

    for bad in (str(tmp_path / "missing"), str(tmp_path)):
        with pytest.raises(SystemExit) as exit_info:
            main(["generate", bad, "--prompt", "hi", "--max-new-tokens", "1"])
        assert exit_info.value.code == 3
        assert "lvita generate:" in capsys.readouterr().err and bad in str(bad)
