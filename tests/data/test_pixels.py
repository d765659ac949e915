"""lvita_data.media.tiles against an independent transcription of Long-VITA's image processor.

The transcription below follows the original's steps as described in
shared/reference/long-vita.md section 2 and the pixels module docstring: open + convert("RGB"),
stretch with `Image.resize` (default filter), crop row-major boxes, thumbnail first, then per tile
expand2square with int(mean * 255), resize 448 bicubic, float32 x * 1.0 / 255.0,
(x - mean) / std, HWC -> CHW. Our path goes through shard storage: image_tiles -> encode_tiles
-> decode_tiles -> normalize_tiles, and must be bit-identical for PNG (and raw) storage.
"""

from __future__ import annotations

import io
import subprocess
import sys
from pathlib import Path

import av
import numpy as np
import pytest
from PIL import Image

from lvita_data.errors import SkipSample
from lvita_data.media import tiles as pixels
from lvita_data.media.tiles import (
    decode_tile,
    decode_tiles,
    encode_tiles,
    frame_tile,
    image_tiles,
    load_image,
    normalize_tile_into,
    normalize_tiles,
    normalize_tiles_torch,
    plan_tiles,
    tiles_array,
    video_frames,
    video_tiles,
)
from lvita_data.samples.tiling import candidate_grids, choose_grid, count_image_tokens, num_tiles
from lvita_data.schema import ImagePlan, MediaRef, VideoPlan

S = 448
MEAN = [0.485, 0.456, 0.406]
STD = [0.229, 0.224, 0.225]


# --------------------------------------------------------------------------------------------
# the original, transcribed


def reference_open(data: bytes) -> Image.Image:
    return Image.open(io.BytesIO(data)).convert("RGB")


