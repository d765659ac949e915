"""One packed sequence as the model sees it: documents, their segments and token counts (pure).

A pack of T tokens holds n documents (packed samples) at the boundaries ``cu_seqlens``; the
meta.json of the pack names each document's dataset, file and record, its real ``length``
(the rest of its segment is padding: pack alignment, or the pack's tail for the last one) and
its media in placeholder order (``media_order``). `describe_pack` cuts every document into
`Segment`s that tile it exactly, in order:

- ``image`` / ``video``: one media block, collapsed to a marker. A block runs from the opening
  token of its first tile to the closing token of its last (``<img>`` ... ``</img>``, the rows'
  ``"\\n"`` and ``<patch>`` ... ``</patch>``; ``<vid>`` ... ``</vid>`` per frame), e.g.
  ``[image 1: 3x2 grid + thumbnail, 7 tiles, 1,808 tokens]``: 258 (thumbnail) + rows + 258 *
  cols * rows tokens (Long-VITA's layout). Its tiles are the pack's tile numbers (placeholder
  order), so a renderer draws them where the tokens are.
- ``text``: a run of tokens that are all supervised (label = the input id, ``masked`` False) or
  all label-masked (``IGNORE_INDEX``), decoded with the build's tokenizer. The run is split
  further into pieces of special tokens (``<|im_start|>``, ...; shown verbatim) and plain text.
- ``padding``: the tokens after the document's ``length`` up to its boundary.

Decoding piece by piece gives the same text as decoding the document at once: pieces end at
turn boundaries, media blocks and special tokens, which the template tokenizes apart, so no
UTF-8 character straddles two pieces (tested on the demo builds).

Counts per document (`Document.counts`): ``trained`` + ``masked`` (text tokens) + ``vision``
(media blocks) + ``padding`` = its segment of ``cu_seqlens``; summed over documents, T.
"""

from __future__ import annotations

import unicodedata
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass

import numpy as np

from lvita_data.schema import IGNORE_INDEX
from lvita_data.shards.format import FORMAT_TILES, media_order

Decode = Callable[[Sequence[int]], str]
"""Text of token ids, special tokens kept (``LongVitaTokenizer.decode``)."""

KINDS = ("text", "image", "video", "padding")


@dataclass(frozen=True, slots=True)
class Segment:
    """A run of a document's tokens, positions [start, stop) within the pack."""

    kind: str
    """One of `KINDS`."""
    start: int
    stop: int
    masked: bool
    """Every label is ``IGNORE_INDEX`` (text: the run's one state; media and padding: True
    unless `supervised` > 0)."""
    pieces: tuple[tuple[str, bool], ...] = ()
    """Text: (decoded text, is a run of special tokens), in order."""
    label: str = ""
    """Media and padding: the marker, e.g. ``image 1: 2x2 grid + thumbnail, 5 tiles, ...``."""
    tiles: tuple[int, ...] = ()
    """Media: the pack's tile numbers (placeholder order; an image's thumbnail first)."""
    grid: tuple[int, int] | None = None
    """Image: (cols, rows) of its tiles."""
    supervised: int = 0
    """Media and padding: tokens with a label other than ``IGNORE_INDEX`` (0 per the template)."""

    @property
    def num_tokens(self) -> int:
        return self.stop - self.start

    @property
    def text(self) -> str:
        return "".join(text for text, _ in self.pieces)


@dataclass(frozen=True, slots=True)
class Document:
    """One packed sample: its boundary [start, stop) in ``cu_seqlens``, source and segments."""

    number: int
    start: int
    stop: int
    length: int
    """Real tokens (the rest of [start, stop) is padding)."""
    dataset: str
    file: str
    record: str
    segments: tuple[Segment, ...]

    @property
    def counts(self) -> dict[str, int]:
        """Tokens per part (trained, masked, vision, padding: they sum to stop - start) and
        the number of vision tiles."""
        out = dict.fromkeys(("trained", "masked", "vision", "padding", "tiles"), 0)
        for segment in self.segments:
            if segment.kind == "text":
                out["masked" if segment.masked else "trained"] += segment.num_tokens
            elif segment.kind == "padding":
                out["padding"] += segment.num_tokens
            else:
                out["vision"] += segment.num_tokens
                out["tiles"] += len(segment.tiles)
        return out


