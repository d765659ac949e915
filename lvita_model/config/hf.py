"""Hugging Face ``config.json`` <-> `LongVitaConfig`, in the original Long-VITA schema.

**Read** (`load_config`, `from_hf_config`):

- a released Long-VITA checkpoint (``VITA-MLLM/Long-VITA-{16K,128K,1M}_HF``; the original's
  ``config_14B.json``): Qwen2 fields at the top level, ``model_type: long_vita``,
  ``architectures: [LongVITAForCausalLM]``, the InternViT fields under **``visual``**;
- a directory lvita wrote before it wrote that schema: ``model_type: qwen2`` with the InternViT
  fields under ``vision_config`` (and ``vision_downsample_ratio``);
- a plain Qwen2 / Qwen2.5 checkpoint (``model_type: qwen2``, no vision section): the language
  model alone;
- an InternViT checkpoint (``model_type: intern_vit_6b``) is refused by `from_hf_config` (it has
  no language model): read it with `vision_config_from_hf`, as stage 1 does
  (`lvita_model.weights.compose_pretrained`).

The top level is read leniently: Hugging Face configs carry many training and generation fields,
so unknown ones are ignored, but the fields that fix the architecture are required and checked,
and a shape we do not build (rope scaling, sliding windows) is an error, never a silently
different model. The 1M model's ``max_position_embeddings`` / ``sliding_window`` 1,310,720 with
``use_sliding_window: false`` and no ``rope_scaling`` read as plain RoPE (theta 1e6).

The vision section is read strictly, because a mistake there silently changes the tower: every
key must be an InternViT field (`VISION_FIELDS`) or a generic Hugging Face one
(`GENERIC_FIELDS`); the fields whose ``InternVisionConfig`` default is the 6B model's
(``qkv_bias``, ``qk_normalization``, ``norm_type``) must be given; ``model_type`` /
``architectures``, when present, must name InternViT; ``visual`` and ``vision_config`` both
present must agree. Each error names the key (``visual.qk_normalization``); `load_config` adds
the file. ``torch_dtype`` (transformers 4) / ``dtype`` (5) must be a dtype we load; it is the
storage dtype of the weights, not part of the architecture, so `LongVitaConfig` does not keep it.

**Write** (`to_hf_config`): what the original's ``LongVITAConfig`` reads: the Qwen2 fields (with
Qwen2.5's ``bos/eos_token_id`` when the vocabulary holds them, ``sliding_window`` =
``max_position_embeddings`` and ``use_sliding_window: false`` as in the released files),
``model_type: long_vita``, ``architectures: [LongVITAForCausalLM]``, ``torch_dtype``, and the
tower under ``visual`` with its own ``architectures: [InternVisionModel]`` and ``model_type:
intern_vit_6b``; lvita's ``vision_chunk_tiles`` only when it is not the default (the
original's config class keeps an unknown field and ignores it). A language-model-only
configuration is written as plain Qwen2 (``Qwen2ForCausalLM``), which transformers loads as is.
No ``auto_map`` is written: lvita ships no remote code (a tool that loads with
``trust_remote_code`` needs the original's code files copied in).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from lvita_model.config.base import (
    PRESETS,
    LLMConfig,
    LongVitaConfig,
    ProjectorConfig,
    VisionConfig,
)
from lvita_model.errors import ConfigError

LONG_VITA_MODEL_TYPE = "long_vita"
LONG_VITA_ARCHITECTURE = "LongVITAForCausalLM"
QWEN2_MODEL_TYPE = "qwen2"
INTERNVIT_MODEL_TYPE = "intern_vit_6b"
INTERNVIT_ARCHITECTURE = "InternVisionModel"
VISION_KEYS = ("visual", "vision_config")
"""Where the tower's config may be: the original's key first, then lvita's older one."""
DTYPE_NAMES = ("float32", "bfloat16", "float16")
QWEN25_BOS_ID, QWEN25_EOS_ID = 151643, 151645
DEFAULT_CHUNK_TILES = LongVitaConfig.__dataclass_fields__["vision_chunk_tiles"].default

