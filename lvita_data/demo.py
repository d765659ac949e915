"""A small, deterministic demo corpus in every native format the readers support.

`make_demo_corpus(root, seed=0)` writes (about 3 MB, about 5 s on 2 cores)::

    root/
      longvita/                       Long-VITA-Training-Data layout (format longvita_jsonl)
        images/*.jpg|png              drawn pictures, sizes chosen so InternVL grids 1x1 .. 4x3
                                      (every cols 1..4 x rows 1..3) and 1x4 occur; comic panels
        images/bad/                   truncated.jpg (corrupt), bomb.png (decompression bomb)
        videos/*.mp4                  H.264, 160x120 / 320x240, 10/24/25/30 fps, 3 s .. 90 s
        videos/bad/                   truncated.mp4, garbage.mp4, zero_frames.mp4
        frames/clip_a|clip_b/frame_{1..N}.jpg, frames/ShareGPTVideo/.../frame_{1..16}.jpg,
        frames/empty_clip/            (empty frame directory)
        image_caption.jsonl multi_image.jsonl video_qa.jsonl long_video.jsonl bad_records.jsonl
      llava/                          (format llava_json)
        images/coco/train2017/*.jpg images/sam/*.jpg
        videos/academic_source/*.mp4 videos/liwei_youtube_videos/*.mp4
        sharegpt4v.json               JSON array, image + conversations (some rows without tags)
        llava_video_178k.jsonl        video + conversations with LLaVA-Video's <image> tag
      cauldron/chartqa-00000-of-00001.parquet   the_cauldron schema, row groups of 8
      onevision/ov-00000-of-00001.parquet       LLaVA-OneVision-Data schema, row groups of 8
      text/long_alpaca.jsonl long_messages.jsonl short_chat.jsonl

Bad records, and where they are (expected reject reason in brackets):

- ``longvita/bad_records.jsonl`` (18 bad rows among 48, rate 0.375): malformed JSON line
  [malformed_json]; messages not a list, content not a string, images an int [bad_field_type];
  role "robot" [unknown_role]; empty messages [empty_conversation]; no assistant turn
  [no_assistant_turn]; two ``<image>`` tags for one image, a ``<video>`` tag without video
  [tag_mismatch]; ``../`` path and absolute path [media_path_escape]; missing image file
  [missing_media]; truncated JPEG [corrupt_image]; PNG header claiming 30000x30000 pixels
  [decompression_bomb]; truncated mp4, garbage bytes named .mp4, mp4 without any video frame
  [bad_video]; empty frame directory [empty_frame_dir].
- ``llava/sharegpt4v.json``: one row with role "bot" [unknown_role].
- ``llava/llava_video_178k.jsonl``: one malformed JSON line [malformed_json].
- ``cauldron/chartqa-00000-of-00001.parquet``: one row whose image list holds a null
  [bad_field_type].
- ``onevision/ov-00000-of-00001.parquet``: one row with a null image but an ``<image>`` tag
  [tag_mismatch].
- ``text/long_alpaca.jsonl``: one text of about 330K characters (> 64K tokens) [too_long at every
  demo stage].

Determinism: every part draws from its own ``numpy`` generator seeded by (seed, part). Images,
JSON and parquet files are byte-identical for the same seed and library versions; videos are
encoded by libx264 with one thread and fixed options (byte-identical in practice; the decoded
frames are identical in any case).
"""

from __future__ import annotations

import hashlib
import io
import math
import os
import struct
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import av
import numpy as np
import orjson
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image, ImageDraw, ImageFont

# --------------------------------------------------------------------------------------------
# Specifications (imported by the tests)


@dataclass(frozen=True)
class ImageSpec:
    name: str
    width: int
    height: int
    grid: tuple[int, int]
    """(cols, rows) InternVL's dynamic tiling picks for this size (max 12 tiles)."""


IMAGE_SPECS: tuple[ImageSpec, ...] = (
    ImageSpec("img_1x1_448.jpg", 448, 448, (1, 1)),
    ImageSpec("img_1x1_tiny.png", 32, 32, (1, 1)),
    ImageSpec("img_2x1.jpg", 900, 450, (2, 1)),
    ImageSpec("img_3x1.jpg", 1344, 448, (3, 1)),
    ImageSpec("img_4x1.jpg", 2000, 500, (4, 1)),
    ImageSpec("img_1x2.jpg", 448, 900, (1, 2)),
    ImageSpec("img_2x2.png", 896, 896, (2, 2)),
    ImageSpec("img_3x2.jpg", 1344, 896, (3, 2)),
    ImageSpec("img_4x2.jpg", 1792, 896, (4, 2)),
    ImageSpec("img_1x3.jpg", 448, 1344, (1, 3)),
    ImageSpec("img_2x3.jpg", 896, 1344, (2, 3)),
    ImageSpec("img_3x3.jpg", 1344, 1344, (3, 3)),
    ImageSpec("img_4x3.jpg", 1792, 1344, (4, 3)),
    ImageSpec("img_1x4.png", 300, 1200, (1, 4)),
    ImageSpec("img_odd_1000x700.jpg", 1000, 700, (3, 2)),
    ImageSpec("img_odd_333x517.jpg", 333, 517, (2, 3)),
    ImageSpec("img_odd_640x480.jpg", 640, 480, (4, 3)),
)
"""Images of ``longvita/images`` (the grid is what InternVL's find_closest_aspect_ratio gives)."""

COMIC_PANELS = 8
"""320x320 panels ``longvita/images/comic/panel_{1..8}.png`` (1x1 grid) for multi-image rows."""

