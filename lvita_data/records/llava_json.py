"""Reader of LLaVA-style annotation files: ShareGPT4V, LLaVA-ReCap, LLaVA-Video-178K layouts.

A file is a JSON array or JSON Lines. A row has ``conversations: [{from, value}]`` and optionally
``image`` (a string or a list of strings) and/or ``video`` (a string or a list of strings, a file
or a directory of frames). Media paths resolve against ``media_root`` (see `base`).

Tag conventions of LLaVA, applied before the tag counts are checked:

- images given but no ``<image>`` tag in any turn: one ``<image>\\n`` per image is prepended to
  the first human turn (LLaVA's own preprocessing does this);
- videos given, no ``<video>`` tag, no images, and exactly one ``<image>`` tag per video in the
  turns: those ``<image>`` tags are the video's placeholders (LLaVA-NeXT / LLaVA-Video-178K write
  ``<image>`` for a video) and become ``<video>``;
- videos given and neither kind of tag for them: one ``<video>\\n`` per video is prepended to the
  first human turn.

Otherwise tags are kept as written and their counts must match the media (``tag_mismatch``).
"""

from __future__ import annotations

from typing import Any

from lvita_data.records.base import (
    JsonSource,
    count_tags,
    prepend_to_first_user_turn,
    str_list,
    turns_from_row,
)
from lvita_data.schema import RawRecord, Turn
from lvita_data.tokenizer.special_tokens import IMAGE_TAG, VIDEO_TAG


def apply_llava_tags(turns: list[Turn], num_images: int, num_videos: int) -> list[Turn]:
    """The LLaVA tag conventions above (returns a new list; counts are checked later)."""
    image_tags = count_tags(turns, IMAGE_TAG)
    if num_videos and count_tags(turns, VIDEO_TAG) == 0:
        if num_images == 0 and image_tags == num_videos:
            turns = [Turn(t.role, t.content.replace(IMAGE_TAG, VIDEO_TAG)) for t in turns]
            image_tags = 0
        else:
            turns = prepend_to_first_user_turn(turns, (VIDEO_TAG + "\n") * num_videos)
    if num_images and image_tags == 0:
        turns = prepend_to_first_user_turn(turns, (IMAGE_TAG + "\n") * num_images)
    return turns


class LlavaJsonSource(JsonSource):
    format = "llava_json"

    def normalize(self, row: int, data: dict[str, Any]) -> RawRecord:
        turns = turns_from_row(data)
        image_field = "image" if "image" in data else "images"
        image_names = str_list(data.get(image_field), field=image_field)
        video_field = "video" if "video" in data else "videos"
        video_names = str_list(data.get(video_field), field=video_field)
        images = [self.resolve(p, "image") for p in image_names]
        videos = [self.resolve(p, "video") for p in video_names]
        if turns:
            turns = apply_llava_tags(turns, len(images), len(videos))
        return self.record(row, turns, images, videos)
