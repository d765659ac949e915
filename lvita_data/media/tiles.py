"""Pixels of Long-VITA: decode media, cut 448 tiles, store them in shards, normalise them.

**What the original does** (`ImageProcessor` in Long-VITA's ``image_processor.py``, dynamic
tiling, ImageNet normalisation), reproduced here step by step:

*Image* with grid (cols, rows) = `lvita_data.samples.tiling.choose_grid(width, height)`:

1. ``Image.open(...).convert("RGB")`` (no EXIF rotation; alpha is dropped, not composited).
2. ``image.resize((448 * cols, 448 * rows))`` with Pillow's default filter (BICUBIC for RGB), cut
   row-major into 448 x 448 boxes ``(c * 448, r * 448, (c + 1) * 448, (r + 1) * 448)``.
3. If cols * rows > 1, a thumbnail ``image.resize((448, 448))`` of the whole image comes FIRST
   (so ``lvita_data.samples.tiling.num_tiles(grid)`` tiles in all).
4. Every tile goes through ``process_images`` (step 5 of a video frame below); on a 448 x 448 RGB
   tile both the square padding and the resize are no-ops (Pillow returns a copy).

*Video frame* (RGB array from the decoder, or ``Image.open(path).convert("RGB")`` for a directory
of frames), no tiling:

5. ``expand2square``: a non-square frame is pasted centred (offset ``(side - short) // 2``) on a
   square canvas of ``PAD_COLOR = tuple(int(x * 255) for x in mean) = (123, 116, 103)``
   (truncation, not rounding: 0.485 * 255 = 123.675 -> 123, 0.406 * 255 = 103.53 -> 103), then
   ``resize((448, 448), BICUBIC)``.
6. float32 ``x * 1.0 / 255.0``, then ``(x - mean) / std`` with float32 mean (0.485, 0.456,
   0.406) and std (0.229, 0.224, 0.225), then HWC -> CHW.

`image_tiles` (steps 1-4) and `frame_tile` (step 5) give uint8 RGB 448 x 448 PIL tiles;
`normalize_tiles` is step 6. Step 6 is an elementwise function of (uint8 value, channel), so it is
done with a 3 x 256 float32 table computed with exactly the original's float32 operations:
bit-identical to the original's arrays (tested on all 256 values) and about 3x faster than the
array arithmetic (24 vs 75 ms for 13 tiles). The one table serves all three normalisers:
`normalize_tiles` (a batch), `normalize_tile_into` (one tile into a preallocated CHW buffer, the
loader's fast path) and `normalize_tiles_torch` (uint8 tensors on any device; torch is imported
only when it is called). The tiles are bit-identical to the original's given
the same Pillow resampling code (tested with Pillow 13; the default filter of ``resize`` is
BICUBIC since Pillow 7.0; Pillow-SIMD resamples differently).

**Storage in shards.** Numbers from ``benchmarks/results/pixels.md`` (2-vCPU AMD EPYC VM
shared with other jobs, timings +-30%; Pillow 13 with zlib-ng and libjpeg-turbo; 17 sample
images of 191-1411 px (photos, textures, micrographs, a chart, a text scan, a logo; 5 of them
JPEG files), cut into 70 tiles with thumbnails):

    storage per 448 tile          bytes/tile  / raw  encode ms  decode ms  max |err| normalised
    raw uint8 HWC                    602,112  1.000       0.3       0.1    0 (exact)
    PNG compress_level=0             603,426  1.002       8.7       3.9    0 (exact)
    PNG compress_level=1 (default)   250,592  0.416      17.1       7.2    0 (exact)
    PNG compress_level=6             222,770  0.370      67.8       6.7    0 (exact)
    PNG compress_level=9             217,617  0.361     250.4       6.2    0 (exact)
    WebP lossless, method 0          196,923  0.327      10.1       6.4    0 (exact)
    JPEG q95 4:2:0                    57,506  0.096       0.9       1.7    3.24 (186 uint8 steps)
    JPEG q95 4:4:4                    74,504  0.124       1.7       2.2    0.54 (31 uint8 steps)

One uint8 step is 1 / (255 * std) = 0.017-0.0175 after normalisation. JPEG's error is lossy
coding, not float noise: up to 31 steps at sharp edges even at 4:4:4 (mean 0.015, i.e. ~1 step),
and 4:2:0 chroma subsampling smears colour edges by up to 186 steps. So JPEG cannot reproduce the
original; it is available (``fmt="jpeg"``, q95 4:4:4 by default) for callers that accept
`JPEG_TOLERANCE`. **Default: PNG, compress_level=1** (`PNG_COMPRESS_LEVEL`): exact, 2.4x smaller
than raw; level 6 is only 11% smaller for 4x the encode time and decodes no faster. WebP lossless
(``fmt="webp"``, exact, tested) is 21% smaller and encodes 40% faster than PNG-1 with the same
decode time; PNG stays the default because every tool (and WebDataset's default decoders) reads
it.

Caveat for images (not for video frames): pre-cut tiles are bigger than their source. A 640x480
image becomes 13 tiles (4x3 grid + thumbnail) of upscaled pixels; over the 17 test images PNG-1
tiles total 3.7x the source files (17.5 MB vs 4.8 MB), 4-18x for the JPEG files. Storing the
source bytes and running `load_image` + `image_tiles` in the loader is equally exact (it is the
original's own computation) and cost 412 ms of CPU for all 17 images against 483 ms to decode
their PNG tiles. Large photos shift the balance: a 4000x3000 JPEG (2.1 MB; PNG-1 tiles 4.0 MB)
takes 74 ms to decode and 219 ms to tile, against 98 ms to decode its 13 PNG tiles.
Video frames must be decoded at build time anyway (16 frames spread over a 60 s 720p clip took
~200 ms per frame), so their 448 tiles are what to store (PNG-1: 242 kB per padded 1280x720
frame of a noisy synthetic clip).

Errors: a missing image -> `SkipSample("missing_media")`; undecodable or truncated ->
``corrupt_image``; over twice Pillow's ``MAX_IMAGE_PIXELS`` -> ``decompression_bomb`` (as
`lvita_data.media.probe.probe_image`). Videos: see `lvita_data.media.video` (``missing_media``,
``bad_video``, ``empty_frame_dir``); a frame file of a directory that cannot be decoded ->
``corrupt_image``; a directory with fewer frames than planned -> ``too_few_frames``.
"""

