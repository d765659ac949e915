"""`lvita train CONFIG`: the training loop over packed shards, data x context parallel.

**Setup** (`pipelines.runtime`, `pipelines.train.fsdp`): the process group (torchrun or a single
process), a DP x CP device mesh, the model (a preset with random init from the recipe seed, or a
checkpoint directory) in fp32 master weights, the stage's trainable parts
(`recipes.apply_trainable`), activation checkpointing per decoder layer, optional ``torch.compile``
per decoder layer (the CP attention, with its communication, stays eager between the compiled
parts), then FSDP2 over the flattened DP x CP mesh with summed (not averaged) gradients, the
recipe's AdamW and warm-up + cosine schedule. Every DP rank reads its own slice of the packs
(`lvita_data.loader.ShardLoader`, dp_rank = the mesh's DP coordinate); the CP ranks of a DP
group read the same packs and each computes on its zigzag shard of every pack
(`lvita_model.context_parallel.batch.context_parallel_inputs`).

**One optimizer step** consumes ``global_batch`` packs over all DP ranks: each rank runs
``accumulation = global_batch / (dp * packs_per_micro_batch)`` micro-batches (an error if not a
whole number). The loss is the mean over the supervised tokens of the whole global batch:

1. the rank fetches all its micro-batches of the step and counts their supervised next-token
   targets on the whole packs (`next_token_targets`); the counts are all-reduced over the **DP**
   group only (the CP ranks of a DP group hold the same packs: counting over CP too would count
   each pack CP times) -> C;
2. each micro-batch's backward runs on ``local_sum / C`` (local_sum: the cross-entropy sum over
   this rank's tokens; CP shards pad with ignored targets, so they add nothing to C);
3. FSDP2 sums the gradients over DP x CP: the result is the gradient of sum / C of the whole
   global batch, whatever the number of supervised tokens per rank or micro-batch. The logged
   loss is the sum of the local sums all-reduced over DP x CP, divided by C.

Gradients are reduce-scattered after every micro-batch (no ``set_requires_gradient_sync(False)``:
skipping the sync keeps an unsharded gradient of every parameter until the last micro-batch,
the memory FSDP exists to avoid). Then the gradient norm is clipped (``clip_grad_norm_`` works on
the DTensor parameters; it returns the norm before clipping, which is logged), the optimizer and
the scheduler step.

**Logs** (rank 0): a tqdm bar, a console line every ``output.log_every`` steps, and
``output.dir/metrics.jsonl`` (`pipelines.train.metrics`): step, loss, lr (the largest group
LR, i.e. the LLM's, used by this update), grad_norm, tokens and supervised tokens (of the global
batch, each pack counted once), seconds, tokens/s, supervised tokens/s and, on an accelerator
with a known peak, MFU.

**Checkpoints** (`pipelines.train.checkpoint`) every ``output.save_every`` steps and after the
last one: model, optimizer, scheduler, RNG and the loader state (the packs consumed so far).
With ``resume`` (the default) a run continues from the latest checkpoint of ``output.dir``
exactly: the loader yields the same next packs and the resumed losses equal an uninterrupted
run's. The metrics file is cut back to the checkpoint's step first (steps after it run again).
``resume=False`` refuses an output directory that holds checkpoints (it would mix two runs).
At the end, with ``output.export_hf``, the model is written to ``output.dir/hf`` in the
Long-VITA Hugging Face layout (`lvita generate` reads it).

**Test hook**: with ``LVITA_TRAIN_KILL_AFTER_STEP=k`` in the environment every rank sends
itself SIGKILL right after step k (after its metrics line and its checkpoint, if one is due): a
crash for the exact-resume test (tests/pipelines/test_train_loop.py).
"""

from __future__ import annotations

import os
import signal
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import yaml
from torch import Tensor, nn
from torch.distributed.tensor import DTensor

from lvita_data.errors import LoaderError, ShardFormatError
from lvita_data.loader import PackedBatch, ShardLoader
from lvita_data.shards.format import read_build_manifest
from lvita_model.config import load_config
from lvita_model.config.hf import compose_config
from lvita_model.context_parallel.batch import context_parallel_inputs
from lvita_model.head import IGNORE_INDEX, next_token_targets
from lvita_model.model import LongVitaForCausalLM
from pipelines.errors import TrainConfigError
from pipelines.runtime import (
    Runtime,
    check_layout,
    compute_dtype,
    expected_world_size,
    init_runtime,
    load_model,
    shutdown,
)
from pipelines.train.checkpoint import (
    export_hf,
    latest_checkpoint,
    load_checkpoint,
    save_checkpoint,
)
from pipelines.train.config import TrainConfig
from pipelines.train.fsdp import shard_model
from pipelines.train.metrics import StepLogger, StepStats
from pipelines.train.recipes import (
    Recipe,
    apply_trainable,
    make_optimizer,
    make_scheduler,
    resolve_recipe,
)

