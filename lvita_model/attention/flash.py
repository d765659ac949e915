"""flash-attn 2.x varlen backend: the private block forward/backward that ring attention needs.

Forward calls ``flash_attn.flash_attn_interface._flash_attn_varlen_forward`` and backward
``_flash_attn_varlen_backward``: unlike the public ``flash_attn_varlen_func`` they return the
softmax LSE ([Hq, T] fp32) and accept an *external* out and LSE in backward, so a ring can pass
the merged output and LSE of all key blocks (the contract in `base`). GQA is native (k/v with
fewer heads; dK/dV come back with Hkv heads). ``causal=True`` is flash-attn's bottom-right
aligned causal mask (flash-attn >= 2.1), the same as `AttnMeta`'s.

The private functions' signatures drifted; the versions read (public source, not run here):

- 2.6.x: ``(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p,
  softmax_scale, causal, window_size=(-1, -1), softcap=0.0, alibi_slopes=None,
  return_softmax=False, block_table=None, leftpad_k=None, seqused_k=None)`` returning the
  8-tuple ``(out, q, k, v, out_padded, softmax_lse, S_dmask, rng_state)``; backward
  ``(dout, q, k, v, out, softmax_lse, dq, dk, dv, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
  max_seqlen_k, dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes,
  deterministic, rng_state=None)`` filling dq/dk/dv in place.
- 2.7/2.8: torch custom ops (``torch.library.custom_op``, whose ``inspect.signature`` is only
  ``(*args, **kwargs)``; the real one is on ``._init_fn``) with ``window_size_left`` /
  ``window_size_right`` instead of the tuple; forward returns the 4-tuple
  ``(out, softmax_lse, S_dmask, rng_state)``; backward mutates dq/dk/dv and returns softmax_d.

All of that is absorbed by `call_flash` (parameter names from the signature, every argument by
keyword, a required parameter it does not know is an error naming it) and `_split_forward`. An
older flash-attn (< 2.4) returned the LSE padded to [B, Hq, max_seqlen_q]; that is rejected
with a clear error (the `flash` extra pins flash-attn >= 2.6).

Rows that see no key: flash-attn writes out = 0 and lse = +inf (2.x non-split kernels; split
kernels use -inf). Forward normalizes both to -inf (the contract); backward maps -inf back to
+inf, because the backward kernel computes P = exp(S * scale - lse) and needs +inf to get P = 0
for such rows (a merged LSE of -inf would give inf / NaN otherwise).

Head dims that are not a multiple of 8 are zero-padded (the private API does not pad since
2.7); flash-attn supports head dims up to 256. Only fp16 / bf16 on CUDA (`capabilities`).
Verified: the glue, against fake modules with both signatures (tests/model/
test_attention_glue.py), and the same FA2 kernel family through torch's vendored copy
(`torch_varlen`, on an H100). Not verified: a real flash-attn install (none on the GPU machine;
tests/model/test_attention_gpu.py runs it wherever flash-attn is importable).
"""

from __future__ import annotations

import functools
import importlib
import inspect
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor
from torch.nn import functional as F

from lvita_model.attention.base import (
    AttentionBackend,
    AttnMeta,
    Capabilities,
    device_type,
    lse_for_kernel,
    lse_from_kernel,
)
from lvita_model.errors import AttentionBackendError

INTERFACE_MODULE = "flash_attn.flash_attn_interface"
INSTALL_HINT = "pip install 'lvita[flash]' (flash-attn >= 2.6; needs CUDA and an sm80+ GPU)"
MAX_HEAD_DIM = 256


def load_flash_varlen() -> tuple[Callable[..., Any], Callable[..., Any]]:
    """(forward, backward): flash-attn's private varlen block functions, imported lazily."""
    try:
        interface = importlib.import_module(INTERFACE_MODULE)
    except Exception as exc:  # ImportError, or a broken CUDA extension (OSError, RuntimeError)
        raise AttentionBackendError(
            f"flash-attn is not importable ({type(exc).__name__}: {exc}); {INSTALL_HINT}"
        ) from exc
    forward = getattr(interface, "_flash_attn_varlen_forward", None)
    backward = getattr(interface, "_flash_attn_varlen_backward", None)
    if forward is None or backward is None:
        raise AttentionBackendError(
            f"{INTERFACE_MODULE} has no _flash_attn_varlen_forward/_backward; "
            f"this flash-attn is not 2.x ({INSTALL_HINT})"
        )
    return forward, backward


@functools.lru_cache(maxsize=16)
def signature_parameters(fn: Callable[..., Any]) -> dict[str, bool]:
    """Parameter name -> required, looking through torch custom-op and functools wrappers."""
    candidates = (fn, getattr(fn, "_init_fn", None), inspect.unwrap(fn))
    for candidate in candidates:
        if candidate is None:
            continue
        try:
            parameters = inspect.signature(candidate).parameters.values()
        except (TypeError, ValueError):
            continue
        named = {
            p.name: p.default is inspect.Parameter.empty
            for p in parameters
            if p.kind not in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)
        }
        if named:
            return named
    schema = getattr(getattr(fn, "default", fn), "_schema", None)  # a torch.ops overload
    if schema is not None:
        return {a.name: not a.has_default_value() for a in schema.arguments}
    raise AttentionBackendError(f"cannot read the parameters of {fn!r}")


