"""InternViT-300M-448px (v1) vision tower and `encode_tiles`, the chunked tower + projector call.

Shapes: N tiles, S image side (448), g = S / patch patches per side (32), P = g * g patches (1024),
L = 1 + P tokens per tile (CLS first), T = N * L packed tokens, C hidden (1024), H heads, D head
dim (C / H).

The tower (checked against OpenGVLab's ``modeling_intern_vit.py``, the remote code of
``OpenGVLab/InternViT-300M-448px``; state_dict names are identical, so its checkpoints load as is):

- embeddings: ``patch_embedding`` Conv2d(3 -> C, kernel = stride = patch); the CLS token
  ``class_embedding`` [1, 1, C] goes first; ``position_embedding`` [1, 1 + P, C] is added. The
  original always passes the patch positions through a bicubic interpolation to the input grid,
  which is the identity at the trained size; we accept only that size (`ValueError` otherwise).
- 24 pre-norm blocks ``encoder.layers.{i}``: x = x + ls1 * attn(norm1(x)); x = x + ls2 *
  mlp(norm2(x)) with LayerNorm (eps 1e-6), layer-scale vectors ``ls1`` / ``ls2`` [C], exact-erf
  GELU between ``mlp.fc1`` and ``mlp.fc2``.
- attention: one ``attn.qkv`` Linear(C -> 3C) whose output is read as [.., 3, H, D] (all of q,
  then k, then v; head-major inside each), scale D^-0.5, bidirectional, then ``attn.proj``.
- no final norm: the v1 300M model returns the last block's output (Hugging Face's port,
  ``InternVLVisionModel``, matches it only with ``use_mean_pooling=True``, which makes its final
  ``layernorm`` an identity). Long-VITA takes that last hidden state and drops the CLS token.

Attention goes through the packed-attention contract: every tile of a call is one document of a
THD sequence (cu_seqlens = 0, L, 2L, ..., NL; not causal), so tiles never see each other and the
same backend interface (reference, flash varlen, NPU) serves the tower and the LLM. The reference
`SdpaBackend` builds a score block over *all* T keys of the call and masks the other tiles, so
its cost grows with the chunk's tile count squared; a varlen kernel's does not.

`encode_tiles` runs tower + projector over chunks of tiles (the original Megatron path uses 256)
and returns `EncodedTiles(features, zero_term)`. With no tiles at all it runs one zero tile and
returns empty features plus ``zero_term = 0 * sum(dummy output)``, a 0-d zero connected to every
vision and projector parameter: adding it to the input embeddings makes backward produce zero
(not missing) gradients, so data-parallel ranks without images reduce the same parameter set as
the others (Long-VITA's dummy-image trick). With tiles, `zero_term` is a plain 0-d zero, so
callers add it unconditionally.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from lvita_model.attention import AttentionBackend, PackedAttention, SdpaBackend, packed_meta
from lvita_model.config import VisionConfig
from lvita_model.projector import VisionProjector

LAYER_SCALE_INIT = 0.1
"""Initial ls1 / ls2 (InternViT's ``initializer_factor``, HF's ``layer_scale_init_value``)."""


class InternVisionEmbeddings(nn.Module):
    def __init__(self, config: VisionConfig) -> None:
        super().__init__()
        self.image_size = config.image_size
        hidden = config.hidden_size
        self.class_embedding = nn.Parameter(torch.empty(1, 1, hidden))
        self.patch_embedding = nn.Conv2d(
            3, hidden, kernel_size=config.patch_size, stride=config.patch_size
        )
        self.position_embedding = nn.Parameter(torch.empty(1, 1 + config.num_patches, hidden))

    def forward(self, pixel_values: Tensor) -> Tensor:
        """pixel_values [N, 3, S, S] -> embeddings [N, 1 + P, C] (CLS first)."""
        dtype = self.patch_embedding.weight.dtype
        patches = self.patch_embedding(pixel_values.to(dtype))  # [N, C, g, g]
        patches = patches.flatten(2).transpose(1, 2)  # [N, C, g, g] -> [N, P, C], row-major
        cls = self.class_embedding.to(dtype).expand(patches.shape[0], 1, -1)  # [N, 1, C]
        return torch.cat([cls, patches], dim=1) + self.position_embedding.to(dtype)


class InternAttention(nn.Module):
    def __init__(self, config: VisionConfig) -> None:
        super().__init__()
        self.num_heads = config.num_heads
        self.head_dim = config.head_dim
        hidden = config.hidden_size
        self.qkv = nn.Linear(hidden, 3 * hidden, bias=config.qkv_bias)
        self.proj = nn.Linear(hidden, hidden)

    def forward(self, x: Tensor, attention: PackedAttention) -> Tensor:
        """x [T, C] -> [T, C]; `attention` keeps each tile to itself."""
        num_tokens, hidden = x.shape
        qkv = self.qkv(x).view(num_tokens, 3, self.num_heads, self.head_dim)  # [T, 3C] -> [T,3,H,D]
        q, k, v = qkv.unbind(1)  # each [T, H, D]
        out = attention(q, k, v)  # [T, H, D]
        return self.proj(out.reshape(num_tokens, hidden))  # [T, H, D] -> [T, C]


class InternMLP(nn.Module):
    def __init__(self, config: VisionConfig) -> None:
        super().__init__()
        self.fc1 = nn.Linear(config.hidden_size, config.intermediate_size)
        self.fc2 = nn.Linear(config.intermediate_size, config.hidden_size)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(F.gelu(self.fc1(x)))  # exact (erf) GELU, as ACT2FN["gelu"]


class InternVisionEncoderLayer(nn.Module):
    def __init__(self, config: VisionConfig) -> None:
        super().__init__()
        hidden = config.hidden_size
        self.attn = InternAttention(config)
        self.mlp = InternMLP(config)
        self.norm1 = nn.LayerNorm(hidden, eps=config.layer_norm_eps)
        self.norm2 = nn.LayerNorm(hidden, eps=config.layer_norm_eps)
        self.ls1 = nn.Parameter(torch.full((hidden,), LAYER_SCALE_INIT))
        self.ls2 = nn.Parameter(torch.full((hidden,), LAYER_SCALE_INIT))

    def forward(self, x: Tensor, attention: PackedAttention) -> Tensor:
        """x [T, C] -> [T, C] (pre-norm block with layer scale)."""
        x = x + self.ls1 * self.attn(self.norm1(x), attention)
        return x + self.ls2 * self.mlp(self.norm2(x))


class InternVisionEncoder(nn.Module):
    def __init__(self, config: VisionConfig) -> None:
        super().__init__()
        self.layers = nn.ModuleList(
            InternVisionEncoderLayer(config) for _ in range(config.num_layers)
        )


class InternVisionModel(nn.Module):
    """pixel_values [N, 3, S, S] -> last hidden state without CLS [N, P, C]."""

    def __init__(self, config: VisionConfig) -> None:
        super().__init__()
        self.config = config
        self.embeddings = InternVisionEmbeddings(config)
        self.encoder = InternVisionEncoder(config)
        self.gradient_checkpointing = False
        """Recompute each block in backward (non-reentrant checkpoint) while training."""
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Fresh weights: normal(0.02) for linears and the CLS / position embeddings, zero
        biases, unit norms, layer scale `LAYER_SCALE_INIT`, Conv2d's own default."""
        nn.init.trunc_normal_(self.embeddings.class_embedding, std=0.02)
        nn.init.trunc_normal_(self.embeddings.position_embedding, std=0.02)
        self.embeddings.patch_embedding.reset_parameters()
        for layer in self.encoder.layers:
            for linear in (layer.attn.qkv, layer.attn.proj, layer.mlp.fc1, layer.mlp.fc2):
                nn.init.normal_(linear.weight, std=0.02)
                if linear.bias is not None:
                    nn.init.zeros_(linear.bias)
            layer.norm1.reset_parameters()
            layer.norm2.reset_parameters()
            nn.init.constant_(layer.ls1, LAYER_SCALE_INIT)
            nn.init.constant_(layer.ls2, LAYER_SCALE_INIT)

    def check_pixel_values(self, pixel_values: Tensor) -> None:
        size = self.config.image_size
        if pixel_values.ndim != 4 or tuple(pixel_values.shape[1:]) != (3, size, size):
            raise ValueError(
                f"pixel_values must be [N, 3, {size}, {size}] (tiles of the configured "
                f"image_size; no position-embedding interpolation), got {tuple(pixel_values.shape)}"
            )

    def forward(self, pixel_values: Tensor, backend: AttentionBackend | None = None) -> Tensor:
        self.check_pixel_values(pixel_values)
        num_tiles = pixel_values.shape[0]
        if num_tiles == 0:
            raise ValueError("no tiles: use encode_tiles, which runs a dummy tile for N == 0")
        x = self.embeddings(pixel_values)  # [N, L, C]
        tile_len, hidden = x.shape[1], x.shape[2]
        cu_seqlens = [i * tile_len for i in range(num_tiles + 1)]
        meta = packed_meta(cu_seqlens, causal=False, device=x.device)
        attention = PackedAttention(meta, backend if backend is not None else SdpaBackend())
        x = x.reshape(num_tiles * tile_len, hidden)  # [N, L, C] -> [T, C]
        for layer in self.encoder.layers:
            if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(layer, x, attention, use_reentrant=False)
            else:
                x = layer(x, attention)
        x = x.view(num_tiles, tile_len, hidden)  # [T, C] -> [N, L, C]
        return x[:, 1:]  # drop CLS: [N, P, C]


