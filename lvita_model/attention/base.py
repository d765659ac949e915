"""The attention backend contract: packed (THD) tensors, forward with fp32 LSE, block backward.

Shapes: T query tokens, S key tokens, Hq query heads, Hkv key/value heads (Hq % Hkv == 0, GQA),
D head dim. Every backend implements

    forward(q [T, Hq, D], k [S, Hkv, D], v [S, Hkv, D], meta, scale)
        -> out [T, Hq, D] (q's dtype), lse [Hq, T] float32
    backward(dout, q, k, v, out, lse, meta, scale) -> dq, dk, dv   (dq in q's dtype, dk/dv fp32
                                                                     allowed: a ring accumulates)

`lse` is the natural-log log-sum-exp of the scaled scores of each query row over the keys it may
see; a row that sees no key has ``lse = -inf`` and ``out = 0``. `backward` takes `out` and `lse`
as arguments rather than recomputing them, so a ring that merged several blocks can pass the
*merged* output and LSE and get each block's exact share of the gradient (flash-attn's and
torch-npu's backward kernels work the same way).

`AttnMeta` describes which key each query may see, in two equivalent forms, built once per batch:

- cu_seqlens (device int32 and host tuples) and max lengths, for the varlen kernels: query
  document i is ``q[cu_q[i]:cu_q[i+1]]`` and sees ``k[cu_k[i]:cu_k[i+1]]``; with `causal`, the
  mask is bottom-right aligned (flash-attn >= 2.1 convention).
- per-token document id and sequence order (`doc_*`, `order_*`), for the mask-based reference:
  query i sees key j iff ``doc_q[i] == doc_k[j]`` and, when causal, ``order_k[j] <= order_q[i]``.
  Because order is the token's index in the *whole* packed sequence, this form stays correct for
  any slice, zigzag shard or chunked prefill of it, which makes the reference a test oracle.

Every `AttnMeta` is built by `layout_meta`; the callers' shapes are `packed_meta` (self-attention
over a packed sequence), `varlen_meta` (queries vs keys per document, bottom-right causal, the
kernels' view), `cache_meta` (new tokens over a KV cache) and the CP blocks
(`lvita_model.context_parallel.blocks`). `host_cu_seqlens` is the one cu_seqlens check (the head
uses it too). The kernel backends share `device_type`, the +-inf LSE conversions
(`lse_from_kernel`, `lse_for_kernel`) and the GQA expand / reduce (`expand_kv`, `reduce_kv_grad`).
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor


@dataclass(frozen=True, eq=False)
class AttnMeta:
    cu_seqlens_q: Tensor
    """int32 [N + 1] on the tensors' device."""
    cu_seqlens_k: Tensor
    """int32 [N + 1] on the tensors' device."""
    host_cu_seqlens_q: tuple[int, ...]
    host_cu_seqlens_k: tuple[int, ...]
    max_seqlen_q: int
    max_seqlen_k: int
    causal: bool
    doc_q: Tensor
    """int32 [T]: document id of each query token."""
    doc_k: Tensor
    """int32 [S]"""
    order_q: Tensor
    """int64 [T]: index of each query token in the whole packed sequence."""
    order_k: Tensor
    """int64 [S]"""


def host_cu_seqlens(
    cu_seqlens: Tensor | Sequence[int], num_tokens: int | None = None
) -> tuple[int, ...]:
    """Document boundaries as host ints, checked: 1-D and never decreasing.

    Without `num_tokens` (a packed sequence made of its documents) they start at 0 and hold at
    least one document. With `num_tokens` (a sequence whose tokens outside [cu[0], cu[-1]) are
    padding, as the head allows) they need one entry and lie within [0, num_tokens].
    """
    values = cu_seqlens.tolist() if isinstance(cu_seqlens, Tensor) else cu_seqlens
    try:
        host = tuple(int(x) for x in values)
    except TypeError:  # a nested list or a 2-D tensor
        raise ValueError(f"cu_seqlens must be 1-D, got {values}") from None
    decreasing = any(b < a for a, b in zip(host, host[1:], strict=False))
    if num_tokens is None:
        if len(host) < 2 or host[0] != 0 or decreasing:
            raise ValueError(f"cu_seqlens must start at 0 and not decrease, got {host[:8]}...")
        return host
    if not host or decreasing or host[0] < 0 or host[-1] > num_tokens:
        raise ValueError(
            f"cu_seqlens must be non-decreasing within [0, {num_tokens}] with at least one "
            f"entry, got {list(host[:8])}..."
        )
    return host


