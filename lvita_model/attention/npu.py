"""Ascend backend: ``torch_npu.npu_fusion_attention`` / ``npu_fusion_attention_grad`` in TND layout.

Forward::

    npu_fusion_attention(q [T, Hq, D], k [S, Hkv, D], v, head_num=Hq, input_layout="TND",
        atten_mask=<causal: 2048x2048 bool, True = masked>, scale=scale, keep_prob=1.0,
        actual_seq_qlen=cu_q[1:], actual_seq_kvlen=cu_k[1:], sparse_mode=3 | 0)
    -> (attention_out, softmax_max, softmax_sum, softmax_in, seed, offset, numels)

``actual_seq_*`` are the *cumulative* ends of the documents as host ints (not lengths, not a
device tensor: no device sync per layer). Causal uses sparse_mode 3 ("rightDownCausal",
bottom-right aligned like flash-attn and `AttnMeta`) with the compressed 2048x2048 upper-
triangular mask (``triu(ones, diagonal=1)``, True = not attended), built once per device; non-
causal passes no mask and sparse_mode 0. pre/next_tockens keep their defaults (2147483647).

softmax_max and softmax_sum are fp32 [T, Hq, 8] in TND (8 identical copies), with
softmax = exp(s - max) / sum, hence ``lse [Hq, T] = (max + log(sum))[..., 0].T``.

Backward ``npu_fusion_attention_grad(q, k, v, dy, head_num, input_layout, *, atten_mask,
softmax_max, softmax_sum, attention_in, scale_value, keep_prob, seed, offset, numels,
actual_seq_qlen, actual_seq_kvlen, sparse_mode) -> (dq, dk, dv, dpse, ...)`` recomputes
P = exp(s - max) / sum. To take an *external* (merged) LSE, pass softmax_max = lse broadcast to
[T, Hq, 8] and softmax_sum = 1: the same P, since lse = max + log(sum). MindSpeed's ring passes
the merged (max, sum) pair instead (npu_ring_attention_update); the two are equivalent. Rows
whose lse is -inf (no visible key) get max = +inf, so P = 0 there.

Rows that see no key (causal with a document's query part longer than its key part, or a
document with no keys) are set to out = 0, lse = -inf from the layout itself, whatever the
kernel writes there (its behaviour for such rows is not documented).

Hard limit: one call handles at most 512K (524288) tokens per sequence (S1, S2 <= 512K in the
operator's constraints); longer documents raise `AttentionBackendError` (use context
parallelism or chunked attention). GQA is native (N2 must divide N1). fp16 / bf16.

Sources: Ascend's torch_npu API pages (``npu_fusion_attention`` prototype with
``actual_seq_qlen`` / ``actual_seq_kvlen`` and TND, PyTorch 6.0 docs), the ``SparseMode`` enum
in MindSpeed's fusion_attention_v2.cpp (0 NO_MASK, 1 ALL_MASK, 2 LEFT_UP_CAUSAL,
3 RIGHT_DOWN_CAUSAL), op-plugin's meta registration of ``npu_fusion_attention_grad`` (the
keyword names above), the [T, N, 8] softmax_max shape from the RingAttentionUpdate docs, the
512K range from MindSpore's speed_fusion_attention docs. Not confirmed (no NPU here): the
actual_seq_* accepted as a tuple rather than a list (lists are what the docs' examples use),
that pre/next_tockens are ignored under sparse_mode 3, the kernel's output for fully masked
rows, and head-dim limits (documented elsewhere as a multiple of 16, <= 512). The glue is
tested against a fake ``torch_npu`` (tests/model/test_attention_glue.py).
"""

from __future__ import annotations

import importlib
import math
from types import ModuleType

import torch
from torch import Tensor

from lvita_model.attention.base import (
    AttentionBackend,
    AttnMeta,
    Capabilities,
    device_type,
    lse_for_kernel,
)
from lvita_model.errors import AttentionBackendError

MAX_TOKENS_PER_SEQUENCE = 512 * 1024
CAUSAL_MASK_SIZE = 2048
SPARSE_NO_MASK = 0
SPARSE_RIGHT_DOWN_CAUSAL = 3
SOFTMAX_COPIES = 8
INSTALL_HINT = "pip install 'lvita[npu]' (torch-npu matching your torch and CANN) on an Ascend host"

_causal_masks: dict[str, Tensor] = {}


def load_torch_npu() -> ModuleType:
    """The torch_npu module, imported lazily."""
    try:
        return importlib.import_module("torch_npu")
    except Exception as exc:  # ImportError, or a broken CANN install (OSError, RuntimeError)
        raise AttentionBackendError(
            f"torch_npu is not importable ({type(exc).__name__}: {exc}); {INSTALL_HINT}"
        ) from exc


def causal_mask(device: torch.device) -> Tensor:
    """bool [2048, 2048], True above the diagonal (masked): sparse_mode 3's compressed mask."""
    key = str(device)
    mask = _causal_masks.get(key)
    if mask is None:
        ones = torch.ones(CAUSAL_MASK_SIZE, CAUSAL_MASK_SIZE, dtype=torch.bool, device=device)
        mask = _causal_masks[key] = torch.triu(ones, diagonal=1)
    return mask


def check_sequence_lengths(meta: AttnMeta) -> None:
    """Raise if one document's queries or keys exceed what one fused call takes (512K)."""
    for side, cu in (("query", meta.host_cu_seqlens_q), ("key", meta.host_cu_seqlens_k)):
        longest = max((b - a for a, b in zip(cu, cu[1:], strict=False)), default=0)
        if longest > MAX_TOKENS_PER_SEQUENCE:
            raise AttentionBackendError(
                f"npu_fusion_attention takes at most {MAX_TOKENS_PER_SEQUENCE} tokens per "
                f"sequence per call, got a {side} sequence of {longest}: shard it with context "
                "parallelism (CP >= 2) or use chunked attention"
            )


