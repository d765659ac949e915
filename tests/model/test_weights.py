"""Safetensors load/save in the Long-VITA / Qwen2 / InternViT Hugging Face layouts; damaged
checkpoints (truncated, altered, missing or incomplete shards) are refused before any tensor is
assigned."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import struct

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from lvita_model.attention import SdpaBackend
from lvita_model.errors import WeightsError
from lvita_model.model import build_model
from lvita_model.vision import InternVisionModel
from lvita_model.weights import (
    DATA_SHA256_KEY,
    INDEX_FILE,
    SINGLE_FILE,
    checkpoint_files,
    load_pretrained,
    load_state,
    load_vision_weights,
    read_weight_map,
    save_pretrained,
)


def saved_keys(directory) -> set[str]:
    keys = set()
    for file in directory.glob("*.safetensors"):
        with safe_open(str(file), framework="pt") as reader:
            keys.update(reader.keys())
    return keys


def assert_same_state(a, b):
    state_a, state_b = a.state_dict(), b.state_dict()
    assert state_a.keys() == state_b.keys()
    for name in state_a:
        assert torch.equal(state_a[name], state_b[name]), name


def test_long_vita_layout_names(tmp_path, small_config):
    model = build_model(small_config, attention_backend=SdpaBackend())
    save_pretrained(model, tmp_path)
    keys = saved_keys(tmp_path)
    for name in (
        "model.embed_tokens.weight",
        "model.layers.1.self_attn.q_proj.bias",
        "model.layers.0.mlp.gate_proj.weight",
        "model.norm.weight",
        "lm_head.weight",
        "model.vision_model.embeddings.class_embedding",
        "model.vision_model.embeddings.patch_embedding.weight",
        "model.vision_model.embeddings.position_embedding",
        "model.vision_model.encoder.layers.1.attn.qkv.weight",
        "model.vision_model.encoder.layers.0.ls1",
        "model.vision_projection.pre_proj_layernorm.weight",
        "model.vision_projection.pre_proj_layernorm.bias",
        "model.vision_projection.mlp.0.weight",
        "model.vision_projection.mlp.2.weight",
    ):
        assert name in keys, name
    assert not any(k.startswith("model.vision_projection.mlp") and k.endswith("bias") for k in keys)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["visual"]["hidden_size"] == 32 and config["model_type"] == "long_vita"
    assert config["architectures"] == ["LongVITAForCausalLM"] and config["torch_dtype"] == "float32"


@pytest.mark.parametrize("max_shard_bytes", [5 * 2**30, 200_000])
def test_round_trip_single_and_sharded(tmp_path, small_config, max_shard_bytes):
    model = build_model(small_config, seed=3, attention_backend=SdpaBackend())
    save_pretrained(model, tmp_path, max_shard_bytes=max_shard_bytes)
    sharded = max_shard_bytes < 5 * 2**30
    assert (tmp_path / INDEX_FILE).is_file() == sharded
    assert (tmp_path / SINGLE_FILE).is_file() == (not sharded)
    if sharded:
        weight_map = json.loads((tmp_path / INDEX_FILE).read_text())["weight_map"]
        assert len(set(weight_map.values())) > 2
        assert set(weight_map) == set(model.state_dict())
    loaded = load_pretrained(tmp_path, attention_backend=SdpaBackend())
    assert_same_state(model, loaded)
    assert not any(p.is_meta for p in loaded.parameters())
    assert all(isinstance(p, torch.nn.Parameter) and p.requires_grad for p in loaded.parameters())


def test_bf16_save_and_dtype_on_load(tmp_path, small_config):
    model = build_model(small_config, attention_backend=SdpaBackend())
    save_pretrained(model, tmp_path, dtype=torch.bfloat16)
    loaded = load_pretrained(tmp_path, attention_backend=SdpaBackend())
    assert {p.dtype for p in loaded.parameters()} == {torch.bfloat16}
    as_fp32 = load_pretrained(tmp_path, dtype=torch.float32, attention_backend=SdpaBackend())
    assert {p.dtype for p in as_fp32.parameters()} == {torch.float32}
    expected = model.model.embed_tokens.weight.to(torch.bfloat16).float()
    assert torch.equal(as_fp32.model.embed_tokens.weight, expected)


def test_tied_embeddings_save_no_lm_head(tmp_path, small_config):
    tied = dataclasses.replace(
        small_config, llm=dataclasses.replace(small_config.llm, tie_word_embeddings=True)
    )
    model = build_model(tied, attention_backend=SdpaBackend())
    save_pretrained(model, tmp_path)
    assert "lm_head.weight" not in saved_keys(tmp_path)
    loaded = load_pretrained(tmp_path, attention_backend=SdpaBackend())
    assert loaded.head_weight is loaded.model.embed_tokens.weight


def test_mismatched_checkpoints_list_every_problem(tmp_path, small_config):
    model = build_model(small_config, attention_backend=SdpaBackend())
    save_pretrained(model, tmp_path)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    del state["model.layers.1.mlp.up_proj.weight"], state["model.norm.weight"]
    state["model.extra.weight"] = torch.zeros(2)
    state["model.layers.0.self_attn.q_proj.bias"] = torch.zeros(7)
    save_file(state, str(tmp_path / SINGLE_FILE))
    with pytest.raises(WeightsError) as error:
        load_pretrained(tmp_path, attention_backend=SdpaBackend())
    message = str(error.value)
    assert "missing (2): model.layers.1.mlp.up_proj.weight, model.norm.weight" in message
    assert "unexpected (1): model.extra.weight" in message
    assert "model.layers.0.self_attn.q_proj.bias: checkpoint (7,), model (64,)" in message


def test_missing_files_are_errors(tmp_path, small_config):
    with pytest.raises(WeightsError, match="no model.safetensors"):
        load_vision_weights(InternVisionModel(small_config.vision), tmp_path)
    (tmp_path / INDEX_FILE).write_text(json.dumps({"weight_map": {"a": "model-1.safetensors"}}))
    with pytest.raises(WeightsError, match="do not exist"):
        load_vision_weights(InternVisionModel(small_config.vision), tmp_path)


@pytest.mark.parametrize("prefix", ["", "vision_model."])
def test_internvit_checkpoint_loads_into_the_vision_tower(tmp_path, small_config, prefix):
    source = InternVisionModel(small_config.vision)
    save_file(
        {prefix + k: v.contiguous() for k, v in source.state_dict().items()},
        str(tmp_path / SINGLE_FILE),
    )
    with torch.device("meta"):
        target = InternVisionModel(small_config.vision)
    load_vision_weights(target, tmp_path)
    assert_same_state(source, target)


# --------------------------------------------------------------------------------------------
# Damaged checkpoints


def save_sharded(directory, config, seed=3):
    model = build_model(config, seed=seed, attention_backend=SdpaBackend())
    save_pretrained(model, directory, max_shard_bytes=200_000)
    shards = sorted(directory.glob("model-*.safetensors"))
    assert len(shards) > 2
    return model, shards


def data_start(file) -> int:
    with open(file, "rb") as handle:
        return 8 + struct.unpack("<Q", handle.read(8))[0]


def flip_data_byte(file) -> None:
    data = bytearray(file.read_bytes())
    start = data_start(file)
    data[start + (len(data) - start) // 2] ^= 0x01  # inside tensor data: the header still parses
    file.write_bytes(bytes(data))


def test_every_shard_records_the_sha256_of_its_tensor_data(tmp_path, small_config):
    _, shards = save_sharded(tmp_path, small_config)
    for shard in shards:
        with safe_open(str(shard), framework="pt") as reader:
            metadata = reader.metadata()
        data = shard.read_bytes()[data_start(shard) :]
        assert metadata == {"format": "pt", DATA_SHA256_KEY: hashlib.sha256(data).hexdigest()}


def test_load_state_assigns_nothing_when_a_later_shard_is_damaged(tmp_path, small_config):
    _, shards = save_sharded(tmp_path, small_config)
    flip_data_byte(shards[-1])
    target = build_model(small_config, seed=7, attention_backend=SdpaBackend())
    before = {k: v.clone() for k, v in target.state_dict().items()}
    with pytest.raises(WeightsError, match="nothing was loaded"):
        load_state(target, checkpoint_files(tmp_path), weight_map=read_weight_map(tmp_path))
    after = target.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # not half-loaded


@pytest.mark.parametrize("sharded", [False, True])
def test_a_truncated_shard_is_refused_naming_the_file(tmp_path, small_config, sharded):
    model = build_model(small_config, seed=3, attention_backend=SdpaBackend())
    save_pretrained(model, tmp_path, max_shard_bytes=200_000 if sharded else 5 * 2**30)
    file = sorted(tmp_path.glob("model*.safetensors"))[-1]
    file.write_bytes(file.read_bytes()[:-100])
    with pytest.raises(WeightsError) as error:
        load_pretrained(tmp_path, attention_backend=SdpaBackend())
    assert f"{file}: not a readable safetensors file, truncated or overwritten" in str(error.value)
    assert "file not fully covered" in str(error.value)  # safetensors' own words


@pytest.mark.parametrize("sharded", [False, True])
def test_a_flipped_byte_in_tensor_data_is_refused(tmp_path, small_config, sharded):
    model = build_model(small_config, seed=3, attention_backend=SdpaBackend())
    save_pretrained(model, tmp_path, max_shard_bytes=200_000 if sharded else 5 * 2**30)
    file = sorted(tmp_path.glob("model*.safetensors"))[0]
    flip_data_byte(file)
    with pytest.raises(WeightsError, match=r"sha256 [0-9a-f]{16}\.\.\., its header records") as e:
        load_pretrained(tmp_path, attention_backend=SdpaBackend())
    assert str(e.value).startswith(f"checkpoint is damaged, nothing was loaded:\n  {file}: ")


def test_without_checksums_a_checkpoint_loads_as_before(tmp_path, small_config):
    """A Hugging Face hub checkpoint has no checksum: an altered byte cannot be seen, and the
    checkpoint still loads."""
    model = build_model(small_config, seed=3, attention_backend=SdpaBackend())
    save_pretrained(model, tmp_path)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(tmp_path / SINGLE_FILE), metadata={"format": "pt"})
    flip_data_byte(tmp_path / SINGLE_FILE)
    loaded = load_pretrained(tmp_path, attention_backend=SdpaBackend())
    changed = [k for k, v in loaded.state_dict().items() if not torch.equal(v, state[k])]
    assert len(changed) == 1


def test_a_missing_shard_is_refused(tmp_path, small_config):
    _, shards = save_sharded(tmp_path, small_config)
    shards[1].unlink()
    with pytest.raises(WeightsError, match=f"names shards that do not exist: \\['{shards[1].name}"):
        load_pretrained(tmp_path, attention_backend=SdpaBackend())


def test_a_shard_without_the_tensors_its_index_maps_to_it_is_refused(tmp_path, small_config):
    model, shards = save_sharded(tmp_path, small_config)
    index = json.loads((tmp_path / INDEX_FILE).read_text())
    moved = next(k for k, f in index["weight_map"].items() if f == shards[0].name)
    index["weight_map"][moved] = shards[1].name  # e.g. a shard from another save
    (tmp_path / INDEX_FILE).write_text(json.dumps(index))
    expected = f"{shards[1]}: lacks tensors the index maps to it \\(1\\): {moved}"
    with pytest.raises(WeightsError, match=expected):
        load_pretrained(tmp_path, attention_backend=SdpaBackend())


def test_an_integer_tensor_for_a_float_parameter_is_refused(tmp_path, small_config):
    model = build_model(small_config, attention_backend=SdpaBackend())
    save_pretrained(model, tmp_path)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    state["model.norm.weight"] = torch.ones(64, dtype=torch.int32)
    save_file(state, str(tmp_path / SINGLE_FILE))
    with pytest.raises(WeightsError, match="model.norm.weight: checkpoint dtype I32, model torch"):
        load_pretrained(tmp_path, attention_backend=SdpaBackend())


def test_a_damaged_index_is_refused(tmp_path, small_config):
    save_sharded(tmp_path, small_config)
    (tmp_path / INDEX_FILE).write_text('{"weight_map": ')
    with pytest.raises(WeightsError, match="model.safetensors.index.json: not a safetensors index"):
        load_pretrained(tmp_path, attention_backend=SdpaBackend())