def document_ids(
    host: Sequence[int], device: torch.device | str | None = None
) -> tuple[Tensor, Tensor]:
    """(int32 [T] document of every token, int64 [N] document lengths) for checked boundaries.

    T is ``host[-1] - host[0]``: the tokens of the documents, without padding around them."""
    sizes = [b - a for a, b in zip(host, host[1:], strict=False)]
    lengths = torch.tensor(sizes, dtype=torch.int64, device=device)
    ids = torch.arange(len(host) - 1, dtype=torch.int32, device=device)
    return torch.repeat_interleave(ids, lengths), lengths


def _max_len(host: Sequence[int]) -> int:
    return max((b - a for a, b in zip(host, host[1:], strict=False)), default=0)


def layout_meta(
    host_cu_q: tuple[int, ...],
    host_cu_k: tuple[int, ...],
    doc_q: Tensor,
    doc_k: Tensor,
    order_q: Tensor,
    order_k: Tensor,
    *,
    causal: bool,
    device: torch.device | str | None = None,
) -> AttnMeta:
    """The one constructor of `AttnMeta`: (checked) host boundaries and the per-token document
    and order -> both forms on `device`. Equal query and key boundaries share one tensor."""
    cu_q = torch.tensor(host_cu_q, dtype=torch.int32, device=device)
    cu_k = cu_q
    if host_cu_k != host_cu_q:
        cu_k = torch.tensor(host_cu_k, dtype=torch.int32, device=device)
    return AttnMeta(
        cu_seqlens_q=cu_q,
        cu_seqlens_k=cu_k,
        host_cu_seqlens_q=host_cu_q,
        host_cu_seqlens_k=host_cu_k,
        max_seqlen_q=_max_len(host_cu_q),
        max_seqlen_k=_max_len(host_cu_k),
        causal=causal,
        doc_q=doc_q.to(device=device, dtype=torch.int32),
        doc_k=doc_k.to(device=device, dtype=torch.int32),
        order_q=order_q.to(device=device, dtype=torch.int64),
        order_k=order_k.to(device=device, dtype=torch.int64),
    )


def packed_meta(
    cu_seqlens: Tensor | Sequence[int],
    *,
    causal: bool,
    device: torch.device | str | None = None,
) -> AttnMeta:
    """Self-attention over one packed sequence: documents ``[cu[i], cu[i+1])`` see only
    themselves (pass ``[0, T]`` for one document over the whole pack)."""
    host = host_cu_seqlens(cu_seqlens)
    if device is None and isinstance(cu_seqlens, Tensor):
        device = cu_seqlens.device
    doc, _ = document_ids(host, device)  # [T]
    order = torch.arange(host[-1], dtype=torch.int64, device=device)
    return layout_meta(host, host, doc, doc, order, order, causal=causal, device=device)


def varlen_meta(
    cu_seqlens_q: Tensor | Sequence[int],
    cu_seqlens_k: Tensor | Sequence[int],
    *,
    causal: bool,
    device: torch.device | str | None = None,
) -> AttnMeta:
    """Queries ``[cu_q[i], cu_q[i+1])`` see keys ``[cu_k[i], cu_k[i+1])``, bottom-right causal
    (the varlen kernels' convention): in the (doc, order) form, query row p of a document gets
    the order of its key row p + k_len - q_len, so a document with more queries than keys has
    leading rows that see no key."""
    host_q, host_k = host_cu_seqlens(cu_seqlens_q), host_cu_seqlens(cu_seqlens_k)
    if len(host_q) != len(host_k):
        raise ValueError(f"{len(host_q) - 1} query documents but {len(host_k) - 1} key documents")
    doc_q, q_lens = document_ids(host_q)  # [T], [N]
    doc_k, k_lens = document_ids(host_k)  # [S], [N]
    rows = doc_q.long()
    start_q = torch.tensor(host_q[:-1], dtype=torch.int64)[rows]  # [T]: first query of the doc
    start_k = torch.tensor(host_k[:-1], dtype=torch.int64)[rows]  # [T]: first key of the doc
    shift = (k_lens - q_lens)[rows]  # [T]
    order_q = start_k + (torch.arange(host_q[-1]) - start_q) + shift  # [T]
    order_k = torch.arange(host_k[-1])  # [S]
    return layout_meta(host_q, host_k, doc_q, doc_k, order_q, order_k, causal=causal, device=device)


