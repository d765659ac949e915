"""`lvita generate` from a checkpoint directory in the original Long-VITA layout (config.json with
``visual``, bf16 shards with an index, the tokenizer files with Long-VITA's 17 tokens): text,
image and video prompts, CP = 1 and CP = 2 (gloo ranks), float32 and bfloat16."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "model"))
from dist_utils import run_distributed  # noqa: E402
from hf_layouts import internvit_config, long_vita_config, write_checkpoint  # noqa: E402

from lvita_model.config import PRESETS  # noqa: E402
from lvita_model.model import build_model  # noqa: E402
from pipelines.generate import GenerateRequest, generate_text  # noqa: E402

NEW_TOKENS = 4


@pytest.fixture(scope="module")
def released(tmp_path_factory) -> Path:
    """The tiny preset (real vocabulary and 448-px tiles) in the original's released layout."""
    from lvita_data.tokenizer.tokenizer import load_tokenizer
    from pipelines.hf_tokenizer import tokenizer_files

    config = PRESETS["tiny"]
    llm, vision = config.llm, config.vision
    hf = long_vita_config(
        vocab_size=llm.vocab_size,
        hidden_size=llm.hidden_size,
        intermediate_size=llm.intermediate_size,
        num_layers=llm.num_layers,
        num_heads=llm.num_heads,
        num_kv_heads=llm.num_kv_heads,
        vision=internvit_config(
            hidden_size=vision.hidden_size,
            intermediate_size=vision.intermediate_size,
            num_layers=vision.num_layers,
            num_heads=vision.num_heads,
        ),
    )
    directory = tmp_path_factory.mktemp("Long-VITA-1M_HF")
    model = build_model(config, seed=5)
    write_checkpoint(directory, hf, model.state_dict(), num_shards=2)
    files = tokenizer_files(load_tokenizer(), model_max_length=llm.max_position_embeddings)
    for name, text in files.items():
        (directory / name).write_text(text, encoding="utf-8")
    return directory


@pytest.fixture(scope="module")
def media(tmp_path_factory) -> tuple[str, str]:
    """(an image, a directory of 3 frames)."""
    from PIL import Image

    root = tmp_path_factory.mktemp("media")
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (200, 220, 3), dtype=np.uint8)).save(root / "a.png")
    frames = root / "frames"
    frames.mkdir()
    for i in range(3):
        pixels = rng.integers(0, 255, (64, 80, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(frames / f"{i:03d}.png")
    return str(root / "a.png"), str(frames)


def _requests(model: str, media: tuple[str, str], dtype: str) -> list[GenerateRequest]:
    image, video = media
    common = {"model": model, "max_new_tokens": NEW_TOKENS, "dtype": dtype, "backend": "sdpa"}
    return [
        GenerateRequest(prompt="Tell me a story.", **common),
        GenerateRequest(prompt="What is in the picture?", images=[image], **common),
        GenerateRequest(prompt="<video>\nSummarize.", videos=[video], max_frames=2, **common),
    ]


def _run(requests: list[GenerateRequest]) -> list[tuple[str, list[str]]]:
    return [(g.text, g.notes) for g in map(generate_text, requests)]


def _cp_rank(rank: int, world_size: int, model: str, media, dtype: str):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size))
    try:
        return _run(_requests(model, media, dtype))
    finally:
        del os.environ["RANK"], os.environ["WORLD_SIZE"]


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_generate_from_the_released_layout_cp1_and_cp2(released, media, dtype):
    one = _run(_requests(str(released), media, dtype))
    for (text, notes), tiles in zip(one, (0, 1, 2), strict=True):
        assert f"({tiles} tile(s))" in notes[-1] and "CP=1" in notes[-1], notes
        assert "RANDOM" not in " ".join(notes) and dtype in notes[-1]
        assert text
    two = run_distributed(_cp_rank, 2, str(released), media, dtype, timeout=240)
    assert all("CP=2" in notes[-1] for rank in two for _, notes in rank)
    assert [t for t, _ in two[0]] == [t for t, _ in two[1]]  # every rank decodes the same
    if dtype == "float32":  # bf16 roundings differ with the split; fp32 stays on the argmax
        assert [t for t, _ in two[0]] == [t for t, _ in one]


def test_cli_generate_reads_the_released_layout(released, media, capsys):
    from pipelines.cli import main

    image, _ = media
    with pytest.raises(SystemExit) as exit_info:
        main(["generate", str(released), "--prompt", "Describe.", "--image", image,
              "--max-new-tokens", "2", "--dtype", "bfloat16"])  # fmt: skip
    assert exit_info.value.code == 0
    _, err = capsys.readouterr()
    assert "generated 2 token(s)" in err and "(1 tile(s))" in err and "RANDOM" not in err
