"""The source images of a format-2 or format-3 pack (`check_images`), see
`lvita_data.shards.format`.

- Names: every image entry of the meta names an ``image{NNNNNN}.{ext}`` member (none does in a
  format-3 pack with ``image_storage: tiles``, whose images are stored tiles); the distinct
  members are numbered 0, 1, ... in order of first reference (packed samples in order, each
  sample's images in order), as the build writes them; every referenced member exists and no
  image member goes unreferenced.
- Header: Pillow's lazy open identifies each member (format and size, no pixel decoded), the
  extension is the one the build gives that format (`lvita_data.media.source.EXTENSIONS`), the
  size is the one the meta plans for every reference, and the container is complete
  (`container_complete`: JPEG EOI, PNG IEND, WebP RIFF size, GIF trailer).
- Pixels (with ``decode_tiles``): the image decodes and is cut into its grid's tiles exactly as
  the loader does (`source_image_tiles`), so an image the loader would refuse is reported here.
"""

from __future__ import annotations

import io
import re
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from PIL import Image

from lvita_data.errors import SkipSample
from lvita_data.media.source import EXTENSIONS, container_complete, source_image_tiles
from lvita_data.shards.format import image_member
from lvita_data.verify.report import SampleProblems
from lvita_data.verify.settings import Settings

IMAGE_PATTERN = re.compile(r"^image(\d{6})\.([a-z0-9]+)$")
MAX_DECODED_GRID = 64
"""A grid of more tiles (cols * rows) is not cut (the loader refuses it as well; Long-VITA uses
at most 12): a damaged meta must not make verify allocate a giant image."""


@dataclass(frozen=True, slots=True)
class _Reference:
    member: str
    size: tuple[int, int]
    grid: tuple[int, int]
    where: str
    """``packed sample N image I``, for messages."""


def _pair(value: object) -> tuple[int, int]:
    if not isinstance(value, list) or len(value) != 2 or not all(type(v) is int for v in value):
        raise ValueError(f"{value!r} is not two ints")
    return value[0], value[1]


def _references(samples: Sequence[dict], source: bool, out: SampleProblems) -> list[_Reference]:
    """Every image entry of the meta with a well-formed member name, in order; `source`: every
    image must name one (else none may)."""
    references = []
    for number, sample in enumerate(samples):
        try:
            images = list(sample["images"])
        except (KeyError, TypeError) as error:
            out.add(f"packed sample {number}: no image list ({error!r})", "meta.json")
            continue
        for index, image in enumerate(images):
            where = f"packed sample {number} image {index}"
            if not source:
                if isinstance(image, dict) and "member" in image:
                    out.add(
                        f"{where} names a member, the build stores images as tiles", "meta.json"
                    )
                continue
            try:
                member = image["member"]
                size, grid = _pair(image["size"]), _pair(image["grid"])
            except (KeyError, TypeError, ValueError) as error:
                out.add(f"{where}: member, size or grid missing or malformed: {error}", "meta.json")
                continue
            if not isinstance(member, str) or not IMAGE_PATTERN.match(member):
                out.add(f"{where}: member {member!r} is not an image member name", "meta.json")
                continue
            references.append(_Reference(member, size, grid, where))
    return references


def _identify(data: bytes) -> tuple[str, tuple[int, int]]:
    """(Pillow format, size) from the header alone."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        with Image.open(io.BytesIO(data)) as image:
            return str(image.format), image.size


def check_images(
    samples: Sequence[dict],
    media: Mapping[str, bytes | memoryview],
    image_names: Sequence[str],
    source: bool,
    settings: Settings,
    out: SampleProblems,
) -> None:
    """The image members of a pack against its meta (see the module docstring); `source`: the
    images are stored as their source bytes."""
    references = _references(samples, source, out)
    first: dict[str, _Reference] = {}
    for reference in references:
        first.setdefault(reference.member, reference)
    for number, (member, reference) in enumerate(first.items()):
        extension = IMAGE_PATTERN.match(member).group(2)  # type: ignore[union-attr]
        if member != image_member(number, extension):
            out.add(
                f"{reference.where} refers to {member}, the {number + 1}. distinct image, "
                f"which the build names image{number:06d}.* (numbered by first reference)",
                "meta.json",
            )
    for member in sorted(set(image_names) - set(first)):
        out.add("image member no image entry of meta.json refers to", member)
    for member, reference in first.items():
        if member not in media:
            out.add(f"image member is missing ({reference.where} refers to it)", member)
            continue
        data = bytes(media[member])
        try:
            fmt, size = _identify(data)
        except Exception as error:  # any failure to identify damaged bytes
            out.add(f"not an image Pillow identifies: {error}", member)
            continue
        extension = member.rsplit(".", 1)[1]
        if EXTENSIONS.get(fmt, fmt.lower()) != extension:
            out.add(f"{fmt} data in a .{extension} member", member)
        wrong = [r for r in references if r.member == member and r.size != size]
        for other in wrong:
            out.add(
                f"{size[0]}x{size[1]} image, meta.json plans {other.size[0]}x{other.size[1]} "
                f"({other.where})",
                member,
            )
        if container_complete(data, fmt) is False:
            out.add(f"{fmt} data is incomplete (truncated?)", member)
            continue
        if not wrong and settings.decode_tiles:
            grids = {r.grid: r for r in references if r.member == member}
            _decode(data, size, list(grids.values()), out)


def _decode(
    data: bytes, size: tuple[int, int], references: list[_Reference], out: SampleProblems
) -> None:
    """Decode an image and cut it for each grid it is used with, as the loader does."""
    for reference in references:
        cols, rows = reference.grid
        if min(cols, rows) < 1 or cols * rows > MAX_DECODED_GRID:
            out.add(f"grid {list(reference.grid)} not cut ({reference.where})", reference.member)
            continue
        try:
            source_image_tiles(data, size, reference.grid, reference.member)
        except SkipSample as skip:
            out.add(f"does not decode: {skip.detail or skip}", reference.member)
            return
        except Exception as error:  # a decoder failure SkipSample does not wrap
            out.add(f"does not decode: {error}", reference.member)
            return
