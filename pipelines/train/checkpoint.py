"""Training checkpoints: torch.distributed.checkpoint (DCP) for model and optimizer, JSON and
safetensors for the rest; atomic, resumable, with or without a process group.

Layout of ``run_dir/checkpoints/``::

    latest                       "step-00000020": the newest complete checkpoint
    step-00000020/
      .metadata, __<rank>_0.distcp   DCP: {"model": ..., "optim": ...} (sharded per rank)
      trainer.json               step, world size, scheduler state, loader state of every rank,
                                 metrics
      rng/rank-00000.safetensors torch CPU (+ CUDA) generator states of rank 0
      rng/rank-00000.json        Python `random` and NumPy states of rank 0
      checksums.json             size and sha256 of every other file; written last

No file is a pickle. Model and optimizer go through ``get_state_dict`` and
``set_{model,optimizer}_state_dict`` (``torch.distributed.checkpoint.state_dict``), so the same
code handles FSDP2-sharded (``fully_shard``) DTensor parameters and plain modules, and names are
the model's own (wrapper prefixes stripped). Verified with torch 2.13 on CPU: ``fully_shard``
over a 2-rank gloo mesh trains the tiny Long-VITA model, and a resume from DCP reproduces the
uninterrupted run's losses and parameters bit for bit (tests/pipelines/test_train_checkpoint.py).

**Atomicity.** Every rank writes into ``step-XXXXXXXX.tmp``; after a barrier rank 0 renames it to
``step-XXXXXXXX`` and then replaces ``latest`` (written to a temporary name, then
``os.replace``). A crash at any point leaves the previous checkpoint as the latest: a ``.tmp``
directory is never read, and `latest_checkpoint` falls back to the newest complete step
directory if ``latest`` names a missing one. The run directory must be shared by all ranks
(one host, or a shared file system).

**Integrity.** After every rank has written, the ranks hash the step directory (split by file
size, `checksums.split_by_size`; sha256 in 1 MiB blocks) and rank 0 writes ``checksums.json``
(atomically) before the rename: it is the completion marker, and a step directory without it is
incomplete (never `latest_checkpoint`, never a fallback). `load_checkpoint` first verifies every
file against it (`verify_checkpoint`: collective, rank 0 lists, every rank hashes its share, all
ranks reach the same verdict) and refuses a missing, unexpected, truncated or altered file with a
`CheckpointError` naming the files and the previous checkpoint that verifies, so a flipped byte
never trains on silently. Checkpoints of format 1 (written before checksums) have no manifest:
they still count as complete and resume with a warning, unverified (friendlier to older runs
than a refusal). Cost, measured single-process on a shared 2-core CPU with the test model of
tests/pipelines/test_train_checkpoint.py (a 2.6 MB step directory after two Adam steps): hashing
plus the manifest write ~4-9 ms of a ~115 ms save, verification ~3 ms of a ~115 ms load. sha256
runs at ~1 GiB/s per core, so a large checkpoint costs about 1 s per GiB that each rank hashes
(just after a save the files mostly come from the page cache).

**Resume.** `load_checkpoint` needs the world size of the save: the loader and RNG states are per
rank (DCP itself could reshard model and optimizer, but the data order could not follow).
Load the optimizer state before the scheduler (the optimizer's groups carry their LR).
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import re
import shutil
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed.checkpoint as dcp
from safetensors.torch import load_file, save_file
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from lvita_data.fileio import write_text_atomic
from lvita_model.weights import save_state_dict
from pipelines.errors import CheckpointError
from pipelines.train import group
from pipelines.train.checksums import CHECKSUMS_FILE, find_problems, write_checksums

CHECKPOINTS = "checkpoints"
LATEST = "latest"
TRAINER_FILE = "trainer.json"
FORMAT_VERSION = 2
"""2: with ``checksums.json``; 1 (read, with a warning): before checksums were recorded."""
_READABLE_VERSIONS = (1, 2)
_NO_MARKER = f"{CHECKSUMS_FILE}: missing"
_STEP_DIR = re.compile(r"^step-(\d{8})$")


@dataclass(frozen=True)
class ResumeState:
    step: int
    """Optimizer steps taken when the checkpoint was saved."""
    loader_state: dict
    """`ShardLoader.state_dict()` of this rank at that step."""
    metrics: dict | None = None


@contextlib.contextmanager
def _single_process_quiet() -> Iterator[None]:
    """DCP warns that it assumes a single process when there is no group: that is intended."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


