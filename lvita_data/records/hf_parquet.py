"""Reader of parquet files as published on the Hugging Face hub, media embedded as image bytes.

Two layouts, told apart by their columns:

- **the_cauldron** (``HuggingFaceM4/the_cauldron``): ``images: list<struct<bytes, path>>`` and
  ``texts: list<struct<user, assistant, source>>``. Each text item is one user turn and one
  assistant turn. The texts carry no ``<image>`` tag; one ``<image>\\n`` per image is prepended to
  the first user turn, which is the conversion Long-VITA's annotation files used for the_cauldron
  (images first). A row whose texts already contain tags keeps them (the count must match).
- **LLaVA-OneVision-Data** (``lmms-lab/LLaVA-OneVision-Data``): ``id``, ``image:
  struct<bytes, path>`` (null for text-only rows), ``conversations: list<struct<from, value>>``,
  ``data_source``. Tags follow the LLaVA conventions of `llava_json` (an image without any tag gets
  ``<image>\\n`` on the first human turn); a null image with tags in the turns is
  ``tag_mismatch``.

Embedded bytes become ``MediaRef(kind="image", data=..., name=f"{row}:{i}")``; an image struct with
null bytes but a path is resolved like a file path (``media_root``); with neither it is
``bad_field_type``. ``len()`` comes from the footer metadata; ``read`` loads (and caches) the row
group holding the row, with only the columns the layout needs.
"""

from __future__ import annotations

from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from lvita_data.errors import SourceError
from lvita_data.records.base import (
    Source,
    count_tags,
    make_turns,
    prepend_to_first_user_turn,
    row_group_index,
    skip,
    turns_from_list,
    type_name,
)
from lvita_data.records.llava_json import apply_llava_tags
from lvita_data.schema import MediaRef, RawRecord, RejectReason, Turn
from lvita_data.tokenizer.special_tokens import IMAGE_TAG

LAYOUTS = {
    "the_cauldron": ("images", "texts"),
    "llava_onevision": ("image", "conversations"),
}


class HfParquetSource(Source):
    format = "hf_parquet"

    def __init__(self, path: str, *, dataset: str, media_root: str | None) -> None:
        super().__init__(path, dataset=dataset, media_root=media_root)
        try:
            self._file = pq.ParquetFile(self.path)
            names = set(self._file.schema_arrow.names)
        except (OSError, pa.ArrowException) as error:
            raise SourceError(f"{self.path}: cannot open parquet file: {error}") from None
        if {"images", "texts"} <= names:
            self.layout = "the_cauldron"
            self._columns = ["images", "texts"]
        elif "conversations" in names:
            self.layout = "llava_onevision"
            self._columns = [c for c in ("image", "conversations") if c in names]
        else:
            raise SourceError(
                f"{self.path}: unknown parquet layout, columns {sorted(names)} "
                "(need images+texts (the_cauldron) or conversations (LLaVA-OneVision))"
            )
        metadata = self._file.metadata
        self._offsets: list[int] = []
        total = 0
        for i in range(metadata.num_row_groups):
            self._offsets.append(total)
            total += metadata.row_group(i).num_rows
        self._num_rows = total
        self._group: int | None = None
        self._table: pa.Table | None = None
        self.row_groups_read = 0
        """How many row groups were loaded so far (the cache hit rate is visible in tests)."""

    def __len__(self) -> int:
        return self._num_rows

    def _row(self, row: int) -> dict[str, Any]:
        group = row_group_index(self._offsets, row)
        if group != self._group:
            try:
                self._table = self._file.read_row_group(group, columns=self._columns)
            except (OSError, pa.ArrowException) as error:
                raise SourceError(f"{self.path}: cannot read row group {group}: {error}") from None
            self._group = group
            self.row_groups_read += 1
        assert self._table is not None
        index = row - self._offsets[group]
        return {name: self._table.column(name)[index].as_py() for name in self._columns}

    def read(self, row: int) -> RawRecord:
        self._check_row(row)
        data = self._row(row)
        if self.layout == "the_cauldron":
            return self._cauldron(row, data)
        return self._onevision(row, data)

    def _image(self, row: int, i: int, value: Any, field: str) -> MediaRef:
        if not isinstance(value, dict):
            raise skip(
                RejectReason.bad_field_type,
                f"{field} must be a struct<bytes, path>, got {type_name(value)}",
            )
        data, path = value.get("bytes"), value.get("path")
        if data is not None:
            return MediaRef(kind="image", data=bytes(data), name=f"{row}:{i}")
        if path:
            return self.resolve(path, "image")
        raise skip(RejectReason.bad_field_type, f"{field} has neither bytes nor path")

    def _cauldron(self, row: int, data: dict[str, Any]) -> RawRecord:
        raw_images, texts = data["images"], data["texts"]
        if raw_images is None:
            raw_images = []
        if not isinstance(raw_images, list):
            raise skip(RejectReason.bad_field_type, f"images must be a list, got {raw_images!r}")
        images = [self._image(row, i, v, f"images[{i}]") for i, v in enumerate(raw_images)]
        if not isinstance(texts, list):
            raise skip(RejectReason.bad_field_type, f"texts must be a list, got {type_name(texts)}")
        pairs: list[tuple[Any, Any]] = []
        for i, item in enumerate(texts):
            if not isinstance(item, dict):
                raise skip(RejectReason.bad_field_type, f"texts[{i}] is {type_name(item)}")
            pairs += [("user", item.get("user")), ("assistant", item.get("assistant"))]
        turns: list[Turn] = make_turns(pairs, where="texts")
        if turns and images and count_tags(turns, IMAGE_TAG) == 0:
            turns = prepend_to_first_user_turn(turns, (IMAGE_TAG + "\n") * len(images))
        return self.record(row, turns, images)

    def _onevision(self, row: int, data: dict[str, Any]) -> RawRecord:
        turns = turns_from_list(
            data["conversations"], role_key="from", content_key="value", where="conversations"
        )
        value = data.get("image")
        if value is None:
            found = count_tags(turns, IMAGE_TAG)
            if found:
                raise skip(
                    RejectReason.tag_mismatch, f"{found} {IMAGE_TAG} tag(s) but the image is null"
                )
            images: list[MediaRef] = []
        elif isinstance(value, list):
            images = [self._image(row, i, v, f"image[{i}]") for i, v in enumerate(value)]
        else:
            images = [self._image(row, 0, value, "image")]
        if turns:
            turns = apply_llava_tags(turns, len(images), 0)
        return self.record(row, turns, images)
