"""A small, deterministic demo corpus in every native format the readers support.

`make_demo_corpus(root, seed=0)` writes (about 3 MB, about 5 s on 2 cores)::

    root/
      longvita/                       Long-VITA-Training-Data layout (format longvita_jsonl)
        images/*.jpg|png              drawn pictures, sizes chosen so InternVL grids 1x1 .. 4x3
                                      (every cols 1..4 x rows 1..3) and 1x4 occur; comic panels
        images/bad/                   truncated.jpg (corrupt), bomb.png (decompression bomb)
        videos/*.mp4                  H.264, 160x120 / 320x240, 10/24/25/30 fps, 3 s .. 90 s
        videos/bad/                   truncated.mp4, garbage.mp4, zero_frames.mp4
        frames/clip_a|clip_b/frame_{1..N}.jpg, frames/ShareGPTVideo/.../frame_{1..16}.jpg,
        frames/empty_clip/            (empty frame directory)
        image_caption.jsonl multi_image.jsonl video_qa.jsonl long_video.jsonl bad_records.jsonl
      llava/                          (format llava_json)
        images/coco/train2017/*.jpg images/sam/*.jpg
        videos/academic_source/*.mp4 videos/liwei_youtube_videos/*.mp4
        sharegpt4v.json               JSON array, image + conversations (some rows without tags)
        llava_video_178k.jsonl        video + conversations with LLaVA-Video's <image> tag
      cauldron/chartqa-00000-of-00001.parquet   the_cauldron schema, row groups of 8
      onevision/ov-00000-of-00001.parquet       LLaVA-OneVision-Data schema, row groups of 8
      text/long_alpaca.jsonl long_messages.jsonl short_chat.jsonl

Bad records, and where they are (expected reject reason in brackets):

- ``longvita/bad_records.jsonl`` (18 bad rows among 48, rate 0.375): malformed JSON line
  [malformed_json]; messages not a list, content not a string, images an int [bad_field_type];
  role "robot" [unknown_role]; empty messages [empty_conversation]; no assistant turn
  [no_assistant_turn]; two ``<image>`` tags for one image, a ``<video>`` tag without video
  [tag_mismatch]; ``../`` path and absolute path [media_path_escape]; missing image file
  [missing_media]; truncated JPEG [corrupt_image]; PNG header claiming 30000x30000 pixels
  [decompression_bomb]; truncated mp4, garbage bytes named .mp4, mp4 without any video frame
  [bad_video]; empty frame directory [empty_frame_dir].
- ``llava/sharegpt4v.json``: one row with role "bot" [unknown_role].
- ``llava/llava_video_178k.jsonl``: one malformed JSON line [malformed_json].
- ``cauldron/chartqa-00000-of-00001.parquet``: one row whose image list holds a null
  [bad_field_type].
- ``onevision/ov-00000-of-00001.parquet``: one row with a null image but an ``<image>`` tag
  [tag_mismatch].
- ``text/long_alpaca.jsonl``: one text of about 330K characters (> 64K tokens) [too_long at every
  demo stage].

Determinism: every part draws from its own ``numpy`` generator seeded by (seed, part). Images,
JSON and parquet files are byte-identical for the same seed and library versions; videos are
encoded by libx264 with one thread and fixed options (byte-identical in practice; the decoded
frames are identical in any case).

Modules: ``specs`` (what the corpus holds), ``prose`` (text), ``pictures`` and ``videos`` (media),
``builder`` (shared state and writers), ``longvita``, ``llava``, ``parquet`` and ``text`` (one
per native format), ``corpus`` (`make_demo_corpus`).
"""

from lvita_data.demo.corpus import make_demo_corpus
from lvita_data.demo.specs import (
    BAD_KINDS,
    BOMB_SIZE,
    COMIC_PANELS,
    EMPTY_FRAME_DIR,
    FRAME_DIRS,
    HUGE_TEXT_CHARS,
    IMAGE_SPECS,
    LLAVA_IMAGE_SIZES,
    VIDEO_SPECS,
    ImageSpec,
    VideoSpec,
)

__all__ = [
    "BAD_KINDS",
    "BOMB_SIZE",
    "COMIC_PANELS",
    "EMPTY_FRAME_DIR",
    "FRAME_DIRS",
    "HUGE_TEXT_CHARS",
    "IMAGE_SPECS",
    "LLAVA_IMAGE_SIZES",
    "VIDEO_SPECS",
    "ImageSpec",
    "VideoSpec",
    "make_demo_corpus",
]
