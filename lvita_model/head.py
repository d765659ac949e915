"""Logits-masked LM head: next-token targets for packed documents and a chunked, fused CE loss.

Shapes: T tokens of one packed sequence (or one CP shard), H hidden size, V vocabulary,
M supervised positions (M << T in SFT), c rows per chunk (`chunk_rows`), N documents.

Why. The vocabulary projection over every position does not fit at long context: full fp32
logits are T x V x 4 bytes, 594 GiB at 1M tokens x 152,064 (Qwen2.5) and 18.6 GiB (~20 GB) at
32K, and a naive `F.cross_entropy` keeps two or three such tensors alive in backward. In SFT only
the answer tokens are supervised (~1-10% of positions), and at inference only the last position
of each document is needed (`last_position_logits`).

Targets. Labels are stored unshifted (reference long-vita.md section 3): labels[p] is the label of
token p itself. `next_token_targets` shifts them once, per document: targets[p] = labels[p + 1]
when p + 1 lies in the same document ([cu[i], cu[i+1])) and is supervised, else -100, so the last
token of a document never predicts the next document's first token. The original selected the
positions whose *unshifted* label is supervised and then shifted the compacted arrays
(`lvita_model.baselines.original_head_targets`, kept to document the defect), so the first
answer token of every turn was predicted from the last answer token of the previous turn, or
never:

    position          0   1   2   3   4   5   6   7   8   9
    token             U   q   A   a1  a2  U   q   A   b1  b2     A = "<|im_start|>assistant\\n"
    label (unshifted) .   .   .   a1  a2  .   .   .   b1  b2
    ours              .   .   a1  a2  .   .   .   b1  b2  .      (position 9 ends the document)
    original          .   .   .   a2  b1  .   .   .   b2  .      a1 lost, b1 predicted from a2

Loss (`masked_lm_loss`). The M supervised rows are selected with `index_select` *before* the
matmul (autograd scatters their gradient back into [T, H]). Then, per chunk of c rows: logits =
h_c @ W^T in the input dtype, upcast to fp32; the cross entropy and its gradient softmax - onehot
are computed in fp32 in place on that one [c, V] buffer; d_h_c = g @ W and dW += g^T @ h_c. The
head-weight gradient is accumulated in fp32 across chunks and cast to W's dtype once (bf16
accumulation across chunks is what made fused losses drift, Liger #827/#512, axolotl #1601). For
bf16 inputs the per-chunk product g^T @ h_c is formed in bf16 per block of 16K vocabulary rows
and added to the fp32 accumulator (fp32 inputs use one in-place addmm, no temporary). The loss
is returned as (sum fp32, count int64) so it reduces over CP/DP ranks as sum/sum. A rank with no
supervised token still runs the Function: loss 0, count 0, and zero (not None) gradients for
hidden and weight, so the gradient all-reduce of every rank sees the same parameters. A tied
embedding matrix works as `weight` (autograd adds the head's and the embedding's gradients).

Gradient in forward vs recompute (`grad_mode`). "forward" (default, Liger-style) computes the
gradients chunk by chunk during the forward pass and keeps d_h [M, H] and dW (fp32) until
backward, which only scales them by grad_output; "recompute" keeps h_sel and recomputes each
chunk's logits in backward (one more [c, H] x [H, V] matmul per chunk: 4 instead of 3). Both peak
at one fp32 chunk of logits + the fp32 dW accumulator + d_h: measured equal to the MiB on an H100
(below), and "recompute" 1.2-1.4x slower, so "forward" is the default. Its costs: backward can run
once per forward (a second backward with retain_graph raises instead of returning stale
gradients), and the gradients are computed even if the loss is never back-propagated (they are
skipped under torch.no_grad or when neither input requires grad).

Measured (`benchmarks/bench_head.py`, benchmarks/results/head.md): forward + backward of
loss_sum / count, V = 152,064, 10% of positions supervised, chunk_rows = 4096; peak memory above
the inputs, weight.grad included (every variant produces it):

    device, T, H, dtype          full head    masked/forward  ratio  step time full -> masked
    H100, 32K, 896, fp32         57,024 MiB    2,443 MiB      0.043  0.572 -> 0.060 s
    H100, 32K, 5120, fp32        57,024 MiB    4,999 MiB      0.088  2.971 -> 0.308 s
    H100, 32K, 5120, bf16        57,024 MiB    5,885 MiB      0.103  0.299 -> 0.040 s
    CPU 2 vCPU, 4K, 896, fp32     7,143 MiB      776 MiB      0.109  27.9 -> 2.6 s

In fp32 the loss and both gradients equal the full head's within rtol = atol = 1e-5 (max |dW
diff| / max |dW| <= 3.2e-6 on the H100). What remains of the masked peak is mostly dW itself
(V x H x 4 bytes) plus one [c, V] fp32 chunk (1.9 GiB for 3,277 rows); the bf16 run adds the
chunk's bf16 logits while they are upcast (2,970 + 1,901 + 950 MiB).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from lvita_model.attention.base import document_ids, host_cu_seqlens

IGNORE_INDEX = -100
VOCAB_BLOCK = 16384  # vocabulary rows per bf16 dW product (temporary [VOCAB_BLOCK, H])
GradMode = Literal["forward", "recompute"]


# ----------------------------------------------------------------------------------------------
# Targets


def _document_of_positions(host: tuple[int, ...], num_tokens: int, device) -> Tensor:
    """int32 [T]: index of the document holding each position, -1 outside every document."""
    doc, _ = document_ids(host, device)  # [cu[-1] - cu[0]]
    return F.pad(doc, (host[0], num_tokens - host[-1]), value=-1)


def next_token_targets(labels: Tensor, cu_seqlens: Tensor | Sequence[int]) -> Tensor:
    """int64 [T]: targets[p] = labels[p + 1] within a document, else IGNORE_INDEX (-100).

    Args:
        labels: [T] unshifted labels (-100 = not supervised).
        cu_seqlens: [N + 1] document boundaries; document i is [cu[i], cu[i+1]). Positions
            outside [cu[0], cu[-1]) (padding) predict nothing and are never predicted.
    """
    if labels.dim() != 1:
        raise ValueError(f"labels must be 1-D [T], got shape {tuple(labels.shape)}")
    num_tokens = labels.numel()
    host = host_cu_seqlens(cu_seqlens, num_tokens)
    doc = _document_of_positions(host, num_tokens, labels.device)
    targets = torch.full((num_tokens,), IGNORE_INDEX, dtype=torch.int64, device=labels.device)
    same_doc = (doc[:-1] == doc[1:]) & (doc[:-1] >= 0)  # [T - 1]: p and p + 1 in one document
    targets[:-1] = torch.where(same_doc, labels[1:].long(), IGNORE_INDEX)
    return targets


def supervised_positions(targets: Tensor) -> Tensor:
    """int64 [M]: indices p with targets[p] != -100, ascending."""
    return (targets != IGNORE_INDEX).nonzero().squeeze(1)


# ----------------------------------------------------------------------------------------------
# Chunked loss


def accum_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp32 for fp32 / bf16 / fp16 inputs; float64 stays float64 (exact tests)."""
    return torch.promote_types(dtype, torch.float32)