def call_flash(fn: Callable[..., Any], values: Mapping[str, Any]) -> Any:
    """Call one of flash-attn's private functions with every parameter it has, by keyword.

    `values` holds every argument any supported version may take (both ``window_size`` and
    ``window_size_left``/``_right``, ``softcap``, ``zero_tensors``, ...): only those the
    signature names are passed, the others keep their defaults. This is the one place that
    adapts to flash-attn's signature drift.
    """
    parameters = signature_parameters(fn)
    missing = [name for name, required in parameters.items() if required and name not in values]
    if missing:
        raise AttentionBackendError(
            f"{getattr(fn, '__name__', fn)} takes parameters this adapter does not know: "
            f"{missing}; supported flash-attn: 2.6 - 2.8"
        )
    return fn(**{name: values[name] for name in parameters if name in values})


def _common_values(meta: AttnMeta, scale: float) -> dict[str, Any]:
    return {
        "cu_seqlens_q": meta.cu_seqlens_q,
        "cu_seqlens_k": meta.cu_seqlens_k,
        "max_seqlen_q": meta.max_seqlen_q,
        "max_seqlen_k": meta.max_seqlen_k,
        "dropout_p": 0.0,
        "softmax_scale": scale,
        "causal": meta.causal,
        "window_size": (-1, -1),  # <= 2.6
        "window_size_left": -1,  # >= 2.7
        "window_size_right": -1,
        "softcap": 0.0,
        "alibi_slopes": None,
        "zero_tensors": False,
        "deterministic": False,
        "rng_state": None,
        "return_softmax": False,
        "block_table": None,
        "leftpad_k": None,
        "seqused_k": None,
    }


def _split_forward(result: Any, num_heads: int, num_rows: int) -> tuple[Tensor, Tensor]:
    """(out, lse) from the 8-tuple (<= 2.6) or 4-tuple (>= 2.7) the forward returns."""
    if not isinstance(result, (tuple, list)) or len(result) not in (4, 8):
        raise AttentionBackendError(
            f"unexpected _flash_attn_varlen_forward result ({type(result).__name__} of "
            f"{len(result) if isinstance(result, (tuple, list)) else '?'}); supported: 2.6 - 2.8"
        )
    out, lse = result[0], result[5 if len(result) == 8 else 1]
    if tuple(lse.shape) != (num_heads, num_rows):
        raise AttentionBackendError(
            f"flash-attn returned softmax_lse of shape {tuple(lse.shape)}, expected "
            f"[Hq, T] = {(num_heads, num_rows)} (flash-attn < 2.4 pads it; use >= 2.6)"
        )
    return out, lse


def pad_head_dim(x: Tensor, head_dim: int) -> Tensor:
    """[N, H, D] -> [N, H, D'] with D' the next multiple of 8 (zeros), contiguous."""
    padded = -(-head_dim // 8) * 8
    if padded == head_dim:
        return x.contiguous()
    return F.pad(x, (0, padded - head_dim)).contiguous()


def check_head_dim(head_dim: int) -> None:
    if head_dim > MAX_HEAD_DIM:
        raise AttentionBackendError(f"flash-attn supports head dim <= 256, got {head_dim}")


class FlashBackend(AttentionBackend):
    name = "flash"
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
            return False, f"flash-attn runs on CUDA devices only, not {kind!r}; {INSTALL_HINT}"
        if not torch.cuda.is_available():
            return False, f"no CUDA device is available; {INSTALL_HINT}"
        try:
            load_flash_varlen()
        except AttentionBackendError as exc:
            return False, str(exc)
        return True, "flash-attn varlen kernels importable"

    def forward(
        self, q: Tensor, k: Tensor, v: Tensor, meta: AttnMeta, scale: float
    ) -> tuple[Tensor, Tensor]:
        forward_fn, _ = load_flash_varlen()
        num_rows, num_heads, head_dim = q.shape
        check_head_dim(head_dim)
        values = _common_values(meta, scale)
        values.update(
            q=pad_head_dim(q, head_dim),
            k=pad_head_dim(k, head_dim),
            v=pad_head_dim(v, head_dim),
        )
        out, lse = _split_forward(call_flash(forward_fn, values), num_heads, num_rows)
        out = out[..., :head_dim]
        return out, lse_from_kernel(lse)  # empty rows: +inf -> -inf

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
        _, backward_fn = load_flash_varlen()
        head_dim = q.shape[-1]
        check_head_dim(head_dim)
        q_, k_, v_ = (pad_head_dim(x, head_dim) for x in (q, k, v))
        dq, dk, dv = torch.empty_like(q_), torch.empty_like(k_), torch.empty_like(v_)
        values = _common_values(meta, scale)
        values.update(
            dout=pad_head_dim(dout.to(q.dtype), head_dim),
            q=q_,
            k=k_,
            v=v_,
            out=pad_head_dim(out.to(q.dtype), head_dim),
            softmax_lse=lse_for_kernel(lse),  # +inf for rows that see no key: P = 0
            dq=dq,
            dk=dk,
            dv=dv,
        )
        call_flash(backward_fn, values)  # fills dq, dk, dv in place (all versions)
        return dq[..., :head_dim], dk[..., :head_dim], dv[..., :head_dim]
