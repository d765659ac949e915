"""Every error the pipelines raise on purpose, under one root: `PipelineError`.

    PipelineError
      TrainConfigError     a training config that cannot be parsed or is inconsistent
      CheckpointError      a checkpoint that cannot be read, fails its checksums, or does not
                           fit this run
      GenerateError        `lvita generate` asked for something that cannot work (bad arguments)
        GenerateInputError   the model, the tokenizer or a media file is missing or unreadable

Only `pipelines.cli` turns them into messages and exit codes (`pipelines.cli.EXIT_CODES`).
`PipelineError` is an `lvita_data.errors.LvitaError`, so ``except LvitaError`` catches every
error lvita raises on purpose.
"""

from __future__ import annotations

from lvita_data.errors import LvitaError


class PipelineError(LvitaError):
    """Root of every error the pipelines (train, generate) raise on purpose."""


class TrainConfigError(PipelineError, ValueError):
    """A training config that cannot be parsed or is inconsistent; the message names the field."""


class CheckpointError(PipelineError):
    """A checkpoint that cannot be read, is incomplete or damaged (its ``checksums.json`` names
    the files), or does not fit this run."""


class GenerateError(PipelineError):
    """`lvita generate` was asked for something that cannot work (bad arguments)."""


class GenerateInputError(GenerateError):
    """`lvita generate`: the model, the tokenizer or a media file is missing or unreadable."""


__all__ = [
    "CheckpointError",
    "GenerateError",
    "GenerateInputError",
    "PipelineError",
    "TrainConfigError",
]
