"""`lvita show --html FILE`: one packed sequence as a self-contained HTML page.

The page holds the pack's summary, then each document: its boundaries, dataset, file and record,
its tokens per part, and its segments in order. Text is shown as decoded (special tokens
verbatim and marked), label-masked spans and trained spans styled apart; each image or video
block is drawn where its placeholder tokens are: the marker (``image 1: 2x2 grid + thumbnail,
5 tiles, 1,292 tokens``), the thumbnail, then the tiles in their grid (cols x rows), or the
frames in order. Tiles are the loader's pixels, halved to `TILE_PX` and inlined as PNG data
URIs. No script, no external reference; every string from the data is escaped (the data is
untrusted), control and bidi characters written as escapes. The same pack gives the same bytes.
"""

from __future__ import annotations

import base64
import io
import os
from html import escape
from pathlib import Path

import numpy as np
from PIL import Image

from lvita_data.errors import ShowError
from lvita_data.fileio import write_text_atomic
from lvita_data.show.model import Document, PackView, Segment, visible
from lvita_data.show.text import segment_name

TILE_PX = 224
"""Side of a drawn tile (the model's 448 halved)."""

CSS = """
body { font-family: "DejaVu Sans", Arial, sans-serif; margin: 24px; color: #222;
       background: #fff; }
h1 { font-size: 21px; margin: 0 0 4px 0; }
h2 { font-size: 16px; margin: 0 0 6px 0; }
.sub, .counts { color: #555; margin: 4px 0 10px 0; }
.legend span { margin-right: 10px; padding: 1px 6px; }
.doc { border: 1px solid #ccc; border-radius: 6px; padding: 10px 14px; margin: 18px 0; }
.src th { text-align: left; color: #666; font-weight: normal; padding-right: 12px; }
.src td { font-family: "DejaVu Sans Mono", monospace; word-break: break-all; }
.seq { font-family: "DejaVu Sans Mono", monospace; font-size: 13px; white-space: pre-wrap;
       word-break: break-word; line-height: 1.5; }
.masked { color: #666; background: #eeeeee; }
.trained { color: #0b5d1e; background: #d7f5dd; }
.special { font-weight: bold; color: #7b2c9e; }
.padding { color: #888; font-style: italic; background: #f6f6f6; }
.media { display: block; margin: 6px 0; padding: 6px; border: 2px solid #1f6fb4;
         border-radius: 4px; background: #f1f7fd; white-space: normal; }
.media figcaption { color: #1f6fb4; font-weight: bold; margin-bottom: 4px; }
.tiles { display: grid; gap: 3px; margin-top: 4px; }
.frames { display: flex; flex-wrap: wrap; gap: 3px; }
.media img { display: block; border: 1px solid #999; }
.thumb { margin-bottom: 4px; }
.note { color: #b00; font-weight: bold; }
"""


def render_html(view: PackView, tiles: np.ndarray | None = None) -> str:
    """The page of `view`; `tiles` uint8 [N, 448, 448, 3] are drawn (None: markers only)."""
    fill = view.real_tokens / view.seq_len if view.seq_len else 0.0
    count = len(view.documents)
    head = (
        f"<h1>Pack {view.pack_index} (key {_e(view.key)}) of {view.num_packs}</h1>\n"
        f'<div class="sub">build {_e(view.build)} · shard {_e(view.shard)} · T '
        f"{view.seq_len:,} tokens: {view.real_tokens:,} real ({fill:.2%}), {view.padding:,} "
        f"padding · {count} document{'s' if count != 1 else ''} · {view.num_tiles} tiles</div>\n"
        '<div class="legend"><span class="masked">masked (label -100)</span>'
        '<span class="trained">trained</span><span class="special">special token</span>'
        '<span class="padding">padding</span></div>\n'
    )
    body = [head] + [_document(d, count, tiles) for d in view.documents]
    title = f"lvita show: pack {view.pack_index} of {view.build}"
    return (
        '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        f"<title>{_e(title)}</title>\n<style>{CSS}</style>\n</head>\n<body>\n"
        + "".join(body)
        + "</body>\n</html>\n"
    )