LLAVA_IMAGE_SIZES: tuple[tuple[str, int, int], ...] = (
    ("coco/train2017/000000000009.jpg", 640, 480),
    ("coco/train2017/000000000025.jpg", 500, 333),
    ("coco/train2017/000000000030.jpg", 427, 640),
    ("coco/train2017/000000000034.jpg", 612, 612),
    ("coco/train2017/000000000036.jpg", 1024, 683),
    ("coco/train2017/000000000042.jpg", 375, 500),
    ("sam/sa_10001.jpg", 1024, 768),
    ("sam/sa_10002.jpg", 768, 1024),
)


@dataclass(frozen=True)
class VideoSpec:
    name: str
    fps: int
    seconds: int
    width: int
    height: int

    @property
    def frames(self) -> int:
        return self.fps * self.seconds


VIDEO_SPECS: tuple[VideoSpec, ...] = (
    VideoSpec("longvita/videos/clip_10fps_3s.mp4", 10, 3, 160, 120),
    VideoSpec("longvita/videos/clip_24fps_6s.mp4", 24, 6, 160, 120),
    VideoSpec("longvita/videos/clip_25fps_10s.mp4", 25, 10, 320, 240),
    VideoSpec("longvita/videos/clip_30fps_20s.mp4", 30, 20, 160, 120),
    VideoSpec("longvita/videos/clip_24fps_32s.mp4", 24, 32, 160, 120),
    VideoSpec("longvita/videos/long_10fps_80s.mp4", 10, 80, 160, 120),
    VideoSpec("longvita/videos/movie_10fps_90s.mp4", 10, 90, 160, 120),
    VideoSpec("llava/videos/academic_source/clip_25fps_5s.mp4", 25, 5, 160, 120),
    VideoSpec("llava/videos/academic_source/clip_30fps_12s.mp4", 30, 12, 160, 120),
    VideoSpec("llava/videos/liwei_youtube_videos/clip_25fps_30s.mp4", 25, 30, 160, 120),
)
"""``long_10fps_80s`` overflows the demo packed length at stages 2 and 3 (16 / 64 frames x 258
tokens > 4096 / 16384) so it must be fitted; ``movie_10fps_90s`` (the longest) is stage 4 only."""

FRAME_DIRS: tuple[tuple[str, int], ...] = (
    ("longvita/frames/clip_a", 12),
    ("longvita/frames/clip_b", 20),
    ("longvita/frames/ShareGPTVideo/train_300k/v_demo_0001", 16),
)
EMPTY_FRAME_DIR = "longvita/frames/empty_clip"

BAD_KINDS: dict[str, str] = {
    "malformed_json": "malformed_json",
    "messages_not_list": "bad_field_type",
    "content_not_string": "bad_field_type",
    "images_not_strings": "bad_field_type",
    "unknown_role": "unknown_role",
    "empty_conversation": "empty_conversation",
    "no_assistant_turn": "no_assistant_turn",
    "image_tag_mismatch": "tag_mismatch",
    "video_tag_mismatch": "tag_mismatch",
    "path_escape_dotdot": "media_path_escape",
    "path_escape_absolute": "media_path_escape",
    "missing_media": "missing_media",
    "corrupt_image": "corrupt_image",
    "decompression_bomb": "decompression_bomb",
    "truncated_video": "bad_video",
    "garbage_video": "bad_video",
    "zero_frame_video": "bad_video",
    "empty_frame_dir": "empty_frame_dir",
}
"""Every kind of bad record in ``longvita/bad_records.jsonl`` -> the reject reason it must get."""

BOMB_SIZE = (30000, 30000)
"""Pixels claimed by ``images/bad/bomb.png`` (> 2 x PIL's MAX_IMAGE_PIXELS)."""

HUGE_TEXT_CHARS = 330_000

# --------------------------------------------------------------------------------------------
# Deterministic pseudo-prose


def _words(text: str) -> tuple[str, ...]:
    return tuple(text.split())


_NOUNS = _words(
    "river mountain engine library garden signal theory market window bridge harbor "
    "forest council letter machine village painting story network circuit ocean desert "
    "planet teacher student doctor farmer author captain pilot sailor merchant museum "
    "festival harvest winter summer evening morning lantern compass archive journey "
    "treaty castle kitchen orchard railway factory meadow glacier volcano island canyon "
    "telescope record formula question answer problem method result chapter paragraph "
    "argument evidence"
)
_ADJS = _words(
    "quiet ancient bright narrow distant golden silent careful rapid gentle curious "
    "heavy modern fragile hidden northern southern broad hollow steady sudden clever "
    "patient crowded empty faithful rough smooth vivid pale crimson emerald silver "
    "wooden stone"
)
_VERBS = _words(
    "describes follows crosses measures records explains guards reveals remembers "
    "carries examines builds connects divides gathers observes protects questions "
    "repairs studies surrounds transforms visits watches welcomes outlines compares "
    "predicts supports"
)
_ADVS = _words(
    "slowly quickly carefully quietly suddenly gradually openly rarely often patiently "
    "eventually clearly boldly gently briefly"
)
_PREPS = _words("across beyond beneath near behind beside toward within along around")
_ZH_CHARS = (
    "的一是在不了有和人这中大为上个国我以要他时来用们生到作地于出就分对成会可主发年动同工也能下过"
    "子说产种面而方后多定行学法所民得经十三之进着等部度家电力里如水化高自二理起小物现实加量都两体"
    "制机当使点从业本去把性好应开它合还因由其些然前外天政四日那社义事平形相全表间样与关各重新线内"
    "数正心反你明看原又么利比或但质气第向道命此变条只没结解问意建月公无系军很情者最立代想已通并提"
    "直题党程展五果料象员革位入常文总次品式活设及管特件长求老头基资边流路级少图山统接知较将组见计"
    "别她手角期根论运农指几九区强放决西被干做必战先回则任取据处队南给色光门即保治北造百规热领七海"
    "口东导器压志世金增争济阶油思术极交受联什认六共权收证改清美再采转更单风切打白教速花带安场身车"
    "例真务具万每目至达走积示议声报斗完类八离华名确才科张信马节话米整空元况今集温传土许步群广石记"
)


