"""Tiny checkpoints in the three public Hugging Face layouts, written without lvita's writer.

The config fields are the documented ones (reference section 1: the original's
``config_14B.json``, Qwen2.5-14B-Instruct's and InternViT-300M-448px's config.json) with small
sizes; the weights are safetensors shards (plus ``model.safetensors.index.json``) written with
``safetensors.torch.save_file`` directly, so these tests check lvita against the layouts, not
against itself:

- `write_long_vita`: the original's released layout (``model_type: long_vita``, the tower under
  ``visual``, bf16, names ``model.*`` / ``model.vision_model.*`` / ``model.vision_projection.*``
  / ``lm_head.weight``);
- `write_qwen25`: Qwen2.5's own layout (``model_type: qwen2``, Qwen2 names);
- `write_internvit`: InternViT-300M-448px's own layout (``model_type: intern_vit_6b``, tower
  names without prefix).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

VISION_PREFIX = "model.vision_model."


def long_vita_config(
    *,
    vocab_size: int,
    hidden_size: int,
    intermediate_size: int,
    num_layers: int,
    num_heads: int,
    num_kv_heads: int,
    vision: dict[str, Any],
    max_position_embeddings: int = 1_310_720,
) -> dict[str, Any]:
    """The original's config.json (the 1M model's positions by default) at small sizes."""
    return {
        **qwen25_config(
            vocab_size=vocab_size,
            hidden_size=hidden_size,
            intermediate_size=intermediate_size,
            num_layers=num_layers,
            num_heads=num_heads,
            num_kv_heads=num_kv_heads,
            max_position_embeddings=max_position_embeddings,
        ),
        "architectures": ["LongVITAForCausalLM"],
        "model_type": "long_vita",
        "max_window_layers": 70,
        "visual": vision,
    }


def qwen25_config(
    *,
    vocab_size: int,
    hidden_size: int,
    intermediate_size: int,
    num_layers: int,
    num_heads: int,
    num_kv_heads: int,
    max_position_embeddings: int = 32768,
) -> dict[str, Any]:
    """Qwen2.5-14B-Instruct's config.json fields at small sizes."""
    return {
        "architectures": ["Qwen2ForCausalLM"],
        "attention_dropout": 0.0,
        "bos_token_id": 151643,
        "eos_token_id": 151645,
        "hidden_act": "silu",
        "hidden_size": hidden_size,
        "initializer_range": 0.02,
        "intermediate_size": intermediate_size,
        "max_position_embeddings": max_position_embeddings,
        "max_window_layers": num_layers,
        "model_type": "qwen2",
        "num_attention_heads": num_heads,
        "num_hidden_layers": num_layers,
        "num_key_value_heads": num_kv_heads,
        "rms_norm_eps": 1e-6,
        "rope_scaling": None,
        "rope_theta": 1000000.0,
        "sliding_window": max_position_embeddings,
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
        "transformers_version": "4.43.1",
        "use_cache": True,
        "use_sliding_window": False,
        "vocab_size": vocab_size,
    }


def internvit_config(
    *,
    hidden_size: int,
    intermediate_size: int,
    num_layers: int,
    num_heads: int,
    image_size: int = 448,
    patch_size: int = 14,
) -> dict[str, Any]:
    """InternViT-300M-448px's config.json fields (the ``visual`` section of the original's)."""
    return {
        "_name_or_path": "OpenGVLab/InternViT-300M-448px",
        "architectures": ["InternVisionModel"],
        "attention_dropout": 0.0,
        "auto_map": {
            "AutoConfig": "configuration_intern_vit.InternVisionConfig",
            "AutoModel": "modeling_intern_vit.InternVisionModel",
        },
        "drop_path_rate": 0.0,
        "dropout": 0.0,
        "hidden_act": "gelu",
        "hidden_size": hidden_size,
        "image_size": image_size,
        "initializer_factor": 1.0,
        "initializer_range": 0.02,
        "intermediate_size": intermediate_size,
        "layer_norm_eps": 1e-6,
        "model_type": "intern_vit_6b",
        "norm_type": "layer_norm",
        "num_attention_heads": num_heads,
        "num_channels": 3,
        "num_hidden_layers": num_layers,
        "patch_size": patch_size,
        "qk_normalization": False,
        "qkv_bias": True,
        "torch_dtype": "bfloat16",
        "transformers_version": "4.37.2",
        "use_bfloat16": True,
        "use_flash_attn": True,
    }


def write_checkpoint(
    directory: Path,
    config: dict[str, Any],
    tensors: Mapping[str, torch.Tensor],
    *,
    num_shards: int = 2,
    dtype: torch.dtype = torch.bfloat16,
) -> dict[str, torch.Tensor]:
    """config.json + `tensors` (cast to `dtype`) in `num_shards` files with an index (one
    ``model.safetensors`` when 1), as transformers names them. Returns what was written."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(config, indent=2))
    written = {
        name: (t.to(dtype) if t.is_floating_point() else t).contiguous()
        for name, t in tensors.items()
    }
    names = list(written)
    if num_shards == 1:
        save_file(written, str(directory / "model.safetensors"), metadata={"format": "pt"})
        return written
    per_shard = -(-len(names) // num_shards)
    weight_map = {}
    for index in range(num_shards):
        part = names[index * per_shard : (index + 1) * per_shard]
        file = f"model-{index + 1:05d}-of-{num_shards:05d}.safetensors"
        save_file({n: written[n] for n in part}, str(directory / file), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(part, file))
    total = sum(t.numel() * t.element_size() for t in written.values())
    index_json = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index_json, indent=2))
    return written


def random_state(model: torch.nn.Module, seed: int) -> dict[str, torch.Tensor]:
    """Random values (not an init: every tensor differs) for every entry of the state dict."""
    generator = torch.Generator().manual_seed(seed)
    return {
        name: torch.randn(t.shape, generator=generator) * 0.05
        for name, t in model.state_dict().items()
    }