def write_html(view: PackView, tiles: np.ndarray | None, path: str | os.PathLike[str]) -> None:
    """`render_html` written atomically to `path` (its directory made if missing).

    Raises:
        ShowError: `path` cannot be written.
    """
    text = render_html(view, tiles)
    try:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(path, text)
    except OSError as error:
        raise ShowError(f"cannot write {path}: {error.strerror or error}") from None


def _e(text: object) -> str:
    """Escaped text of the data: markup, control and bidi characters."""
    return escape(visible(str(text), keep=("\n", "\t")), quote=True)


def _document(document: Document, count: int, tiles: np.ndarray | None) -> str:
    counts = document.counts
    noun = "tile" if counts["tiles"] == 1 else "tiles"
    tiles_text = f" ({counts['tiles']} {noun})" if counts["tiles"] else ""
    rows = "".join(
        f"<tr><th>{name}</th><td>{_e(value)}</td></tr>"
        for name, value in (
            ("dataset", document.dataset),
            ("file", document.file),
            ("record", document.record),
        )
    )
    segments = "".join(_segment(segment, tiles) for segment in document.segments)
    return (
        f'<section class="doc">\n<h2>Document {document.number + 1} of {count} · tokens '
        f"[{document.start:,}, {document.stop:,})</h2>\n"
        f'<table class="src">{rows}</table>\n'
        f'<div class="counts">{document.stop - document.start:,} tokens = '
        f"{counts['trained']:,} trained + {counts['masked']:,} masked + {counts['vision']:,} "
        f"vision{tiles_text} + {counts['padding']:,} padding</div>\n"
        f'<div class="seq">{segments}</div>\n</section>\n'
    )


def _segment(segment: Segment, tiles: np.ndarray | None) -> str:
    name = segment_name(segment)
    note = (
        f' <span class="note">(!) {segment.supervised} supervised token(s)</span>'
        if segment.supervised
        else ""
    )
    if segment.kind == "text":
        inner = "".join(
            f'<span class="special">{_e(text)}</span>' if special else _e(text)
            for text, special in segment.pieces
        )
        return (
            f'<span class="{name}" title="tokens [{segment.start}, {segment.stop})">{inner}</span>'
        )
    if segment.kind == "padding":
        return f'<span class="padding">[{_e(segment.label)}]</span>{note}'
    caption = f"<figcaption>[{_e(segment.label)}]{note}</figcaption>"
    return f'<figure class="media {segment.kind}">{caption}{_media(segment, tiles)}</figure>'


def _media(segment: Segment, tiles: np.ndarray | None) -> str:
    """The tiles of an image (thumbnail, then the grid) or the frames of a video."""
    if tiles is None:
        return ""
    images = [_img(tiles[t], f"tile {t} of the pack") for t in segment.tiles]
    if segment.kind == "video":
        return f'<div class="frames">{"".join(images)}</div>'
    if len(images) == 1:
        return images[0]
    cols = segment.grid[0] if segment.grid else len(images) - 1
    return (
        f'<div class="thumb">{images[0]}</div>'
        f'<div class="tiles" style="grid-template-columns: repeat({cols}, {TILE_PX}px)">'
        f"{''.join(images[1:])}</div>"
    )


def tile_png(tile: np.ndarray) -> bytes:
    """PNG bytes of one uint8 [448, 448, 3] tile halved to `TILE_PX`."""
    image = Image.fromarray(np.ascontiguousarray(tile), "RGB")
    image = image.reduce(max(1, image.width // TILE_PX))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", optimize=False, compress_level=6)
    return buffer.getvalue()


def _img(tile: np.ndarray, alt: str) -> str:
    data = base64.b64encode(tile_png(tile)).decode("ascii")
    return (
        f'<img src="data:image/png;base64,{data}" width="{TILE_PX}" height="{TILE_PX}" '
        f'alt="{alt}" title="{alt}">'
    )
