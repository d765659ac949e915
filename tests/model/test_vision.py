"""InternViT tower and projector: Hugging Face parity, pixel-shuffle layout, chunking, dummy tile.

The name map below (ours = the original InternViT names -> transformers' ``InternVLVisionModel``)
lives here rather than in the library: Long-VITA checkpoints use the original names, so the
model never needs it; the test needs it to load the same weights into both implementations.
"""

from __future__ import annotations

import pytest
import torch

from lvita_model.config import PRESETS, LLMConfig, LongVitaConfig, VisionConfig
from lvita_model.projector import VisionProjector, pixel_shuffle
from lvita_model.vision import InternVisionModel, encode_tiles

IMAGE = 56  # 4 x 4 patches of 14 px -> 2 x 2 = 4 tokens per tile after the shuffle
VISION = VisionConfig(
    image_size=IMAGE, patch_size=14, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4
)
CONFIG = LongVitaConfig(
    llm=LLMConfig(
        vocab_size=128, hidden_size=48, intermediate_size=96, num_layers=1, num_heads=4,
        num_kv_heads=2,
    ),
    vision=VISION,
)  # fmt: skip


def _randomize(module: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Weights far from the init (non-unit norms, non-constant layer scale) so no term hides."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in module.named_parameters():
            noise = torch.randn(param.shape, generator=generator) * 0.2
            base = 1.0 if name.endswith(("norm1.weight", "norm2.weight", "layernorm.weight")) else 0
            param.copy_(base + noise)
    return module


def _pixels(num_tiles: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(num_tiles, 3, IMAGE, IMAGE, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def tower() -> InternVisionModel:
    return _randomize(InternVisionModel(VISION)).eval()


@pytest.fixture(scope="module")
def projector() -> VisionProjector:
    return _randomize(VisionProjector(CONFIG), seed=2).eval()


# ------------------------------------------------------------------------------------------
# Names and Hugging Face parity


def test_state_dict_names_are_internvit_names():
    layer = [
        "norm1.weight", "norm1.bias", "norm2.weight", "norm2.bias", "ls1", "ls2",
        "attn.qkv.weight", "attn.qkv.bias", "attn.proj.weight", "attn.proj.bias",
        "mlp.fc1.weight", "mlp.fc1.bias", "mlp.fc2.weight", "mlp.fc2.bias",
    ]  # fmt: skip
    expected = {
        "embeddings.class_embedding",
        "embeddings.patch_embedding.weight",
        "embeddings.patch_embedding.bias",
        "embeddings.position_embedding",
    } | {f"encoder.layers.{i}.{name}" for i in range(VISION.num_layers) for name in layer}
    state = InternVisionModel(VISION).state_dict()
    assert set(state) == expected
    assert state["embeddings.class_embedding"].shape == (1, 1, 32)
    assert state["embeddings.position_embedding"].shape == (1, 1 + 16, 32)
    assert state["encoder.layers.0.attn.qkv.weight"].shape == (96, 32)
    assert set(VisionProjector(CONFIG).state_dict()) == {
        "pre_proj_layernorm.weight", "pre_proj_layernorm.bias", "mlp.0.weight", "mlp.2.weight",
    }  # fmt: skip


def _to_hf_internvl(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Original InternViT names -> transformers ``InternVLVisionModel`` names (verified against
    transformers/models/internvl/modeling_internvl.py). ``attn.qkv`` splits into thirds: the
    original reads its output as [.., 3, heads, head_dim], so rows [0, C) are q, then k, then v,
    each head-major as HF's q/k/v_proj (nothing to permute).
    """
    renames = {
        "embeddings.class_embedding": "embeddings.cls_token",
        "embeddings.patch_embedding.": "embeddings.patch_embeddings.projection.",
        "embeddings.position_embedding": "embeddings.position_embeddings",
        "encoder.layers.": "encoder.layer.",
        ".norm1.": ".layernorm_before.",
        ".norm2.": ".layernorm_after.",
        ".attn.proj.": ".attention.projection_layer.",
        ".ls1": ".lambda_1",
        ".ls2": ".lambda_2",
    }  # mlp.fc1 / mlp.fc2 keep their names
    hf = {}
    for name, tensor in state.items():
        for old, new in renames.items():
            name = name.replace(old, new)
        if ".attn.qkv." in name:  # [3C, C] or [3C] -> q, k, v thirds
            for part, third in zip("qkv", tensor.chunk(3, dim=0), strict=True):
                hf[name.replace(".attn.qkv.", f".attention.{part}_proj.")] = third
        else:
            hf[name] = tensor
    return hf


def test_matches_transformers_internvl_vision_model(tower):
    internvl = pytest.importorskip("transformers.models.internvl.modeling_internvl")
    from transformers.models.internvl.configuration_internvl import InternVLVisionConfig

    hf_config = InternVLVisionConfig(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        image_size=IMAGE,
        patch_size=14,
        attention_bias=True,  # InternViT's qkv_bias
        use_qk_norm=False,  # the 6B model's RMS qk-norm; 300M has none
        norm_type="layer_norm",
        layer_norm_eps=1e-6,
        hidden_act="gelu",
        use_mean_pooling=True,  # True = no final layernorm, as InternViT-300M
        use_absolute_position_embeddings=True,
        use_mask_token=False,
        hidden_dropout_prob=0.0,
        attention_dropout=0.0,
        projection_dropout=0.0,
    )
    hf_config._attn_implementation = "eager"
    hf_model = internvl.InternVLVisionModel(hf_config).eval()
    hf_model.load_state_dict(_to_hf_internvl(tower.state_dict()), strict=True)

    pixels = _pixels(3)
    with torch.no_grad():
        ours = tower(pixels)
        theirs = hf_model(pixel_values=pixels).last_hidden_state[:, 1:]
    assert ours.shape == (3, 16, 32)
    assert (ours - theirs).abs().max().item() <= 1e-5
    assert ours.abs().max() > 0.1  # not a vacuous match of near-zero outputs


# ------------------------------------------------------------------------------------------
# Pixel shuffle and the projector


def _space_to_depth_reference(x: torch.Tensor) -> torch.Tensor:
    """[n, w, h, c] -> [n, w/2, h/2, 4c]: token (i, j) = patches (2i, 2j), (2i, 2j+1),
    (2i+1, 2j), (2i+1, 2j+1) of the input grid, concatenated in that order."""
    n, w, h, _ = x.shape
    out = [
        [
            torch.cat([x[:, 2 * i, 2 * j], x[:, 2 * i, 2 * j + 1],
                       x[:, 2 * i + 1, 2 * j], x[:, 2 * i + 1, 2 * j + 1]], dim=-1)
            for j in range(h // 2)
        ]
        for i in range(w // 2)
    ]  # fmt: skip
    return torch.stack([torch.stack(row, dim=1) for row in out], dim=1)


@pytest.mark.parametrize("shape", [(2, 4, 4, 3), (1, 6, 4, 2), (1, 32, 32, 5)])
def test_pixel_shuffle_is_row_major_2x2_space_to_depth(shape):
    x = torch.arange(torch.Size(shape).numel(), dtype=torch.float32).reshape(shape)
    out = pixel_shuffle(x, 0.5)
    assert out.shape == (shape[0], shape[1] // 2, shape[2] // 2, shape[3] * 4)
    assert torch.equal(out, _space_to_depth_reference(x))
    # Worked example on a 4 x 4 grid of 1 channel: token (0, 1) holds patches 2, 3, 6, 7.
    grid = torch.arange(16.0).reshape(1, 4, 4, 1)
    assert pixel_shuffle(grid, 0.5)[0, 0, 1].tolist() == [2.0, 3.0, 6.0, 7.0]


def test_pixel_shuffle_matches_transformers_internvl():
    internvl = pytest.importorskip("transformers.models.internvl.modeling_internvl")
    x = torch.randn(2, 6, 4, 8)
    theirs = internvl.InternVLModel.pixel_shuffle(None, x, scale_factor=0.5)
    assert torch.equal(pixel_shuffle(x, 0.5), theirs)


def test_pixel_shuffle_rejects_odd_grid():
    with pytest.raises(ValueError, match="does not divide"):
        pixel_shuffle(torch.zeros(1, 5, 4, 2), 0.5)


def test_448_tiles_give_256_tokens():
    config = PRESETS["tiny"]
    assert config.tokens_per_tile == 256 == PRESETS["long-vita-14b"].tokens_per_tile
    assert PRESETS["long-vita-14b"].projector_input_size == 4096
    projector = VisionProjector(config)
    out = projector(torch.randn(2, 1024, config.vision.hidden_size))
    assert out.shape == (2, 256, config.llm.hidden_size)
    assert projector.mlp[0].in_features == 4 * config.vision.hidden_size
    assert projector.mlp[0].out_features == config.vision.hidden_size


def test_projector_is_shuffle_then_norm_then_mlp(projector):
    features = torch.randn(2, 16, 32)
    tokens = pixel_shuffle(features.reshape(2, 4, 4, 32), 0.5).reshape(2, 4, 128)
    normed = torch.nn.functional.layer_norm(
        tokens, (128,), projector.pre_proj_layernorm.weight, projector.pre_proj_layernorm.bias,
        eps=1e-5,
    )  # fmt: skip
    hidden = torch.nn.functional.gelu(normed @ projector.mlp[0].weight.T)
    expected = hidden @ projector.mlp[2].weight.T
    with torch.no_grad():
        assert torch.allclose(projector(features), expected, atol=1e-6)


# ------------------------------------------------------------------------------------------
# encode_tiles: chunks and the dummy tile


def test_chunked_encode_equals_one_call(tower, projector):
    pixels = _pixels(5)
    with torch.no_grad():
        whole = encode_tiles(tower, projector, pixels, chunk_tiles=5)
        assert whole.features.shape == (5, CONFIG.tokens_per_tile, 48)
        for chunk in (1, 2, 3):
            chunked = encode_tiles(tower, projector, pixels, chunk_tiles=chunk)
            assert torch.allclose(chunked.features, whole.features, atol=1e-5, rtol=1e-5)
            assert chunked.zero_term.shape == () and chunked.zero_term.item() == 0
    with pytest.raises(ValueError, match="chunk_tiles"):
        encode_tiles(tower, projector, pixels, chunk_tiles=0)


def test_zero_tiles_still_reach_every_parameter():
    tower = _randomize(InternVisionModel(VISION))
    projector = _randomize(VisionProjector(CONFIG), seed=2)
    out = encode_tiles(tower, projector, torch.empty(0, 3, IMAGE, IMAGE), chunk_tiles=4)
    assert out.features.shape == (0, CONFIG.tokens_per_tile, 48)
    assert out.features.grad_fn is not None
    assert out.zero_term.shape == () and out.zero_term.item() == 0
    embeds = torch.randn(3, 48, requires_grad=True)
    (embeds + out.zero_term).sum().backward()  # what the glue does
    params = dict(tower.named_parameters(prefix="vision")) | dict(
        projector.named_parameters(prefix="projector")
    )
    missing = [name for name, p in params.items() if p.grad is None]
    assert missing == []
    assert all(torch.count_nonzero(p.grad) == 0 for p in params.values())
    assert torch.equal(embeds.grad, torch.ones(3, 48))


def test_gradient_checkpointing_gives_the_same_gradients():
    grads = []
    for checkpointing in (False, True):
        tower = _randomize(InternVisionModel(VISION)).train()
        tower.gradient_checkpointing = checkpointing
        tower(_pixels(2)).square().sum().backward()
        grads.append(torch.cat([p.grad.flatten() for p in tower.parameters()]))
    assert torch.allclose(grads[0], grads[1], atol=1e-6)
    assert grads[0].abs().max() > 0


# ------------------------------------------------------------------------------------------
# Attention pattern and input checks


def test_attention_is_bidirectional_within_a_tile_and_tiles_are_independent(tower):
    pixels = _pixels(2)
    with torch.no_grad():
        base = tower(pixels)
        last_patch = pixels.clone()
        last_patch[0, :, -14:, -14:] += 1.0  # bottom-right patch of tile 0
        moved = tower(last_patch)
        other_tile = pixels.clone()
        other_tile[1] = torch.randn(3, IMAGE, IMAGE)
        independent = tower(other_tile)
    assert (moved[0, 0] - base[0, 0]).abs().max() > 1e-4  # first token saw the last patch
    assert torch.equal(moved[1], base[1])
    assert torch.equal(independent[0], base[0])
    assert not torch.equal(independent[1], base[1])


@pytest.mark.parametrize("shape", [(1, 3, 28, 28), (1, 3, 56, 42), (1, 1, 56, 56), (3, 56, 56)])
def test_wrong_image_size_is_a_clear_error(tower, projector, shape):
    with pytest.raises(ValueError, match=r"pixel_values must be \[N, 3, 56, 56\]"):
        tower(torch.zeros(shape))
    with pytest.raises(ValueError, match="pixel_values must be"):
        encode_tiles(tower, projector, torch.zeros(shape), chunk_tiles=2)


def test_input_dtype_is_cast_to_the_tower_dtype(tower):
    pixels = _pixels(1)
    with torch.no_grad():
        assert torch.allclose(tower(pixels.double()), tower(pixels), atol=0)
