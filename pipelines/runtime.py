"""Where a pipeline runs: process group, device, DP x CP mesh, compute dtype, and the model.

Shared by `lvita train` (`pipelines.train.loop`) and `lvita generate` (`pipelines.generate`).

**Process group.** Under torchrun (``RANK`` / ``WORLD_SIZE`` / ``LOCAL_RANK`` set) every rank
joins the default group; a plain process joins a group of one (an in-memory ``HashStore``), so
one code path (mesh, FSDP2, DCP checkpoints) serves both. A group that already exists (a test
harness, a caller) is used as is and left alone at the end. Backends: gloo on CPU, nccl on CUDA,
hccl on Ascend NPUs (``torch_npu`` imported under ``except Exception``: a broken CANN install
raises more than ImportError); the device is ``{cuda,npu}:LOCAL_RANK``.

**Mesh.** ``init_device_mesh(device_type, (dp, cp), mesh_dim_names=("dp", "cp"))``: CP is the
inner dimension, so the ranks of a CP group are adjacent (global rank = dp_rank * cp + cp_rank,
the layout `lvita_model.context_parallel.base.check_shard_matches_group` expects); all CP
ranks of a DP group read the same packs. The world size must be a multiple of ``parallel.cp``
(`TrainConfigError` otherwise).

**Compute dtype.** One rule for training and generation (`compute_dtype`): ``auto`` is bfloat16
on any accelerator (CUDA or NPU) and float32 on CPU. (Until Layout 2, `lvita generate` gave
bfloat16 on CUDA only, so an NPU generated in float32.)

**Model.** `load_model(spec)`: a preset name (`lvita_model.config.PRESETS`, random init from a
seed) or a checkpoint directory (`lvita_model.weights.load_pretrained`: a released Long-VITA
checkpoint as published, or what lvita saved); a preset name wins over a directory of the same
name, as in `lvita_model.config.load_config`. With ``vision=`` the spec is a Qwen2 / Qwen2.5
directory and the model is composed with that InternViT directory and a fresh projector from the
seed (stage 1, `lvita_model.weights.compose_pretrained`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from pipelines.errors import TrainConfigError

if TYPE_CHECKING:
    from lvita_model.model import LongVitaForCausalLM

_BACKENDS = {"cpu": "gloo", "cuda": "nccl", "npu": "hccl"}


@dataclass(frozen=True)
class Runtime:
    """Where this rank sits: device, world, and the DP x CP mesh."""

    device: torch.device
    rank: int
    world_size: int
    dp_size: int
    dp_rank: int
    cp_size: int
    cp_rank: int
    mesh: DeviceMesh
    """2-D ("dp", "cp")."""
    shard_mesh: DeviceMesh
    """1-D flattened DP x CP: FSDP2 shards over it; gradients and counts reduce over it."""
    owns_process_group: bool
    """This runtime created the default group (and destroys it in `shutdown`)."""

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def cp_group(self) -> dist.ProcessGroup:
        return self.mesh.get_group("cp")

    @property
    def dp_group(self) -> dist.ProcessGroup:
        return self.mesh.get_group("dp")

    @property
    def world_group(self) -> dist.ProcessGroup:
        return self.shard_mesh.get_group()


def _npu_available() -> bool:
    try:
        import torch_npu  # noqa: F401

        return bool(torch.npu.is_available())
    except Exception:  # noqa: BLE001 - a broken CANN install raises more than ImportError
        return False


def device_type() -> str:
    """'npu', 'cuda' or 'cpu': the accelerator this process trains on."""
    if _npu_available():
        return "npu"
    return "cuda" if torch.cuda.is_available() else "cpu"


def select_device(kind: str) -> torch.device:
    """This rank's device of `kind` (``cuda:LOCAL_RANK`` / ``npu:LOCAL_RANK``), made current."""
    if kind == "cpu":
        return torch.device("cpu")
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device(f"{kind}:{local_rank}")
    getattr(torch, kind).set_device(device)
    return device


