"""The analytic CP table reproduces the reference's figures for Qwen2.5-14B at 1M tokens."""

from __future__ import annotations

import pytest

from lvita_model.config import PRESETS
from lvita_model.flops import GIB, cp_costs, format_cp_table, layer_params

LLM = PRESETS["long-vita-14b"].llm
ONE_M = 1_048_576


def test_parameter_count_matches_the_reference():
    assert layer_params(LLM) == pytest.approx(275.3e6, rel=1e-3)
    assert layer_params(LLM) * LLM.num_layers == pytest.approx(13.21e9, rel=1e-3)


def test_one_million_tokens_figures():
    costs = cp_costs(LLM, ONE_M, 8)
    assert costs.dense_flops == pytest.approx(2.77e16, rel=5e-3)
    assert costs.attention_flops == pytest.approx(5.40e17, rel=5e-3)
    assert costs.train_flops == pytest.approx(1.98e18, rel=5e-3)
    assert costs.kv_bytes / ONE_M == 192 * 1024  # 192 KiB per token (bf16)
    assert costs.kv_bytes / GIB == 192 and costs.kv_bytes_per_rank / GIB == 24
    assert costs.logits_bytes / GIB == pytest.approx(594, rel=1e-3)
    assert costs.ring_bytes_per_layer / GIB == pytest.approx(3.5)
    assert costs.ulysses_bytes_per_layer / GIB == pytest.approx(2.625)
    assert cp_costs(LLM, ONE_M, 16).ulysses_bytes_per_layer is None  # 16 > 8 KV heads


def test_table_has_a_row_per_length_and_degree():
    table = format_cp_table(LLM, [131072, ONE_M], [2, 8, 16])
    assert len(table.splitlines()) == 2 + 6
    assert "| 1,048,576 | 8 |" in table and "n/a (P > Hkv)" in table
