"""Stage recipes (reference section 4), trainable parts, ViT layer-decay groups, the LR schedule
and the training config parser."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import pytest
import torch

from lvita_model.config import PRESETS, LLMConfig, LongVitaConfig, VisionConfig
from lvita_model.model import LongVitaForCausalLM, build_model
from pipelines.errors import TrainConfigError
from pipelines.train.config import load_train_config
from pipelines.train.recipes import (
    STAGE_RECIPES,
    Recipe,
    apply_trainable,
    lr_at,
    lr_scale_of,
    make_optimizer,
    make_scheduler,
    param_groups,
    resolve_recipe,
)

SMALL = LongVitaConfig(
    llm=LLMConfig(
        vocab_size=512, hidden_size=64, intermediate_size=96, num_layers=2, num_heads=4,
        num_kv_heads=2,
    ),
    vision=VisionConfig(
        image_size=56, patch_size=14, hidden_size=32, intermediate_size=64, num_layers=2,
        num_heads=2,
    ),
    vision_chunk_tiles=2,
)  # fmt: skip
CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "train"

# stage: (trainable, lr, min_lr, global_batch, iterations, seed, vit scale, vit decay)
REFERENCE = {
    1: ({"projector"}, 1e-3, 1e-5, 512, 1000, 42, 1.0, 1.0),
    2: ({"vision", "projector", "llm"}, 1e-5, 1e-7, 540, 5000, 4242, 0.1, 0.9),
    3: ({"projector", "llm"}, 5e-6, 1e-7, 64, 1000, 424242, 1.0, 1.0),
    4: ({"projector", "llm"}, 5e-6, 1e-7, 8, 500, 42424242, 1.0, 1.0),
}


def write_config(tmp_path: Path, body: str) -> Path:
    path = tmp_path / "run.yaml"
    path.write_text("schema_version: 1\n" + body)
    return path


MINIMAL = "stage: 3\ndata: {shards: shards/s3}\nmodel: {name: tiny}\noutput: {dir: out}\n"


# --------------------------------------------------------------------------------------------
# Recipes


@pytest.mark.parametrize("stage", [1, 2, 3, 4])
def test_stage_recipe_matches_reference_table(stage: int) -> None:
    trainable, lr, min_lr, batch, iterations, seed, vit_scale, vit_decay = REFERENCE[stage]
    recipe = STAGE_RECIPES[stage]
    assert set(recipe.trainable) == trainable
    assert (recipe.lr, recipe.min_lr) == (lr, min_lr)
    assert (recipe.global_batch, recipe.iterations, recipe.seed) == (batch, iterations, seed)
    assert (recipe.vit_lr_scale, recipe.vit_layer_decay) == (vit_scale, vit_decay)
    assert recipe.betas == (0.9, 0.999)
    assert (recipe.weight_decay, recipe.clip_grad_norm, recipe.warmup_ratio) == (0.0, 1.0, 0.03)
    assert recipe.warmup_steps == round(0.03 * iterations)


@pytest.mark.parametrize("family", ["longvita", "demo"])
@pytest.mark.parametrize("stage", [1, 2, 3, 4])
def test_stage_seed_agrees_with_the_stage_manifests(family: str, stage: int) -> None:
    """The seed is written in the stage manifests and in STAGE_RECIPES (manifests/ is not
    installed with the package, so the recipes cannot read it): the two copies must agree."""
    from lvita_data.manifest import load_manifest

    manifest = CONFIGS.parents[1] / "manifests" / family / f"stage{stage}.yaml"
    assert load_manifest(manifest).seed == STAGE_RECIPES[stage].seed


def test_resolve_recipe_applies_overrides_and_seed(tmp_path: Path) -> None:
    body = MINIMAL + (
        "recipe: {lr: 1.0e-4, iterations: 10, betas: [0.8, 0.95], trainable: [llm]}\nseed: 7\n"
    )
    recipe = resolve_recipe(load_train_config(write_config(tmp_path, body)))
    assert (recipe.lr, recipe.iterations, recipe.seed) == (1e-4, 10, 7)
    assert recipe.betas == (0.8, 0.95) and recipe.trainable == ("llm",)
    assert (recipe.min_lr, recipe.global_batch) == (1e-7, 64)  # stage 3's, not overridden


def test_resolve_recipe_without_overrides_is_the_stage_recipe(tmp_path: Path) -> None:
    assert resolve_recipe(load_train_config(write_config(tmp_path, MINIMAL))) == STAGE_RECIPES[3]


@pytest.mark.parametrize(
    ("override", "field"),
    [
        ("{min_lr: 1.0}", "recipe.min_lr"),
        ("{betas: [0.9]}", "recipe.betas"),
        ("{iterations: 0}", "recipe.iterations"),
        ("{trainable: [llm, llm]}", "recipe.trainable"),
    ],
)
def test_resolve_recipe_rejects_bad_overrides(tmp_path: Path, override: str, field: str) -> None:
    config = load_train_config(write_config(tmp_path, MINIMAL + f"recipe: {override}\n"))
    with pytest.raises(TrainConfigError, match=field):
        resolve_recipe(config)


# --------------------------------------------------------------------------------------------
# Trainable parts


@pytest.fixture(scope="module")
def small_model() -> LongVitaForCausalLM:
    return build_model(SMALL, seed=0)


def trainable_parts(model: torch.nn.Module) -> dict[str, set[bool]]:
    parts: dict[str, set[bool]] = {"vision": set(), "projector": set(), "llm": set()}
    for name, param in model.named_parameters():
        part = (
            "vision"
            if name.startswith("model.vision_model.")
            else "projector"
            if name.startswith("model.vision_projection.")
            else "llm"
        )
        parts[part].add(param.requires_grad)
    return parts


@pytest.mark.parametrize("stage", [1, 2, 3, 4])
def test_apply_trainable_per_stage(small_model: LongVitaForCausalLM, stage: int) -> None:
    counts = apply_trainable(small_model, STAGE_RECIPES[stage])
    expected = REFERENCE[stage][0]
    parts = trainable_parts(small_model)
    for part in ("vision", "projector", "llm"):
        assert parts[part] == {part in expected}, part
        kind = "trainable" if part in expected else "frozen"
        assert counts[f"{part}.{kind}"] > 0
        assert counts[f"{part}.{'frozen' if kind == 'trainable' else 'trainable'}"] == 0
    assert sum(counts.values()) == sum(p.numel() for p in small_model.parameters())


def test_apply_trainable_without_vision() -> None:
    model = build_model(LongVitaConfig(llm=SMALL.llm, vision=None), seed=0)
    counts = apply_trainable(model, STAGE_RECIPES[2])  # "vision" has nothing to train: fine
    assert counts["vision.trainable"] == counts["projector.trainable"] == 0
    assert counts["llm.trainable"] == sum(p.numel() for p in model.parameters())
    with pytest.raises(ValueError, match="no parameter"):
        apply_trainable(model, STAGE_RECIPES[1])  # projector only, and there is none


# --------------------------------------------------------------------------------------------
# Parameter groups


@pytest.fixture(scope="module")
def meta_14b() -> LongVitaForCausalLM:
    with torch.device("meta"):
        return LongVitaForCausalLM(PRESETS["long-vita-14b"])


def scale_by_name(model: torch.nn.Module, groups: list[dict]) -> dict[str, float]:
    names = {id(p): n for n, p in model.named_parameters()}
    found: dict[str, float] = {}
    for group in groups:
        for param in group["params"]:
            assert names[id(param)] not in found, "a parameter in two groups"
            found[names[id(param)]] = group["lr_scale"]
    return found


def test_param_groups_vit_layer_decay_on_14b(meta_14b: LongVitaForCausalLM) -> None:
    recipe = STAGE_RECIPES[2]
    apply_trainable(meta_14b, recipe)
    groups = param_groups(meta_14b, recipe)
    scales = scale_by_name(meta_14b, groups)
    assert set(scales) == {n for n, _ in meta_14b.named_parameters()}  # all train in stage 2
    vit = "model.vision_model."
    # 0.1 * 0.9^(25 - layer_id): layer_id 24 (the last, index 23) -> 0.09, 1 -> 0.1 * 0.9^24
    assert math.isclose(scales[vit + "encoder.layers.23.attn.qkv.weight"], 0.1 * 0.9)
    assert math.isclose(scales[vit + "encoder.layers.0.mlp.fc1.bias"], 0.1 * 0.9**24)
    for name in ("position_embedding", "class_embedding", "patch_embedding.weight"):
        assert math.isclose(scales[vit + "embeddings." + name], 0.1 * 0.9**25)
    for name in (
        "model.embed_tokens.weight",
        "lm_head.weight",
        "model.vision_projection.mlp.0.weight",
    ):
        assert scales[name] == 1.0
    assert len(groups) == 26  # LLM + projector, 24 ViT layers, embeddings
    assert len({g["name"] for g in groups}) == len(groups)
    for group in groups:
        assert group["lr"] == recipe.lr * group["lr_scale"] and group["weight_decay"] == 0.0


def test_param_groups_hold_exactly_the_trainable_parameters(meta_14b: LongVitaForCausalLM) -> None:
    apply_trainable(meta_14b, STAGE_RECIPES[3])
    groups = param_groups(meta_14b, STAGE_RECIPES[3])
    scales = scale_by_name(meta_14b, groups)
    assert set(scales) == {n for n, p in meta_14b.named_parameters() if p.requires_grad}
    assert not any(n.startswith("model.vision_model.") for n in scales)
    assert [g["name"] for g in groups] == ["llm+projector"] and groups[0]["lr_scale"] == 1.0


def test_param_groups_weight_decay_spares_biases_and_norms(
    small_model: LongVitaForCausalLM,
) -> None:
    recipe = Recipe(lr=1e-3, min_lr=0.0, warmup_ratio=0.0, iterations=1, global_batch=1,
                    weight_decay=0.1, trainable=("llm",))  # fmt: skip
    apply_trainable(small_model, recipe)
    groups = {g["name"]: g for g in param_groups(small_model, recipe)}
    assert set(groups) == {"llm", "llm.no_decay"}
    assert groups["llm"]["weight_decay"] == 0.1 and groups["llm.no_decay"]["weight_decay"] == 0.0
    assert all(p.dim() == 1 for p in groups["llm.no_decay"]["params"])
    assert all(p.dim() == 2 for p in groups["llm"]["params"])


# --------------------------------------------------------------------------------------------
# Learning-rate schedule


def test_lr_schedule_warmup_cosine_and_floor() -> None:
    recipe = STAGE_RECIPES[2]  # 5000 steps, 150 warm-up, 1e-5 -> 1e-7
    assert recipe.warmup_steps == 150
    assert lr_at(0, recipe) == 0.0
    assert math.isclose(lr_at(75, recipe), 0.5e-5)
    assert math.isclose(lr_at(150, recipe), 1e-5)
    middle = 150 + (5000 - 150) // 2
    assert math.isclose(lr_at(middle, recipe), (1e-5 + 1e-7) / 2)
    last = lr_at(4999, recipe)
    assert 1e-7 < last < 1e-7 * 1.001
    assert lr_at(5000, recipe) == lr_at(6000, recipe) == 1e-7
    values = [lr_at(s, recipe) for s in range(150, 5001)]
    assert all(a >= b for a, b in zip(values, values[1:], strict=False))


def test_lr_warmup_rounds_up() -> None:
    recipe = Recipe(lr=1e-3, min_lr=1e-5, warmup_ratio=0.03, iterations=30, global_batch=2)
    assert recipe.warmup_steps == 1
    assert lr_at(0, recipe) == 0.0 and lr_at(1, recipe) == 1e-3
    assert (
        Recipe(lr=1.0, min_lr=0.0, warmup_ratio=0.07, iterations=100, global_batch=1).warmup_steps
        == 7
    )
    no_warmup = Recipe(lr=1.0, min_lr=0.0, warmup_ratio=0.0, iterations=10, global_batch=1)
    assert lr_at(0, no_warmup) == 1.0 and lr_at(10, no_warmup) == 0.0


def test_scheduler_scales_each_group(small_model: LongVitaForCausalLM) -> None:
    recipe = dataclasses.replace(STAGE_RECIPES[2], iterations=100, lr=1e-3, min_lr=1e-5)
    apply_trainable(small_model, recipe)
    optimizer = make_optimizer(small_model, recipe)
    assert optimizer.defaults["betas"] == (0.9, 0.999) and optimizer.defaults["eps"] == 1e-8
    scheduler = make_scheduler(optimizer, recipe)
    assert all(g["lr"] == 0.0 for g in optimizer.param_groups)  # step 0 of the warm-up
    for _ in range(40):
        optimizer.step()
        scheduler.step()
    for group in optimizer.param_groups:
        assert math.isclose(group["lr"], lr_at(40, recipe) * group["lr_scale"], rel_tol=1e-12)
    scales = sorted(g["lr_scale"] for g in optimizer.param_groups)
    assert scales == pytest.approx([0.1 * 0.9**3, 0.1 * 0.9**2, 0.1 * 0.9, 1.0])  # 2 ViT layers


# --------------------------------------------------------------------------------------------
# Config parsing


def test_config_parses_and_resolves_relative_paths(tmp_path: Path) -> None:
    body = (
        "stage: 2\ndata: {manifest: ../m/stage2.yaml, shards: shards/s2}\n"
        "model: {name: ./ckpt}\nparallel: {cp: 2}\noutput: {dir: runs/x, save_every: 5}\n"
    )
    config = load_train_config(write_config(tmp_path, body))
    assert config.stage == 2 and config.parallel.cp == 2 and config.output.save_every == 5
    assert config.data.shards == str(tmp_path / "shards" / "s2")
    assert config.data.manifest == str(tmp_path.parent / "m" / "stage2.yaml")
    assert config.model.name == str(tmp_path / "ckpt")
    assert config.output.dir == str(tmp_path / "runs" / "x")


def test_config_preset_model_name_is_not_a_path(tmp_path: Path) -> None:
    assert load_train_config(write_config(tmp_path, MINIMAL)).model.name == "tiny"


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (MINIMAL + "recipe: {learning_rate: 1.0}\n", "learning_rate"),
        (MINIMAL + "parallel: {cp: two}\n", "cp"),
        ("stage: 3\ndata: {shuffle: true}\nmodel: {name: tiny}\noutput: {dir: o}\n", "shards"),
        (MINIMAL.replace("stage: 3", "stage: 5"), "stage"),
    ],
    ids=["unknown-key", "wrong-type", "missing-shards", "bad-stage"],
)
def test_config_errors_name_the_field(tmp_path: Path, body: str, message: str) -> None:
    with pytest.raises(TrainConfigError, match=message):
        load_train_config(write_config(tmp_path, body))


@pytest.mark.parametrize("name", ["stage1", "stage2", "stage3", "stage4", "demo"])
def test_shipped_train_configs_parse(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    for variable in (
        "LVITA_SHARDS_ROOT",
        "LVITA_RUNS_ROOT",
        "LVITA_DEMO_ROOT",
        "LVITA_INIT_MODEL",
        "LVITA_QWEN25_DIR",
        "LVITA_INTERNVIT_DIR",
    ):
        monkeypatch.delenv(variable, raising=False)
    config = load_train_config(CONFIGS / f"{name}.yaml")
    recipe = resolve_recipe(config)
    repo = CONFIGS.parents[1]
    if name == "demo":
        assert config.stage == 2 and config.model.name == "tiny" and config.parallel.cp == 2
        assert config.data.shards == str(repo / "demo_data" / "shards" / "stage2")
        assert (recipe.iterations, recipe.lr, config.output.save_every) == (24, 2e-3, 8)
        assert recipe.global_batch == 1 and not config.model.activation_checkpointing
        return
    stage = int(name[-1])
    assert config.stage == stage and recipe == STAGE_RECIPES[stage]
    assert config.parallel.cp == {1: 1, 2: 1, 3: 2, 4: 8}[stage]
    assert config.data.manifest == str(repo / "manifests" / "longvita" / f"{name}.yaml")
    assert config.data.shards == str(repo / "data" / "shards" / "longvita" / name)
    if stage == 1:  # the two public checkpoints, composed with a fresh projector
        assert config.model.name is None
        assert config.model.llm == str(repo / "checkpoints" / "Qwen2.5-14B-Instruct")
        assert config.model.vision == str(repo / "checkpoints" / "InternViT-300M-448px")


def test_config_stage1_model_from_two_directories(tmp_path: Path) -> None:
    body = "stage: 1\ndata: {shards: s}\nmodel: {llm: ../qwen, vision: ./vit}\noutput: {dir: o}\n"
    config = load_train_config(write_config(tmp_path, body))
    assert config.model.llm == str(tmp_path.parent / "qwen")
    assert config.model.vision == str(tmp_path / "vit")
    assert config.model.name is None and config.model.tokenizer_spec == "qwen2.5"
    (tmp_path.parent / "qwen").mkdir(exist_ok=True)
    (tmp_path.parent / "qwen" / "tokenizer.json").write_text("{}")
    assert config.model.tokenizer_spec == str(tmp_path.parent / "qwen")  # the LLM's own


@pytest.mark.parametrize(
    ("model", "message"),
    [
        ("{llm: q}", "model.vision is missing"),
        ("{vision: v}", "model.llm is missing"),
        ("{name: tiny, llm: q, vision: v}", "either name"),
        ("{}", "either name"),
    ],
)
def test_config_model_sources_are_exclusive(tmp_path: Path, model: str, message: str) -> None:
    body = f"stage: 1\ndata: {{shards: s}}\nmodel: {model}\noutput: {{dir: o}}\n"
    with pytest.raises(TrainConfigError, match=message):
        load_train_config(write_config(tmp_path, body))


def test_other_vit_parameters_and_wrapped_names() -> None:
    recipe = STAGE_RECIPES[2]
    assert lr_scale_of("model.vision_model.post_norm.weight", recipe, 24) == 0.1  # exponent 0
    wrapped = "model.vision_model.encoder.layers.0._checkpoint_wrapped_module.attn.qkv.weight"
    assert math.isclose(lr_scale_of("_orig_mod." + wrapped, recipe, 24), 0.1 * 0.9**24)
    assert (
        lr_scale_of("model.layers.3._checkpoint_wrapped_module.mlp.up_proj.weight", recipe, 24) == 1
    )
