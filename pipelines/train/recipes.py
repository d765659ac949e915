"""Long-VITA's four stage recipes: what trains, parameter groups, optimizer and LR schedule.

Reference section 4 (and the original Megatron scripts
``scripts/megatron/qwen25/finetune_qwen25_14b_intern_300m_*_stage{1..4}.sh``):

    stage  trains                 LR -> min LR   global batch x iterations  seed
    1      projector              1e-3 -> 1e-5   512 x 1000                 42
    2      all (ViT x0.1, 0.9)    1e-5 -> 1e-7   540 x 5000                 4242
    3      projector + LLM        5e-6 -> 1e-7    64 x 1000                 424242
    4      projector + LLM        5e-6 -> 1e-7     8 x  500                 42424242

Common: Adam betas (0.9, 0.999), eps 1e-8, weight decay 0, gradient clipping 1.0, cosine decay
with 3 % linear warm-up (``--lr-warmup-fraction 0.03 --lr-decay-style cosine``). Stages 1, 3
and 4 pass no ViT multiplier (Megatron's defaults 1.0 / 1.0 apply; the ViT is frozen there).

**Learning rate** (Megatron ``OptimizerParamScheduler.get_lr``; ``step`` = optimizer steps
already taken, so the first update uses ``lr_at(0)``; W = ceil(warmup_ratio * iterations),
N = iterations)::

    step <= W (W > 0):  lr * step / W                 (the first update has LR 0, as in Megatron)
    W < step <= N:      min_lr + (lr - min_lr) * 0.5 * (1 + cos(pi * (step - W) / (N - W)))
    step > N:           min_lr

Megatron counts in samples and takes the warm-up fraction unrounded; for every stage
0.03 * iterations is a whole number of steps (30 / 150 / 30 / 15), so the two agree. A parameter
group's LR is ``lr_at(step) * group["lr_scale"]``, as Megatron's ``lr * lr_mult`` (the min LR is
scaled too).

**ViT layer decay** (Long-VITA ``get_vit_lr_decay_rate``): with L encoder layers, a ViT
parameter's scale is ``vit_lr_scale * vit_layer_decay ** (L + 1 - layer_id)`` where layer_id is
i + 1 for ``encoder.layers.{i}``, 0 for ``embeddings.*`` and L + 1 (exponent 0) for anything
else. With InternViT-300M (L = 24) that is 0.1 * 0.9^(25 - layer_id): 0.1 for the last layer,
0.1 * 0.9^25 = 0.0072 for the embeddings. (The original's Megatron ViT matched only
``position_embeddings`` and ``conv1`` for layer 0, so its CLS token kept exponent 0; here the
whole ``embeddings`` module, CLS token included, is layer 0, as the reference states.)

**Weight decay**: when a recipe sets it, biases and 1-D parameters (norms, layer scales) get
none, as Megatron's default ``no_weight_decay_cond``; the recipes all use 0.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn

from pipelines.errors import TrainConfigError
from pipelines.train.config import RecipeOverrides, TrainConfig

PARTS = ("vision", "projector", "llm")
_LLM_PREFIXES = ("model.embed_tokens.", "model.layers.", "model.norm.", "lm_head.")
_PART_PREFIXES = {
    "vision": ("model.vision_model.",),
    "projector": ("model.vision_projection.",),
    "llm": _LLM_PREFIXES,
}
_WRAPPER_SEGMENTS = re.compile(
    r"(^|\.)(_checkpoint_wrapped_module|_orig_mod|_fsdp_wrapped_module)\."
)
_VIT_LAYER = re.compile(r"^model\.vision_model\.encoder\.layers\.(\d+)\.")
_VIT_EMBEDDINGS = "model.vision_model.embeddings."


@dataclass(frozen=True, kw_only=True, slots=True)
class Recipe:
    """One stage's optimization recipe (see the module docstring for the table)."""

    lr: float
    """Peak learning rate."""
    min_lr: float
    """Learning rate at the end of the cosine decay (and after it)."""
    warmup_ratio: float
    """Warm-up steps = ceil(warmup_ratio * iterations)."""
    iterations: int
    """Optimizer steps."""
    global_batch: int
    """Packed sequences per optimizer step over all data-parallel ranks."""
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 0.0
    clip_grad_norm: float = 1.0
    """Max global gradient norm; 0 disables clipping."""
    vit_lr_scale: float = 1.0
    """ViT LR multiplier (stage 2: 0.1)."""
    vit_layer_decay: float = 1.0
    """ViT per-layer LR decay (stage 2: 0.9)."""
    trainable: tuple[str, ...] = ("projector", "llm")
    """Parts that train: "vision", "projector", "llm"."""
    seed: int = 42

    def __post_init__(self) -> None:
        checks = [
            (self.lr > 0, f"recipe.lr must be > 0, got {self.lr}"),
            (0 <= self.min_lr <= self.lr, f"recipe.min_lr must be in [0, lr], got {self.min_lr}"),
            (
                0 <= self.warmup_ratio <= 1,
                f"recipe.warmup_ratio must be in [0, 1], got {self.warmup_ratio}",
            ),
            (self.iterations >= 1, f"recipe.iterations must be >= 1, got {self.iterations}"),
            (self.global_batch >= 1, f"recipe.global_batch must be >= 1, got {self.global_batch}"),
            (
                len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas),
                f"recipe.betas must be two values in [0, 1), got {list(self.betas)}",
            ),
            (self.weight_decay >= 0, f"recipe.weight_decay must be >= 0, got {self.weight_decay}"),
            (
                self.clip_grad_norm >= 0,
                f"recipe.clip_grad_norm must be >= 0, got {self.clip_grad_norm}",
            ),
            (self.vit_lr_scale > 0, f"recipe.vit_lr_scale must be > 0, got {self.vit_lr_scale}"),
            (
                0 < self.vit_layer_decay <= 1,
                f"recipe.vit_layer_decay must be in (0, 1], got {self.vit_layer_decay}",
            ),
            (
                bool(self.trainable)
                and set(self.trainable) <= set(PARTS)
                and len(set(self.trainable)) == len(self.trainable),
                f"recipe.trainable must be distinct parts of {list(PARTS)}, "
                f"got {list(self.trainable)}",
            ),
        ]
        for ok, message in checks:
            if not ok:
                raise TrainConfigError(message)

    @property
    def warmup_steps(self) -> int:
        # The epsilon keeps 0.07 * 100 = 7.000000000000001 at 7 steps.
        return math.ceil(self.warmup_ratio * self.iterations - 1e-9)


