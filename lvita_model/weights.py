"""Hugging Face safetensors checkpoints: load and save without remote code or pickle.

Layouts read (names in `lvita_model.model`; configs in `lvita_model.config.hf`):

- Long-VITA, as the original publishes it (``VITA-MLLM/Long-VITA-*_HF``: ``config.json`` with
  ``model_type: long_vita`` and the tower under ``visual``; bf16 shards) or as lvita wrote it
  before (``vision_config``): weights named ``model.embed_tokens``, ``model.layers.*``,
  ``model.norm``, ``lm_head``, ``model.vision_model.*`` (InternViT),
  ``model.vision_projection.*``. Weights with a tower under a config without one are refused
  (`check_vision_declared`), as is a projector that does not fit between the tower and the
  language model (`check_projector_fits`);
- plain Qwen2 / Qwen2.5 (``model_type: qwen2``): the language model alone, same names;
- InternViT-300M-448px: the vision tower alone (`load_vision_weights`); stage 1 composes it
  with a Qwen2.5 directory and a fresh projector (`compose_pretrained`).

Single files (``model.safetensors``) and sharded ones (``model.safetensors.index.json`` +
``model-0000i-of-0000n.safetensors``) are both read. The model is first built on the meta device
and every tensor is assigned as it is read (``load_state_dict(assign=True)`` shard by shard), so
host memory peaks at the model plus one tensor, not twice the model: a 14B checkpoint needs
~28 GiB in bf16, not 56. Every key is checked: names the model does not have, parameters the
checkpoint lacks and shape (or integer-for-float) mismatches are one `WeightsError` listing
them. Rotary ``inv_freq`` buffers some older checkpoints carry are ignored (RoPE is recomputed
from the config), as is an ``lm_head.weight`` duplicate in a checkpoint with tied embeddings.

Saving writes the original's layout (config.json in its schema with ``torch_dtype``, sharded
above `max_shard_bytes`, plus `extra_files` such as the tokenizer's), each file to a temporary
name then renamed, the index and config.json last, so a reader never sees a half-written
checkpoint as complete.

**Integrity.** Every file is checked before any tensor is assigned, so a damaged checkpoint is
refused whole, never half-loaded: every shard the index names exists, its header parses and its
data covers the file (safetensors' own checks: a truncated shard fails here), every tensor the
index maps to a shard is in it, and names, shapes and floating-point-ness match the model (read
from the headers, no data read). A flipped byte inside tensor data passes all of that, so
`save_pretrained` records the sha256 of each shard's tensor data (the bytes after the header) in
the shard's own header metadata (``"lvita_data_sha256"``; Hugging Face allows free string
metadata there, and a tool that rewrites the shard drops it, so it never goes stale) and
loading verifies it when present. Checkpoints without it (Hugging Face hub ones) load as before.
Checking streams each shard once more (1 MiB blocks, ~1 GiB/s per core; the load's reads then
come from the page cache): on the 0.7 MB test model, +0.6 ms per save, +3 ms per load.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import struct
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from lvita_model.attention import AttentionBackend
from lvita_model.config import LongVitaConfig, load_config, to_hf_config
from lvita_model.config.hf import compose_config
from lvita_model.errors import ConfigError, WeightsError
from lvita_model.model import LongVitaForCausalLM, init_weights

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
CONFIG_FILE = "config.json"
DATA_SHA256_KEY = "lvita_data_sha256"
"""Header metadata key of a shard: sha256 (hex) of its tensor data, the bytes after the header."""
_PLACEHOLDER = "0" * 64  # same length as the digest, so sealing rewrites the header in place
_BLOCK = 1 << 20
_IGNORED_KEYS = re.compile(r".*rotary_emb\.inv_freq$")
_MAX_LISTED = 20
VISION_PREFIXES = ("model.vision_model.", "model.vision_projection.")
"""Names of the vision tower and the projector in a Long-VITA checkpoint."""
_DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


def read_weight_map(directory: str | Path) -> dict[str, str] | None:
    """The index's tensor name -> shard file name, or None for a single-file checkpoint."""
    index = Path(directory) / INDEX_FILE
    if not index.is_file():
        return None
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
    except (ValueError, KeyError, TypeError) as error:
        raise WeightsError(f"{index}: not a safetensors index ({error!r})") from None
    if not isinstance(weight_map, dict):
        raise WeightsError(f"{index}: weight_map is not an object")
    return weight_map


