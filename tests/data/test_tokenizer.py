"""Tests of lvita_data.tokenizer.tokenizer: tiktoken parity over the same ranks, ids, cache,
local dirs."""

from __future__ import annotations

import json
import os
import pickle
import random
import subprocess
import sys
import time
import unicodedata
from pathlib import Path

import pytest

from lvita_data.errors import SourceError
from lvita_data.tokenizer import tokenizer as tokmod
from lvita_data.tokenizer.special_tokens import (
    LONGVITA_SPECIAL_TOKENS,
    QWEN25_SPECIAL_TOKENS,
    SpecialIds,
)

tiktoken = pytest.importorskip("tiktoken")
load_tiktoken_bpe = pytest.importorskip("tiktoken.load").load_tiktoken_bpe

# Written out again (not imported) so the reference does not share the module's constant.
PAT_REF = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
    r"""|\s*[\r\n]+|\s+(?!\S)|\s+"""
)
ALL_SPECIALS = QWEN25_SPECIAL_TOKENS + LONGVITA_SPECIAL_TOKENS
REPO_ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("lvita-cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LVITA_CACHE_DIR", str(d))
        mp.setenv("TIKTOKEN_CACHE_DIR", "")  # tiktoken: read the local file, copy it nowhere
        yield d


@pytest.fixture(scope="module")
def converted(cache_dir):
    """(tokenizer, seconds) of a first load in a fresh cache dir, i.e. a real conversion."""
    assert not list(cache_dir.rglob("*.json"))
    t0 = time.perf_counter()
    tok = tokmod.load_tokenizer("qwen2.5")
    return tok, time.perf_counter() - t0


@pytest.fixture(scope="module")
def tok(converted):
    return converted[0]


@pytest.fixture(scope="module")
def ref(cache_dir):
    ranks = load_tiktoken_bpe(str(tokmod.bundled_tiktoken_path()))
    specials = {t: 151_643 + i for i, t in enumerate(ALL_SPECIALS)}
    return tiktoken.Encoding(
        name="qwen2.5-longvita-ref", pat_str=PAT_REF, mergeable_ranks=ranks, special_tokens=specials
    )


def ref_encode(ref, text: str) -> list[int]:
    return ref.encode(unicodedata.normalize("NFC", text), allowed_special="all")


CURATED = {
    "empty": "",
    "prose": (
        'The quick brown fox jumps over the lazy dog. It\'s 3:45 p.m.; "quotes" & (parens)—dashes…'
    ),
    "chinese": "长视频理解需要模型在百万级别的上下文中保持准确，同时兼顾短上下文的性能。",
    "japanese": "東京は日本の首都です。ひらがな、カタカナ、漢字を混ぜて書きます。ｶﾀｶﾅ半角",
    "korean": "안녕하세요, 세계! 한국어 문장입니다.",
    "arabic_hindi_thai": "مرحبا بالعالم — नमस्ते दुनिया — สวัสดีชาวโลก",
    "python": (
        "def f(x):\n    if x > 0:\n        return x ** 2  # square\n\treturn -x\n\n\n"
        "class A:\n\tpass\n"
    ),
    "tabs_crlf": "a\tb\t\tc\r\nd\r\n\r\n\te",
    "emoji_zwj": "family 👨\u200d👩\u200d👧\u200d👦 ok 🏳️\u200d🌈 👩🏽\u200d💻 👍🏻👍🏿 🇯🇵🇺🇸 ❤️",
    "spaces": "a    b     c  ",
    "newlines": "\n\n\n",
    "space_nl_space": " \n ",
    "trailing": "end with spaces   ",
    "leading": "   start",
    "only_spaces": "        ",
    "mixed_ws": " \t \n\u00a0\u3000x\u2009y\u0085z\u2028",
    "numbers": "1234567 and 3.14159, 1,000,000; ２０２４年; ٣٤٥",
    "contractions": "I'LL don't We've she'S they'Re it'D I'M you'll 'tis",
    "mixed_scripts": "Hello世界Привет мир123abcΩμέγα",
    "image_tag": "<image>\nDescribe the image.",
    "im_end": "answer<|im_end|>\n",
    "chat": "<|im_start|>user\n<image>\n<video>\nWhat happens?<|im_end|>\n<|im_start|>assistant\n",
    "all_specials": "".join(ALL_SPECIALS),
    "specials_in_words": "x<img>y</img>z<IMG_CONTEXT><IMG_CONTEXT>w <box>1,2</box> <|endoftext|>",
    "special_lookalikes": "<imag> <image <|im_end| <IMG_CONTEXT >",
    "combining": "Cafe\u0301 e\u0301 A\u030a n\u0303 o\u0308\u0304",
    "hangul_jamo": "\u1112\u1161\u11ab\u1100\u1173\u11af",
    "singletons": "\u212b \u2126 \u212a",  # Angstrom/Ohm/Kelvin signs: NFC maps them to letters
    "ligature": "ﬁne ﬂow",  # NFC keeps compatibility ligatures
    "long_run": "a" * 2000 + " " + "=" * 300 + "\n" * 50,
    "url_json": 'see https://example.com/a?b=c&d=e {"k": [1, 2.5e-3, null]}',
    "long_s": "'ſ 'K 'ſt",  # case-insensitive contraction alternatives vs Unicode case folding
}