VISION_FIELDS = frozenset(
    (
        "image_size", "patch_size", "hidden_size", "intermediate_size", "num_hidden_layers",
        "num_attention_heads", "layer_norm_eps", "qkv_bias", "hidden_act", "norm_type",
        "qk_normalization", "num_channels", "drop_path_rate", "dropout", "attention_dropout",
        "initializer_factor", "initializer_range", "use_flash_attn",
    )
)  # fmt: skip
"""``InternVisionConfig``'s own fields (the last six only matter for training or kernels)."""
GENERIC_FIELDS = frozenset(
    (
        "_name_or_path", "architectures", "model_type", "auto_map", "transformers_version",
        "torch_dtype", "dtype", "use_bfloat16", "_commit_hash", "_attn_implementation_autoset",
        "return_dict", "output_hidden_states", "output_attentions", "torchscript",
        "tf_legacy_loss", "pruned_heads", "tie_word_embeddings", "chunk_size_feed_forward",
        "is_encoder_decoder", "is_decoder", "cross_attention_hidden_size", "add_cross_attention",
        "tie_encoder_decoder", "max_length", "min_length", "do_sample", "early_stopping",
        "num_beams", "num_beam_groups", "diversity_penalty", "temperature", "top_k", "top_p",
        "typical_p", "repetition_penalty", "length_penalty", "no_repeat_ngram_size",
        "encoder_no_repeat_ngram_size", "bad_words_ids", "num_return_sequences", "output_scores",
        "return_dict_in_generate", "forced_bos_token_id", "forced_eos_token_id",
        "remove_invalid_values", "exponential_decay_length_penalty", "suppress_tokens",
        "begin_suppress_tokens", "finetuning_task", "id2label", "label2id", "tokenizer_class",
        "prefix", "bos_token_id", "pad_token_id", "eos_token_id", "sep_token_id",
        "decoder_start_token_id", "task_specific_params", "problem_type",
    )
)  # fmt: skip
"""Fields every transformers ``PretrainedConfig.to_dict()`` (4.x and 5.x) may write."""


def load_config(name_or_path: str | Path) -> LongVitaConfig:
    """A preset name, a checkpoint directory or a ``config.json`` path (errors name the file)."""
    if str(name_or_path) in PRESETS:
        return PRESETS[str(name_or_path)]
    path = config_path(name_or_path)
    try:
        return from_hf_config(read_json(path))
    except ConfigError as error:
        raise ConfigError(f"{path}: {error}") from None


def config_path(name_or_path: str | Path, *, preset_ok: bool = True) -> Path:
    """``config.json`` of a directory (or the file itself); `ConfigError` when there is none."""
    path = Path(name_or_path)
    if path.is_dir():
        path = path / "config.json"
    if not path.is_file():
        presets = f"a preset ({', '.join(PRESETS)}) nor " if preset_ok else ""
        raise ConfigError(f"{name_or_path}: neither {presets}a checkpoint directory or config.json")
    return path


def compose_config(llm_path: str | Path, vision_path: str | Path) -> LongVitaConfig:
    """Stage 1's configuration from two public checkpoints: the language model of a Qwen2 /
    Qwen2.5 directory, the tower of an InternViT one (errors name the file). Sizes are checked
    against each other: the tower's patch grid must divide by the pixel shuffle's stride (2);
    the fresh projector then takes ViT width x 4 and gives the LLM width."""
    llm_file = config_path(llm_path, preset_ok=False)
    try:
        config = from_hf_config(read_json(llm_file))
    except ConfigError as error:
        raise ConfigError(f"{llm_file}: {error}") from None
    if config.vision is not None:
        raise ConfigError(
            f"{llm_file}: a Long-VITA checkpoint (it has a vision tower): start from it alone "
            "(model.name), the language model of stage 1 is a Qwen2 / Qwen2.5 checkpoint"
        )
    vision_file = config_path(vision_path, preset_ok=False)
    try:
        vision = vision_config_from_hf(read_json(vision_file))
        return LongVitaConfig(llm=config.llm, vision=vision)
    except ConfigError as error:
        raise ConfigError(f"{vision_file}: {error}") from None


def read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ConfigError(f"{path}: not valid JSON ({error})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: not a JSON object")
    return data


# --------------------------------------------------------------------------------------------
# Reading


def from_hf_config(hf: dict[str, Any]) -> LongVitaConfig:
    """Read a Long-VITA or Qwen2 ``config.json`` (see the module docstring)."""
    model_type = hf.get("model_type")
    architectures = hf.get("architectures") or []
    if INTERNVIT_ARCHITECTURE in architectures or model_type == INTERNVIT_MODEL_TYPE:
        raise ConfigError(
            "an InternViT-only checkpoint has no language model: build the "
            "vision tower with vision_config_from_hf() and load it with "
            "load_vision_weights() (stage 1: lvita_model.weights.compose_pretrained)"
        )
    if model_type not in (None, LONG_VITA_MODEL_TYPE, QWEN2_MODEL_TYPE):
        raise ConfigError(
            f"model_type {model_type!r}: expected {LONG_VITA_MODEL_TYPE!r} (a Long-VITA "
            f"checkpoint) or {QWEN2_MODEL_TYPE!r} (Qwen2 / Qwen2.5)"
        )
    storage_dtype(hf)
    vision = _vision_section(hf)
    if vision is None and model_type == LONG_VITA_MODEL_TYPE:
        raise ConfigError(
            f"model_type {LONG_VITA_MODEL_TYPE!r} without a vision section: the InternViT "
            f"fields belong under 'visual' (or lvita's older 'vision_config')"
        )
    ratio = hf.get("vision_downsample_ratio", hf.get("downsample_ratio", 0.5))
    try:
        projector = ProjectorConfig(downsample_ratio=ratio)
    except ConfigError as error:
        raise ConfigError(f"vision_downsample_ratio: {error}") from None
    chunk = hf.get("vision_chunk_tiles", DEFAULT_CHUNK_TILES)
    return LongVitaConfig(
        llm=_llm_from_hf(hf), vision=vision, projector=projector, vision_chunk_tiles=chunk
    )