def checkpoint_files(directory: str | Path) -> list[Path]:
    """The safetensors files of a checkpoint directory, in index order."""
    directory = Path(directory)
    weight_map = read_weight_map(directory)
    if weight_map is not None:
        files = list(dict.fromkeys(weight_map.values()))
        missing = [name for name in files if not (directory / name).is_file()]
        if missing:
            raise WeightsError(
                f"{directory / INDEX_FILE} names shards that do not exist: {missing}; "
                "nothing was loaded"
            )
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
    """Build the model from ``path/config.json`` on the meta device and assign its weights.

    Raises:
        ConfigError: the config is unreadable or describes what we do not build; or it has no
            vision section while the weights hold a vision tower (`check_vision_declared`).
        WeightsError: the weights do not match the config (`check_projector_fits`, `load_state`)
            or are damaged.
    """
    config = load_config(path)
    files = checkpoint_files(path)
    shapes = _header_shapes(files)
    check_vision_declared(config, shapes, Path(path))
    if config.vision is not None:
        check_projector_fits(config, shapes)
    with torch.device("meta"):
        model = LongVitaForCausalLM(config, attention_backend=attention_backend)
    skip_lm_head = config.llm.tie_word_embeddings
    load_state(
        model,
        files,
        device=device,
        dtype=dtype,
        rename=lambda key: None if skip_lm_head and key == "lm_head.weight" else key,
        weight_map=read_weight_map(path),
    )
    return model


def compose_pretrained(
    llm_path: str | Path,
    vision_path: str | Path,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
    seed: int = 0,
    attention_backend: str | AttentionBackend = "auto",
) -> LongVitaForCausalLM:
    """Stage 1's starting model from two public checkpoints in their own layouts: a Qwen2 /
    Qwen2.5 directory (the language model) and an InternViT one (the vision tower, e.g.
    ``OpenGVLab/InternViT-300M-448px``), single-file or sharded; the projector is fresh:
    `lvita_model.model.init_weights` from `seed` (normal(0, 0.02) linears, LayerNorm ones /
    zeros: the original's HF init), deterministic on any device. The configuration is
    `lvita_model.config.hf.compose_config` (its size checks included); each directory's weights
    must match its own config exactly (`load_state`). The projector takes `dtype`, else the
    language model's embedding dtype."""
    config = compose_config(llm_path, vision_path)
    with torch.device("meta"):
        model = LongVitaForCausalLM(config, attention_backend=attention_backend)
    skip_lm_head = config.llm.tie_word_embeddings
    load_state(
        model,
        checkpoint_files(llm_path),
        device=device,
        dtype=dtype,
        rename=lambda key: None if skip_lm_head and key == "lm_head.weight" else key,
        weight_map=read_weight_map(llm_path),
        expect=lambda name: not name.startswith(VISION_PREFIXES),
    )
    load_vision_weights(model.model.vision_model, vision_path, device=device, dtype=dtype)
    projector = model.model.vision_projection
    projector.to_empty(device=device).to(dtype or model.model.embed_tokens.weight.dtype)
    init_weights(projector, seed=seed)
    return model


def check_vision_declared(
    config: LongVitaConfig, shapes: Mapping[str, tuple[Path, tuple[int, ...]]], path: Path
) -> None:
    """`ConfigError` when the weights hold a vision tower or projector but the config has no
    vision section: that checkpoint would otherwise load as a text-only model, or fail on
    "unexpected" tensors without saying why."""
    if config.vision is not None:
        return
    vision = sorted(key for key in shapes if key.startswith(VISION_PREFIXES))
    if vision:
        file = shapes[vision[0]][0]
        raise ConfigError(
            f"{path / CONFIG_FILE}: no vision section ('visual', or lvita's older "
            f"'vision_config'), but the weights hold {len(vision)} vision tower / projector "
            f"tensors (e.g. {vision[0]} in {file.name}): add the InternViT config under "
            "'visual', or load a language-model-only checkpoint"
        )


def check_projector_fits(
    config: LongVitaConfig, shapes: Mapping[str, tuple[Path, tuple[int, ...]]]
) -> None:
    """`WeightsError` when the checkpoint's projector does not fit between its vision tower and
    its language model: the input must be the ViT width x 4 (the 2 x 2 pixel shuffle), the
    hidden width the ViT width, the output the LLM width."""
    assert config.vision is not None
    vit, llm = config.vision.hidden_size, config.llm.hidden_size
    stride2 = config.projector.shuffle_stride**2
    expected = {
        "model.vision_projection.pre_proj_layernorm.weight": (
            (vit * stride2,),
            f"the ViT width {vit} x {stride2} after the pixel shuffle",
        ),
        "model.vision_projection.mlp.0.weight": (
            (vit, vit * stride2),
            f"[ViT width {vit}, ViT width x {stride2} = {vit * stride2}]",
        ),
        "model.vision_projection.mlp.2.weight": (
            (llm, vit),
            f"[LLM width {llm}, ViT width {vit}]",
        ),
    }
    problems = [
        f"{name} is {list(shapes[name][1])} in {shapes[name][0].name}, expected {why}"
        for name, (shape, why) in expected.items()
        if name in shapes and tuple(shapes[name][1]) != shape
    ]
    if problems:
        raise WeightsError(
            "the projector does not fit the vision tower and the language model of the config "
            "(a projector trained for other models?):" + "".join(f"\n  {p}" for p in problems)
        )


