"""Generation with a KV cache: chunked prefill, greedy / sampled decoding, context-parallel decode.

The original Long-VITA server keeps no KV cache under context parallelism: every decoded token
re-runs the whole sequence (reference long-vita.md section 7), O(T) model work per token. Here a
prompt is prefilled once, each layer's keys and values are kept, and a decoded token costs one
token of model work plus attention over the cache. The model holds no inference logic: everything
enters through the attention callable the decoder calls once per layer (`lvita_model.qwen2`).

Shapes: T prompt tokens, c new tokens of one step, S cached tokens, Hq / Hkv query / key-value
heads, D head dim, H hidden size, V vocabulary, P context-parallel ranks, L layers.

**Cache.** `KVCache` holds per layer K and V [capacity, Hkv, D] (preallocated for the prompt plus
the tokens to generate; `reserve` grows it by doubling) and, per cached token, its ``order``: its
index in the whole sequence. ``length`` tokens are valid.

**The attention callable.** `CacheAttention` is what `model(..., attention=...)` (or
``model.model.decode``) receives. The decoder gives it no layer index, so it counts: a forward
runs inside ``with attention.step(order_q):``, which sets the layer counter to 0 and builds the
step's `AttnMeta` once; call i of that forward is layer i. Each call writes the new tokens' k/v
into rows [S, S + c) of layer i's cache and attends q over rows [0, S + c) with one document,
``cu_seqlens_q = [0, c]``, ``cu_seqlens_k = [0, S + c]``, causal bottom-right (kernels), and
``order_q = S..S+c-1``, ``order_k = 0..S+c-1`` (the mask-based reference), through any backend of
`lvita_model.attention`. Leaving the step checks that exactly L calls happened and then commits
the c tokens (``length += c``); a step that raised commits nothing (rows past ``length`` are never
read), so the cache stays consistent.

**Prefill and decoding.** `prefill` runs the prompt in chunks of N tokens, each one step: a chunk
attends over the cache (the earlier chunks) and itself, so the result equals one-shot prefill
(verified: chunks of 1, 5, 16 vs one shot, max |logit diff| 9e-8 in fp32, tests/model/
test_inference.py). Vision tiles are encoded once for the whole prompt; each chunk scatters the
features whose placeholders fall in it. Decoding feeds one token per step and computes logits at
the last position only (`lvita_model.head.last_position_logits`): greedy by default, or
temperature / top-k sampling with a seeded generator; it stops at EOS (``<|im_end|>`` = 151645)
or after ``max_new_tokens``. Text steps embed with ``embed_tokens`` directly: `model(...)` on a
configuration with a vision tower runs a dummy tile through the tower when a call has no tiles
(the training-time trick for data-parallel gradients), which at inference would cost a ViT
forward per token. `generate_recompute` is the original's way (the whole sequence per token),
kept as the test oracle and the benchmark baseline: KV-cache greedy tokens equal it and the
logits agree within 1e-5 (fp32, measured max 1.2e-7).

**Context parallelism** (`generate(..., group=cp_group)`; the D1 "Inference at 1M" design of
context-parallel.md):

1. Prefill: the prompt is zigzag-sharded like a training sequence
   (`lvita_model.context_parallel.batch.shard_batch`: one document padded at its end to a multiple of 2P,
   rank r holds chunks r and 2P-1-r). The prefill attention is a context-parallel callable over
   the shards (the ring / all-gather implementations of `lvita_model.context_parallel`), wrapped by the
   step so each layer's *local* k/v are also stored: rank r's cache holds its shard's K/V only,
   with the shard's global indices as ``order``. The pad tokens sit after the prompt's last token,
   so causality keeps them out of every real token's attention; they are not stored.
   Vision: each rank encodes only the tiles whose placeholders it holds (a tile cut by the chunk
   boundary is encoded by both ranks), as the original (`shard_batch`). The logits of the last
   prompt token are computed on the rank that holds it and broadcast.
2. Decoding: the new token is replicated (every rank runs the same one-token forward). In each
   layer every rank attends q over its local cache (a partial result (out, lse) over its keys; a
   rank with no visible key returns out = 0, lse = -inf), the partials are all-gathered over the
   CP group and merged by their fp32 LSE (`lvita_model.context_parallel.merge`), so all ranks continue
   with the same attention output. The new token's k/v are stored by one rank only, round-robin
   over steps (rank ``step % P``), so shards stay balanced; that rank's partial includes the new
   key (causal bottom-right with c = 1 sees every key), the others' are non-causal over older keys.
   The chosen token is broadcast from rank 0 so sampling can never diverge. Per token and layer
   the traffic is P x (Hq x D + Hq) floats, independent of T.
   Verified on CPU with gloo (P = 2, 4; ring and all-gather prefill; a 31-token prompt with two
   tiles, one cut by a chunk boundary; a 3-token prompt where one rank of four starts decoding
   with an empty cache; seeded sampling): the same tokens as one process, logits of every step
   within 1.5e-7 of it and bit-identical across ranks (tests/model/test_inference.py).

Measured (`benchmarks/bench_decode.py`, benchmarks/results/decode.md; 2-vCPU shared VM, hidden
256, 2 layers, real 152K vocabulary, fp32): per generated token at a 16K-token prompt, the KV
cache takes 46 ms against 70 s for the original's recompute in one process (1,500x), and 56 ms
against 36 s over CP=2 gloo ranks (640x); the ratio grows with T (recompute is O(T^2)
per token in attention, decoding O(T)).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import Tensor

from lvita_model.attention import AttentionBackend, AttnMeta
from lvita_model.config import LLMConfig
from lvita_model.context_parallel.sharding import CPShard
from lvita_model.head import last_position_logits
from lvita_model.model import LongVitaForCausalLM
from lvita_model.qwen2 import Attention
from lvita_model.vision import encode_tiles

IM_END_ID = 151645
"""``<|im_end|>``: Long-VITA's end of an assistant turn (EOS)."""