def _chunk_logits(rows: Tensor, weight: Tensor) -> Tensor:
    """[c, H] @ [V, H]^T computed in the input dtype, then upcast: [c, V] fp32 (no-op if fp32)."""
    return (rows @ weight.t()).to(accum_dtype(rows.dtype))


def _chunk_loss_(logits: Tensor, labels: Tensor, *, want_grad: bool) -> Tensor:
    """Cross-entropy sum over the chunk; in place, `logits` [c, V] becomes softmax - onehot.

    Everything happens in the one [c, V] buffer: no log_softmax copy, no exp temporary.
    """
    label_logit = logits.gather(1, labels[:, None])  # [c, 1]
    row_max = logits.amax(dim=1, keepdim=True)  # [c, 1]
    probs = logits.sub_(row_max).exp_()  # unnormalized, in place
    row_sum = probs.sum(dim=1, keepdim=True)  # [c, 1]
    loss = (row_max + row_sum.log() - label_logit).sum()
    if want_grad:
        probs.div_(row_sum)
        probs[torch.arange(labels.numel(), device=labels.device), labels] -= 1.0
    return loss


def _chunk_grads(
    grad: Tensor,
    rows: Tensor,
    weight: Tensor,
    d_rows: Tensor | None,
    d_weight: Tensor | None,
) -> None:
    """d_rows [c, H] = g @ W; d_weight [V, H] (fp32 accumulator) += g^T @ rows.

    `grad` [c, V] is dloss/dlogits in the input dtype. For bf16 the product g^T @ rows is formed
    per block of VOCAB_BLOCK vocabulary rows, so the bf16 temporary is [VOCAB_BLOCK, H], not
    [V, H] (Liger #1323), before it is added to the fp32 accumulator.
    """
    if d_rows is not None:
        torch.mm(grad, weight, out=d_rows)
    if d_weight is None:
        return
    if grad.dtype == d_weight.dtype:
        d_weight.addmm_(grad.t(), rows)  # fp32 / float64: in place, no temporary
        return
    for start in range(0, d_weight.shape[0], VOCAB_BLOCK):
        block = slice(start, start + VOCAB_BLOCK)
        d_weight[block] += grad[:, block].t() @ rows  # [b, c] @ [c, H] in bf16, summed in fp32


