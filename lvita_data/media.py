"""Image metadata for planning: size from the file header, never the pixels.

`probe_image` opens an image lazily with Pillow (only the header is parsed) and returns its size.
With `verify=True` it also decodes the pixels, which catches images truncated after a valid header
(slower; `lvita plan --verify-media`). Failures become `SkipSample` with a reason: a missing file,
an unidentifiable or corrupt image, or a decompression bomb (Pillow's MAX_IMAGE_PIXELS limit: an
image over twice the limit raises `DecompressionBombError`).
"""

from __future__ import annotations

import io
import warnings

from PIL import Image, UnidentifiedImageError

from lvita_data.errors import SkipSample
from lvita_data.schema import MediaRef, RejectReason


def _open(ref: MediaRef) -> Image.Image:
    if ref.data is not None:
        return Image.open(io.BytesIO(ref.data))
    return Image.open(ref.path)


def probe_image(ref: MediaRef, *, verify: bool = False) -> tuple[int, int]:
    """(width, height) of an image; raises SkipSample for unusable images."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with _open(ref) as image:
                size = image.size
                if verify:
                    image.load()
    except FileNotFoundError:
        raise SkipSample(RejectReason.missing_media, f"image not found: {ref.path}") from None
    except IsADirectoryError:
        raise SkipSample(RejectReason.missing_media, f"image path is a directory: {ref.path}") from None
    except Image.DecompressionBombError as error:
        raise SkipSample(RejectReason.decompression_bomb, f"{ref.name}: {error}") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as error:
        raise SkipSample(RejectReason.corrupt_image, f"{ref.name}: {error}") from None
    if size[0] <= 0 or size[1] <= 0:
        raise SkipSample(RejectReason.corrupt_image, f"{ref.name}: size {size}")
    return size
