"""Checkpoints in and out: the original's released layout loads as it is, stage 1 composes the
two public checkpoints, what lvita saves is in the original's schema, and every refusal names
the key and the file. The checkpoints are written by `hf_layouts` (not by lvita), sharded."""

from __future__ import annotations

import json

import pytest
import torch
from hf_layouts import (
    VISION_PREFIX,
    internvit_config,
    long_vita_config,
    qwen25_config,
    random_state,
    write_checkpoint,
)
from safetensors import safe_open

from lvita_model.attention import SdpaBackend
from lvita_model.config import PRESETS, LongVitaConfig, load_config
from lvita_model.errors import ConfigError, WeightsError
from lvita_model.model import LongVitaForCausalLM, build_model, init_weights
from lvita_model.weights import (
    VISION_PREFIXES,
    compose_pretrained,
    load_pretrained,
    save_pretrained,
)

SDPA = SdpaBackend()


def _llm_fields(config: LongVitaConfig) -> dict:
    llm = config.llm
    return {
        "vocab_size": llm.vocab_size,
        "hidden_size": llm.hidden_size,
        "intermediate_size": llm.intermediate_size,
        "num_layers": llm.num_layers,
        "num_heads": llm.num_heads,
        "num_kv_heads": llm.num_kv_heads,
    }


def _vision_fields(config: LongVitaConfig) -> dict:
    vision = config.vision
    return internvit_config(
        hidden_size=vision.hidden_size,
        intermediate_size=vision.intermediate_size,
        num_layers=vision.num_layers,
        num_heads=vision.num_heads,
        image_size=vision.image_size,
        patch_size=vision.patch_size,
    )


def _original(small_config, directory, **changes):
    """The original's layout: config.json as released (1M positions), bf16, 3 shards."""
    hf = long_vita_config(**_llm_fields(small_config), vision=_vision_fields(small_config))
    hf |= changes
    with torch.device("meta"):
        names = LongVitaForCausalLM(small_config)
    state = random_state(build_model(small_config, seed=0), seed=7)
    assert set(state) == set(names.state_dict())
    return write_checkpoint(directory, hf, state, num_shards=3)


def _assert_equal_state(model, expected):
    got = model.state_dict()
    assert set(got) == set(expected)
    for name, tensor in expected.items():
        assert got[name].dtype == tensor.dtype and torch.equal(got[name], tensor), name


# ----------------------------------------------------------------------------------------------
# Reading the original's layout


def test_original_layout_loads_as_released(tmp_path, small_config):
    written = _original(small_config, tmp_path)
    assert len(list(tmp_path.glob("model-*.safetensors"))) == 3
    model = load_pretrained(tmp_path, attention_backend=SDPA)
    assert model.config.vision == small_config.vision  # read from "visual"
    assert model.config.llm.max_position_embeddings == 1_310_720
    assert model.config.llm.rope_theta == 1e6
    _assert_equal_state(model, written)  # bf16 as stored, bit-equal


def test_the_14b_names_are_the_originals_923():
    with torch.device("meta"):
        names = list(LongVitaForCausalLM(PRESETS["long-vita-14b"]).state_dict())
    vision = [n for n in names if n.startswith(VISION_PREFIXES)]
    assert (len(names), len(names) - len(vision), len(vision)) == (923, 579, 344)


def test_lvita_older_directories_still_load(tmp_path, small_config):
    """Written before the original's schema: model_type qwen2, the tower under vision_config."""
    written = _original(small_config, tmp_path)
    hf = json.loads((tmp_path / "config.json").read_text())
    vision = hf.pop("visual")
    old = {k: v for k, v in hf.items() if k not in ("torch_dtype", "max_window_layers")}
    old |= {"architectures": ["LongVitaForCausalLM"], "model_type": "qwen2"}
    old["vision_config"] = {k: vision[k] for k in ("architectures", "image_size", "patch_size")}
    old["vision_config"] |= {
        "hidden_size": vision["hidden_size"],
        "intermediate_size": vision["intermediate_size"],
        "num_hidden_layers": vision["num_hidden_layers"],
        "num_attention_heads": vision["num_attention_heads"],
        "layer_norm_eps": 1e-6,
        "qkv_bias": True,
        "hidden_act": "gelu",
        "norm_type": "layer_norm",
        "qk_normalization": False,
    }
    old["vision_downsample_ratio"] = 0.5
    (tmp_path / "config.json").write_text(json.dumps(old))
    model = load_pretrained(tmp_path, attention_backend=SDPA)
    assert model.config.vision == small_config.vision
    _assert_equal_state(model, written)