def _run_chunks(
    rows: Tensor,
    weight: Tensor,
    labels: Tensor,
    chunk_rows: int,
    d_rows: Tensor | None = None,
    d_weight: Tensor | None = None,
    grad_scale: Tensor | None = None,
) -> Tensor:
    """Loss sum over all rows, one [c, V] chunk of logits alive at a time; fills the grads given."""
    want_grad = d_rows is not None or d_weight is not None
    loss = torch.zeros((), dtype=accum_dtype(rows.dtype), device=rows.device)
    for start in range(0, rows.shape[0], chunk_rows):
        chunk = slice(start, start + chunk_rows)
        logits = _chunk_logits(rows[chunk], weight)  # [c, V] fp32
        loss += _chunk_loss_(logits, labels[chunk], want_grad=want_grad)
        if not want_grad:
            continue
        if grad_scale is not None:
            logits.mul_(grad_scale)
        grad = logits.to(weight.dtype)  # [c, V]; the same tensor when fp32
        del logits  # bf16: the fp32 chunk is freed before the two gradient matmuls
        chunk_d_rows = None if d_rows is None else d_rows[chunk]
        _chunk_grads(grad, rows[chunk], weight, chunk_d_rows, d_weight)
    return loss


def _grad_buffers(
    rows: Tensor, weight: Tensor, need_rows: bool, need_weight: bool
) -> tuple[Tensor | None, Tensor | None]:
    d_rows = torch.empty_like(rows) if need_rows else None
    d_weight = None
    if need_weight:
        d_weight = torch.zeros(weight.shape, dtype=accum_dtype(weight.dtype), device=weight.device)
    return d_rows, d_weight


class _GradInForward(torch.autograd.Function):
    """Liger-style: gradients computed chunk by chunk in forward, scaled in backward."""

    @staticmethod
    def forward(ctx, rows, weight, labels, chunk_rows: int, want_grad: bool):
        need_rows, need_weight = (want_grad and n for n in ctx.needs_input_grad[:2])
        d_rows, d_weight = _grad_buffers(rows, weight, need_rows, need_weight)
        loss = _run_chunks(rows, weight, labels, chunk_rows, d_rows, d_weight)
        ctx.grads = (d_rows, d_weight)
        ctx.weight_dtype = weight.dtype
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        if ctx.grads is None:
            raise RuntimeError(
                "masked_lm_loss(grad_mode='forward') computed its gradients in forward and they "
                "were already used; run backward once per forward or use grad_mode='recompute'"
            )
        d_rows, d_weight = ctx.grads
        ctx.grads = None  # the buffers are scaled in place and handed to autograd
        if d_rows is not None:
            d_rows = d_rows.mul_(grad_loss)
        if d_weight is not None:
            d_weight = d_weight.mul_(grad_loss).to(ctx.weight_dtype)
        return d_rows, d_weight, None, None, None


