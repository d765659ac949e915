"""The text-only files ``text/*.jsonl`` (format text_jsonl): Alpaca rows and chat messages.

English and Chinese pseudo-prose from each file's own generator, so every file is deterministic.
"""

from __future__ import annotations

from typing import Any

from lvita_data.demo.builder import Builder, msg, write_jsonl
from lvita_data.demo.prose import Prose
from lvita_data.demo.specs import HUGE_TEXT_CHARS


def _huge_row(prose: Prose) -> dict[str, str]:
    """About HUGE_TEXT_CHARS of English then Chinese: too long for every demo stage."""
    huge = prose.text(HUGE_TEXT_CHARS // 2, numbers=True) + "\n\n"
    huge += prose.text(HUGE_TEXT_CHARS - len(huge), zh=True)
    return {
        "instruction": "Answer the final question about this very long record.",
        "input": huge + "\n\nWhich river was described first?",
        "output": "The first river described is a quiet one.",
    }


def write_long_alpaca(builder: Builder) -> int:
    """16 summarisation rows (every fourth Chinese) and the huge row at index 7."""
    rel = "text/long_alpaca.jsonl"
    rng = builder.rng(rel)
    prose = Prose(rng)
    rows = []
    for k in range(16):
        zh = k % 4 == 3
        chars = int(rng.integers(3000, 8000)) if zh else int(rng.integers(10000, 40000))
        document = prose.text(chars, zh=zh)
        instruction = (
            "请总结下面的文章。" if zh else "Summarize the following document in a paragraph."
        )
        rows.append(
            {"instruction": instruction, "input": document, "output": prose.paragraph(5, zh=zh)}
        )
    rows.insert(7, _huge_row(prose))
    builder.mark_bad(rel, 7, "too_long", "too_long")
    write_jsonl(builder.root / rel, rows)
    return len(rows)


def write_long_messages(builder: Builder) -> int:
    """16 two-round chats over a long document, some with a system turn."""
    rel = "text/long_messages.jsonl"
    rng = builder.rng(rel)
    prose = Prose(rng)
    rows: list[dict[str, Any]] = []
    for k in range(16):
        zh = k % 5 == 2
        chars = int(rng.integers(2000, 6000)) if zh else int(rng.integers(8000, 30000))
        messages = []
        if k % 4 == 0:
            messages.append(msg("system", "You are a helpful assistant for long documents."))
        messages += [
            msg("user", prose.text(chars, zh=zh) + "\n\nWhat is the main topic?"),
            msg("assistant", prose.paragraph(4, zh=zh)),
            msg("user", "Give more details."),
            msg("assistant", prose.text(chars // 6, zh=zh)),
        ]
        rows.append({"messages": messages})
    write_jsonl(builder.root / rel, rows)
    return len(rows)


def write_short_chat(builder: Builder) -> int:
    """30 one-round chats, every sixth in Chinese."""
    rel = "text/short_chat.jsonl"
    rng = builder.rng(rel)
    prose = Prose(rng)
    rows = []
    for k in range(30):
        zh = k % 6 == 5
        question = prose.zh_sentence() if zh else prose.question()
        answer = prose.paragraph(int(rng.integers(1, 5)), zh=zh)
        rows.append({"messages": [msg("user", question), msg("assistant", answer)]})
    write_jsonl(builder.root / rel, rows)
    return len(rows)
