"""Every error the model package raises, under one root: `ModelError`.

    ModelError
      ConfigError             (also a ValueError)   a config that is malformed or not built here
      WeightsError            (also a ValueError)   a checkpoint that does not match the model,
                                                    or a damaged one (truncated, altered, missing
                                                    shards)
      AttentionBackendError   (also a RuntimeError) a backend unavailable here or asked too much
      ContextParallelError    (also a ValueError)   a CP set-up that cannot work (sizes, heads,
                                                    groups, shapes, a sequence that cannot be
                                                    sharded as asked)

The builtin second base keeps ``except ValueError`` / ``except RuntimeError`` callers working;
``except ModelError`` catches all of them. Invariants of our own code stay ``assert``s.
"""

from __future__ import annotations


class ModelError(Exception):
    """Root of every error lvita_model raises on purpose."""


class ConfigError(ModelError, ValueError):
    """A model configuration that is malformed or describes an architecture we do not build."""


class WeightsError(ModelError, ValueError):
    """A checkpoint that does not match the model (keys listed), or cannot be read: a missing,
    truncated or altered shard (files named; nothing is loaded then)."""


class AttentionBackendError(ModelError, RuntimeError):
    """A backend that is unavailable here or asked for something it cannot do."""


class ContextParallelError(ModelError, ValueError):
    """A context-parallel configuration that cannot work (sizes, heads, groups, shapes), or a
    sequence that cannot be split as asked (lengths not divisible, bad rank)."""
