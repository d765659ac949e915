"""Training configuration: strict YAML -> frozen dataclasses (`lvita train CONFIG`).

A config names the data (a stage manifest whose shards were built, or a shard directory), the
model (a preset name or a Hugging Face checkpoint directory), the stage recipe (Long-VITA's four
stages, reference section 4; any field can be overridden) and the parallel layout. Parsing is
the manifests' (`lvita_data.strict_yaml.build_dataclass`): unknown keys, missing keys and wrong
types are errors naming the field; `${ENV:-default}` is expanded; relative paths resolve against
the config file's directory. Example (configs/train/demo.yaml):

    schema_version: 1
    stage: 2
    data: {shards: ../../demo_data/shards/stage2}
    model: {name: tiny}
    recipe: {iterations: 30, global_batch: 4, lr: 1.0e-3}
    parallel: {cp: 2}
    output: {dir: ../../demo_data/runs/stage2, save_every: 10}

Command-line overrides (`lvita train CONFIG --set recipe.lr=2e-5 --set parallel.cp=4`) are
merged into the YAML mapping before it is parsed, so they are exactly as strict as the file: the
dotted key must name a field, the value (read as YAML: ``4``, ``true``, ``[0.9, 0.95]``, ``null``;
a number in any spelling, ``2e-5`` included, is a number) must have the field's type. A relative
path given on the command line is relative to the current directory, not to the config's.
"""

from __future__ import annotations

import copy
import dataclasses
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import yaml

from lvita_data.errors import ManifestError
from lvita_data.strict_yaml import build_dataclass, resolve_path
from pipelines.errors import TrainConfigError

SCHEMA_VERSION = 1


@dataclass(frozen=True, kw_only=True, slots=True)
class DataConfig:
    shards: str | None = None
    """A build directory of `lvita build` (index.json inside)."""
    manifest: str | None = None
    """A stage manifest; its shards are read from `shards` (required with it) after a check
    that they were built from this manifest."""
    packs_per_micro_batch: int = 1
    """Packs per forward (each pack is one packed sequence of the stage's length)."""
    shuffle: bool = True
    num_workers: int = 0

    def __post_init__(self) -> None:
        if self.shards is None:
            raise TrainConfigError("data.shards: the shard directory is required")
        if self.packs_per_micro_batch < 1 or self.num_workers < 0:
            raise TrainConfigError("data.packs_per_micro_batch must be >= 1, num_workers >= 0")


@dataclass(frozen=True, kw_only=True, slots=True)
class ModelConfig:
    """The starting model: `name` (a preset or one Long-VITA checkpoint directory), or `llm` +
    `vision` (stage 1: two public checkpoints, composed with a fresh projector from the recipe's
    seed by `lvita_model.weights.compose_pretrained`)."""

    name: str | None = None
    """A preset of `lvita_model.config.PRESETS` (random init from the recipe's seed) or a
    checkpoint directory (a released Long-VITA one, or what lvita saved)."""
    llm: str | None = None
    """A Qwen2 / Qwen2.5 checkpoint directory in its own HF layout (e.g. a download of
    ``Qwen/Qwen2.5-14B-Instruct``): the language model. Needs `vision`."""
    vision: str | None = None
    """An InternViT checkpoint directory in its own HF layout (e.g. a download of
    ``OpenGVLab/InternViT-300M-448px``): the vision tower. Needs `llm`."""
    tokenizer: str | None = None
    """The tokenizer the HF export writes beside the weights (a directory with a tokenizer.json
    or ``qwen2.5``, the bundled one); default: the starting checkpoint's (`name` or `llm`) when
    it has a tokenizer.json, else ``qwen2.5``."""
    attention_backend: str = "auto"
    activation_checkpointing: bool = True
    compile: bool = False
    """torch.compile each decoder layer."""

    def __post_init__(self) -> None:
        if (self.name is None) == (self.llm is None and self.vision is None):
            raise TrainConfigError(
                "model: give either name (a preset or a Long-VITA checkpoint directory) or "
                "llm + vision (stage 1: a Qwen2.5 and an InternViT checkpoint directory)"
            )
        if (self.llm is None) != (self.vision is None):
            missing = "vision" if self.vision is None else "llm"
            raise TrainConfigError(
                f"model.{missing} is missing: stage 1 starts from model.llm (a Qwen2.5 "
                "checkpoint directory) and model.vision (an InternViT one) together"
            )

    @property
    def tokenizer_spec(self) -> str:
        """`tokenizer`, else the starting checkpoint's directory when it has a tokenizer.json,
        else the bundled ``qwen2.5``."""
        if self.tokenizer is not None:
            return self.tokenizer
        start = self.name if self.llm is None else self.llm
        if start is not None and (Path(start) / "tokenizer.json").is_file():
            return start
        return "qwen2.5"


@dataclass(frozen=True, kw_only=True, slots=True)
class RecipeOverrides:
    """Fields left None take the stage recipe's value (`pipelines.train.recipes`)."""

    lr: float | None = None
    min_lr: float | None = None
    warmup_ratio: float | None = None
    iterations: int | None = None
    global_batch: int | None = None
    """Packs per optimizer step over all data-parallel ranks."""
    betas: list[float] | None = None
    weight_decay: float | None = None
    clip_grad_norm: float | None = None
    vit_lr_scale: float | None = None
    vit_layer_decay: float | None = None
    trainable: list[Literal["vision", "projector", "llm"]] | None = None


