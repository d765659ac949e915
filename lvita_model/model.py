"""Long-VITA: InternViT tiles -> pixel-shuffle MLP projector -> placeholder positions -> Qwen2.

One packed sequence in the THD layout (a loader batch of B packs is flattened to B * T tokens):

1. ``embeds = embed_tokens(input_ids)``  [T, H]
2. tiles [N, 3, 448, 448] run through the vision tower and the projector in chunks of
   `vision_chunk_tiles` (bounded memory for thousands of frames) -> [N, 256, H];
3. the features **overwrite** the embeddings at ``image_token_positions`` [N, 256] (scatter by
   index, as the original; -1 marks a placeholder held by another context-parallel rank, see
   `lvita_model.context_parallel.batch`); a sequence without tiles adds a zero term connected to
   every vision parameter, so data-parallel ranks reduce the same set of gradients;
4. the decoder with explicit ``position_ids`` and an attention callable;
5. the logits-masked head (`lvita_model.head`): loss from the hidden states at positions whose
   *next* token is supervised, or logits at chosen positions only.

`LongVitaForCausalLM`'s state dict uses the Long-VITA Hugging Face names
(``model.embed_tokens``, ``model.layers.*``, ``model.norm``, ``model.vision_model.*`` (InternViT),
``model.vision_projection.{pre_proj_layernorm, mlp.0, mlp.2}``, ``lm_head``); a configuration
without vision is exactly Hugging Face's `Qwen2ForCausalLM` layout. See `lvita_model.weights`.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from lvita_model.attention import AttentionBackend, PackedAttention, SdpaBackend, packed_meta
from lvita_model.attention.registry import get_backend
from lvita_model.config import LongVitaConfig, load_config
from lvita_model.head import last_position_logits, masked_lm_loss
from lvita_model.projector import VisionProjector
from lvita_model.qwen2 import Attention, Qwen2Model
from lvita_model.vision import LAYER_SCALE_INIT, InternVisionModel, encode_tiles

INIT_STD = 0.02


class LongVitaModel(Qwen2Model):
    """Qwen2's embeddings, layers and norm plus the vision tower and projector."""

    def __init__(self, config: LongVitaConfig) -> None:
        super().__init__(config.llm)
        self.model_config = config
        if config.vision is not None:
            self.vision_model = InternVisionModel(config.vision)
            self.vision_projection = VisionProjector(config)

    def embed(
        self,
        input_ids: Tensor,
        pixel_values: Tensor | None,
        image_token_positions: Tensor | None,
        vision_backend: AttentionBackend,
    ) -> Tensor:
        """[T] ids (+ tiles) -> [T, H] embeddings with the vision features scattered in."""
        embeds = self.embed_tokens(input_ids)
        if self.model_config.vision is None:
            if pixel_values is not None and pixel_values.shape[0]:
                raise ValueError("this configuration has no vision tower but got pixel_values")
            return embeds
        if pixel_values is None:
            pixel_values = embeds.new_zeros(
                (0, 3, self.model_config.vision.image_size, self.model_config.vision.image_size)
            )
        features, zero_term = encode_tiles(
            self.vision_model,
            self.vision_projection,
            pixel_values,
            chunk_tiles=self.model_config.vision_chunk_tiles,
            backend=vision_backend,
        )
        if features.shape[0] == 0:
            return embeds + zero_term.to(embeds.dtype)
        if image_token_positions is None or image_token_positions.shape != features.shape[:2]:
            raise ValueError(
                f"image_token_positions must be [{features.shape[0]}, "
                f"{features.shape[1]}], got "
                f"{None if image_token_positions is None else tuple(image_token_positions.shape)}"
            )
        flat_features = features.reshape(-1, features.shape[-1]).to(embeds.dtype)  # [N*256, H]
        flat_positions = image_token_positions.reshape(-1)
        here = flat_positions >= 0  # -1: the placeholder lives on another CP rank
        if not bool(here.all()):
            flat_positions, flat_features = flat_positions[here], flat_features[here]
        return embeds.index_copy(0, flat_positions, flat_features)


