"""Qwen2 / Qwen2.5 decoder on packed sequences (THD layout, no batch dimension).

Shapes: T tokens of the packed sequence, H hidden size, Hq / Hkv query / key-value heads, D head
dim. Per layer (pre-norm): x += o_proj(attention(rope(q), rope(k), v)); x += down(silu(gate(x))
* up(x)), with RMSNorm before each half and after the last layer. q/k/v projections carry biases,
o_proj and the MLP do not (Qwen2). RoPE is computed from explicit position ids (fp32 angles,
``inv_freq = theta^(-2i/D)``, rotate-half convention), so restarting positions per packed sample
(stages 1-2), continuous positions (stages 3-4) or a context-parallel shard's global positions
all need nothing but the right `position_ids`.

Attention is a callable ``attention(q [T, Hq, D], k [T, Hkv, D], v) -> [T, Hq, D]`` handed in per
forward (`lvita_model.attention.PackedAttention` or a context-parallel one); the decoder holds no
parallel logic. Parameter names equal Hugging Face's `Qwen2Model` (``embed_tokens``,
``layers.{i}.self_attn.{q,k,v,o}_proj``, ``layers.{i}.mlp.{gate,up,down}_proj``,
``layers.{i}.{input,post_attention}_layernorm``, ``norm``), so checkpoints load without renaming.
Verified against transformers' `Qwen2ForCausalLM` (tests/model/test_qwen2.py): equal logits within
1e-5 in fp32 with the same weights.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from lvita_model.config import LLMConfig

Attention = Callable[[Tensor, Tensor, Tensor], Tensor]


class RMSNorm(nn.Module):
    """x / rms(x) * weight, computed in fp32 and cast back (as Hugging Face's Qwen2RMSNorm)."""

    def __init__(self, size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


def rope_cos_sin(
    position_ids: Tensor, head_dim: int, theta: float, dtype: torch.dtype
) -> tuple[Tensor, Tensor]:
    """cos, sin [T, D] for the given positions (fp32 angles, cast to `dtype`)."""
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64, device=position_ids.device)
    inv_freq = 1.0 / (theta ** (exponents.float() / head_dim))  # [D/2]
    angles = position_ids.float()[:, None] * inv_freq[None, :]  # [T, D/2]
    angles = torch.cat([angles, angles], dim=-1)  # [T, D]
    return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """x [T, heads, D] rotated by the per-token angles (rotate-half convention)."""
    first, second = x.chunk(2, dim=-1)
    rotated = torch.cat([-second, first], dim=-1)
    return x * cos[:, None, :] + rotated * sin[:, None, :]


class Qwen2Attention(nn.Module):
    def __init__(self, config: LLMConfig) -> None:
        super().__init__()
        self.num_heads, self.num_kv_heads = config.num_heads, config.num_kv_heads
        self.head_dim = config.head_dim
        self.q_proj = nn.Linear(config.hidden_size, self.num_heads * self.head_dim, bias=True)
        self.k_proj = nn.Linear(config.hidden_size, self.num_kv_heads * self.head_dim, bias=True)
        self.v_proj = nn.Linear(config.hidden_size, self.num_kv_heads * self.head_dim, bias=True)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, config.hidden_size, bias=False)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, attention: Attention) -> Tensor:
        num_tokens = x.shape[0]
        q = self.q_proj(x).view(num_tokens, self.num_heads, self.head_dim)  # [T, Hq, D]
        k = self.k_proj(x).view(num_tokens, self.num_kv_heads, self.head_dim)  # [T, Hkv, D]
        v = self.v_proj(x).view(num_tokens, self.num_kv_heads, self.head_dim)
        out = attention(apply_rope(q, cos, sin), apply_rope(k, cos, sin), v)  # [T, Hq, D]
        return self.o_proj(out.reshape(num_tokens, self.num_heads * self.head_dim))


class Qwen2MLP(nn.Module):
    def __init__(self, config: LLMConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Qwen2DecoderLayer(nn.Module):
    def __init__(self, config: LLMConfig) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Qwen2Attention(config)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = Qwen2MLP(config)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, attention: Attention) -> Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, attention)
        return x + self.mlp(self.post_attention_layernorm(x))


class Qwen2Model(nn.Module):
    """Token embeddings, the layers and the final norm (Hugging Face's `Qwen2Model` names)."""

    def __init__(self, config: LLMConfig) -> None:
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(Qwen2DecoderLayer(config) for _ in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.checkpoint_layers = False
        """Recompute each decoder layer in backward (activation checkpointing) when training."""

    def decode(self, embeds: Tensor, position_ids: Tensor, attention: Attention) -> Tensor:
        """embeds [T, H], position_ids [T] -> final-normed hidden states [T, H]."""
        cos, sin = rope_cos_sin(
            position_ids, self.config.head_dim, self.config.rope_theta, embeds.dtype
        )
        hidden = embeds
        recompute = self.checkpoint_layers and torch.is_grad_enabled()
        for layer in self.layers:
            if recompute:
                hidden = checkpoint(layer, hidden, cos, sin, attention, use_reentrant=False)
            else:
                hidden = layer(hidden, cos, sin, attention)
        return self.norm(hidden)
