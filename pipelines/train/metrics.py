"""What a training step reports: throughput, estimated MFU, and the JSONL metrics file.

**FLOPs of a step** (forward + backward, the usual 6 N T estimate plus attention)::

    6 * decoder_params * tokens                 every packed token through every decoder layer
  + 6 * vocab * hidden * supervised             the logits-masked head: supervised rows only
  + 6 * L * (heads * head_dim) * sum_d s_d^2    causal attention (QK^T and PV, 4 s^2 d / 2 per
                                                layer forward, x3 with backward), documents d
  + 6 * vision_params * tiles * patches         the ViT and projector (attention in it ignored)

Frozen parts still run forward and the activation backward, so this is an estimate (as every
MFU figure). MFU = FLOPs / (step seconds * world size * peak bf16 dense FLOP/s of the device);
the peak comes from a small table matched against the device name (H100/H200, A100, Ascend
910B); on CPU or an unknown device MFU is omitted.

**metrics.jsonl** (rank 0): one JSON object per optimizer step, appended and flushed line by
line, so a crash loses at most the line being written. A resumed run first rewrites the file
without the steps after its checkpoint (`truncate_metrics`): those steps run again.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

import torch

from lvita_data.fileio import write_text_atomic
from lvita_model.config import LongVitaConfig
from lvita_model.flops import layer_params

if TYPE_CHECKING:
    from lvita_model.model import LongVitaForCausalLM
    from pipelines.runtime import Runtime
    from pipelines.train.config import TrainConfig

METRICS_FILE = "metrics.jsonl"

PEAK_BF16_FLOPS: dict[str, float] = {
    "H100": 989e12,
    "H200": 989e12,
    "H800": 989e12,
    "A100": 312e12,
    "A800": 312e12,
    "910B": 313e12,
}
"""Dense bf16 peak FLOP/s by device-name substring (SXM H100/H200; Ascend 910B approximate)."""


def peak_flops(device: torch.device) -> float | None:
    """The device's dense bf16 peak, or None (CPU, unknown device)."""
    if device.type == "cpu":
        return None
    try:
        name = getattr(torch, device.type).get_device_name(device)
    except Exception:  # noqa: BLE001 - an accelerator module without get_device_name
        return None
    for key, flops in PEAK_BF16_FLOPS.items():
        if key in name:
            return flops
    return None


def decoder_params(config: LongVitaConfig) -> int:
    """Parameters of the decoder layers (no embeddings, no head)."""
    return layer_params(config.llm) * config.llm.num_layers


def vision_params(model: torch.nn.Module) -> int:
    inner = getattr(model, "model", None)
    total = 0
    for name in ("vision_model", "vision_projection"):
        part = getattr(inner, name, None)
        if part is not None:
            total += sum(p.numel() for p in part.parameters())
    return total


def step_flops(
    config: LongVitaConfig,
    *,
    vision_parameters: int,
    tokens: int,
    supervised: int,
    squared_lengths: int,
    tiles: int,
) -> float:
    """Estimated training FLOPs of one step (see the module docstring)."""
    llm = config.llm
    flops = 6.0 * decoder_params(config) * tokens
    flops += 6.0 * llm.vocab_size * llm.hidden_size * supervised
    flops += 6.0 * llm.num_layers * llm.hidden_size * squared_lengths
    if config.vision is not None:
        patches = (config.vision.image_size // config.vision.patch_size) ** 2 + 1
        flops += 6.0 * vision_parameters * tiles * patches
    return flops


def squared_document_lengths(cu_seqlens: Sequence[int] | torch.Tensor) -> int:
    """sum of s_d^2 over the documents of a packed batch (causal attention cost)."""
    cu = torch.as_tensor(cu_seqlens, dtype=torch.int64)
    return int((cu[1:] - cu[:-1]).pow(2).sum())


class MetricsFile:
    """Append-only JSONL, one flushed line per step (rank 0 only)."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._file: IO[str] = path.open("a", encoding="utf-8")

    def write(self, record: dict[str, Any]) -> None:
        self._file.write(json.dumps(record, separators=(",", ":")) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()


def read_metrics(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """The records of a metrics file (a torn last line from a crash is skipped)."""
    path = Path(path)
    if not path.exists():
        return []
    records = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def truncate_metrics(path: Path, last_step: int) -> None:
    """Keep only the records of steps <= `last_step` (atomic rewrite)."""
    if not path.exists():
        return
    kept = [r for r in read_metrics(path) if int(r.get("step", 0)) <= last_step]
    write_text_atomic(str(path), "".join(json.dumps(r, separators=(",", ":")) + "\n" for r in kept))


@dataclass
class StepStats:
    loss: float
    grad_norm: float
    supervised: int
    squared_lengths: int
    tiles: int


class StepLogger:
    """Rank 0: tqdm bar, console lines, metrics.jsonl; other ranks: only the records."""

    def __init__(
        self,
        config: TrainConfig,
        runtime: Runtime,
        model: LongVitaForCausalLM,
        start: int,
        total: int,
    ) -> None:
        self.runtime = runtime
        self.total = total
        self.log_every = max(1, config.output.log_every)
        self.model_config = model.config
        self.vision_parameters = vision_params(model)
        self.peak = peak_flops(runtime.device)
        self.file: MetricsFile | None = None
        self.bar: Any = None
        if runtime.is_main:
            from tqdm import tqdm

            path = Path(config.output.dir) / METRICS_FILE
            truncate_metrics(path, start)
            self.file = MetricsFile(path)
            self.bar = tqdm(
                total=self.total, initial=start, desc="train", dynamic_ncols=True, file=sys.stderr
            )

    def record(self, step: int, stats: StepStats, lr: float, tokens: int, seconds: float) -> dict:
        record: dict[str, Any] = {
            "step": step,
            "loss": stats.loss,
            "lr": lr,
            "grad_norm": stats.grad_norm,
            "tokens": tokens,
            "supervised_tokens": stats.supervised,
            "seconds": seconds,
            "tokens_per_s": tokens / seconds,
            "supervised_tokens_per_s": stats.supervised / seconds,
        }
        if self.peak is not None:
            flops = step_flops(
                self.model_config,
                vision_parameters=self.vision_parameters,
                tokens=tokens,
                supervised=stats.supervised,
                squared_lengths=stats.squared_lengths,
                tiles=stats.tiles,
            )
            record["mfu"] = flops / (seconds * self.runtime.world_size * self.peak)
        if self.file is not None:
            self._write(record)
        return record

    def _write(self, record: dict[str, Any]) -> None:
        self.file.write(record)
        self.bar.update(1)
        self.bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{record['lr']:.2e}")
        step = record["step"]
        if step % self.log_every == 0 or step == self.total:
            mfu = f" mfu {record['mfu']:.1%}" if "mfu" in record else ""
            self.bar.write(
                f"step {step}/{self.total} loss {record['loss']:.4f} lr {record['lr']:.3e} "
                f"grad_norm {record['grad_norm']:.3f} tok/s {record['tokens_per_s']:,.0f} "
                f"sup tok/s {record['supervised_tokens_per_s']:,.0f}{mfu}"
            )

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.file is not None:
            self.file.close()