from __future__ import annotations

import io
import os
import struct
import warnings
from collections.abc import Iterable, Iterator, Sequence
from typing import BinaryIO

import numpy as np
from PIL import Image, UnidentifiedImageError

from lvita_data.errors import SkipSample
from lvita_data.media.probe import open_image
from lvita_data.media.video import decode_frames, list_frame_dir
from lvita_data.schema import (
    TILE_SIZE,
    ImagePlan,
    MediaRef,
    RejectReason,
    TokenizedSample,
    VideoPlan,
)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
PAD_COLOR = tuple(int(x * 255) for x in IMAGENET_MEAN)
"""Background of `frame_tile`'s square padding, as the original computes it: (123, 116, 103)."""

TILE_SHAPE = (TILE_SIZE, TILE_SIZE, 3)
RAW_TILE_BYTES = TILE_SIZE * TILE_SIZE * 3
PNG_COMPRESS_LEVEL = 1
"""Default zlib level of stored PNG tiles (see the module docstring for the measurements)."""
JPEG_QUALITY = 95
JPEG_TOLERANCE = 0.75
"""Max |error| after normalisation allowed for JPEG q95 4:4:4 tiles (about 43 uint8 steps). The
benchmark saw up to 0.54 on natural photos and the tests up to 0.40; an empirical bound for
lossy coding, not a guarantee for arbitrary content."""

_BICUBIC = Image.Resampling.BICUBIC
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_JPEG_SIGNATURE = b"\xff\xd8\xff"
_FORMATS = ("png", "webp", "jpeg", "raw")
_DECODE_ERRORS = (
    UnidentifiedImageError,
    OSError,
    SyntaxError,
    ValueError,
    EOFError,
    struct.error,
    # what Pillow's plugins raise on some malformed files (hostile headers, issue 15)
    TypeError,
    IndexError,
    KeyError,
    ZeroDivisionError,
)


def _normalize_table() -> np.ndarray:
    """float32 [3, 256]: the original's step 6 applied to every uint8 value of every channel."""
    image = np.arange(256, dtype=np.float32)[:, None].repeat(3, axis=1)  # HWC-like [256, 3]
    image = image * 1.0 / 255.0
    mean = np.array(IMAGENET_MEAN, dtype=image.dtype)
    std = np.array(IMAGENET_STD, dtype=image.dtype)
    image = (image - mean) / std
    return np.ascontiguousarray(image.T)


_TABLE = _normalize_table()


# --------------------------------------------------------------------------------------------
# tiles


