"""Model configs: presets match the reference shapes, HF config.json round trip, clear errors."""

from __future__ import annotations

import json

import pytest

from lvita_model.config import (
    PRESETS,
    LLMConfig,
    VisionConfig,
    from_hf_config,
    load_config,
    to_hf_config,
)
from lvita_model.errors import ConfigError


def test_long_vita_14b_is_the_reference_shape():
    config = PRESETS["long-vita-14b"]
    llm, vision = config.llm, config.vision
    assert (llm.num_layers, llm.hidden_size, llm.intermediate_size) == (48, 5120, 13824)
    assert (llm.num_heads, llm.num_kv_heads, llm.head_dim) == (40, 8, 128)
    assert (llm.vocab_size, llm.rope_theta, llm.rms_norm_eps) == (152064, 1e6, 1e-6)
    assert llm.max_position_embeddings == 1_310_720 and not llm.tie_word_embeddings
    assert (vision.num_layers, vision.hidden_size, vision.num_heads) == (24, 1024, 16)
    assert (vision.intermediate_size, vision.patch_size, vision.image_size) == (4096, 14, 448)
    assert vision.num_patches == 1024 and config.tokens_per_tile == 256
    assert config.projector_input_size == 4096 and config.vision_chunk_tiles == 256


def test_tiny_keeps_the_real_tile_and_vocabulary():
    config = PRESETS["tiny"]
    assert config.tokens_per_tile == 256 and config.llm.vocab_size == 152064


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_hf_config_round_trip(tmp_path, name):
    config = PRESETS[name]
    (tmp_path / "config.json").write_text(json.dumps(to_hf_config(config)))
    loaded = load_config(tmp_path)
    assert loaded == config


def test_qwen2_config_without_vision_is_language_model_only():
    hf = to_hf_config(PRESETS["qwen2.5-0.5b"])
    del hf["visual"]
    config = from_hf_config(hf | {"model_type": "qwen2"})
    assert config.vision is None
    with pytest.raises(ConfigError, match="no vision tokens"):
        _ = config.tokens_per_tile


def test_transformers_5_rope_parameters_are_read():
    hf = to_hf_config(PRESETS["tiny"])
    del hf["rope_theta"]
    hf["rope_parameters"] = {"rope_type": "default", "rope_theta": 5e5}
    assert from_hf_config(hf).llm.rope_theta == 5e5


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"rope_scaling": {"type": "yarn", "factor": 4}}, "rope type 'yarn'"),
        ({"use_sliding_window": True}, "sliding-window"),
        ({"hidden_act": "gelu"}, "silu"),
        ({"num_key_value_heads": 3}, "multiple of"),
        ({"num_hidden_layers": None}, "positive int"),
    ],
)
def test_unsupported_or_bad_hf_configs_are_errors(change, message):
    hf = to_hf_config(PRESETS["tiny"]) | change
    with pytest.raises(ConfigError, match=message):
        from_hf_config(hf)


def test_missing_fields_and_bad_paths(tmp_path):
    hf = to_hf_config(PRESETS["tiny"])
    del hf["hidden_size"]
    with pytest.raises(ConfigError, match="'hidden_size' is missing"):
        from_hf_config(hf)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        load_config(tmp_path)
    with pytest.raises(ConfigError, match="neither a preset"):
        load_config(tmp_path / "nowhere")
    internvit = {"architectures": ["InternVisionModel"], "hidden_size": 1024}
    with pytest.raises(ConfigError, match="InternViT-only"):
        from_hf_config(internvit)


def test_shape_checks():
    with pytest.raises(ConfigError, match="not divisible"):
        LLMConfig(
            vocab_size=8,
            hidden_size=10,
            intermediate_size=8,
            num_layers=1,
            num_heads=3,
            num_kv_heads=1,
        )
    with pytest.raises(ConfigError, match="multiple of patch_size"):
        VisionConfig(image_size=450)
    hf = to_hf_config(PRESETS["tiny"])
    with pytest.raises(ConfigError, match="visual.qk_normalization"):
        from_hf_config(hf | {"visual": hf["visual"] | {"qk_normalization": True}})
