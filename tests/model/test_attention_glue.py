"""Backend glue without hardware: fake ``flash_attn`` / ``torch_npu`` modules and fake aten ops
record the exact calls and compute with the sdpa reference, so both the arguments and the
results are checked (TND layout, host cumulative lengths, sparse modes, LSE conversions, the
flash signature drift, empty rows, the NPU 512K limit).

No ``from __future__ import annotations`` here: torch.library.custom_op reads the annotations.
"""

import math
import sys
import types

import pytest
import torch
from torch import Tensor

from lvita_model.attention import (
    AttnMeta,
    FlashBackend,
    NpuBackend,
    SdpaBackend,
    TorchVarlenBackend,
    attend,
    varlen_meta,
)
from lvita_model.attention import flash as flash_module
from lvita_model.attention import npu as npu_module
from lvita_model.attention import torch_varlen as torch_varlen_module
from lvita_model.errors import AttentionBackendError

REF = SdpaBackend()


# documents: q longer than k (first rows see nothing when causal), k longer, no keys at all
CU_Q, CU_K = (0, 6, 10, 13, 20), (0, 4, 12, 12, 19)


def _inputs(meta: AttnMeta, heads=(4, 2), head_dim=16, seed=0):
    gen = torch.Generator().manual_seed(seed)
    rows, keys = meta.host_cu_seqlens_q[-1], meta.host_cu_seqlens_k[-1]
    q = torch.randn(rows, heads[0], head_dim, generator=gen)
    k = torch.randn(keys, heads[1], head_dim, generator=gen)
    v = torch.randn(keys, heads[1], head_dim, generator=gen)
    return q, k, v, torch.randn(rows, heads[0], head_dim, generator=gen)


def _empty_rows(meta: AttnMeta) -> Tensor:
    mask = meta.doc_q[:, None] == meta.doc_k[None, :]
    if meta.causal:
        mask &= meta.order_k[None, :] <= meta.order_q[:, None]
    return ~mask.any(1)  # [T]


def _reference(q, k, v, dout, meta, scale):
    out, lse = REF.forward(q, k, v, meta, scale)
    return out, lse, REF.backward(dout, q, k, v, out, lse, meta, scale)