def mask_arguments(meta: AttnMeta, device: torch.device) -> dict[str, object]:
    """atten_mask / sparse_mode for the fused call: causal = compressed mask + mode 3."""
    if meta.causal:
        return {"atten_mask": causal_mask(device), "sparse_mode": SPARSE_RIGHT_DOWN_CAUSAL}
    return {"atten_mask": None, "sparse_mode": SPARSE_NO_MASK}


def sequence_arguments(meta: AttnMeta) -> dict[str, tuple[int, ...]]:
    """actual_seq_qlen / actual_seq_kvlen: cumulative document ends as host ints."""
    return {
        "actual_seq_qlen": tuple(meta.host_cu_seqlens_q[1:]),
        "actual_seq_kvlen": tuple(meta.host_cu_seqlens_k[1:]),
    }


def lse_from_softmax_stats(softmax_max: Tensor, softmax_sum: Tensor) -> Tensor:
    """[T, Hq, 8] max and sum (TND) -> lse [Hq, T] fp32 = max + log(sum)."""
    if softmax_max.dim() == 3:
        softmax_max, softmax_sum = softmax_max[..., 0], softmax_sum[..., 0]  # [T, Hq]
    lse = softmax_max.float() + torch.log(softmax_sum.float())
    return lse.transpose(0, 1).contiguous()  # [T, Hq] -> [Hq, T]


def softmax_stats_from_lse(lse: Tensor) -> tuple[Tensor, Tensor]:
    """lse [Hq, T] -> (softmax_max, softmax_sum) [T, Hq, 8] with max = lse, sum = 1.

    -inf (a row that sees no key) becomes +inf so that the kernel's P = exp(s - max) is 0.
    """
    lse = lse_for_kernel(lse)
    # [Hq, T] -> [T, Hq] -> [T, Hq, 8]
    softmax_max = lse.transpose(0, 1).unsqueeze(-1).expand(-1, -1, SOFTMAX_COPIES).contiguous()
    return softmax_max, torch.ones_like(softmax_max)


def empty_query_rows(meta: AttnMeta) -> list[tuple[int, int]]:
    """[start, end) ranges of query rows that see no key (bottom-right causal / no keys)."""
    ranges = []
    cu_q, cu_k = meta.host_cu_seqlens_q, meta.host_cu_seqlens_k
    for doc in range(len(cu_q) - 1):
        q0, q_len, k_len = cu_q[doc], cu_q[doc + 1] - cu_q[doc], cu_k[doc + 1] - cu_k[doc]
        empty = q_len if k_len == 0 else (max(0, q_len - k_len) if meta.causal else 0)
        if empty:
            ranges.append((q0, q0 + empty))
    return ranges


def _blank_empty_rows(out: Tensor, lse: Tensor, meta: AttnMeta) -> tuple[Tensor, Tensor]:
    """out = 0 and lse = -inf on rows that see no key; anything non-finite in lse -> -inf."""
    lse = lse.masked_fill(~torch.isfinite(lse), -math.inf)
    for start, end in empty_query_rows(meta):
        out[start:end] = 0
        lse[:, start:end] = -math.inf
    return out, lse


class NpuBackend(AttentionBackend):
    name = "npu"
    capabilities = Capabilities(
        causal=True,
        varlen=True,
        lse=True,
        block_backward=True,
        devices=("npu",),
        dtypes=(torch.float16, torch.bfloat16),
    )

    @classmethod
    def is_available(cls, device: torch.device | str | None = None) -> tuple[bool, str]:
        kind = device_type("npu" if device is None else device)
        if kind != "npu":
            return False, f"npu_fusion_attention runs on Ascend NPUs only, not {kind!r}"
        try:
            load_torch_npu()
        except AttentionBackendError as exc:
            return False, str(exc)
        npu = getattr(torch, "npu", None)
        if npu is None or not npu.is_available():
            return False, f"torch_npu is installed but no NPU is available; {INSTALL_HINT}"
        return True, "torch_npu fused attention available"

    def forward(
        self, q: Tensor, k: Tensor, v: Tensor, meta: AttnMeta, scale: float
    ) -> tuple[Tensor, Tensor]:
        check_sequence_lengths(meta)
        torch_npu = load_torch_npu()
        result = torch_npu.npu_fusion_attention(
            q.contiguous(),
            k.contiguous(),
            v.contiguous(),
            q.shape[1],  # head_num = Hq
            "TND",
            scale=scale,
            keep_prob=1.0,
            **mask_arguments(meta, q.device),
            **sequence_arguments(meta),
        )
        out, softmax_max, softmax_sum = result[0], result[1], result[2]
        lse = lse_from_softmax_stats(softmax_max, softmax_sum)
        return _blank_empty_rows(out, lse, meta)

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
        check_sequence_lengths(meta)
        torch_npu = load_torch_npu()
        softmax_max, softmax_sum = softmax_stats_from_lse(lse)
        grads = torch_npu.npu_fusion_attention_grad(
            q.contiguous(),
            k.contiguous(),
            v.contiguous(),
            dout.to(q.dtype).contiguous(),
            q.shape[1],  # head_num = Hq
            "TND",
            softmax_max=softmax_max,
            softmax_sum=softmax_sum,
            attention_in=out.to(q.dtype).contiguous(),
            scale_value=scale,
            keep_prob=1.0,
            seed=0,
            offset=0,
            numels=0,
            **mask_arguments(meta, q.device),
            **sequence_arguments(meta),
        )
        return grads[0], grads[1], grads[2]
