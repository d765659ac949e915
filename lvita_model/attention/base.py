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
"""

from __future__ import annotations

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


def host_cu_seqlens(cu_seqlens: Tensor | Sequence[int]) -> tuple[int, ...]:
    """Document boundaries as host ints, checked: start at 0, never decrease."""
    host = tuple(
        int(x) for x in (cu_seqlens.tolist() if isinstance(cu_seqlens, Tensor) else cu_seqlens)
    )
    if len(host) < 2 or host[0] != 0 or any(b < a for a, b in zip(host, host[1:], strict=False)):
        raise ValueError(f"cu_seqlens must start at 0 and not decrease, got {host[:8]}...")
    return host


def document_ids(
    host: Sequence[int], device: torch.device | str | None = None
) -> tuple[Tensor, Tensor]:
    """(int32 [T] document of every token, int64 [N] document lengths) for checked boundaries."""
    lengths = torch.tensor([b - a for a, b in zip(host, host[1:], strict=False)], device=device)
    ids = torch.arange(len(host) - 1, dtype=torch.int32, device=device)
    return torch.repeat_interleave(ids, lengths), lengths


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
    cu = torch.tensor(host, dtype=torch.int32, device=device)
    doc, lengths = document_ids(host, device)  # [T], [N]
    order = torch.arange(host[-1], dtype=torch.int64, device=device)
    max_len = int(lengths.max()) if len(host) > 1 else 0
    return AttnMeta(cu, cu, host, host, max_len, max_len, causal, doc, doc, order, order)


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
