"""Context-parallel sharding of one packed sequence: pure index arithmetic, no process group.

A packed sequence of T tokens with documents ``[cu[i], cu[i+1])`` is split over P ranks so each
holds T / P tokens (and their KV and activations). Two layouts:

- ``zigzag`` (default; Long-VITA / Megatron "DualChunkSwap" per document): every document is
  padded to a multiple of 2P and cut into 2P equal chunks; rank r holds chunks r and 2P-1-r of
  every document, in that order. Causal work is balanced (each rank holds one early and one late
  chunk of every document) and every document boundary is a chunk boundary. For Long-VITA's
  stages 3-4 (one causal document over the whole pack) pass ``cu_seqlens = [0, T]``.
- ``contiguous``: rank r holds tokens ``[r T/P, (r+1) T/P)`` (T padded to a multiple of P);
  documents may cross ranks anywhere. Unbalanced for causal attention ((P+1)/2P efficiency); kept
  for the all-gather-KV method and tests.

Padding (`pad_documents`) inserts pad tokens at the end of each document (zigzag) or of the
sequence (contiguous); the caller fills them with a pad id, ignored targets (-100) and positions
continuing the document. Labels must be turned into next-token targets **before** sharding
(`lvita_model.head.next_token_targets` on the unsharded sequence): the next token of a chunk's
last token lives on another rank.

Each rank gets a `CPShard`: the global indices of its tokens in local order (``index``), its local
per-document boundaries, and for zigzag the local positions of each document's first and second
chunk. ``shard(x) = x[index]``; `unshard` inverts it from all ranks' pieces. Worked example, P = 2,
one document of 8 tokens: chunks of 2; rank 0 holds global [0, 1, 6, 7], rank 1 [2, 3, 4, 5].
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from lvita_model.attention.base import host_cu_seqlens
from lvita_model.errors import ContextParallelError

Layout = Literal["zigzag", "contiguous"]


def _host(cu_seqlens: Tensor | Sequence[int]) -> tuple[int, ...]:
    try:
        return host_cu_seqlens(cu_seqlens)
    except ValueError as error:
        raise ContextParallelError(str(error)) from None


def required_multiple(cp_size: int, layout: Layout) -> int:
    """Each document (zigzag) or the sequence (contiguous) must divide by this."""
    return 2 * cp_size if layout == "zigzag" else cp_size


def pad_documents(
    cu_seqlens: Tensor | Sequence[int], cp_size: int, layout: Layout = "zigzag"
) -> tuple[tuple[int, ...], Tensor]:
    """(padded cu_seqlens, source [T_padded] int64): the original token index of every padded
    position, -1 where a pad token goes. Zigzag pads each document to a multiple of 2P (empty
    documents stay empty); contiguous pads the tail to a multiple of P."""
    host = _host(cu_seqlens)
    multiple = required_multiple(cp_size, layout)
    pieces: list[Tensor] = []
    padded = [0]
    if layout == "zigzag":
        for start, end in zip(host, host[1:], strict=False):
            length = end - start
            pad = -length % multiple
            pieces += [torch.arange(start, end), torch.full((pad,), -1)]
            padded.append(padded[-1] + length + pad)
    else:
        pad = -host[-1] % multiple
        pieces += [torch.arange(host[-1]), torch.full((pad,), -1)]
        padded = [*host[:-1], host[-1] + pad]
    return tuple(padded), torch.cat(pieces).long()


def apply_padding(values: Tensor, source: Tensor, fill: int | float) -> Tensor:
    """values [T, ...] laid out on the padded sequence (`source` from `pad_documents`)."""
    out = values.new_full((source.shape[0], *values.shape[1:]), fill)
    keep = source >= 0
    out[keep] = values[source[keep]]
    return out


def padded_positions(positions: Tensor, source: Tensor) -> Tensor:
    """Position ids on the padded sequence: pads continue the position of the token before."""
    out = apply_padding(positions, source, 0)
    for pad in torch.nonzero(source < 0).flatten().tolist():
        out[pad] = out[pad - 1] + 1 if pad > 0 else 0
    return out


@dataclass(frozen=True, eq=False)
class CPShard:
    """What one rank holds of a packed sequence (see the module docstring)."""

    cp_size: int
    cp_rank: int
    layout: Layout
    cu_seqlens: tuple[int, ...]
    """Global (padded) document boundaries."""
    index: Tensor
    """int64 [T / P]: global index of each local token, in local order."""
    local_cu_seqlens: tuple[int, ...]
    """Local boundaries of each document's tokens (zero-length where a document is absent)."""
    first_chunk: Tensor | None = None
    """zigzag: int64 local positions of every document's chunk r (the early one)."""
    second_chunk: Tensor | None = None
    """zigzag: int64 local positions of every document's chunk 2P-1-r (the late one)."""
    chunk_cu_seqlens: tuple[int, ...] | None = None
    """zigzag: boundaries of the documents within `first_chunk` (and `second_chunk`)."""

    @property
    def num_tokens(self) -> int:
        return int(self.index.shape[0])

    def shard(self, values: Tensor, dim: int = 0) -> Tensor:
        """The local part of a global (padded) tensor."""
        return values.index_select(dim, self.index.to(values.device))