def _assert_matches_reference(backend, meta, q, k, v, dout, scale=0.3):
    ref_out, ref_lse, ref_grads = _reference(q, k, v, dout, meta, scale)
    out, lse = backend.forward(q, k, v, meta, scale)
    torch.testing.assert_close(out, ref_out, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(lse, ref_lse, atol=1e-6, rtol=1e-6)  # -inf rows included
    grads = backend.backward(dout, q, k, v, out, lse, meta, scale)
    for got, ref in zip(grads, ref_grads, strict=True):
        assert got.shape == ref.shape
        torch.testing.assert_close(got.float(), ref, atol=1e-5, rtol=1e-5)
    return out, lse


# ---------------------------------------------------------------------------------- flash-attn


class FlashFakes:
    """Records calls; computes with the reference; +inf LSE for empty rows like the 2.x kernel
    (or -inf, like the split kernels), and treats +inf in backward as 'row sees nothing'."""

    def __init__(self, empty_lse: float = math.inf):
        self.calls: list[tuple[str, dict]] = []
        self.empty_lse = empty_lse

    def forward(self, **kw) -> tuple[Tensor, Tensor]:
        self.calls.append(("forward", kw))
        meta = varlen_meta(
            kw["cu_seqlens_q"].tolist(), kw["cu_seqlens_k"].tolist(), causal=kw["causal"]
        )
        out, lse = REF.forward(kw["q"], kw["k"], kw["v"], meta, kw["softmax_scale"])
        return out, lse.masked_fill(torch.isneginf(lse), self.empty_lse)

    def backward(self, **kw) -> None:
        self.calls.append(("backward", kw))
        meta = varlen_meta(
            kw["cu_seqlens_q"].tolist(), kw["cu_seqlens_k"].tolist(), causal=kw["causal"]
        )
        lse = kw["softmax_lse"].masked_fill(torch.isposinf(kw["softmax_lse"]), -math.inf)
        grads = REF.backward(
            kw["dout"], kw["q"], kw["k"], kw["v"], kw["out"], lse, meta, kw["softmax_scale"]
        )
        for buffer, grad in zip((kw["dq"], kw["dk"], kw["dv"]), grads, strict=True):
            buffer.copy_(grad)


ACTIVE = {"fakes": FlashFakes()}


def flash_26_module() -> types.ModuleType:
    """flash-attn 2.6.x: plain functions, window_size tuple, 8-tuple forward result."""
    fakes = ACTIVE["fakes"]

    def _flash_attn_varlen_forward(
        q,
        k,
        v,
        cu_seqlens_q,
        cu_seqlens_k,
        max_seqlen_q,
        max_seqlen_k,
        dropout_p,
        softmax_scale,
        causal,
        window_size=(-1, -1),
        softcap=0.0,
        alibi_slopes=None,
        return_softmax=False,
        block_table=None,
        leftpad_k=None,
        seqused_k=None,
    ):
        kw = dict(locals())
        out, lse = fakes.forward(**kw)
        return out, q, k, v, out, lse, None, torch.zeros(2, dtype=torch.int64)

    def _flash_attn_varlen_backward(
        dout,
        q,
        k,
        v,
        out,
        softmax_lse,
        dq,
        dk,
        dv,
        cu_seqlens_q,
        cu_seqlens_k,
        max_seqlen_q,
        max_seqlen_k,
        dropout_p,
        softmax_scale,
        causal,
        window_size,
        softcap,
        alibi_slopes,
        deterministic,
        rng_state=None,
    ):
        fakes.backward(**dict(locals()))
        return dq, dk, dv, torch.empty(0)

    module = types.ModuleType("flash_attn.flash_attn_interface")
    module._flash_attn_varlen_forward = _flash_attn_varlen_forward
    module._flash_attn_varlen_backward = _flash_attn_varlen_backward
    return module


@torch.library.custom_op("lvita_test::flash_varlen_forward_28", mutates_args=())
def _forward_28(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    cu_seqlens_q: Tensor,
    cu_seqlens_k: Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    dropout_p: float,
    softmax_scale: float,
    causal: bool,
    window_size_left: int = -1,
    window_size_right: int = -1,
    softcap: float = 0.0,
    alibi_slopes: Tensor | None = None,
    return_softmax: bool = False,
    block_table: Tensor | None = None,
    leftpad_k: Tensor | None = None,
    seqused_k: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    out, lse = ACTIVE["fakes"].forward(**dict(locals()))
    return out.clone(), lse.clone(), torch.empty(0), torch.zeros(2, dtype=torch.int64)


@torch.library.custom_op("lvita_test::flash_varlen_backward_28", mutates_args=("dq", "dk", "dv"))
def _backward_28(
    dout: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    out: Tensor,
    softmax_lse: Tensor,
    dq: Tensor | None,
    dk: Tensor | None,
    dv: Tensor | None,
    cu_seqlens_q: Tensor,
    cu_seqlens_k: Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    dropout_p: float,
    softmax_scale: float,
    causal: bool,
    window_size_left: int,
    window_size_right: int,
    softcap: float,
    alibi_slopes: Tensor | None,
    deterministic: bool,
    rng_state: Tensor | None = None,
) -> Tensor:
    ACTIVE["fakes"].backward(**dict(locals()))
    return torch.empty(0)


def flash_28_module() -> types.ModuleType:
    """flash-attn 2.7/2.8: torch custom ops, window_size_left/right + softcap, 4-tuple."""
    module = types.ModuleType("flash_attn.flash_attn_interface")
    module._flash_attn_varlen_forward = _forward_28
    module._flash_attn_varlen_backward = _backward_28
    return module


def _install_flash(monkeypatch, interface: types.ModuleType) -> None:
    package = types.ModuleType("flash_attn")
    package.flash_attn_interface = interface
    monkeypatch.setitem(sys.modules, "flash_attn", package)
    monkeypatch.setitem(sys.modules, "flash_attn.flash_attn_interface", interface)


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize(
    "style,empty_lse", [("2.6", math.inf), ("2.8", math.inf), ("2.8", -math.inf)]
)
def test_flash_glue_matches_reference_for_both_signatures(monkeypatch, style, empty_lse, causal):
    ACTIVE["fakes"] = fakes = FlashFakes(empty_lse)
    _install_flash(monkeypatch, flash_26_module() if style == "2.6" else flash_28_module())
    meta = varlen_meta(CU_Q, CU_K, causal=causal)
    q, k, v, dout = _inputs(meta)
    out, lse = _assert_matches_reference(FlashBackend(), meta, q, k, v, dout)
    empty = _empty_rows(meta)
    assert empty.any() and torch.isneginf(lse[:, empty]).all()  # normalized, whatever flash gave

    (_, fwd), (_, bwd) = fakes.calls
    for call in (fwd, bwd):
        assert (
            call["cu_seqlens_q"] is meta.cu_seqlens_q and call["cu_seqlens_k"] is meta.cu_seqlens_k
        )
        assert (call["max_seqlen_q"], call["max_seqlen_k"]) == (
            meta.max_seqlen_q,
            meta.max_seqlen_k,
        )
        assert call["causal"] is causal and call["softmax_scale"] == 0.3 and call["dropout_p"] == 0
        if style == "2.6":
            assert call["window_size"] == (-1, -1) and "window_size_left" not in call
        else:
            assert (call["window_size_left"], call["window_size_right"], call["softcap"]) == (
                -1,
                -1,
                0.0,
            )
        assert call["alibi_slopes"] is None
    assert fwd["k"].shape[1] == 2  # GQA is native: k keeps its 2 heads
    assert bwd["dk"].shape == k.shape and bwd["dq"].shape == q.shape
    # backward hands the kernel +inf (not -inf) for rows that see no key
    assert torch.isposinf(bwd["softmax_lse"][:, empty]).all()
    torch.testing.assert_close(bwd["softmax_lse"][:, ~empty], lse[:, ~empty])
    assert bwd["deterministic"] is False and bwd["rng_state"] is None


def test_flash_pads_head_dims_that_are_not_a_multiple_of_8(monkeypatch):
    ACTIVE["fakes"] = fakes = FlashFakes()
    _install_flash(monkeypatch, flash_28_module())
    meta = varlen_meta(CU_Q, CU_Q, causal=True)
    q, k, v, dout = _inputs(meta, head_dim=12)
    _assert_matches_reference(FlashBackend(), meta, q, k, v, dout)
    assert fakes.calls[0][1]["q"].shape[-1] == 16 and fakes.calls[1][1]["dout"].shape[-1] == 16


def test_flash_attend_end_to_end_through_autograd(monkeypatch):
    ACTIVE["fakes"] = FlashFakes()
    _install_flash(monkeypatch, flash_26_module())
    meta = varlen_meta(CU_Q, CU_Q, causal=True)
    tensors = _inputs(meta)
    grads = []
    for backend in (FlashBackend(), REF):
        leaves = [x.clone().requires_grad_() for x in tensors[:3]]
        attend(*leaves, meta, backend, scale=0.3).backward(tensors[3])
        grads.append([x.grad for x in leaves])
    for got, ref in zip(*grads, strict=True):
        torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)


def test_flash_unknown_required_parameter_is_named(monkeypatch):
    module = flash_26_module()

    def _flash_attn_varlen_forward(
        q,
        k,
        v,
        cu_seqlens_q,
        cu_seqlens_k,
        max_seqlen_q,
        max_seqlen_k,
        dropout_p,
        softmax_scale,
        causal,
        sink_tokens,
    ):
        raise AssertionError("must not be called")

    module._flash_attn_varlen_forward = _flash_attn_varlen_forward
    _install_flash(monkeypatch, module)
    meta = varlen_meta(CU_Q, CU_Q, causal=True)
    with pytest.raises(AttentionBackendError, match="sink_tokens"):
        FlashBackend().forward(*_inputs(meta)[:3], meta, 0.3)


def test_flash_rejects_padded_lse_of_old_versions(monkeypatch):
    module = flash_26_module()
    meta = varlen_meta(CU_Q, CU_Q, causal=False)

    def _flash_attn_varlen_forward(
        q,
        k,
        v,
        cu_seqlens_q,
        cu_seqlens_k,
        max_seqlen_q,
        max_seqlen_k,
        dropout_p,
        softmax_scale,
        causal,
    ):
        lse = torch.zeros(len(cu_seqlens_q) - 1, q.shape[1], max_seqlen_q)  # [B, Hq, max_q]
        return q, q, k, v, q, lse, None, None

    module._flash_attn_varlen_forward = _flash_attn_varlen_forward
    _install_flash(monkeypatch, module)
    with pytest.raises(AttentionBackendError, match=r"\[Hq, T\]"):
        FlashBackend().forward(*_inputs(meta)[:3], meta, 0.3)


def test_flash_broken_install_is_reported_not_raised(monkeypatch):
    class Broken(types.ModuleType):
        def __getattr__(self, name):
            raise OSError("libcudart.so.12: cannot open shared object file")

    monkeypatch.setitem(sys.modules, "flash_attn", Broken("flash_attn"))
    monkeypatch.delitem(sys.modules, "flash_attn.flash_attn_interface", raising=False)
    with pytest.raises(AttentionBackendError, match="not importable"):
        flash_module.load_flash_varlen()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    ok, reason = FlashBackend.is_available("cuda")
    assert not ok and "lvita[flash]" in reason


def test_signature_parameters_sees_through_custom_ops():
    params = flash_module.signature_parameters(_forward_28)
    assert params["softcap"] is False and params["q"] is True and "window_size" not in params
    schema_params = flash_module.signature_parameters(torch.ops.lvita_test.flash_varlen_forward_28)
    assert list(schema_params) == list(params)


# ------------------------------------------------------------------------------------ torch_npu


class NpuFake(types.ModuleType):
    """torch_npu with the two fused-attention functions; fully masked rows get garbage."""

    def __init__(self):
        super().__init__("torch_npu")
        self.calls: list[tuple[str, tuple, dict]] = []

    @staticmethod
    def _meta(kw) -> AttnMeta:
        assert kw["sparse_mode"] in (0, 3)
        cu_q, cu_k = (0, *kw["actual_seq_qlen"]), (0, *kw["actual_seq_kvlen"])
        return varlen_meta(cu_q, cu_k, causal=kw["sparse_mode"] == 3)

    def npu_fusion_attention(self, query, key, value, head_num, input_layout, **kw):
        self.calls.append(("forward", (query, key, value, head_num, input_layout), kw))
        out, lse = REF.forward(query, key, value, self._meta(kw), kw["scale"])
        empty = torch.isneginf(lse).transpose(0, 1)  # [T, Hq]
        out[empty] = 7.0  # undocumented kernel behaviour for rows that see nothing
        lse_tn = lse.transpose(0, 1).masked_fill(empty, 0.0)  # [T, Hq]
        softmax_max = (lse_tn - 0.5)[..., None].expand(-1, -1, 8).contiguous()
        softmax_sum = torch.full_like(softmax_max, math.exp(0.5))
        return out, softmax_max, softmax_sum, torch.empty(0), 0, 0, 0

    def npu_fusion_attention_grad(self, query, key, value, dy, head_num, input_layout, **kw):
        self.calls.append(("backward", (query, key, value, dy, head_num, input_layout), kw))
        lse = (kw["softmax_max"][..., 0] + torch.log(kw["softmax_sum"][..., 0])).transpose(0, 1)
        lse = lse.masked_fill(torch.isposinf(lse), -math.inf)
        grads = REF.backward(
            dy, query, key, value, kw["attention_in"], lse, self._meta(kw), kw["scale_value"]
        )
        return (*grads, torch.empty(0))


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
def test_npu_glue_tnd_call_and_lse_conversion(monkeypatch, causal):
    fake = NpuFake()
    monkeypatch.setitem(sys.modules, "torch_npu", fake)
    meta = varlen_meta(CU_Q, CU_K, causal=causal)
    q, k, v, dout = _inputs(meta)
    out, lse = _assert_matches_reference(NpuBackend(), meta, q, k, v, dout)

    (_, fwd_args, fwd), (_, bwd_args, bwd) = fake.calls
    assert fwd_args[3:] == (4, "TND") and bwd_args[4:] == (4, "TND")
    assert fwd_args[1].shape == k.shape  # GQA native: 2 KV heads in TND
    assert torch.equal(bwd_args[3], dout)
    for call in (fwd, bwd):
        assert call["actual_seq_qlen"] == CU_Q[1:] and call["actual_seq_kvlen"] == CU_K[1:]
        assert all(type(x) is int for x in call["actual_seq_qlen"])
        assert call["keep_prob"] == 1.0
        if causal:
            mask = call["atten_mask"]
            assert call["sparse_mode"] == 3 and mask.shape == (2048, 2048)
            assert mask.dtype == torch.bool and torch.equal(mask, torch.ones_like(mask).triu(1))
        else:
            assert call["sparse_mode"] == 0 and call["atten_mask"] is None
    assert fwd["scale"] == 0.3 and bwd["scale_value"] == 0.3
    # the external (merged) LSE goes in as max = lse, sum = 1, [T, Hq, 8]
    assert bwd["softmax_max"].shape == (q.shape[0], 4, 8)
    assert torch.equal(bwd["softmax_sum"], torch.ones_like(bwd["softmax_sum"]))
    finite = torch.isfinite(lse).transpose(0, 1)
    expected_max = lse.transpose(0, 1)[..., None].expand(-1, -1, 8)
    assert torch.equal(bwd["softmax_max"][finite], expected_max[finite])
    assert torch.isposinf(bwd["softmax_max"][~finite]).all()
    assert torch.equal(bwd["attention_in"], out)


def test_npu_blanks_rows_without_keys_whatever_the_kernel_writes(monkeypatch):
    monkeypatch.setitem(sys.modules, "torch_npu", NpuFake())
    meta = varlen_meta(CU_Q, CU_K, causal=True)
    q, k, v, _ = _inputs(meta)
    out, lse = NpuBackend().forward(q, k, v, meta, 0.3)
    empty = _empty_rows(meta)
    assert [tuple(r) for r in npu_module.empty_query_rows(meta)] == [(0, 2), (10, 13)]
    assert empty.nonzero().flatten().tolist() == [0, 1, 10, 11, 12]
    assert (out[empty] == 0).all() and torch.isneginf(lse[:, empty]).all()
    assert torch.isfinite(lse[:, ~empty]).all()


def test_npu_causal_mask_is_built_once_per_device(monkeypatch):
    fake = NpuFake()
    monkeypatch.setitem(sys.modules, "torch_npu", fake)
    meta = varlen_meta(CU_Q, CU_Q, causal=True)
    q, k, v, _ = _inputs(meta)
    NpuBackend().forward(q, k, v, meta, 0.3)
    NpuBackend().forward(q, k, v, meta, 0.3)
    first, second = (call[2]["atten_mask"] for call in fake.calls)
    assert first is second is npu_module.causal_mask(torch.device("cpu"))


def test_npu_rejects_sequences_over_512k_tokens(monkeypatch):
    fake = NpuFake()
    monkeypatch.setitem(sys.modules, "torch_npu", fake)
    limit = npu_module.MAX_TOKENS_PER_SEQUENCE
    assert limit == 524288
    at_limit = varlen_meta((0, 3, 3 + limit), (0, 3, 3 + limit), causal=True)
    npu_module.check_sequence_lengths(at_limit)  # exactly 512K is allowed
    over = varlen_meta((0, 3, 4 + limit), (0, 3, 4 + limit), causal=True)
    q = torch.zeros(4, 1, 16)
    with pytest.raises(AttentionBackendError, match=r"524288.*524289.*context parallelism"):
        NpuBackend().forward(q, q, q, over, 0.3)
    with pytest.raises(AttentionBackendError, match="chunked"):
        NpuBackend().backward(q, q, q, q, q, torch.zeros(1, 4), over, 0.3)
    assert fake.calls == []


def test_npu_softmax_stats_round_trip():
    lse = torch.tensor([[0.5, -math.inf, 3.0], [1.0, 2.0, -math.inf]])  # [Hq=2, T=3]
    softmax_max, softmax_sum = npu_module.softmax_stats_from_lse(lse)
    assert softmax_max.shape == (3, 2, 8) and softmax_max.is_contiguous()
    back = npu_module.lse_from_softmax_stats(softmax_max, softmax_sum)
    torch.testing.assert_close(back, lse.masked_fill(torch.isneginf(lse), math.inf))
    stats = (torch.full((3, 2, 8), 1.0), torch.full((3, 2, 8), math.e))
    torch.testing.assert_close(npu_module.lse_from_softmax_stats(*stats), torch.full((2, 3), 2.0))


def test_npu_unavailable_without_torch_npu_or_device(monkeypatch):
    monkeypatch.setitem(sys.modules, "torch_npu", None)
    ok, reason = NpuBackend.is_available("npu")
    assert not ok and "lvita[npu]" in reason
    monkeypatch.setitem(sys.modules, "torch_npu", NpuFake())
    ok, reason = NpuBackend.is_available("npu:0")
    assert not ok and "no NPU" in reason  # plain torch has no torch.npu


# ---------------------------------------------------------------------------------- aten flash


def test_torch_varlen_argument_layout():
    meta = varlen_meta(CU_Q, CU_K, causal=True)
    q, k, v, dout = _inputs(meta)
    args, kwargs = torch_varlen_module.forward_arguments(q, k, v, meta, 0.3)
    assert args[:3] == (q, k, v) and args[3] is meta.cu_seqlens_q and args[4] is meta.cu_seqlens_k
    assert args[5:] == (meta.max_seqlen_q, meta.max_seqlen_k, 0.0, True, False)
    assert kwargs == {"scale": 0.3}
    lse = torch.zeros(4, q.shape[0])
    args, kwargs = torch_varlen_module.backward_arguments(dout, q, k, v, q, lse, meta, 0.3)
    assert args[:6] == (dout, q, k, v, q, lse) and args[6] is meta.cu_seqlens_q
    assert args[8:12] == (meta.max_seqlen_q, meta.max_seqlen_k, 0.0, True)
    rng_state, unused = args[12:]
    assert rng_state.shape == (2,) and not rng_state.any() and unused.numel() == 0
    assert kwargs == {"scale": 0.3}


def _fake_aten_ops(calls: list):
    """aten._flash_attention_forward/_backward stand-ins over the reference (CPU)."""

    def forward(q, k, v, cu_q, cu_k, max_q, max_k, dropout_p, is_causal, debug, *, scale):
        calls.append(("forward", k.shape))
        out, lse = REF.forward(
            q, k, v, varlen_meta(cu_q.tolist(), cu_k.tolist(), causal=is_causal), scale
        )
        lse = lse.masked_fill(torch.isneginf(lse), math.inf)
        return out, lse, torch.zeros(2), torch.empty(0), torch.empty(0)

    def backward(dout, q, k, v, out, lse, cu_q, cu_k, max_q, max_k, p, is_causal, r, u, *, scale):
        calls.append(("backward", k.shape))
        meta = varlen_meta(cu_q.tolist(), cu_k.tolist(), causal=is_causal)
        lse = lse.masked_fill(torch.isposinf(lse), -math.inf)
        return tuple(g.to(q.dtype) for g in REF.backward(dout, q, k, v, out, lse, meta, scale))

    return lambda: (forward, backward)


@pytest.mark.parametrize("native_gqa", [True, False], ids=["native_gqa", "repeat_kv"])
def test_torch_varlen_glue_matches_reference(monkeypatch, native_gqa):
    calls: list = []
    monkeypatch.setattr(torch_varlen_module, "aten_flash_ops", _fake_aten_ops(calls))
    monkeypatch.setattr(torch_varlen_module, "NATIVE_GQA", native_gqa)
    meta = varlen_meta(CU_Q, CU_K, causal=True)
    q, k, v, dout = _inputs(meta)
    _assert_matches_reference(TorchVarlenBackend(), meta, q, k, v, dout)
    kv_heads = 2 if native_gqa else 4
    assert [shape[1] for _, shape in calls] == [kv_heads, kv_heads]


def test_torch_varlen_unavailable_on_cpu():
    ok, reason = TorchVarlenBackend.is_available("cpu")
    assert not ok and "CUDA" in reason