def _rgb(image: Image.Image) -> Image.Image:
    # convert("RGB") of an RGB image is a plain copy: skip it.
    return image if image.mode == "RGB" else image.convert("RGB")


def frame_tile(image: Image.Image) -> Image.Image:
    """One 448 x 448 RGB tile of a frame: pad to square with `PAD_COLOR`, resize bicubic."""
    image = _rgb(image)
    width, height = image.size
    if width != height:
        side = max(width, height)
        canvas = Image.new("RGB", (side, side), PAD_COLOR)
        offset = (0, (side - height) // 2) if width > height else ((side - width) // 2, 0)
        canvas.paste(image, offset)
        image = canvas
    if image.size != (TILE_SIZE, TILE_SIZE):
        image = image.resize((TILE_SIZE, TILE_SIZE), resample=_BICUBIC)
    return image


def image_tiles(image: Image.Image, grid: tuple[int, int]) -> list[Image.Image]:
    """uint8 RGB 448 x 448 tiles of `image` for `grid` = (cols, rows), in the original's order.

    The thumbnail (whole image resized to 448 x 448) comes first when cols * rows > 1, then the
    tiles of the stretched image row by row: `lvita_data.samples.tiling.num_tiles(grid)` tiles.
    """
    cols, rows = grid
    if cols < 1 or rows < 1:
        raise ValueError(f"grid must be (cols, rows) >= (1, 1), got {grid}")
    image = _rgb(image)
    resized = image.resize((TILE_SIZE * cols, TILE_SIZE * rows), resample=_BICUBIC)
    if cols * rows == 1:
        return [resized]
    tiles = [image.resize((TILE_SIZE, TILE_SIZE), resample=_BICUBIC)]
    for row in range(rows):
        for col in range(cols):
            left, top = col * TILE_SIZE, row * TILE_SIZE
            tiles.append(resized.crop((left, top, left + TILE_SIZE, top + TILE_SIZE)))
    return tiles


def tiles_array(tiles: Sequence[Image.Image]) -> np.ndarray:
    """Stack 448 x 448 RGB tiles into uint8 [N, 448, 448, 3]."""
    out = np.empty((len(tiles), *TILE_SHAPE), dtype=np.uint8)
    for i, tile in enumerate(tiles):
        if tile.mode != "RGB" or tile.size != (TILE_SIZE, TILE_SIZE):
            raise ValueError(f"tile {i} is {tile.mode} {tile.size}, expected RGB 448x448")
        out[i] = np.asarray(tile)
    return out


def normalize_tiles(tiles: np.ndarray) -> np.ndarray:
    """uint8 [N, 448, 448, 3] (HWC) -> float32 [N, 3, 448, 448], bit-identical to the original.

    The original computes ``(x * 1.0 / 255.0 - mean) / std`` in float32 per element; we look the
    result up in a table built with those same operations (any H and W work).
    """
    tiles = np.asarray(tiles)
    if tiles.dtype != np.uint8 or tiles.ndim != 4 or tiles.shape[-1] != 3:
        raise ValueError(f"expected uint8 [N, H, W, 3], got {tiles.dtype} {tiles.shape}")
    n, height, width, _ = tiles.shape
    out = np.empty((n, 3, height, width), dtype=np.float32)
    for c in range(3):
        np.take(_TABLE[c], tiles[..., c], out=out[:, c], mode="clip")
    return out


def normalize_tile_into(tile: np.ndarray, out: np.ndarray) -> None:
    """uint8 [448, 448, 3] -> `out` float32 [3, 448, 448]; equal to `normalize_tiles`.

    Transposing the uint8 tile to CHW first makes the three table look-ups contiguous: about
    0.7 ms per tile against 3-8 ms for `normalize_tiles`' strided look-ups on large batches.
    """
    chw = np.ascontiguousarray(tile.transpose(2, 0, 1))
    for channel in range(3):
        np.take(_TABLE[channel], chw[channel], out=out[channel], mode="clip")


def normalize_tiles_torch(tiles):
    """torch uint8 [N, H, W, 3] -> float32 [N, 3, H, W] on the tiles' device, bit-identical to
    `normalize_tiles` (a look-up in the same float32 table)."""
    import torch

    if tiles.dtype != torch.uint8 or tiles.dim() != 4 or tiles.shape[-1] != 3:
        raise ValueError(f"expected uint8 [N, H, W, 3], got {tiles.dtype} {tuple(tiles.shape)}")
    table = torch.from_numpy(_TABLE).to(tiles.device)
    out = torch.empty(
        (tiles.shape[0], 3, tiles.shape[1], tiles.shape[2]),
        dtype=torch.float32,
        device=tiles.device,
    )
    for channel in range(3):
        out[:, channel] = table[channel][tiles[..., channel].long()]
    return out


# --------------------------------------------------------------------------------------------
# decoding media


def decode_rgb(
    handle: BinaryIO, name: str, expected_size: tuple[int, int] | None = None
) -> Image.Image:
    """``Image.open(handle).convert("RGB")`` fully decoded; with `expected_size`, an image of
    another size (read from its header, before any pixel is decoded) is ``corrupt_image``.
    Raises `SkipSample` (``corrupt_image``, ``decompression_bomb``)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(handle)
            if expected_size is not None and image.size != tuple(expected_size):
                width, height = expected_size
                raise SkipSample(
                    RejectReason.corrupt_image,
                    f"{name}: size {image.size[0]}x{image.size[1]} differs from the planned "
                    f"{width}x{height}",
                )
            image.load()  # first frame of animations, like the original's convert()
            return _rgb(image)
    except Image.DecompressionBombError as error:
        raise SkipSample(RejectReason.decompression_bomb, f"{name}: {error}") from None
    except _DECODE_ERRORS as error:
        raise SkipSample(RejectReason.corrupt_image, f"{name}: {error}") from None


def load_image(ref: MediaRef) -> Image.Image:
    """Fully decoded RGB image of `ref` (``Image.open(...).convert("RGB")`` of the original).

    Raises `SkipSample` with ``missing_media``, ``corrupt_image`` (unidentified, truncated or
    otherwise undecodable) or ``decompression_bomb`` (over twice Pillow's ``MAX_IMAGE_PIXELS``).
    """
    name = ref.name or ref.path or "<embedded image>"
    with open_image(ref) as handle:
        return decode_rgb(handle, name)


def plan_tiles(plan: ImagePlan) -> list[Image.Image]:
    """`image_tiles` of a planned image; its decoded size must still be the planned one.

    A different size (the file changed since planning) would change the grid and the token
    count, so it raises `SkipSample("corrupt_image")`.
    """
    image = load_image(plan.source)
    if image.size != (plan.width, plan.height):
        raise SkipSample(
            RejectReason.corrupt_image,
            f"{plan.source.name or plan.source.path}: decoded size {image.size} differs from the "
            f"planned {plan.width}x{plan.height}",
        )
    return image_tiles(image, plan.grid)


def video_frames(plan: VideoPlan) -> list[Image.Image]:
    """The planned frames of a video as RGB images (not yet padded or resized).

    A video file is decoded with `lvita_data.media.video.decode_frames` at ``plan.frame_indices``; a
    directory of frames opens the files at those positions of `list_frame_dir`'s natural order.
    """
    return list(_iter_frames(plan))


def video_tiles(plan: VideoPlan) -> list[Image.Image]:
    """`frame_tile` of every planned frame; full-size frames are released one by one."""
    return [frame_tile(frame) for frame in _iter_frames(plan)]


def sample_tiles(sample: TokenizedSample) -> list[Image.Image]:
    """The tiles of a tokenized sample's images and videos in placeholder (tag) order."""
    tiles: list[Image.Image] = []
    for kind, index in sample.media_order:
        if kind == "image":
            tiles.extend(plan_tiles(sample.plan.images[index]))
        else:
            tiles.extend(video_tiles(sample.plan.videos[index]))
    return tiles


def _iter_frames(plan: VideoPlan) -> Iterator[Image.Image]:
    path = plan.source.path
    if path is None:
        raise SkipSample(RejectReason.bad_video, f"{plan.source.name}: embedded video bytes")
    indices = plan.frame_indices
    if os.path.isdir(path):
        files = list_frame_dir(path)
        if indices and max(indices) >= len(files):
            raise SkipSample(
                RejectReason.too_few_frames,
                f"{path}: frame {max(indices)} planned, the directory has {len(files)} frames",
            )
        for i in indices:
            yield _load_frame_file(files[i])
        return
    arrays = decode_frames(path, indices)
    arrays.reverse()
    while arrays:  # pop so each full-size array is freed once its image is consumed
        yield Image.fromarray(arrays.pop())


def _load_frame_file(path: str) -> Image.Image:
    return load_image(MediaRef("image", path=path, name=path))


# --------------------------------------------------------------------------------------------
# shard encoding


def encode_tiles(
    tiles: Iterable[Image.Image | np.ndarray],
    fmt: str = "png",
    *,
    compress_level: int = PNG_COMPRESS_LEVEL,
    quality: int = JPEG_QUALITY,
    subsampling: int = 0,
) -> list[bytes]:
    """Encode 448 x 448 RGB tiles (PIL images or uint8 HWC arrays) for a shard.

    `fmt`: ``"png"`` (exact, the default, zlib level `compress_level`), ``"webp"`` (lossless,
    exact, fastest method), ``"raw"`` (exact: the 602,112 uint8 HWC bytes) or ``"jpeg"`` (lossy,
    `quality`, `subsampling` 0 = 4:4:4 or 2 = 4:2:0).
    """
    if fmt not in _FORMATS:
        raise ValueError(f"unknown tile format {fmt!r}; expected one of {_FORMATS}")
    out = []
    for tile in tiles:
        if isinstance(tile, np.ndarray):
            if tile.dtype != np.uint8 or tile.shape != TILE_SHAPE:
                raise ValueError(f"expected uint8 {TILE_SHAPE}, got {tile.dtype} {tile.shape}")
            if fmt == "raw":
                out.append(np.ascontiguousarray(tile).tobytes())
                continue
            tile = Image.fromarray(tile)
        elif tile.mode != "RGB" or tile.size != (TILE_SIZE, TILE_SIZE):
            raise ValueError(f"expected an RGB 448x448 tile, got {tile.mode} {tile.size}")
        if fmt == "raw":
            out.append(tile.tobytes())
            continue
        buffer = io.BytesIO()
        if fmt == "png":
            tile.save(buffer, "PNG", compress_level=compress_level)
        elif fmt == "webp":
            tile.save(buffer, "WEBP", lossless=True, quality=0, method=0)
        else:
            tile.save(buffer, "JPEG", quality=quality, subsampling=subsampling)
        out.append(buffer.getvalue())
    return out


def decode_tile(data: bytes, fmt: str | None = None) -> np.ndarray:
    """uint8 [448, 448, 3] of one tile stored by `encode_tiles`.

    Without `fmt` the format is recognised from the bytes: PNG and WebP by their signatures,
    then raw by its length (602,112), then JPEG. Pass `fmt` (e.g. from the shard key's
    extension) to rule out the one ambiguity, a JPEG of exactly 602,112 bytes.
    """
    out = np.empty(TILE_SHAPE, dtype=np.uint8)
    _decode_tile_into(data, out, fmt)
    return out


def decode_tiles(blobs: Sequence[bytes], fmt: str | None = None) -> np.ndarray:
    """uint8 [N, 448, 448, 3] of tiles stored by `encode_tiles`, ready for `normalize_tiles`."""
    out = np.empty((len(blobs), *TILE_SHAPE), dtype=np.uint8)
    for i, data in enumerate(blobs):
        _decode_tile_into(data, out[i], fmt)
    return out


def _tile_format(data: bytes) -> str:
    if data.startswith(_PNG_SIGNATURE):
        return "png"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp"
    if len(data) == RAW_TILE_BYTES:
        return "raw"
    if data.startswith(_JPEG_SIGNATURE):
        return "jpeg"
    raise ValueError(f"not a PNG, WebP, JPEG or raw 448x448 RGB tile ({len(data)} bytes)")


def _decode_tile_into(data: bytes, out: np.ndarray, fmt: str | None) -> None:
    fmt = _tile_format(data) if fmt is None else fmt
    if fmt == "raw":
        if len(data) != RAW_TILE_BYTES:
            raise ValueError(f"raw tile of {len(data)} bytes, expected {RAW_TILE_BYTES}")
        out[...] = np.frombuffer(data, dtype=np.uint8).reshape(TILE_SHAPE)
        return
    if fmt not in _FORMATS:
        raise ValueError(f"unknown tile format {fmt!r}; expected one of {_FORMATS}")
    try:
        # a tile is 448 x 448: Pillow's bomb warning (over 89 MP) is an error here, so a
        # hostile header never gets a large buffer
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data), formats=[fmt.upper()]) as image:
                mode, size = image.mode, image.size
                if mode == "RGB" and size == (TILE_SIZE, TILE_SIZE):
                    image.load()
                    out[...] = np.asarray(image)
                    return
    except (*_DECODE_ERRORS, Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
        raise ValueError(f"undecodable {fmt} tile: {error}") from error
    raise ValueError(f"stored tile is {mode} {size}, expected RGB 448x448")
