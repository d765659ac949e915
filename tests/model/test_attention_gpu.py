"""Real CUDA kernels against the fp32 reference: flash-attn (when installed) and torch's aten
flash kernel (`torch_varlen`), forward out / LSE and block backward with a given out / LSE, on
packed documents (1, 77, 300, 1000 tokens), causal and not, MHA and GQA (14 / 2 heads), head
dims 64 and 128, bf16 and fp16, plus rows that see no key and the `attend` autograd path.

The reference runs on the same low-precision inputs, in fp32. Run as the GPU check:
``PYTHONPATH=. pytest -m gpu tests/model`` (imports only torch, pytest and lvita_model).
"""

import pytest
import torch

from lvita_model.attention import (
    FlashBackend,
    SdpaBackend,
    TorchVarlenBackend,
    attend,
    packed_meta,
    varlen_meta,
)
from lvita_model.attention.registry import backend_available, get_backend

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

CU = (0, 1, 78, 378, 1378)
TOLERANCE = {torch.bfloat16: 1e-2, torch.float16: 2e-3}  # out atol / rtol
REF = SdpaBackend(block_rows=512)
BACKENDS = {"flash": FlashBackend, "torch_varlen": TorchVarlenBackend}


@pytest.fixture(params=list(BACKENDS))
def backend(request):
    ok, reason = backend_available(request.param, "cuda")
    if not ok:
        pytest.skip(reason)
    return BACKENDS[request.param]()


def _inputs(rows, keys, heads, head_dim, dtype, seed=0):
    gen = torch.Generator(device="cuda").manual_seed(seed)

    def rand(n, h):
        return torch.randn(n, h, head_dim, generator=gen, device="cuda", dtype=dtype)

    return rand(rows, heads[0]), rand(keys, heads[1]), rand(keys, heads[1]), rand(rows, heads[0])


def _assert_grad_close(got, ref, name):
    error = (got.float() - ref.float()).abs().max().item()
    scale = ref.float().abs().max().item()
    assert error <= 2e-2 * scale + 1e-4, f"{name}: max error {error:.3g} vs max |ref| {scale:.3g}"


def _check(backend, meta, q, k, v, dout, scale):
    ref_out, ref_lse = REF.forward(q, k, v, meta, scale)
    ref_grads = REF.backward(dout, q, k, v, ref_out, ref_lse, meta, scale)
    out, lse = backend.forward(q, k, v, meta, scale)
    assert out.shape == q.shape and out.dtype == q.dtype
    assert lse.shape == (q.shape[1], q.shape[0]) and lse.dtype == torch.float32
    tol = TOLERANCE[q.dtype]
    torch.testing.assert_close(out.float(), ref_out.float(), atol=tol, rtol=tol)
    torch.testing.assert_close(lse, ref_lse, atol=1e-3, rtol=0)  # -inf rows must match too
    grads = backend.backward(dout, q, k, v, out, lse, meta, scale)
    for name, got, ref, x in zip("qkv", grads, ref_grads, (q, k, v), strict=True):
        assert got.shape == x.shape and torch.isfinite(got).all()
        _assert_grad_close(got, ref, f"d{name}")
    return lse


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("heads", [(14, 14), (14, 2)], ids=["mha", "gqa"])
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
def test_kernel_matches_reference_on_packed_documents(backend, causal, heads, head_dim, dtype):
    meta = packed_meta(CU, causal=causal, device="cuda")
    q, k, v, dout = _inputs(CU[-1], CU[-1], heads, head_dim, dtype)
    lse = _check(backend, meta, q, k, v, dout, head_dim**-0.5)
    assert torch.isfinite(lse).all()


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
def test_rows_that_see_no_key(backend, causal):
    """Query part longer than the key part (bottom-right causal: first rows see nothing),
    key part longer, and a document without keys: lse = -inf, out = 0, finite grads."""
    meta = varlen_meta((0, 50, 150, 160, 260), (0, 30, 230, 230, 330), causal=causal, device="cuda")
    q, k, v, dout = _inputs(260, 330, (14, 2), 64, torch.bfloat16, seed=1)
    lse = _check(backend, meta, q, k, v, dout, 0.125)
    assert torch.isneginf(lse[:, 150:160]).all()
    assert torch.isneginf(lse[:, :20]).all() == causal
    out, _ = backend.forward(q, k, v, meta, 0.125)
    assert (out[150:160] == 0).all()


def test_block_backward_with_merged_lse_sums_to_full_gradients(backend):
    """The ring contract on the real kernel: two key blocks, merged out / LSE, per-block
    backward with the merged values sums to the full backward."""
    meta = packed_meta((0, 700, 1378), causal=False, device="cuda")
    q, k, v, dout = _inputs(1378, 1378, (14, 2), 128, torch.bfloat16, seed=2)
    # keys [0, 400) hold 400 keys of document 0 and none of document 1 (its rows get -inf)
    blocks = [((0, 400), (0, 400, 400)), ((400, 1378), (0, 300, 978))]
    partial = []
    for (a, b), cu_k in blocks:
        sub = varlen_meta((0, 700, 1378), cu_k, causal=False, device="cuda")
        partial.append((sub, *backend.forward(q, k[a:b], v[a:b], sub, 0.1)))
    assert torch.isneginf(partial[0][2][:, 700:]).all()
    lse = torch.logaddexp(partial[0][2], partial[1][2])  # [Hq, T]
    out = sum(
        torch.exp(p_lse - lse).transpose(0, 1)[..., None] * p_out.float()
        for _, p_out, p_lse in partial
    ).to(q.dtype)
    full_out, full_lse = backend.forward(q, k, v, meta, 0.1)
    torch.testing.assert_close(lse, full_lse, atol=1e-3, rtol=0)
    torch.testing.assert_close(out.float(), full_out.float(), atol=1e-2, rtol=1e-2)
    full = backend.backward(dout, q, k, v, full_out, full_lse, meta, 0.1)
    grads = [
        backend.backward(dout, q, k[a:b], v[a:b], out, lse, sub, 0.1)
        for (sub, _, _), ((a, b), _) in zip(partial, blocks, strict=True)
    ]
    _assert_grad_close(grads[0][0].float() + grads[1][0].float(), full[0], "dq")
    _assert_grad_close(torch.cat([grads[0][1], grads[1][1]]), full[1], "dk")
    _assert_grad_close(torch.cat([grads[0][2], grads[1][2]]), full[2], "dv")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_attend_end_to_end(backend, dtype):
    meta = packed_meta(CU, causal=True, device="cuda")
    tensors = _inputs(CU[-1], CU[-1], (14, 2), 128, dtype, seed=3)
    results = []
    for impl in (backend, REF):
        leaves = [x.clone().requires_grad_() for x in tensors[:3]]
        out = attend(*leaves, meta, impl)
        (out.float() * tensors[3].float()).sum().backward()
        results.append((out, *(x.grad for x in leaves)))
    (out, *grads), (ref_out, *ref_grads) = results
    tol = TOLERANCE[dtype]
    torch.testing.assert_close(out.float(), ref_out.float(), atol=tol, rtol=tol)
    for name, got, ref in zip("qkv", grads, ref_grads, strict=True):
        assert got.dtype == dtype
        _assert_grad_close(got, ref, f"d{name}")


def test_auto_picks_a_kernel_backend_on_cuda():
    chosen = get_backend("auto", "cuda")
    flash_ok = backend_available("flash", "cuda")[0]
    varlen_ok = backend_available("torch_varlen", "cuda")[0]
    expected = "flash" if flash_ok else "torch_varlen" if varlen_ok else "sdpa"
    assert chosen.name == expected