def plan_shard(
    cu_seqlens: Tensor | Sequence[int], cp_size: int, cp_rank: int, layout: Layout = "zigzag"
) -> CPShard:
    """The tokens rank `cp_rank` of `cp_size` holds; `cu_seqlens` must already be padded."""
    host = _host(cu_seqlens)
    if cp_size < 1 or not 0 <= cp_rank < cp_size:
        raise ContextParallelError(f"cp_rank {cp_rank} is not in [0, {cp_size})")
    multiple = required_multiple(cp_size, layout)
    if layout == "zigzag":
        bad = [
            (i, b - a)
            for i, (a, b) in enumerate(zip(host, host[1:], strict=False))
            if (b - a) % multiple
        ]
        if bad:
            raise ContextParallelError(
                f"zigzag over CP={cp_size} needs every document to be a multiple "
                f"of {multiple} tokens; documents (index, length) {bad[:5]} are "
                "not: pad them with pad_documents()"
            )
        return _plan_zigzag(host, cp_size, cp_rank)
    if layout == "contiguous":
        if host[-1] % multiple:
            raise ContextParallelError(
                f"contiguous CP={cp_size} needs a length divisible by "
                f"{multiple}, got {host[-1]}: pad with pad_documents()"
            )
        return _plan_contiguous(host, cp_size, cp_rank)
    raise ContextParallelError(f"unknown CP layout {layout!r}: 'zigzag' or 'contiguous'")


def _plan_zigzag(host: tuple[int, ...], cp_size: int, cp_rank: int) -> CPShard:
    early, late, chunk_cu, local_cu = [], [], [0], [0]
    for start, end in zip(host, host[1:], strict=False):
        chunk = (end - start) // (2 * cp_size)
        early.append(torch.arange(start + cp_rank * chunk, start + (cp_rank + 1) * chunk))
        late_chunk = 2 * cp_size - 1 - cp_rank
        late.append(torch.arange(start + late_chunk * chunk, start + (late_chunk + 1) * chunk))
        chunk_cu.append(chunk_cu[-1] + chunk)
        local_cu.append(local_cu[-1] + 2 * chunk)
    index = torch.cat([torch.cat(pair) for pair in zip(early, late, strict=True)]).long()
    # local order per document: [early chunk, late chunk]
    first = torch.cat(
        [
            torch.arange(local_cu[i], local_cu[i] + chunk_cu[i + 1] - chunk_cu[i])
            for i in range(len(early))
        ]
    ).long()
    second = torch.cat(
        [
            torch.arange(local_cu[i] + chunk_cu[i + 1] - chunk_cu[i], local_cu[i + 1])
            for i in range(len(early))
        ]
    ).long()
    return CPShard(
        cp_size, cp_rank, "zigzag", host, index, tuple(local_cu), first, second, tuple(chunk_cu)
    )


def _plan_contiguous(host: tuple[int, ...], cp_size: int, cp_rank: int) -> CPShard:
    per_rank = host[-1] // cp_size
    low, high = cp_rank * per_rank, (cp_rank + 1) * per_rank
    local_cu = [0]
    for start, end in zip(host, host[1:], strict=False):
        local_cu.append(local_cu[-1] + max(0, min(end, high) - max(start, low)))
    return CPShard(cp_size, cp_rank, "contiguous", host, torch.arange(low, high), tuple(local_cu))


def unshard(pieces: Sequence[Tensor], shards: Sequence[CPShard], dim: int = 0) -> Tensor:
    """The global tensor from every rank's local piece (inverse of `CPShard.shard`)."""
    total = shards[0].cu_seqlens[-1]
    first = pieces[0]
    shape = list(first.shape)
    shape[dim] = total
    out = first.new_empty(shape)
    for piece, shard in zip(pieces, shards, strict=True):
        out.index_copy_(dim, shard.index.to(out.device), piece)
    return out