class EncodedTiles(NamedTuple):
    features: Tensor
    """[N, tokens_per_tile, llm_hidden]: projected vision tokens, tile by tile."""
    zero_term: Tensor
    """0-d zero to add to the input embeddings. For N == 0 it is ``0 * dummy.sum()``, connected
    to every vision and projector parameter; otherwise a constant."""


def encode_tiles(
    vision: InternVisionModel,
    projector: VisionProjector,
    pixel_values: Tensor,
    *,
    chunk_tiles: int,
    backend: AttentionBackend | None = None,
) -> EncodedTiles:
    """Tower + projector over `pixel_values` [N, 3, S, S], `chunk_tiles` tiles per call.

    Chunks bound activation memory (4096 frames do not fit one call); tiles are independent, so
    the result equals one call. See the module docstring for N == 0.
    """
    if chunk_tiles <= 0:
        raise ValueError(f"chunk_tiles must be > 0, got {chunk_tiles}")
    vision.check_pixel_values(pixel_values)
    if pixel_values.shape[0] == 0:
        return _encode_dummy_tile(vision, projector, backend)
    chunks = [
        projector(vision(chunk, backend))  # [n, tokens_per_tile, llm_hidden]
        for chunk in pixel_values.split(chunk_tiles)
    ]
    features = chunks[0] if len(chunks) == 1 else torch.cat(chunks)
    return EncodedTiles(features, features.new_zeros(()))


def _encode_dummy_tile(
    vision: InternVisionModel, projector: VisionProjector, backend: AttentionBackend | None
) -> EncodedTiles:
    weight = vision.embeddings.patch_embedding.weight
    size = vision.config.image_size
    dummy = torch.zeros(1, 3, size, size, dtype=weight.dtype, device=weight.device)
    out = projector(vision(dummy, backend))  # [1, tokens_per_tile, llm_hidden]
    # out[:0] keeps the graph too, but a caller that skips scattering zero rows would lose it;
    # zero_term is the dependable connection.
    return EncodedTiles(out[:0], out.sum() * 0)