KILL_ENV = "LVITA_TRAIN_KILL_AFTER_STEP"


@dataclass
class TrainResult:
    run_dir: Path
    start_step: int
    """Optimizer steps already done when this call started (0, or the resumed checkpoint's)."""
    final_step: int
    losses: dict[int, float] = field(default_factory=dict)
    """Global mean loss of every step this call ran (step numbers from 1)."""
    records: list[dict[str, Any]] = field(default_factory=list)
    """The metrics of those steps (as written to metrics.jsonl)."""
    checkpoint: Path | None = None
    hf_dir: Path | None = None


# --------------------------------------------------------------------------------------------
# Checks


def check_data(config: TrainConfig) -> Path:
    """The shard directory (`LoaderError` if it is no build); with ``data.manifest`` also check
    that the shards were built from that manifest (`TrainConfigError`)."""
    shards = Path(config.data.shards or "")
    if not (shards / "index.json").is_file():
        raise LoaderError(f"data.shards: {shards} is not a build directory (no index.json)")
    if config.data.manifest is not None:
        manifest = Path(config.data.manifest)
        try:
            wanted = yaml.safe_load(manifest.read_text(encoding="utf-8"))
            built = read_build_manifest(shards).data
        except (OSError, yaml.YAMLError, ShardFormatError) as error:
            raise TrainConfigError(f"data.manifest: {error}") from None
        if wanted != built:
            raise TrainConfigError(
                f"data.manifest: {shards} was not built from {manifest} (its manifest.yaml "
                "differs): rebuild the shards with `lvita build` or point data.shards elsewhere"
            )
    return shards


def preflight(config: TrainConfig, recipe: Recipe, world_size: int | None = None) -> Path:
    """Every check that needs no process group, before one is created: the data
    (`check_data`), the model's configuration (`lvita_model.config.ConfigError`), the parallel
    layout and the accumulation against `world_size` (default: the one torchrun announces).
    Returns the shard directory."""
    shards = check_data(config)
    if config.model.llm is not None:
        compose_config(config.model.llm, config.model.vision or "")
    else:
        load_config(config.model.name or "")
    dp = check_layout(world_size or expected_world_size(), config.parallel.cp)
    accumulation_steps(recipe.global_batch, dp, config.data.packs_per_micro_batch)
    return shards


def accumulation_steps(global_batch: int, dp_size: int, packs_per_micro_batch: int) -> int:
    """Micro-batches per rank and optimizer step (`TrainConfigError` unless whole)."""
    per_step = dp_size * packs_per_micro_batch
    if global_batch % per_step:
        raise TrainConfigError(
            f"recipe.global_batch = {global_batch} is not a multiple of data parallel "
            f"{dp_size} x data.packs_per_micro_batch {packs_per_micro_batch} = {per_step}"
        )
    return global_batch // per_step


# --------------------------------------------------------------------------------------------
# Model


class LossModule(nn.Module):
    """model + logits-masked head as one forward: a packed micro-batch -> (local loss sum,
    local supervised count). The FSDP2 root, so the LM head is unsharded while the loss runs."""

    def __init__(
        self,
        model: LongVitaForCausalLM,
        runtime: Runtime,
        cp_method: str,
        eager_attention: bool = False,
    ) -> None:
        super().__init__()
        self.model = model
        self.runtime = runtime
        self.cp_method = cp_method
        self.eager_attention = eager_attention
        """Run the CP attention outside compiled layers (see `_eager`)."""

    def forward(self, batch: dict[str, Any]) -> tuple[Tensor, Tensor]:
        model = self.model
        if self.runtime.cp_size == 1:
            cu = batch["cu_seqlens"]
            hidden = model(
                batch["input_ids"].reshape(-1),
                batch["position_ids"].reshape(-1),
                cu_seqlens=cu,
                pixel_values=batch.get("pixel_values"),
                image_token_positions=batch.get("image_token_positions"),
            )
            return model.loss(hidden, next_token_targets(batch["labels"].reshape(-1), cu))
        backend = model.backend_for(self.runtime.device, model.model.embed_tokens.weight.dtype)
        local, attention = context_parallel_inputs(
            batch, self.runtime.cp_group, backend, method=self.cp_method
        )
        if self.eager_attention:
            attention = _eager(attention)
        hidden = model(
            local.input_ids,
            local.position_ids,
            attention=attention,
            pixel_values=local.pixel_values,
            image_token_positions=local.image_token_positions,
        )
        return model.loss(hidden, local.targets)


