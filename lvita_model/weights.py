"""Hugging Face safetensors checkpoints: load and save without remote code or pickle.

Layouts read (names in `lvita_model.model`):

- Long-VITA: ``config.json`` (Qwen2 fields + ``vision_config``) and weights named
  ``model.embed_tokens``, ``model.layers.*``, ``model.norm``, ``lm_head``,
  ``model.vision_model.*`` (InternViT), ``model.vision_projection.*``;
- plain Qwen2 / Qwen2.5 (``model_type: qwen2``): the language model alone, same names;
- InternViT-300M-448px: the vision tower alone (`load_vision_weights`).

Single files (``model.safetensors``) and sharded ones (``model.safetensors.index.json`` +
``model-0000i-of-0000n.safetensors``) are both read. The model is first built on the meta device
and every tensor is assigned as it is read (``load_state_dict(assign=True)`` shard by shard), so
host memory peaks at the model plus one tensor, not twice the model: a 14B checkpoint needs
~28 GiB in bf16, not 56. Every key is checked: names the model does not have, parameters the
checkpoint lacks and shape mismatches are one `WeightsError` listing them. Rotary ``inv_freq``
buffers some older checkpoints carry are ignored (RoPE is recomputed from the config), as is an
``lm_head.weight`` duplicate in a checkpoint with tied embeddings.

Saving writes the same layout (sharded above `max_shard_bytes`), each file to a temporary name
then renamed, the index last, so a reader never sees a half-written checkpoint as complete.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from lvita_model.attention import AttentionBackend
from lvita_model.config import LongVitaConfig, load_config, to_hf_config
from lvita_model.errors import WeightsError
from lvita_model.model import LongVitaForCausalLM

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
CONFIG_FILE = "config.json"
_IGNORED_KEYS = re.compile(r".*rotary_emb\.inv_freq$")
_MAX_LISTED = 20


def checkpoint_files(directory: str | Path) -> list[Path]:
    """The safetensors files of a checkpoint directory, in index order."""
    directory = Path(directory)
    index = directory / INDEX_FILE
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        files = list(dict.fromkeys(weight_map.values()))
        missing = [name for name in files if not (directory / name).is_file()]
        if missing:
            raise WeightsError(f"{index} names shards that do not exist: {missing}")
        return [directory / name for name in files]
    if (directory / SINGLE_FILE).is_file():
        return [directory / SINGLE_FILE]
    raise WeightsError(f"{directory}: no {SINGLE_FILE} or {INDEX_FILE}")


def load_pretrained(
    path: str | Path,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
    attention_backend: str | AttentionBackend = "auto",
) -> LongVitaForCausalLM:
    """Build the model from ``path/config.json`` on the meta device and assign its weights."""
    config = load_config(path)
    with torch.device("meta"):
        model = LongVitaForCausalLM(config, attention_backend=attention_backend)
    skip_lm_head = config.llm.tie_word_embeddings
    load_state(
        model,
        checkpoint_files(path),
        device=device,
        dtype=dtype,
        rename=lambda key: None if skip_lm_head and key == "lm_head.weight" else key,
    )
    return model


def load_vision_weights(
    vision_model: nn.Module,
    path: str | Path,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
) -> None:
    """An InternViT checkpoint (names without prefix, or under ``vision_model.`` /
    ``model.vision_model.``) into `vision_model` (our `InternVisionModel`, possibly on meta)."""

    def rename(key: str) -> str | None:
        for prefix in ("model.vision_model.", "vision_model."):
            if key.startswith(prefix):
                return key[len(prefix) :]
        return key

    load_state(vision_model, checkpoint_files(path), device=device, dtype=dtype, rename=rename)


def load_state(
    module: nn.Module,
    files: Iterable[Path],
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
    rename: Callable[[str], str | None] = lambda key: key,
) -> None:
    """Assign every tensor of `files` to `module` (strict: see `WeightsError`).

    `rename` maps a checkpoint key to a module key, or None to skip it. Floating-point tensors
    are cast to `dtype` when given."""
    expected = {name: tuple(t.shape) for name, t in module.state_dict().items()}
    loaded: set[str] = set()
    unexpected: list[str] = []
    mismatched: list[str] = []
    for file in files:
        batch = {}
        with safe_open(str(file), framework="pt", device=str(device)) as reader:
            for key in reader.keys():  # noqa: SIM118 (safe_open is not a dict)
                name = rename(key)
                if name is None or _IGNORED_KEYS.match(key):
                    continue
                if name not in expected:
                    unexpected.append(key)
                    continue
                tensor = reader.get_tensor(key)
                if tuple(tensor.shape) != expected[name]:
                    mismatched.append(
                        f"{key}: checkpoint {tuple(tensor.shape)}, model {expected[name]}"
                    )
                    loaded.add(name)  # present: reported as a mismatch, not as missing
                    continue
                if dtype is not None and tensor.is_floating_point():
                    tensor = tensor.to(dtype)
                batch[name] = tensor
        if not (unexpected or mismatched):
            module.load_state_dict(batch, strict=False, assign=True)
        loaded.update(batch)
    missing = sorted(set(expected) - loaded)
    if missing or unexpected or mismatched:
        raise WeightsError(
            "checkpoint does not match the model:"
            + "".join(
                _listing(title, names)
                for title, names in (
                    ("missing", missing),
                    ("unexpected", unexpected),
                    ("shape mismatch", mismatched),
                )
            )
        )


def _listing(title: str, names: list[str]) -> str:
    if not names:
        return ""
    shown = ", ".join(names[:_MAX_LISTED])
    more = f" ... and {len(names) - _MAX_LISTED} more" if len(names) > _MAX_LISTED else ""
    return f"\n  {title} ({len(names)}): {shown}{more}"


def save_pretrained(
    model: LongVitaForCausalLM,
    directory: str | Path,
    *,
    max_shard_bytes: int = 5 * 2**30,
    dtype: torch.dtype | None = None,
) -> None:
    """Write ``config.json`` and the weights in the Hugging Face layout (see module docstring)."""
    save_state_dict(
        model.state_dict(), model.config, directory, max_shard_bytes=max_shard_bytes, dtype=dtype
    )


def save_state_dict(
    state: Mapping[str, torch.Tensor],
    config: LongVitaConfig,
    directory: str | Path,
    *,
    max_shard_bytes: int = 5 * 2**30,
    dtype: torch.dtype | None = None,
) -> None:
    """`save_pretrained` for a state dict held apart from a model (e.g. one gathered from
    FSDP-sharded ranks): its names must be the model's (``model.*``, ``lm_head.*``)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for name, tensor in state.items():
        tensor = tensor.detach()
        if dtype is not None and tensor.is_floating_point():
            tensor = tensor.to(dtype)
        tensors[name] = tensor.contiguous().cpu()
    shards = _split_shards(tensors, max_shard_bytes)
    if len(shards) == 1:
        _save_atomic(shards[0], directory / SINGLE_FILE)
        (directory / INDEX_FILE).unlink(missing_ok=True)
    else:
        weight_map = {}
        for number, shard in enumerate(shards, start=1):
            name = f"model-{number:05d}-of-{len(shards):05d}.safetensors"
            _save_atomic(shard, directory / name)
            weight_map.update(dict.fromkeys(shard, name))
        total = sum(t.numel() * t.element_size() for t in tensors.values())
        _write_json_atomic(
            {"metadata": {"total_size": total}, "weight_map": weight_map}, directory / INDEX_FILE
        )
        (directory / SINGLE_FILE).unlink(missing_ok=True)
    _write_json_atomic(to_hf_config(config), directory / CONFIG_FILE)


def _split_shards(state: dict[str, torch.Tensor], max_bytes: int) -> list[dict]:
    shards: list[dict] = [{}]
    size = 0
    for name, tensor in state.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > max_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = tensor
        size += nbytes
    return shards


def _save_atomic(tensors: dict[str, torch.Tensor], path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata={"format": "pt"})
    os.replace(tmp, path)


def _write_json_atomic(data: dict, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, path)
