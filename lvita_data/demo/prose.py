"""Pseudo-prose for the demo corpus: English from small word lists, Chinese from common characters.

Deterministic: every choice is drawn from the ``numpy`` generator handed to `Prose`.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def _words(text: str) -> tuple[str, ...]:
    return tuple(text.split())


_NOUNS = _words(
    "river mountain engine library garden signal theory market window bridge harbor "
    "forest council letter machine village painting story network circuit ocean desert "
    "planet teacher student doctor farmer author captain pilot sailor merchant museum "
    "festival harvest winter summer evening morning lantern compass archive journey "
    "treaty castle kitchen orchard railway factory meadow glacier volcano island canyon "
    "telescope record formula question answer problem method result chapter paragraph "
    "argument evidence"
)
_ADJS = _words(
    "quiet ancient bright narrow distant golden silent careful rapid gentle curious "
    "heavy modern fragile hidden northern southern broad hollow steady sudden clever "
    "patient crowded empty faithful rough smooth vivid pale crimson emerald silver "
    "wooden stone"
)
_VERBS = _words(
    "describes follows crosses measures records explains guards reveals remembers "
    "carries examines builds connects divides gathers observes protects questions "
    "repairs studies surrounds transforms visits watches welcomes outlines compares "
    "predicts supports"
)
_ADVS = _words(
    "slowly quickly carefully quietly suddenly gradually openly rarely often patiently "
    "eventually clearly boldly gently briefly"
)
_PREPS = _words("across beyond beneath near behind beside toward within along around")
_ZH_CHARS = (
    "的一是在不了有和人这中大为上个国我以要他时来用们生到作地于出就分对成会可主发年动同工也能下过"
    "子说产种面而方后多定行学法所民得经十三之进着等部度家电力里如水化高自二理起小物现实加量都两体"
    "制机当使点从业本去把性好应开它合还因由其些然前外天政四日那社义事平形相全表间样与关各重新线内"
    "数正心反你明看原又么利比或但质气第向道命此变条只没结解问意建月公无系军很情者最立代想已通并提"
    "直题党程展五果料象员革位入常文总次品式活设及管特件长求老头基资边流路级少图山统接知较将组见计"
    "别她手角期根论运农指几九区强放决西被干做必战先回则任取据处队南给色光门即保治北造百规热领七海"
    "口东导器压志世金增争济阶油思术极交受联什认六共权收证改清美再采转更单风切打白教速花带安场身车"
    "例真务具万每目至达走积示议声报斗完类八离华名确才科张信马节话米整空元况今集温传土许步群广石记"
)

CAPTION_PROMPTS = (
    "Describe the image briefly.",
    "What is shown in this picture?",
    "Write a short caption for the image.",
    "Give a concise description of the image.",
    "Summarize the visual content of the image.",
)
VIDEO_PROMPTS = (
    "What happens in the video?",
    "Describe the video in detail.",
    "What moves across the screen?",
    "How does the background change over time?",
)


class Prose:
    """Varied pseudo-prose from small word lists (English) and common characters (Chinese)."""

    def __init__(self, rng: np.random.Generator) -> None:
        self.rng = rng

    def _pick(self, words: Sequence[str]) -> str:
        return words[int(self.rng.integers(len(words)))]

    def en_sentence(self, numbers: bool = False) -> str:
        r = self.rng
        parts = [
            "The",
            self._pick(_ADJS),
            self._pick(_NOUNS),
            self._pick(_ADVS) if r.random() < 0.4 else "",
            self._pick(_VERBS),
            "the",
            self._pick(_NOUNS),
            self._pick(_PREPS),
            "the",
            self._pick(_ADJS),
            self._pick(_NOUNS),
        ]
        if numbers or r.random() < 0.15:
            parts += ["in", str(int(r.integers(1000, 100000))), "cases"]
        if r.random() < 0.3:
            parts += ["while", "a", self._pick(_NOUNS), self._pick(_VERBS), "another"]
        return " ".join(p for p in parts if p) + "."

    def question(self) -> str:
        """An English sentence turned into a question."""
        return self.en_sentence().rstrip(".") + "?"

    def zh_sentence(self) -> str:
        n = int(self.rng.integers(8, 24))
        idx = self.rng.integers(len(_ZH_CHARS), size=n)
        chars = [_ZH_CHARS[int(i)] for i in idx]
        if n > 12:
            chars.insert(n // 2, "，")
        return "".join(chars) + "。"

    def paragraph(self, sentences: int, zh: bool = False, numbers: bool = False) -> str:
        if zh:
            return "".join(self.zh_sentence() for _ in range(sentences))
        return " ".join(self.en_sentence(numbers) for _ in range(sentences))

    def text(self, chars: int, zh: bool = False, numbers: bool = False) -> str:
        """Paragraphs separated by blank lines until at least `chars` characters."""
        out: list[str] = []
        total = 0
        while total < chars:
            para = self.paragraph(int(self.rng.integers(3, 9)), zh=zh, numbers=numbers)
            out.append(para)
            total += len(para) + 2
        return "\n\n".join(out)
