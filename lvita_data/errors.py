"""Error types of lvita_data.

`LvitaError` is the root. A problem with a manifest is a `ManifestError` (also a `ValueError`) that
names the file and the field; a whole source that cannot be read is a `SourceError`; one bad
record raises `SkipSample(reason, detail)`, which `lvita_data.samples.read` turns into a counted
`Reject` (never a silent skip). `RejectRateExceeded` stops a run whose source rejects too much.
Every other error of the package lives here too, one class per failing step: missing inputs,
build, pool, shard format, loader, stats, show, Energon metadata. Library code raises; only
`pipelines/cli.py` prints and maps them to exit codes.
"""

from __future__ import annotations


class LvitaError(Exception):
    """Root of every error lvita raises on purpose."""


class ManifestError(LvitaError, ValueError):
    """A stage manifest is malformed: unknown key, wrong type, bad value."""


class UnsetVariableError(ManifestError):
    """A ``${VAR}`` without default names an environment variable that is not set."""


class SourceError(LvitaError):
    """A source (file, directory, media container) cannot be used at all."""


class SkipSample(LvitaError):
    """One record cannot become a sample; `reason` is a `RejectReason` value."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


class RejectRateExceeded(LvitaError):
    """A source rejected more records than the manifest's `rejects.max_rate` allows."""


class StatsError(LvitaError):
    """The directory is not a (complete, consistent) lvita build."""


class MissingInputs(LvitaError):
    """Dataset files named by the manifest do not exist or cannot be read."""


class BuildError(LvitaError):
    """The output directory does not match the manifest, or a build step failed."""


class EnergonMetadataError(LvitaError):
    """A shard cannot be indexed (damaged tar, duplicate keys, counts not as expected)."""


class LoaderError(LvitaError):
    """A build directory or a shard cannot be read (shard formats 1-3)."""


class ShardFormatError(LvitaError):
    """A shard or a build file is not what the shard format says (damaged tar, bad header)."""


class ShowError(LvitaError):
    """`lvita show` was asked for a pack (index or key) the build does not have, or cannot
    write its HTML file."""


class PoolError(LvitaError):
    """Tasks cannot be run as asked (unknown executor, Ray not installed)."""


class WorkerLost(PoolError):
    """A local worker process died while running a task (killed, out of memory); the work it
    finished is kept and a rerun (`--resume` for a build) goes on from there."""