def join_process_group(kind: str, device: torch.device) -> bool:
    """Join (or create) the default group; True when this call created it."""
    if dist.is_initialized():
        return False
    backend = _BACKENDS[kind]
    timeout = timedelta(minutes=30)
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        dist.init_process_group(
            backend, timeout=timeout, device_id=device if kind != "cpu" else None
        )
    else:
        dist.init_process_group(
            backend, store=dist.HashStore(), rank=0, world_size=1, timeout=timeout
        )
    return True


def expected_world_size() -> int:
    """The world size this process will train in, before any group exists (torchrun's
    ``WORLD_SIZE``, else 1; an existing default group's size)."""
    if dist.is_initialized():
        return dist.get_world_size()
    return int(os.environ.get("WORLD_SIZE", "1")) if "RANK" in os.environ else 1


def check_layout(world_size: int, cp: int) -> int:
    """The data-parallel size; `TrainConfigError` unless cp divides the world size."""
    if cp < 1 or world_size % cp:
        raise TrainConfigError(
            f"parallel.cp = {cp} does not divide the world size {world_size}: the world is "
            f"data parallel x context parallel (run a multiple of {cp} ranks)"
        )
    return world_size // cp


def init_runtime(cp: int) -> Runtime:
    """The process group, device and DP x CP mesh of this rank (collective)."""
    kind = device_type()
    device = select_device(kind)
    owns = join_process_group(kind, device)
    world_size, rank = dist.get_world_size(), dist.get_rank()
    try:
        dp = check_layout(world_size, cp)
    except TrainConfigError:
        if owns:
            dist.destroy_process_group()
        raise
    mesh = init_device_mesh(kind, (dp, cp), mesh_dim_names=("dp", "cp"))
    shard_mesh = mesh["dp", "cp"]._flatten("dp_cp")
    return Runtime(
        device=device,
        rank=rank,
        world_size=world_size,
        dp_size=dp,
        dp_rank=mesh.get_local_rank("dp"),
        cp_size=cp,
        cp_rank=mesh.get_local_rank("cp"),
        mesh=mesh,
        shard_mesh=shard_mesh,
        owns_process_group=owns,
    )


def shutdown(runtime: Runtime) -> None:
    """Destroy the default group if `init_runtime` created it."""
    if runtime.owns_process_group and dist.is_initialized():
        dist.destroy_process_group()


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
"""The dtype names a config or ``--dtype`` may give besides ``auto``."""


def compute_dtype(name: str, device: torch.device) -> torch.dtype:
    """``auto`` is bfloat16 on any accelerator (CUDA, NPU), float32 on CPU; else `DTYPES`."""
    if name == "auto":
        return torch.float32 if device.type == "cpu" else torch.bfloat16
    return DTYPES[name]


def load_model(
    spec: str,
    *,
    device: torch.device,
    dtype: torch.dtype,
    attention_backend: str = "auto",
    seed: int = 0,
    vision: str | None = None,
) -> tuple[LongVitaForCausalLM, bool]:
    """(model, whether its weights are random): a preset name (random init from `seed`), a
    checkpoint directory, or with `vision` a language model directory composed with that
    vision tower directory (module docstring). Raises `ConfigError` / `WeightsError` /
    `OSError` from `lvita_model` for a spec that is neither, or a checkpoint that cannot be
    read."""
    from lvita_model.config import PRESETS
    from lvita_model.model import build_model
    from lvita_model.weights import compose_pretrained, load_pretrained

    if vision is not None:
        model = compose_pretrained(
            spec,
            vision,
            device=device,
            dtype=dtype,
            seed=seed,
            attention_backend=attention_backend,
        )
        return model, False
    if spec in PRESETS:
        model = build_model(
            spec, device=device, dtype=dtype, seed=seed, attention_backend=attention_backend
        )
        return model, True
    model = load_pretrained(spec, device=device, dtype=dtype, attention_backend=attention_backend)
    return model, False