@pytest.mark.parametrize("name", sorted(CURATED))
def test_parity_curated(tok, ref, name):
    text = CURATED[name]
    assert tok.encode(text) == ref_encode(ref, text)


# Printable ranges of several scripts (+ combining marks, emoji modifiers) and whitespace.
RANGES = [
    (0x21, 0x7E),
    (0xA1, 0x17F),
    (0x300, 0x36F),
    (0x391, 0x3C9),
    (0x410, 0x44F),
    (0x5D0, 0x5EA),
    (0x621, 0x64A),
    (0x900, 0x97F),
    (0xE01, 0xE5B),
    (0x1100, 0x1175),
    (0x2000, 0x206F),
    (0x3041, 0x30FF),
    (0x4E00, 0x9FFF),
    (0xAC00, 0xD7A3),
    (0xFF10, 0xFF5A),
    (0x1F300, 0x1F64F),
    (0x1F3FB, 0x1F3FF),
]
WHITESPACE = [" ", "  ", "   ", "\t", "\n", "\r\n", "\n\n", "\u00a0", "\u3000", "\u0085", "\u200d"]
INSERTS = ["<image>", "<|im_end|>", "<video>", "'s", "'LL", "123"]


def random_texts(n: int, seed: int = 1234) -> list[str]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        pieces: list[str] = []
        for _ in range(rng.randint(1, 60)):
            x = rng.random()
            if x < 0.2:
                pieces.append(rng.choice(WHITESPACE))
            elif x < 0.24:
                pieces.append(rng.choice(INSERTS))
            else:
                c = chr(rng.randint(*rng.choice(RANGES)))
                # NFC of the whole text would fuse ">" + U+0338 into "≯" and destroy a special
                # token written just before it; see test_combining_mark_after_special.
                if c == "\u0338" and pieces and pieces[-1].endswith(">"):
                    continue
                pieces.append(c)
        out.append("".join(pieces))
    return out


RANDOM = random_texts(400)


def test_parity_random(tok, ref):
    mismatches = [t for t in RANDOM if tok.encode(t) != ref_encode(ref, t)]
    assert not mismatches, f"{len(mismatches)} mismatches, first: {mismatches[0]!r}"


def hf_encode(tok, text: str) -> list[int]:
    return tok.backend.encode(text, add_special_tokens=False).ids


def test_tokenizers_backend_parity(tok, ref):
    """The converted `tokenizers` model itself (used for non-ASCII text) equals tiktoken."""
    texts = list(CURATED.values()) + RANDOM
    mismatches = [t for t in texts if hf_encode(tok, t) != ref_encode(ref, t)]
    assert not mismatches, f"{len(mismatches)} mismatches, first: {mismatches[0]!r}"


def random_ascii_texts(count: int) -> list[str]:
    rng = random.Random(7)
    pieces = [
        "Hello",
        " world",
        "  ",
        "\n",
        "\n\n\n",
        "\t",
        " \n ",
        "I'LL",
        "don't",
        "x=1;",
        "1234567",
        "<image>",
        "<video>",
        "<|im_end|>",
        "<img>",
        "  def f(a):\n    return a",
        "'s",
        "'Re",
        "!!!",
        "...",
        "--",
        "~",
        "\r\n",
        "A" * 40,
        " " * 17,
        "<vid",
        "<|im_",
    ]
    chars = [chr(c) for c in range(0, 128)]
    texts = []
    for _ in range(count):
        parts = [
            rng.choice(pieces) if rng.random() < 0.6 else rng.choice(chars)
            for _ in range(rng.randint(1, 30))
        ]
        texts.append("".join(parts))
    return texts


def test_ascii_fast_path_equals_tokenizers(tok):
    """ASCII text goes through tiktoken over the same ranks; it must equal the HF pipeline."""
    texts = [t for t in CURATED.values() if t.isascii()] + random_ascii_texts(3000)
    assert all(t.isascii() for t in texts) and len(texts) > 3000
    assert [tok.encode(t) for t in texts] == [hf_encode(tok, t) for t in texts]
    assert tok.encode_batch(texts) == [hf_encode(tok, t) for t in texts]