# ----------------------------------------------------------------------------------------------
# The cache


class KVCache:
    """Per layer K and V [capacity, Hkv, D] and the sequence index (``order``) of each token."""

    def __init__(
        self,
        num_layers: int,
        num_kv_heads: int,
        head_dim: int,
        *,
        capacity: int = 0,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ) -> None:
        self.num_layers, self.num_kv_heads, self.head_dim = num_layers, num_kv_heads, head_dim
        self.dtype, self.device = dtype, torch.device(device)
        self.length = 0
        self.keys: list[Tensor] = []
        self.values: list[Tensor] = []
        self.order = torch.empty(0, dtype=torch.int64, device=self.device)
        self._allocate(capacity)

    @classmethod
    def for_model(
        cls, model: LongVitaForCausalLM, capacity: int, device: torch.device | None = None
    ) -> KVCache:
        """An empty cache shaped for `model`'s decoder, in its dtype and on its device."""
        llm: LLMConfig = model.config.llm
        weight = model.model.embed_tokens.weight
        return cls(
            llm.num_layers,
            llm.num_kv_heads,
            llm.head_dim,
            capacity=capacity,
            dtype=weight.dtype,
            device=device or weight.device,
        )

    @property
    def capacity(self) -> int:
        return int(self.order.shape[0])

    def nbytes(self) -> int:
        """Bytes of the valid K and V rows of all layers."""
        per_row = 2 * self.num_layers * self.num_kv_heads * self.head_dim
        return per_row * self.length * torch.empty((), dtype=self.dtype).element_size()

    def _allocate(self, capacity: int) -> None:
        """New buffers of `capacity` rows holding the valid rows of the old ones."""
        shape = (capacity, self.num_kv_heads, self.head_dim)
        keys = [
            torch.empty(shape, dtype=self.dtype, device=self.device) for _ in range(self.num_layers)
        ]
        values = [torch.empty_like(k) for k in keys]
        order = torch.empty(capacity, dtype=torch.int64, device=self.device)
        valid = slice(0, self.length)
        for layer, (old_k, old_v) in enumerate(zip(self.keys, self.values, strict=False)):
            keys[layer][valid], values[layer][valid] = old_k[valid], old_v[valid]
        order[valid] = self.order[valid]
        self.keys, self.values, self.order = keys, values, order

    def reserve(self, total: int) -> None:
        """Make room for `total` tokens (at least doubling, so appends are amortized O(1))."""
        if total > self.capacity:
            self._allocate(max(total, 2 * self.capacity))

    def write(self, layer: int, k: Tensor, v: Tensor) -> None:
        """Layer `layer`'s k, v [c, Hkv, D] into rows [length, length + c) (not yet committed)."""
        rows = slice(self.length, self.length + k.shape[0])
        self.keys[layer][rows] = k
        self.values[layer][rows] = v

    def view(self, layer: int, count: int) -> tuple[Tensor, Tensor]:
        """K, V [count, Hkv, D] of layer `layer` (rows [0, count), no copy)."""
        return self.keys[layer][:count], self.values[layer][:count]

    def commit(self, order: Tensor) -> None:
        """The rows written by the last step become valid; `order` [c] is their sequence index."""
        count = int(order.shape[0])
        self.order[self.length : self.length + count] = order
        self.length += count


