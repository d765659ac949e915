"""Reader of long-text sets (JSON Lines or a JSON array): text-only conversations.

A row is either ``{"messages": [{"role", "content"}]}`` (``conversations`` with ``from``/``value``
also accepted) or Alpaca style ``{"instruction", "input", "output"}``: the user turn is the
instruction, followed by ``"\\n"`` and the input when the input is a non-empty string; the
assistant turn is the output. Media fields are ignored; an ``<image>``/``<video>`` tag in the text
is a ``tag_mismatch`` (a text sample has no media).
"""

from __future__ import annotations

from typing import Any

from lvita_data.records.base import JsonSource, make_turns, skip, turns_from_row, type_name
from lvita_data.schema import RawRecord, RejectReason, Turn


def alpaca_turns(data: dict[str, Any]) -> list[Turn]:
    instruction, extra, output = data.get("instruction"), data.get("input", ""), data.get("output")
    for name, value in (("instruction", instruction), ("output", output)):
        if not isinstance(value, str):
            raise skip(
                RejectReason.bad_field_type, f"{name} must be a string, got {type_name(value)}"
            )
    if extra is None:
        extra = ""
    if not isinstance(extra, str):
        raise skip(RejectReason.bad_field_type, f"input must be a string, got {type_name(extra)}")
    prompt = f"{instruction}\n{extra}" if extra else instruction
    return make_turns([("user", prompt), ("assistant", output)])


class TextJsonlSource(JsonSource):
    format = "text_jsonl"

    def normalize(self, row: int, data: dict[str, Any]) -> RawRecord:
        if "messages" in data or "conversations" in data:
            turns = turns_from_row(data)
        elif "instruction" in data or "output" in data:
            turns = alpaca_turns(data)
        else:
            raise skip(
                RejectReason.bad_field_type,
                "row has none of 'messages', 'conversations', 'instruction'/'output'",
            )
        return self.record(row, turns)
