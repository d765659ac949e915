"""ChatML layout, labels (long-vita.md section 3) and vision tag expansion, with a toy encoder."""

import re

import numpy as np
import pytest

from lvita_data.errors import SkipSample
from lvita_data.samples.template import (
    ChatTemplate,
    check_tag_counts,
    expand_vision,
    layout_conversation,
    media_order,
    summarize_conversation,
)
from lvita_data.samples.tiling import count_image_tokens
from lvita_data.schema import IGNORE_INDEX, ImagePlan, MediaRef, Turn, VideoPlan
from lvita_data.tokenizer.special_tokens import SpecialIds

IDS = SpecialIds(
    pad=1,
    im_start=2,
    im_end=3,
    newline=ord("\n"),
    img_start=1001,
    img_end=1002,
    img_context=1003,
    vid_start=1004,
    vid_end=1005,
    vid_context=1006,
    patch_start=1007,
    patch_end=1008,
    patch_context=1009,
    image_tag=1010,
    video_tag=1011,
)
TAGS = {"<image>": IDS.image_tag, "<video>": IDS.video_tag, "<img>": IDS.img_start}


def encode(text: str) -> list[int]:
    """Toy tokenizer: one id per character, tags as single ids (HF added-token semantics)."""
    out = []
    for piece in re.split(r"(<image>|<video>|<img>)", text):
        out.extend([TAGS[piece]] if piece in TAGS else [ord(c) for c in piece])
    return out


TEMPLATE = ChatTemplate.from_encoder(IDS, encode)


class Layout:
    """ids/labels from layout_conversation plus the summary the planner computes without arrays."""

    def __init__(self, turns):
        contents = [encode(t.content) for t in turns]
        self.summary = summarize_conversation(turns, contents, TEMPLATE)
        self.ids, self.labels = layout_conversation(turns, contents, TEMPLATE)
        assert self.summary.length == self.ids.shape[0] == self.labels.shape[0]


layout = Layout


def test_chatml_and_labels_exact():
    turns = [Turn("user", "hi"), Turn("assistant", "yo"), Turn("user", "x"), Turn("assistant", "z")]
    result = layout(turns)
    expected_text = "<s>user\nhi<e>\n<s>assistant\nyo<e>\n<s>user\nx<e>\n<s>assistant\nz<e>\n"
    expected = [
        IDS.im_start if c == "S" else IDS.im_end if c == "E" else ord(c)
        for c in expected_text.replace("<s>", "S").replace("<e>", "E")
    ]
    assert result.ids.tolist() == expected
    labels = result.labels.tolist()
    # Supervised: assistant content + <|im_end|> + "\n"; everything else ignored.
    supervised = [expected[i] for i, label in enumerate(labels) if label != IGNORE_INDEX]
    assert supervised == [
        ord("y"),
        ord("o"),
        IDS.im_end,
        ord("\n"),
        ord("z"),
        IDS.im_end,
        ord("\n"),
    ]
    assert all(label in (IGNORE_INDEX, expected[i]) for i, label in enumerate(labels))
    assert result.ids.dtype == np.int32 and result.labels.dtype == np.int32


def test_system_turn_is_ignored_and_no_default_system_prompt():
    result = layout([Turn("system", "be nice"), Turn("user", "q"), Turn("assistant", "a")])
    assert result.ids[0] == IDS.im_start and result.ids[1:7].tolist() == [ord(c) for c in "system"]
    assert (result.labels[: len("Ssystem\nbe niceE\nSuser\nqE\n")] == IGNORE_INDEX).all()
    no_system = layout([Turn("user", "q"), Turn("assistant", "a")])
    assert no_system.ids[1:5].tolist() == [ord(c) for c in "user"]


def image_plan(grid):
    return ImagePlan(MediaRef("image", path="/x.jpg"), 900, 450, grid, 3, count_image_tokens(grid))


def video_plan(frames):
    ref = MediaRef("video", path="/v.mp4")
    return VideoPlan(ref, 100, 1.0, tuple(range(frames)), frames, 258 * frames)


def test_expansion_in_order_and_never_supervised():
    turns = [Turn("user", "<video>a<image>b<image>"), Turn("assistant", "ok")]
    base = layout(turns)
    images, videos = [image_plan((2, 1)), image_plan((1, 1))], [video_plan(2)]
    assert base.summary.num_image_tags == 2 and base.summary.num_video_tags == 1
    ids, labels = expand_vision(base.ids, base.labels, images, videos, IDS)
    assert ids.shape[0] == base.summary.expanded_length(images, videos)
    assert ids.shape[0] == base.ids.shape[0] - 3 + 2 * 258 + (258 + 1 + 516) + 258
    starts = [i for i, t in enumerate(ids.tolist()) if t in (IDS.img_start, IDS.vid_start)]
    kinds = [ids[i] for i in starts]
    assert kinds == [IDS.vid_start, IDS.vid_start, IDS.img_start, IDS.img_start]
    assert media_order(base.ids, IDS) == (("video", 0), ("image", 0), ("image", 1))
    vision = np.isin(ids, [IDS.img_context, IDS.patch_context, IDS.vid_context, IDS.img_start])
    assert (labels[vision] == IGNORE_INDEX).all()
    assert (labels != IGNORE_INDEX).sum() == len("ok") + 2


def test_tag_mismatch_and_reserved_token():
    base = layout([Turn("user", "<image><image>"), Turn("assistant", "a")])
    with pytest.raises(SkipSample) as info:
        expand_vision(base.ids, base.labels, [image_plan((1, 1))], [], IDS)
    assert info.value.reason == "tag_mismatch"
    with pytest.raises(SkipSample) as info:
        check_tag_counts(base.summary, 1, 0)
    assert info.value.reason == "tag_mismatch"
    with pytest.raises(SkipSample) as info:
        layout([Turn("user", "see <img> here"), Turn("assistant", "a")])
    assert info.value.reason == "reserved_token"