_COMMON = {"warmup_ratio": 0.03, "betas": (0.9, 0.999), "weight_decay": 0.0, "clip_grad_norm": 1.0}

STAGE_RECIPES: dict[int, Recipe] = {
    1: Recipe(
        lr=1e-3, min_lr=1e-5, iterations=1000, global_batch=512, trainable=("projector",),
        seed=42, **_COMMON,
    ),
    2: Recipe(
        lr=1e-5, min_lr=1e-7, iterations=5000, global_batch=540,
        trainable=("vision", "projector", "llm"), vit_lr_scale=0.1, vit_layer_decay=0.9,
        seed=4242, **_COMMON,
    ),
    3: Recipe(
        lr=5e-6, min_lr=1e-7, iterations=1000, global_batch=64, trainable=("projector", "llm"),
        seed=424242, **_COMMON,
    ),
    4: Recipe(
        lr=5e-6, min_lr=1e-7, iterations=500, global_batch=8, trainable=("projector", "llm"),
        seed=42424242, **_COMMON,
    ),
}  # fmt: skip


def resolve_recipe(config: TrainConfig) -> Recipe:
    """The stage's recipe with the config's non-None overrides (and `config.seed`) applied;
    the result is validated (`TrainConfigError` naming the field)."""
    changes: dict[str, object] = {}
    for spec in dataclasses.fields(RecipeOverrides):
        value = getattr(config.recipe, spec.name)
        if value is not None:
            changes[spec.name] = tuple(value) if isinstance(value, list) else value
    if config.seed is not None:
        changes["seed"] = config.seed
    return dataclasses.replace(STAGE_RECIPES[config.stage], **changes)


# --------------------------------------------------------------------------------------------
# Trainable parts


def canonical_name(name: str) -> str:
    """A parameter name without activation-checkpoint / compile wrapper segments."""
    return _WRAPPER_SEGMENTS.sub(r"\1", name)


def part_of(name: str) -> str:
    """ "vision", "projector" or "llm" for a Long-VITA parameter name."""
    name = canonical_name(name)
    for part, prefixes in _PART_PREFIXES.items():
        if name.startswith(prefixes):
            return part
    raise ValueError(f"parameter {name!r} belongs to no part of {list(PARTS)}")


def apply_trainable(model: nn.Module, recipe: Recipe) -> dict[str, int]:
    """Set requires_grad per part; return element counts ``{"<part>.trainable": n,
    "<part>.frozen": m}`` for every part (0 for a part the model lacks).

    Raises:
        ValueError: nothing would train (the recipe names only parts the model lacks).
    """
    counts = {f"{part}.{kind}": 0 for part in PARTS for kind in ("trainable", "frozen")}
    for name, param in model.named_parameters():
        part = part_of(name)
        trains = part in recipe.trainable
        param.requires_grad_(trains)
        counts[f"{part}.{'trainable' if trains else 'frozen'}"] += param.numel()
    if not any(counts[f"{part}.trainable"] for part in PARTS):
        raise ValueError(
            f"recipe trains {list(recipe.trainable)} but the model has no parameter there"
        )
    return counts