def _header_shapes(files: Iterable[Path]) -> dict[str, tuple[Path, tuple[int, ...]]]:
    """Tensor name -> (file, shape), from the safetensors headers only."""
    shapes = {}
    for file in files:
        try:
            with safe_open(str(file), framework="pt") as reader:
                for key in reader.keys():  # noqa: SIM118 (safe_open is not a dict)
                    shapes[key] = (file, tuple(reader.get_slice(key).get_shape()))
        except (SafetensorError, OSError, ValueError):
            continue  # reported with every other problem of the file by `load_state`
    return shapes


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

    load_state(
        vision_model,
        checkpoint_files(path),
        device=device,
        dtype=dtype,
        rename=rename,
        weight_map=read_weight_map(path),
    )


def load_state(
    module: nn.Module,
    files: Iterable[Path],
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
    rename: Callable[[str], str | None] = lambda key: key,
    weight_map: Mapping[str, str] | None = None,
    expect: Callable[[str], bool] | None = None,
) -> None:
    """Assign every tensor of `files` to `module` once all of them passed the checks of the
    module docstring (strict: see `WeightsError`).

    `rename` maps a checkpoint key to a module key, or None to skip it. Floating-point tensors
    are cast to `dtype` when given. `weight_map` (the index's) adds the check that every tensor
    it maps to a file is in that file. `expect` limits the module names these files must fill
    (default: all; the others stay as they are, e.g. on the meta device)."""
    files = list(files)
    damaged = [problem for file in files for problem in _check_file(file, weight_map)]
    if damaged:
        raise WeightsError(
            "checkpoint is damaged, nothing was loaded:" + "".join(f"\n  {p}" for p in damaged)
        )
    plan = _match_model(module, files, rename, expect)
    for file, names in plan.items():
        batch = {}
        try:
            with safe_open(str(file), framework="pt", device=str(device)) as reader:
                for key, name in names.items():  # cast as read: one tensor in two dtypes at most
                    tensor = reader.get_tensor(key)
                    if dtype is not None and tensor.is_floating_point():
                        tensor = tensor.to(dtype)
                    batch[name] = tensor
        except (SafetensorError, OSError) as error:
            raise WeightsError(f"{file}: unreadable while loading ({error})") from error
        module.load_state_dict(batch, strict=False, assign=True)


def _check_file(file: Path, weight_map: Mapping[str, str] | None) -> list[str]:
    """What is wrong with one safetensors file on its own: unreadable or truncated, tensors the
    index maps to it that it lacks, tensor data that does not match its recorded sha256."""
    try:
        with safe_open(str(file), framework="pt") as reader:
            keys = set(reader.keys())
            metadata = reader.metadata() or {}
    except (SafetensorError, OSError, ValueError) as error:
        return [f"{file}: not a readable safetensors file, truncated or overwritten ({error})"]
    problems = []
    if weight_map is not None:
        absent = sorted(k for k, name in weight_map.items() if name == file.name and k not in keys)
        if absent:
            problems.append(
                f"{file}: lacks tensors the index maps to it ({len(absent)}): {_names(absent)}"
            )
    recorded = metadata.get(DATA_SHA256_KEY)
    if recorded is not None:
        actual = _data_sha256(file)
        if actual != recorded:
            problems.append(
                f"{file}: tensor data sha256 {actual[:16]}..., its header records "
                f"{recorded[:16]}... (altered or damaged after it was written)"
            )
    return problems


