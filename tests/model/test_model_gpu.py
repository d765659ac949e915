"""GPU checks of the whole decoder: our model with the fastest backend vs transformers' Qwen2.

Skipped without CUDA. Run with ``PYTHONPATH=. pytest -m gpu tests/model`` on a GPU machine.
"""

from __future__ import annotations

import pytest
import torch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU"),
]

transformers = pytest.importorskip("transformers")

from lvita_model.config import from_hf_config  # noqa: E402
from lvita_model.model import LongVitaForCausalLM  # noqa: E402


def pair(dtype: torch.dtype, backend: str):
    torch.manual_seed(0)
    hf_config = transformers.Qwen2Config(
        vocab_size=1024,
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        rope_theta=1e6,
        tie_word_embeddings=False,
    )
    hf = transformers.Qwen2ForCausalLM._from_config(hf_config, attn_implementation="sdpa")
    hf = hf.to("cuda", dtype).eval()
    ours = LongVitaForCausalLM(from_hf_config(hf.config.to_dict()), attention_backend=backend)
    ours.load_state_dict(hf.state_dict(), strict=True)
    return hf, ours.to("cuda", dtype).eval()


@pytest.mark.parametrize(
    ("dtype", "backend", "tolerance"),
    [
        (torch.float32, "sdpa", 1e-4),
        (torch.bfloat16, "auto", 3e-2),
        (torch.float16, "auto", 5e-3),
    ],
)
def test_decoder_logits_match_transformers_on_cuda(dtype, backend, tolerance):
    hf, ours = pair(dtype, backend)
    ids = torch.randint(0, 1024, (700,), device="cuda")
    with torch.no_grad():
        expected = hf(input_ids=ids[None]).logits[0].float()
        hidden = ours(ids, torch.arange(700, device="cuda"), cu_seqlens=[0, 700])
        got = (hidden @ ours.head_weight.T).float()
    scale = expected.abs().max().item()
    assert (got - expected).abs().max().item() <= tolerance * scale
    if dtype != torch.float32:
        assert ours.backend_for(ids.device, dtype).name in ("flash", "torch_varlen")


def test_packed_documents_on_cuda_equal_separate_runs_in_bf16():
    hf, ours = pair(torch.bfloat16, "auto")
    cu = [0, 100, 450, 700]
    ids = torch.randint(0, 1024, (700,), device="cuda")
    positions = torch.cat(
        [torch.arange(b - a, device="cuda") for a, b in zip(cu[:-1], cu[1:], strict=True)]
    )
    with torch.no_grad():
        packed = ours(ids, positions, cu_seqlens=cu)
        for start, end in zip(cu[:-1], cu[1:], strict=True):
            alone = ours(ids[start:end], positions[start:end], cu_seqlens=[0, end - start])
            difference = (packed[start:end].float() - alone.float()).abs().max().item()
            assert difference <= 3e-2 * alone.float().abs().max().item()
