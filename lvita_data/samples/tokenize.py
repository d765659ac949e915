"""Record -> exact tokenized sample (or a reason to reject it), from metadata only.

For one `RawRecord` and its per-turn content ids: lay out ChatML (`template`), check the tag
counts, read each image's size from its header (`media.probe_image`) and pick its grid
(`tiling`), read each video's frame count and fps from its container or list its frame directory,
and pick frame indices (`frames`). When the sample overflows `pack.max_seq_len` because of its
videos and the stage allows it, the frame cap is lowered (binary search) until it fits; the
chosen and requested counts are both kept. Anything still too long is a `too_long` reject.
No pixel is decoded unless `verify_media` asks for it.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import lru_cache

from lvita_data.errors import SkipSample
from lvita_data.manifest import ImageConfig, StageManifest, VideoConfig
from lvita_data.media.probe import probe_image
from lvita_data.media.video import list_frame_dir, probe_video
from lvita_data.samples.frames import (
    fit_frames_to_budget,
    frame_dir_fps,
    frame_dir_indices,
    video_frame_indices,
)
from lvita_data.samples.template import (
    ChatTemplate,
    TextSummary,
    check_tag_counts,
    expand_vision,
    layout_conversation,
    media_order,
    summarize_conversation,
)
from lvita_data.samples.tiling import choose_grid, count_image_tokens, num_tiles
from lvita_data.samples.vision_tokens import count_video_tokens
from lvita_data.schema import (
    ImagePlan,
    MediaRef,
    RawRecord,
    RejectReason,
    SamplePlan,
    TokenizedSample,
    VideoPlan,
)

IMAGE_SIZES = 65536
"""Bound of `SampleRules.image_sizes` (~13 MB of paths and sizes)."""


@dataclass(frozen=True, slots=True)
class SampleRules:
    """What a stage manifest says about turning records into samples."""

    template: ChatTemplate
    max_seq_len: int
    image: ImageConfig
    video: VideoConfig | None
    verify_media: bool = False
    image_sizes: dict[str, tuple[int, int]] = field(default_factory=dict, compare=False, repr=False)
    """Sizes `plan_counts` has probed, by path (without `verify_media`): one set of rules
    plans one file, so each image a file names is probed once for it (LLaVA-style sets name an
    image in several records). At most `IMAGE_SIZES` entries, then it starts over."""

    @classmethod
    def from_manifest(
        cls, manifest: StageManifest, template: ChatTemplate, *, verify_media: bool = False
    ) -> SampleRules:
        return cls(
            template=template,
            max_seq_len=manifest.pack.max_seq_len,
            image=manifest.image,
            video=manifest.video,
            verify_media=verify_media,
        )


@dataclass(frozen=True, slots=True)
class _VideoSource:
    ref: MediaRef
    num_frames: int
    fps: float
    is_frame_dir: bool

    def indices(self, cap: int, max_fps: float) -> tuple[int, ...]:
        if self.is_frame_dir:
            return tuple(
                frame_dir_indices(
                    self.num_frames, dir_fps=self.fps, max_frames=cap, max_fps=max_fps
                )
            )
        return tuple(
            video_frame_indices(self.num_frames, self.fps, max_frames=cap, max_fps=max_fps)
        )


def plan_image(ref: MediaRef, rules: SampleRules) -> ImagePlan:
    width, height = probe_image(ref, verify=rules.verify_media)
    grid = choose_grid(
        width, height, min_tiles=rules.image.min_tiles, max_tiles=rules.image.max_tiles
    )
    return ImagePlan(
        source=ref,
        width=width,
        height=height,
        grid=grid,
        num_tiles=num_tiles(grid),
        num_tokens=count_image_tokens(grid),
    )


def _probe_video_source(ref: MediaRef) -> _VideoSource:
    assert ref.path is not None, "videos are referenced by path"
    if os.path.isdir(ref.path):
        frames = list_frame_dir(ref.path)
        return _VideoSource(ref, len(frames), frame_dir_fps(ref.path), is_frame_dir=True)
    info = probe_video(ref.path)
    return _VideoSource(ref, info.num_frames, info.fps, is_frame_dir=False)


def _video_plans(
    sources: Sequence[_VideoSource], cap: int, requested: Sequence[int], max_fps: float
) -> tuple[VideoPlan, ...]:
    plans = []
    for source, wanted in zip(sources, requested, strict=True):
        indices = source.indices(cap, max_fps)
        plans.append(
            VideoPlan(
                source=source.ref,
                num_source_frames=source.num_frames,
                fps=source.fps,
                frame_indices=indices,
                requested_frames=wanted,
                num_tokens=count_video_tokens(len(indices)),
            )
        )
    return tuple(plans)


def plan_videos(
    refs: Sequence[MediaRef], text: TextSummary, images: Sequence[ImagePlan], rules: SampleRules
) -> tuple[VideoPlan, ...]:
    if not refs:
        return ()
    if rules.video is None:
        raise SkipSample(RejectReason.video_not_allowed, "this stage has no video: section")
    config = rules.video
    sources = [_probe_video_source(ref) for ref in refs]
    requested = [len(s.indices(config.max_frames, config.max_fps)) for s in sources]
    cap = config.max_frames
    if config.fit_to_budget:

        def length_for_cap(n: int) -> int:
            return text.expanded_length(images, _video_plans(sources, n, requested, config.max_fps))

        fitted = fit_frames_to_budget(config.max_frames, length_for_cap, rules.max_seq_len)
        cap = fitted if fitted is not None else 1
    return _video_plans(sources, cap, requested, config.max_fps)


def plan_record(
    record: RawRecord, contents: Sequence[Sequence[int]], rules: SampleRules
) -> SamplePlan:
    """Length and media plans of a record from metadata; raises SkipSample with a reason."""
    text = summarize_conversation(record.turns, contents, rules.template)
    check_tag_counts(text, len(record.images), len(record.videos))
    images = tuple(plan_image(ref, rules) for ref in record.images)
    videos = plan_videos(record.videos, text, images, rules)
    length = text.expanded_length(images, videos)
    if length > rules.max_seq_len:
        raise SkipSample(
            RejectReason.too_long, f"{length} tokens > pack.max_seq_len {rules.max_seq_len}"
        )
    return SamplePlan(length=length, images=images, videos=videos)


def _image_size(ref: MediaRef, rules: SampleRules) -> tuple[int, int]:
    sizes = rules.image_sizes
    size = sizes.get(ref.path) if ref.path is not None and not rules.verify_media else None
    if size is None:
        size = probe_image(ref, verify=rules.verify_media)
        if ref.path is not None and not rules.verify_media:
            if len(sizes) >= IMAGE_SIZES:
                sizes.clear()
            sizes[ref.path] = size
    return size


@lru_cache(maxsize=65536)
def _image_counts(width: int, height: int, min_tiles: int, max_tiles: int) -> tuple[int, int]:
    """(tokens, tiles) of an image of this size (`plan_image`'s numbers, cached by size)."""
    grid = choose_grid(width, height, min_tiles=min_tiles, max_tiles=max_tiles)
    return count_image_tokens(grid), num_tiles(grid)


def plan_counts(
    record: RawRecord, contents: Sequence[Sequence[int]], rules: SampleRules
) -> tuple[int, int, int, int]:
    """(length, tiles, frames, requested frames) of `plan_record`'s plan, or its SkipSample; a
    record without videos (most) is summed up directly, without the plan objects."""
    if record.videos:
        plan = plan_record(record, contents, rules)
        frames = sum(len(v.frame_indices) for v in plan.videos)
        return plan.length, plan.num_tiles, frames, sum(v.requested_frames for v in plan.videos)
    text = summarize_conversation(record.turns, contents, rules.template)
    check_tag_counts(text, len(record.images), 0)
    length, tiles = text.length - text.num_image_tags, 0
    min_tiles, max_tiles = rules.image.min_tiles, rules.image.max_tiles
    for ref in record.images:
        width, height = _image_size(ref, rules)
        image_tokens, image_tiles = _image_counts(width, height, min_tiles, max_tiles)
        length += image_tokens
        tiles += image_tiles
    if length > rules.max_seq_len:
        raise SkipSample(
            RejectReason.too_long, f"{length} tokens > pack.max_seq_len {rules.max_seq_len}"
        )
    return length, tiles, 0, 0


def tokenize_record(
    record: RawRecord, contents: Sequence[Sequence[int]], rules: SampleRules
) -> TokenizedSample:
    """The exact sample (ids and labels) of a record; raises SkipSample with a reason."""
    plan = plan_record(record, contents, rules)
    ids, labels = layout_conversation(record.turns, contents, rules.template)
    special = rules.template.special
    input_ids, labels = expand_vision(ids, labels, plan.images, plan.videos, special)
    if input_ids.shape[0] != plan.length:
        raise AssertionError(f"planned {plan.length} tokens, built {input_ids.shape[0]}")
    return TokenizedSample(
        dataset=record.dataset,
        source_file=record.source_file,
        record_id=record.record_id,
        input_ids=input_ids,
        labels=labels,
        plan=plan,
        media_order=media_order(ids, special),
    )
