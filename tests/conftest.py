"""Shared fixtures: the demo corpus is generated once per test session."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

DEMO_SEED = 0


@pytest.fixture(scope="session")
def demo_corpus(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict, float]:
    """(root, summary, seconds) of one generated demo corpus."""
    from lvita_data.demo import make_demo_corpus  # here: model tests run where only torch is

    root = tmp_path_factory.mktemp("demo_a")
    start = time.perf_counter()
    summary = make_demo_corpus(root, seed=DEMO_SEED)
    return root, summary, time.perf_counter() - start
