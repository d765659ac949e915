"""`lvita generate`: a prompt (with images or a video) -> generated text, with a KV cache.

    lvita generate MODEL --prompt TEXT [--image PATH ...] [--video PATH --max-frames N]
                   [--max-new-tokens N] [--prefill-chunk N] [--backend auto]
                   [--temperature T --top-k K --seed S] [--dtype auto] [--tokenizer SPEC]
    torchrun --nproc-per-node P -m pipelines generate MODEL ...   (context parallel, CP = P)

MODEL is a checkpoint directory (`lvita_model.weights.load_pretrained`: config.json +
safetensors, e.g. a released Long-VITA checkpoint as published or what lvita saved; its
tokenizer.json is used when present) or a preset name (`tiny`, ...): a
**randomly initialized** model, which the output says; its text is noise, useful to check the
pipeline end to end.

The prompt is laid out exactly as the data pipeline lays out a training sample (`lvita_data`): one
user turn ``<|im_start|>user\\n{content}<|im_end|>\\n`` followed by ``<|im_start|>assistant\\n``.
Without ``<image>`` / ``<video>`` tags in the text, one ``<image>\\n`` per image and one
``<video>\\n`` per video are put in front of it. Each tag is expanded by
`lvita_data.samples.tokenize.tokenize_record` (dynamic tiling up to 12 tiles + thumbnail for images;
for a video, the original's frame sampling at 1 fps capped at ``--max-frames``, 258 tokens per
frame); the tiles come from `lvita_data.media.tiles` (bit-identical to the original's preprocessing)
in the order of the tags, and the features overwrite the placeholder positions.

Under torchrun (RANK / WORLD_SIZE / MASTER_ADDR set, WORLD_SIZE > 1) the run is context
parallel over all ranks: gloo on CPU, nccl on CUDA, hccl on NPU (device ``LOCAL_RANK``); every
rank builds the same prompt, prefill is zigzag-sharded, each rank keeps its KV shard, decoding
merges partial attention by LSE (`lvita_model.inference`); `pipelines.cli` prints on rank 0.

`generate_text(request)` returns the text and what `pipelines.cli` reports: on stdout the
generated text (special tokens kept, e.g. the final ``<|im_end|>``), on stderr what was loaded,
the prompt length, tokens generated, prefill time and decode speed. Problems are raised:
`GenerateError` for bad arguments (an image for a model without a vision tower, a tag count that
does not match the files), `GenerateInputError` for a missing or unreadable model or media;
`pipelines.cli` maps them to exit codes 2 and 3.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # heavy imports stay out of `lvita --help` and the other commands
    import torch

    from lvita_data.tokenizer.tokenizer import LongVitaTokenizer
    from lvita_model.model import LongVitaForCausalLM

from pipelines.errors import GenerateError, GenerateInputError

UNLIMITED_LENGTH = 1 << 40
"""No packed-length cap at inference: the prompt is as long as its media make it."""


@dataclass(frozen=True)
class Prompt:
    input_ids: torch.Tensor
    """int64 [T]: the ChatML prompt, ending with ``<|im_start|>assistant\\n``."""
    pixel_values: torch.Tensor | None
    """float32 [N, 3, 448, 448] normalised tiles in placeholder order (None without media)."""
    image_token_positions: torch.Tensor | None
    """int64 [N, 256]: the placeholder positions of each tile."""


# ----------------------------------------------------------------------------------------------
# The prompt


def _content(prompt: str, num_images: int, num_videos: int) -> str:
    """The user turn's text: tags in front unless the prompt places them itself."""
    if "<image>" in prompt or "<video>" in prompt:
        return prompt
    return "<image>\n" * num_images + "<video>\n" * num_videos + prompt