class _Prose:
    """Varied pseudo-prose from small word lists (English) and common characters (Chinese)."""

    def __init__(self, rng: np.random.Generator) -> None:
        self.rng = rng

    def _pick(self, words: Sequence[str]) -> str:
        return words[int(self.rng.integers(len(words)))]

    def en_sentence(self, numbers: bool = False) -> str:
        r = self.rng
        parts = [
            "The",
            self._pick(_ADJS),
            self._pick(_NOUNS),
            self._pick(_ADVS) if r.random() < 0.4 else "",
            self._pick(_VERBS),
            "the",
            self._pick(_NOUNS),
            self._pick(_PREPS),
            "the",
            self._pick(_ADJS),
            self._pick(_NOUNS),
        ]
        if numbers or r.random() < 0.15:
            parts += ["in", str(int(r.integers(1000, 100000))), "cases"]
        if r.random() < 0.3:
            parts += ["while", "a", self._pick(_NOUNS), self._pick(_VERBS), "another"]
        return " ".join(p for p in parts if p) + "."

    def zh_sentence(self) -> str:
        n = int(self.rng.integers(8, 24))
        idx = self.rng.integers(len(_ZH_CHARS), size=n)
        chars = [_ZH_CHARS[int(i)] for i in idx]
        if n > 12:
            chars.insert(n // 2, "，")
        return "".join(chars) + "。"

    def paragraph(self, sentences: int, zh: bool = False, numbers: bool = False) -> str:
        if zh:
            return "".join(self.zh_sentence() for _ in range(sentences))
        return " ".join(self.en_sentence(numbers) for _ in range(sentences))

    def text(self, chars: int, zh: bool = False, numbers: bool = False) -> str:
        """Paragraphs separated by blank lines until at least `chars` characters."""
        out: list[str] = []
        total = 0
        while total < chars:
            para = self.paragraph(int(self.rng.integers(3, 9)), zh=zh, numbers=numbers)
            out.append(para)
            total += len(para) + 2
        return "\n\n".join(out)


# --------------------------------------------------------------------------------------------
# Images

_COLORS = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (240, 210, 40),
    "purple": (140, 60, 180),
    "orange": (245, 140, 30),
    "black": (20, 20, 20),
    "white": (250, 250, 250),
    "teal": (30, 150, 150),
    "pink": (240, 120, 170),
}
_COLOR_NAMES = tuple(_COLORS)


def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    return ImageFont.load_default(size=max(8, size))


def _gradient(rng: np.random.Generator, width: int, height: int) -> np.ndarray:
    c0 = rng.integers(60, 200, size=3).astype(np.float32)
    c1 = rng.integers(60, 200, size=3).astype(np.float32)
    t = (np.arange(width, dtype=np.float32)[None, :] / max(1, width - 1)) * 0.6 + (
        np.arange(height, dtype=np.float32)[:, None] / max(1, height - 1)
    ) * 0.4
    return (c0 + (c1 - c0) * t[..., None]).astype(np.uint8)


