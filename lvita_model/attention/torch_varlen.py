"""torch's built-in flash kernel (FlashAttention-2, vendored in ATen) as a varlen block backend.

Forward ``torch.ops.aten._flash_attention_forward(q, k, v, cum_seq_q, cum_seq_k, max_q, max_k,
dropout_p, is_causal, return_debug_mask, *, scale)`` returns ``(output, softmax_logsumexp, ...)``
with the LSE as [Hq, T] fp32 for packed (varlen) input; backward
``torch.ops.aten._flash_attention_backward(grad_out, q, k, v, out, logsumexp, cum_seq_q,
cum_seq_k, max_q, max_k, dropout_p, is_causal, <rng tensor>, <rng tensor>, *, scale)`` takes the
output and LSE from the caller, which is the block backward a ring needs (merged out / LSE in,
this block's dQ, dK, dV out).

Schemas read on torch 2.13.0 (``torch.ops.aten._flash_attention_forward.default._schema``)::

    _flash_attention_forward(Tensor query, Tensor key, Tensor value, Tensor? cum_seq_q,
        Tensor? cum_seq_k, SymInt max_q, SymInt max_k, float dropout_p, bool is_causal,
        bool return_debug_mask, *, float? scale=None, SymInt? window_size_left=None,
        SymInt? window_size_right=None, Tensor? seqused_k=None, Tensor? alibi_slopes=None,
        Tensor? block_table=None, int? num_splits=None)
        -> (Tensor output, Tensor softmax_logsumexp, Tensor rng_state, Tensor unused,
            Tensor debug_attn_mask)
    _flash_attention_backward(Tensor grad_out, Tensor query, Tensor key, Tensor value,
        Tensor out, Tensor logsumexp, Tensor cum_seq_q, Tensor cum_seq_k, SymInt max_q,
        SymInt max_k, float dropout_p, bool is_causal, Tensor rng_state, Tensor unused, *,
        float? scale=None, SymInt? window_size_left=None, SymInt? window_size_right=None)
        -> (Tensor, Tensor, Tensor)

torch 2.11.0+cu130 (read on an H100) has the same two schemas, less the forward's
``block_table`` and ``num_splits`` keywords. Older releases name the two rng tensors
``philox_seed, philox_offset``; the positions are the same, and with dropout 0 the kernel does
not read them, so this module passes the placeholders torch 2.13's own ``varlen_attn`` passes
(uint64 zeros [2] and an empty tensor), positionally, and only the keyword ``scale`` (present
since torch 2.1). That is the one place that adapts to torch versions: `forward_arguments` /
`backward_arguments`, pure functions tested on CPU.

Why the aten ops and not ``torch.nn.attention.varlen.varlen_attn`` (public since 2.10; in 2.13
``varlen_attn(q, k, v, cu_seq_q, cu_seq_k, max_q, max_k, *, return_aux=AuxRequest(lse=True),
scale, window_size=(-1, -1) | (-1, 0) for causal, enable_gqa, ...)``; in 2.11 the same without
``enable_gqa``, ``seqused_k``, ``block_table``, ``num_splits``): its backward is autograd-only
and recomputes from the out/LSE it saved itself, so it cannot take a ring's merged out/LSE. It
wraps exactly these aten ops, so a torch that lacks them lacks varlen_attn too: there is
nothing to fall back to.

GQA: the vendored FA2 kernel takes k/v with fewer heads (torch 2.13's varlen_attn passes them
unexpanded; verified on torch 2.11, below). `NATIVE_GQA` says whether this module relies on
that; when False, KV heads are repeated for the call and dK/dV summed over each group. Rows that
see no key: out = 0 and an infinite lse from the kernel, normalized to -inf; backward maps -inf
back to +inf (see `flash`). CUDA only (sm80+), fp16 / bf16.

Verified on an H100 with torch 2.11.0+cu130 (tests/model/test_attention_gpu.py, 22 cases)
against the fp32 reference on the same bf16 / fp16 inputs: packed documents of 1, 77, 300 and
1000 tokens, causal and not, 14/14 and 14/2 heads (native GQA), head dims 64 and 128: out within
1e-2 (bf16) / 2e-3 (fp16), lse within 1e-3, dQ/dK/dV within 2% of max |grad|; rows that see no
key (bottom-right causal with more queries than keys, a document without keys) give out = 0 and
lse = -inf; per-key-block backward with a merged out / LSE sums to the full gradients.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from lvita_model.attention.base import (
    AttentionBackend,
    AttnMeta,
    Capabilities,
    device_type,
    expand_kv,
    lse_for_kernel,
    lse_from_kernel,
    reduce_kv_grad,
)
from lvita_model.attention.flash import check_head_dim, pad_head_dim
from lvita_model.errors import AttentionBackendError

NATIVE_GQA = True
"""Pass k/v with Hkv < Hq heads straight to the kernel (True) or repeat them (False)."""


def aten_flash_ops() -> tuple[Callable[..., Any], Callable[..., Any]]:
    """(forward, backward) aten flash ops of this torch build."""
    try:
        return torch.ops.aten._flash_attention_forward, torch.ops.aten._flash_attention_backward
    except (AttributeError, RuntimeError) as exc:
        raise AttentionBackendError(
            f"this torch ({torch.__version__}) has no aten::_flash_attention_forward/_backward"
        ) from exc


def forward_arguments(
    q: Tensor, k: Tensor, v: Tensor, meta: AttnMeta, scale: float
) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """Positional and keyword arguments of ``aten._flash_attention_forward``."""
    args = (
        q,
        k,
        v,
        meta.cu_seqlens_q,
        meta.cu_seqlens_k,
        meta.max_seqlen_q,
        meta.max_seqlen_k,
        0.0,  # dropout_p
        meta.causal,  # is_causal: bottom-right aligned, as AttnMeta's
        False,  # return_debug_mask
    )
    return args, {"scale": scale}


def rng_placeholders(device: torch.device) -> tuple[Tensor, Tensor]:
    """(rng_state | philox_seed, unused | philox_offset): unread with dropout 0."""
    rng_dtype = getattr(torch, "uint64", torch.int64)
    return torch.zeros(2, dtype=rng_dtype, device=device), torch.empty(0, device=device)


def backward_arguments(
    dout: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    out: Tensor,
    lse: Tensor,
    meta: AttnMeta,
    scale: float,
) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """Positional and keyword arguments of ``aten._flash_attention_backward``."""
    rng_state, unused = rng_placeholders(q.device)
    args = (
        dout,
        q,
        k,
        v,
        out,
        lse,
        meta.cu_seqlens_q,
        meta.cu_seqlens_k,
        meta.max_seqlen_q,
        meta.max_seqlen_k,
        0.0,  # dropout_p
        meta.causal,
        rng_state,
        unused,
    )
    return args, {"scale": scale}


class TorchVarlenBackend(AttentionBackend):
    name = "torch_varlen"
    capabilities = Capabilities(
        causal=True,
        varlen=True,
        lse=True,
        block_backward=True,
        devices=("cuda",),
        dtypes=(torch.float16, torch.bfloat16),
    )

    @classmethod
    def is_available(cls, device: torch.device | str | None = None) -> tuple[bool, str]:
        kind = device_type("cuda" if device is None else device)
        if kind != "cuda":
            return False, f"torch's flash kernel runs on CUDA devices only, not {kind!r}"
        if not torch.cuda.is_available():
            return False, "no CUDA device is available (needs a CUDA build of torch)"
        try:
            aten_flash_ops()
        except AttentionBackendError as exc:
            return False, str(exc)
        flash_built = getattr(torch.backends.cuda, "is_flash_attention_available", lambda: True)
        if not flash_built():
            return False, f"this torch ({torch.__version__}) was built without flash attention"
        index = torch.device(device).index if device is not None else None
        if torch.cuda.get_device_capability(index) < (8, 0):
            return False, "torch's flash kernel needs an sm80+ GPU (Ampere or newer)"
        return True, "aten flash attention available"

    def forward(
        self, q: Tensor, k: Tensor, v: Tensor, meta: AttnMeta, scale: float
    ) -> tuple[Tensor, Tensor]:
        forward_op, _ = aten_flash_ops()
        num_heads, head_dim = q.shape[1], q.shape[2]
        check_head_dim(head_dim)
        if not NATIVE_GQA:
            k, v = expand_kv(k, num_heads), expand_kv(v, num_heads)
        q, k, v = (pad_head_dim(x, head_dim) for x in (q, k, v))
        args, kwargs = forward_arguments(q, k, v, meta, scale)
        result = forward_op(*args, **kwargs)
        out, lse = result[0][..., :head_dim], result[1]
        if tuple(lse.shape) != (num_heads, q.shape[0]):
            raise AttentionBackendError(
                f"aten flash returned logsumexp of shape {tuple(lse.shape)}, expected "
                f"[Hq, T] = {(num_heads, q.shape[0])}"
            )
        return out, lse_from_kernel(lse)

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
    ) -> tuple[Tensor, Tensor, Tensor]:
        _, backward_op = aten_flash_ops()
        num_heads, head_dim = q.shape[1], q.shape[2]
        num_kv_heads = k.shape[1]
        check_head_dim(head_dim)
        if not NATIVE_GQA:
            k, v = expand_kv(k, num_heads), expand_kv(v, num_heads)
        dtype = q.dtype
        dout, q, k, v, out = (pad_head_dim(x.to(dtype), head_dim) for x in (dout, q, k, v, out))
        args, kwargs = backward_arguments(dout, q, k, v, out, lse_for_kernel(lse), meta, scale)
        dq, dk, dv = backward_op(*args, **kwargs)
        dk = reduce_kv_grad(dk[..., :head_dim], num_kv_heads)
        dv = reduce_kv_grad(dv[..., :head_dim], num_kv_heads)
        return dq[..., :head_dim], dk, dv
