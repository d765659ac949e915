"""`lvita show` in a terminal: a `PackView` as text, with or without ANSI colours.

Every line fits `TERMINAL_WIDTH` columns (wide CJK characters count two). A summary header
(build, shard, key, pack index, T, real tokens, padding, documents, tiles) is followed by each
document: a header (boundaries, dataset, record, file, tokens per part) and its segments, one
block each, behind a gutter that names the segment (``masked``, ``trained``, ``vision``,
``padding``), so the label mask reads without colours too. Text is shown as decoded, special
tokens verbatim, each newline as ``↵`` and a line break; control characters and bidi controls
of the (untrusted) data are written as escapes (`lvita_data.show.model.visible`). A media block
is one marker, e.g. ``[image 1: 2x2 grid + thumbnail, 5 tiles, 1,292 tokens]``.
"""

from __future__ import annotations

import unicodedata

from lvita_data.show.model import Document, PackView, Segment, visible

TERMINAL_WIDTH = 120
GUTTER = 8
"""Width of the segment name column (then `` │ ``)."""
NEWLINE = "↵"
SOFT_WRAP = 24
"""A long row breaks after a space found in its last this many columns."""
STYLES = {
    "masked": "90",
    "trained": "32",
    "vision": "36",
    "padding": "90",
    "special": "1;35",
    "header": "1",
    "warning": "1;31",
}
"""ANSI SGR codes of each part."""

Chunk = tuple[str, str]
"""(text, style name)"""


def format_pack(view: PackView, *, color: bool = False, width: int = TERMINAL_WIDTH) -> str:
    """The whole pack as terminal text (ANSI colours with `color`)."""
    lines = _summary(view, color, width)
    for document in view.documents:
        lines.append("")
        lines += _document(document, len(view.documents), color, width)
    return "\n".join(lines)


def _summary(view: PackView, color: bool, width: int) -> list[str]:
    fill = view.real_tokens / view.seq_len if view.seq_len else 0.0
    count = len(view.documents)
    lines = [
        f"build {view.build} · shard {view.shard} · key {view.key} · pack {view.pack_index} "
        f"(of {view.num_packs})",
        f"T {view.seq_len:,} tokens: {view.real_tokens:,} real ({fill:.2%}), {view.padding:,} "
        f"padding · {count} document{'s' if count != 1 else ''} · {view.num_tiles} tiles",
        "gutter: masked = label -100 (not trained), trained = supervised, vision = one image or "
        f"video block, padding; special tokens verbatim, {NEWLINE} = newline",
    ]
    out = []
    for number, line in enumerate(lines):
        style = "header" if number < 2 else "masked"
        out += [_paint([(row, style)], color) for row in _wrap_plain(visible(line), width)]
    return out


def _document(document: Document, count: int, color: bool, width: int) -> list[str]:
    counts = document.counts
    title = (
        f"━━ document {document.number + 1} of {count} · tokens [{document.start:,}, "
        f"{document.stop:,}) · {document.dataset} · record {document.record} · {document.file}"
    )
    tiles = counts["tiles"]
    tiles_text = f" ({tiles} tile{'s' if tiles != 1 else ''})" if tiles else ""
    parts = (
        f"   {document.stop - document.start:,} tokens = {counts['trained']:,} trained + "
        f"{counts['masked']:,} masked + {counts['vision']:,} vision{tiles_text} + "
        f"{counts['padding']:,} padding"
    )
    lines = [_paint([(row, "header")], color) for row in _wrap_plain(visible(title), width)]
    lines += [_paint([(row, "masked")], color) for row in _wrap_plain(parts, width)]
    for segment in document.segments:
        lines += _segment(segment, color, width)
    return lines


def segment_name(segment: Segment) -> str:
    """The gutter name: ``masked`` / ``trained`` for text, else the kind's part."""
    if segment.kind == "text":
        return "masked" if segment.masked else "trained"
    return "padding" if segment.kind == "padding" else "vision"


def _segment(segment: Segment, color: bool, width: int) -> list[str]:
    name = segment_name(segment)
    if segment.kind == "text":
        chunks = [
            (visible(text).replace("\n", NEWLINE + "\n"), "special" if special else name)
            for text, special in segment.pieces
        ]
    else:
        chunks = [(f"[{segment.label}]", name)]
        if segment.supervised:
            chunks.append((f" (!) {segment.supervised} supervised token(s)", "warning"))
    rows = _wrap(chunks, width - GUTTER - 3)
    if len(rows) > 1 and not rows[-1]:
        rows.pop()  # the text ended with a newline
    out = []
    for number, row in enumerate(rows):
        gutter = name.rjust(GUTTER) if number == 0 else " " * GUTTER
        out.append(_paint([(gutter, name), (" │ ", "masked")], color) + _paint(row, color))
    return out


def char_width(char: str) -> int:
    """Terminal columns of one character: 2 for wide East Asian, 0 for combining marks."""
    if unicodedata.combining(char):
        return 0
    return 2 if unicodedata.east_asian_width(char) in ("W", "F") else 1


def _wrap(chunks: list[Chunk], width: int) -> list[list[Chunk]]:
    """Styled chunks cut into rows at each newline and at `width` columns: after the row's last
    space when it is in its last `SOFT_WRAP` columns, else anywhere. Every character is kept,
    whitespace included."""
    rows: list[list[tuple[str, str]]] = [[]]
    used = 0
    for text, style in chunks:
        for char in text:
            if char == "\n":
                rows.append([])
                used = 0
                continue
            size = char_width(char)
            if used + size > width:
                row = rows[-1]
                cut = _soft_cut(row)
                rows[-1], carried = row[:cut], row[cut:]
                rows.append(carried)
                used = sum(char_width(c) for c, _ in carried)
            rows[-1].append((char, style))
            used += size
    return [_chunks(row) for row in rows]


def _soft_cut(row: list[tuple[str, str]]) -> int:
    """Where a full row breaks: after its last space within `SOFT_WRAP` characters of its
    end, else at its end."""
    for i in range(len(row) - 1, max(len(row) - SOFT_WRAP, 0), -1):
        if row[i][0] == " ":
            return i + 1
    return len(row)


def _chunks(row: list[tuple[str, str]]) -> list[Chunk]:
    """Characters of one style joined into one chunk."""
    out: list[Chunk] = []
    for char, style in row:
        if out and out[-1][1] == style:
            out[-1] = (out[-1][0] + char, style)
        else:
            out.append((char, style))
    return out


def _wrap_plain(text: str, width: int) -> list[str]:
    return ["".join(t for t, _ in row) for row in _wrap([(text, "")], width)]


def _paint(chunks: list[Chunk], color: bool) -> str:
    if not color:
        return "".join(text for text, _ in chunks)
    return "".join(f"\x1b[{STYLES[s]}m{t}\x1b[0m" if s in STYLES else t for t, s in chunks)
