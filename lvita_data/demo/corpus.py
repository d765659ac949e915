"""`make_demo_corpus`: writes every part of the demo corpus under one root and summarises it.

Media come first (the annotation files caption what the pictures show), then the annotation files
of each native format. Every part draws from its own generator, so the result depends only on
the seed (and the library versions).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from lvita_data.demo import llava, longvita, parquet, text
from lvita_data.demo.builder import Builder
from lvita_data.demo.pictures import write_llava_images, write_longvita_images
from lvita_data.demo.videos import write_frame_dirs, write_videos

_ANNOTATIONS = {
    "longvita/image_caption.jsonl": longvita.write_image_caption,
    "longvita/multi_image.jsonl": longvita.write_multi_image,
    "longvita/video_qa.jsonl": longvita.write_video_qa,
    "longvita/long_video.jsonl": longvita.write_long_video,
    "longvita/bad_records.jsonl": longvita.write_bad_records,
    "llava/sharegpt4v.json": llava.write_sharegpt4v,
    "llava/llava_video_178k.jsonl": llava.write_llava_video,
    "cauldron/chartqa-00000-of-00001.parquet": parquet.write_cauldron,
    "onevision/ov-00000-of-00001.parquet": parquet.write_onevision,
    "text/long_alpaca.jsonl": text.write_long_alpaca,
    "text/long_messages.jsonl": text.write_long_messages,
    "text/short_chat.jsonl": text.write_short_chat,
}
"""Annotation file -> its writer (returns the number of rows), in the order they are written."""


def _files(root: Path) -> Iterator[Path]:
    for directory, _, names in sorted(os.walk(root)):
        for name in sorted(names):
            yield Path(directory) / name


def make_demo_corpus(root: str | os.PathLike[str], *, seed: int = 0) -> dict[str, Any]:
    """Write the demo corpus under `root` (created if needed); returns a summary.

    The summary has ``root``, ``seed``, ``files`` (relative path -> bytes), ``total_bytes``,
    ``rows`` (annotation file -> number of rows), ``images`` (file, width, height, intended grid),
    ``videos`` (file, fps, frames, seconds, width, height), ``frame_dirs`` and ``bad`` (file, row,
    kind, expected reject reason) for every deliberately bad record.
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    builder = Builder(root, seed)
    write_longvita_images(builder)
    write_llava_images(builder)
    videos = write_videos(builder)
    frame_dirs = write_frame_dirs(builder)
    rows = {rel: write(builder) for rel, write in _ANNOTATIONS.items()}
    files = {str(p.relative_to(root)): p.stat().st_size for p in _files(root)}
    return {
        "root": str(root.resolve()),
        "seed": seed,
        "files": files,
        "total_bytes": sum(files.values()),
        "rows": rows,
        "images": builder.images,
        "videos": videos,
        "frame_dirs": frame_dirs,
        "bad": sorted(builder.bad, key=lambda b: (b["file"], b["row"])),
    }
