"""ChatML template and labels of Long-VITA, and the expansion of vision tags.

Each turn is tokenized on its own, without extra special tokens, and wrapped as
    <|im_start|>{role}\\n{content}<|im_end|>\\n
with no default system prompt. Labels (unshifted): user and system turns are IGNORE_INDEX; in an
assistant turn `<|im_start|>assistant\\n` is ignored and content + `<|im_end|>` + `\\n` are
supervised. Then every `<image>` / `<video>` tag id is replaced, in order of appearance, by the
ids of its image (tiling layout) or video (258 per frame); vision tokens are never supervised.
Text that already contains Long-VITA's vision placeholder tokens (`<img>`, `<IMG_CONTEXT>`, ...)
is rejected: the model would scatter features into positions no image fills.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from lvita_data.errors import SkipSample
from lvita_data.samples.tiling import count_image_tokens
from lvita_data.samples.vision_tokens import count_video_tokens, image_token_ids, video_token_ids
from lvita_data.schema import IGNORE_INDEX, ImagePlan, RejectReason, Turn, VideoPlan
from lvita_data.tokenizer.special_tokens import SpecialIds

ROLES = ("system", "user", "assistant")


@dataclass(frozen=True, slots=True)
class ChatTemplate:
    special: SpecialIds
    role_prefix: dict[str, np.ndarray]
    """ids of `<|im_start|>{role}\\n` per role."""
    reserved_set: frozenset[int]
    """Vision placeholder ids that must not come from text."""
    turn_overhead: dict[str, int] = field(init=False)
    """Ids a turn adds around its content per role: `<|im_start|>{role}\\n` and `<|im_end|>\\n`."""
    first_marked: int = field(init=False)
    """The smallest reserved or tag id: content ids all below it hold neither (one `max`)."""

    def __post_init__(self) -> None:
        overhead = {role: prefix.shape[0] + 2 for role, prefix in self.role_prefix.items()}
        marked = self.reserved_set | {self.special.image_tag, self.special.video_tag}
        object.__setattr__(self, "turn_overhead", overhead)
        object.__setattr__(self, "first_marked", min(marked))

    @classmethod
    def from_encoder(cls, special: SpecialIds, encode) -> ChatTemplate:
        """`encode(text) -> list[int]` is the tokenizer's plain encode (no special tokens added)."""
        prefix = {
            role: np.array([special.im_start, *encode(role), special.newline], dtype=np.int32)
            for role in ROLES
        }
        reserved = frozenset(
            (
                special.img_start,
                special.img_end,
                special.img_context,
                special.vid_start,
                special.vid_end,
                special.vid_context,
                special.patch_start,
                special.patch_end,
                special.patch_context,
            )
        )
        return cls(special=special, role_prefix=prefix, reserved_set=reserved)


@dataclass(frozen=True, slots=True)
class TextSummary:
    """Length and tag counts of a conversation's ChatML ids, vision tags not yet expanded."""

    length: int
    num_image_tags: int
    num_video_tags: int

    def expanded_length(self, images: Sequence[ImagePlan], videos: Sequence[VideoPlan]) -> int:
        return (
            self.length
            - self.num_image_tags
            - self.num_video_tags
            + sum(count_image_tokens(p.grid) for p in images)
            + sum(count_video_tokens(len(v.frame_indices)) for v in videos)
        )


def summarize_conversation(
    turns: Sequence[Turn], contents: Sequence[Sequence[int]], template: ChatTemplate
) -> TextSummary:
    """Length and tag counts without building arrays (the planning hot path: a turn whose ids
    are all below `ChatTemplate.first_marked`, most of them, costs one `max`)."""
    special = template.special
    overhead, first_marked = template.turn_overhead, template.first_marked
    length = image_tags = video_tags = 0
    for turn, content in zip(turns, contents, strict=True):
        length += overhead[turn.role] + len(content)
        if not content or max(content) < first_marked:
            continue
        if not template.reserved_set.isdisjoint(content):
            raise SkipSample(
                RejectReason.reserved_token, "text contains a vision placeholder token (<img>, ...)"
            )
        image_tags += content.count(special.image_tag)
        video_tags += content.count(special.video_tag)
    return TextSummary(length=length, num_image_tags=image_tags, num_video_tags=video_tags)


