"""Training checkpoints: save -> keep training -> resume into fresh objects reproduces the same
steps exactly (parameters, Adam state, LR, RNG draws), single-process and FSDP2 over 2 gloo
ranks; atomicity, pruning, world-size check, checksums (a flipped byte, a truncated, missing or
extra file is refused, naming the file and the previous good checkpoint), Hugging Face export."""

from __future__ import annotations

import copy
import dataclasses
import json
import random
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "model"))
from dist_utils import run_distributed  # noqa: E402

from lvita_model.config import LLMConfig, LongVitaConfig, VisionConfig  # noqa: E402
from lvita_model.model import LongVitaForCausalLM, build_model  # noqa: E402
from lvita_model.weights import load_pretrained  # noqa: E402
from pipelines.errors import CheckpointError  # noqa: E402
from pipelines.train.checkpoint import (  # noqa: E402
    export_hf,
    latest_checkpoint,
    load_checkpoint,
    save_checkpoint,
)
from pipelines.train.checksums import (  # noqa: E402
    file_sizes,
    hash_files,
    split_by_size,
    write_manifest,
)
from pipelines.train.recipes import (  # noqa: E402
    STAGE_RECIPES,
    apply_trainable,
    make_optimizer,
    make_scheduler,
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
RECIPE = dataclasses.replace(STAGE_RECIPES[2], iterations=20, lr=1e-2, min_lr=1e-4)
SEQ = 40


class Trainer:
    """Model, optimizer and scheduler of the stage-2 recipe (everything trains)."""

    def __init__(self, seed: int, shard: bool = False) -> None:
        self.model = build_model(SMALL, seed=seed)
        apply_trainable(self.model, RECIPE)
        if shard:
            from torch.distributed.device_mesh import init_device_mesh
            from torch.distributed.fsdp import fully_shard

            mesh = init_device_mesh("cpu", (torch.distributed.get_world_size(),))
            for layer in self.model.model.layers:
                fully_shard(layer, mesh=mesh)
            fully_shard(self.model, mesh=mesh)
        self.optimizer = make_optimizer(self.model, RECIPE)
        self.scheduler = make_scheduler(self.optimizer, RECIPE)

    def step(self, images: bool = False) -> float:
        """One update on a batch drawn from the global torch RNG (so restoring it matters)."""
        ids = torch.randint(0, 512, (SEQ,))
        targets = torch.roll(ids, -1)
        targets[-1] = -100
        extra = {}
        if images:  # 2 tiles of 4 placeholder tokens each: vision and projector get gradients
            extra = {
                "pixel_values": torch.randn(2, 3, 56, 56),
                "image_token_positions": torch.tensor([[2, 3, 4, 5], [20, 21, 22, 23]]),
            }
        hidden = self.model(ids, torch.arange(SEQ), **extra)
        loss_sum, count = self.model.loss(hidden, targets)
        (loss_sum / count).backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), RECIPE.clip_grad_norm)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return (loss_sum / count).item()

    def params(self) -> dict[str, torch.Tensor]:
        return {
            name: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().clone()
            for name, p in self.model.named_parameters()
        }


def draws() -> tuple[float, float, float]:
    return torch.rand(()).item(), random.random(), float(np.random.rand())


