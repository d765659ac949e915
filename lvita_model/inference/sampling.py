"""Choosing the next token from fp32 logits: greedy, or temperature / top-k with a seeded
generator."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class Sampling:
    """Greedy when ``temperature == 0``; else softmax(logits / temperature) over the `top_k`
    largest logits (0: all), drawn with a generator seeded by `seed`."""

    temperature: float = 0.0
    top_k: int = 0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.temperature < 0 or self.top_k < 0:
            raise ValueError(f"temperature and top_k must be >= 0, got {self}")


GREEDY = Sampling()
"""The default: argmax of the logits."""


def choose_token(logits: Tensor, sampling: Sampling, generator: torch.Generator | None) -> int:
    """The next token from fp32 logits [V]."""
    if sampling.temperature == 0:
        return int(torch.argmax(logits))
    scaled = logits.float().cpu() / sampling.temperature
    if sampling.top_k and sampling.top_k < scaled.shape[0]:
        kth = torch.topk(scaled, sampling.top_k).values[-1]
        scaled = scaled.masked_fill(scaled < kth, float("-inf"))
    probs = torch.softmax(scaled, dim=-1)
    return int(torch.multinomial(probs, 1, generator=generator))