@dataclass(frozen=True, slots=True)
class PackView:
    """A pack as `describe_pack` cut it, with where it comes from."""

    build: str
    shard: str
    key: str
    pack_index: int
    num_packs: int
    seq_len: int
    documents: tuple[Document, ...]

    @property
    def real_tokens(self) -> int:
        return sum(d.length for d in self.documents)

    @property
    def padding(self) -> int:
        return self.seq_len - self.real_tokens

    @property
    def num_tiles(self) -> int:
        return sum(d.counts["tiles"] for d in self.documents)


@dataclass(frozen=True, slots=True)
class VisionIds:
    """Token ids the segmentation needs: the placeholders' wrappers and the special tokens."""

    wrappers: frozenset[int]
    """``<img> </img> <patch> </patch> <vid> </vid>``: a media block's first and last tokens."""
    specials: frozenset[int]
    """Every added / special token id (shown as a special piece)."""


def describe_pack(
    input_ids: np.ndarray,
    labels: np.ndarray,
    cu_seqlens: np.ndarray,
    meta: dict,
    placeholders: np.ndarray,
    *,
    decode: Decode,
    ids: VisionIds,
) -> tuple[Document, ...]:
    """Cut a checked pack (`lvita_data.loader.pack.Pack`) into documents and segments.

    Args:
        input_ids, labels: int32 [T] of the pack.
        cu_seqlens: int32 [n + 1], the documents' boundaries.
        meta: the pack's meta.json (``samples``: dataset, file, record, length, media_order,
            images with ``grid`` and ``tiles``, videos with ``frames``).
        placeholders: int64 [tiles, 256], positions of each tile's placeholders, in order.
        decode: token ids -> text, special tokens kept.
        ids: the wrapper and special ids of the build's tokenizer.

    Raises:
        ValueError, KeyError, IndexError, TypeError: the meta does not describe the pack's
            media (a media item outside its sample, tiles left over or missing).
    """
    specials = np.fromiter(ids.specials, dtype=np.int64, count=len(ids.specials))
    tokens = _Tokens(input_ids, labels == IGNORE_INDEX, np.isin(input_ids, specials), decode)
    documents = []
    next_tile = 0
    for number, sample in enumerate(meta["samples"]):
        start, stop = int(cu_seqlens[number]), int(cu_seqlens[number + 1])
        end = start + int(sample["length"])
        order = media_order(sample, meta.get("format", FORMAT_TILES))
        blocks, next_tile = _media_blocks(sample, order, placeholders, next_tile, input_ids, ids)
        documents.append(
            Document(
                number=number,
                start=start,
                stop=stop,
                length=end - start,
                dataset=str(sample.get("dataset", "")),
                file=str(sample.get("file", "")),
                record=str(sample.get("record", "")),
                segments=_segments(tokens, blocks, start, end, stop, f"samples[{number}]"),
            )
        )
    if next_tile != len(placeholders):
        raise ValueError(f"the media stand for {next_tile} tiles, the pack has {len(placeholders)}")
    return tuple(documents)


@dataclass(frozen=True, slots=True)
class _Tokens:
    """The pack's ids with their per-token flags, and the decoder."""

    ids: np.ndarray
    masked: np.ndarray
    special: np.ndarray
    decode: Decode


def _segments(
    tokens: _Tokens, blocks: list[_Block], start: int, end: int, stop: int, where: str
) -> tuple[Segment, ...]:
    """The segments of one document: text around its media blocks in [start, end), then its
    padding [end, stop)."""
    segments: list[Segment] = []
    cursor = start
    for block_start, block_stop, kind, label, tiles, grid in blocks:
        if not cursor <= block_start < block_stop <= end:
            raise ValueError(
                f"{where}: {label} at [{block_start}, {block_stop}) is not inside the "
                f"sample's tokens after the previous block [{cursor}, {end})"
            )
        segments += _text_segments(tokens, cursor, block_start)
        supervised = int((~tokens.masked[block_start:block_stop]).sum())
        segments.append(
            Segment(
                kind,
                block_start,
                block_stop,
                masked=supervised == 0,
                label=label,
                tiles=tiles,
                grid=grid,
                supervised=supervised,
            )
        )
        cursor = block_stop
    segments += _text_segments(tokens, cursor, end)
    if end < stop:
        supervised = int((~tokens.masked[end:stop]).sum())
        label = f"padding: {stop - end} tokens"
        segments.append(
            Segment("padding", end, stop, supervised == 0, label=label, supervised=supervised)
        )
    return tuple(segments)


_Block = tuple[int, int, str, str, tuple[int, ...], "tuple[int, int] | None"]


