"""Special tokens of Long-VITA on top of Qwen2.5's vocabulary.

Qwen2.5 has 151,643 byte-level BPE tokens followed by 22 special tokens (`<|endoftext|>` = 151643
... `<|file_sep|>` = 151664). Long-VITA appends 17 more, in this order, from id 151665.
"""

from __future__ import annotations

from dataclasses import dataclass

QWEN25_NUM_BPE_TOKENS = 151_643
QWEN25_SPECIAL_TOKENS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
    "<tool_call>",
    "</tool_call>",
    "<|fim_prefix|>",
    "<|fim_middle|>",
    "<|fim_suffix|>",
    "<|fim_pad|>",
    "<|repo_name|>",
    "<|file_sep|>",
)
LONGVITA_SPECIAL_TOKENS = (
    "<img>",
    "</img>",
    "<IMG_CONTEXT>",
    "<vid>",
    "</vid>",
    "<VID_CONTEXT>",
    "<patch>",
    "</patch>",
    "<PATCH_CONTEXT>",
    "<quad>",
    "</quad>",
    "<ref>",
    "</ref>",
    "<box>",
    "</box>",
    "<image>",
    "<video>",
)
IMAGE_TAG = "<image>"
VIDEO_TAG = "<video>"


@dataclass(frozen=True, slots=True)
class SpecialIds:
    """Token ids the Long-VITA layout needs; built from a tokenizer by
    `lvita_data.tokenizer.tokenizer`."""

    pad: int
    im_start: int
    im_end: int
    newline: int
    img_start: int
    img_end: int
    img_context: int
    vid_start: int
    vid_end: int
    vid_context: int
    patch_start: int
    patch_end: int
    patch_context: int
    image_tag: int
    video_tag: int

    @property
    def vision_context_ids(self) -> tuple[int, int, int]:
        return (self.img_context, self.patch_context, self.vid_context)