@dataclass(frozen=True, kw_only=True, slots=True)
class ParallelConfig:
    cp: int = 1
    """Context-parallel degree; data parallel = world size / cp."""
    cp_method: Literal["ring", "allgather", "ulysses"] = "ring"
    dtype: Literal["auto", "float32", "bfloat16"] = "auto"
    """auto: bfloat16 on accelerators, float32 on CPU."""

    def __post_init__(self) -> None:
        if self.cp < 1:
            raise TrainConfigError(f"parallel.cp must be >= 1, got {self.cp}")


@dataclass(frozen=True, kw_only=True, slots=True)
class OutputConfig:
    dir: str
    save_every: int = 100
    """Optimizer steps between checkpoints (and at the end)."""
    keep_last: int = 2
    log_every: int = 1
    export_hf: bool = True
    """Write the final model in the Long-VITA Hugging Face layout to dir/hf."""


@dataclass(frozen=True, kw_only=True, slots=True)
class TrainConfig:
    schema_version: int
    stage: Literal[1, 2, 3, 4]
    data: DataConfig
    model: ModelConfig
    output: OutputConfig
    recipe: RecipeOverrides = field(default_factory=RecipeOverrides)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    seed: int | None = None
    """Default: the stage's seed (42 / 4242 / 424242 / 42424242)."""
    source_path: str = ""

    def __post_init__(self) -> None:
        if self.schema_version != SCHEMA_VERSION:
            raise TrainConfigError(f"schema_version must be {SCHEMA_VERSION}")


def _resolve(path: str | None, base: Path) -> str | None:
    return None if path is None else resolve_path(path, base)


PATH_KEYS = frozenset(
    {"data.shards", "data.manifest", "model.name", "model.llm", "model.vision", "model.tokenizer"}
    | {"output.dir"}
)
"""Fields holding paths: relative ones resolve against the config file's directory, or the
current directory when given with ``--set``."""
_NUMBER = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?")


def parse_override(text: str) -> tuple[list[str], object]:
    """``"recipe.lr=2e-5"`` -> (["recipe", "lr"], 2e-05); `TrainConfigError` when malformed."""
    key, equals, raw = text.partition("=")
    parts = key.strip().split(".")
    if not equals or not all(part.isidentifier() for part in parts):
        raise TrainConfigError(f"--set {text!r}: expected KEY.SUB=VALUE, e.g. recipe.lr=2e-5")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as error:
        raise TrainConfigError(f"--set {text!r}: the value is not YAML ({error})") from None
    if isinstance(value, str) and _NUMBER.fullmatch(value.strip()):
        value = float(value)  # YAML 1.1 reads 2e-5 as a string
    key = ".".join(parts)
    if key in PATH_KEYS and isinstance(value, str) and value:
        names_or_paths = key in ("model.name", "model.tokenizer")  # "tiny", "qwen2.5" stay
        if not names_or_paths or os.sep in value or value.startswith("."):
            value = os.path.abspath(value)
    return parts, value


def apply_overrides(data: object, overrides: Sequence[str]) -> object:
    """The YAML mapping with each ``KEY.SUB=VALUE`` set (a missing section is created, so an
    unknown key reaches the strict parser and is named there)."""
    if not overrides:
        return data
    if not isinstance(data, dict):
        raise TrainConfigError("the config must be a mapping to take --set overrides")
    merged = copy.deepcopy(data)
    for text in overrides:
        parts, value = parse_override(text)
        node = merged
        for i, part in enumerate(parts[:-1]):
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                where = ".".join(parts[: i + 1])
                raise TrainConfigError(f"--set {text!r}: {where} is not a section")
            node = child
        node[parts[-1]] = value
    return merged


def load_train_config(path: str | os.PathLike[str], overrides: Sequence[str] = ()) -> TrainConfig:
    """Parse a training config strictly, with command-line `overrides` (see the module
    docstring); errors name the file and the field."""
    path = Path(path)
    try:
        data = apply_overrides(yaml.safe_load(path.read_text(encoding="utf-8")), overrides)
        config = build_dataclass(TrainConfig, data, errors=(TrainConfigError,))
    except OSError as error:
        raise TrainConfigError(f"{path}: cannot read: {error}") from None
    except yaml.YAMLError as error:
        raise TrainConfigError(f"{path}: invalid YAML: {error}") from None
    except ManifestError as error:
        raise TrainConfigError(f"{path}: {error}") from None
    base = path.resolve().parent
    model_name = config.model.name
    if model_name is not None and (os.sep in model_name or model_name.startswith(".")):
        model_name = _resolve(model_name, base)
    tokenizer = config.model.tokenizer
    if tokenizer is not None and (os.sep in tokenizer or tokenizer.startswith(".")):
        tokenizer = _resolve(tokenizer, base)
    model = dataclasses.replace(
        config.model,
        name=model_name,
        llm=_resolve(config.model.llm, base),
        vision=_resolve(config.model.vision, base),
        tokenizer=tokenizer,
    )
    return dataclasses.replace(
        config,
        data=dataclasses.replace(
            config.data,
            shards=_resolve(config.data.shards, base),
            manifest=_resolve(config.data.manifest, base),
        ),
        model=model,
        output=dataclasses.replace(config.output, dir=_resolve(config.output.dir, base)),
        source_path=str(path.resolve()),
    )
