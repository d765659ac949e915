"""`lvita` command line: one exit-code table, messages prefixed as before, one dtype rule."""

from __future__ import annotations

import pytest
import torch

from lvita_data.errors import (
    BuildError,
    LoaderError,
    ManifestError,
    MissingInputs,
    PoolError,
    RejectRateExceeded,
    StatsError,
    WorkerLost,
)
from lvita_model.errors import ConfigError, WeightsError
from pipelines.cli import EXIT_CODES, exit_code, run
from pipelines.errors import (
    CheckpointError,
    GenerateError,
    GenerateInputError,
    PipelineError,
    TrainConfigError,
)
from pipelines.runtime import compute_dtype


@pytest.mark.parametrize(
    ("error", "code"),
    [
        (ManifestError, 2),
        (TrainConfigError, 2),
        (GenerateError, 2),
        (MissingInputs, 3),
        (LoaderError, 3),
        (CheckpointError, 3),
        (ConfigError, 3),
        (WeightsError, 3),
        (GenerateInputError, 3),
        (RejectRateExceeded, 4),
        (BuildError, 5),
        (StatsError, 5),
    ],
)
def test_documented_exit_code_of_each_error_class(error, code):
    assert exit_code(error("x")) == code


def test_most_specific_class_wins_and_unexpected_errors_have_no_code():
    assert issubclass(GenerateInputError, GenerateError)
    assert exit_code(GenerateInputError("x")) == 3  # not GenerateError's 2
    assert exit_code(ValueError("x")) is None
    assert exit_code(PipelineError("x")) is None  # only concrete failures are mapped
    assert all(code in (1, 2, 3, 4, 5) for code in EXIT_CODES.values())
    assert exit_code(WorkerLost("x")) == 1 and exit_code(PoolError("x")) == 2


def test_training_config_error_is_no_manifest_error():
    assert not issubclass(TrainConfigError, ManifestError)
    assert issubclass(TrainConfigError, PipelineError)


def test_manifest_errors_have_no_command_prefix(tmp_path, capsys):
    assert run(["plan", str(tmp_path / "missing.yaml")]) == 2
    assert capsys.readouterr().err.startswith(f"lvita: {tmp_path / 'missing.yaml'}: cannot read")
    assert run(["train", str(tmp_path / "missing.yaml")]) == 2
    assert capsys.readouterr().err.startswith(f"lvita: {tmp_path / 'missing.yaml'}: cannot read")


def test_command_errors_name_the_command(tmp_path, capsys):
    assert run(["stats", str(tmp_path)]) == 5
    assert capsys.readouterr().err.startswith("lvita stats: ")
    assert run(["verify", str(tmp_path / "nowhere")]) == 6
    assert "[files] not a directory" in capsys.readouterr().out


def test_one_compute_dtype_rule_for_train_and_generate():
    assert compute_dtype("auto", torch.device("cpu")) == torch.float32
    assert compute_dtype("auto", torch.device("cuda", 0)) == torch.bfloat16
    assert compute_dtype("float16", torch.device("cpu")) == torch.float16
    assert compute_dtype("bfloat16", torch.device("cpu")) == torch.bfloat16


@pytest.mark.parametrize(
    ("env", "said", "hint"),
    [
        ({}, True, "lvita train --set recipe.lr=1e-4 c.yaml"),
        ({"RANK": "0", "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2"}, True, None),
        ({"RANK": "1", "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2"}, False, None),
        ({"LVITA_LAUNCHED_RANK": "1", "RANK": "0"}, False, None),
    ],
)
def test_a_training_ranks_interrupt_line(monkeypatch, capsys, env, said, hint):
    """Interrupted before its config is read: one process says how to go on (under torchrun on
    one machine, with --nproc-per-node, added at the end so that options stay whole; without
    --no-resume), the other ranks and the ranks of a launcher say nothing."""
    import pipelines.train.config as config

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    for name in ("RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "LVITA_LAUNCHED_RANK"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(config, "load_train_config", interrupted)
    argv = ["train", "--set", "recipe.lr=1e-4", "c.yaml", "--no-resume"]
    assert run(argv) == 130
    err = capsys.readouterr().err
    if not said:
        assert err == ""
        return
    expected = hint or "lvita train --set recipe.lr=1e-4 c.yaml --nproc-per-node 2"
    assert err == f"lvita train: interrupted; finished work is kept. To go on: {expected}\n"