class _RecomputeInBackward(torch.autograd.Function):
    """Loss only in forward; backward recomputes each chunk's logits (one extra matmul)."""

    @staticmethod
    def forward(ctx, rows, weight, labels, chunk_rows: int, want_grad: bool):
        ctx.save_for_backward(rows, weight, labels)
        ctx.chunk_rows = chunk_rows
        return _run_chunks(rows, weight, labels, chunk_rows)

    @staticmethod
    def backward(ctx, grad_loss):
        rows, weight, labels = ctx.saved_tensors
        d_rows, d_weight = _grad_buffers(rows, weight, *ctx.needs_input_grad[:2])
        _run_chunks(rows, weight, labels, ctx.chunk_rows, d_rows, d_weight, grad_loss)
        if d_weight is not None:
            d_weight = d_weight.to(weight.dtype)
        return d_rows, d_weight, None, None, None


_GRAD_MODES = {"forward": _GradInForward, "recompute": _RecomputeInBackward}


def check_head_inputs(hidden: Tensor, weight: Tensor, targets: Tensor) -> None:
    """Raise ValueError unless hidden [T, H], weight [V, H] and targets [T] fit together."""
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(
            f"expected hidden [T, H] and weight [V, H], got {tuple(hidden.shape)} and "
            f"{tuple(weight.shape)}"
        )
    if targets.shape != hidden.shape[:1]:
        raise ValueError(f"targets must be [T] = [{hidden.shape[0]}], got {tuple(targets.shape)}")
    if hidden.dtype != weight.dtype:
        raise ValueError(f"hidden and weight dtypes differ: {hidden.dtype} vs {weight.dtype}")


def masked_lm_loss(
    hidden: Tensor,
    weight: Tensor,
    targets: Tensor,
    *,
    chunk_rows: int = 4096,
    grad_mode: GradMode = "forward",
) -> tuple[Tensor, Tensor]:
    """Cross-entropy over the supervised rows only, chunked; returns (loss_sum, count).

    Args:
        hidden: [T, H] final hidden states (after the final norm).
        weight: [V, H] LM head (or the tied embedding matrix), same dtype as hidden.
        targets: [T] next-token targets from `next_token_targets` (-100 = no loss).
        chunk_rows: at most this many rows of logits ([chunk_rows, V] fp32) exist at a time.
        grad_mode: "forward" (gradients computed during forward) or "recompute" (in backward).

    Returns:
        loss_sum: 0-d fp32 (float64 for float64 inputs), the summed CE; count: 0-d int64, M.
        Divide by the all-reduced count (sum/sum across ranks) for the mean.
    """
    check_head_inputs(hidden, weight, targets)
    if chunk_rows < 1:
        raise ValueError(f"chunk_rows must be >= 1, got {chunk_rows}")
    if grad_mode not in _GRAD_MODES:
        raise ValueError(f"grad_mode must be one of {sorted(_GRAD_MODES)}, got {grad_mode!r}")
    positions = supervised_positions(targets)  # [M]
    rows = hidden.index_select(0, positions)  # [T, H] -> [M, H]; backward scatters into [T, H]
    labels = targets.index_select(0, positions)  # [M]
    want_grad = torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)
    loss_sum = _GRAD_MODES[grad_mode].apply(rows, weight, labels, chunk_rows, want_grad)
    count = torch.tensor(positions.numel(), dtype=torch.int64, device=targets.device)
    return loss_sum, count


def last_position_logits(
    hidden: Tensor,
    weight: Tensor,
    cu_seqlens: Tensor | Sequence[int] | None = None,
    *,
    positions: Tensor | Sequence[int] | None = None,
) -> Tensor:
    """Inference: [N, V] fp32 logits at the last position of each document (or at `positions`)."""
    if (cu_seqlens is None) == (positions is None):
        raise ValueError("pass exactly one of cu_seqlens and positions")
    if positions is None:
        host = host_cu_seqlens(cu_seqlens, hidden.shape[0])
        if any(b == a for a, b in zip(host, host[1:], strict=False)):
            raise ValueError(f"an empty document has no last position: cu_seqlens {list(host)}")
        positions = [end - 1 for end in host[1:]]  # [N]
    positions = torch.as_tensor(positions, dtype=torch.int64, device=hidden.device)
    return _chunk_logits(hidden.index_select(0, positions), weight)  # [N, V]