def cache_meta(order_q: Tensor, order_k: Tensor, *, causal: bool) -> AttnMeta:
    """One document: c queries over S keys, bottom-right causal (kernels) and by order (reference).

    Bottom-right causality equals the order mask when the last c keys are the queries themselves
    and every other key comes earlier (`lvita_model.inference.cache.CacheAttention` with
    ``store``), or when c = 1 and every key comes earlier."""
    num_q, num_k = int(order_q.shape[0]), int(order_k.shape[0])
    device = order_q.device
    doc_q = torch.zeros(num_q, dtype=torch.int32, device=device)
    doc_k = torch.zeros(num_k, dtype=torch.int32, device=device)
    return layout_meta(
        (0, num_q), (0, num_k), doc_q, doc_k, order_q, order_k, causal=causal, device=device
    )


@dataclass(frozen=True)
class Capabilities:
    causal: bool
    varlen: bool
    lse: bool
    block_backward: bool
    """`backward` with an externally given (merged) out and LSE: what a ring needs."""
    devices: tuple[str, ...]
    dtypes: tuple[torch.dtype, ...]


class AttentionBackend(ABC):
    name: ClassVar[str]
    capabilities: ClassVar[Capabilities]

    @classmethod
    @abstractmethod
    def is_available(cls, device: torch.device | str | None = None) -> tuple[bool, str]:
        """(usable on `device`, reason). Imports an optional package lazily, if at all, guarded
        by ``except Exception`` (a broken CUDA / CANN install raises more than ImportError)."""

    @abstractmethod
    def forward(
        self, q: Tensor, k: Tensor, v: Tensor, meta: AttnMeta, scale: float
    ) -> tuple[Tensor, Tensor]: ...

    @abstractmethod
    def backward(
        self,
        dout: Tensor,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        out: Tensor,
        lse: Tensor,
        meta: AttnMeta,
        scale: float,
    ) -> tuple[Tensor, Tensor, Tensor]: ...


# ----------------------------------------------------------------------------------------------
# Glue the kernel backends share


def device_type(device: torch.device | str | None) -> str:
    """'cpu', 'cuda', 'npu', ... of a device, a device string, or the default accelerator.

    Strings are parsed without ``torch.device`` because plain torch rejects ``"npu"``.
    """
    if device is None:
        npu = getattr(torch, "npu", None)
        if npu is not None and npu.is_available():
            return "npu"
        return "cuda" if torch.cuda.is_available() else "cpu"
    return str(device).split(":")[0]


def lse_from_kernel(lse: Tensor) -> Tensor:
    """fp32 LSE in the contract's form: rows that see no key (+inf from flash-attn's non-split
    kernels, -inf from split ones) become -inf."""
    return lse.float().masked_fill(torch.isinf(lse), -math.inf)


def lse_for_kernel(lse: Tensor) -> Tensor:
    """fp32 contiguous LSE for a backward kernel that computes P = exp(s - lse): -inf (a row that
    sees no key) becomes +inf, so P = 0 there instead of inf / NaN."""
    return lse.float().masked_fill(lse == -math.inf, math.inf).contiguous()


def expand_kv(x: Tensor, num_heads: int, dim: int = 1) -> Tensor:
    """[S, Hkv, D] -> [S, Hq, D] (heads on `dim`): query head h reads KV head h // (Hq / Hkv);
    `x` itself when Hq == Hkv."""
    groups = num_heads // x.shape[dim]
    return x if groups == 1 else x.repeat_interleave(groups, dim=dim)


def reduce_kv_grad(grad: Tensor, num_kv_heads: int, dim: int = 1) -> Tensor:
    """[S, Hq, D] -> [S, Hkv, D] (heads on `dim`): the gradient summed over each query-head
    group (the adjoint of `expand_kv`); `grad` itself when Hq == Hkv."""
    num_heads = grad.shape[dim]
    if num_heads == num_kv_heads:
        return grad
    # [..., Hq, ...] -> [..., Hkv, groups, ...] -> sum over groups
    return grad.unflatten(dim, (num_kv_heads, num_heads // num_kv_heads)).sum(dim + 1)
