"""The ``longvita/*.jsonl`` annotation files (format longvita_jsonl), bad records included.

Rows are ``{"messages": [...], "images": [...], "videos": [...]}`` with media paths relative to
``longvita/``. Text comes from each file's own generator, so every file is deterministic.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from lvita_data.demo.builder import Builder, msg, write_jsonl
from lvita_data.demo.prose import CAPTION_PROMPTS, VIDEO_PROMPTS, Prose
from lvita_data.demo.specs import BAD_KINDS, COMIC_PANELS, FRAME_DIRS, IMAGE_SPECS, VIDEO_SPECS

_PANELS = [f"images/comic/panel_{i}.png" for i in range(1, COMIC_PANELS + 1)]


def _caption(builder: Builder, name: str, rng: np.random.Generator) -> str:
    prose = Prose(rng)
    return (
        f"The picture shows {builder.descriptions[name]} on a gradient background. "
        + prose.paragraph(int(rng.integers(1, 4)))
    )


def write_image_caption(builder: Builder) -> int:
    """Two captioning rows per IMAGE_SPECS image, some with a system turn."""
    rng = builder.rng("longvita/image_caption")
    rows = []
    for repeat in range(2):
        for k, spec in enumerate(IMAGE_SPECS):
            name = f"images/{spec.name}"
            prompt = CAPTION_PROMPTS[(k + repeat) % len(CAPTION_PROMPTS)]
            messages = [
                msg("user", f"<image>\n{prompt}"),
                msg("assistant", _caption(builder, name, rng)),
            ]
            if (k + repeat) % 7 == 3:
                messages.insert(0, msg("system", "You are a careful image describer."))
            rows.append({"messages": messages, "images": [name], "videos": []})
    write_jsonl(builder.root / "longvita/image_caption.jsonl", rows)
    return len(rows)


def write_multi_image(builder: Builder) -> int:
    """18 rows comparing 2 or 3 small images, then 2 comic rows of all panels."""
    rng = builder.rng("longvita/multi_image")
    small = [
        "images/img_1x1_448.jpg",
        "images/img_1x1_tiny.png",
        "images/img_2x1.jpg",
        "images/img_1x2.jpg",
        *_PANELS,
    ]
    rows = []
    for k in range(18):
        count = 2 + k % 2
        picks = [small[int(i)] for i in rng.choice(len(small), size=count, replace=False)]
        tags = "".join(f"Image {i + 1}: <image>\n" for i in range(count))
        answer = " ".join(
            f"Image {i + 1} shows {builder.descriptions[p]}." for i, p in enumerate(picks)
        )
        messages = [
            msg("user", f"{tags}What is different between these images?"),
            msg("assistant", answer),
        ]
        rows.append({"messages": messages, "images": picks})
    rows += [_comic_row(Prose(rng), k) for k in range(2)]
    write_jsonl(builder.root / "longvita/multi_image.jsonl", rows)
    return len(rows)


def _comic_row(prose: Prose, k: int) -> dict[str, Any]:
    """Comic-9K style: many panels -> one summary."""
    return {
        "messages": [
            msg("user", "<image>" * len(_PANELS) + "\nSummarize this comic."),
            msg("assistant", prose.paragraph(6 + k)),
        ],
        "images": _PANELS,
    }


def _video_rows(rng: np.random.Generator, refs: Sequence[str], per: int) -> list[dict]:
    prose = Prose(rng)
    rows = []
    for repeat in range(per):
        for k, ref in enumerate(refs):
            prompt = VIDEO_PROMPTS[(k + repeat) % len(VIDEO_PROMPTS)]
            messages = [
                msg("user", f"<video>\n{prompt}"),
                msg(
                    "assistant",
                    "A white square moves from left to right while the background colour "
                    "changes every second. " + prose.paragraph(2),
                ),
            ]
            if (k + repeat) % 3 == 0:
                messages += [
                    msg("user", "Is there any text in the video?"),
                    msg("assistant", "Only a small binary code in the top left corner."),
                ]
            rows.append({"messages": messages, "images": [], "videos": [ref]})
    return rows


def write_video_qa(builder: Builder) -> int:
    """Three rows per short video and per frame directory."""
    refs = [s.name.removeprefix("longvita/") for s in VIDEO_SPECS[:6]]
    refs += [rel.removeprefix("longvita/") for rel, _ in FRAME_DIRS]
    rows = _video_rows(builder.rng("longvita/video_qa"), refs, 3)
    write_jsonl(builder.root / "longvita/video_qa.jsonl", rows)
    return len(rows)


def write_long_video(builder: Builder) -> int:
    """Two rows about the longest video (stage 4 only)."""
    prose = Prose(builder.rng("longvita/long_video"))
    movie = VIDEO_SPECS[6].name.removeprefix("longvita/")
    rows = [
        {
            "messages": [
                msg("user", "<video>\nSummarize the whole movie."),
                msg("assistant", prose.paragraph(12)),
            ],
            "videos": [movie],
        },
        {
            "messages": [
                msg("user", "<video>\nWhat happens at the end of the movie?"),
                msg("assistant", prose.paragraph(4)),
            ],
            "videos": [movie],
        },
    ]
    write_jsonl(builder.root / "longvita/long_video.jsonl", rows)
    return len(rows)


def _good_rows(builder: Builder, rng: np.random.Generator) -> list[dict[str, Any]]:
    """30 valid rows: image captions, every fifth a text-only question."""
    rows: list[dict[str, Any]] = []
    for k in range(30):
        if k % 5 == 4:
            prose = Prose(rng)
            messages = [
                msg("user", prose.en_sentence() + " Explain."),
                msg("assistant", prose.paragraph(3)),
            ]
            rows.append({"messages": messages})
            continue
        name = f"images/{IMAGE_SPECS[k % 8].name}"
        messages = [
            msg("user", "<image>\n" + CAPTION_PROMPTS[k % 5]),
            msg("assistant", _caption(builder, name, rng)),
        ]
        rows.append({"messages": messages, "images": [name]})
    return rows


def _media_row(images: list[str], *, videos: list[str] | None = None) -> dict[str, Any]:
    """A one-turn caption row whose only fault is its media."""
    tag = "<video>" if videos else "<image>"
    row: dict[str, Any] = {
        "messages": [msg("user", f"{tag}\nDescribe it."), msg("assistant", "Something is shown.")],
        "images": images,
    }
    if videos:
        row["videos"] = videos
    return row


def _bad_conversation_rows() -> list[tuple[str, Any]]:
    """(kind, row) for records whose JSON, fields, roles or tags are wrong."""
    ok = [msg("user", "Hi"), msg("assistant", "Hello.")]
    two_tags = [msg("user", "<image>\n<image>\nCompare."), msg("assistant", "They differ.")]
    return [
        ("malformed_json", b'{"messages": [{"role": "user", "content": "broken'),
        ("messages_not_list", {"messages": "user: hi / assistant: hello"}),
        (
            "content_not_string",
            {"messages": [msg("user", "Count."), {"role": "assistant", "content": 42}]},
        ),
        ("images_not_strings", {"messages": ok, "images": 7}),
        ("unknown_role", {"messages": [msg("robot", "beep"), msg("assistant", "boop")]}),
        ("empty_conversation", {"messages": [], "images": []}),
        ("no_assistant_turn", {"messages": [msg("user", "Anyone there?")]}),
        ("image_tag_mismatch", {"messages": two_tags, "images": ["images/img_1x1_448.jpg"]}),
        (
            "video_tag_mismatch",
            {"messages": [msg("user", "<video>\nWhat happens?"), msg("assistant", "Ok.")]},
        ),
    ]


def _bad_media_rows() -> list[tuple[str, Any]]:
    """(kind, row) for records whose media path or file is bad."""
    return [
        ("path_escape_dotdot", _media_row(["../llava/images/sam/sa_10001.jpg"])),
        ("path_escape_absolute", _media_row(["/tmp/lvita_demo_absolute.jpg"])),
        ("missing_media", _media_row(["images/missing_0001.jpg"])),
        ("corrupt_image", _media_row(["images/bad/truncated.jpg"])),
        ("decompression_bomb", _media_row(["images/bad/bomb.png"])),
        ("truncated_video", _media_row([], videos=["videos/bad/truncated.mp4"])),
        ("garbage_video", _media_row([], videos=["videos/bad/garbage.mp4"])),
        ("zero_frame_video", _media_row([], videos=["videos/bad/zero_frames.mp4"])),
        ("empty_frame_dir", _media_row([], videos=["frames/empty_clip"])),
    ]


def write_bad_records(builder: Builder) -> int:
    """One row of every BAD_KINDS kind, each after 1 or 2 good rows; the rest of the good after."""
    rel = "longvita/bad_records.jsonl"
    good = iter(_good_rows(builder, builder.rng(rel)))
    bad = _bad_conversation_rows() + _bad_media_rows()
    assert [kind for kind, _ in bad] == list(BAD_KINDS)
    rows: list[Any] = []
    for number, (kind, row) in enumerate(bad):
        rows += [next(good) for _ in range(1 + number % 2)]
        builder.mark_bad(rel, len(rows), kind, BAD_KINDS[kind])
        rows.append(row)
    rows.extend(good)
    write_jsonl(builder.root / rel, rows)
    return len(rows)
