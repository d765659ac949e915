"""Model configuration: frozen dataclasses for the vision tower, the projector and the LLM.

Three presets: ``tiny`` (CPU tests and the demo: the real 448-px tile and 256 tokens per tile,
the real vocabulary, a few-dozen-wide network), ``qwen2.5-0.5b`` (the Qwen2.5-0.5B decoder shape
with the Long-VITA vision side, for benchmarks) and ``long-vita-14b`` (the released model:
InternViT-300M-448px + Qwen2.5-14B, reference section 1). Reading and writing Hugging Face
``config.json`` files is `lvita_model.config.hf`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from lvita_model.errors import ConfigError


def _positive(config: Any, *names: str) -> None:
    for name in names:
        value = getattr(config, name)
        if not isinstance(value, int) or value <= 0:
            raise ConfigError(
                f"{type(config).__name__}.{name} must be a positive int, got {value!r}"
            )


@dataclass(frozen=True, kw_only=True, slots=True)
class VisionConfig:
    """InternViT (v1 / 300M-448px layout): pre-norm ViT with layer scale and a CLS token."""

    image_size: int = 448
    patch_size: int = 14
    hidden_size: int = 1024
    intermediate_size: int = 4096
    num_layers: int = 24
    num_heads: int = 16
    layer_norm_eps: float = 1e-6
    qkv_bias: bool = True
    hidden_act: str = "gelu"

    def __post_init__(self) -> None:
        _positive(
            self,
            "image_size",
            "patch_size",
            "hidden_size",
            "intermediate_size",
            "num_layers",
            "num_heads",
        )
        if self.image_size % self.patch_size:
            raise ConfigError(
                f"vision image_size {self.image_size} is not a multiple of "
                f"patch_size {self.patch_size}"
            )
        if self.hidden_size % self.num_heads:
            raise ConfigError(
                f"vision hidden_size {self.hidden_size} is not divisible by "
                f"num_heads {self.num_heads}"
            )
        if self.hidden_act != "gelu":
            raise ConfigError(f"vision hidden_act {self.hidden_act!r}: only 'gelu' is built")

    @property
    def grid_size(self) -> int:
        """Patches per side (448 / 14 = 32)."""
        return self.image_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.grid_size**2

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads


@dataclass(frozen=True, kw_only=True, slots=True)
class ProjectorConfig:
    """Pixel shuffle (space-to-depth) -> LayerNorm -> Linear -> GELU -> Linear, no biases."""

    downsample_ratio: float = 0.5
    layer_norm_eps: float = 1e-5
    """torch.nn.LayerNorm's default, as in the original `ResamplerProjector`."""

    def __post_init__(self) -> None:
        if self.downsample_ratio != 0.5:
            raise ConfigError(
                f"projector downsample_ratio {self.downsample_ratio}: only 0.5 is "
                "built (Long-VITA's pixel shuffle)"
            )

    @property
    def shuffle_stride(self) -> int:
        return round(1 / self.downsample_ratio)


@dataclass(frozen=True, kw_only=True, slots=True)
class LLMConfig:
    """Qwen2 decoder: GQA with qkv bias, RMSNorm, SwiGLU, RoPE from explicit position ids."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1_000_000.0
    max_position_embeddings: int = 32768
    tie_word_embeddings: bool = False

    def __post_init__(self) -> None:
        _positive(
            self,
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "num_layers",
            "num_heads",
            "num_kv_heads",
        )
        if self.hidden_size % self.num_heads:
            raise ConfigError(
                f"llm hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}"
            )
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(
                f"llm num_heads {self.num_heads} is not a multiple of "
                f"num_kv_heads {self.num_kv_heads} (GQA groups)"
            )

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads


@dataclass(frozen=True, kw_only=True, slots=True)
class LongVitaConfig:
    """The whole model; `vision` is None for a language-model-only configuration."""

    llm: LLMConfig
    vision: VisionConfig | None = VisionConfig()
    projector: ProjectorConfig = ProjectorConfig()
    vision_chunk_tiles: int = 256
    """Tiles per call of the vision tower (the Megatron path's 256): bounds activation memory
    for thousands of frames."""

    def __post_init__(self) -> None:
        if self.vision_chunk_tiles <= 0:
            raise ConfigError(f"vision_chunk_tiles must be > 0, got {self.vision_chunk_tiles}")
        if self.vision is not None and self.vision.grid_size % self.projector.shuffle_stride:
            raise ConfigError(
                f"vision grid {self.vision.grid_size} is not divisible by the "
                f"pixel-shuffle stride {self.projector.shuffle_stride}"
            )

    @property
    def tokens_per_tile(self) -> int:
        """Vision tokens per tile after the pixel shuffle (256 for 448-px tiles)."""
        if self.vision is None:
            raise ConfigError("a language-model-only configuration has no vision tokens")
        return (self.vision.grid_size // self.projector.shuffle_stride) ** 2

    @property
    def projector_input_size(self) -> int:
        assert self.vision is not None
        return self.vision.hidden_size * self.projector.shuffle_stride**2


# --------------------------------------------------------------------------------------------
# Presets

LONG_VITA_VOCAB = 152064
"""Qwen2.5's embedding rows (151,643 BPE + specials, padded); Long-VITA's added tokens fit."""

_TINY_VISION = VisionConfig(hidden_size=32, intermediate_size=64, num_layers=2, num_heads=2)

PRESETS: dict[str, LongVitaConfig] = {
    "tiny": LongVitaConfig(
        llm=LLMConfig(
            vocab_size=LONG_VITA_VOCAB,
            hidden_size=64,
            intermediate_size=128,
            num_layers=2,
            num_heads=4,
            num_kv_heads=2,
        ),
        vision=_TINY_VISION,
    ),
    "qwen2.5-0.5b": LongVitaConfig(
        llm=LLMConfig(
            vocab_size=151936,
            hidden_size=896,
            intermediate_size=4864,
            num_layers=24,
            num_heads=14,
            num_kv_heads=2,
            tie_word_embeddings=True,
        ),
    ),
    "long-vita-14b": LongVitaConfig(
        llm=LLMConfig(
            vocab_size=LONG_VITA_VOCAB,
            hidden_size=5120,
            intermediate_size=13824,
            num_layers=48,
            num_heads=40,
            num_kv_heads=8,
            max_position_embeddings=1_310_720,
        ),
    ),
}