def test_encode_batch_equals_encode(tok):
    texts = list(CURATED.values()) + RANDOM
    assert tok.encode_batch(texts) == [tok.encode(t) for t in texts]
    assert tok.encode_batch(iter(texts[:3])) == [tok.encode(t) for t in texts[:3]]
    assert tok.encode_batch([]) == []


@pytest.mark.parametrize("text", list(CURATED.values()) + RANDOM[:100])
def test_decode_roundtrip(tok, text):
    assert tok.decode(tok.encode(text)) == unicodedata.normalize("NFC", text)


def test_anchor_ids(tok, ref):
    anchors = {
        "<|endoftext|>": 151643,
        "<|im_start|>": 151644,
        "<|im_end|>": 151645,
        "<img>": 151665,
        "<video>": 151681,
    }
    for text, id_ in anchors.items():
        assert tok.token_to_id(text) == id_
        assert tok.encode(text) == [id_] == ref_encode(ref, text)
    assert tok.encode("\n") == [198] == ref_encode(ref, "\n")
    assert tok.encode("Hello world") == [9707, 1879] == ref_encode(ref, "Hello world")
    for i, t in enumerate(ALL_SPECIALS):
        assert tok.token_to_id(t) == 151_643 + i
        assert tok.id_to_token(151_643 + i) == t
    assert tok.vocab_size == len(tok) == 151_682


def test_special_ids(tok):
    s = tok.special_ids
    assert isinstance(s, SpecialIds)
    assert (s.pad, s.im_start, s.im_end, s.newline) == (151643, 151644, 151645, 198)
    longvita = [
        s.img_start,
        s.img_end,
        s.img_context,
        s.vid_start,
        s.vid_end,
        s.vid_context,
        s.patch_start,
        s.patch_end,
        s.patch_context,
    ]
    assert longvita == list(range(151665, 151674))
    assert (s.image_tag, s.video_tag) == (151680, 151681)
    assert s.vision_context_ids == (151667, 151673, 151670)
    assert tok.name == "qwen2.5"


def test_pipeline_is_qwen2_like(tok):
    d = json.loads(tok.backend.to_str())
    assert d["normalizer"] == {"type": "NFC"}
    split, byte_level = d["pre_tokenizer"]["pretokenizers"]
    assert split["type"] == "Split" and split["pattern"] == {"Regex": PAT_REF}
    assert (split["behavior"], split["invert"]) == ("Isolated", False)
    assert byte_level["type"] == "ByteLevel"
    assert (byte_level["add_prefix_space"], byte_level["use_regex"]) == (False, False)
    assert d["post_processor"] is None
    assert d["decoder"]["type"] == "ByteLevel"
    model = d["model"]
    assert model["type"] == "BPE" and len(model["vocab"]) == 151_643
    merges = model["merges"]
    assert len(merges) == 151_643 - 256  # one merge per non-byte token, as Qwen2's merges.txt
    first = [" ".join(m) if isinstance(m, list) else m for m in merges[:4]]
    assert first == ["Ġ Ġ", "ĠĠ ĠĠ", "i n", "Ġ t"]
    added = d["added_tokens"]
    assert [a["content"] for a in added] == list(ALL_SPECIALS)
    assert all(a["special"] and not a["normalized"] for a in added)
    assert not any(a["lstrip"] or a["rstrip"] or a["single_word"] for a in added)


def test_nfc_is_applied(tok):
    assert tok.encode("e\u0301") == tok.encode("\u00e9")
    assert tok.encode("Cafe\u0301") == tok.encode("Café")
    assert tok.encode("\u212b") == tok.encode("\u00c5")
    assert tok.encode("\u1112\u1161\u11ab") == tok.encode("한")
    assert tok.encode("ﬁ") != tok.encode("fi")  # NFC, not NFKC


def test_combining_mark_after_special(tok, ref):
    # Added tokens are matched on the raw text before NFC, so "<image>" survives a following
    # U+0338, which NFC of the whole text would have fused with ">" into "≯".
    text = "<image>\u0338"
    assert tok.encode(text) == [tok.special_ids.image_tag, *tok.encode("\u0338")]
    assert unicodedata.normalize("NFC", text) == "<image\u226f"
    assert tok.special_ids.image_tag not in ref_encode(ref, text)


def test_nfc_tables_of_tokenizers(tok, ref):
    # `tokenizers` normalizes with older Unicode tables than Python: NKo U+07FD (Unicode 11) is
    # not reordered before U+07F3 there, while Python's NFC is. Whatever the normalizer does, the
    # ids are tiktoken's ids of the text as `tokenizers` normalized it.
    text = "x\u07f3\u07fd y"
    hf_nfc = tok.backend.normalizer.normalize_str(text)
    assert tok.encode(text) == ref.encode(hf_nfc)
    assert tok.decode(tok.encode(text)) == hf_nfc


