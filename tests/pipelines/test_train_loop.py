"""`lvita train`: DP=2, CP=2 and DP=2 x CP=2 steps equal the single-process step, a run killed
with SIGKILL resumes to the same losses, bad configs fail with clear errors.

Data: one small build of the demo corpus (2 packs of 2048 tokens, with tiles); model: a small
random Long-VITA (real vocabulary and 448-px tiles: the demo ids reach ~151,700 and every tile
has 256 placeholders; 1 decoder layer of width 32, 1 ViT layer) saved as a checkpoint directory.
The equivalence runs fork gloo ranks (`dist_utils.run_distributed`, one thread per rank); the
resume runs are `python -m pipelines train` subprocesses, one killed by the loop's test hook
(``LVITA_TRAIN_KILL_AFTER_STEP``) after a step that is not a checkpoint step.

Measured (2 vCPUs, torch 2.13 CPU): DP=2 is bit-identical to one rank (loss and every
parameter); CP=2 and DP=2 x CP=2 differ by 1.3e-7 in the loss (11.93) and by at most 5.2e-4 lr
in a parameter after the Adam step (see `assert_same_step`); the resumed losses, gradient norms
and LRs equal the uninterrupted run's exactly. The whole file takes about 60 s.
"""

from __future__ import annotations

import dataclasses
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "model"))
from dist_utils import run_distributed  # noqa: E402

from lvita_data.build.run import build_stage  # noqa: E402
from lvita_model.config import LLMConfig, LongVitaConfig, VisionConfig  # noqa: E402
from lvita_model.model import build_model  # noqa: E402
from lvita_model.weights import save_pretrained  # noqa: E402
from pipelines.errors import TrainConfigError  # noqa: E402
from pipelines.train.config import load_train_config  # noqa: E402
from pipelines.train.loop import KILL_ENV, accumulation_steps, train  # noqa: E402
from pipelines.train.metrics import read_metrics  # noqa: E402

REPO = Path(__file__).resolve().parents[2]

MANIFEST = """\
schema_version: 1
stage: traintest
seed: 5
tokenizer: qwen2.5
pack:
  max_seq_len: 2048
  reset_attention: true
  group_by: none
image:
  max_tiles: 1
  min_tiles: 1
video:
  max_frames: 2
  max_fps: 1.0
  fit_to_budget: true
rejects:
  max_rate: 0.5
  min_selected: 1
shards:
  packs_per_shard: 4
datasets:
  - name: lv_image_caption
    format: longvita_jsonl
    path: {root}/longvita/image_caption.jsonl
    media_root: {root}/longvita
    ratio: 0.25
  - name: short_chat
    format: text_jsonl
    path: {root}/text/short_chat.jsonl
    ratio: 0.5
"""

SMALL = LongVitaConfig(
    llm=LLMConfig(
        vocab_size=152064,
        hidden_size=32,
        intermediate_size=64,
        num_layers=1,
        num_heads=2,
        num_kv_heads=1,
    ),
    vision=VisionConfig(hidden_size=32, intermediate_size=64, num_layers=1, num_heads=2),
)


@pytest.fixture(scope="module")
def shards(demo_corpus, tmp_path_factory) -> Path:
    """2 packs of 2048 tokens (one with 2 tiles, one with 6)."""
    work = tmp_path_factory.mktemp("train_shards")
    manifest = work / "traintest.yaml"
    manifest.write_text(MANIFEST.format(root=demo_corpus[0]), encoding="utf-8")
    build_stage(str(manifest), str(work / "out"), workers=1, progress=False)
    return work / "out"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("train_model")
    save_pretrained(build_model(SMALL, seed=1), directory)
    return directory


LR = 1.0e-3


def write_config(path: Path, shards: Path, model_dir: Path, **sections) -> Path:
    """A stage-2 config (everything trains) without warm-up: the first step has the full LR."""
    config = {
        "schema_version": 1,
        "stage": 2,
        "data": {"shards": str(shards)},
        "model": {"name": str(model_dir)},
        "recipe": {"iterations": 1, "global_batch": 2, "lr": LR, "warmup_ratio": 0.0},
        "parallel": {"cp": 1},
        "output": {"dir": str(path.parent / "run"), "save_every": 100},
    }
    for section, values in sections.items():
        config[section] = {**config.get(section, {}), **values}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    return path