# --------------------------------------------------------------------------------------------
# Parameter groups, optimizer, schedule


def vit_layer_id(name: str, num_layers: int) -> int:
    """Layer id of a ViT parameter: 0 embeddings, i + 1 encoder layer i, num_layers + 1 else."""
    name = canonical_name(name)
    if name.startswith(_VIT_EMBEDDINGS):
        return 0
    match = _VIT_LAYER.match(name)
    return int(match.group(1)) + 1 if match else num_layers + 1


def lr_scale_of(name: str, recipe: Recipe, num_vit_layers: int) -> float:
    """LR multiplier of a parameter: 1 outside the ViT, the layer-decayed ViT scale inside."""
    if part_of(name) != "vision":
        return 1.0
    exponent = num_vit_layers + 1 - vit_layer_id(name, num_vit_layers)
    return recipe.vit_lr_scale * recipe.vit_layer_decay**exponent


def _group_label(name: str, num_vit_layers: int) -> str:
    part = part_of(name)
    if part != "vision":
        return part
    layer_id = vit_layer_id(name, num_vit_layers)
    if layer_id == 0:
        return "vit.embeddings"
    return f"vit.layer{layer_id}" if layer_id <= num_vit_layers else "vit.other"


def _trainable(model: nn.Module) -> Iterator[tuple[str, nn.Parameter]]:
    return ((n, p) for n, p in model.named_parameters() if p.requires_grad)


def param_groups(model: nn.Module, recipe: Recipe) -> list[dict]:
    """torch.optim parameter groups of the trainable parameters, one per distinct
    (lr_scale, weight_decay), each with ``params``, ``lr`` (= recipe.lr * lr_scale),
    ``lr_scale``, ``weight_decay`` and a ``name`` listing its parts, e.g. "llm+projector"."""
    vision = getattr(getattr(model, "config", None), "vision", None)
    num_vit_layers = vision.num_layers if vision is not None else 0
    groups: dict[tuple[float, float], dict] = {}
    for name, param in _trainable(model):
        no_decay = name.endswith(".bias") or param.dim() == 1
        decay = 0.0 if no_decay else recipe.weight_decay
        scale = lr_scale_of(name, recipe, num_vit_layers)
        group = groups.setdefault(
            (scale, decay),
            {"params": [], "labels": [], "lr_scale": scale, "weight_decay": decay},
        )
        group["params"].append(param)
        label = _group_label(name, num_vit_layers)
        if label not in group["labels"]:
            group["labels"].append(label)
    result = []
    for group in groups.values():
        labels = group.pop("labels")
        suffix = "" if group["weight_decay"] == recipe.weight_decay else ".no_decay"
        result.append(
            {**group, "name": "+".join(labels) + suffix, "lr": recipe.lr * group["lr_scale"]}
        )
    return result


def lr_at(step: int, recipe: Recipe) -> float:
    """Learning rate for the update after `step` optimizer steps (formula in the module
    docstring); multiply by a group's ``lr_scale``."""
    warmup, total = recipe.warmup_steps, recipe.iterations
    if warmup > 0 and step <= warmup:
        return recipe.lr * step / warmup
    if step > total:
        return recipe.min_lr
    ratio = (step - warmup) / max(1, total - warmup)
    return recipe.min_lr + (recipe.lr - recipe.min_lr) * 0.5 * (1.0 + math.cos(math.pi * ratio))


def make_optimizer(model: nn.Module, recipe: Recipe) -> torch.optim.AdamW:
    """AdamW (betas, eps 1e-8, the groups' weight decay) over `param_groups`."""
    return torch.optim.AdamW(
        param_groups(model, recipe),
        lr=recipe.lr,
        betas=recipe.betas,
        eps=1e-8,
        weight_decay=recipe.weight_decay,
    )


def make_scheduler(
    optimizer: torch.optim.Optimizer, recipe: Recipe
) -> torch.optim.lr_scheduler.LambdaLR:
    """LambdaLR with base LR ``recipe.lr * lr_scale`` per group and factor
    ``lr_at(step) / recipe.lr``: after construction every group's LR is its value at step 0;
    call ``scheduler.step()`` after each ``optimizer.step()``."""
    for group in optimizer.param_groups:
        group["initial_lr"] = recipe.lr * group.get("lr_scale", 1.0)

    def factor(step: int) -> float:
        return lr_at(step, recipe) / recipe.lr

    return torch.optim.lr_scheduler.LambdaLR(optimizer, [factor] * len(optimizer.param_groups))