def _media_blocks(
    sample: dict,
    order: list[tuple[str, int]],
    placeholders: np.ndarray,
    first_tile: int,
    input_ids: np.ndarray,
    ids: VisionIds,
) -> tuple[list[_Block], int]:
    """(start, stop, kind, label, tiles, grid) of each media item of `sample` in its media
    `order`, and the pack's next tile number."""
    blocks = []
    tile = first_tile
    for kind, index in order:
        grid = None
        if kind == "image":
            image = sample["images"][index]
            count, grid = _image_tiles(image["tiles"], image["grid"])
        else:
            count = len(sample["videos"][index]["frames"])
        if not 0 < count <= len(placeholders) - tile:
            raise ValueError(f"{kind} {index}: {count} tiles, {len(placeholders) - tile} left")
        tiles = tuple(range(tile, tile + count))
        tile += count
        first, last = int(placeholders[tiles[0], 0]), int(placeholders[tiles[-1], -1])
        # widen to the wrapper tokens when they are there (Long-VITA's layout always has them)
        start = first - 1 if first > 0 and int(input_ids[first - 1]) in ids.wrappers else first
        stop = last + 1
        if stop < len(input_ids) and int(input_ids[stop]) in ids.wrappers:
            stop += 1
        label = _media_label(kind, index, count, grid, stop - start)
        blocks.append((start, stop, kind, label, tiles, grid))
    return blocks, tile


def _image_tiles(tiles: object, grid: object) -> tuple[int, tuple[int, int]]:
    """(tiles, (cols, rows)) of a meta image, checked: ints, and thumbnail + cols * rows tiles
    (1 without a thumbnail)."""
    if not isinstance(grid, list | tuple) or len(grid) != 2:
        raise ValueError(f"image grid {grid!r}")
    cols, rows = grid
    if type(tiles) is not int or type(cols) is not int or type(rows) is not int:
        raise ValueError(f"image tiles {tiles!r}, grid {grid!r}")
    if cols < 1 or rows < 1 or tiles != (1 if cols * rows == 1 else cols * rows + 1):
        raise ValueError(f"image grid {grid!r} does not give {tiles} tiles")
    return tiles, (cols, rows)


def _media_label(
    kind: str, index: int, count: int, grid: tuple[int, int] | None, num_tokens: int
) -> str:
    """``image 1: 3x2 grid + thumbnail, 7 tiles, 1808 tokens`` / ``video 1: 8 frames, ...``."""
    if kind == "video":
        what = f"{count} frame{'s' if count != 1 else ''}"
    elif count == 1:
        what = "1 tile"
    else:
        what = f"{grid[0]}x{grid[1]} grid + thumbnail, {count} tiles"  # type: ignore[index]
    return f"{kind} {index + 1}: {what}, {num_tokens:,} tokens"


def _text_segments(tokens: _Tokens, start: int, stop: int) -> list[Segment]:
    """Text segments of [start, stop): one per run of equal label state, each in pieces."""
    if stop <= start:
        return []
    return [
        Segment(
            "text",
            a,
            b,
            bool(tokens.masked[a]),
            tuple(
                (tokens.decode(tokens.ids[c:d].tolist()), bool(tokens.special[c]))
                for c, d in _runs(tokens.special[a:b], a)
            ),
        )
        for a, b in _runs(tokens.masked[start:stop], start)
    ]


def _runs(flags: np.ndarray, offset: int) -> list[tuple[int, int]]:
    """[start, stop) of each run of equal values of `flags`, shifted by `offset`."""
    edges = np.flatnonzero(flags[1:] != flags[:-1]) + 1
    bounds = [0, *edges.tolist(), len(flags)]
    return [(offset + a, offset + b) for a, b in zip(bounds[:-1], bounds[1:], strict=True)]


BIDI_CONTROLS = frozenset(
    "\u061c\u200e\u200f\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069"
)
"""Characters that reorder the text around them (the "Trojan Source" set)."""


def visible(text: str, keep: Collection[str] = ("\n",)) -> str:
    """`text` with control characters (ESC, CR, DEL, C1) and bidi controls written as
    ``\\x1b`` / ``\\u202e`` escapes, so untrusted data can neither drive a terminal nor
    reorder what is shown; characters in `keep` stay."""
    out = []
    for char in text:
        if char in keep or not (char in BIDI_CONTROLS or unicodedata.category(char) == "Cc"):
            out.append(char)
        else:
            out.append(f"\\x{ord(char):02x}" if ord(char) < 0x100 else f"\\u{ord(char):04x}")
    return "".join(out)
