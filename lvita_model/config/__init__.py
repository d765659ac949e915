"""Model configuration: the dataclasses and presets (`base`) and Hugging Face ``config.json``
reading and writing in the original Long-VITA schema (`hf`)."""

from lvita_model.config.base import (
    LONG_VITA_VOCAB,
    PRESETS,
    LLMConfig,
    LongVitaConfig,
    ProjectorConfig,
    VisionConfig,
)
from lvita_model.config.hf import (
    from_hf_config,
    load_config,
    storage_dtype,
    to_hf_config,
    vision_config_from_hf,
)

__all__ = [
    "LONG_VITA_VOCAB",
    "PRESETS",
    "LLMConfig",
    "LongVitaConfig",
    "ProjectorConfig",
    "VisionConfig",
    "from_hf_config",
    "load_config",
    "storage_dtype",
    "to_hf_config",
    "vision_config_from_hf",
]