def test_pickle_reloads_from_spec(tok):
    blob = pickle.dumps(tok)
    assert len(blob) < 200  # the spec, not the vocabulary
    assert pickle.loads(blob) is tok  # same process: the in-process cache answers
    assert tokmod.load_tokenizer() is tok


def _plain_qwen25_json(tok) -> dict:
    d = json.loads(tok.backend.to_str())
    d["added_tokens"] = [a for a in d["added_tokens"] if a["content"] in QWEN25_SPECIAL_TOKENS]
    assert len(d["added_tokens"]) == 22
    return d


def test_local_dir_adds_longvita_tokens(tok, tmp_path):
    (tmp_path / "tokenizer.json").write_text(json.dumps(_plain_qwen25_json(tok)), encoding="utf-8")
    local = tokmod.load_tokenizer(str(tmp_path))
    assert local is not tok and local.name == str(tmp_path)
    for i, t in enumerate(LONGVITA_SPECIAL_TOKENS):
        assert local.token_to_id(t) == 151_665 + i
    assert local.vocab_size == 151_682
    assert local.special_ids == tok.special_ids
    texts = list(CURATED.values()) + RANDOM[:50]
    assert local.encode_batch(texts) == tok.encode_batch(texts)
    assert pickle.loads(pickle.dumps(local)) is local
    assert tokmod.load_tokenizer(tmp_path / "tokenizer.json").special_ids == tok.special_ids


def test_local_dir_keeps_existing_ids(tok, tmp_path):
    # A checkpoint that already has some Long-VITA tokens, at other ids, plus an extra token.
    d = _plain_qwen25_json(tok)
    present = list(reversed(LONGVITA_SPECIAL_TOKENS[:5])) + ["<extra>"]
    for i, t in enumerate(present):
        d["added_tokens"].append(
            {
                "id": 151_665 + i,
                "content": t,
                "single_word": False,
                "lstrip": False,
                "rstrip": False,
                "normalized": False,
                "special": True,
            }
        )
    (tmp_path / "tokenizer.json").write_text(json.dumps(d), encoding="utf-8")
    local = tokmod.load_tokenizer(str(tmp_path))
    for i, t in enumerate(present):
        assert local.token_to_id(t) == 151_665 + i
    missing = LONGVITA_SPECIAL_TOKENS[5:]
    assert [local.token_to_id(t) for t in missing] == list(range(151_671, 151_671 + len(missing)))
    assert local.special_ids.img_start == 151_669
    assert local.encode("<image><img>") == [local.token_to_id("<image>"), 151_669]


def test_local_dir_errors(tmp_path):
    with pytest.raises(SourceError, match="tokenizer.json") as e:
        tokmod.load_tokenizer(str(tmp_path))
    assert str(tmp_path) in str(e.value)
    with pytest.raises(SourceError, match="nor an existing directory"):
        tokmod.load_tokenizer(str(tmp_path / "nope"))
    with pytest.raises(SourceError, match="nor an existing directory"):
        tokmod.load_tokenizer("Qwen/Qwen2.5-14B-Instruct")
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "tokenizer.json").write_text("{not json", encoding="utf-8")
    with pytest.raises(SourceError, match="cannot load tokenizer"):
        tokmod.load_tokenizer(str(bad))


def test_cache_file_used_by_fresh_process(converted, cache_dir):
    tok, conversion_s = converted
    files = sorted((cache_dir / "tokenizers").iterdir())
    assert [f.name for f in files] == [f.name for f in files if not f.name.startswith(".tmp")]
    assert len(files) == 1 and files[0].name.startswith("qwen2.5-longvita-")
    assert files[0].name.endswith(f"-v{tokmod.FORMAT_VERSION}.json")
    mtime = files[0].stat().st_mtime_ns
    child = (
        "import time, lvita_data.tokenizer.tokenizer as m\n"
        "def boom(*a, **k):\n"
        "    raise AssertionError('converted again instead of reading the cache')\n"
        "m.convert_tiktoken = boom\n"
        "t0 = time.perf_counter()\n"
        "tok = m.load_tokenizer('qwen2.5')\n"
        "dt = time.perf_counter() - t0\n"
        "print(dt, tok.encode('Hello world<image>'))\n"
    )
    env = {**os.environ, "LVITA_CACHE_DIR": str(cache_dir)}
    out = subprocess.run(
        [sys.executable, "-c", child],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    ).stdout.split(maxsplit=1)
    cached_s = float(out[0])
    assert out[1].strip() == "[9707, 1879, 151680]"
    assert files[0].stat().st_mtime_ns == mtime
    assert cached_s < conversion_s, (cached_s, conversion_s)
