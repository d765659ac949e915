"""Record types shared by every lvita_data stage (and, later, by lvita_model).

A reader turns one row of a native dataset file into a `RawRecord` (normalized roles, media
references resolved against `media_root`). Tokenization turns a record into a `TokenizedSample`
whose `input_ids` / `labels` follow Long-VITA's exact layout and whose media plans say which
tiles and frames the ids stand for. A record that cannot be used becomes a `Reject` with one
of the `RejectReason` values.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from typing import Literal

import numpy as np

IGNORE_INDEX = -100
"""Label value of positions that are not supervised."""
TILE_SIZE = 448
"""Side of a vision tile in pixels (InternViT-300M's input): image tiles, thumbnails, frames."""

Role = Literal["system", "user", "assistant"]
RejectPhase = Literal["plan", "pack", "build"]


class RejectReason(StrEnum):
    malformed_json = "malformed_json"
    bad_field_type = "bad_field_type"
    unknown_role = "unknown_role"
    empty_conversation = "empty_conversation"
    no_assistant_turn = "no_assistant_turn"
    tag_mismatch = "tag_mismatch"
    missing_media = "missing_media"
    media_path_escape = "media_path_escape"
    corrupt_image = "corrupt_image"
    decompression_bomb = "decompression_bomb"
    bad_video = "bad_video"
    empty_frame_dir = "empty_frame_dir"
    too_few_frames = "too_few_frames"
    reserved_token = "reserved_token"
    video_not_allowed = "video_not_allowed"
    too_long = "too_long"
    too_many_tiles = "too_many_tiles"


@dataclass(frozen=True, slots=True)
class MediaRef:
    """One image or video of a record: a resolved path, or embedded bytes (parquet sets)."""

    kind: Literal["image", "video"]
    path: str | None = None
    """Absolute path of a file, or of a directory of frames (videos only)."""
    data: bytes | None = field(default=None, repr=False)
    """Encoded image bytes embedded in the source file."""
    name: str = ""
    """The reference as written in the source (for messages and meta)."""

    def __post_init__(self) -> None:
        if (self.path is None) == (self.data is None):
            raise ValueError("MediaRef needs exactly one of path or data")


@dataclass(frozen=True, slots=True)
class Turn:
    role: Role
    content: str


@dataclass(frozen=True, slots=True)
class RawRecord:
    """One normalized conversation, as read from a source file."""

    dataset: str
    source_file: str
    record_id: str
    """Row index in the source file (string so readers may use native ids)."""
    turns: tuple[Turn, ...]
    images: tuple[MediaRef, ...] = ()
    videos: tuple[MediaRef, ...] = ()


def media_modality(num_images: int, num_videos: int) -> str:
    """A sample's modality from its media: video if it has one, else multi_image, image or
    text by its image count (the planner's `SamplePlan.modality` and `lvita stats`)."""
    if num_videos:
        return "video"
    if num_images > 1:
        return "multi_image"
    return "image" if num_images else "text"


@dataclass(frozen=True, slots=True)
class ImagePlan:
    """How one image becomes tiles: grid from the header size, thumbnail first when tiled."""

    source: MediaRef
    width: int
    height: int
    grid: tuple[int, int]
    """(columns, rows) of 448-px tiles."""
    num_tiles: int
    """Tiles fed to the ViT, thumbnail included (1 or cols * rows + 1)."""
    num_tokens: int


@dataclass(frozen=True, slots=True)
class VideoPlan:
    """Which frames of one video are used (decided from metadata, before any decoding)."""

    source: MediaRef
    num_source_frames: int
    fps: float
    frame_indices: tuple[int, ...]
    requested_frames: int
    """Frames the stage's sampling rule asked for, before fitting to the packed length."""
    num_tokens: int


@dataclass(frozen=True, slots=True)
class SamplePlan:
    """Exact length and media plans of a sample, decided from metadata (no id arrays)."""

    length: int
    images: tuple[ImagePlan, ...] = ()
    videos: tuple[VideoPlan, ...] = ()

    @property
    def num_tiles(self) -> int:
        """448 tiles the ViT encodes: image tiles (thumbnails included) plus video frames."""
        frames = sum(len(v.frame_indices) for v in self.videos)
        return sum(p.num_tiles for p in self.images) + frames

    @property
    def modality(self) -> str:
        return media_modality(len(self.images), len(self.videos))


@dataclass(frozen=True, slots=True)
class TokenizedSample:
    dataset: str
    source_file: str
    record_id: str
    input_ids: np.ndarray = field(repr=False)
    """int32 [L], Long-VITA layout with vision placeholders expanded."""
    labels: np.ndarray = field(repr=False)
    """int32 [L], unshifted, IGNORE_INDEX where not supervised."""
    plan: SamplePlan
    """Length and media plans (`plan.length == len(input_ids)`)."""
    media_order: tuple[tuple[str, int], ...] = ()
    """("image" | "video", index into plan.images / plan.videos) in order of appearance: the
    order of the vision tiles (thumbnail, row-major tiles; frames) behind the placeholders."""


@dataclass(frozen=True, slots=True)
class Reject:
    dataset: str
    file: str
    record: str
    reason: RejectReason
    detail: str = ""
    phase: RejectPhase = "plan"
    """Where it was found: planning (headers, text), packing (too long, too many tiles) or
    building (pixels decoded or copied); all phases count against ``rejects.max_rate``."""

    @classmethod
    def from_json(cls, data: dict[str, str]) -> Reject:
        """The inverse of `to_json` (`TypeError`, `KeyError` or `ValueError` when it is not
        one: an unknown field or reason, a missing one)."""
        return cls(**{**data, "reason": RejectReason(data["reason"])})

    def to_json(self) -> dict[str, str]:
        return {
            "dataset": self.dataset,
            "file": self.file,
            "record": self.record,
            "reason": str(self.reason),
            "detail": self.detail,
            "phase": self.phase,
        }
