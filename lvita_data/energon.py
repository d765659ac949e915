"""Megatron-Energon reads an lvita build as lvita's packed samples: `PackedSample`.

The `.nv-meta/dataset.yaml` that `lvita build` writes (`lvita_data.shards.energon`) names this
module's types, so Energon needs nothing but lvita installed next to it::

    sample_type: {__module__: lvita_data.energon, __class__: PackedSample}
    sample_loader: {__module__: lvita_data.energon, __class__: PackLoader}
    part_filter: {__module__: lvita_data.energon, __class__: AllParts}
    decoder: null          # the sample loader gets each member's bytes, as ShardLoader reads them
    subflavors: {lvita: packed}

Energon instantiates `PackLoader` and `AllParts` from the YAML (a dict with ``__class__`` is an
object to construct); ``decoder: null`` overrides the task encoder's image decoder for this
dataset only. One Energon sample is one packed sequence, checked by the training loader's own
code (`lvita_data.loader.PackSettings`: arrays, labels, positions, tiles against placeholders,
with the build's T, vision ids and vocabulary) and kept with its pixels still encoded (a small
sample in shuffle buffers). Batching decodes them with `lvita_data.loader.assemble_batch`:
Energon's `DefaultTaskEncoder` batches through `PackedSample.from_samples`, so a batch is
lvita's `PackedBatch`, equal bit for bit to `ShardLoader`'s for the same packs (tested), with
``to_torch``. `PackedTaskEncoder(normalize=False)` gives uint8 tiles instead, to normalise on
the accelerator.

``energon info BUILD`` names the sample type; ``energon lint BUILD`` reads every pack through
`PackLoader`, so it checks each pack as training would (a damaged pack is logged with its shard
and key and skipped; Energon 7.4's lint still exits 0 then, so ``lvita verify`` is the gate).
Energon finds the packs by the ``.tar.idx`` files and `index.sqlite` lvita writes, no ``energon
prepare`` needed.

Energon is optional (``pip install lvita[energon]``); only this module imports it, and nothing
in lvita imports this module.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from lvita_data.errors import LoaderError
from lvita_data.loader import PackedBatch, PackSettings, assemble_batch
from lvita_data.loader.pack import Pack

try:
    from megatron.energon import DefaultTaskEncoder, Sample
except ImportError as error:  # pragma: no cover - depends on the environment
    raise ImportError(
        f"lvita_data.energon needs megatron-energon: pip install 'lvita[energon]' ({error})"
    ) from error


@dataclasses.dataclass
class PackedSample(Sample):
    """One packed sequence of an lvita build, checked; its tiles and images still encoded."""

    input_ids: np.ndarray
    """int32 [T], as stored."""
    labels: np.ndarray
    """int32 [T], unshifted, -100 where not supervised."""
    position_ids: np.ndarray
    """int32 [T]"""
    cu_seqlens: np.ndarray
    """int32 [n + 1], boundaries of the n packed samples."""
    meta: dict
    """The pack's meta.json."""
    pack: Pack
    """The checked pack (the arrays above, its encoded tiles and source images)."""

    @classmethod
    def from_samples(cls, samples: Sequence[PackedSample]) -> PackedBatch:
        """Energon's batching hook: the packs as `ShardLoader` batches them (float32 tiles)."""
        return batch_packs(samples)


def batch_packs(
    samples: Sequence[PackedSample], *, decode_pixels: bool = True, normalize: bool = True
) -> PackedBatch:
    """`PackedSample`s of one length T stacked into lvita's `PackedBatch`, their tiles decoded
    (`lvita_data.loader.assemble_batch`; the options are `ShardLoader`'s)."""
    lengths = {sample.input_ids.shape[0] for sample in samples}
    if len(lengths) != 1:
        keys = [sample.__key__ for sample in samples]
        raise LoaderError(f"packs {keys} of one batch have different lengths {sorted(lengths)}")
    return assemble_batch(
        [sample.pack for sample in samples],
        lengths.pop(),
        decode_pixels=decode_pixels,
        normalize=normalize,
    )


class PackedTaskEncoder(DefaultTaskEncoder):
    """Energon's default task encoder, batching `PackedSample`s into `PackedBatch`es with
    `ShardLoader`'s pixel options (uint8 [N, 448, 448, 3] tiles with ``normalize=False``)."""

    def __init__(self, *, decode_pixels: bool = True, normalize: bool = True) -> None:
        super().__init__()
        self.decode_pixels = decode_pixels
        self.normalize = normalize

    def batch(self, samples: list[PackedSample]) -> PackedBatch:
        return batch_packs(samples, decode_pixels=self.decode_pixels, normalize=self.normalize)


class PackLoader:
    """Energon's ``sample_loader`` for lvita builds: the raw members of one pack (part name ->
    bytes, plus Energon's ``__key__``, ``__sources__``, ...) -> the fields of a `PackedSample`.

    The build's `PackSettings` are read once per build directory and process (from
    ``__sources__``' dataset path: index.json, the manifest copy, its tokenizer).
    """

    def __init__(self) -> None:
        self._settings: dict[str, PackSettings] = {}

    def __call__(self, raw: dict[str, Any]) -> dict[str, Any]:
        source = raw["__sources__"][0]
        root = str(source.dataset_path)
        settings = self._settings.get(root)
        if settings is None:
            settings = self._settings.setdefault(root, PackSettings.of_build(root))
        key = raw["__key__"]
        members = {name: memoryview(data) for name, data in raw.items() if name[:2] != "__"}
        pack = settings.parse(key, members, where=f"{Path(root) / source.shard_name} sample {key}")
        return {
            "input_ids": pack.input_ids,
            "labels": pack.labels,
            "position_ids": pack.position_ids,
            "cu_seqlens": pack.cu_seqlens,
            "meta": pack.meta,
            "pack": pack,
        }


class AllParts:
    """Energon's ``part_filter`` for lvita builds: every member of a pack is read (format 3:
    ``arrays.npz``, ``media.tar``, ``meta.json``; older formats: the arrays, meta.json, ``image*``
    and ``tile*``), as `ShardLoader` reads them."""

    def __call__(self, part: str) -> bool:
        return True


__all__ = ["AllParts", "PackLoader", "PackedSample", "PackedTaskEncoder", "batch_packs"]