# --------------------------------------------------------------------------------------------
# Paths


def step_dir_name(step: int) -> str:
    return f"step-{step:08d}"


def _is_legacy(path: Path) -> bool:
    """A format-1 checkpoint: written before checksums, so it has no manifest to verify."""
    try:
        return json.loads((path / TRAINER_FILE).read_text()).get("format_version") == 1
    except (OSError, ValueError, AttributeError):
        return False


def _is_complete(path: Path) -> bool:
    """Has its completion marker (``checksums.json``), or is a format-1 checkpoint."""
    return (path / CHECKSUMS_FILE).is_file() or _is_legacy(path)


def _complete_steps(directory: Path) -> list[Path]:
    """Complete checkpoint directories, oldest first (``.tmp`` ones are never complete)."""
    if not directory.is_dir():
        return []
    found = [
        p for p in directory.iterdir() if _STEP_DIR.match(p.name) and p.is_dir() and _is_complete(p)
    ]
    return sorted(found, key=lambda p: p.name)


def latest_checkpoint(run_dir: str | os.PathLike[str]) -> Path | None:
    """The newest complete checkpoint of a run, or None (not verified: `load_checkpoint` does)."""
    directory = Path(run_dir) / CHECKPOINTS
    pointer = directory / LATEST
    if pointer.is_file():
        named = directory / pointer.read_text().strip()
        if _STEP_DIR.match(named.name) and named.is_dir() and _is_complete(named):
            return named
    complete = _complete_steps(directory)
    return complete[-1] if complete else None


# --------------------------------------------------------------------------------------------
# RNG states: tensors in safetensors, the rest in JSON


def _rng_state() -> tuple[dict[str, torch.Tensor], dict]:
    tensors = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        for index, state in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"cuda_{index}"] = state
    version, internal, gauss = random.getstate()
    kind, keys, position, has_gauss, cached = np.random.get_state()
    rest = {
        "python": [version, list(internal), gauss],
        "numpy": [kind, keys.tolist(), int(position), int(has_gauss), float(cached)],
    }
    return tensors, rest


def _save_rng(directory: Path, rank: int) -> None:
    tensors, rest = _rng_state()
    directory.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(directory / f"rank-{rank:05d}.safetensors"))
    (directory / f"rank-{rank:05d}.json").write_text(json.dumps(rest))


def _load_rng(directory: Path, rank: int) -> None:
    tensors = load_file(str(directory / f"rank-{rank:05d}.safetensors"))
    rest = json.loads((directory / f"rank-{rank:05d}.json").read_text())
    torch.set_rng_state(tensors["torch_cpu"])
    cuda = [tensors[f"cuda_{i}"] for i in range(len(tensors) - 1)]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda[: torch.cuda.device_count()])
    version, internal, gauss = rest["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, position, has_gauss, cached = rest["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), position, has_gauss, cached))


# --------------------------------------------------------------------------------------------
# Save


def save_checkpoint(
    run_dir: str | os.PathLike[str],
    step: int,
    *,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    loader_state: dict,
    metrics: dict | None = None,
    keep_last: int = 2,
) -> Path:
    """Write checkpoint `step` atomically (collective: every rank calls it) and keep the newest
    `keep_last` (0 keeps all). Returns the checkpoint directory."""
    rank, world_size = group.rank(), group.world_size()
    directory = Path(run_dir) / CHECKPOINTS
    final = directory / step_dir_name(step)
    tmp = final.with_name(final.name + ".tmp")
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)  # a crashed save of the same step
        tmp.mkdir(parents=True)
    group.barrier()
    _save_rng(tmp / "rng", rank)  # before any collective could draw random numbers
    had_state = bool(optimizer.state)
    model_state, optim_state = get_state_dict(model, optimizer)
    if not had_state:  # undo torch's _init_optim_state: a save changes no training state
        optimizer.state.clear()
        optim_state["state"] = {}
    with _single_process_quiet():
        dcp.save(
            {"model": model_state, "optim": optim_state},
            checkpoint_id=tmp,
            no_dist=not group.active(),
        )
    loader_states = group.gather(loader_state)
    if rank == 0:
        trainer = {
            "format_version": FORMAT_VERSION,
            "step": step,
            "world_size": world_size,
            "optimizer_state_names": sorted(optim_state["state"]),
            "scheduler": scheduler.state_dict(),
            "loader_states": loader_states,
            "metrics": metrics,
        }
        (tmp / TRAINER_FILE).write_text(json.dumps(trainer, indent=1, default=_plain) + "\n")
    group.barrier()
    write_checksums(tmp)
    group.barrier()
    if rank == 0:
        _publish(tmp, final)
        _prune(directory, keep_last)
    group.barrier()
    return final