def build_prompt(
    tokenizer: LongVitaTokenizer,
    prompt: str,
    *,
    images: list[str] = (),  # type: ignore[assignment]
    videos: list[str] = (),  # type: ignore[assignment]
    max_frames: int = 64,
    tokens_per_tile: int = 256,
) -> Prompt:
    """Ids, tiles and placeholder positions of one user turn + the assistant header."""
    import numpy as np

    from lvita_data.errors import SkipSample
    from lvita_data.manifest import ImageConfig, VideoConfig
    from lvita_data.samples.template import ChatTemplate
    from lvita_data.samples.tokenize import SampleRules, tokenize_record
    from lvita_data.samples.vision_tokens import vision_placeholder_positions
    from lvita_data.schema import MediaRef, RawRecord, Turn

    content = _content(prompt, len(images), len(videos))
    record = RawRecord(
        dataset="cli",
        source_file="<prompt>",
        record_id="0",
        turns=(Turn("user", content),),
        images=tuple(MediaRef("image", path=os.path.abspath(p), name=p) for p in images),
        videos=tuple(MediaRef("video", path=os.path.abspath(p), name=p) for p in videos),
    )
    template = ChatTemplate.from_encoder(tokenizer.special_ids, tokenizer.encode)
    rules = SampleRules(
        template=template,
        max_seq_len=UNLIMITED_LENGTH,
        image=ImageConfig(),
        video=VideoConfig(max_frames=max_frames, fit_to_budget=False),
    )
    try:
        sample = tokenize_record(record, [tokenizer.encode(content)], rules)
        tiles = _tiles(sample)
    except SkipSample as error:
        kind = GenerateInputError if error.reason in _MISSING_REASONS else GenerateError
        raise kind(str(error)) from None
    ids = np.concatenate([sample.input_ids, template.role_prefix["assistant"]])
    positions = vision_placeholder_positions(ids, tokenizer.special_ids)
    return _as_tensors(ids, tiles, positions, tokens_per_tile)


_MISSING_REASONS = frozenset(
    ("missing_media", "corrupt_image", "bad_video", "empty_frame_dir", "too_few_frames")
)


def _tiles(sample: Any) -> Any:
    """uint8 [N, 448, 448, 3] tiles of the sample's media in tag order (None without media)."""
    from lvita_data.media.tiles import sample_tiles, tiles_array

    tiles = sample_tiles(sample)
    return tiles_array(tiles) if tiles else None


def _as_tensors(ids: Any, tiles: Any, positions: Any, tokens_per_tile: int) -> Prompt:
    import torch

    from lvita_data.media.tiles import normalize_tiles

    input_ids = torch.from_numpy(ids.astype("int64"))
    if tiles is None:
        return Prompt(input_ids, None, None)
    if positions.shape[0] != tiles.shape[0] * tokens_per_tile:
        raise GenerateError(
            f"{tiles.shape[0]} tiles need {tiles.shape[0] * tokens_per_tile} placeholders of "
            f"the model's {tokens_per_tile} per tile; the prompt has {positions.shape[0]}"
        )
    pixel_values = torch.from_numpy(normalize_tiles(tiles))  # [N, 3, 448, 448]
    placeholders = torch.from_numpy(positions.astype("int64")).view(-1, tokens_per_tile)
    return Prompt(input_ids, pixel_values, placeholders)


# ----------------------------------------------------------------------------------------------
# The model


def _load_model(
    spec: str, *, device: torch.device, dtype: torch.dtype, backend: str, seed: int
) -> tuple[LongVitaForCausalLM, bool]:
    """(model in eval mode, whether its weights are random) from a preset or a checkpoint
    (`pipelines.runtime.load_model`); `GenerateInputError` when it cannot be loaded."""
    from lvita_model.config import PRESETS
    from lvita_model.errors import ConfigError, WeightsError
    from pipelines.runtime import load_model

    if spec not in PRESETS and not Path(spec).exists():
        raise GenerateInputError(
            f"model {spec!r}: no such checkpoint directory and not a preset ({', '.join(PRESETS)})"
        )
    try:
        model, random = load_model(
            spec, device=device, dtype=dtype, attention_backend=backend, seed=seed
        )
    except (ConfigError, WeightsError, OSError) as error:
        raise GenerateInputError(f"cannot load model {spec!r}: {error}") from None
    return model.eval(), random


def _tokenizer(spec: str | None, model_spec: str) -> LongVitaTokenizer:
    from lvita_data.errors import SourceError
    from lvita_data.tokenizer.tokenizer import load_tokenizer

    if spec is None:
        has_own = (Path(model_spec) / "tokenizer.json").is_file()
        spec = model_spec if has_own else "qwen2.5"
    try:
        return load_tokenizer(spec)
    except SourceError as error:
        raise GenerateInputError(f"tokenizer: {error}") from None


# ----------------------------------------------------------------------------------------------
# Context parallelism from torchrun's environment