def _refused(tmp_path, error, *patterns):
    with pytest.raises(error) as info:
        load_pretrained(tmp_path, attention_backend=SDPA)
    for pattern in patterns:
        assert pattern in str(info.value), (pattern, str(info.value))
    return str(info.value)


def test_vision_weights_without_a_vision_config_are_refused(tmp_path, small_config):
    _original(small_config, tmp_path)
    hf = json.loads((tmp_path / "config.json").read_text())
    del hf["visual"]
    (tmp_path / "config.json").write_text(json.dumps(hf | {"model_type": "qwen2"}))
    message = _refused(tmp_path, ConfigError, str(tmp_path / "config.json"), "'visual'")
    assert ".safetensors" in message and VISION_PREFIX in message
    # model_type long_vita itself promises a tower
    (tmp_path / "config.json").write_text(json.dumps(hf))
    _refused(tmp_path, ConfigError, str(tmp_path / "config.json"), "'visual'")


@pytest.mark.parametrize(
    ("change", "pattern"),
    [
        ({"use_flash_atn": True}, "visual.use_flash_atn"),  # unknown field (typo)
        ({"model_type": "siglip_vision_model"}, "visual.model_type"),
        ({"architectures": ["SiglipVisionModel"]}, "visual.architectures"),
        ({"qk_normalization": True}, "visual.qk_normalization"),
        ({"norm_type": "rms_norm"}, "visual.norm_type"),
        ({"num_channels": 1}, "visual.num_channels"),
        ({"torch_dtype": "int8"}, "visual.torch_dtype"),
        ({"num_attention_heads": 5}, "visual"),  # 32 is not divisible by 5
    ],
)
def test_bad_vision_sections_name_the_key_and_the_file(tmp_path, small_config, change, pattern):
    _original(small_config, tmp_path)
    hf = json.loads((tmp_path / "config.json").read_text())
    hf["visual"] |= change
    (tmp_path / "config.json").write_text(json.dumps(hf))
    _refused(tmp_path, ConfigError, pattern, str(tmp_path / "config.json"))


@pytest.mark.parametrize("field", ["qkv_bias", "qk_normalization", "norm_type", "hidden_size"])
def test_vision_fields_whose_default_is_another_model_are_required(tmp_path, small_config, field):
    _original(small_config, tmp_path)
    hf = json.loads((tmp_path / "config.json").read_text())
    del hf["visual"][field]
    (tmp_path / "config.json").write_text(json.dumps(hf))
    _refused(tmp_path, ConfigError, f"'visual.{field}' is missing")


def test_contradicting_vision_sections_and_dtypes_are_refused(tmp_path, small_config):
    _original(small_config, tmp_path)
    hf = json.loads((tmp_path / "config.json").read_text())
    other = hf["visual"] | {"num_hidden_layers": 3}
    (tmp_path / "config.json").write_text(json.dumps(hf | {"vision_config": other}))
    _refused(tmp_path, ConfigError, "'visual' and 'vision_config'", str(tmp_path))
    same = hf | {"vision_config": hf["visual"]}  # both, agreeing: fine
    (tmp_path / "config.json").write_text(json.dumps(same))
    load_pretrained(tmp_path, attention_backend=SDPA)
    (tmp_path / "config.json").write_text(json.dumps(hf | {"dtype": "float16"}))
    _refused(tmp_path, ConfigError, "torch_dtype 'bfloat16' != dtype 'float16'")
    (tmp_path / "config.json").write_text(json.dumps(hf | {"model_type": "llama"}))
    _refused(tmp_path, ConfigError, "model_type 'llama'")


def test_a_projector_that_does_not_fit_is_refused(tmp_path, small_config):
    hf = long_vita_config(**_llm_fields(small_config), vision=_vision_fields(small_config))
    state = random_state(build_model(small_config, seed=0), seed=7)
    state["model.vision_projection.mlp.0.weight"] = torch.zeros(32, 3 * 32)
    state["model.vision_projection.mlp.2.weight"] = torch.zeros(48, 32)
    write_checkpoint(tmp_path, hf, state, num_shards=2)
    message = _refused(tmp_path, WeightsError, "mlp.0.weight is [32, 96]", "mlp.2.weight")
    assert "ViT width x 4 = 128" in message and "LLM width 64" in message


