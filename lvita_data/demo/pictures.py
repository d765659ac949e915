"""Pillow pictures for the demo corpus: shapes, bar charts, text pages, a bad JPEG, a bomb PNG.

Writes ``longvita/images`` (with ``comic/`` and ``bad/``) and ``llava/images``. Deterministic:
shapes and colours come from the part's generator; PNG and JPEG use fixed encoder options.
"""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from lvita_data.demo.builder import Builder
from lvita_data.demo.prose import Prose
from lvita_data.demo.specs import BOMB_SIZE, COMIC_PANELS, IMAGE_SPECS, LLAVA_IMAGE_SIZES

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


def _draw_shape(
    draw: ImageDraw.ImageDraw, rng: np.random.Generator, width: int, height: int
) -> str:
    """One random shape in one of the named colours; returns e.g. ``"a red ellipse"``."""
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
    return f"a {color} {kind}"


def draw_picture(
    rng: np.random.Generator, width: int, height: int, label: str
) -> tuple[Image.Image, str]:
    """A picture of a few coloured shapes and a label; returns (image, description)."""
    image = Image.fromarray(_gradient(rng, width, height), "RGB")
    draw = ImageDraw.Draw(image)
    shapes = [_draw_shape(draw, rng, width, height) for _ in range(int(rng.integers(3, 7)))]
    size = max(8, min(width, height) // 10)
    draw.text((size // 2, size // 2), label, fill=(0, 0, 0), font=_font(size))
    description = ", ".join(shapes[:-1]) + f" and {shapes[-1]}" if len(shapes) > 1 else shapes[0]
    return image, description


def draw_chart(rng: np.random.Generator, width: int, height: int) -> tuple[Image.Image, dict]:
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


def draw_document(
    rng: np.random.Generator, prose: Prose, width: int, height: int
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


def save_image(image: Image.Image, path: Path) -> None:
    """PNG or JPEG by the file's suffix, with fixed encoder options."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".png":
        image.save(path, format="PNG", optimize=False, compress_level=6)
    else:
        image.save(path, format="JPEG", quality=85, subsampling=2)


def image_bytes(image: Image.Image, fmt: str) -> bytes:
    """The encoded image (``"PNG"`` or JPEG), for parquet image columns."""
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


def bomb_png(width: int, height: int) -> bytes:
    """A tiny PNG whose header claims width x height 1-bit pixels (the data is one row only)."""
    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    row = b"\x00" + b"\x00" * ((width + 7) // 8)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", header)
        + _png_chunk(b"IDAT", zlib.compress(row, 9))
        + _png_chunk(b"IEND", b"")
    )


def write_longvita_images(builder: Builder) -> None:
    """``longvita/images``: every IMAGE_SPECS size, the comic panels, then the bad images."""
    rng = builder.rng("longvita/images")
    for spec in IMAGE_SPECS:
        label = f"{spec.width}x{spec.height} grid {spec.grid[0]}x{spec.grid[1]}"
        image, text = draw_picture(rng, spec.width, spec.height, label)
        save_image(image, builder.root / "longvita/images" / spec.name)
        builder.descriptions[f"images/{spec.name}"] = text
        builder.images.append(
            {
                "file": f"longvita/images/{spec.name}",
                "width": spec.width,
                "height": spec.height,
                "grid": list(spec.grid),
            }
        )
    for i in range(1, COMIC_PANELS + 1):
        image, text = draw_picture(rng, 320, 320, f"panel {i}")
        name = f"images/comic/panel_{i}.png"
        save_image(image, builder.root / "longvita" / name)
        builder.descriptions[name] = text
    _write_bad_images(builder.root / "longvita/images")


def _write_bad_images(images: Path) -> None:
    """``bad/truncated.jpg`` (a third of a good JPEG) and ``bad/bomb.png``."""
    data = (images / IMAGE_SPECS[7].name).read_bytes()
    bad_dir = images / "bad"
    bad_dir.mkdir(parents=True, exist_ok=True)
    (bad_dir / "truncated.jpg").write_bytes(data[: len(data) // 3])
    (bad_dir / "bomb.png").write_bytes(bomb_png(*BOMB_SIZE))


def write_llava_images(builder: Builder) -> None:
    """``llava/images``: COCO- and SAM-named pictures of LLAVA_IMAGE_SIZES."""
    rng = builder.rng("llava/images")
    for name, width, height in LLAVA_IMAGE_SIZES:
        image, text = draw_picture(rng, width, height, name.rsplit("/", 1)[-1])
        save_image(image, builder.root / "llava/images" / name)
        builder.descriptions[f"llava:{name}"] = text