def _plain(value: Any) -> Any:
    """JSON for the numbers a metrics record may hold (0-d tensors, NumPy scalars/arrays)."""
    if isinstance(value, torch.Tensor | np.ndarray | np.generic):
        return value.tolist()
    raise TypeError(f"checkpoint metadata must be JSON: {type(value).__name__} is not")


def _publish(tmp: Path, final: Path) -> None:
    """Rename the finished directory into place, then point ``latest`` at it."""
    if final.exists():  # the same step saved again (e.g. after a resume): swap, then drop
        old = final.with_name(final.name + ".old.tmp")
        shutil.rmtree(old, ignore_errors=True)
        os.rename(final, old)
        os.rename(tmp, final)
        shutil.rmtree(old)
    else:
        os.rename(tmp, final)
    write_text_atomic(str(final.parent / LATEST), final.name + "\n")


def _prune(directory: Path, keep_last: int) -> None:
    for stale in directory.glob("step-*.tmp"):
        shutil.rmtree(stale, ignore_errors=True)
    if keep_last > 0:
        for old in _complete_steps(directory)[:-keep_last]:
            shutil.rmtree(old)


# --------------------------------------------------------------------------------------------
# Verify


def verify_checkpoint(path: str | os.PathLike[str]) -> None:
    """Check every file of checkpoint `path` against its ``checksums.json`` (collective).

    A format-1 checkpoint (no manifest: written before checksums) passes with a warning.

    Raises:
        CheckpointError: the manifest is missing (incomplete) or unreadable, or a file is
            missing, unexpected, of another size or another sha256. The message lists every such
            file and names the newest older checkpoint of the same directory that verifies.
    """
    path = Path(path)
    problems = _problems(path)
    if problems is None:
        if group.rank() == 0:
            warnings.warn(
                f"{path} was written before checkpoints recorded checksums (format 1): "
                "resuming from it unverified",
                stacklevel=2,
            )
        return
    if problems:
        raise CheckpointError(_refusal(path, problems, _previous_verified(path)))


def _problems(path: Path) -> list[str] | None:
    """`find_problems`, with a missing manifest a problem unless `path` is format 1 (None)."""
    problems = find_problems(path)
    if problems is not None:
        return problems
    legacy = group.from_rank0(group.rank() == 0 and _is_legacy(path))
    return None if legacy else [_NO_MARKER]


def _previous_verified(path: Path) -> Path | None:
    """The newest complete checkpoint older than `path` beside it that verifies (collective)."""
    older = []
    if group.rank() == 0 and _STEP_DIR.match(path.name):
        older = [p for p in reversed(_complete_steps(path.parent)) if p.name < path.name]
    for candidate in group.from_rank0(older):
        if not _problems(candidate):  # [] verified, None format 1 (accepted unverified)
            return candidate
    return None


def _refusal(path: Path, problems: list[str], previous: Path | None) -> str:
    if problems == [_NO_MARKER]:
        head = (
            f"{path} is not a complete checkpoint: it has no {CHECKSUMS_FILE}, the marker a save "
            "writes last"
        )
    else:
        head = f"checkpoint {path} fails verification against its {CHECKSUMS_FILE}:" + "".join(
            f"\n  {problem}" for problem in problems
        )
    if previous is None:
        return head + (
            "\nthere is no older complete checkpoint that verifies: train from the start "
            "(into a new output.dir)"
        )
    return head + (
        f"\nthe previous checkpoint that verifies is {previous}: move {path.name} out of "
        f"{path.parent} (or delete it) and resume again to continue from {previous.name}"
    )