def storage_dtype(hf: dict[str, Any], prefix: str = "") -> str | None:
    """The weights' dtype name the config records (``torch_dtype`` or ``dtype``), or None."""
    names = {key: hf[key] for key in ("torch_dtype", "dtype") if hf.get(key) is not None}
    if len(set(names.values())) > 1:
        raise ConfigError(
            f"{prefix}torch_dtype {names['torch_dtype']!r} != {prefix}dtype {names['dtype']!r}"
        )
    for key, value in names.items():
        if value not in DTYPE_NAMES:
            raise ConfigError(f"{prefix}{key} {value!r}: expected one of {list(DTYPE_NAMES)}")
    return next(iter(names.values()), None)


def _vision_section(hf: dict[str, Any]) -> VisionConfig | None:
    parsed = {}
    for key in VISION_KEYS:
        section = hf.get(key)
        if section is None or section == {}:
            continue
        if not isinstance(section, dict):
            raise ConfigError(f"{key}: expected an object of InternViT fields, got {section!r}")
        parsed[key] = vision_config_from_hf(section, key=key)
    if len(set(parsed.values())) > 1:
        raise ConfigError(
            f"'visual' and 'vision_config' describe different vision towers ({parsed['visual']} "
            f"vs {parsed['vision_config']}): keep one"
        )
    return next(iter(parsed.values()), None)


def _llm_from_hf(hf: dict[str, Any]) -> LLMConfig:
    rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type != "default":
        raise ConfigError(f"rope type {rope_type!r} (rope scaling) is not supported")
    rope_theta = hf.get("rope_theta", rope.get("rope_theta", 10000.0))
    if hf.get("use_sliding_window"):
        raise ConfigError("use_sliding_window: sliding-window attention is not supported")
    layer_types = set(hf.get("layer_types") or ()) - {"full_attention"}
    if layer_types:
        raise ConfigError(f"layer_types {sorted(layer_types)}: only full attention is built")
    if hf.get("hidden_act", "silu") != "silu":
        raise ConfigError(f"hidden_act {hf['hidden_act']!r}: the Qwen2 decoder uses 'silu'")
    num_heads = _required(hf, "num_attention_heads")
    head_dim = hf.get("head_dim")
    if head_dim is not None and head_dim * num_heads != _required(hf, "hidden_size"):
        raise ConfigError(f"head_dim {head_dim} * num_attention_heads {num_heads} != hidden_size")
    return LLMConfig(
        vocab_size=_required(hf, "vocab_size"),
        hidden_size=_required(hf, "hidden_size"),
        intermediate_size=_required(hf, "intermediate_size"),
        num_layers=_required(hf, "num_hidden_layers"),
        num_heads=num_heads,
        num_kv_heads=hf.get("num_key_value_heads", num_heads),
        rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        rope_theta=float(rope_theta),
        max_position_embeddings=int(hf.get("max_position_embeddings", 32768)),
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
    )


def vision_config_from_hf(hf: dict[str, Any], *, key: str = "") -> VisionConfig:
    """InternViT fields (``InternVisionConfig``: a ``visual`` / ``vision_config`` section or an
    InternViT checkpoint's own config.json), strictly (module docstring). `key` prefixes the
    field names in errors."""
    at = f"{key}." if key else ""
    model_type = hf.get("model_type", INTERNVIT_MODEL_TYPE)
    architectures = hf.get("architectures") or [INTERNVIT_ARCHITECTURE]
    if model_type != INTERNVIT_MODEL_TYPE or architectures != [INTERNVIT_ARCHITECTURE]:
        raise ConfigError(
            f"{at}model_type {model_type!r} / {at}architectures {architectures}: the vision "
            f"tower must be InternViT ({INTERNVIT_MODEL_TYPE!r}, [{INTERNVIT_ARCHITECTURE!r}])"
        )
    unknown = sorted(set(hf) - VISION_FIELDS - GENERIC_FIELDS)
    if unknown:
        raise ConfigError(
            f"unknown vision field(s) {', '.join(at + name for name in unknown)}: not an "
            "InternViT config field (a typo, or a vision tower lvita does not build)"
        )
    storage_dtype(hf, prefix=at)
    for name in ("qkv_bias", "qk_normalization", "norm_type"):
        # InternVisionConfig's defaults (no bias, QK norm, RMSNorm) are the 6B model's
        _required(hf, name, at)
    if hf["qk_normalization"]:
        raise ConfigError(f"{at}qk_normalization true (InternViT-6B) is not supported")
    if hf["norm_type"] != "layer_norm":
        raise ConfigError(f"{at}norm_type {hf['norm_type']!r}: only 'layer_norm' is built")
    if hf.get("num_channels", 3) != 3:
        raise ConfigError(f"{at}num_channels {hf['num_channels']}: tiles are RGB (3)")
    try:
        return VisionConfig(
            image_size=_required(hf, "image_size", at),
            patch_size=_required(hf, "patch_size", at),
            hidden_size=_required(hf, "hidden_size", at),
            intermediate_size=_required(hf, "intermediate_size", at),
            num_layers=_required(hf, "num_hidden_layers", at),
            num_heads=_required(hf, "num_attention_heads", at),
            layer_norm_eps=float(hf.get("layer_norm_eps", 1e-6)),
            qkv_bias=bool(hf["qkv_bias"]),
            hidden_act=hf.get("hidden_act", "gelu"),
        )
    except ConfigError as error:
        raise ConfigError(f"{key or 'vision'}: {error}") from None


