"""Analytic costs of a context-parallel step, computed from a model config (no hand-typed numbers).

Per sequence of S tokens over P ranks, for the decoder of `config` (Qwen2: Hq query / Hkv KV
heads of dim d, hidden H, MLP width I, L layers, vocabulary V), b bytes per element:

- dense FLOPs (all linear layers, forward) = 2 * params_in_layers * S;
- causal attention FLOPs (forward) = 2 * S^2 * Hq * d per layer (QK^T and PV, halved by
  causality); training = 3x dense + 3.5x attention (flash backward ~2.5x forward);
- KV cache = 2 * Hkv * d * b per token per layer; per rank / P;
- logits of every position = S * V * 4 bytes (fp32); the logits-masked head holds one chunk of
  `chunk_rows` rows at a time instead;
- communication per layer per rank, forward: ring / all-gather (P-1)/P * S * 2 * Hkv * d * b
  (independent of P), Ulysses (P-1)/P * (S/P) * (2 Hq + 2 Hkv) * d * b (needs P <= Hkv).

These reproduce the reference's figures for Qwen2.5-14B at S = 1,048,576 (tests/model/
test_cp_analysis.py): 2.77e16 dense and 5.40e17 attention FLOPs, 192 KiB of KV per token, 594 GiB of
fp32 logits, 3.5 GiB of ring traffic per layer at P = 8.
"""

from __future__ import annotations

from dataclasses import dataclass

from lvita_model.config import LLMConfig

GIB = 2**30


def layer_params(llm: LLMConfig) -> int:
    """Parameters of one decoder layer (q/k/v with biases, o, SwiGLU, two RMSNorms)."""
    q = llm.hidden_size * llm.num_heads * llm.head_dim + llm.num_heads * llm.head_dim
    kv = 2 * (llm.hidden_size * llm.num_kv_heads * llm.head_dim + llm.num_kv_heads * llm.head_dim)
    o = llm.num_heads * llm.head_dim * llm.hidden_size
    mlp = 3 * llm.hidden_size * llm.intermediate_size
    return q + kv + o + mlp + 2 * llm.hidden_size


@dataclass(frozen=True)
class CPCosts:
    seq_len: int
    cp_size: int
    dense_flops: float
    attention_flops: float
    train_flops: float
    flops_per_rank: float
    kv_bytes: float
    kv_bytes_per_rank: float
    logits_bytes: float
    logits_bytes_per_rank: float
    head_chunk_bytes: float
    ring_bytes_per_layer: float
    ulysses_bytes_per_layer: float | None
    """None where Ulysses cannot split the KV heads (P > Hkv)."""


def cp_costs(
    llm: LLMConfig,
    seq_len: int,
    cp_size: int,
    *,
    bytes_per_element: int = 2,
    chunk_rows: int = 4096,
) -> CPCosts:
    """Costs of one sequence of `seq_len` tokens split over `cp_size` ranks."""
    dense = 2.0 * layer_params(llm) * llm.num_layers * seq_len
    attention = 2.0 * seq_len**2 * llm.num_heads * llm.head_dim * llm.num_layers
    train = 3.0 * dense + 3.5 * attention
    kv_per_token = 2 * llm.num_kv_heads * llm.head_dim * bytes_per_element * llm.num_layers
    logits = float(seq_len) * llm.vocab_size * 4
    share = (cp_size - 1) / cp_size
    ring = share * seq_len * 2 * llm.num_kv_heads * llm.head_dim * bytes_per_element
    ulysses = None
    if llm.num_kv_heads % cp_size == 0 and llm.num_heads % cp_size == 0:
        heads = 2 * llm.num_heads + 2 * llm.num_kv_heads
        ulysses = share * (seq_len / cp_size) * heads * llm.head_dim * bytes_per_element
    return CPCosts(
        seq_len=seq_len,
        cp_size=cp_size,
        dense_flops=dense,
        attention_flops=attention,
        train_flops=train,
        flops_per_rank=train / cp_size,
        kv_bytes=float(kv_per_token * seq_len),
        kv_bytes_per_rank=kv_per_token * seq_len / cp_size,
        logits_bytes=logits,
        logits_bytes_per_rank=logits / cp_size,
        head_chunk_bytes=float(min(chunk_rows, seq_len) * llm.vocab_size * 4),
        ring_bytes_per_layer=ring,
        ulysses_bytes_per_layer=ulysses,
    )


def format_cp_table(llm: LLMConfig, seq_lens: list[int], cp_sizes: list[int]) -> str:
    """A markdown table of `cp_costs` for every (length, CP degree)."""
    lines = [
        "| tokens | CP | train FLOP / rank | attention share | KV GiB / rank | "
        "all-position fp32 logits GiB / rank | masked-head chunk GiB | "
        "ring GiB / layer / rank | Ulysses GiB / layer / rank |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for seq_len in seq_lens:
        for cp_size in cp_sizes:
            c = cp_costs(llm, seq_len, cp_size)
            ulysses = (
                "n/a (P > Hkv)"
                if c.ulysses_bytes_per_layer is None
                else f"{c.ulysses_bytes_per_layer / GIB:.2f}"
            )
            share = c.attention_flops / (c.attention_flops + c.dense_flops)
            lines.append(
                f"| {seq_len:,} | {cp_size} | {c.flops_per_rank:.2e} | {share:.0%} | "
                f"{c.kv_bytes_per_rank / GIB:.1f} | {c.logits_bytes_per_rank / GIB:.1f} | "
                f"{c.head_chunk_bytes / GIB:.2f} | {c.ring_bytes_per_layer / GIB:.2f} | "
                f"{ulysses} |"
            )
    return "\n".join(lines)