def _draw_picture(
    rng: np.random.Generator, width: int, height: int, label: str
) -> tuple[Image.Image, str]:
    """A picture of a few coloured shapes and a label; returns (image, description)."""
    image = Image.fromarray(_gradient(rng, width, height), "RGB")
    draw = ImageDraw.Draw(image)
    shapes = []
    for _ in range(int(rng.integers(3, 7))):
        kind = ("rectangle", "ellipse", "triangle", "line")[int(rng.integers(4))]
        color = _COLOR_NAMES[int(rng.integers(len(_COLOR_NAMES)))]
        x0, x1 = sorted(int(v) for v in rng.integers(0, width, size=2))
        y0, y1 = sorted(int(v) for v in rng.integers(0, height, size=2))
        x1, y1 = max(x1, x0 + 2), max(y1, y0 + 2)
        fill = _COLORS[color]
        if kind == "rectangle":
            draw.rectangle((x0, y0, x1, y1), fill=fill, outline=(0, 0, 0))
        elif kind == "ellipse":
            draw.ellipse((x0, y0, x1, y1), fill=fill, outline=(0, 0, 0))
        elif kind == "triangle":
            draw.polygon([(x0, y1), ((x0 + x1) // 2, y0), (x1, y1)], fill=fill)
        else:
            draw.line((x0, y0, x1, y1), fill=fill, width=max(1, min(width, height) // 60))
        shapes.append(f"a {color} {kind}")
    size = max(8, min(width, height) // 10)
    draw.text((size // 2, size // 2), label, fill=(0, 0, 0), font=_font(size))
    description = ", ".join(shapes[:-1]) + f" and {shapes[-1]}" if len(shapes) > 1 else shapes[0]
    return image, description


def _save_image(image: Image.Image, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".png":
        image.save(path, format="PNG", optimize=False, compress_level=6)
    else:
        image.save(path, format="JPEG", quality=85, subsampling=2)


def _image_bytes(image: Image.Image, fmt: str) -> bytes:
    buffer = io.BytesIO()
    if fmt == "PNG":
        image.save(buffer, format="PNG", compress_level=6)
    else:
        image.save(buffer, format="JPEG", quality=85)
    return buffer.getvalue()


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return (
        struct.pack(">I", len(data))
        + kind
        + data
        + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    )


def _bomb_png(width: int, height: int) -> bytes:
    """A tiny PNG whose header claims width x height 1-bit pixels (the data is one row only)."""
    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    row = b"\x00" + b"\x00" * ((width + 7) // 8)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", header)
        + _png_chunk(b"IDAT", zlib.compress(row, 9))
        + _png_chunk(b"IEND", b"")
    )


def _chart(rng: np.random.Generator, width: int, height: int) -> tuple[Image.Image, dict]:
    """A bar chart with labelled values; returns the image and its data."""
    labels = [chr(ord("A") + i) for i in range(int(rng.integers(3, 7)))]
    values = [int(v) for v in rng.integers(5, 100, size=len(labels))]
    image = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(image)
    font = _font(max(10, height // 22))
    left, bottom, top = width // 10, height - height // 8, height // 10
    draw.line((left, top, left, bottom), fill=(0, 0, 0), width=2)
    draw.line((left, bottom, width - 10, bottom), fill=(0, 0, 0), width=2)
    slot = (width - left - 20) // len(labels)
    for i, (label, value) in enumerate(zip(labels, values, strict=True)):
        x0 = left + 10 + i * slot
        y0 = bottom - int((bottom - top) * value / 100)
        color = _COLORS[_COLOR_NAMES[i % len(_COLOR_NAMES)]]
        draw.rectangle((x0, y0, x0 + slot * 2 // 3, bottom), fill=color, outline=(0, 0, 0))
        draw.text((x0, y0 - font.size - 2), str(value), fill=(0, 0, 0), font=font)
        draw.text((x0, bottom + 4), label, fill=(0, 0, 0), font=font)
    return image, {"labels": labels, "values": values}


def _document(
    rng: np.random.Generator, prose: _Prose, width: int, height: int
) -> tuple[Image.Image, str]:
    """A synthdog-like page of words on paper; returns the image and its text."""
    image = Image.new("RGB", (width, height), (246, 240, 226))
    draw = ImageDraw.Draw(image)
    size = max(12, height // 14)
    font = _font(size)
    words = prose.en_sentence().rstrip(".").split()[: int(rng.integers(3, 7))]
    lines, line = [], []
    for word in words:
        if len(" ".join([*line, word])) * size * 0.6 > width - 20 and line:
            lines.append(" ".join(line))
            line = []
        line.append(word)
    lines.append(" ".join(line))
    for i, text in enumerate(lines):
        draw.text((10, 10 + i * (size + 6)), text, fill=(30, 30, 30), font=font)
    return image, " ".join(lines)


# --------------------------------------------------------------------------------------------
# Videos and frames


def _frame_palette(rng: np.random.Generator, seconds: int) -> np.ndarray:
    return rng.integers(30, 226, size=(max(1, seconds), 3)).astype(np.uint8)


def _video_frame(palette: np.ndarray, index: int, fps: int, width: int, height: int) -> np.ndarray:
    """Frame `index`: background colour of its second, a moving white square, an index code."""
    second = min(index // fps, len(palette) - 1)
    frame = np.empty((height, width, 3), dtype=np.uint8)
    frame[...] = palette[second]
    side = max(8, height // 6)
    x = (index * 3) % max(1, width - side)
    y = (height - side) // 2 + int((height // 4) * math.sin(index / max(1, fps)))
    frame[y : y + side, x : x + side] = 255
    cell = max(2, width // 40)
    bits = (index >> (np.arange(12 * cell) // cell)) & 1  # the frame index in binary, top left
    frame[:cell, : 12 * cell] = (bits * 255).astype(np.uint8)[None, :, None]
    return frame


def _encode_video(path: Path, spec: VideoSpec, rng: np.random.Generator) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    palette = _frame_palette(rng, spec.seconds)
    with av.open(str(path), "w", format="mp4") as container:
        stream = container.add_stream(
            "libx264",
            rate=spec.fps,
            options={"crf": "30", "preset": "veryfast", "threads": "1", "bf": "0"},
        )
        stream.width, stream.height, stream.pix_fmt = spec.width, spec.height, "yuv420p"
        stream.codec_context.thread_count = 1
        for i in range(spec.frames):
            array = _video_frame(palette, i, spec.fps, spec.width, spec.height)
            frame = av.VideoFrame.from_ndarray(array, format="rgb24")
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def _zero_frame_mp4(path: Path) -> None:
    """An mp4 container written without a single frame (no usable video stream)."""
    container = av.open(str(path), "w", format="mp4")
    stream = container.add_stream("libx264", rate=10)
    stream.width, stream.height, stream.pix_fmt = 160, 120, "yuv420p"
    container.start_encoding()
    container.close()


# --------------------------------------------------------------------------------------------
# Writers


def _write_jsonl(path: Path, rows: Sequence[Any]) -> None:
    """Rows are dicts (dumped) or bytes (written verbatim, for malformed lines)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as handle:
        for row in rows:
            handle.write(row if isinstance(row, bytes) else orjson.dumps(row))
            handle.write(b"\n")


def _msg(role: str, content: str) -> dict[str, str]:
    return {"role": role, "content": content}


def _conv(sender: str, value: str) -> dict[str, str]:
    return {"from": sender, "value": value}


_CAPTION_PROMPTS = (
    "Describe the image briefly.",
    "What is shown in this picture?",
    "Write a short caption for the image.",
    "Give a concise description of the image.",
    "Summarize the visual content of the image.",
)
_VIDEO_PROMPTS = (
    "What happens in the video?",
    "Describe the video in detail.",
    "What moves across the screen?",
    "How does the background change over time?",
)


class _Builder:
    def __init__(self, root: Path, seed: int) -> None:
        self.root = root
        self.seed = seed
        self.bad: list[dict[str, Any]] = []
        self.images: list[dict[str, Any]] = []
        self.descriptions: dict[str, str] = {}

    def rng(self, part: str) -> np.random.Generator:
        digest = hashlib.sha256(part.encode()).digest()
        return np.random.default_rng([self.seed, int.from_bytes(digest[:8], "little")])

    def mark_bad(self, file: str, row: int, kind: str, reason: str) -> None:
        self.bad.append({"file": file, "row": row, "kind": kind, "reason": reason})

    # --- media -------------------------------------------------------------------------------

    def longvita_images(self) -> None:
        rng = self.rng("longvita/images")
        for spec in IMAGE_SPECS:
            label = f"{spec.width}x{spec.height} grid {spec.grid[0]}x{spec.grid[1]}"
            image, text = _draw_picture(rng, spec.width, spec.height, label)
            _save_image(image, self.root / "longvita/images" / spec.name)
            self.descriptions[f"images/{spec.name}"] = text
            self.images.append(
                {
                    "file": f"longvita/images/{spec.name}",
                    "width": spec.width,
                    "height": spec.height,
                    "grid": list(spec.grid),
                }
            )
        for i in range(1, COMIC_PANELS + 1):
            image, text = _draw_picture(rng, 320, 320, f"panel {i}")
            name = f"images/comic/panel_{i}.png"
            _save_image(image, self.root / "longvita" / name)
            self.descriptions[name] = text
        # bad media
        good = self.root / "longvita/images" / IMAGE_SPECS[7].name
        data = good.read_bytes()
        bad_dir = self.root / "longvita/images/bad"
        bad_dir.mkdir(parents=True, exist_ok=True)
        (bad_dir / "truncated.jpg").write_bytes(data[: len(data) // 3])
        (bad_dir / "bomb.png").write_bytes(_bomb_png(*BOMB_SIZE))

    def llava_images(self) -> None:
        rng = self.rng("llava/images")
        for name, width, height in LLAVA_IMAGE_SIZES:
            image, text = _draw_picture(rng, width, height, name.rsplit("/", 1)[-1])
            _save_image(image, self.root / "llava/images" / name)
            self.descriptions[f"llava:{name}"] = text

    def videos(self) -> list[dict[str, Any]]:
        out = []
        for spec in VIDEO_SPECS:
            _encode_video(self.root / spec.name, spec, self.rng(spec.name))
            out.append(
                {
                    "file": spec.name,
                    "fps": spec.fps,
                    "frames": spec.frames,
                    "seconds": spec.seconds,
                    "width": spec.width,
                    "height": spec.height,
                }
            )
        bad_dir = self.root / "longvita/videos/bad"
        bad_dir.mkdir(parents=True, exist_ok=True)
        data = (self.root / VIDEO_SPECS[1].name).read_bytes()
        (bad_dir / "truncated.mp4").write_bytes(data[: len(data) // 3])
        garbage = self.rng("garbage").integers(0, 256, size=4096, dtype=np.uint8).tobytes()
        (bad_dir / "garbage.mp4").write_bytes(garbage)
        _zero_frame_mp4(bad_dir / "zero_frames.mp4")
        return out

    def frame_dirs(self) -> list[dict[str, Any]]:
        out = []
        for rel, count in FRAME_DIRS:
            rng = self.rng(rel)
            palette = _frame_palette(rng, count)
            directory = self.root / rel
            directory.mkdir(parents=True, exist_ok=True)
            for k in range(count):
                array = _video_frame(palette, k, 1, 160, 120)
                Image.fromarray(array, "RGB").save(directory / f"frame_{k + 1}.jpg", quality=85)
            out.append({"dir": rel, "frames": count})
        (self.root / EMPTY_FRAME_DIR).mkdir(parents=True, exist_ok=True)
        return out

    # --- longvita annotation files -----------------------------------------------------------

    def caption(self, name: str, rng: np.random.Generator) -> str:
        prose = _Prose(rng)
        return (
            f"The picture shows {self.descriptions[name]} on a gradient background. "
            + prose.paragraph(int(rng.integers(1, 4)))
        )

    def image_caption(self) -> list[dict[str, Any]]:
        rng = self.rng("longvita/image_caption")
        rows = []
        for repeat in range(2):
            for k, spec in enumerate(IMAGE_SPECS):
                name = f"images/{spec.name}"
                prompt = _CAPTION_PROMPTS[(k + repeat) % len(_CAPTION_PROMPTS)]
                messages = [
                    _msg("user", f"<image>\n{prompt}"),
                    _msg("assistant", self.caption(name, rng)),
                ]
                if (k + repeat) % 7 == 3:
                    messages.insert(0, _msg("system", "You are a careful image describer."))
                rows.append({"messages": messages, "images": [name], "videos": []})
        _write_jsonl(self.root / "longvita/image_caption.jsonl", rows)
        return rows

    def multi_image(self) -> list[dict[str, Any]]:
        rng = self.rng("longvita/multi_image")
        small = [
            "images/img_1x1_448.jpg",
            "images/img_1x1_tiny.png",
            "images/img_2x1.jpg",
            "images/img_1x2.jpg",
        ] + [f"images/comic/panel_{i}.png" for i in range(1, COMIC_PANELS + 1)]
        rows = []
        for k in range(18):
            count = 2 + k % 2
            picks = [small[int(i)] for i in rng.choice(len(small), size=count, replace=False)]
            tags = "".join(f"Image {i + 1}: <image>\n" for i in range(count))
            answer = " ".join(
                f"Image {i + 1} shows {self.descriptions[p]}." for i, p in enumerate(picks)
            )
            rows.append(
                {
                    "messages": [
                        _msg("user", f"{tags}What is different between these images?"),
                        _msg("assistant", answer),
                    ],
                    "images": picks,
                }
            )
        panels = [f"images/comic/panel_{i}.png" for i in range(1, COMIC_PANELS + 1)]
        for k in range(2):  # Comic-9K style: many panels -> one summary
            prose = _Prose(rng)
            rows.append(
                {
                    "messages": [
                        _msg("user", "<image>" * len(panels) + "\nSummarize this comic."),
                        _msg("assistant", prose.paragraph(6 + k)),
                    ],
                    "images": panels,
                }
            )
        _write_jsonl(self.root / "longvita/multi_image.jsonl", rows)
        return rows

    def video_rows(self, rng: np.random.Generator, refs: Sequence[str], per: int) -> list[dict]:
        prose = _Prose(rng)
        rows = []
        for repeat in range(per):
            for k, ref in enumerate(refs):
                prompt = _VIDEO_PROMPTS[(k + repeat) % len(_VIDEO_PROMPTS)]
                messages = [
                    _msg("user", f"<video>\n{prompt}"),
                    _msg(
                        "assistant",
                        "A white square moves from left to right while the background colour "
                        "changes every second. " + prose.paragraph(2),
                    ),
                ]
                if (k + repeat) % 3 == 0:
                    messages += [
                        _msg("user", "Is there any text in the video?"),
                        _msg("assistant", "Only a small binary code in the top left corner."),
                    ]
                rows.append({"messages": messages, "images": [], "videos": [ref]})
        return rows

    def video_qa(self) -> list[dict[str, Any]]:
        refs = [s.name.removeprefix("longvita/") for s in VIDEO_SPECS[:6]]
        refs += [rel.removeprefix("longvita/") for rel, _ in FRAME_DIRS]
        rows = self.video_rows(self.rng("longvita/video_qa"), refs, 3)
        _write_jsonl(self.root / "longvita/video_qa.jsonl", rows)
        return rows

    def long_video(self) -> list[dict[str, Any]]:
        rng = self.rng("longvita/long_video")
        prose = _Prose(rng)
        movie = VIDEO_SPECS[6].name.removeprefix("longvita/")
        rows = [
            {
                "messages": [
                    _msg("user", "<video>\nSummarize the whole movie."),
                    _msg("assistant", prose.paragraph(12)),
                ],
                "videos": [movie],
            },
            {
                "messages": [
                    _msg("user", "<video>\nWhat happens at the end of the movie?"),
                    _msg("assistant", prose.paragraph(4)),
                ],
                "videos": [movie],
            },
        ]
        _write_jsonl(self.root / "longvita/long_video.jsonl", rows)
        return rows

    def bad_records(self) -> list[Any]:
        rel = "longvita/bad_records.jsonl"
        rng = self.rng(rel)
        good_rows = []
        for k in range(30):
            if k % 5 == 4:
                prose = _Prose(rng)
                good_rows.append(
                    {
                        "messages": [
                            _msg("user", prose.en_sentence() + " Explain."),
                            _msg("assistant", prose.paragraph(3)),
                        ]
                    }
                )
                continue
            spec = IMAGE_SPECS[k % 8]
            name = f"images/{spec.name}"
            good_rows.append(
                {
                    "messages": [
                        _msg("user", "<image>\n" + _CAPTION_PROMPTS[k % 5]),
                        _msg("assistant", self.caption(name, rng)),
                    ],
                    "images": [name],
                }
            )

        def caption(images: list[str], *, videos: list[str] | None = None) -> dict[str, Any]:
            tag = "<video>" if videos else "<image>"
            row: dict[str, Any] = {
                "messages": [
                    _msg("user", f"{tag}\nDescribe it."),
                    _msg("assistant", "Something is shown."),
                ],
                "images": images,
            }
            if videos:
                row["videos"] = videos
            return row

        ok = [_msg("user", "Hi"), _msg("assistant", "Hello.")]
        bad: list[tuple[str, Any]] = [
            ("malformed_json", b'{"messages": [{"role": "user", "content": "broken'),
            ("messages_not_list", {"messages": "user: hi / assistant: hello"}),
            (
                "content_not_string",
                {"messages": [_msg("user", "Count."), {"role": "assistant", "content": 42}]},
            ),
            ("images_not_strings", {"messages": ok, "images": 7}),
            ("unknown_role", {"messages": [_msg("robot", "beep"), _msg("assistant", "boop")]}),
            ("empty_conversation", {"messages": [], "images": []}),
            ("no_assistant_turn", {"messages": [_msg("user", "Anyone there?")]}),
            (
                "image_tag_mismatch",
                {
                    "messages": [
                        _msg("user", "<image>\n<image>\nCompare."),
                        _msg("assistant", "They differ."),
                    ],
                    "images": ["images/img_1x1_448.jpg"],
                },
            ),
            (
                "video_tag_mismatch",
                {"messages": [_msg("user", "<video>\nWhat happens?"), _msg("assistant", "Ok.")]},
            ),
            ("path_escape_dotdot", caption(["../llava/images/sam/sa_10001.jpg"])),
            ("path_escape_absolute", caption(["/tmp/lvita_demo_absolute.jpg"])),
            ("missing_media", caption(["images/missing_0001.jpg"])),
            ("corrupt_image", caption(["images/bad/truncated.jpg"])),
            ("decompression_bomb", caption(["images/bad/bomb.png"])),
            ("truncated_video", caption([], videos=["videos/bad/truncated.mp4"])),
            ("garbage_video", caption([], videos=["videos/bad/garbage.mp4"])),
            ("zero_frame_video", caption([], videos=["videos/bad/zero_frames.mp4"])),
            ("empty_frame_dir", caption([], videos=["frames/empty_clip"])),
        ]
        assert [kind for kind, _ in bad] == list(BAD_KINDS)
        rows: list[Any] = []
        good = iter(good_rows)
        for number, (kind, row) in enumerate(bad):
            rows += [next(good) for _ in range(1 + number % 2)]  # 1 or 2 good rows, then a bad
            self.mark_bad(rel, len(rows), kind, BAD_KINDS[kind])
            rows.append(row)
        rows.extend(good)
        _write_jsonl(self.root / rel, rows)
        return rows

    # --- llava -------------------------------------------------------------------------------

    def sharegpt4v(self) -> list[dict[str, Any]]:
        rel = "llava/sharegpt4v.json"
        rng = self.rng(rel)
        prose = _Prose(rng)
        rows = []
        for k in range(30):
            name, width, height = LLAVA_IMAGE_SIZES[k % len(LLAVA_IMAGE_SIZES)]
            prompt = _CAPTION_PROMPTS[k % len(_CAPTION_PROMPTS)]
            human = f"<image>\n{prompt}" if k % 2 == 0 else prompt  # odd rows: tag inserted
            caption = (
                f"This {width}x{height} image shows {self.descriptions['llava:' + name]}. "
                + prose.paragraph(int(rng.integers(4, 10)))
            )
            rows.append(
                {
                    "id": f"sharegpt4v_{k:04d}",
                    "image": name,
                    "conversations": [_conv("human", human), _conv("gpt", caption)],
                }
            )
        rows[13]["conversations"][1]["from"] = "bot"
        self.mark_bad(rel, 13, "unknown_role", "unknown_role")
        path = self.root / rel
        path.write_bytes(orjson.dumps(rows, option=orjson.OPT_INDENT_2))
        return rows

    def llava_video(self) -> list[Any]:
        rel = "llava/llava_video_178k.jsonl"
        rng = self.rng(rel)
        prose = _Prose(rng)
        videos = [s.name.removeprefix("llava/videos/") for s in VIDEO_SPECS[7:]]
        rows: list[Any] = []
        for k in range(20):
            video = videos[k % len(videos)]
            prompt = _VIDEO_PROMPTS[k % len(_VIDEO_PROMPTS)]
            if k % 7 == 5:
                first = f"<video>\n{prompt}"
            elif k % 7 == 6:
                first = prompt  # no tag: <video> is inserted
            else:
                first = f"<image>\n{prompt}"  # LLaVA-Video-178K writes <image> for the video
            conversations = [_conv("human", first), _conv("gpt", prose.paragraph(3))]
            for _ in range(k % 3):
                conversations += [
                    _conv("human", prose.en_sentence().rstrip(".") + "?"),
                    _conv("gpt", prose.paragraph(2)),
                ]
            rows.append(
                {
                    "id": f"llava_video_{k:04d}",
                    "conversations": conversations,
                    "data_source": video.split("/", 1)[0],
                    "video": video,
                }
            )
        rows.insert(9, b'{"id": "llava_video_bad", "conversations": [{"from": "human", "value"')
        self.mark_bad(rel, 9, "malformed_json", "malformed_json")
        _write_jsonl(self.root / rel, rows)
        return rows

    # --- parquet -----------------------------------------------------------------------------

    def cauldron(self) -> int:
        rel = "cauldron/chartqa-00000-of-00001.parquet"
        rng = self.rng(rel)
        sizes = [(640, 480), (600, 400), (448, 448), (800, 400), (512, 512), (400, 600)]
        images_col, texts_col = [], []
        for k in range(24):
            count = 2 if k % 8 == 5 else 1
            charts = []
            for j in range(count):  # two-chart rows use small charts (1x1 grids)
                width, height = sizes[k % len(sizes)] if count == 1 else (448 + 64 * j, 448)
                image, data = _chart(rng, width, height)
                charts.append((image, data))
            images_col.append(
                [{"bytes": _image_bytes(img, "PNG"), "path": None} for img, _ in charts]
            )
            labels, values = charts[0][1]["labels"], charts[0][1]["values"]
            best = labels[int(np.argmax(values))]
            texts = [
                {
                    "user": "Which bar is the tallest?",
                    "assistant": f"Bar {best} is the tallest.",
                    "source": "chartqa",
                }
            ]
            for _ in range(k % 3):
                i = int(rng.integers(len(labels)))
                texts.append(
                    {
                        "user": f"What is the value of bar {labels[i]}?",
                        "assistant": str(values[i]),
                        "source": "chartqa",
                    }
                )
            if count == 2:
                texts[0]["user"] = "Which of the two charts has more bars?"
                more = "first" if len(labels) >= len(charts[1][1]["labels"]) else "second"
                texts[0]["assistant"] = f"The {more} chart."
            texts_col.append(texts)
        images_col[17] = [images_col[17][0], None]  # a null image in the list
        self.mark_bad(rel, 17, "null_image", "bad_field_type")
        image_struct = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
        text_struct = pa.struct(
            [("user", pa.string()), ("assistant", pa.string()), ("source", pa.string())]
        )
        table = pa.table(
            {
                "images": pa.array(images_col, type=pa.list_(image_struct)),
                "texts": pa.array(texts_col, type=pa.list_(text_struct)),
            }
        )
        path = self.root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(table, path, row_group_size=8)
        return table.num_rows

    def onevision(self) -> int:
        rel = "onevision/ov-00000-of-00001.parquet"
        rng = self.rng(rel)
        prose = _Prose(rng)
        sizes = [(448, 448), (800, 300), (600, 800), (1024, 512), (320, 240), (700, 700)]
        ids, images, conversations, sources = [], [], [], []
        for k in range(24):
            ids.append(f"ov_demo_{k:05d}")
            if k % 8 == 3:  # text-only row
                images.append(None)
                question = prose.en_sentence().rstrip(".") + "?"
                conversations.append([_conv("human", question), _conv("gpt", prose.paragraph(3))])
                sources.append("magpie_demo")
                continue
            width, height = sizes[k % len(sizes)]
            image, text = _document(rng, prose, width, height)
            images.append({"bytes": _image_bytes(image, "JPEG"), "path": f"ov_{k:05d}.jpg"})
            tag = "" if k % 8 == 6 else "<image>\n"  # no tag: inserted on read
            conversations.append(
                [
                    _conv("human", f"{tag}What text is written in the image?"),
                    _conv("gpt", text),
                ]
            )
            sources.append("synthdog_demo")
        images[20] = None
        self.mark_bad(rel, 20, "null_image_with_tag", "tag_mismatch")
        image_struct = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
        conv_struct = pa.struct([("from", pa.string()), ("value", pa.string())])
        table = pa.table(
            {
                "id": pa.array(ids, type=pa.string()),
                "image": pa.array(images, type=image_struct),
                "conversations": pa.array(conversations, type=pa.list_(conv_struct)),
                "data_source": pa.array(sources, type=pa.string()),
            }
        )
        path = self.root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(table, path, row_group_size=8)
        return table.num_rows

    # --- text --------------------------------------------------------------------------------

    def long_alpaca(self) -> list[dict[str, Any]]:
        rel = "text/long_alpaca.jsonl"
        rng = self.rng(rel)
        prose = _Prose(rng)
        rows = []
        for k in range(16):
            zh = k % 4 == 3
            chars = int(rng.integers(3000, 8000)) if zh else int(rng.integers(10000, 40000))
            document = prose.text(chars, zh=zh)
            instruction = (
                "请总结下面的文章。" if zh else "Summarize the following document in a paragraph."
            )
            rows.append(
                {
                    "instruction": instruction,
                    "input": document,
                    "output": prose.paragraph(5, zh=zh),
                }
            )
        huge = prose.text(HUGE_TEXT_CHARS // 2, numbers=True) + "\n\n"
        huge += prose.text(HUGE_TEXT_CHARS - len(huge), zh=True)
        rows.insert(
            7,
            {
                "instruction": "Answer the final question about this very long record.",
                "input": huge + "\n\nWhich river was described first?",
                "output": "The first river described is a quiet one.",
            },
        )
        self.mark_bad(rel, 7, "too_long", "too_long")
        _write_jsonl(self.root / rel, rows)
        return rows

    def long_messages(self) -> list[dict[str, Any]]:
        rel = "text/long_messages.jsonl"
        rng = self.rng(rel)
        prose = _Prose(rng)
        rows = []
        for k in range(16):
            zh = k % 5 == 2
            chars = int(rng.integers(2000, 6000)) if zh else int(rng.integers(8000, 30000))
            messages = []
            if k % 4 == 0:
                messages.append(_msg("system", "You are a helpful assistant for long documents."))
            messages += [
                _msg("user", prose.text(chars, zh=zh) + "\n\nWhat is the main topic?"),
                _msg("assistant", prose.paragraph(4, zh=zh)),
                _msg("user", "Give more details."),
                _msg("assistant", prose.text(chars // 6, zh=zh)),
            ]
            rows.append({"messages": messages})
        _write_jsonl(self.root / rel, rows)
        return rows

    def short_chat(self) -> list[dict[str, Any]]:
        rel = "text/short_chat.jsonl"
        rng = self.rng(rel)
        prose = _Prose(rng)
        rows = []
        for k in range(30):
            zh = k % 6 == 5
            question = prose.zh_sentence() if zh else prose.en_sentence().rstrip(".") + "?"
            rows.append(
                {
                    "messages": [
                        _msg("user", question),
                        _msg("assistant", prose.paragraph(int(rng.integers(1, 5)), zh=zh)),
                    ]
                }
            )
        _write_jsonl(self.root / rel, rows)
        return rows


def _files(root: Path) -> Iterator[Path]:
    for directory, _, names in sorted(os.walk(root)):
        for name in sorted(names):
            yield Path(directory) / name


def make_demo_corpus(root: str | os.PathLike[str], *, seed: int = 0) -> dict[str, Any]:
    """Write the demo corpus under `root` (created if needed); returns a summary.

    The summary has ``root``, ``seed``, ``files`` (relative path -> bytes), ``total_bytes``,
    ``rows`` (annotation file -> number of rows), ``images`` (file, width, height, intended grid),
    ``videos`` (file, fps, frames, seconds, width, height), ``frame_dirs`` and ``bad`` (file, row,
    kind, expected reject reason) for every deliberately bad record.
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    builder = _Builder(root, seed)
    builder.longvita_images()
    builder.llava_images()
    videos = builder.videos()
    frame_dirs = builder.frame_dirs()
    rows = {
        "longvita/image_caption.jsonl": len(builder.image_caption()),
        "longvita/multi_image.jsonl": len(builder.multi_image()),
        "longvita/video_qa.jsonl": len(builder.video_qa()),
        "longvita/long_video.jsonl": len(builder.long_video()),
        "longvita/bad_records.jsonl": len(builder.bad_records()),
        "llava/sharegpt4v.json": len(builder.sharegpt4v()),
        "llava/llava_video_178k.jsonl": len(builder.llava_video()),
        "cauldron/chartqa-00000-of-00001.parquet": builder.cauldron(),
        "onevision/ov-00000-of-00001.parquet": builder.onevision(),
        "text/long_alpaca.jsonl": len(builder.long_alpaca()),
        "text/long_messages.jsonl": len(builder.long_messages()),
        "text/short_chat.jsonl": len(builder.short_chat()),
    }
    files = {str(p.relative_to(root)): p.stat().st_size for p in _files(root)}
    return {
        "root": str(root.resolve()),
        "seed": seed,
        "files": files,
        "total_bytes": sum(files.values()),
        "rows": rows,
        "images": builder.images,
        "videos": videos,
        "frame_dirs": frame_dirs,
        "bad": sorted(builder.bad, key=lambda b: (b["file"], b["row"])),
    }


__all__ = [
    "BAD_KINDS",
    "FRAME_DIRS",
    "IMAGE_SPECS",
    "VIDEO_SPECS",
    "ImageSpec",
    "VideoSpec",
    "make_demo_corpus",
]
