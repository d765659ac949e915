"""Small model configurations for CPU tests."""

from __future__ import annotations

import pytest

from lvita_model.config import LLMConfig, LongVitaConfig, VisionConfig

SMALL_LLM = LLMConfig(
    vocab_size=512, hidden_size=64, intermediate_size=96, num_layers=2, num_heads=4, num_kv_heads=2
)
SMALL_VISION = VisionConfig(
    image_size=56, patch_size=14, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=2
)


@pytest.fixture
def small_config() -> LongVitaConfig:
    """A Long-VITA model with 56-px tiles (4 tokens per tile) and a 512-token vocabulary."""
    return LongVitaConfig(llm=SMALL_LLM, vision=SMALL_VISION, vision_chunk_tiles=2)