def _train_rank(rank: int, world_size: int, config_path: str, out_dir: str) -> dict:
    config = load_train_config(config_path)
    config = dataclasses.replace(config, output=dataclasses.replace(config.output, dir=out_dir))
    result = train(config)
    return {"losses": result.losses, "records": result.records}


def run_ranks(config: Path, world_size: int, out_dir: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """(rank 0's result, the exported parameters) of a run on `world_size` gloo ranks."""
    results = run_distributed(_train_rank, world_size, str(config), str(out_dir), timeout=240)
    return results[0], load_file(str(out_dir / "hf" / "model.safetensors"))


NOISE_ONLY = ".self_attn.k_proj.bias"
"""Its exact gradient is 0 (q . b_k is the same for every key of a query: softmax ignores it),
so the computed one is rounding noise, which Adam's first step (update = lr * g / |g|) turns
into +-lr of arbitrary sign: not comparable between two summation orders."""


def max_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> tuple[float, str]:
    """Worst max|a - b| over the tensors (but `NOISE_ONLY`), and its name."""
    assert a.keys() == b.keys()
    worst, name = 0.0, ""
    for key in b:
        if key.endswith(NOISE_ONLY):
            continue
        error = (a[key] - b[key]).abs().max().item()
        if error > worst:
            worst, name = error, key
    return worst, name


@pytest.fixture(scope="module")
def reference(shards, model_dir, tmp_path_factory) -> tuple[dict, dict, dict]:
    """One step of the whole global batch (2 packs) on one rank: (result, parameters after,
    parameters before)."""
    work = tmp_path_factory.mktemp("train_reference")
    config = write_config(work / "train.yaml", shards, model_dir)
    result, params = run_ranks(config, 1, work / "run")
    return result, params, load_file(str(model_dir / "model.safetensors"))


def assert_same_step(result: dict, params: dict, reference: tuple[dict, dict, dict]) -> None:
    ref_result, ref_params, initial = reference
    record, ref_record = result["records"][0], ref_result["records"][0]
    assert record["supervised_tokens"] == ref_record["supervised_tokens"] > 0
    assert record["loss"] == pytest.approx(ref_record["loss"], rel=1e-6)
    # a gradient averaged instead of summed over DP or CP ranks would halve the norm
    assert record["grad_norm"] == pytest.approx(ref_record["grad_norm"], rel=1e-5)
    # Adam's first update is lr * g / (|g| + eps): elements whose |g| is near eps (1e-8) turn
    # an absolute gradient difference d into up to lr * d / (4 eps): rounding noise of another
    # summation order (1e-6 of a gradient of 1e-3) can reach 1e-2 lr there. A lost or doubled
    # contribution of a rank changes signs: errors of the order of lr.
    error, name = max_difference(params, ref_params)
    print(
        f"loss {record['loss'] - ref_record['loss']:+.2e}, parameters {error / LR:.2e} lr ({name})"
    )
    assert error <= 1e-2 * LR, (name, error)
    moved, _ = max_difference(ref_params, initial)
    assert moved == pytest.approx(LR, rel=1e-3)  # the step moved parameters by lr


def test_dp2_step_equals_the_single_process_step(shards, model_dir, reference, tmp_path):
    config = write_config(tmp_path / "train.yaml", shards, model_dir)
    result, params = run_ranks(config, 2, tmp_path / "run")
    assert_same_step(result, params, reference)


def test_cp2_step_equals_the_single_process_step(shards, model_dir, reference, tmp_path):
    config = write_config(tmp_path / "train.yaml", shards, model_dir, parallel={"cp": 2})
    result, params = run_ranks(config, 2, tmp_path / "run")
    assert_same_step(result, params, reference)


# --------------------------------------------------------------------------------------------
# Exact resume after kill -9


def _cli(config: Path, kill_after: int | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop(KILL_ENV, None)
    if kill_after is not None:
        env[KILL_ENV] = str(kill_after)
    return subprocess.run(
        [sys.executable, "-m", "pipelines", "train", str(config)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )


def test_killed_run_resumes_to_the_same_losses(shards, model_dir, tmp_path):
    """5 steps of 1 pack (2 packs: the epochs wrap), checkpoints every 2 steps. Killed after
    step 3, the restart resumes from step 2: metrics.jsonl holds steps 1-5 once each, with the
    losses of the uninterrupted run."""
    sections = {
        "recipe": {"iterations": 5, "global_batch": 1, "warmup_ratio": 0.2},
        "output": {"save_every": 2, "export_hf": False},
    }
    straight = write_config(tmp_path / "a" / "train.yaml", shards, model_dir, **sections)
    killed = write_config(tmp_path / "b" / "train.yaml", shards, model_dir, **sections)

    done = _cli(straight)
    assert done.returncode == 0, done.stderr
    crash = _cli(killed, kill_after=3)
    assert crash.returncode == -signal.SIGKILL, crash.stderr
    assert [r["step"] for r in read_metrics(killed.parent / "run" / "metrics.jsonl")] == [1, 2, 3]
    resumed = _cli(killed)
    assert resumed.returncode == 0, resumed.stderr
    assert "steps 3..5 of 5" in resumed.stderr

    expected = read_metrics(straight.parent / "run" / "metrics.jsonl")
    got = read_metrics(killed.parent / "run" / "metrics.jsonl")
    assert [r["step"] for r in got] == [r["step"] for r in expected] == [1, 2, 3, 4, 5]
    for a, b in zip(got, expected, strict=True):
        assert (a["loss"], a["grad_norm"], a["lr"]) == (b["loss"], b["grad_norm"], b["lr"])
    assert len({r["loss"] for r in expected}) == 5  # the steps really differ

    again = _cli(killed)  # finished: nothing to do; --no-resume refuses the used directory
    assert again.returncode == 0 and "steps" not in again.stderr, again.stderr
    refused = subprocess.run(
        [sys.executable, "-m", "pipelines", "train", str(killed), "--no-resume"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert refused.returncode == 2 and "holds checkpoints" in refused.stderr, refused.stderr

    # One flipped byte in the latest checkpoint's weights: the resume refuses to train on.
    checkpoints = killed.parent / "run" / "checkpoints"
    damaged = checkpoints / "step-00000005" / "__0_0.distcp"
    data = bytearray(damaged.read_bytes())
    data[len(data) // 2] ^= 0x01
    damaged.write_bytes(bytes(data))
    corrupt = _cli(killed)
    assert corrupt.returncode == 3, corrupt.stderr
    assert "step-00000005 fails verification" in corrupt.stderr
    assert "__0_0.distcp: sha256" in corrupt.stderr
    assert f"verifies is {checkpoints / 'step-00000004'}:" in corrupt.stderr


# --------------------------------------------------------------------------------------------
# Bad configs


def test_cp_must_divide_the_world_size(shards, model_dir, tmp_path):
    config = load_train_config(
        write_config(tmp_path / "train.yaml", shards, model_dir, parallel={"cp": 2})
    )
    with pytest.raises(TrainConfigError, match=r"parallel.cp = 2 does not divide the world size 1"):
        train(config)
    assert not torch.distributed.is_initialized()  # refused before any process group exists


def test_global_batch_must_split_over_dp_and_micro_batches(shards, model_dir, tmp_path):
    assert accumulation_steps(8, 2, 2) == 2
    with pytest.raises(TrainConfigError, match=r"global_batch = 6 is not a multiple of .* = 4"):
        accumulation_steps(6, 2, 2)
    config = load_train_config(
        write_config(
            tmp_path / "train.yaml",
            shards,
            model_dir,
            recipe={"global_batch": 3},
            data={"packs_per_micro_batch": 2},
        )
    )
    with pytest.raises(TrainConfigError, match=r"recipe.global_batch = 3 is not a multiple"):
        train(config)
    assert not torch.distributed.is_initialized()


def test_cli_exit_codes_config_errors_2_missing_shards_3(shards, model_dir, tmp_path, capsys):
    from pipelines.cli import main

    bad_key = tmp_path / "bad.yaml"
    write_config(bad_key, shards, model_dir)
    bad_key.write_text(bad_key.read_text() + "learning_rate: 1.0\n")
    with pytest.raises(SystemExit) as exit_info:
        main(["train", str(bad_key)])
    assert exit_info.value.code == 2
    assert "learning_rate" in capsys.readouterr().err

    other = tmp_path / "other.yaml"
    other.write_text("schema_version: 1\nstage: other\n")
    wrong_build = write_config(
        tmp_path / "wrong.yaml", shards, model_dir, data={"manifest": str(other)}
    )
    with pytest.raises(SystemExit) as exit_info:
        main(["train", str(wrong_build)])
    assert exit_info.value.code == 2
    assert "was not built from" in capsys.readouterr().err

    missing = write_config(
        tmp_path / "missing.yaml", shards, model_dir, data={"shards": str(tmp_path / "nowhere")}
    )
    with pytest.raises(SystemExit) as exit_info:
        main(["train", str(missing)])
    assert exit_info.value.code == 3
    assert "not a build directory" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------
# Metrics


def test_step_flops_and_peak_table():
    from lvita_model.config import load_config
    from pipelines.train.metrics import decoder_params, peak_flops, step_flops

    config = load_config("qwen2.5-0.5b")  # 24 layers, hidden 896, 14 / 2 heads, MLP 4864
    # q/k/v/o weights, q/k/v biases, SwiGLU, two RMSNorms
    per_layer = 896 * 64 * (2 * 14 + 2 * 2) + 64 * (14 + 2 * 2) + 3 * 896 * 4864 + 2 * 896
    assert decoder_params(config) == 24 * per_layer
    flops = step_flops(
        config, vision_parameters=0, tokens=1000, supervised=10, squared_lengths=10**6, tiles=0
    )
    assert flops == 6 * (24 * per_layer * 1000 + 151936 * 896 * 10 + 24 * 896 * 10**6)
    assert peak_flops(torch.device("cpu")) is None  # no MFU on CPU


def test_metrics_file_truncation_and_torn_lines(tmp_path):
    from pipelines.train.metrics import MetricsFile, read_metrics, truncate_metrics

    path = tmp_path / "metrics.jsonl"
    log = MetricsFile(path)
    for step in (1, 2, 3):
        log.write({"step": step, "loss": float(step)})
    log.close()
    with path.open("a") as file:
        file.write('{"step": 4, "lo')  # a crash mid-line
    assert [r["step"] for r in read_metrics(path)] == [1, 2, 3]
    truncate_metrics(path, 2)
    assert read_metrics(path) == [{"step": 1, "loss": 1.0}, {"step": 2, "loss": 2.0}]


def test_dp2_cp2_step_equals_the_single_process_step(shards, model_dir, reference, tmp_path):
    config = write_config(tmp_path / "train.yaml", shards, model_dir, parallel={"cp": 2})
    result, params = run_ranks(config, 4, tmp_path / "run")
    assert_same_step(result, params, reference)


def test_cli_missing_model_exit_code_3(shards, tmp_path, capsys):
    from pipelines.cli import main

    config = write_config(tmp_path / "train.yaml", shards, tmp_path / "no_model")
    with pytest.raises(SystemExit) as exit_info:
        main(["train", str(config)])
    assert exit_info.value.code == 3
    assert "no_model" in capsys.readouterr().err


def test_stage1_starts_from_the_two_public_checkpoints(shards, tmp_path):
    """Stage 1 from a Qwen2.5-layout and an InternViT-layout directory (sharded, written by
    `hf_layouts`, not by lvita): only the fresh projector trains; the export is a Long-VITA
    checkpoint in the original's schema with the tokenizer files, read by `load_pretrained` and
    `transformers.AutoTokenizer` (offline)."""
    import json

    import transformers
    from hf_layouts import VISION_PREFIX, internvit_config, qwen25_config, write_checkpoint

    from lvita_data.tokenizer.special_tokens import LONGVITA_SPECIAL_TOKENS
    from lvita_model.model import init_weights
    from lvita_model.weights import VISION_PREFIXES, load_pretrained

    state = build_model(SMALL, seed=2).state_dict()
    llm, vision = SMALL.llm, SMALL.vision
    qwen = write_checkpoint(
        tmp_path / "Qwen2.5",
        qwen25_config(
            vocab_size=llm.vocab_size,
            hidden_size=llm.hidden_size,
            intermediate_size=llm.intermediate_size,
            num_layers=llm.num_layers,
            num_heads=llm.num_heads,
            num_kv_heads=llm.num_kv_heads,
        ),
        {k: v for k, v in state.items() if not k.startswith(VISION_PREFIXES)},
        num_shards=2,
    )
    vit = write_checkpoint(
        tmp_path / "InternViT",
        internvit_config(
            hidden_size=vision.hidden_size,
            intermediate_size=vision.intermediate_size,
            num_layers=vision.num_layers,
            num_heads=vision.num_heads,
        ),
        {k[len(VISION_PREFIX) :]: v for k, v in state.items() if k.startswith(VISION_PREFIX)},
        num_shards=2,
    )
    config = write_config(tmp_path / "train.yaml", shards, tmp_path, recipe={"lr": 1e-2})
    body = yaml.safe_load(config.read_text())
    body |= {"stage": 1, "model": {"llm": "Qwen2.5", "vision": "InternViT"}}
    config.write_text(yaml.safe_dump(body))
    result, params = run_ranks(config, 1, tmp_path / "run")
    assert result["records"][0]["loss"] > 0
    hf_dir = tmp_path / "run" / "hf"
    hf = json.loads((hf_dir / "config.json").read_text())
    assert hf["model_type"] == "long_vita" and hf["visual"]["model_type"] == "intern_vit_6b"
    for name, tensor in qwen.items():  # frozen: as loaded (bf16 -> fp32 master -> fp32 export)
        assert torch.equal(params[name], tensor.float()), name
    for name, tensor in vit.items():
        assert torch.equal(params[VISION_PREFIX + name], tensor.float()), name
    fresh = build_model(SMALL, seed=0).model.vision_projection
    init_weights(fresh, seed=42)  # stage 1's seed
    for name, initial in fresh.state_dict().items():  # trained from the seed's init
        moved = (params[f"model.vision_projection.{name}"] - initial).abs().max().item()
        assert moved == pytest.approx(1e-2, rel=1e-2), name  # Adam's first step: lr
    assert load_pretrained(hf_dir).config.vision == SMALL.vision
    tokenizer = transformers.AutoTokenizer.from_pretrained(hf_dir, local_files_only=True)
    ids = tokenizer.convert_tokens_to_ids(list(LONGVITA_SPECIAL_TOKENS))
    assert ids == list(range(151665, 151682))
    assert tokenizer.encode("<image>\nhi", add_special_tokens=False)[0] == 151680


def test_a_terminated_run_keeps_its_checkpoints_and_says_how_to_go_on(shards, model_dir, tmp_path):
    """SIGTERM (a scheduler's preemption) mid-run: exit 143 with one last line naming the
    command that goes on, no traceback; the checkpoints written are complete, and running that
    command finishes the run with every step logged once."""
    config = write_config(
        tmp_path / "t" / "train.yaml",
        shards,
        model_dir,
        recipe={"iterations": 12, "global_batch": 1},
        output={"save_every": 1, "export_hf": False},
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop(KILL_ENV, None)
    process = subprocess.Popen(
        [sys.executable, "-m", "pipelines", "train", str(config)],
        cwd=REPO,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    latest = config.parent / "run" / "checkpoints" / "latest"
    try:
        deadline = time.monotonic() + 180
        while not latest.exists() and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert process.poll() is None, "the run ended before the first checkpoint"
        process.send_signal(signal.SIGTERM)
        _, stderr = process.communicate(timeout=120)
    finally:
        process.kill()
    assert process.returncode == 143, stderr
    assert "Traceback" not in stderr
    last = stderr.strip().splitlines()[-1]
    assert last.startswith("lvita train: terminated; finished work is kept. To go on: ")
    assert last.endswith(f"lvita train {config}")
    stopped_at = len(read_metrics(config.parent / "run" / "metrics.jsonl"))
    assert 1 <= stopped_at < 12
    resumed = _cli(config)
    assert resumed.returncode == 0, resumed.stderr
    steps = [r["step"] for r in read_metrics(config.parent / "run" / "metrics.jsonl")]
    assert steps == list(range(1, 13))


def test_nproc_per_node_runs_the_ranks_and_an_interrupt_is_one_line(shards, model_dir, tmp_path):
    """`lvita train --nproc-per-node 2` (CP = 2 over two ranks started by torch's elastic
    agent): Ctrl-C to the whole process group mid-run ends every rank, exit 130, and the only
    line about it is the launcher's, naming the command that goes on (no rank's line, no
    agent warning, no traceback); that command finishes the run with every step logged once."""
    psutil = pytest.importorskip("psutil")
    config = write_config(
        tmp_path / "n" / "train.yaml",
        shards,
        model_dir,
        recipe={"iterations": 8, "global_batch": 1},
        parallel={"cp": 2},
        output={"save_every": 1, "export_hf": False},
    )
    argv = ["train", str(config), "--nproc-per-node", "2"]
    env = {**os.environ}
    env.pop(KILL_ENV, None)
    process = subprocess.Popen(
        [sys.executable, "-m", "pipelines", *argv],
        cwd=REPO,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # its own process group, as a terminal's foreground job
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    latest = config.parent / "run" / "checkpoints" / "latest"
    try:
        ranks = []
        deadline = time.monotonic() + 180
        while not latest.exists() and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert process.poll() is None, "the run ended before the first checkpoint"
        ranks = psutil.Process(process.pid).children(recursive=True)
        os.killpg(process.pid, signal.SIGINT)  # what Ctrl-C in a terminal does
        _, stderr = process.communicate(timeout=120)
    finally:
        process.kill()
    assert process.returncode == 130, stderr
    assert "Traceback" not in stderr and "WARNING" not in stderr, stderr
    lines = [line for line in stderr.splitlines() if "interrupted" in line]
    assert lines == [
        f"lvita train: interrupted; finished work is kept. To go on: lvita {shlex.join(argv)}"
    ], stderr
    _, alive = psutil.wait_procs(ranks, timeout=10)
    assert not alive, f"ranks outlived the command: {alive}"
    stopped_at = len(read_metrics(config.parent / "run" / "metrics.jsonl"))
    assert 1 <= stopped_at < 8
    resumed = subprocess.run(
        [sys.executable, "-m", "pipelines", *argv],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert resumed.returncode == 0, resumed.stderr
    steps = [r["step"] for r in read_metrics(config.parent / "run" / "metrics.jsonl")]
    assert steps == list(range(1, 9))


def test_nproc_per_node_checks_once_and_passes_a_ranks_exit_code(shards, model_dir, tmp_path):
    """A shard of the build gone: the launcher's own check before any rank starts, one line,
    exit 3. Every pack damaged inside (same sizes: only reading it tells): the ranks stop with
    their one-line LoaderError; the command exits with their code 3 and adds nothing (no
    agent log, no ChildFailedError report, no traceback)."""
    from lvita_data.shards.tar import group_samples, scan_tar_file

    def run(shard_dir: Path) -> subprocess.CompletedProcess:
        config = write_config(tmp_path / shard_dir.name / "train.yaml", shard_dir, model_dir)
        config.write_text(
            config.read_text(encoding="utf-8").replace("cp: 1", "cp: 2"), encoding="utf-8"
        )
        return subprocess.run(
            [sys.executable, "-m", "pipelines", "train", str(config), "--nproc-per-node", "2"],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=240,
        )

    missing = tmp_path / "missing"
    shutil.copytree(shards, missing)
    gone = sorted(missing.glob("*.tar"))[-1]
    gone.unlink()
    result = run(missing)
    assert result.returncode == 3, result.stderr
    assert result.stderr.splitlines() == [
        f"lvita train: {missing}: 1 shard(s) missing or changed: {gone.name} "
        "(No such file or directory)"
    ]

    damaged = tmp_path / "damaged"
    shutil.copytree(shards, damaged)
    for shard in damaged.glob("*.tar"):
        data = bytearray(shard.read_bytes())
        for sample in group_samples(scan_tar_file(shard)):
            offset, size = sample.members["arrays.npz"]
            data[sample.start + offset + size // 2] ^= 0x5A  # inside a DEFLATE stream
        shard.write_bytes(bytes(data))
    result = run(damaged)
    assert result.returncode == 3, result.stderr
    pieces = (piece.strip() for piece in result.stderr.replace("\r", "\n").splitlines())
    lines = [piece for piece in pieces if piece and not piece.startswith("train:")]  # tqdm
    assert lines and all(line.startswith("lvita train: ") for line in lines), result.stderr
    assert "arrays.npz" in lines[0]