def layout_conversation(
    turns: Sequence[Turn], contents: Sequence[Sequence[int]], template: ChatTemplate
) -> tuple[np.ndarray, np.ndarray]:
    """ChatML ids and labels (int32) from per-turn content ids; vision tags not yet expanded."""
    special = template.special
    suffix = np.array([special.im_end, special.newline], dtype=np.int32)
    id_parts: list[np.ndarray] = []
    label_parts: list[np.ndarray] = []
    for turn, content in zip(turns, contents, strict=True):
        prefix = template.role_prefix[turn.role]
        body = np.asarray(content, dtype=np.int32)
        id_parts += [prefix, body, suffix]
        if turn.role == "assistant":
            label_parts += [np.full(prefix.shape[0], IGNORE_INDEX, np.int32), body, suffix]
        else:
            size = prefix.shape[0] + body.shape[0] + suffix.shape[0]
            label_parts.append(np.full(size, IGNORE_INDEX, np.int32))
    return np.concatenate(id_parts), np.concatenate(label_parts)


def check_tag_counts(summary: TextSummary, num_images: int, num_videos: int) -> None:
    if summary.num_image_tags != num_images or summary.num_video_tags != num_videos:
        raise SkipSample(
            RejectReason.tag_mismatch,
            f"{summary.num_image_tags} <image> tag(s) for {num_images} image(s), "
            f"{summary.num_video_tags} <video> tag(s) for {num_videos} video(s)",
        )


def media_order(ids: np.ndarray, special: SpecialIds) -> tuple[tuple[str, int], ...]:
    """("image" | "video", index) per tag, in order of appearance (the order of the tiles)."""
    counters = {"image": 0, "video": 0}
    order = []
    for position in np.flatnonzero((ids == special.image_tag) | (ids == special.video_tag)):
        kind = "image" if ids[position] == special.image_tag else "video"
        order.append((kind, counters[kind]))
        counters[kind] += 1
    return tuple(order)


def expand_vision(
    ids: np.ndarray,
    labels: np.ndarray,
    images: Sequence[ImagePlan],
    videos: Sequence[VideoPlan],
    special: SpecialIds,
) -> tuple[np.ndarray, np.ndarray]:
    """Replace tags by vision ids (k-th `<image>` -> images[k], k-th `<video>` -> videos[k])."""
    order = media_order(ids, special)
    num_images = sum(kind == "image" for kind, _ in order)
    if num_images != len(images) or len(order) - num_images != len(videos):
        raise SkipSample(
            RejectReason.tag_mismatch,
            f"{num_images} <image> tag(s) for {len(images)} image(s), "
            f"{len(order) - num_images} <video> tag(s) for {len(videos)} video(s)",
        )
    tag_positions = np.flatnonzero((ids == special.image_tag) | (ids == special.video_tag))
    id_parts: list[np.ndarray] = []
    label_parts: list[np.ndarray] = []
    start = 0
    for position, (kind, index) in zip(tag_positions, order, strict=True):
        id_parts.append(ids[start:position])
        label_parts.append(labels[start:position])
        if kind == "image":
            block = image_token_ids(images[index].grid, special)
        else:
            block = video_token_ids(len(videos[index].frame_indices), special)
        id_parts.append(block)
        label_parts.append(np.full(block.shape[0], IGNORE_INDEX, np.int32))
        start = position + 1
    id_parts.append(ids[start:])
    label_parts.append(labels[start:])
    return np.concatenate(id_parts), np.concatenate(label_parts)
