"""Source images in shards (``image_storage: source``): stored as their bytes at build time
(in a pack's `media.tar`, format 3; as members in format 2), cut at load time.

**Build** (`read_source_image`): the exact bytes of the image file or parquet cell, without
decoding a pixel. Before they go into a shard they are checked against the plan, because the
plan's token count depends on the image size: Pillow's lazy open must identify the image (its
format names the member's extension, `EXTENSIONS`) and report the planned size, and the
container must be complete (`container_complete`: JPEG ends with an EOI marker after its last
scan, PNG with its IEND chunk, WebP's RIFF size fits, GIF ends with its trailer). These catch a
file that changed since planning and the usual damage, truncation, in microseconds; formats
without such a check (BMP, TIFF, ...) are decoded. `lvita build --verify-media` decodes every
image while planning instead.

**Load** (`source_image_tiles`): ``Image.open(bytes)``, the decoded size checked against the
plan, ``convert("RGB")`` and `lvita_data.media.tiles.image_tiles`: the original's own
operations on the same bytes, so the tiles are bit-identical to pre-cut tiles (``image_storage:
tiles``; tested on every image of the demo corpus). Cost against decoding stored PNG tiles
(``benchmarks/results/storage.md``, one core): a photo JPEG of 640x480 takes 27 ms to decode and
cut against 78 ms for its 13 PNG tiles (0.35x), 1920x1080 0.83x, 4000x3000 2.4x (215 vs 90 ms:
the bicubic resize of 12 MP dominates); flat screenshots and charts 2-5x (their PNG tiles
decode in ~1.3 ms each). On a COCO-like photo mix the loader is 1.4-1.6x faster than with PNG
tiles; on screenshots 0.7-0.8x, still over 60,000 tokens/s per core at T = 4096.
"""

from __future__ import annotations

import io
import warnings

from PIL import Image, UnidentifiedImageError

from lvita_data.errors import SkipSample
from lvita_data.media.probe import open_image
from lvita_data.media.tiles import decode_rgb, image_tiles
from lvita_data.schema import ImagePlan, RejectReason

EXTENSIONS = {"JPEG": "jpg", "MPO": "jpg", "PNG": "png", "WEBP": "webp", "GIF": "gif"}
"""Member extension per Pillow format; any other format is stored as its lower-cased name."""
_JPEG_EOI, _JPEG_SOS = b"\xff\xd9", b"\xff\xda"
_PNG_IEND = b"IEND\xaeB`\x82"


def container_complete(data: bytes, fmt: str) -> bool | None:
    """Whether an image's container is complete: True / False for JPEG, PNG, WebP and GIF,
    None for formats without a cheap check (decode them instead)."""
    if fmt in ("JPEG", "MPO"):
        # inside entropy-coded data 0xFF is always stuffed, so an EOI after the last SOS ends
        # the main image (an EXIF thumbnail's EOI comes before the main scan)
        return data.find(_JPEG_EOI, max(data.rfind(_JPEG_SOS), 0)) >= 0
    if fmt == "PNG":
        return data.find(_PNG_IEND, 33) >= 0
    if fmt == "WEBP":
        return len(data) >= 12 and int.from_bytes(data[4:8], "little") + 8 <= len(data)
    if fmt == "GIF":
        return data.rstrip(b"\0").endswith(b";")
    return None


def _identify(data: bytes, name: str) -> tuple[str, tuple[int, int]]:
    """(Pillow format, size) from the header alone; SkipSample when Pillow cannot identify it."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as image:
                return str(image.format), image.size
    except Image.DecompressionBombError as error:
        raise SkipSample(RejectReason.decompression_bomb, f"{name}: {error}") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as error:
        raise SkipSample(RejectReason.corrupt_image, f"{name}: {error}") from None


def read_source_image(plan: ImagePlan) -> tuple[bytes, str]:
    """(bytes, member extension) of a planned image, checked as the module docstring says.

    Raises `SkipSample`: ``missing_media``, ``corrupt_image`` (unidentified, incomplete,
    undecodable, or a size other than the planned one) or ``decompression_bomb``.
    """
    name = plan.source.name or plan.source.path or "<embedded image>"
    with open_image(plan.source) as handle:
        data = handle.read()
    fmt, size = _identify(data, name)
    if size != (plan.width, plan.height):
        raise SkipSample(
            RejectReason.corrupt_image,
            f"{name}: size {size[0]}x{size[1]} differs from the planned {plan.width}x{plan.height}",
        )
    complete = container_complete(data, fmt)
    if complete is False:
        raise SkipSample(RejectReason.corrupt_image, f"{name}: {fmt} data is incomplete")
    if complete is None:
        decode_rgb(io.BytesIO(data), name)
    return data, EXTENSIONS.get(fmt, fmt.lower())


def max_source_pixels() -> int:
    """The pixel budget of one source image at load time: what the build admits, twice
    Pillow's ``MAX_IMAGE_PIXELS`` (its DecompressionBombError limit; 179 MP by default, so at
    most ~0.5 GB of RGB per image while it is decoded and cut)."""
    return 2 * int(Image.MAX_IMAGE_PIXELS or 89_478_485)


def source_image_tiles(
    data: bytes, size: tuple[int, int], grid: tuple[int, int], name: str
) -> list[Image.Image]:
    """The 448 tiles of a stored source image (`image_tiles`); an image over the pixel budget
    (`max_source_pixels`, checked on the planned size before its bytes are opened), that does
    not decode, or whose size (read from its header before decoding) is not the planned `size`,
    raises `SkipSample` (``decompression_bomb`` / ``corrupt_image``)."""
    if size[0] * size[1] > max_source_pixels():
        raise SkipSample(
            RejectReason.decompression_bomb,
            f"{name}: planned size {size[0]}x{size[1]} is over the budget of "
            f"{max_source_pixels():,} pixels",
        )
    return image_tiles(decode_rgb(io.BytesIO(data), name, expected_size=size), grid)
