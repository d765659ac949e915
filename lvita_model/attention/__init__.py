"""Attention for packed sequences behind one contract (see `base`); `attend` is what models call."""

from __future__ import annotations

import torch
from torch import Tensor

from lvita_model.attention.base import (
    AttentionBackend,
    AttnMeta,
    Capabilities,
    cache_meta,
    packed_meta,
    varlen_meta,
)
from lvita_model.attention.flash import FlashBackend
from lvita_model.attention.npu import NpuBackend
from lvita_model.attention.registry import BACKENDS, assert_supports, get_backend
from lvita_model.attention.sdpa import SdpaBackend
from lvita_model.attention.torch_varlen import TorchVarlenBackend
from lvita_model.errors import AttentionBackendError

__all__ = [
    "BACKENDS",
    "AttentionBackend",
    "AttentionBackendError",
    "AttnMeta",
    "Capabilities",
    "FlashBackend",
    "NpuBackend",
    "PackedAttention",
    "SdpaBackend",
    "TorchVarlenBackend",
    "assert_supports",
    "attend",
    "cache_meta",
    "get_backend",
    "packed_meta",
    "varlen_meta",
]


class _Attend(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, meta, backend, scale):  # type: ignore[override]
        out, lse = backend.forward(q, k, v, meta, scale)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.meta, ctx.backend, ctx.scale = meta, backend, scale
        return out

    @staticmethod
    def backward(ctx, dout):  # type: ignore[override]
        q, k, v, out, lse = ctx.saved_tensors
        dq, dk, dv = ctx.backend.backward(dout.contiguous(), q, k, v, out, lse, ctx.meta, ctx.scale)
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None, None, None


def attend(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    meta: AttnMeta,
    backend: AttentionBackend,
    scale: float | None = None,
) -> Tensor:
    """out [T, Hq, D] = attention of q [T, Hq, D] over k, v [S, Hkv, D] as `meta` allows."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    return _Attend.apply(q, k, v, meta, backend, scale)


class PackedAttention:
    """Attention bound to one batch's layout and a backend: ``attention(q, k, v) -> out``.

    Models take such a callable per forward and know nothing else about attention, so context
    parallelism can hand them a distributed implementation with the same call.
    """

    def __init__(self, meta: AttnMeta, backend: AttentionBackend) -> None:
        self.meta = meta
        self.backend = backend

    def __call__(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        return attend(q, k, v, self.meta, self.backend)
