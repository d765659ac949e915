"""Reader of Long-VITA-Training-Data annotation files (JSON Lines).

One row: ``{"messages": [{"role", "content"}], "images": [...], "videos": [...]}``. ``images`` and
``videos`` may be absent, null, a string or a list of strings; a video is a file or a directory
of frames (only the path is resolved here). A LLaVA-style ``conversations`` list with
``from``/``value`` keys is accepted in place of ``messages``. No tag is inserted: the tags in the
turns must match the media exactly.
"""

from __future__ import annotations

from typing import Any

from lvita_data.records.base import JsonSource, str_list, turns_from_row
from lvita_data.schema import RawRecord


class LongVitaJsonlSource(JsonSource):
    format = "longvita_jsonl"

    def normalize(self, row: int, data: dict[str, Any]) -> RawRecord:
        turns = turns_from_row(data)
        images = [self.resolve(p, "image") for p in str_list(data.get("images"), field="images")]
        videos = [self.resolve(p, "video") for p in str_list(data.get("videos"), field="videos")]
        return self.record(row, turns, images, videos)
