"""Header-only image probing: same sizes as Pillow, every failure a reason."""

import io

import pytest
from PIL import Image

from lvita_data.errors import SkipSample
from lvita_data.media.probe import probe_image
from lvita_data.schema import MediaRef


def encoded(size, fmt, **kwargs) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, (10, 200, 30)).save(buffer, fmt, **kwargs)
    return buffer.getvalue()


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "GIF", "WEBP", "BMP", "TIFF"])
@pytest.mark.parametrize("size", [(448, 448), (901, 450), (31, 1200)])
def test_sizes_equal_pillow(tmp_path, fmt, size):
    data = encoded(size, fmt)
    path = tmp_path / f"x.{fmt.lower()}"
    path.write_bytes(data)
    assert probe_image(MediaRef("image", path=str(path))) == size
    assert probe_image(MediaRef("image", data=data, name="x")) == size
    assert probe_image(MediaRef("image", path=str(path)), verify=True) == size


def test_exif_rotation_is_ignored_like_pillow(tmp_path):
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90: imagesize would swap width and height by default
    path = tmp_path / "rotated.jpg"
    Image.new("RGB", (640, 320)).save(path, exif=exif.tobytes())
    with Image.open(path) as image:
        assert image.size == (640, 320)
    assert probe_image(MediaRef("image", path=str(path))) == (640, 320)


def reason(ref, **kwargs) -> str:
    with pytest.raises(SkipSample) as info:
        probe_image(ref, **kwargs)
    return info.value.reason


def test_failures_have_reasons(tmp_path):
    assert reason(MediaRef("image", path=str(tmp_path / "absent.jpg"))) == "missing_media"
    assert reason(MediaRef("image", path=str(tmp_path))) == "missing_media"
    assert reason(MediaRef("image", data=b"not an image at all", name="g")) == "corrupt_image"
    truncated = encoded((640, 480), "JPEG", quality=95)[:2000]
    ref = MediaRef("image", data=truncated, name="t")
    assert probe_image(ref) == (640, 480)  # header intact: planned without --verify-media
    assert reason(ref, verify=True) == "corrupt_image"
    header_only = encoded((640, 480), "PNG")[:20]
    assert reason(MediaRef("image", data=header_only, name="h")) == "corrupt_image"


def test_decompression_bomb(tmp_path):
    path = tmp_path / "bomb.png"
    limit = Image.MAX_IMAGE_PIXELS
    side = int((2 * limit) ** 0.5) + 10
    Image.new("1", (side, side)).save(path, optimize=True)
    assert reason(MediaRef("image", path=str(path))) == "decompression_bomb"
