"""The ``llava/`` annotation files (format llava_json): ShareGPT4V JSON and LLaVA-Video JSONL.

Rows use the ``conversations`` (from/value) schema with media paths relative to ``llava/images``
and ``llava/videos``. Text comes from each file's own generator, so both files are deterministic.
"""

from __future__ import annotations

from typing import Any

import orjson

from lvita_data.demo.builder import Builder, conv, write_jsonl
from lvita_data.demo.prose import CAPTION_PROMPTS, VIDEO_PROMPTS, Prose
from lvita_data.demo.specs import LLAVA_IMAGE_SIZES, VIDEO_SPECS


def write_sharegpt4v(builder: Builder) -> int:
    """A JSON array of 30 caption rows (odd rows without ``<image>``); row 13 has role "bot"."""
    rel = "llava/sharegpt4v.json"
    rng = builder.rng(rel)
    prose = Prose(rng)
    rows = []
    for k in range(30):
        name, width, height = LLAVA_IMAGE_SIZES[k % len(LLAVA_IMAGE_SIZES)]
        prompt = CAPTION_PROMPTS[k % len(CAPTION_PROMPTS)]
        human = f"<image>\n{prompt}" if k % 2 == 0 else prompt  # odd rows: tag inserted
        caption = (
            f"This {width}x{height} image shows {builder.descriptions['llava:' + name]}. "
            + prose.paragraph(int(rng.integers(4, 10)))
        )
        rows.append(
            {
                "id": f"sharegpt4v_{k:04d}",
                "image": name,
                "conversations": [conv("human", human), conv("gpt", caption)],
            }
        )
    rows[13]["conversations"][1]["from"] = "bot"
    builder.mark_bad(rel, 13, "unknown_role", "unknown_role")
    (builder.root / rel).write_bytes(orjson.dumps(rows, option=orjson.OPT_INDENT_2))
    return len(rows)


def _video_conversations(prose: Prose, k: int, prompt: str) -> list[dict[str, str]]:
    """A first question with ``<image>`` (as LLaVA-Video-178K writes), ``<video>`` or no tag."""
    if k % 7 == 5:
        first = f"<video>\n{prompt}"
    elif k % 7 == 6:
        first = prompt  # no tag: <video> is inserted
    else:
        first = f"<image>\n{prompt}"  # LLaVA-Video-178K writes <image> for the video
    conversations = [conv("human", first), conv("gpt", prose.paragraph(3))]
    for _ in range(k % 3):
        conversations += [conv("human", prose.question()), conv("gpt", prose.paragraph(2))]
    return conversations


def write_llava_video(builder: Builder) -> int:
    """20 video rows over the ``llava/videos`` clips and one malformed JSON line (row 9)."""
    rel = "llava/llava_video_178k.jsonl"
    prose = Prose(builder.rng(rel))
    videos = [s.name.removeprefix("llava/videos/") for s in VIDEO_SPECS[7:]]
    rows: list[Any] = []
    for k in range(20):
        video = videos[k % len(videos)]
        prompt = VIDEO_PROMPTS[k % len(VIDEO_PROMPTS)]
        rows.append(
            {
                "id": f"llava_video_{k:04d}",
                "conversations": _video_conversations(prose, k, prompt),
                "data_source": video.split("/", 1)[0],
                "video": video,
            }
        )
    rows.insert(9, b'{"id": "llava_video_bad", "conversations": [{"from": "human", "value"')
    builder.mark_bad(rel, 9, "malformed_json", "malformed_json")
    write_jsonl(builder.root / rel, rows)
    return len(rows)
