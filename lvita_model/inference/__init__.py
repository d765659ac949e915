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
forward per token. `lvita_model.baselines.generate_recompute` is the original's way (the whole
sequence per token), kept as the test oracle and the benchmark baseline: KV-cache greedy tokens
equal it and the logits agree within 1e-5 (fp32, measured max 1.2e-7).

**Context parallelism** (`generate(..., group=cp_group)`; the D1 "Inference at 1M" design of
context-parallel.md):

1. Prefill: the prompt is zigzag-sharded like a training sequence
   (`lvita_model.context_parallel.batch.shard_batch`: one document padded at its end to a multiple
   of 2P, rank r holds chunks r and 2P-1-r). The prefill attention is a context-parallel callable
   over the shards (the ring / all-gather implementations of `lvita_model.context_parallel`),
   wrapped by the step so each layer's *local* k/v are also stored: rank r's cache holds its shard's
   K/V only, with the shard's global indices as ``order``. The pad tokens sit after the prompt's
   last token, so causality keeps them out of every real token's attention; they are not stored.
   Vision: each rank encodes only the tiles whose placeholders it holds (a tile cut by the chunk
   boundary is encoded by both ranks), as the original (`shard_batch`). The logits of the last
   prompt token are computed on the rank that holds it and broadcast.
2. Decoding: the new token is replicated (every rank runs the same one-token forward). In each layer
   every rank attends q over its local cache (a partial result (out, lse) over its keys; a rank with
   no visible key returns out = 0, lse = -inf), the partials are all-gathered over the CP group and
   merged by their fp32 LSE (`lvita_model.context_parallel.merge`), so all ranks continue with the
   same attention output. The new token's k/v are stored by one rank only, round-robin over steps
   (rank ``step % P``), so shards stay balanced; that rank's partial includes the new key (causal
   bottom-right with c = 1 sees every key), the others' are non-causal over older keys. The chosen
   token is broadcast from rank 0 so sampling can never diverge. Per token and layer the traffic is
   P x (Hq x D + Hq) floats, independent of T. Verified on CPU with gloo (P = 2, 4; ring and
   all-gather prefill; a 31-token prompt with two tiles, one cut by a chunk boundary; a 3-token
   prompt where one rank of four starts decoding with an empty cache; seeded sampling): the same
   tokens as one process, logits of every step within 1.5e-7 of it and bit-identical across ranks
   (tests/model/test_inference.py).

Measured (`benchmarks/bench_decode.py`, benchmarks/results/decode.md; 2-vCPU shared VM, hidden
256, 2 layers, real 152K vocabulary, fp32): per generated token at a 16K-token prompt, the KV
cache takes 46 ms against 70 s for the original's recompute in one process (1,500x), and 56 ms
against 36 s over CP=2 gloo ranks (640x); the ratio grows with T (recompute is O(T^2)
per token in attention, decoding O(T)).

Files: `cache` (KVCache, CacheAttention, the CP decode merge), `steps` (prompt tiles, embeddings,
prefill, one decode step), `context_parallel` (CP prefill, the last token's logits, the chosen
token on every rank), `sampling` (Sampling, choose_token), `generate` (the driver).
"""

from lvita_model.inference.cache import CacheAttention, KVCache, gather_merge, partial_attention
from lvita_model.inference.context_parallel import cp_prefill, cp_prefill_attention
from lvita_model.inference.generate import IM_END_ID, Generation, generate
from lvita_model.inference.sampling import Sampling, choose_token
from lvita_model.inference.steps import decode_step, embed_span, encode_prompt_tiles, prefill

__all__ = [
    "IM_END_ID",
    "CacheAttention",
    "Generation",
    "KVCache",
    "Sampling",
    "choose_token",
    "cp_prefill",
    "cp_prefill_attention",
    "decode_step",
    "embed_span",
    "encode_prompt_tiles",
    "gather_merge",
    "generate",
    "partial_attention",
    "prefill",
]