def _eager(attention: Callable[[Tensor, Tensor, Tensor], Tensor]) -> Callable:
    """The CP attention (p2p ring / all-gather, an autograd.Function with communication) kept
    out of ``torch.compile``d layers: compiled through, torch 2.13's inductor generated code
    that fails at run time (``NameError: name 's24' is not defined`` in the ring's block
    metadata, CPU, CP=2); with this graph break the layers compile around it."""

    @torch.compiler.disable
    def attend(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        return attention(q, k, v)

    return attend


def prepare_model(config: TrainConfig, recipe: Recipe, runtime: Runtime) -> LossModule:
    """Load in fp32 master weights (a preset: random init from the recipe seed; or a checkpoint
    directory), freeze per recipe, checkpoint/compile layers, shard with FSDP2."""
    model, _ = load_model(
        config.model.name or config.model.llm or "",
        device=runtime.device,
        dtype=torch.float32,
        attention_backend=config.model.attention_backend,
        seed=recipe.seed,
        vision=config.model.vision,
    )
    apply_trainable(model, recipe)
    model.model.checkpoint_layers = config.model.activation_checkpointing
    layers = list(model.model.layers)
    if config.model.compile:
        for layer in layers:
            layer.compile()
    units: list[nn.Module] = layers
    vision = getattr(model.model, "vision_model", None)
    if vision is not None:
        units = [*layers, vision]
    root = LossModule(model, runtime, config.parallel.cp_method, config.model.compile)
    # The tower returns x[:, 1:] (CLS dropped), a view; its only consumer, the projector, does no
    # in-place op on it (reshape, pixel shuffle, LayerNorm), so FSDP2's warning does not apply.
    warnings.filterwarnings(
        "ignore",
        message=r"FSDP2-wrapped module \(FSDPInternVisionModel\) returned a view tensor",
        category=UserWarning,
    )
    shard_model(root, units, runtime, compute_dtype(config.parallel.dtype, runtime.device))
    return root


# --------------------------------------------------------------------------------------------
# Data


class BatchStream:
    """The loader's batches across epochs, forever; `state_dict` resumes exactly."""

    def __init__(self, loader: ShardLoader) -> None:
        self.loader = loader
        self._iterator: Iterator[PackedBatch] | None = None

    def next(self) -> PackedBatch:
        for _ in range(2):
            if self._iterator is None:
                self._iterator = iter(self.loader)
            try:
                return next(self._iterator)
            except StopIteration:
                self._iterator = None
        raise TrainConfigError(
            f"{self.loader.root}: no batch of {self.loader.batch_size} pack(s) per DP rank "
            f"({self.loader.packs_per_rank} pack(s) per rank): lower data.packs_per_micro_batch"
        )

    def state_dict(self) -> dict:
        return self.loader.state_dict()


def make_loader(config: TrainConfig, recipe: Recipe, shards: Path, runtime: Runtime) -> ShardLoader:
    return ShardLoader(
        shards,
        batch_size=config.data.packs_per_micro_batch,
        dp_rank=runtime.dp_rank,
        dp_world_size=runtime.dp_size,
        shuffle=config.data.shuffle,
        seed=recipe.seed,
        num_workers=config.data.num_workers,
        drop_last=True,
    )


# --------------------------------------------------------------------------------------------
# One step


def _batch_stats(batch: dict[str, Any]) -> Tensor:
    """int64 [3]: supervised targets, sum of squared document lengths, tiles of one pack batch."""
    cu = batch["cu_seqlens"]
    targets = next_token_targets(batch["labels"].reshape(-1), cu)
    lengths = (cu[1:] - cu[:-1]).long()
    return torch.stack(
        [
            (targets != IGNORE_INDEX).sum(),
            lengths.pow(2).sum(),
            torch.tensor(batch["image_token_positions"].shape[0], device=cu.device),
        ]
    )


def _scalar(value: Tensor) -> float:
    return float(value.full_tensor() if isinstance(value, DTensor) else value)


def train_step(
    module: LossModule,
    batches: list[dict[str, Any]],
    runtime: Runtime,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    clip: float,
) -> StepStats:
    """Count, accumulate sum / global count over the micro-batches, clip, step (see module)."""
    stats = torch.stack([_batch_stats(batch) for batch in batches]).sum(0)
    dist.all_reduce(stats, group=runtime.dp_group)
    total = stats[0].clamp(min=1).to(torch.float32)
    local_sum = torch.zeros((), dtype=torch.float32, device=runtime.device)  # HCCL: no fp64
    for batch in batches:
        loss_sum, _ = module(batch)
        (loss_sum / total).backward()
        local_sum += loss_sum.detach().float()
    dist.all_reduce(local_sum, group=runtime.world_group)
    trainable = [p for p in module.parameters() if p.requires_grad]
    grad_norm = torch.nn.utils.clip_grad_norm_(trainable, clip if clip > 0 else float("inf"))
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return StepStats(
        loss=float(local_sum / total),
        grad_norm=_scalar(grad_norm),
        supervised=int(stats[0]),
        squared_lengths=int(stats[1]),
        tiles=int(stats[2]),
    )


# --------------------------------------------------------------------------------------------
# The loop


def train(config: TrainConfig, *, resume: bool = True) -> TrainResult:
    """Train per `config` (see the module docstring); collective under torchrun."""
    recipe = resolve_recipe(config)
    shards = preflight(config, recipe)
    runtime = init_runtime(config.parallel.cp)
    try:
        return Trainer(config, recipe, shards, runtime).run(resume)
    finally:
        shutdown(runtime)


class Trainer:
    """The state of one run on this rank: model, optimizer, schedule, data."""

    def __init__(self, config: TrainConfig, recipe: Recipe, shards: Path, runtime: Runtime):
        self.accumulation = accumulation_steps(
            recipe.global_batch, runtime.dp_size, config.data.packs_per_micro_batch
        )
        self.config, self.recipe, self.runtime = config, recipe, runtime
        self.run_dir = Path(config.output.dir)
        torch.manual_seed(recipe.seed)
        self.module = prepare_model(config, recipe, runtime)
        self.model = self.module.model
        self.optimizer = make_optimizer(self.model, recipe)
        self.scheduler = make_scheduler(self.optimizer, recipe)
        self.stream = BatchStream(make_loader(config, recipe, shards, runtime))

    def run(self, resume: bool) -> TrainResult:
        start = self.resume(resume)
        result = TrainResult(run_dir=self.run_dir, start_step=start, final_step=start)
        logger = StepLogger(self.config, self.runtime, self.model, start, self.recipe.iterations)
        try:
            for step in range(start + 1, self.recipe.iterations + 1):
                record = self.step(step, logger)
                result.records.append(record)
                result.losses[step] = record["loss"]
                result.final_step = step
                if step % self.config.output.save_every == 0 or step == self.recipe.iterations:
                    result.checkpoint = self.save(step, record)
                _kill_if_asked(step)
        finally:
            logger.close()
        if self.config.output.export_hf:
            result.hf_dir = self.run_dir / "hf"
            export_hf(self.model, result.hf_dir, tokenizer=self.config.model.tokenizer_spec)
        if self.runtime.is_main and result.losses:
            first, last = min(result.losses), max(result.losses)
            print(
                f"lvita train: steps {first}..{last} of {self.recipe.iterations}: loss "
                f"{result.losses[first]:.4f} -> {result.losses[last]:.4f} ({self.run_dir})",
                file=sys.stderr,
            )
        return result

    def resume(self, resume: bool) -> int:
        """The step to start from (loading the latest checkpoint when resuming)."""
        latest = latest_checkpoint(self.run_dir)
        if latest is None:
            return 0
        if not resume:
            raise TrainConfigError(
                f"output.dir {self.run_dir} holds checkpoints (latest {latest}): resume it "
                "(without --no-resume) or train into another output.dir"
            )
        state = load_checkpoint(
            latest, model=self.model, optimizer=self.optimizer, scheduler=self.scheduler
        )
        self.stream.loader.load_state_dict(state.loader_state)
        return int(state.step)

    def step(self, step: int, logger: StepLogger) -> dict[str, Any]:
        started = time.perf_counter()
        device = self.runtime.device
        batches = [self.stream.next().to_torch(device) for _ in range(self.accumulation)]
        lr = max(group["lr"] for group in self.optimizer.param_groups)
        stats = train_step(
            self.module,
            batches,
            self.runtime,
            self.optimizer,
            self.scheduler,
            self.recipe.clip_grad_norm,
        )
        seconds = time.perf_counter() - started
        tokens = self.recipe.global_batch * self.stream.loader.seq_len
        return logger.record(step, stats, lr, tokens, seconds)

    def save(self, step: int, record: dict[str, Any]) -> Path:
        return save_checkpoint(
            self.run_dir,
            step,
            model=self.model,
            optimizer=self.optimizer,
            scheduler=self.scheduler,
            loader_state=self.stream.state_dict(),
            metrics=record,
            keep_last=self.config.output.keep_last,
        )


def _kill_if_asked(step: int) -> None:
    value = os.environ.get(KILL_ENV)
    if value is not None and int(value) == step:
        os.kill(os.getpid(), signal.SIGKILL)