# --------------------------------------------------------------------------------------------
# Load


def _read_trainer(path: Path) -> dict:
    try:
        trainer = json.loads((path / TRAINER_FILE).read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise CheckpointError(f"{path}: not a complete checkpoint ({error})") from None
    if trainer.get("format_version") not in _READABLE_VERSIONS:
        raise CheckpointError(f"{path}: format_version {trainer.get('format_version')}")
    return trainer


def load_checkpoint(
    path: str | os.PathLike[str],
    *,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
) -> ResumeState:
    """Verify `path` (`verify_checkpoint`), then restore model, optimizer, scheduler and this
    rank's RNG states from it (collective); return the step and this rank's loader state.

    Raises:
        CheckpointError: `path` is incomplete or damaged (the message names the files and the
            previous checkpoint that verifies), or was saved with another world size.
    """
    path = Path(path)
    verify_checkpoint(path)
    trainer = _read_trainer(path)
    rank, world_size = group.rank(), group.world_size()
    if trainer["world_size"] != world_size:
        raise CheckpointError(
            f"{path} was saved by {trainer['world_size']} ranks and this run has {world_size}: "
            "the per-rank loader and RNG states cannot be redistributed; resume with "
            f"{trainer['world_size']} ranks"
        )
    optimizer.zero_grad(set_to_none=True)
    optimizer.state.clear()  # torch then initializes state for every parameter (zero step)
    model_state, optim_state = get_state_dict(model, optimizer)
    # Parameters that had no optimizer state at the save (no gradient yet) get none now either:
    # torch initialized state for all of them, and the checkpoint holds only the others.
    saved = set(trainer["optimizer_state_names"])
    optim_state["state"] = {k: v for k, v in optim_state["state"].items() if k in saved}
    state = {"model": model_state, "optim": optim_state}
    with _single_process_quiet():
        dcp.load(state, checkpoint_id=path, no_dist=not group.active())
    set_model_state_dict(model, state["model"])
    # strict=False: parameters absent from the saved state keep none (torch 2.13 would raise).
    set_optimizer_state_dict(
        model, optimizer, state["optim"], options=StateDictOptions(strict=False)
    )
    scheduler.load_state_dict(trainer["scheduler"])
    _load_rng(path / "rng", rank)
    return ResumeState(
        step=trainer["step"],
        loader_state=trainer["loader_states"][rank],
        metrics=trainer["metrics"],
    )


# --------------------------------------------------------------------------------------------
# Export


def export_hf(
    model: nn.Module,
    out_dir: str | os.PathLike[str],
    *,
    dtype: torch.dtype | None = None,
    tokenizer: str | None = "qwen2.5",
) -> None:
    """Gather the full model (collective) and write it from rank 0 in the Long-VITA Hugging Face
    layout, in the original's schema (`lvita_model.weights.save_state_dict`; `load_pretrained`
    and the original's own code read it back), with the files of the `tokenizer` spec
    (`pipelines.hf_tokenizer`) unless it is None or larger than the model's vocabulary."""
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    state = get_model_state_dict(model, options=options)
    if group.rank() == 0:
        extra = None if tokenizer is None else export_tokenizer_files(model.config, tokenizer)
        save_state_dict(state, model.config, out_dir, dtype=dtype, extra_files=extra)
    group.barrier()


def export_tokenizer_files(config: Any, spec: str) -> dict[str, str] | None:
    """The tokenizer files of `spec` for a model of `config`, or None (with a warning) when the
    model's embedding has fewer rows than the tokenizer has ids (a test-sized vocabulary)."""
    from lvita_data.tokenizer.tokenizer import load_tokenizer
    from pipelines.hf_tokenizer import tokenizer_files

    tokenizer = load_tokenizer(spec)
    if len(tokenizer) > config.llm.vocab_size:
        warnings.warn(
            f"tokenizer {spec!r} has {len(tokenizer)} ids, the model's vocabulary "
            f"{config.llm.vocab_size}: no tokenizer files written beside the weights",
            stacklevel=2,
        )
        return None
    return tokenizer_files(tokenizer, model_max_length=config.llm.max_position_embeddings)