def _match_model(
    module: nn.Module,
    files: list[Path],
    rename: Callable[[str], str | None],
    expect: Callable[[str], bool] | None = None,
) -> dict[Path, dict[str, str]]:
    """Checkpoint key -> module name per file, from the headers alone (no tensor data read).

    Raises:
        WeightsError: listing missing, unexpected and mis-shaped (or integer-for-float) tensors.
    """
    expected = module.state_dict()  # meta tensors are enough: shapes and dtypes
    if expect is not None:
        expected = {name: tensor for name, tensor in expected.items() if expect(name)}
    plan: dict[Path, dict[str, str]] = {}
    seen: set[str] = set()
    unexpected: list[str] = []
    mismatched: list[str] = []
    for file in files:
        plan[file] = {}
        with safe_open(str(file), framework="pt") as reader:
            for key in reader.keys():  # noqa: SIM118 (safe_open is not a dict)
                name = rename(key)
                if name is None or _IGNORED_KEYS.match(key):
                    continue
                if name not in expected:
                    unexpected.append(key)
                    continue
                seen.add(name)  # present: a mismatch is reported as such, not as missing
                found = reader.get_slice(key)
                shape, kind = tuple(found.get_shape()), found.get_dtype()
                want = expected[name]
                if shape != tuple(want.shape):
                    mismatched.append(f"{key}: checkpoint {shape}, model {tuple(want.shape)}")
                elif kind.startswith(("F", "BF")) != want.is_floating_point():
                    mismatched.append(f"{key}: checkpoint dtype {kind}, model {want.dtype}")
                else:
                    plan[file][key] = name
    missing = sorted(set(expected) - seen)
    if missing or unexpected or mismatched:
        raise WeightsError(
            "checkpoint does not match the model, nothing was loaded:"
            + "".join(
                _listing(title, names)
                for title, names in (
                    ("missing", missing),
                    ("unexpected", unexpected),
                    ("shape/dtype mismatch", mismatched),
                )
            )
        )
    return plan


def _data_sha256(file: Path) -> str:
    """sha256 of a safetensors file's tensor data (everything after the 8 + N header bytes)."""
    digest = hashlib.sha256()
    with open(file, "rb") as handle:
        (header_len,) = struct.unpack("<Q", handle.read(8))
        handle.seek(8 + header_len)
        while block := handle.read(_BLOCK):
            digest.update(block)
    return digest.hexdigest()


def _listing(title: str, names: list[str]) -> str:
    return f"\n  {title} ({len(names)}): {_names(names)}" if names else ""


def _names(names: list[str]) -> str:
    more = f" ... and {len(names) - _MAX_LISTED} more" if len(names) > _MAX_LISTED else ""
    return ", ".join(names[:_MAX_LISTED]) + more


def save_pretrained(
    model: LongVitaForCausalLM,
    directory: str | Path,
    *,
    max_shard_bytes: int = 5 * 2**30,
    dtype: torch.dtype | None = None,
    extra_files: Mapping[str, str] | None = None,
) -> None:
    """Write ``config.json`` (the original's schema, `lvita_model.config.hf`) and the weights
    in the Hugging Face layout (see module docstring). `extra_files` (name -> text) are written
    beside them, e.g. the tokenizer's (`pipelines.hf_tokenizer.tokenizer_files`: lvita_model
    does not depend on the tokenizer stack)."""
    save_state_dict(
        model.state_dict(),
        model.config,
        directory,
        max_shard_bytes=max_shard_bytes,
        dtype=dtype,
        extra_files=extra_files,
    )


def save_state_dict(
    state: Mapping[str, torch.Tensor],
    config: LongVitaConfig,
    directory: str | Path,
    *,
    max_shard_bytes: int = 5 * 2**30,
    dtype: torch.dtype | None = None,
    extra_files: Mapping[str, str] | None = None,
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
    for name, text in (extra_files or {}).items():
        _write_text_atomic(text, directory / name)
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
    hf = to_hf_config(config, torch_dtype=_storage_dtype_name(tensors.values()))
    _write_json_atomic(hf, directory / CONFIG_FILE)


def _storage_dtype_name(tensors: Iterable[torch.Tensor]) -> str | None:
    """``torch_dtype`` of the saved weights: the dtype of most floating-point elements."""
    counts: dict[torch.dtype, int] = {}
    for tensor in tensors:
        if tensor.is_floating_point():
            counts[tensor.dtype] = counts.get(tensor.dtype, 0) + tensor.numel()
    return _DTYPE_NAMES.get(max(counts, key=counts.__getitem__)) if counts else None


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
    save_file(tensors, str(tmp), metadata={"format": "pt", DATA_SHA256_KEY: _PLACEHOLDER})
    _seal(tmp)
    os.replace(tmp, path)


def _seal(path: Path) -> None:
    """Write the data's sha256 over the placeholder in the header: same length, so the header
    size and every data offset stay as safetensors wrote them."""
    digest = _data_sha256(path).encode()
    with open(path, "r+b") as handle:
        (header_len,) = struct.unpack("<Q", handle.read(8))
        header = handle.read(header_len)
        quoted = f'"{_PLACEHOLDER}"'.encode()
        assert header.count(quoted) == 1, f"{path}: placeholder not found once in the header"
        handle.seek(8 + header.index(quoted) + 1)
        handle.write(digest)


def _write_json_atomic(data: dict, path: Path) -> None:
    _write_text_atomic(json.dumps(data, indent=2) + "\n", path)


def _write_text_atomic(text: str, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