# ----------------------------------------------------------------------------------------------
# Writing: the original's schema, round trip


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_save_writes_the_originals_schema_and_round_trips(tmp_path, small_config, dtype):
    model = build_model(small_config, seed=3, attention_backend=SDPA)
    save_pretrained(model, tmp_path, max_shard_bytes=100_000, dtype=dtype)
    hf = json.loads((tmp_path / "config.json").read_text())
    name = {torch.float32: "float32", torch.bfloat16: "bfloat16"}[dtype]
    assert hf["model_type"] == "long_vita" and hf["architectures"] == ["LongVITAForCausalLM"]
    assert hf["torch_dtype"] == name and "vision_config" not in hf
    visual = hf["visual"]
    assert visual["architectures"] == ["InternVisionModel"]
    assert visual["model_type"] == "intern_vit_6b" and visual["torch_dtype"] == name
    expected_visual = _vision_fields(small_config)
    for key in ("_name_or_path", "auto_map", "transformers_version", "use_bfloat16"):
        del expected_visual[key]
    assert visual == expected_visual | {"torch_dtype": name}
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) >= 2
    loaded = load_pretrained(tmp_path, attention_backend=SDPA)
    assert loaded.config == model.config
    expected = {k: v.to(dtype) for k, v in model.state_dict().items()}
    _assert_equal_state(loaded, expected)
    # save -> load -> save: the same config, index and tensor data (the header's metadata
    # order is not fixed by safetensors, so the data's recorded sha256 is compared)
    again = tmp_path / "again"
    save_pretrained(loaded, again, max_shard_bytes=100_000)
    assert json.loads((again / "config.json").read_text()) == hf
    assert (again / "model.safetensors.index.json").read_text() == json.dumps(
        index, indent=2
    ) + "\n"
    for file in tmp_path.glob("*.safetensors"):
        assert _data_digest(again / file.name) == _data_digest(file)


def _data_digest(file):
    with safe_open(str(file), framework="pt") as reader:
        return reader.metadata()["lvita_data_sha256"]


def test_released_layout_round_trips_through_lvita(tmp_path, small_config):
    """original -> load -> save -> load: bit-equal tensors, equal config, same schema."""
    written = _original(small_config, tmp_path / "released")
    loaded = load_pretrained(tmp_path / "released", attention_backend=SDPA)
    save_pretrained(loaded, tmp_path / "saved", max_shard_bytes=150_000)
    again = load_pretrained(tmp_path / "saved", attention_backend=SDPA)
    assert again.config == loaded.config
    _assert_equal_state(again, written)
    released = json.loads((tmp_path / "released" / "config.json").read_text())
    saved = json.loads((tmp_path / "saved" / "config.json").read_text())
    architecture = ("model_type", "architectures", "hidden_size", "num_hidden_layers", "rope_theta")
    assert {k: saved[k] for k in architecture} == {k: released[k] for k in architecture}
    assert saved["max_position_embeddings"] == 1_310_720 and saved["torch_dtype"] == "bfloat16"
    for key in ("model_type", "architectures", "hidden_size", "qkv_bias", "norm_type"):
        assert saved["visual"][key] == released["visual"][key]


def test_a_language_model_only_config_is_saved_as_plain_qwen2(tmp_path, small_config):
    config = LongVitaConfig(llm=small_config.llm, vision=None)
    save_pretrained(build_model(config, seed=1), tmp_path)
    hf = json.loads((tmp_path / "config.json").read_text())
    assert hf["model_type"] == "qwen2" and hf["architectures"] == ["Qwen2ForCausalLM"]
    assert "visual" not in hf and load_config(tmp_path) == config


# ----------------------------------------------------------------------------------------------
# Stage 1: composing the two public checkpoints


def _public_pair(tmp_path, small_config, *, llm_shards=2, vision_shards=2):
    """A Qwen2.5-layout LLM directory and an InternViT-layout vision directory."""
    state = random_state(build_model(small_config, seed=0), seed=11)
    llm_state = {k: v for k, v in state.items() if not k.startswith(VISION_PREFIXES)}
    vision_state = {
        k[len(VISION_PREFIX) :]: v for k, v in state.items() if k.startswith(VISION_PREFIX)
    }
    llm_dir, vision_dir = tmp_path / "Qwen2.5", tmp_path / "InternViT"
    llm = write_checkpoint(
        llm_dir, qwen25_config(**_llm_fields(small_config)), llm_state, num_shards=llm_shards
    )
    vision = write_checkpoint(
        vision_dir, _vision_fields(small_config), vision_state, num_shards=vision_shards
    )
    return llm_dir, vision_dir, llm, vision


