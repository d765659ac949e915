"""The sdpa reference backend against torch's SDPA, the ring contract (LSE merge + block backward
with the merged out/LSE), slices of the packed sequence, and the backend registry (CPU)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from lvita_model.attention import (
    AttnMeta,
    Capabilities,
    FlashBackend,
    NpuBackend,
    SdpaBackend,
    TorchVarlenBackend,
    assert_supports,
    attend,
    get_backend,
    packed_meta,
)
from lvita_model.attention.base import layout_meta
from lvita_model.attention.registry import backend_available
from lvita_model.errors import AttentionBackendError

CU = (0, 5, 17, 18, 40)  # four documents, one of a single token
HEAD_DIM = 16


def _qkv(num_heads: int, num_kv_heads: int, dtype=torch.float32, seed: int = 0, rows=CU[-1]):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(rows, num_heads, HEAD_DIM, generator=gen, dtype=dtype)
    k = torch.randn(rows, num_kv_heads, HEAD_DIM, generator=gen, dtype=dtype)
    v = torch.randn(rows, num_kv_heads, HEAD_DIM, generator=gen, dtype=dtype)
    return q, k, v


def _sub_meta(meta: AttnMeta, q_index: torch.Tensor, k_index: torch.Tensor) -> AttnMeta:
    """Queries `q_index` against keys `k_index` of a packed sequence, (doc, order) form.

    The varlen fields count each document's selected rows (the sdpa reference reads only
    doc/order; they are filled so the meta stays well formed).
    """
    num_docs = len(meta.host_cu_seqlens_q) - 1

    def cu(doc: torch.Tensor) -> tuple[int, ...]:
        counts = torch.bincount(doc.long(), minlength=num_docs)
        return (0, *torch.cumsum(counts, 0).tolist())

    doc_q, doc_k = meta.doc_q[q_index], meta.doc_k[k_index]
    cu_q, cu_k = cu(doc_q), cu(doc_k)
    order_q, order_k = meta.order_q[q_index], meta.order_k[k_index]
    return layout_meta(cu_q, cu_k, doc_q, doc_k, order_q, order_k, causal=meta.causal)


def _sdpa_per_document(q, k, v, cu, causal: bool, scale: float):
    """out [T, Hq, D] and lse [Hq, T] from torch's SDPA, one document at a time."""
    outs, lses = [], []
    for a, b in zip(cu, cu[1:], strict=False):
        qd, kd, vd = (x[a:b].transpose(0, 1) for x in (q, k, v))  # [T, H, D] -> [H, T, D]
        outs.append(
            F.scaled_dot_product_attention(
                qd, kd, vd, is_causal=causal, scale=scale, enable_gqa=True
            ).transpose(0, 1)
        )
        groups = q.shape[1] // k.shape[1]
        scores = qd @ kd.repeat_interleave(groups, 0).transpose(1, 2) * scale  # [Hq, t, t]
        if causal:
            scores = scores.masked_fill(
                torch.ones(b - a, b - a, dtype=torch.bool).triu(1), -math.inf
            )
        lses.append(torch.logsumexp(scores, -1))
    return torch.cat(outs), torch.cat(lses, dim=1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("heads", [(4, 4), (4, 2)], ids=["mha", "gqa"])
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
def test_sdpa_matches_torch_sdpa_forward_and_backward(dtype, heads, causal):
    tol = 1e-5  # the reference computes in fp32 whatever the input dtype
    q, k, v = _qkv(*heads, dtype=dtype)
    scale = HEAD_DIM**-0.5
    meta = packed_meta(CU, causal=causal)
    backend = SdpaBackend()
    out, lse = backend.forward(q, k, v, meta, scale)
    ref_out, ref_lse = _sdpa_per_document(q, k, v, CU, causal, scale)
    assert out.dtype == dtype and lse.dtype == torch.float32 and lse.shape == (heads[0], CU[-1])
    torch.testing.assert_close(out, ref_out, atol=tol, rtol=tol)
    torch.testing.assert_close(lse, ref_lse.float(), atol=1e-5, rtol=1e-5)

    dout = torch.randn_like(q)
    leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    attend(*leaves, meta, backend).backward(dout)
    ref_leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    _sdpa_per_document(*ref_leaves, CU, causal, scale)[0].backward(dout)
    for got, ref in zip(leaves, ref_leaves, strict=True):
        assert got.grad.dtype == dtype
        torch.testing.assert_close(got.grad, ref.grad, atol=tol, rtol=tol)


def test_attend_default_scale_is_inverse_sqrt_head_dim():
    q, k, v = _qkv(2, 2)
    meta = packed_meta(CU, causal=True)
    out = attend(q, k, v, meta, SdpaBackend())
    torch.testing.assert_close(out, SdpaBackend().forward(q, k, v, meta, HEAD_DIM**-0.5)[0])
    assert not torch.allclose(out, SdpaBackend().forward(q, k, v, meta, 1.0)[0])


def test_rows_without_visible_keys_get_minus_inf_lse_and_zero_out():
    meta = packed_meta(CU, causal=True)
    q, k, v = _qkv(2, 1)
    keys = torch.arange(0, 5)  # only document 0's keys
    sub = _sub_meta(meta, torch.arange(CU[-1]), keys)
    out, lse = SdpaBackend().forward(q, k[keys], v[keys], sub, 0.25)
    seen = meta.doc_q == 0
    assert torch.isneginf(lse[:, ~seen]).all() and torch.isfinite(lse[:, seen]).all()
    assert (out[~seen] == 0).all() and out[seen].abs().sum() > 0
    dq, dk, dv = SdpaBackend().backward(
        torch.randn_like(q), q, k[keys], v[keys], out, lse, sub, 0.25
    )
    assert torch.isfinite(dq).all() and torch.isfinite(dk).all() and torch.isfinite(dv).all()
    assert (dq[~seen] == 0).all()


def _merge(out_a, lse_a, out_b, lse_b):
    """fp32 LSE merge of two key blocks; rows with lse = -inf in both stay (0, -inf)."""
    lse = torch.logaddexp(lse_a, lse_b)  # [Hq, T]
    safe = lse.masked_fill(torch.isneginf(lse), 0.0)
    w_a = torch.exp(lse_a - safe).transpose(0, 1)[..., None]  # [T, Hq, 1]
    w_b = torch.exp(lse_b - safe).transpose(0, 1)[..., None]
    return w_a * out_a.float() + w_b * out_b.float(), lse


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
def test_lse_merge_of_key_blocks_and_block_backward_with_merged_lse(causal):
    """The ring contract: forward per key block + merge == full; per-block backward with the
    merged out/LSE sums to the full gradients."""
    meta = packed_meta(CU, causal=causal)
    q, k, v = _qkv(4, 2, dtype=torch.float64, seed=3)
    scale, backend, rows = 0.3, SdpaBackend(), torch.arange(CU[-1])
    blocks = [torch.arange(0, 11), torch.arange(11, CU[-1])]  # splits document 1
    partial = []
    for keys in blocks:
        sub = _sub_meta(meta, rows, keys)
        partial.append((sub, *backend.forward(q, k[keys], v[keys], sub, scale)))
    # causal: the first 11 query rows see no key of the second block
    assert torch.isneginf(partial[1][2][:, :11]).all() == causal
    out, lse = _merge(partial[0][1], partial[0][2], partial[1][1], partial[1][2])
    full_out, full_lse = backend.forward(q, k, v, meta, scale)
    assert out.dtype == lse.dtype == torch.float32
    torch.testing.assert_close(out, full_out.float(), atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(lse, full_lse, atol=1e-6, rtol=1e-6)

    dout = torch.randn_like(q)
    dq = torch.zeros(q.shape, dtype=torch.float32)  # the reference returns fp32 grads
    dk_blocks, dv_blocks = [], []
    for (sub, _, _), keys in zip(partial, blocks, strict=True):
        dq_b, dk_b, dv_b = backend.backward(dout, q, k[keys], v[keys], out, lse, sub, scale)
        dq += dq_b
        dk_blocks.append(dk_b)
        dv_blocks.append(dv_b)
    full = backend.backward(dout, q, k, v, full_out, full_lse, meta, scale)
    torch.testing.assert_close(dq, full[0], atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(torch.cat(dk_blocks), full[1], atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(torch.cat(dv_blocks), full[2], atol=1e-6, rtol=1e-6)


def test_zigzag_query_slice_equals_rows_of_the_full_result():
    meta = packed_meta(CU, causal=True)
    q, k, v = _qkv(4, 2, seed=5)
    total = CU[-1]
    rows = torch.cat([torch.arange(30, total), torch.arange(0, 10)])  # tail chunk first
    sub = _sub_meta(meta, rows, torch.arange(total))
    backend, scale = SdpaBackend(), 0.25
    full_out, full_lse = backend.forward(q, k, v, meta, scale)
    out, lse = backend.forward(q[rows], k, v, sub, scale)
    torch.testing.assert_close(out, full_out[rows], atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(lse, full_lse[:, rows], atol=1e-6, rtol=1e-6)

    dout = torch.zeros_like(q)
    dout[rows] = torch.randn(len(rows), *q.shape[1:])
    full_dq = backend.backward(dout, q, k, v, full_out, full_lse, meta, scale)[0]
    dq = backend.backward(dout[rows], q[rows], k, v, out, lse, sub, scale)[0]
    torch.testing.assert_close(dq, full_dq[rows], atol=1e-6, rtol=1e-6)


def test_block_rows_chunking_does_not_change_results():
    meta = packed_meta(CU, causal=True)
    q, k, v = _qkv(4, 2, seed=7)
    dout = torch.randn_like(q)
    results = []
    for block_rows in (1, 7, 1024):
        backend = SdpaBackend(block_rows=block_rows)
        out, lse = backend.forward(q, k, v, meta, 0.25)
        results.append((out, lse, *backend.backward(dout, q, k, v, out, lse, meta, 0.25)))
    for other in results[:2]:
        for got, ref in zip(other, results[2], strict=True):
            torch.testing.assert_close(got, ref, atol=1e-6, rtol=1e-6)


# ---------------------------------------------------------------------------------- registry


def test_auto_picks_sdpa_on_cpu():
    assert isinstance(get_backend("auto", "cpu"), SdpaBackend)
    assert isinstance(get_backend("auto", torch.device("cpu")), SdpaBackend)
    assert isinstance(get_backend("sdpa", "cpu"), SdpaBackend)
    if not torch.cuda.is_available():
        assert isinstance(get_backend(), SdpaBackend)


@pytest.mark.parametrize(
    "name,words",
    [
        ("flash", ["flash", "CUDA", "pip install 'lvita[flash]'"]),
        ("torch_varlen", ["CUDA"]),
        ("npu", ["Ascend", "npu"]),
    ],
)
def test_explicit_unavailable_backend_raises_with_a_reason(name, words):
    with pytest.raises(AttentionBackendError) as info:
        get_backend(name, "cpu")
    message = str(info.value)
    assert name in message and "sdpa" in message
    for word in words:
        assert word in message


def test_flash_without_flash_attn_says_how_to_install(monkeypatch):
    monkeypatch.setitem(__import__("sys").modules, "flash_attn", None)  # import -> ImportError
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    ok, reason = backend_available("flash", "cuda")
    assert not ok and "pip install 'lvita[flash]'" in reason and "not importable" in reason


def test_npu_device_string_without_torch_npu_raises_install_hint(monkeypatch):
    monkeypatch.setitem(__import__("sys").modules, "torch_npu", None)
    with pytest.raises(AttentionBackendError, match=r"torch_npu is not importable.*lvita\[npu\]"):
        get_backend("npu", "npu:0")
    assert isinstance(get_backend("auto", "npu:0"), SdpaBackend)  # falls back to the reference


def test_unknown_backend_name_lists_the_choices():
    with pytest.raises(AttentionBackendError, match="torch_varlen"):
        get_backend("xformers")


def test_assert_supports_names_the_missing_capability():
    assert_supports(SdpaBackend(), causal=True, varlen=True, lse=True, block_backward=True)
    assert_supports(FlashBackend, causal=True, block_backward=True, dtype=torch.bfloat16)
    assert_supports(NpuBackend, device="npu:1", dtype=torch.float16)
    with pytest.raises(AttentionBackendError, match="dtype"):
        assert_supports(TorchVarlenBackend, dtype=torch.float32)
    with pytest.raises(AttentionBackendError, match="'cpu'"):
        assert_supports(FlashBackend, device="cpu")

    class ForwardOnly(SdpaBackend):
        name = "forward_only"
        capabilities = Capabilities(
            causal=False,
            varlen=True,
            lse=True,
            block_backward=False,
            devices=("cpu",),
            dtypes=(torch.float32,),
        )

    assert_supports(ForwardOnly(), varlen=True, lse=True, device="cpu")
    with pytest.raises(AttentionBackendError, match="'block_backward'"):
        assert_supports(ForwardOnly(), lse=True, block_backward=True)
    with pytest.raises(AttentionBackendError, match="'causal'"):
        assert_supports(ForwardOnly(), causal=True)