def _required(hf: dict[str, Any], key: str, at: str = "") -> Any:
    if key not in hf:
        raise ConfigError(f"config field {at + key!r} is missing")
    return hf[key]


# --------------------------------------------------------------------------------------------
# Writing


def to_hf_config(config: LongVitaConfig, *, torch_dtype: str | None = None) -> dict[str, Any]:
    """The ``config.json`` of a checkpoint (module docstring); `from_hf_config` reads it back.
    `torch_dtype`: the stored weights' dtype name (omitted when None)."""
    if torch_dtype is not None and torch_dtype not in DTYPE_NAMES:
        raise ConfigError(f"torch_dtype {torch_dtype!r}: expected one of {list(DTYPE_NAMES)}")
    llm = config.llm
    hf: dict[str, Any] = {
        "architectures": [LONG_VITA_ARCHITECTURE if config.vision else "Qwen2ForCausalLM"],
        "model_type": LONG_VITA_MODEL_TYPE if config.vision else QWEN2_MODEL_TYPE,
        "vocab_size": llm.vocab_size,
        "hidden_size": llm.hidden_size,
        "intermediate_size": llm.intermediate_size,
        "num_hidden_layers": llm.num_layers,
        "num_attention_heads": llm.num_heads,
        "num_key_value_heads": llm.num_kv_heads,
        "hidden_act": "silu",
        "rms_norm_eps": llm.rms_norm_eps,
        "rope_theta": llm.rope_theta,
        "rope_scaling": None,
        "max_position_embeddings": llm.max_position_embeddings,
        "sliding_window": llm.max_position_embeddings,
        "use_sliding_window": False,
        "max_window_layers": llm.num_layers,
        "attention_dropout": 0.0,
        "initializer_range": 0.02,
        "use_cache": True,
        "tie_word_embeddings": llm.tie_word_embeddings,
    }
    if llm.vocab_size > QWEN25_EOS_ID:
        hf |= {"bos_token_id": QWEN25_BOS_ID, "eos_token_id": QWEN25_EOS_ID}
    if torch_dtype is not None:
        hf["torch_dtype"] = torch_dtype
    if config.vision is not None:
        hf["visual"] = _vision_to_hf(config.vision, torch_dtype)
    if config.vision_chunk_tiles != DEFAULT_CHUNK_TILES:  # lvita's own knob, kept when set
        hf["vision_chunk_tiles"] = config.vision_chunk_tiles
    return hf


def _vision_to_hf(vision: VisionConfig, torch_dtype: str | None) -> dict[str, Any]:
    section: dict[str, Any] = {
        "architectures": [INTERNVIT_ARCHITECTURE],
        "model_type": INTERNVIT_MODEL_TYPE,
        "hidden_size": vision.hidden_size,
        "intermediate_size": vision.intermediate_size,
        "num_hidden_layers": vision.num_layers,
        "num_attention_heads": vision.num_heads,
        "image_size": vision.image_size,
        "patch_size": vision.patch_size,
        "num_channels": 3,
        "hidden_act": vision.hidden_act,
        "norm_type": "layer_norm",
        "layer_norm_eps": vision.layer_norm_eps,
        "qkv_bias": vision.qkv_bias,
        "qk_normalization": False,
        "drop_path_rate": 0.0,
        "dropout": 0.0,
        "attention_dropout": 0.0,
        "initializer_factor": 1.0,
        "initializer_range": 0.02,
        "use_flash_attn": True,
    }
    if torch_dtype is not None:
        section["torch_dtype"] = torch_dtype
    return section