# ----------------------------------------------------------------------------------------------
# The attention callable


def cache_meta(order_q: Tensor, order_k: Tensor, *, causal: bool) -> AttnMeta:
    """One document: c queries over S keys, bottom-right causal (kernels) and by order (reference).

    Bottom-right causality equals the order mask when the last c keys are the queries themselves
    and every other key comes earlier (`CacheAttention` with ``store``), or when c = 1 and every
    key comes earlier."""
    num_q, num_k = int(order_q.shape[0]), int(order_k.shape[0])
    device = order_q.device
    return AttnMeta(
        cu_seqlens_q=torch.tensor([0, num_q], dtype=torch.int32, device=device),
        cu_seqlens_k=torch.tensor([0, num_k], dtype=torch.int32, device=device),
        host_cu_seqlens_q=(0, num_q),
        host_cu_seqlens_k=(0, num_k),
        max_seqlen_q=num_q,
        max_seqlen_k=num_k,
        causal=causal,
        doc_q=torch.zeros(num_q, dtype=torch.int32, device=device),
        doc_k=torch.zeros(num_k, dtype=torch.int32, device=device),
        order_q=order_q,
        order_k=order_k,
    )


def partial_attention(
    q: Tensor, k: Tensor, v: Tensor, meta: AttnMeta, backend: AttentionBackend, scale: float
) -> tuple[Tensor, Tensor]:
    """(out [c, Hq, D], lse fp32 [Hq, c]) over the given keys; no key: out 0, lse -inf."""
    if k.shape[0] == 0:
        lse = torch.full((q.shape[1], q.shape[0]), float("-inf"), device=q.device)
        return torch.zeros_like(q), lse
    return backend.forward(q, k, v, meta, scale)


@dataclass
class _Step:
    order_q: Tensor
    store: bool
    keep: Tensor | None
    override: Attention | None
    meta: AttnMeta | None = None
    layer: int = 0