class LongVitaForCausalLM(nn.Module):
    """The model plus an LM head used only through the logits-masked functions."""

    def __init__(
        self, config: LongVitaConfig, attention_backend: str | AttentionBackend = "auto"
    ) -> None:
        super().__init__()
        self.config = config
        self.model = LongVitaModel(config)
        if not config.llm.tie_word_embeddings:
            self.lm_head = nn.Linear(config.llm.hidden_size, config.llm.vocab_size, bias=False)
        self.attention_backend = attention_backend
        """A backend, or a name resolved per device and dtype on first use ("auto": the fastest
        available backend that supports the dtype, see `lvita_model.attention.registry`)."""
        self._resolved_backends: dict[tuple[str, torch.dtype], AttentionBackend] = {}

    @property
    def head_weight(self) -> Tensor:
        """[V, H]: the LM head, or the token embeddings when they are tied."""
        if self.config.llm.tie_word_embeddings:
            return self.model.embed_tokens.weight
        return self.lm_head.weight

    def forward(
        self,
        input_ids: Tensor,
        position_ids: Tensor,
        *,
        cu_seqlens: Tensor | list[int] | None = None,
        attention: Attention | None = None,
        pixel_values: Tensor | None = None,
        image_token_positions: Tensor | None = None,
    ) -> Tensor:
        """Final-normed hidden states [T, H] of one packed sequence.

        Documents are ``[cu_seqlens[i], cu_seqlens[i+1])`` with causal attention inside each (one
        document ``[0, T]`` for Long-VITA's stages 3-4); or pass a prepared `attention` callable
        (context parallelism, KV caches).
        """
        backend = self.backend_for(input_ids.device, self.model.embed_tokens.weight.dtype)
        if attention is None:
            if cu_seqlens is None:
                cu_seqlens = [0, int(input_ids.shape[0])]
            meta = packed_meta(cu_seqlens, causal=True, device=input_ids.device)
            attention = PackedAttention(meta, backend)
        embeds = self.model.embed(input_ids, pixel_values, image_token_positions, backend)
        return self.model.decode(embeds, position_ids, attention)

    def backend_for(self, device: torch.device, dtype: torch.dtype) -> AttentionBackend:
        """The attention backend used for tensors on `device` in `dtype`."""
        if isinstance(self.attention_backend, AttentionBackend):
            return self.attention_backend
        key = (device.type, dtype)
        if key not in self._resolved_backends:
            backend = get_backend(self.attention_backend, device)
            if self.attention_backend == "auto" and dtype not in backend.capabilities.dtypes:
                backend = SdpaBackend()  # e.g. fp32 on CUDA: the flash kernels take 16-bit
            self._resolved_backends[key] = backend
        return self._resolved_backends[key]

    def loss(
        self, hidden: Tensor, targets: Tensor, chunk_rows: int = 4096
    ) -> tuple[Tensor, Tensor]:
        """(sum of fp32 cross-entropy, number of supervised tokens) over ``targets != -100``.

        `targets` are next-token targets (`lvita_model.head.next_token_targets`, shifted before
        any sharding)."""
        return masked_lm_loss(hidden, self.head_weight, targets, chunk_rows=chunk_rows)

    def last_logits(self, hidden: Tensor, cu_seqlens: Tensor | list[int]) -> Tensor:
        """fp32 logits [N, V] at the last position of each document (inference)."""
        return last_position_logits(hidden, self.head_weight, cu_seqlens)


def init_weights(model: nn.Module, seed: int = 0, std: float = INIT_STD) -> None:
    """Fresh initialization (also of a model built on the meta device and `to_empty`-ed):
    normal(0, std) linear / conv / embedding weights and ViT class and position embeddings, zero
    biases, unit norms, InternViT layer scales at 0.1. Deterministic for a seed on any device."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            leaf = name.rsplit(".", 1)[-1]
            if leaf in ("ls1", "ls2"):
                param.fill_(LAYER_SCALE_INIT)
            elif leaf == "bias":
                param.zero_()
            elif param.dim() == 1:
                param.fill_(1.0)  # RMSNorm / LayerNorm scales
            else:
                values = torch.randn(param.shape, generator=generator) * std
                param.copy_(values.to(param.dtype))


def build_model(
    config: LongVitaConfig | str,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
    attention_backend: str | AttentionBackend = "auto",
) -> LongVitaForCausalLM:
    """A freshly initialized model (a preset name or a config), built on the meta device and
    materialized directly on `device` in `dtype` (no second host copy)."""
    if isinstance(config, str):
        config = load_config(config)
    with torch.device("meta"):
        model = LongVitaForCausalLM(config, attention_backend=attention_backend)
    model.to_empty(device=device).to(dtype)
    init_weights(model, seed=seed)
    return model
