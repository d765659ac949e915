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
import torch.distributed as dist
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

CHECKPOINTS = "checkpoints"
LATEST = "latest"
TRAINER_FILE = "trainer.json"
FORMAT_VERSION = 1
_STEP_DIR = re.compile(r"^step-(\d{8})$")


@dataclass(frozen=True)
class ResumeState:
    step: int
    """Optimizer steps taken when the checkpoint was saved."""
    loader_state: dict
    """`ShardLoader.state_dict()` of this rank at that step."""
    metrics: dict | None = None


# --------------------------------------------------------------------------------------------
# Process group helpers (a single process without a group is rank 0 of 1)


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def _rank() -> int:
    return dist.get_rank() if _distributed() else 0


def _world_size() -> int:
    return dist.get_world_size() if _distributed() else 1


def _barrier() -> None:
    if _distributed():
        dist.barrier()


@contextlib.contextmanager
def _single_process_quiet() -> Iterator[None]:
    """DCP warns that it assumes a single process when there is no group: that is intended."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def _gather(value: Any) -> list[Any]:
    if not _distributed():
        return [value]
    values: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(values, value)
    return values


# --------------------------------------------------------------------------------------------
# Paths


def step_dir_name(step: int) -> str:
    return f"step-{step:08d}"


def _complete_steps(directory: Path) -> list[Path]:
    """Complete checkpoint directories, oldest first (``.tmp`` ones are never complete)."""
    if not directory.is_dir():
        return []
    found = [p for p in directory.iterdir() if p.is_dir() and _STEP_DIR.match(p.name)]
    return sorted(found, key=lambda p: p.name)


def latest_checkpoint(run_dir: str | os.PathLike[str]) -> Path | None:
    """The newest complete checkpoint of a run, or None."""
    directory = Path(run_dir) / CHECKPOINTS
    pointer = directory / LATEST
    if pointer.is_file():
        named = directory / pointer.read_text().strip()
        if _STEP_DIR.match(named.name) and named.is_dir():
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
    rank, world_size = _rank(), _world_size()
    directory = Path(run_dir) / CHECKPOINTS
    final = directory / step_dir_name(step)
    tmp = final.with_name(final.name + ".tmp")
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)  # a crashed save of the same step
        tmp.mkdir(parents=True)
    _barrier()
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
            no_dist=not _distributed(),
        )
    loader_states = _gather(loader_state)
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
    _barrier()
    if rank == 0:
        _publish(tmp, final)
        _prune(directory, keep_last)
    _barrier()
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
# Load


def _read_trainer(path: Path) -> dict:
    try:
        trainer = json.loads((path / TRAINER_FILE).read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise CheckpointError(f"{path}: not a complete checkpoint ({error})") from None
    if trainer.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{path}: format_version {trainer.get('format_version')}")
    return trainer


def load_checkpoint(
    path: str | os.PathLike[str],
    *,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
) -> ResumeState:
    """Restore model, optimizer, scheduler and this rank's RNG states from `path` (collective);
    return the step and this rank's loader state.

    Raises:
        CheckpointError: `path` is incomplete, or was saved with another world size.
    """
    path = Path(path)
    trainer = _read_trainer(path)
    rank, world_size = _rank(), _world_size()
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
        dcp.load(state, checkpoint_id=path, no_dist=not _distributed())
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
    model: nn.Module, out_dir: str | os.PathLike[str], *, dtype: torch.dtype | None = None
) -> None:
    """Gather the full model (collective) and write it from rank 0 in the Long-VITA Hugging Face
    layout (`lvita_model.weights.save_state_dict`; `load_pretrained` reads it back)."""
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    state = get_model_state_dict(model, options=options)
    if _rank() == 0:
        save_state_dict(state, model.config, out_dir, dtype=dtype)
    _barrier()