@pytest.mark.parametrize(("llm_shards", "vision_shards"), [(2, 3), (1, 1)])
def test_stage1_composes_the_two_public_checkpoints(
    tmp_path, small_config, llm_shards, vision_shards
):
    llm_dir, vision_dir, llm, vision = _public_pair(
        tmp_path, small_config, llm_shards=llm_shards, vision_shards=vision_shards
    )
    model = compose_pretrained(llm_dir, vision_dir, seed=42, attention_backend=SDPA)
    assert model.config.llm == small_config.llm and model.config.vision == small_config.vision
    state = model.state_dict()
    for name, tensor in llm.items():
        assert torch.equal(state[name], tensor), name
    for name, tensor in vision.items():
        assert torch.equal(state[VISION_PREFIX + name], tensor), name
    # the projector: fresh from the seed, in the language model's dtype, on any device alike
    projector = build_model(small_config, seed=0).model.vision_projection
    init_weights(projector, seed=42)
    for name, tensor in projector.state_dict().items():
        got = state[f"model.vision_projection.{name}"]
        assert got.dtype == torch.bfloat16 and torch.equal(got, tensor.bfloat16()), name
    other = compose_pretrained(llm_dir, vision_dir, seed=43, dtype=torch.float32)
    assert other.model.vision_projection.mlp[0].weight.dtype == torch.float32
    assert not torch.equal(
        other.model.vision_projection.mlp[0].weight, projector.mlp[0].weight.float()
    )
    # the composed model runs and saves in the original's schema
    ids = torch.arange(12)
    with torch.no_grad():
        model.float()(ids, ids, pixel_values=torch.randn(1, 3, 56, 56),
                      image_token_positions=torch.arange(4).view(1, 4) + 2)  # fmt: skip
    save_pretrained(model, tmp_path / "out")
    assert json.loads((tmp_path / "out" / "config.json").read_text())["model_type"] == "long_vita"


def test_stage1_refusals_name_the_file(tmp_path, small_config):
    llm_dir, vision_dir, _, _ = _public_pair(tmp_path, small_config)
    with pytest.raises(ConfigError, match="a Long-VITA checkpoint"):
        _original(small_config, tmp_path / "lv")
        compose_pretrained(tmp_path / "lv", vision_dir)
    with pytest.raises(ConfigError, match=r"InternViT.*visual|model_type 'qwen2'"):
        compose_pretrained(llm_dir, llm_dir)  # a Qwen2 directory as the vision tower
    with pytest.raises(ConfigError, match="checkpoint directory or config.json"):
        compose_pretrained(llm_dir, tmp_path / "nowhere")
    # a tower whose patch grid the 2x2 pixel shuffle cannot fold (42 / 14 = 3 patches a side)
    hf = json.loads((vision_dir / "config.json").read_text())
    (vision_dir / "config.json").write_text(json.dumps(hf | {"image_size": 42}))
    with pytest.raises(ConfigError, match="pixel-shuffle stride") as info:
        compose_pretrained(llm_dir, vision_dir)
    assert str(vision_dir / "config.json") in str(info.value)
    # weights that are not the config's: the InternViT directory says 32 wide, holds 48
    (vision_dir / "config.json").write_text(json.dumps(hf | {"hidden_size": 48}))
    with pytest.raises(WeightsError, match="shape/dtype mismatch"):
        compose_pretrained(llm_dir, vision_dir)


def test_the_1m_position_settings_read_as_plain_rope(tmp_path, small_config):
    hf = long_vita_config(**_llm_fields(small_config), vision=_vision_fields(small_config))
    assert hf["sliding_window"] == 1_310_720 and hf["use_sliding_window"] is False
    (tmp_path / "config.json").write_text(json.dumps(hf))
    config = load_config(tmp_path)
    assert config.llm.max_position_embeddings == 1_310_720 and config.llm.rope_theta == 1e6
    (tmp_path / "config.json").write_text(json.dumps(hf | {"use_sliding_window": True}))
    with pytest.raises(ConfigError, match="sliding-window"):
        load_config(tmp_path)
    scaled = hf | {"rope_scaling": {"type": "dynamic", "factor": 4.0}}
    (tmp_path / "config.json").write_text(json.dumps(scaled))
    with pytest.raises(ConfigError, match="rope type 'dynamic'"):
        load_config(tmp_path)


def test_checkpoint_headers_are_what_the_layouts_say(tmp_path, small_config):
    """Guard against a vacuous pass: the helper really wrote bf16 shards named as released."""
    _original(small_config, tmp_path)
    file = sorted(tmp_path.glob("model-*.safetensors"))[0]
    with safe_open(str(file), framework="pt") as reader:
        key = next(iter(reader.keys()))
        assert reader.get_slice(key).get_dtype() == "BF16"