@dataclass
class CacheAttention:
    """``attention(q, k, v)`` over a `KVCache`, one forward per `step` (see the module docstring).

    With a process `group`, each call's result is the LSE merge of every rank's partial attention
    over its own cache (context-parallel decoding)."""

    cache: KVCache
    backend: AttentionBackend
    group: dist.ProcessGroup | None = None
    scale: float | None = None
    _step: _Step | None = field(default=None, init=False, repr=False)

    @contextmanager
    def step(
        self,
        order_q: Tensor,
        *,
        store: bool = True,
        keep: Tensor | None = None,
        attention: Attention | None = None,
    ) -> Iterator[CacheAttention]:
        """One forward of c = len(order_q) new tokens with sequence indices `order_q` [c].

        store: write the new k/v into the cache and attend over cache + them (causal); else
            attend over the cached keys only, all of them (a CP rank that does not keep this
            token's k/v: every cached key precedes the new tokens).
        keep: bool [c], which new tokens to store (default all; CP prefill drops its pads).
        attention: attend with this callable instead of over the cache (CP prefill: a ring or
            all-gather over the shards); the k/v are still stored.
        """
        if self._step is not None:
            raise RuntimeError("CacheAttention.step() does not nest")
        order_q = order_q.to(self.cache.device, torch.int64)
        self._step = _Step(order_q, store, keep, attention)
        try:
            yield self
            if self._step.layer != self.cache.num_layers:
                raise RuntimeError(
                    f"the forward called attention {self._step.layer} times, the cache has "
                    f"{self.cache.num_layers} layers"
                )
            if store:
                self.cache.commit(order_q if keep is None else order_q[keep.to(order_q.device)])
        finally:
            self._step = None

    def __call__(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        step = self._step
        if step is None:
            raise RuntimeError("call CacheAttention inside `with attention.step(order):`")
        if step.layer >= self.cache.num_layers:
            raise RuntimeError(f"more attention calls than the {self.cache.num_layers} layers")
        if q.shape[0] != step.order_q.shape[0]:
            raise ValueError(f"step() announced {step.order_q.shape[0]} tokens, got {q.shape[0]}")
        layer, step.layer = step.layer, step.layer + 1
        num_new = 0
        if step.store:
            new_k, new_v = (k, v) if step.keep is None else (k[step.keep], v[step.keep])
            self.cache.write(layer, new_k, new_v)
            num_new = new_k.shape[0]
        if step.override is not None:
            return step.override(q, k, v)
        keys, values = self.cache.view(layer, self.cache.length + num_new)
        if step.meta is None:  # once per step: every layer has the same layout
            order_k = self.cache.order[: self.cache.length]
            if num_new:
                order_k = torch.cat([order_k, step.order_q])
            step.meta = cache_meta(step.order_q, order_k, causal=step.store)
        scale = q.shape[-1] ** -0.5 if self.scale is None else self.scale
        out, lse = partial_attention(q, keys, values, step.meta, self.backend, scale)
        if self.group is None:
            return out
        return gather_merge(out, lse, self.group)


_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
"""torch >= 2.13 renames all_gather_into_tensor (the old name warns)."""


def gather_merge(out: Tensor, lse: Tensor, group: dist.ProcessGroup) -> Tensor:
    """All ranks' partials (out [c, Hq, D], lse [Hq, c]) merged by LSE; the same on every rank.

    One all-gather per layer: out and lse travel together as fp32 [c, Hq, D + 1]."""
    from lvita_model.context_parallel.merge import merge_partials

    size = dist.get_world_size(group)
    num_rows, num_heads, head_dim = out.shape
    payload = torch.cat([out.float(), lse.t().unsqueeze(-1)], dim=-1)  # [c, Hq, D + 1]
    gathered = payload.new_empty((size * num_rows, num_heads, head_dim + 1))
    _all_gather_single(gathered, payload, group=group)
    gathered = gathered.view(size, num_rows, num_heads, head_dim + 1)
    outs = gathered[..., :head_dim]  # [P, c, Hq, D]
    lses = gathered[..., head_dim].transpose(1, 2)  # [P, c, Hq] -> [P, Hq, c]
    merged, _ = merge_partials(list(outs), list(lses))
    return merged.to(out.dtype)


# ----------------------------------------------------------------------------------------------
# Embeddings and one step


def encode_prompt_tiles(
    model: LongVitaForCausalLM,
    pixel_values: Tensor | None,
    image_token_positions: Tensor | None,
) -> tuple[Tensor | None, Tensor | None]:
    """(features [N * tokens_per_tile, H], their positions [N * tokens_per_tile]) or (None,
    None) without tiles; positions < 0 are placeholders held elsewhere (CP) and are dropped."""
    if pixel_values is None or pixel_values.shape[0] == 0:
        return None, None
    if model.config.vision is None:
        raise ValueError("this model has no vision tower but the prompt has images")
    if image_token_positions is None or image_token_positions.shape[0] != pixel_values.shape[0]:
        raise ValueError("image_token_positions [N, tokens_per_tile] must come with the tiles")
    weight = model.model.embed_tokens.weight
    features, _ = encode_tiles(
        model.model.vision_model,
        model.model.vision_projection,
        pixel_values.to(weight.device, weight.dtype),
        chunk_tiles=model.config.vision_chunk_tiles,
        backend=model.backend_for(weight.device, weight.dtype),
    )
    flat = features.reshape(-1, features.shape[-1]).to(weight.dtype)  # [N * tpt, H]
    positions = image_token_positions.reshape(-1).to(weight.device)  # [N * tpt]
    here = positions >= 0
    return flat[here], positions[here]


def embed_span(
    model: LongVitaForCausalLM,
    input_ids: Tensor,
    start: int,
    features: Tensor | None = None,
    feature_positions: Tensor | None = None,
) -> Tensor:
    """[c, H] embeddings of tokens [start, start + c) with the vision features that land there."""
    embeds = model.model.embed_tokens(input_ids)
    if features is None or feature_positions is None:
        return embeds
    local = feature_positions - start
    inside = (local >= 0) & (local < input_ids.shape[0])
    if not bool(inside.any()):
        return embeds
    return embeds.index_copy(0, local[inside], features[inside])


def _forward_step(
    model: LongVitaForCausalLM, attention: CacheAttention, embeds: Tensor, positions: Tensor
) -> Tensor:
    """Hidden states [c, H] of one step of new tokens (the caller holds the step context)."""
    return model.model.decode(embeds, positions, attention)


def decode_step(
    model: LongVitaForCausalLM,
    attention: CacheAttention,
    token: int,
    position: int,
    *,
    store: bool = True,
) -> Tensor:
    """Feed one token at sequence index `position`; fp32 logits [V] for the next one."""
    device = attention.cache.device
    ids = torch.tensor([token], dtype=torch.int64, device=device)
    positions = torch.tensor([position], dtype=torch.int64, device=device)
    with attention.step(positions, store=store):
        hidden = _forward_step(model, attention, model.model.embed_tokens(ids), positions)
    return last_position_logits(hidden, model.head_weight, [0, 1])[0]


def prefill(
    model: LongVitaForCausalLM,
    attention: CacheAttention,
    input_ids: Tensor,
    *,
    pixel_values: Tensor | None = None,
    image_token_positions: Tensor | None = None,
    chunk_size: int | None = None,
) -> Tensor:
    """Run the prompt [T] into an empty cache in chunks of `chunk_size` tokens (None: one shot);
    fp32 logits [V] of the token after it."""
    if attention.cache.length:
        raise ValueError("prefill expects an empty cache")
    num_tokens = int(input_ids.shape[0])
    if num_tokens == 0:
        raise ValueError("the prompt is empty")
    chunk = num_tokens if chunk_size is None else chunk_size
    if chunk < 1:
        raise ValueError(f"prefill chunk must be >= 1, got {chunk}")
    device = attention.cache.device
    input_ids = input_ids.to(device)
    attention.cache.reserve(num_tokens)
    features, feature_positions = encode_prompt_tiles(model, pixel_values, image_token_positions)
    hidden = None
    for start in range(0, num_tokens, chunk):
        end = min(start + chunk, num_tokens)
        positions = torch.arange(start, end, device=device)
        embeds = embed_span(model, input_ids[start:end], start, features, feature_positions)
        with attention.step(positions):
            hidden = _forward_step(model, attention, embeds, positions)
    assert hidden is not None
    return last_position_logits(hidden, model.head_weight, [0, hidden.shape[0]])[0]


def cp_prefill_attention(
    shard: CPShard, backend: AttentionBackend, group: dist.ProcessGroup
) -> Attention:
    """The default context-parallel prefill attention: the zigzag ring (K/V travel P-1 hops;
    `lvita_model.context_parallel.allgather.AllGatherKVAttention` has the same signature)."""
    from lvita_model.context_parallel.ring import ZigzagRingAttention

    return ZigzagRingAttention(shard, backend, group, causal=True)


def cp_prefill(
    model: LongVitaForCausalLM,
    attention: CacheAttention,
    input_ids: Tensor,
    *,
    pixel_values: Tensor | None = None,
    image_token_positions: Tensor | None = None,
    prefill_attention: Callable[..., Attention] | None = None,
) -> Tensor:
    """Context-parallel prefill of the whole prompt [T] (every rank passes all of it): this
    rank's zigzag shard of K/V goes into its cache; fp32 logits [V] of the next token, on every
    rank. `prefill_attention(shard, backend, group)` builds the CP attention (default: ring)."""
    from lvita_model.context_parallel.batch import shard_batch

    group = attention.group
    if group is None:
        raise ValueError("cp_prefill needs a CacheAttention with a process group")
    if attention.cache.length:
        raise ValueError("prefill expects an empty cache")
    rank, size = _cp_rank_size(group)
    device = attention.cache.device
    num_tokens = int(input_ids.shape[0])
    input_ids = input_ids.to(device)
    local = shard_batch(
        input_ids,
        torch.arange(num_tokens, device=device),
        torch.full_like(input_ids, -100),
        [0, num_tokens],
        cp_size=size,
        cp_rank=rank,
        pixel_values=pixel_values,
        image_token_positions=image_token_positions,
        pad_id=0,  # any valid id: the pads are never attended to nor stored
    )
    index = local.shard.index.to(device)  # [T_pad / P] global index of each local token
    keep = index < num_tokens  # the pads come after the prompt: never seen, never stored
    attention.cache.reserve(int(keep.sum()))
    features, feature_positions = encode_prompt_tiles(
        model, local.pixel_values, local.image_token_positions
    )
    embeds = embed_span(model, local.input_ids, 0, features, feature_positions)
    build = prefill_attention or cp_prefill_attention
    inner = build(local.shard, attention.backend, group)
    with attention.step(index, keep=keep, attention=inner):
        hidden = _forward_step(model, attention, embeds, local.position_ids)
    return _last_token_logits(model, hidden, index == num_tokens - 1, group)


def _last_token_logits(
    model: LongVitaForCausalLM, hidden: Tensor, is_last: Tensor, group: dist.ProcessGroup
) -> Tensor:
    """fp32 logits [V] at the one local row flagged in `is_last` (on one rank), on all ranks."""
    rows = torch.nonzero(is_last).flatten()
    logits = torch.zeros(model.head_weight.shape[0], dtype=torch.float32, device=hidden.device)
    if rows.numel():
        logits = last_position_logits(hidden, model.head_weight, positions=rows)[0]
    holder = torch.tensor([dist.get_rank(group) if rows.numel() else 0], device=hidden.device)
    dist.all_reduce(holder, group=group)  # exactly one rank holds the last token
    dist.broadcast(logits, src=dist.get_global_rank(group, int(holder)), group=group)
    return logits


# ----------------------------------------------------------------------------------------------
# Choosing tokens


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


# ----------------------------------------------------------------------------------------------
# Generation


@dataclass
class Generation:
    tokens: list[int]
    """Generated ids, EOS included when it was produced."""
    prompt_tokens: int
    stopped_at_eos: bool
    prefill_seconds: float
    decode_seconds: float
    """Time of the decode steps (one per generated token after the first)."""
    logits: list[Tensor] = field(default_factory=list)
    """fp32 [V] logits each token was chosen from (only with ``keep_logits``)."""
    cache_bytes: int = 0
    """Bytes of this rank's K/V after generation."""


def _cp_rank_size(group: dist.ProcessGroup | None) -> tuple[int, int]:
    if group is None:
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)