def assert_same_params(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


def assert_same_optimizer(a: dict, b: dict) -> None:
    assert a["state"].keys() == b["state"].keys()
    for index, state in a["state"].items():
        for key, value in state.items():
            assert torch.equal(value, b["state"][index][key]), (index, key)
    assert [g["lr"] for g in a["param_groups"]] == [g["lr"] for g in b["param_groups"]]


# --------------------------------------------------------------------------------------------
# Single process


def test_resume_reproduces_the_uninterrupted_run(tmp_path: Path) -> None:
    torch.manual_seed(0), random.seed(0), np.random.seed(0)
    run = Trainer(seed=0)
    run.step(images=True)
    run.step()  # text only: the ViT has Adam state from the first step
    optimizer_state = copy.deepcopy(run.optimizer.state_dict())
    last_lr = run.scheduler.get_last_lr()
    saved = save_checkpoint(
        tmp_path, 2, model=run.model, optimizer=run.optimizer, scheduler=run.scheduler,
        loader_state={"cursor": 17}, metrics={"tokens": 80, "loss": torch.tensor(2.5)},
    )  # fmt: skip
    assert saved == tmp_path / "checkpoints" / "step-00000002" == latest_checkpoint(tmp_path)
    expected_losses = [run.step(images=True), run.step()]
    expected_params, expected_draws = run.params(), draws()

    torch.manual_seed(99), random.seed(99), np.random.seed(99)  # a fresh process, other state
    resumed = Trainer(seed=1)
    state = load_checkpoint(
        saved, model=resumed.model, optimizer=resumed.optimizer, scheduler=resumed.scheduler
    )
    assert (state.step, state.loader_state, state.metrics) == (
        2,
        {"cursor": 17},
        {"tokens": 80, "loss": 2.5},
    )
    assert resumed.scheduler.get_last_lr() == last_lr
    assert_same_optimizer(optimizer_state, resumed.optimizer.state_dict())
    assert [resumed.step(images=True), resumed.step()] == expected_losses
    assert_same_params(expected_params, resumed.params())
    assert draws() == expected_draws


def test_save_before_any_step_changes_nothing(tmp_path: Path) -> None:
    run = Trainer(seed=0)
    path = save_checkpoint(
        tmp_path, 0, model=run.model, optimizer=run.optimizer, scheduler=run.scheduler,
        loader_state={},
    )  # fmt: skip
    assert not run.optimizer.state  # torch's state initialization was undone
    load_checkpoint(path, model=run.model, optimizer=run.optimizer, scheduler=run.scheduler)
    assert not run.optimizer.state


class Tiny(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(4, 4)
        self.unused = torch.nn.Linear(4, 4)  # never gets a gradient, so no Adam state

    def step(self, optimizer: torch.optim.Optimizer) -> float:
        loss = self.linear(torch.randn(3, 4)).square().mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.item()


def save_tiny(run_dir: Path, step: int, keep_last: int = 2) -> Path:
    model = Tiny()
    optimizer = torch.optim.AdamW(model.parameters())
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    return save_checkpoint(
        run_dir, step, model=model, optimizer=optimizer, scheduler=scheduler,
        loader_state={"step": step}, keep_last=keep_last,
    )  # fmt: skip


def test_parameters_without_optimizer_state_stay_without(tmp_path: Path) -> None:
    model = Tiny()
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    model.step(optimizer)
    assert len(optimizer.state) == 2
    path = save_checkpoint(
        tmp_path, 1, model=model, optimizer=optimizer, scheduler=scheduler, loader_state={}
    )
    fresh = Tiny()
    fresh_optimizer = torch.optim.AdamW(fresh.parameters(), lr=0.1)
    fresh_scheduler = torch.optim.lr_scheduler.LambdaLR(fresh_optimizer, lambda s: 1.0)
    load_checkpoint(path, model=fresh, optimizer=fresh_optimizer, scheduler=fresh_scheduler)
    assert len(fresh_optimizer.state) == 2  # torch initialized all 4; the unused 2 are dropped
    torch.manual_seed(1)
    expected = model.step(optimizer)
    torch.manual_seed(1)
    assert fresh.step(fresh_optimizer) == expected
    assert_same_params(dict(model.named_parameters()), dict(fresh.named_parameters()))


def test_pruning_and_latest(tmp_path: Path) -> None:
    directory = tmp_path / "checkpoints"
    assert latest_checkpoint(tmp_path) is None
    for step in (10, 20, 30):
        save_tiny(tmp_path, step)
    assert sorted(p.name for p in directory.iterdir()) == [
        "latest", "step-00000020", "step-00000030",
    ]  # fmt: skip
    assert (directory / "latest").read_text() == "step-00000030\n"
    save_tiny(tmp_path, 40, keep_last=0)
    save_tiny(tmp_path, 50, keep_last=0)
    assert len(list(directory.glob("step-*"))) == 4


def test_a_crashed_save_leaves_the_previous_checkpoint_latest(tmp_path: Path) -> None:
    save_tiny(tmp_path, 10)
    directory = tmp_path / "checkpoints"
    crashed = directory / "step-00000020.tmp"
    crashed.mkdir()
    (crashed / ".metadata").write_bytes(b"partial")
    assert latest_checkpoint(tmp_path) == directory / "step-00000010"
    (directory / "latest").write_text("step-00000020\n")  # crash between rename and pointer
    assert latest_checkpoint(tmp_path) == directory / "step-00000010"
    (directory / "latest").unlink()
    assert latest_checkpoint(tmp_path) == directory / "step-00000010"
    save_tiny(tmp_path, 30)
    assert not crashed.exists()  # stale temporaries are removed by the next save
    assert latest_checkpoint(tmp_path) == directory / "step-00000030"


def test_load_refuses_another_world_size(tmp_path: Path) -> None:
    path = save_tiny(tmp_path, 10)
    trainer_file = path / "trainer.json"
    trainer = json.loads(trainer_file.read_text())
    trainer["world_size"] = 2
    trainer_file.write_text(json.dumps(trainer))
    rewrite_checksums(path)  # an edit that verifies, so the world-size check is reached
    model = Tiny()
    optimizer = torch.optim.AdamW(model.parameters())
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    with pytest.raises(CheckpointError, match="saved by 2 ranks and this run has 1"):
        load_checkpoint(path, model=model, optimizer=optimizer, scheduler=scheduler)
    with pytest.raises(CheckpointError, match="not a complete checkpoint"):
        load_checkpoint(tmp_path, model=model, optimizer=optimizer, scheduler=scheduler)


def rewrite_checksums(path: Path) -> None:
    sizes = file_sizes(path)
    write_manifest(path, sizes, hash_files(path, list(sizes)))


def load_tiny(path: Path) -> int:
    model = Tiny()
    optimizer = torch.optim.AdamW(model.parameters())
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    return load_checkpoint(path, model=model, optimizer=optimizer, scheduler=scheduler).step


def flip_byte(file: Path) -> None:
    data = bytearray(file.read_bytes())
    data[len(data) // 2] ^= 0x01
    file.write_bytes(bytes(data))


def truncate(file: Path) -> None:
    file.write_bytes(file.read_bytes()[:-7])


def test_hashing_is_split_by_size_over_the_ranks() -> None:
    sizes = {".metadata": 9, "__0_0.distcp": 1000, "__1_0.distcp": 990, "trainer.json": 20}
    shares = split_by_size(sizes, 2)
    assert sorted(n for share in shares for n in share) == sorted(sizes)
    assert [sum(sizes[n] for n in share) for share in shares] == [1009, 1010]
    assert split_by_size({"a": 1}, 3) == [["a"], [], []]  # idle ranks still join the gather


def test_checksums_cover_every_file_of_a_checkpoint(tmp_path: Path) -> None:
    path = save_tiny(tmp_path, 10)
    manifest = json.loads((path / "checksums.json").read_text())
    assert sorted(manifest["files"]) == [
        ".metadata", "__0_0.distcp", "rng/rank-00000.json", "rng/rank-00000.safetensors",
        "trainer.json",
    ]  # fmt: skip
    assert all(e["size"] == (path / n).stat().st_size for n, e in manifest["files"].items())
    assert load_tiny(path) == 10


@pytest.mark.parametrize(
    ("damage", "expected"),
    [
        (flip_byte, r"__0_0\.distcp: sha256 [0-9a-f]{16}\.\.\., checksums\.json records "
         r"[0-9a-f]{16}\.\.\. \(contents altered\)"),
        (truncate, r"__0_0\.distcp: size \d+ bytes, checksums\.json records \d+ \(truncated\)"),
        (lambda f: f.unlink(), r"__0_0\.distcp: missing"),
        (lambda f: f.with_name("stray.bin").write_bytes(b"x"),
         r"stray\.bin: unexpected file \(not in checksums\.json\)"),
    ],
    ids=["flipped-byte", "truncated", "missing", "unexpected"],
)  # fmt: skip
def test_a_damaged_checkpoint_is_refused_naming_the_file_and_the_previous_one(
    tmp_path: Path, damage, expected: str
) -> None:
    for step in (10, 20):
        save_tiny(tmp_path, step)
    latest = latest_checkpoint(tmp_path)
    damage(latest / "__0_0.distcp")
    with pytest.raises(CheckpointError, match=expected) as error:
        load_tiny(latest)
    previous = tmp_path / "checkpoints" / "step-00000010"
    message = str(error.value)
    assert message.startswith(f"checkpoint {latest} fails verification")
    assert f"the previous checkpoint that verifies is {previous}: move step-00000020" in message
    latest.rename(tmp_path / "set-aside")  # as the message says: the resume goes on from 10
    assert latest_checkpoint(tmp_path) == previous and load_tiny(previous) == 10


def test_without_a_verified_older_checkpoint_the_refusal_says_so(tmp_path: Path) -> None:
    for step in (10, 20):
        save_tiny(tmp_path, step)
    directory = tmp_path / "checkpoints"
    flip_byte(directory / "step-00000010" / "rng" / "rank-00000.safetensors")
    truncate(directory / "step-00000020" / "trainer.json")
    with pytest.raises(CheckpointError, match=r"trainer\.json: size") as error:
        load_tiny(directory / "step-00000020")
    assert "there is no older complete checkpoint that verifies" in str(error.value)


def test_a_checkpoint_without_its_checksums_is_incomplete(tmp_path: Path) -> None:
    for step in (10, 20):
        save_tiny(tmp_path, step)
    directory = tmp_path / "checkpoints"
    (directory / "step-00000020" / "checksums.json").unlink()
    assert latest_checkpoint(tmp_path) == directory / "step-00000010"  # `latest` names 20
    with pytest.raises(CheckpointError, match="is not a complete checkpoint: it has no chec"):
        load_tiny(directory / "step-00000020")
    save_tiny(tmp_path, 30)  # keep_last=2 counts complete checkpoints only
    assert sorted(p.name for p in directory.glob("step-*")) == [
        "step-00000010", "step-00000020", "step-00000030",
    ]  # fmt: skip
    (directory / "step-00000030" / "checksums.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="checksums.json: unreadable: not valid JSON"):
        load_tiny(directory / "step-00000030")


def test_a_format_1_checkpoint_resumes_with_a_warning(tmp_path: Path) -> None:
    path = save_tiny(tmp_path, 10)
    (path / "checksums.json").unlink()  # what a save before checksums wrote
    trainer = json.loads((path / "trainer.json").read_text())
    (path / "trainer.json").write_text(json.dumps({**trainer, "format_version": 1}))
    assert latest_checkpoint(tmp_path) == path
    with pytest.warns(UserWarning, match="before checkpoints recorded checksums"):
        assert load_tiny(path) == 10


def test_export_hf_loads_back_with_equal_weights(tmp_path: Path) -> None:
    model = build_model(SMALL, seed=3)
    export_hf(model, tmp_path / "hf")
    loaded = load_pretrained(tmp_path / "hf")
    assert isinstance(loaded, LongVitaForCausalLM)
    assert dataclasses.replace(loaded.config, vision_chunk_tiles=2) == SMALL  # a runtime knob
    assert_same_params(
        dict(model.named_parameters()), {n: p.detach() for n, p in loaded.named_parameters()}
    )


# --------------------------------------------------------------------------------------------
# FSDP2 over 2 gloo ranks


def _fsdp_resume(rank: int, world_size: int, run_dir: str) -> dict:
    torch.manual_seed(rank), random.seed(rank), np.random.seed(rank)  # DP: per-rank data
    run = Trainer(seed=0, shard=True)
    run.step(images=True)
    run.step()
    path = save_checkpoint(
        run_dir, 2, model=run.model, optimizer=run.optimizer, scheduler=run.scheduler,
        loader_state={"rank": rank},
    )  # fmt: skip
    expected_losses = [run.step(), run.step(images=True)]
    expected_params, expected_draws = run.params(), draws()

    torch.manual_seed(50 + rank)
    resumed = Trainer(seed=1, shard=True)
    state = load_checkpoint(
        path, model=resumed.model, optimizer=resumed.optimizer, scheduler=resumed.scheduler
    )
    losses = [resumed.step(), resumed.step(images=True)]
    assert_same_params(expected_params, resumed.params())
    export_hf(resumed.model, Path(run_dir) / "hf")
    expected_draws_equal = draws() == expected_draws

    # A byte of rank 1's shard flips: both ranks refuse, offering step 2 (collective verdict).
    damaged = save_checkpoint(
        run_dir, 4, model=resumed.model, optimizer=resumed.optimizer,
        scheduler=resumed.scheduler, loader_state={"rank": rank},
    )  # fmt: skip
    if rank == 0:
        data = bytearray((damaged / "__1_0.distcp").read_bytes())
        data[len(data) // 2] ^= 0x01
        (damaged / "__1_0.distcp").write_bytes(bytes(data))
    torch.distributed.barrier()
    try:
        load_checkpoint(
            damaged, model=resumed.model, optimizer=resumed.optimizer, scheduler=resumed.scheduler
        )
        refusal = None
    except CheckpointError as error:
        refusal = str(error)
    return {
        "loader_state": state.loader_state,
        "losses_equal": losses == expected_losses,
        "draws_equal": expected_draws_equal,
        "refusal": refusal,
        "param_type": type(next(resumed.model.parameters())).__name__,
        # numpy: tensors would travel as shared-memory handles that die with the rank
        "params": {n: t.numpy() for n, t in expected_params.items()} if rank == 0 else None,
    }


def test_fsdp2_resume_across_two_gloo_ranks(tmp_path: Path) -> None:
    results = run_distributed(_fsdp_resume, 2, str(tmp_path))
    assert [r["loader_state"] for r in results] == [{"rank": 0}, {"rank": 1}]
    assert all(r["losses_equal"] and r["draws_equal"] for r in results)
    refusal = results[0]["refusal"]
    assert refusal is not None and refusal == results[1]["refusal"]
    assert "__1_0.distcp: sha256" in refusal and "__0_0.distcp" not in refusal
    assert f"verifies is {tmp_path / 'checkpoints' / 'step-00000002'}:" in refusal
    assert {r["param_type"] for r in results} == {"DTensor"}
    rng_dir = tmp_path / "checkpoints" / "step-00000002" / "rng"
    assert sorted(p.name for p in rng_dir.iterdir()) == [
        "rank-00000.json", "rank-00000.safetensors", "rank-00001.json", "rank-00001.safetensors",
    ]  # fmt: skip
    loaded = load_pretrained(tmp_path / "hf")  # written from the sharded model by rank 0
    exported = {n: p.detach() for n, p in loaded.named_parameters()}
    expected = {n: torch.from_numpy(a) for n, a in results[0]["params"].items()}
    assert_same_params(expected, exported)  # the model after the resumed steps
