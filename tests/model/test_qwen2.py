"""Our Qwen2 decoder against transformers' Qwen2ForCausalLM (an independent implementation)."""

from __future__ import annotations

import json

import pytest
import torch

transformers = pytest.importorskip("transformers")

from lvita_model.attention import SdpaBackend  # noqa: E402
from lvita_model.config import LongVitaConfig, from_hf_config  # noqa: E402
from lvita_model.model import LongVitaForCausalLM  # noqa: E402
from lvita_model.weights import load_pretrained  # noqa: E402

HF_TINY = dict(
    vocab_size=512,
    hidden_size=64,
    intermediate_size=160,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    rope_theta=1_000_000.0,
    rms_norm_eps=1e-6,
    max_position_embeddings=4096,
)


def hf_model(tie: bool, seed: int = 0):
    torch.manual_seed(seed)
    config = transformers.Qwen2Config(**HF_TINY, tie_word_embeddings=tie)
    model = transformers.Qwen2ForCausalLM(config).eval()
    with torch.no_grad():  # random biases and norms too, so every term is exercised
        for name, param in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                param.normal_(0.5 if "norm" in name else 0.0, 0.1)
    return model


def ours_from(hf) -> LongVitaForCausalLM:
    config = from_hf_config(hf.config.to_dict())
    model = LongVitaForCausalLM(config, attention_backend=SdpaBackend())
    state = {
        k: v
        for k, v in hf.state_dict().items()
        if not (config.llm.tie_word_embeddings and k == "lm_head.weight")
    }
    model.load_state_dict(state, strict=True)
    return model.eval()


def our_logits(
    model: LongVitaForCausalLM, ids: torch.Tensor, positions: torch.Tensor, cu_seqlens: list[int]
) -> torch.Tensor:
    hidden = model(ids, positions, cu_seqlens=cu_seqlens)
    return hidden @ model.head_weight.T


@pytest.mark.parametrize("tie", [False, True])
def test_logits_equal_transformers_qwen2(tie):
    hf = hf_model(tie)
    ours = ours_from(hf)
    assert isinstance(ours.config, LongVitaConfig) and ours.config.vision is None
    ids = torch.randint(0, HF_TINY["vocab_size"], (57,))
    with torch.no_grad():
        expected = hf(input_ids=ids[None]).logits[0]
        got = our_logits(ours, ids, torch.arange(57), [0, 57])
    assert (got - expected).abs().max().item() <= 1e-4
    assert expected.abs().max().item() > 0.1  # not a vacuous comparison


def test_packed_documents_equal_separate_runs():
    hf = hf_model(tie=False, seed=1)
    ours = ours_from(hf)
    lengths = [13, 40, 7]
    docs = [torch.randint(0, HF_TINY["vocab_size"], (n,)) for n in lengths]
    ids = torch.cat(docs)
    positions = torch.cat([torch.arange(n) for n in lengths])  # restart per sample (stage 1-2)
    cu = [0, 13, 53, 60]
    with torch.no_grad():
        packed = our_logits(ours, ids, positions, cu)
        for doc, start, end in zip(docs, cu[:-1], cu[1:], strict=True):
            separate = hf(input_ids=doc[None]).logits[0]
            assert (packed[start:end] - separate).abs().max().item() <= 1e-4


def test_one_causal_document_with_continuous_positions_is_the_plain_run():
    """Long-VITA stages 3-4: no attention reset, positions 0..T-1 over the whole pack."""
    hf = hf_model(tie=False, seed=2)
    ours = ours_from(hf)
    ids = torch.randint(0, HF_TINY["vocab_size"], (40,))
    with torch.no_grad():
        got = our_logits(ours, ids, torch.arange(40), [0, 40])
        expected = hf(input_ids=ids[None]).logits[0]
        isolated = our_logits(ours, ids, torch.arange(40), [0, 20, 40])
    assert (got - expected).abs().max().item() <= 1e-4
    assert (isolated[20:] - expected[20:]).abs().max().item() > 1e-3  # the reset matters


def test_gradients_equal_transformers():
    hf = hf_model(tie=False, seed=3).train()
    ours = ours_from(hf).train()
    ids = torch.randint(0, HF_TINY["vocab_size"], (33,))
    targets = torch.randint(0, HF_TINY["vocab_size"], (33,))
    hf_loss = torch.nn.functional.cross_entropy(
        hf(input_ids=ids[None]).logits[0], targets, reduction="sum"
    )
    hf_loss.backward()
    our_loss = torch.nn.functional.cross_entropy(
        our_logits(ours, ids, torch.arange(33), [0, 33]), targets, reduction="sum"
    )
    our_loss.backward()
    assert abs(our_loss.item() - hf_loss.item()) <= 1e-4 * abs(hf_loss.item())
    hf_grads = dict(hf.named_parameters())
    for name, param in ours.named_parameters():
        reference = hf_grads[name].grad
        scale = reference.abs().max().item() + 1e-12
        assert (param.grad - reference).abs().max().item() <= 1e-4 * scale, name


@pytest.mark.parametrize(("tie", "max_shard_size"), [(False, None), (True, None), (False, "200KB")])
def test_transformers_checkpoint_loads_with_load_pretrained(tmp_path, tie, max_shard_size):
    """A checkpoint written by transformers' own save_pretrained (safetensors, single or
    sharded with model.safetensors.index.json) loads as is."""
    hf = hf_model(tie, seed=4)
    options = {} if max_shard_size is None else {"max_shard_size": max_shard_size}
    hf.save_pretrained(tmp_path, safe_serialization=True, **options)
    assert (tmp_path / "model.safetensors.index.json").is_file() == (max_shard_size is not None)
    assert json.loads((tmp_path / "config.json").read_text())["model_type"] == "qwen2"
    ours = load_pretrained(tmp_path, attention_backend=SdpaBackend()).eval()
    ids = torch.randint(0, HF_TINY["vocab_size"], (21,))
    with torch.no_grad():
        expected = hf(input_ids=ids[None]).logits[0]
        got = our_logits(ours, ids, torch.arange(21), [0, 21])
    assert (got - expected).abs().max().item() <= 1e-4