def _broadcast_token(token: int, group: dist.ProcessGroup | None, device: torch.device) -> int:
    """Rank 0's choice on every rank (logits agree, but sampling must never diverge)."""
    if group is None:
        return token
    value = torch.tensor([token], dtype=torch.int64, device=device)
    dist.broadcast(value, src=dist.get_global_rank(group, 0), group=group)
    return int(value)


@torch.no_grad()
def generate(
    model: LongVitaForCausalLM,
    input_ids: Tensor,
    *,
    pixel_values: Tensor | None = None,
    image_token_positions: Tensor | None = None,
    max_new_tokens: int = 32,
    prefill_chunk: int | None = None,
    sampling: Sampling = Sampling(),
    eos_token_id: int | None = IM_END_ID,
    keep_logits: bool = False,
    group: dist.ProcessGroup | None = None,
    prefill_attention: Callable[..., Attention] | None = None,
) -> Generation:
    """Generate after the prompt `input_ids` [T] (with its tiles [N, 3, S, S] and their
    placeholder positions [N, tokens_per_tile]) with a KV cache.

    Every rank of a context-parallel `group` calls this with the same full prompt; the cache is
    sharded (see the module docstring) and every rank returns the same tokens. `prefill_attention`
    (CP only) builds the prefill attention from the shard; default: `cp_prefill_attention`.
    `prefill_chunk` applies to a single process.
    """
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    rank, size = _cp_rank_size(group)
    weight = model.model.embed_tokens.weight
    backend = model.backend_for(weight.device, weight.dtype)
    num_prompt = int(input_ids.shape[0])
    capacity = -(-num_prompt // size) + 2 * size + -(-max_new_tokens // size)
    cache = KVCache.for_model(model, capacity)
    attention = CacheAttention(cache, backend, group=group if size > 1 else None)
    started = time.perf_counter()
    if size > 1:
        logits = cp_prefill(
            model,
            attention,
            input_ids,
            pixel_values=pixel_values,
            image_token_positions=image_token_positions,
            prefill_attention=prefill_attention,
        )
    else:
        logits = prefill(
            model,
            attention,
            input_ids,
            pixel_values=pixel_values,
            image_token_positions=image_token_positions,
            chunk_size=prefill_chunk,
        )
    prefill_seconds = time.perf_counter() - started
    generator = torch.Generator().manual_seed(sampling.seed)
    tokens: list[int] = []
    kept: list[Tensor] = []
    started = time.perf_counter()
    for step in range(max_new_tokens):
        token = _broadcast_token(choose_token(logits, sampling, generator), group, cache.device)
        tokens.append(token)
        if keep_logits:
            kept.append(logits)
        if token == eos_token_id or step == max_new_tokens - 1:
            break
        owner = step % size  # round-robin: the rank that keeps this token's k/v
        logits = decode_step(model, attention, token, num_prompt + step, store=owner == rank)
    return Generation(
        tokens=tokens,
        prompt_tokens=num_prompt,
        stopped_at_eos=bool(tokens) and tokens[-1] == eos_token_id,
        prefill_seconds=prefill_seconds,
        decode_seconds=time.perf_counter() - started,
        logits=kept,
        cache_bytes=cache.nbytes(),
    )


@torch.no_grad()
def generate_recompute(
    model: LongVitaForCausalLM,
    input_ids: Tensor,
    *,
    pixel_values: Tensor | None = None,
    image_token_positions: Tensor | None = None,
    max_new_tokens: int = 32,
    sampling: Sampling = Sampling(),
    eos_token_id: int | None = IM_END_ID,
    keep_logits: bool = False,
) -> Generation:
    """The original's decoding: no cache, the whole sequence (tiles included) re-run per token.

    The test oracle for `generate` and the benchmark baseline."""
    device = model.model.embed_tokens.weight.device
    sequence = input_ids.to(device)
    generator = torch.Generator().manual_seed(sampling.seed)
    tokens: list[int] = []
    kept: list[Tensor] = []
    times: list[float] = []
    for _ in range(max_new_tokens):
        started = time.perf_counter()
        hidden = model(
            sequence,
            torch.arange(sequence.shape[0], device=device),
            pixel_values=pixel_values,
            image_token_positions=image_token_positions,
        )
        logits = last_position_logits(hidden, model.head_weight, [0, hidden.shape[0]])[0]
        times.append(time.perf_counter() - started)
        token = choose_token(logits, sampling, generator)
        tokens.append(token)
        if keep_logits:
            kept.append(logits)
        if token == eos_token_id:
            break
        sequence = torch.cat([sequence, sequence.new_tensor([token])])
    return Generation(
        tokens=tokens,
        prompt_tokens=int(input_ids.shape[0]),
        stopped_at_eos=tokens[-1] == eos_token_id,
        prefill_seconds=times[0],
        decode_seconds=sum(times[1:]),
        logits=kept,
    )
