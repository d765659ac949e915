"""`lvita train CONFIG --set KEY.SUB=VALUE`: overrides as strict as the YAML (issue 16)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from pipelines.errors import TrainConfigError
from pipelines.train.config import load_train_config, parse_override

REPO = Path(__file__).resolve().parents[2]
CONFIG = "schema_version: 1\nstage: 3\ndata: {shards: shards/s3}\nmodel: {name: tiny}\n" + (
    "recipe: {lr: 1.0e-3}\noutput: {dir: out}\n"
)


@pytest.fixture()
def config(tmp_path: Path) -> Path:
    path = tmp_path / "conf" / "run.yaml"
    path.parent.mkdir()
    path.write_text(CONFIG, encoding="utf-8")
    return path


def test_overrides_are_typed_by_the_config_fields(config: Path) -> None:
    loaded = load_train_config(
        config,
        [
            "recipe.lr=2e-5",  # YAML 1.1 alone reads this as a string
            "recipe.iterations=7",
            "recipe.betas=[0.9, 0.95]",
            "parallel.cp=2",
            "parallel.cp_method=ulysses",
            "model.activation_checkpointing=false",
            "seed=5",
        ],
    )
    assert loaded.recipe.lr == 2e-5 and loaded.recipe.iterations == 7
    assert loaded.recipe.betas == [0.9, 0.95]
    assert (loaded.parallel.cp, loaded.parallel.cp_method) == (2, "ulysses")
    assert loaded.model.activation_checkpointing is False and loaded.seed == 5
    assert load_train_config(config).recipe.lr == 1e-3  # the file itself is unchanged


def test_paths_on_the_command_line_are_relative_to_the_current_directory(
    config: Path, tmp_path: Path, monkeypatch
) -> None:
    monkeypatch.chdir(tmp_path)
    loaded = load_train_config(config, ["data.shards=built/s3", "model.tokenizer=qwen2.5"])
    assert loaded.data.shards == str(tmp_path / "built" / "s3")
    assert loaded.output.dir == str(config.parent / "out")  # from the file: its directory
    assert loaded.model.tokenizer == "qwen2.5"  # a tokenizer spec, not a path
    assert load_train_config(config, ["model.name=./ckpt"]).model.name == str(tmp_path / "ckpt")


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("recipe.lr=fast", "recipe.lr"),
        ("recipe.learning_rate=1", "learning_rate"),
        ("parallel.cp_method=tree", "cp_method"),
        ("recipe.iterations=1.5", "recipe.iterations"),
        ("stage.x=1", "stage is not a section"),
        ("recipe.lr", "expected KEY.SUB=VALUE"),
        ("recipe..lr=1", "expected KEY.SUB=VALUE"),
        ("recipe.betas=[0.9", "not YAML"),
    ],
)
def test_bad_overrides_are_config_errors(config: Path, override: str, message: str) -> None:
    with pytest.raises(TrainConfigError, match=message):
        load_train_config(config, [override])


def test_parse_override_reads_yaml_values() -> None:
    assert parse_override("recipe.trainable=[llm, projector]") == (
        ["recipe", "trainable"],
        ["llm", "projector"],
    )
    assert parse_override("seed=null") == (["seed"], None)


def test_cli_reports_a_bad_override_in_one_line(config: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "pipelines", "train", str(config), "--set", "recipe.lr=fast"],
        capture_output=True,
        text=True,
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        timeout=120,
    )
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "recipe.lr" in lines[0] and "Traceback" not in result.stderr
