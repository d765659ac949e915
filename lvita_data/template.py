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
from dataclasses import dataclass

import numpy as np

from lvita_data.errors import SkipSample
from lvita_data.schema import IGNORE_INDEX, ImagePlan, RejectReason, Turn, VideoPlan
from lvita_data.special_tokens import SpecialIds
from lvita_data.tiling import count_image_tokens
from lvita_data.tokens import count_video_tokens, image_token_ids, video_token_ids

ROLES = ("system", "user", "assistant")


@dataclass(frozen=True, slots=True)
class ChatTemplate:
    special: SpecialIds
    role_prefix: dict[str, np.ndarray]
    """ids of `<|im_start|>{role}\\n` per role."""
    reserved_ids: np.ndarray
    """Vision placeholder ids that must not come from text."""

    @classmethod
    def from_encoder(cls, special: SpecialIds, encode) -> ChatTemplate:
        """`encode(text) -> list[int]` is the tokenizer's plain encode (no special tokens added)."""
        prefix = {
            role: np.array([special.im_start, *encode(role), special.newline], dtype=np.int32)
            for role in ROLES
        }
        reserved = np.array(
            [
                special.img_start,
                special.img_end,
                special.img_context,
                special.vid_start,
                special.vid_end,
                special.vid_context,
                special.patch_start,
                special.patch_end,
                special.patch_context,
            ],
            dtype=np.int32,
        )
        return cls(special=special, role_prefix=prefix, reserved_ids=reserved)


@dataclass(frozen=True, slots=True)
class TextLayout:
    """ChatML ids and labels of a conversation, vision tags not yet expanded."""

    ids: np.ndarray
    labels: np.ndarray
    num_image_tags: int
    num_video_tags: int

    def expanded_length(self, images: Sequence[ImagePlan], videos: Sequence[VideoPlan]) -> int:
        return (
            int(self.ids.shape[0])
            - self.num_image_tags
            - self.num_video_tags
            + sum(count_image_tokens(p.grid) for p in images)
            + sum(count_video_tokens(len(v.frame_indices)) for v in videos)
        )


def layout_conversation(
    turns: Sequence[Turn], contents: Sequence[Sequence[int]], template: ChatTemplate
) -> TextLayout:
    """Assemble ChatML ids/labels from per-turn content ids (same order as `turns`)."""
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
    ids = np.concatenate(id_parts)
    labels = np.concatenate(label_parts)
    if np.isin(ids, template.reserved_ids).any():
        raise SkipSample(
            RejectReason.reserved_token, "text contains a vision placeholder token (<img>, ...)"
        )
    return TextLayout(
        ids=ids,
        labels=labels,
        num_image_tags=int(np.count_nonzero(ids == special.image_tag)),
        num_video_tags=int(np.count_nonzero(ids == special.video_tag)),
    )


def check_tag_counts(layout: TextLayout, num_images: int, num_videos: int) -> None:
    if layout.num_image_tags != num_images or layout.num_video_tags != num_videos:
        raise SkipSample(
            RejectReason.tag_mismatch,
            f"{layout.num_image_tags} <image> tag(s) for {num_images} image(s), "
            f"{layout.num_video_tags} <video> tag(s) for {num_videos} video(s)",
        )


def expand_vision(
    layout: TextLayout,
    images: Sequence[ImagePlan],
    videos: Sequence[VideoPlan],
    special: SpecialIds,
) -> tuple[np.ndarray, np.ndarray]:
    """Replace tags by vision ids (k-th `<image>` -> images[k], k-th `<video>` -> videos[k])."""
    check_tag_counts(layout, len(images), len(videos))
    tag_positions = np.flatnonzero((layout.ids == special.image_tag) | (layout.ids == special.video_tag))
    image_iter, video_iter = iter(images), iter(videos)
    id_parts: list[np.ndarray] = []
    label_parts: list[np.ndarray] = []
    start = 0
    for position in tag_positions:
        id_parts.append(layout.ids[start:position])
        label_parts.append(layout.labels[start:position])
        if layout.ids[position] == special.image_tag:
            block = image_token_ids(next(image_iter).grid, special)
        else:
            block = video_token_ids(len(next(video_iter).frame_indices), special)
        id_parts.append(block)
        label_parts.append(np.full(block.shape[0], IGNORE_INDEX, np.int32))
        start = position + 1
    id_parts.append(layout.ids[start:])
    label_parts.append(layout.labels[start:])
    return np.concatenate(id_parts), np.concatenate(label_parts)
