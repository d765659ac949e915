"""What the demo corpus holds: image and video sizes, frame directories, bad-record kinds.

Plain constants; the tests import them to check the generated files against.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ImageSpec:
    name: str
    width: int
    height: int
    grid: tuple[int, int]
    """(cols, rows) InternVL's dynamic tiling picks for this size (max 12 tiles)."""


IMAGE_SPECS: tuple[ImageSpec, ...] = (
    ImageSpec("img_1x1_448.jpg", 448, 448, (1, 1)),
    ImageSpec("img_1x1_tiny.png", 32, 32, (1, 1)),
    ImageSpec("img_2x1.jpg", 900, 450, (2, 1)),
    ImageSpec("img_3x1.jpg", 1344, 448, (3, 1)),
    ImageSpec("img_4x1.jpg", 2000, 500, (4, 1)),
    ImageSpec("img_1x2.jpg", 448, 900, (1, 2)),
    ImageSpec("img_2x2.png", 896, 896, (2, 2)),
    ImageSpec("img_3x2.jpg", 1344, 896, (3, 2)),
    ImageSpec("img_4x2.jpg", 1792, 896, (4, 2)),
    ImageSpec("img_1x3.jpg", 448, 1344, (1, 3)),
    ImageSpec("img_2x3.jpg", 896, 1344, (2, 3)),
    ImageSpec("img_3x3.jpg", 1344, 1344, (3, 3)),
    ImageSpec("img_4x3.jpg", 1792, 1344, (4, 3)),
    ImageSpec("img_1x4.png", 300, 1200, (1, 4)),
    ImageSpec("img_odd_1000x700.jpg", 1000, 700, (3, 2)),
    ImageSpec("img_odd_333x517.jpg", 333, 517, (2, 3)),
    ImageSpec("img_odd_640x480.jpg", 640, 480, (4, 3)),
)
"""Images of ``longvita/images`` (the grid is what InternVL's find_closest_aspect_ratio gives)."""

COMIC_PANELS = 8
"""320x320 panels ``longvita/images/comic/panel_{1..8}.png`` (1x1 grid) for multi-image rows."""

LLAVA_IMAGE_SIZES: tuple[tuple[str, int, int], ...] = (
    ("coco/train2017/000000000009.jpg", 640, 480),
    ("coco/train2017/000000000025.jpg", 500, 333),
    ("coco/train2017/000000000030.jpg", 427, 640),
    ("coco/train2017/000000000034.jpg", 612, 612),
    ("coco/train2017/000000000036.jpg", 1024, 683),
    ("coco/train2017/000000000042.jpg", 375, 500),
    ("sam/sa_10001.jpg", 1024, 768),
    ("sam/sa_10002.jpg", 768, 1024),
)


@dataclass(frozen=True)
class VideoSpec:
    name: str
    fps: int
    seconds: int
    width: int
    height: int

    @property
    def frames(self) -> int:
        return self.fps * self.seconds


VIDEO_SPECS: tuple[VideoSpec, ...] = (
    VideoSpec("longvita/videos/clip_10fps_3s.mp4", 10, 3, 160, 120),
    VideoSpec("longvita/videos/clip_24fps_6s.mp4", 24, 6, 160, 120),
    VideoSpec("longvita/videos/clip_25fps_10s.mp4", 25, 10, 320, 240),
    VideoSpec("longvita/videos/clip_30fps_20s.mp4", 30, 20, 160, 120),
    VideoSpec("longvita/videos/clip_24fps_32s.mp4", 24, 32, 160, 120),
    VideoSpec("longvita/videos/long_10fps_80s.mp4", 10, 80, 160, 120),
    VideoSpec("longvita/videos/movie_10fps_90s.mp4", 10, 90, 160, 120),
    VideoSpec("llava/videos/academic_source/clip_25fps_5s.mp4", 25, 5, 160, 120),
    VideoSpec("llava/videos/academic_source/clip_30fps_12s.mp4", 30, 12, 160, 120),
    VideoSpec("llava/videos/liwei_youtube_videos/clip_25fps_30s.mp4", 25, 30, 160, 120),
)
"""``long_10fps_80s`` overflows the demo packed length at stages 2 and 3 (16 / 64 frames x 258
tokens > 4096 / 16384) so it must be fitted; ``movie_10fps_90s`` (the longest) is stage 4 only."""

FRAME_DIRS: tuple[tuple[str, int], ...] = (
    ("longvita/frames/clip_a", 12),
    ("longvita/frames/clip_b", 20),
    ("longvita/frames/ShareGPTVideo/train_300k/v_demo_0001", 16),
)
EMPTY_FRAME_DIR = "longvita/frames/empty_clip"

BAD_KINDS: dict[str, str] = {
    "malformed_json": "malformed_json",
    "messages_not_list": "bad_field_type",
    "content_not_string": "bad_field_type",
    "images_not_strings": "bad_field_type",
    "unknown_role": "unknown_role",
    "empty_conversation": "empty_conversation",
    "no_assistant_turn": "no_assistant_turn",
    "image_tag_mismatch": "tag_mismatch",
    "video_tag_mismatch": "tag_mismatch",
    "path_escape_dotdot": "media_path_escape",
    "path_escape_absolute": "media_path_escape",
    "missing_media": "missing_media",
    "corrupt_image": "corrupt_image",
    "decompression_bomb": "decompression_bomb",
    "truncated_video": "bad_video",
    "garbage_video": "bad_video",
    "zero_frame_video": "bad_video",
    "empty_frame_dir": "empty_frame_dir",
}
"""Every kind of bad record in ``longvita/bad_records.jsonl`` -> the reject reason it must get."""

BOMB_SIZE = (30000, 30000)
"""Pixels claimed by ``images/bad/bomb.png`` (> 2 x PIL's MAX_IMAGE_PIXELS)."""

HUGE_TEXT_CHARS = 330_000
"""Length of the one too-long text in ``text/long_alpaca.jsonl`` (> 64K tokens)."""