def reference_crops(image: Image.Image, cols: int, rows: int) -> list[Image.Image]:
    """Stretch to the grid (Pillow's default filter), cut row-major, thumbnail in front."""
    stretched = image.resize((S * cols, S * rows))
    pieces = []
    for k in range(cols * rows):
        x, y = (k % cols) * S, (k // cols) * S
        pieces.append(stretched.crop((x, y, x + S, y + S)))
    if len(pieces) > 1:
        pieces.insert(0, image.resize((S, S)))
    return pieces


def reference_square(image: Image.Image) -> Image.Image:
    image = image.convert("RGB")
    w, h = image.size
    background = tuple(int(v * 255) for v in MEAN)
    if w > h:
        square = Image.new(image.mode, (w, w), background)
        square.paste(image, (0, (w - h) // 2))
        image = square
    elif h > w:
        square = Image.new(image.mode, (h, h), background)
        square.paste(image, ((h - w) // 2, 0))
        image = square
    return image.resize((S, S), resample=Image.Resampling.BICUBIC)


def reference_normalize(image: Image.Image) -> np.ndarray:
    x = np.array(image, dtype=np.float32)
    x = x * 1.0 / 255.0
    x = (x - np.array(MEAN, dtype=x.dtype)) / np.array(STD, dtype=x.dtype)
    return x.transpose(2, 0, 1)


def reference_tensor(images: list[Image.Image]) -> np.ndarray:
    out = np.ones((len(images), 3, S, S), dtype=np.float32)
    for i, image in enumerate(images):
        out[i] = reference_normalize(reference_square(image))
    return out


# --------------------------------------------------------------------------------------------
# test images


def photo_like(size: tuple[int, int], seed: int = 0) -> Image.Image:
    """RGB with gradients, hard-edged shapes and noise (exercises every resampling path)."""
    w, h = size
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    r = (xx * 255 // max(w - 1, 1)).astype(np.int32)
    g = (yy * 255 // max(h - 1, 1)).astype(np.int32)
    b = ((xx + yy) * 7 % 256).astype(np.int32)
    rgb = np.stack([r, g, b], axis=2)
    rgb[(xx // 17 + yy // 13) % 2 == 0] //= 2
    rgb += rng.integers(-20, 21, size=rgb.shape)
    return Image.fromarray(np.clip(rgb, 0, 255).astype(np.uint8))


def encoded(image: Image.Image, fmt: str, **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **kwargs)
    return buffer.getvalue()


def _rgba(size):
    image = photo_like(size, 1).convert("RGBA")
    alpha = np.linspace(0, 255, size[0] * size[1]).astype(np.uint8).reshape(size[1], size[0])
    image.putalpha(Image.fromarray(alpha))
    return encoded(image, "PNG")


def _palette_transparent(size):
    image = photo_like(size, 4).quantize(32, method=Image.Quantize.FASTOCTREE)
    return encoded(image, "PNG", transparency=3)


def _cmyk_jpeg(size):
    data = encoded(photo_like(size, 5).convert("CMYK"), "JPEG", quality=90)
    assert Image.open(io.BytesIO(data)).mode == "CMYK"
    return data


SOURCES = {
    "rgb_png": lambda size: encoded(photo_like(size), "PNG"),
    "rgb_jpeg": lambda size: encoded(photo_like(size, 2), "JPEG", quality=85),
    "rgba_png": _rgba,
    "l_png": lambda size: encoded(photo_like(size, 3).convert("L"), "PNG"),
    "la_png": lambda size: encoded(photo_like(size, 3).convert("LA"), "PNG"),
    "p_png": lambda size: encoded(
        photo_like(size, 4).quantize(64, method=Image.Quantize.FASTOCTREE), "PNG"
    ),
    "p_transparent_png": _palette_transparent,
    "p_gif": lambda size: encoded(
        photo_like(size, 6).quantize(16, method=Image.Quantize.FASTOCTREE), "GIF"
    ),
    "bilevel_png": lambda size: encoded(photo_like(size, 7).convert("1"), "PNG"),
    "cmyk_jpeg": _cmyk_jpeg,
}

SIZES = [(448, 448), (640, 480), (257, 1031), (1000, 201), (50, 31), (30, 900), (1200, 1100)]


def our_tensor(data: bytes, fmt: str = "png", **kwargs) -> tuple[np.ndarray, tuple[int, int]]:
    image = load_image(MediaRef("image", data=data, name="x"))
    grid = choose_grid(*image.size)
    stored = encode_tiles(image_tiles(image, grid), fmt, **kwargs)
    return normalize_tiles(decode_tiles(stored)), grid


# --------------------------------------------------------------------------------------------
# parity


@pytest.mark.parametrize("size", SIZES)
def test_png_storage_is_bit_identical_to_the_original_rgb(size):
    data = SOURCES["rgb_png"](size)
    ours, grid = our_tensor(data)
    image = reference_open(data)
    expected = reference_tensor(reference_crops(image, *grid))
    assert ours.dtype == np.float32 and ours.shape == expected.shape == (num_tiles(grid), 3, S, S)
    assert np.array_equal(ours, expected)


@pytest.mark.parametrize("source", sorted(SOURCES))
@pytest.mark.parametrize("size", [(500, 260), (257, 1031)])
def test_png_storage_is_bit_identical_for_every_mode(source, size):
    data = SOURCES[source](size)
    ours, grid = our_tensor(data)
    expected = reference_tensor(reference_crops(reference_open(data), *grid))
    assert np.array_equal(ours, expected)


def test_raw_storage_is_bit_identical():
    data = SOURCES["rgb_jpeg"]((900, 500))
    ours, grid = our_tensor(data, "raw")
    assert np.array_equal(ours, reference_tensor(reference_crops(reference_open(data), *grid)))


@pytest.mark.parametrize("size", [(640, 480), (1000, 201)])
def test_jpeg_storage_within_documented_tolerance(size):
    data = SOURCES["rgb_png"](size)
    expected = reference_tensor(reference_crops(reference_open(data), *choose_grid(*size)))
    ours, _ = our_tensor(data, "jpeg")  # q95, 4:4:4 by default
    error = np.abs(ours - expected)
    assert 0 < error.max() <= pixels.JPEG_TOLERANCE
    assert error.mean() < 0.05
    subsampled, _ = our_tensor(data, "jpeg", subsampling=2)  # 4:2:0 is clearly worse
    assert np.abs(subsampled - expected).mean() > error.mean()


def test_tile_stage_equals_the_original_tiles_before_normalization():
    image = photo_like((731, 402))
    grid = choose_grid(*image.size)
    ours = tiles_array(image_tiles(image, grid))
    expected = np.stack([np.asarray(reference_square(t)) for t in reference_crops(image, *grid)])
    assert np.array_equal(ours, expected)


# --------------------------------------------------------------------------------------------
# tile count and order


def block_image(cols: int, rows: int, block: int = 9) -> tuple[Image.Image, np.ndarray]:
    """An image of cols x rows flat blocks with distinct colours, and those colours [rows, cols]."""
    cells = [
        [(20 + 19 * c, 20 + 19 * r, 100 + r * cols + c) for c in range(cols)] for r in range(rows)
    ]
    colours = np.array(cells, dtype=np.uint8)
    pixels_ = np.kron(colours, np.ones((block, block, 1), dtype=np.uint8))
    return Image.fromarray(pixels_), colours


@pytest.mark.parametrize("grid", candidate_grids(1, 12))
def test_tile_count_and_row_major_order_thumbnail_first(grid):
    cols, rows = grid
    image, colours = block_image(cols, rows)
    tiles = image_tiles(image, grid)
    assert len(tiles) == num_tiles(grid)
    assert all(t.mode == "RGB" and t.size == (S, S) for t in tiles)
    body = tiles[1:] if len(tiles) > 1 else tiles
    for k, tile in enumerate(body):
        assert tuple(np.asarray(tile)[S // 2, S // 2]) == tuple(colours[k // cols, k % cols])
    if len(tiles) > 1:
        assert np.array_equal(np.asarray(tiles[0]), np.asarray(image.resize((S, S))))


def test_single_tile_has_no_thumbnail():
    image = photo_like((500, 470))
    assert choose_grid(*image.size) == (1, 1)
    (tile,) = image_tiles(image, (1, 1))
    assert np.array_equal(np.asarray(tile), np.asarray(image.resize((S, S))))


def test_bad_grid():
    with pytest.raises(ValueError):
        image_tiles(photo_like((10, 10)), (0, 2))


# --------------------------------------------------------------------------------------------
# video frame tiles


def test_frame_tile_pads_wide_frames_with_the_truncated_mean_colour():
    # int(0.485 * 255) = 123, int(0.456 * 255) = 116, int(0.406 * 255) = 103: truncated, not
    # rounded (rounding would give 124, 116, 104).
    assert pixels.PAD_COLOR == (123, 116, 103)
    frame = Image.new("RGB", (640, 360), (200, 10, 10))
    tile = np.asarray(frame_tile(frame))
    assert tile.shape == (S, S, 3)
    content = round(360 * S / 640)  # 252 rows of content, centred
    top = (S - content) // 2
    assert (tile[: top - 3] == (123, 116, 103)).all()  # away from the bicubic transition
    assert (tile[S - top + 3 :] == (123, 116, 103)).all()
    assert (tile[top + 3 : S - top - 3] == (200, 10, 10)).all()
    expected = np.asarray(reference_square(frame))
    assert np.array_equal(tile, expected)
    normalized = normalize_tiles(tile[None])[0, :, 0, 0]
    assert np.array_equal(
        normalized, reference_normalize(Image.new("RGB", (1, 1), (123, 116, 103)))[:, 0, 0]
    )


def test_frame_tile_pads_tall_frames_left_and_right():
    frame = photo_like((200, 500), 9).convert("L")  # also converts to RGB first
    tile = np.asarray(frame_tile(frame))
    assert (tile[:, :40] == (123, 116, 103)).all() and (tile[:, -40:] == (123, 116, 103)).all()
    assert np.array_equal(tile, np.asarray(reference_square(frame)))


@pytest.mark.parametrize("size", [(448, 448), (448, 200), (1280, 720), (17, 23), (600, 600)])
def test_frame_tile_matches_transcription(size):
    frame = photo_like(size, 11)
    assert np.array_equal(np.asarray(frame_tile(frame)), np.asarray(reference_square(frame)))


# --------------------------------------------------------------------------------------------
# normalization and storage


def test_normalization_table_is_the_original_arithmetic_for_every_value():
    values = np.arange(256, dtype=np.uint8)
    tiles = np.stack([values, values[::-1], np.roll(values, 77)], axis=1).reshape(1, 16, 16, 3)
    ours = normalize_tiles(tiles)
    x = tiles.astype(np.float32) * 1.0 / 255.0
    x = (x - np.array(MEAN, dtype=np.float32)) / np.array(STD, dtype=np.float32)
    assert ours.dtype == np.float32 and ours.shape == (1, 3, 16, 16)
    assert np.array_equal(ours, x.transpose(0, 3, 1, 2))
    assert ours.flags.c_contiguous


def test_normalize_tile_into_equals_normalize_tiles():
    rng = np.random.default_rng(3)
    tiles = rng.integers(0, 256, (2, 448, 448, 3), dtype=np.uint8)
    tiles[0, :16, :16] = [[0, 255, 128]]  # extremes
    out = np.empty((3, 448, 448), dtype=np.float32)
    expected = normalize_tiles(tiles)
    for i in range(2):
        normalize_tile_into(tiles[i], out)
        assert np.array_equal(out, expected[i])


def test_normalize_tiles_torch_equals_normalize_tiles():
    torch = pytest.importorskip("torch")
    everything = torch.from_numpy(
        np.random.default_rng(0).integers(0, 256, (2, 16, 16, 3), dtype=np.uint8)
    )
    expected = normalize_tiles(everything.numpy())
    assert np.array_equal(normalize_tiles_torch(everything).numpy(), expected)


def test_normalize_rejects_wrong_input():
    with pytest.raises(ValueError):
        normalize_tiles(np.zeros((2, S, S, 3), dtype=np.float32))
    with pytest.raises(ValueError):
        normalize_tiles(np.zeros((S, S, 3), dtype=np.uint8))


@pytest.mark.parametrize("fmt", ["png", "webp", "raw"])
def test_lossless_roundtrip(fmt):
    tiles = image_tiles(photo_like((900, 300)), (3, 1))
    blobs = encode_tiles(tiles, fmt)
    assert len(blobs) == 4
    assert np.array_equal(decode_tiles(blobs), tiles_array(tiles))
    assert np.array_equal(decode_tiles(blobs, fmt), tiles_array(tiles))
    assert np.array_equal(decode_tile(blobs[2]), np.asarray(tiles[2]))
    from_arrays = encode_tiles(list(tiles_array(tiles)), fmt)
    assert from_arrays == blobs


def test_webp_storage_is_bit_identical_to_the_original():
    data = SOURCES["rgba_png"]((640, 480))
    ours, grid = our_tensor(data, "webp")
    assert np.array_equal(ours, reference_tensor(reference_crops(reference_open(data), *grid)))


def test_raw_tile_starting_like_a_jpeg_is_read_as_raw():
    tile = np.zeros(pixels.TILE_SHAPE, dtype=np.uint8)
    tile[0, 0] = (0xFF, 0xD8, 0xFF)  # the JPEG signature as a first pixel
    (blob,) = encode_tiles([tile], "raw")
    assert np.array_equal(decode_tile(blob), tile)
    (jpeg,) = encode_tiles([tile], "jpeg")
    assert decode_tile(jpeg, "jpeg").shape == pixels.TILE_SHAPE


def test_png_compress_level_changes_size_not_pixels():
    tiles = image_tiles(photo_like((500, 480)), (1, 1))
    fast, small = encode_tiles(tiles, compress_level=1), encode_tiles(tiles, compress_level=9)
    assert np.array_equal(decode_tile(fast[0]), decode_tile(small[0]))


def test_encode_and_decode_reject_bad_tiles():
    with pytest.raises(ValueError):
        encode_tiles([Image.new("RGB", (10, 10))])
    with pytest.raises(ValueError):
        encode_tiles([Image.new("L", (S, S))])
    with pytest.raises(ValueError):
        encode_tiles([np.zeros((S, S, 3), dtype=np.float32)])
    with pytest.raises(ValueError):
        encode_tiles([Image.new("RGB", (S, S))], "gif")
    with pytest.raises(ValueError):
        decode_tile(b"garbage")
    with pytest.raises(ValueError):
        decode_tile(encoded(Image.new("RGB", (S, 10)), "PNG"))
    with pytest.raises(ValueError):
        decode_tile(encoded(Image.new("L", (S, S)), "PNG"))
    png = encode_tiles([Image.new("RGB", (S, S))])[0]
    with pytest.raises(ValueError):
        decode_tile(png[:100])  # truncated
    with pytest.raises(ValueError):
        decode_tile(png, "jpeg")  # wrong explicit format
    with pytest.raises(ValueError):
        decode_tile(png, "raw")
    with pytest.raises(ValueError):
        decode_tile(png, "gif")


# --------------------------------------------------------------------------------------------
# loading images


def reason_of(fn, *args) -> str:
    with pytest.raises(SkipSample) as info:
        fn(*args)
    return str(info.value.reason)


def test_load_image_from_path_and_bytes(tmp_path):
    data = SOURCES["cmyk_jpeg"]((120, 80))
    path = tmp_path / "x.jpg"
    path.write_bytes(data)
    from_path = load_image(MediaRef("image", path=str(path)))
    from_bytes = load_image(MediaRef("image", data=data, name="x"))
    assert from_path.mode == from_bytes.mode == "RGB" and from_path.size == (120, 80)
    assert np.array_equal(np.asarray(from_path), np.asarray(reference_open(data)))
    assert np.array_equal(np.asarray(from_path), np.asarray(from_bytes))


def test_load_image_errors(tmp_path, monkeypatch):
    assert reason_of(load_image, MediaRef("image", path=str(tmp_path / "no.png"))) == (
        "missing_media"
    )
    assert reason_of(load_image, MediaRef("image", path=str(tmp_path))) == "missing_media"
    assert reason_of(load_image, MediaRef("image", data=b"not an image", name="g")) == (
        "corrupt_image"
    )
    truncated = encoded(photo_like((300, 200)), "JPEG", quality=95)[:3000]
    assert reason_of(load_image, MediaRef("image", data=truncated, name="t")) == "corrupt_image"
    truncated_png = encoded(photo_like((300, 200)), "PNG")[:5000]
    assert reason_of(load_image, MediaRef("image", data=truncated_png, name="t")) == (
        "corrupt_image"
    )
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    bomb = MediaRef("image", data=encoded(Image.new("RGB", (100, 100)), "PNG"), name="b")
    assert reason_of(load_image, bomb) == "decompression_bomb"
    warn_only = MediaRef("image", data=encoded(Image.new("RGB", (40, 40)), "PNG"), name="w")
    assert load_image(warn_only).size == (40, 40)  # between 1x and 2x the limit: allowed


def image_plan(ref: MediaRef, width: int, height: int) -> ImagePlan:
    grid = choose_grid(width, height)
    return ImagePlan(ref, width, height, grid, num_tiles(grid), count_image_tokens(grid))


def test_plan_tiles(tmp_path):
    path = tmp_path / "a.png"
    photo_like((700, 300)).save(path)
    ref = MediaRef("image", path=str(path))
    tiles = plan_tiles(image_plan(ref, 700, 300))
    assert len(tiles) == num_tiles(choose_grid(700, 300))
    assert reason_of(plan_tiles, image_plan(ref, 300, 700)) == "corrupt_image"


# --------------------------------------------------------------------------------------------
# video frames

VW, VH, BLOCK = 64, 48, 16


def pattern(i: int) -> np.ndarray:
    """Frame i: its number in 12 black/white 16-px blocks (survives lossy coding)."""
    bits = np.array([(i >> b) & 1 for b in range(12)], dtype=np.uint8).reshape(3, 4) * 255
    return np.repeat(np.kron(bits, np.ones((BLOCK, BLOCK), dtype=np.uint8))[:, :, None], 3, 2)


def number(image: Image.Image) -> int:
    rgb = np.asarray(image)
    assert rgb.shape == (VH, VW, 3)
    bits = (rgb[BLOCK // 2 :: BLOCK, BLOCK // 2 :: BLOCK].mean(axis=2) > 128).ravel()
    return int(sum(int(b) << k for k, b in enumerate(bits)))


def write_mp4(path: Path, n: int) -> Path:
    with av.open(str(path), "w") as out:
        stream = out.add_stream("mpeg4", rate=10)
        stream.width, stream.height, stream.pix_fmt = VW, VH, "yuv420p"
        for i in range(n):
            for packet in stream.encode(av.VideoFrame.from_ndarray(pattern(i), format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return path


def video_plan(path, indices, total=30, fps=10.0) -> VideoPlan:
    ref = MediaRef("video", path=str(path))
    return VideoPlan(ref, total, fps, tuple(indices), len(indices), 258 * len(indices))


def test_video_frames_from_file(tmp_path):
    path = write_mp4(tmp_path / "v.mp4", 30)
    frames = video_frames(video_plan(path, [0, 3, 10, 29]))
    assert [f.mode for f in frames] == ["RGB"] * 4
    assert [number(f) for f in frames] == [0, 3, 10, 29]
    tiles = video_tiles(video_plan(path, [0, 3, 10, 29]))
    assert [t.size for t in tiles] == [(S, S)] * 4
    assert np.array_equal(np.asarray(tiles[1]), np.asarray(reference_square(frames[1])))
    assert (np.asarray(tiles[0])[:20] == (123, 116, 103)).all()  # 64x48: padded top and bottom
    assert video_frames(video_plan(path, [])) == []


def test_video_frames_from_directory_in_natural_order(tmp_path):
    folder = tmp_path / "frames"
    (folder / "sub").mkdir(parents=True)
    for i in range(1, 13):  # frame_1 .. frame_12: natural order puts 10-12 last
        Image.fromarray(pattern(i)).save(folder / f"frame_{i}.png")
    (folder / "notes.txt").write_text("ignored")
    frames = video_frames(video_plan(folder, [0, 1, 8, 9, 11], total=12, fps=1.0))
    assert [number(f) for f in frames] == [1, 2, 9, 10, 12]
    assert np.array_equal(np.asarray(frames[0]), pattern(1))  # PNG frames: exact


def test_video_frame_directory_opens_like_the_original(tmp_path):
    folder = tmp_path / "frames"
    folder.mkdir()
    Image.fromarray(pattern(5)).convert("L").save(folder / "1.jpg")
    (frame,) = video_frames(video_plan(folder, [0], total=1, fps=1.0))
    expected = Image.open(folder / "1.jpg").convert("RGB")
    assert frame.mode == "RGB" and np.array_equal(np.asarray(frame), np.asarray(expected))


def test_video_errors(tmp_path):
    assert reason_of(video_frames, video_plan(tmp_path / "none.mp4", [0])) == "missing_media"
    garbage = tmp_path / "bad.mp4"
    garbage.write_bytes(b"\x00" * 5000)
    assert reason_of(video_frames, video_plan(garbage, [0])) == "bad_video"
    path = write_mp4(tmp_path / "short.mp4", 5)
    assert reason_of(video_frames, video_plan(path, [2, 7])) == "bad_video"
    empty = tmp_path / "empty"
    empty.mkdir()
    assert reason_of(video_frames, video_plan(empty, [0])) == "empty_frame_dir"
    folder = tmp_path / "frames"
    folder.mkdir()
    Image.fromarray(pattern(1)).save(folder / "1.png")
    (folder / "2.png").write_bytes(b"not a png")
    assert reason_of(video_frames, video_plan(folder, [0, 2], total=3)) == "too_few_frames"
    assert reason_of(video_frames, video_plan(folder, [0, 1], total=2)) == "corrupt_image"
    embedded = VideoPlan(MediaRef("video", data=b"x", name="e"), 1, 1.0, (0,), 1, 258)
    assert reason_of(video_frames, embedded) == "bad_video"


# --------------------------------------------------------------------------------------------
# layering


def test_pixels_does_not_import_torch():
    code = "import sys, lvita_data.media.tiles; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