def _distributed() -> tuple[Any, torch.device, bool]:
    """(CP group or None, device, whether this call created the group): a process group over
    all ranks when WORLD_SIZE > 1 (gloo on CPU, nccl on CUDA, hccl on NPU: `pipelines.runtime`,
    as `lvita train`); a group that already exists (a caller's) is used and left alone."""
    import torch.distributed as dist

    from pipelines.runtime import device_type, join_process_group, select_device

    kind = device_type()
    device = select_device(kind)
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return None, device, False
    owns = join_process_group(kind, device)
    return dist.group.WORLD, device, owns


def _is_main() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


# ----------------------------------------------------------------------------------------------
# The command


@dataclass(frozen=True, kw_only=True)
class GenerateRequest:
    """What `lvita generate` was asked for (its flags, see `pipelines.cli`)."""

    model: str
    """A checkpoint directory or a preset name (random weights)."""
    prompt: str
    images: list[str] = field(default_factory=list)
    videos: list[str] = field(default_factory=list)
    max_frames: int = 64
    max_new_tokens: int = 64
    prefill_chunk: int | None = None
    backend: str = "auto"
    dtype: str = "auto"
    """auto, float32, bfloat16 or float16."""
    temperature: float = 0.0
    top_k: int = 0
    seed: int = 0
    tokenizer: str | None = None


@dataclass(frozen=True)
class Generated:
    """The result of `generate_text`, and what the command reports about it."""

    text: str
    """The generated tokens decoded, special tokens kept."""
    notes: list[str]
    """Lines for stderr: a random-weights warning, then the run's summary."""
    is_main: bool
    """Whether this process is rank 0 (the only one that reports)."""


def generate_text(request: GenerateRequest) -> Generated:
    """Generate from the request's prompt; under torchrun, context parallel over all ranks."""
    import torch

    from lvita_model.inference import Sampling, generate
    from pipelines.runtime import compute_dtype

    if request.max_new_tokens < 1 or (
        request.prefill_chunk is not None and request.prefill_chunk < 1
    ):
        raise GenerateError("--max-new-tokens and --prefill-chunk must be >= 1")
    group, device, owns_group = _distributed()
    dtype = compute_dtype(request.dtype, device)
    model, random = _load_model(
        request.model, device=device, dtype=dtype, backend=request.backend, seed=request.seed
    )
    tokenizer = _tokenizer(request.tokenizer, request.model)
    if (request.images or request.videos) and model.config.vision is None:
        raise GenerateError(f"model {request.model!r} has no vision tower: drop the media")
    per_tile = model.config.tokens_per_tile if model.config.vision is not None else 256
    prompt = build_prompt(
        tokenizer,
        request.prompt,
        images=request.images,
        videos=request.videos,
        max_frames=request.max_frames,
        tokens_per_tile=per_tile,
    )
    result = generate(
        model,
        prompt.input_ids.to(device),
        pixel_values=None if prompt.pixel_values is None else prompt.pixel_values.to(device),
        image_token_positions=prompt.image_token_positions,
        max_new_tokens=request.max_new_tokens,
        prefill_chunk=request.prefill_chunk,
        sampling=Sampling(request.temperature, request.top_k, request.seed),
        eos_token_id=tokenizer.special_ids.im_end,
        group=group,
    )
    notes = _notes(request, result, random, dtype, prompt, world=_world_size())
    generated = Generated(tokenizer.decode(result.tokens), notes, _is_main())
    if owns_group:
        torch.distributed.destroy_process_group()
    return generated


def _world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def _notes(
    request: GenerateRequest, result: Any, random: bool, dtype: Any, prompt: Prompt, world: int
) -> list[str]:
    notes = []
    if random:
        notes.append(
            f"note: {request.model!r} is a preset with RANDOM weights (seed {request.seed}); "
            "the text is noise"
        )
    tiles = 0 if prompt.pixel_values is None else prompt.pixel_values.shape[0]
    decode_steps = max(len(result.tokens) - 1, 1)
    notes.append(
        f"prompt {result.prompt_tokens} token(s) ({tiles} tile(s)), generated "
        f"{len(result.tokens)} token(s){' (EOS)' if result.stopped_at_eos else ''}; "
        f"prefill {result.prefill_seconds:.2f} s, decode "
        f"{1000 * result.decode_seconds / decode_steps:.1f} ms/token; {dtype}, CP={world}"
    )
    return notes
