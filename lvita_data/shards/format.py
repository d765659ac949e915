"""WebDataset shard formats of lvita (versions 1, 2 and 3): member names, arrays, build files.

A build directory holds `{stage}-{NNNNNN}.tar` shards; one WebDataset sample per packed sequence,
key `{NNNNNNNNN}` (the global pack index). **Format 3**, what `lvita build` writes, has the same
three members in every pack, so that tools which type a sample by its member names (HF
``datasets``' webdataset builder infers one schema from the first samples and needs the same
names in each) read every pack:
- `arrays.npz`  the four int32 arrays as ``{name}.npy`` inside one zip, DEFLATE level 1
                (`npz_bytes`; 12 bytes per token became ~1.6), all `.npy` load with
                allow_pickle=False:
    ``input_ids``    [T] (T = pack.max_seq_len; padding = pad token `<|endoftext|>`)
    ``labels``       [T] unshifted, -100 where not supervised (padding included)
    ``position_ids`` [T] restarting per sample when pack.reset_attention, else 0..T-1
    ``cu_seqlens``   [n+1] boundaries of the n packed samples, the tail padding accounted to
                     the last one (as the original), so cu_seqlens[-1] == T
- `meta.json`   format, stage, tile format, ``num_tiles`` (every vision tile the pack's
                placeholders stand for), ``stored_tiles`` (the tiles in `media.tar`), and per
                packed sample: dataset, file, record, length, offset, ``media_order``
                (``{"kind": "image" | "video", "index": i}`` in placeholder order), images
                (size, grid, tiles, and ``member`` when the image is stored as its source
                bytes), videos (frames chosen / requested, source frames, fps). Every field
                has one JSON type in every pack (Arrow types it).
- `media.tar`   the pack's media as one uncompressed tar (`media_tar_bytes`; 1 KiB, empty, for
                a pack without media), members named as formats 1 and 2 named them:
    ``image000000.jpg``.. (``image_storage: source``, the default) each distinct source image
                     of the pack once (same bytes = same member), as the exact bytes of its file
                     or parquet cell, numbered in order of first reference (packed samples in
                     order, each sample's ``images`` in order); the extension names its format
                     (jpg, png, webp, gif, bmp, tiff, ...). The loader cuts it into tiles with
                     the original's Pillow operations (`lvita_data.media.source`), bit-identical
                     to pre-cut tiles.
    ``tile000000.png``.. stored 448x448 RGB tiles, lossless, in order of their placeholders:
                     video frames, and with ``image_storage: tiles`` every image's tiles too
                     (thumbnail first when tiled, then row-major). The loader's normalization
                     reproduces the original's float32 tensors exactly
                     (`lvita_data.media.tiles.normalize_tiles`).

A vision tile's source, walking each sample's ``media_order``: an image with a ``member`` is cut
from it, an image without one takes its ``tiles`` next stored tiles, a video its frames' next
stored tiles. Source images cost what their files cost: pre-cut image tiles are 6.6-33x the
source JPEG's bytes (a 640x480 photo: 82 kB -> 13 PNG tiles of 2.7 MB); video frames stay tiles
because decoding a long video at load time would be far too slow (~200 ms per frame sought in a
60 s 720p clip against ~7 ms to decode a stored PNG tile).

Older formats, still read (loader, verify, stats, show, Energon): **format 1** (``image_storage:
tiles`` before format 3) held one `.npy` member per array and one ``tile*`` member per tile;
**format 2** (``image_storage: source``) held `arrays.npz` and the ``image*`` / ``tile*``
members next to it. Both wrote ``media_order`` entries as ``["image", 0]`` and had a member set
that varied from pack to pack.

Tars are byte-reproducible: members sorted per sample, mtime 0 (PAX record ``mtime=0.0``),
uid/gid 0, empty user/group names, mode 0444, samples in pack order (`lvita_data.shards.tar`,
which also holds the one tar parser). Every file of a build is written atomically
(`lvita_data.fileio`). Next to the shards a build directory holds ``index.json`` (shard list,
sizes, sha256), ``manifest.yaml`` (a copy of the stage manifest under a header line naming the
source manifest: `read_build_manifest`), ``stats.json``, ``rejects.jsonl``, Energon's
``.nv-meta/`` and ``*.tar.idx``, and the build's own state in `STATE_DIR`. `sample_digest` is the
per-sample checksum the build records and `lvita verify` recomputes.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import tarfile
import zipfile
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from lvita_data.errors import ShardFormatError
from lvita_data.shards.tar import REGULAR_TYPES, scan_tar
from lvita_data.strict_yaml import expand_env

FORMAT_TILES = 1
"""Shard format whose images are stored as pre-cut tiles (``shards.image_storage: tiles``)."""
FORMAT_SOURCE = 2
"""Shard format whose images are stored as their source bytes (``image_storage: source``)."""
FORMAT_MEDIA = 3
"""Shard format with the same three members in every pack, all media in `MEDIA_TAR`: what
`lvita build` writes, with either ``image_storage``."""
SHARD_FORMATS = (FORMAT_TILES, FORMAT_SOURCE, FORMAT_MEDIA)
"""The formats the loader, verify and stats read."""
WRITTEN_FORMAT = FORMAT_MEDIA
ARRAY_MEMBERS = ("input_ids", "labels", "position_ids", "cu_seqlens")
ARRAYS_NPZ = "arrays.npz"
"""Formats 2 and 3: the four arrays in one compressed member (format 1: one ``.npy`` each)."""
MEDIA_TAR = "media.tar"
"""Format 3: the pack's image and tile members, as one uncompressed tar (`media_tar_bytes`)."""
PACK_MEMBERS = (ARRAYS_NPZ, MEDIA_TAR, "meta.json")
"""The members of every format-3 pack, and only these."""
MEDIA_NAME = re.compile(r"^(?:image|tile)\d{6}\.[a-z0-9]+\Z")
"""An image or tile member (`image_member`, `tile_member`)."""
MEDIA_KINDS = ("image", "video")
NPZ_LEVEL = 1
"""zlib level of `arrays.npz`: a pack of 4096 tokens takes ~6.6 kB instead of 49.7 kB."""
STATE_DIR = ".lvita-build"
"""The build's own state (plan, shard tasks, done records) inside its output directory."""
MANIFEST_COPY = "manifest.yaml"
BUNDLED_TOKENIZER = "qwen2.5"
_HEADER = re.compile(r"^#.*?, from (?P<source>.+)$")
"""The copy's first line (`manifest_header`); the source path follows the first ", from "."""


KEY_PATTERN = re.compile(r"^[0-9]{9}\Z")
"""A sample key (`sample_key`): the global pack number, 9 digits."""


def shard_name(stage: str, index: int) -> str:
    return f"{stage}-{index:06d}.tar"


def sample_key(pack_index: int) -> str:
    return f"{pack_index:09d}"


def tile_member(index: int, tile_format: str) -> str:
    return f"tile{index:06d}.{tile_format}"


def image_member(index: int, extension: str) -> str:
    return f"image{index:06d}.{extension}"


def media_tar_bytes(media: Mapping[str, bytes]) -> bytes:
    """A pack's `MEDIA_TAR`: one ustar member per image or tile in sorted name order (mode
    0444, mtime 0, uid/gid 0, no user or group names, no PAX records), the two zero blocks of
    the end of the archive and no record padding: 512 bytes of header and < 512 of padding per
    member, 1 KiB for a pack without media. `tarfile`, webdataset and lvita's `scan_tar` read
    it."""
    out = bytearray()
    for name in sorted(media):
        info = tarfile.TarInfo(name)
        info.size, info.mode, info.mtime = len(media[name]), 0o444, 0
        out += info.tobuf(tarfile.USTAR_FORMAT, "utf-8", "strict")
        out += media[name]
        out += bytes(-len(media[name]) % tarfile.BLOCKSIZE)
    out += bytes(2 * tarfile.BLOCKSIZE)
    return bytes(out)


def read_media_tar(data: bytes | memoryview) -> dict[str, memoryview]:
    """The members of a `MEDIA_TAR` someone handed over, by name, sliced without copies: the
    strict tar scan (`lvita_data.shards.tar.scan_tar`: every header checked, O(n / 512) steps),
    regular files only, each named as an image or tile member (`MEDIA_NAME`) at most once.
    `ShardFormatError` otherwise."""
    view = memoryview(data).cast("B")
    scan = scan_tar(view, strict=True, canonical=False, where=MEDIA_TAR)
    media: dict[str, memoryview] = {}
    for member in scan.members:
        if member.kind not in REGULAR_TYPES or not MEDIA_NAME.match(member.name):
            raise ShardFormatError(
                f"{MEDIA_TAR}: member {member.name[:80]!r} is not an image or tile"
            )
        if member.name in media:
            raise ShardFormatError(f"{MEDIA_TAR}: member {member.name!r} twice")
        media[member.name] = view[member.data_offset : member.data_offset + member.size]
    return media


def media_order(sample: Mapping[str, Any], version: int) -> list[tuple[str, int]]:
    """A packed sample's media in placeholder order as (kind, index) pairs: format 3 writes
    ``{"kind": "image", "index": 0}`` objects (one type per JSON field, which Arrow and HF
    ``datasets`` need), formats 1 and 2 wrote ``["image", 0]``. `ValueError` when malformed."""
    order = sample["media_order"]
    if not isinstance(order, list):
        raise ValueError(f"media_order {order!r} is not a list")
    pairs = []
    for entry in order:
        if version == FORMAT_MEDIA:
            ok = isinstance(entry, dict) and sorted(entry) == ["index", "kind"]
            kind, index = (entry["kind"], entry["index"]) if ok else (None, None)
        else:
            ok = isinstance(entry, list) and len(entry) == 2
            kind, index = entry if ok else (None, None)
        if kind not in MEDIA_KINDS or type(index) is not int or index < 0:
            raise ValueError(f"media_order entry {entry!r}")
        pairs.append((kind, index))
    return pairs


def npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


MAX_NPY_HEADER = 1024
"""Largest `.npy` header dict read (lvita writes 118 bytes; numpy's own default cap is 10,000)."""
_NPY_MAGIC = b"\x93NUMPY"


def load_npy(data: bytes | memoryview) -> np.ndarray:
    """The array of `.npy` bytes someone handed over, validated before anything is allocated:
    magic and version 1.0 / 2.0 / 3.0, a header of at most `MAX_NPY_HEADER` bytes holding
    exactly ``descr`` / ``fortran_order`` / ``shape``, a plain numeric dtype (bool, int,
    uint, float: no object, string, void or structured dtype, so never a pickle), dimensions
    >= 0 whose product times the item size is exactly the bytes after the header. Work and
    memory O(len(data)). `ShardFormatError` otherwise."""
    view = memoryview(data).cast("B")
    if bytes(view[:6]) != _NPY_MAGIC or len(view) < 10:
        raise ShardFormatError("not a .npy (bad magic)")
    major = view[6]
    if major == 1:
        length, start = int.from_bytes(view[8:10], "little"), 10
    elif major in (2, 3) and len(view) >= 12:
        length, start = int.from_bytes(view[8:12], "little"), 12
    else:
        raise ShardFormatError(f".npy version {major}.{view[7]}")
    if length > MAX_NPY_HEADER or start + length > len(view):
        raise ShardFormatError(f".npy header of {length} bytes (member of {len(view)})")
    header = _npy_header(bytes(view[start : start + length]), major)
    descr, fortran, shape = header["descr"], header["fortran_order"], header["shape"]
    try:
        dtype = np.dtype(descr) if isinstance(descr, str) else None
    except (TypeError, ValueError):
        dtype = None
    if dtype is None or dtype.kind not in "biuf" or dtype.fields is not None or dtype.subdtype:
        raise ShardFormatError(f".npy dtype {descr!r} is not a plain numeric dtype")
    if (
        not isinstance(shape, tuple)
        or not all(type(d) is int and d >= 0 for d in shape)
        or type(fortran) is not bool
    ):
        raise ShardFormatError(f".npy shape {shape!r} / fortran_order {fortran!r}")
    count = 1
    for dimension in shape:
        count *= dimension
    body = len(view) - start - length
    if count * dtype.itemsize != body:
        raise ShardFormatError(
            f".npy shape {shape} of {dtype} needs {count * dtype.itemsize} bytes, the member "
            f"holds {body}"
        )
    array = np.frombuffer(view, dtype=dtype, count=count, offset=start + length)
    return array.reshape(shape, order="F" if fortran else "C").copy()


def _npy_header(text: bytes, major: int) -> dict:
    """The header dict, parsed as a Python literal (`ast.literal_eval`: no code runs; bounded
    by `MAX_NPY_HEADER`)."""
    import ast

    try:
        header = ast.literal_eval(text.decode("utf-8" if major == 3 else "latin1"))
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError, UnicodeError):
        raise ShardFormatError(f".npy header does not parse: {text[:80]!r}") from None
    if not isinstance(header, dict) or sorted(header) != ["descr", "fortran_order", "shape"]:
        raise ShardFormatError(f".npy header {text[:80]!r} is not descr/fortran_order/shape")
    return header


def npz_bytes(arrays: Mapping[str, np.ndarray]) -> bytes:
    """The arrays as one reproducible `.npz` (what ``np.load`` reads): a zip of ``{name}.npy``
    members in the given order, DEFLATE level `NPZ_LEVEL`, fixed timestamps and attributes."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name, array in arrays.items():
            info = zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_DEFLATED
            info.create_system = 3  # Unix, whatever the platform writing it
            info.external_attr = 0o444 << 16
            archive.writestr(info, npy_bytes(array), compresslevel=NPZ_LEVEL)
    return buffer.getvalue()


def npz_limit(max_seq_len: int) -> int:
    """The most bytes one array of a pack's `arrays.npz` may inflate to: T + 1 int32 values (the
    longest, `cu_seqlens` of T one-token samples) and the `.npy` header. The loader and
    `lvita verify` read with this bound."""
    return 4 * (max_seq_len + 1) + 1024


def load_npz(data: bytes, names: Sequence[str], max_bytes: int) -> dict[str, np.ndarray]:
    """The arrays `names` of an `.npz` someone handed over, with bounded work: exactly those
    members, stored or DEFLATE only (bzip2 / LZMA inflate without an output bound in
    `zipfile`), each at most `max_bytes` once inflated (checked before inflating; `zipfile`
    stops a DEFLATE stream at the size the directory states), CRCs checked, each a valid `.npy`
    (`load_npy`). Work and memory O(len(data) + len(names) * max_bytes). `ShardFormatError`
    otherwise."""
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as archive:
            infos = archive.infolist()
            found = [info.filename for info in infos]
            if sorted(found) != sorted(f"{name}.npy" for name in names):
                raise ShardFormatError(f"npz members {found}, expected {list(names)}")
            too_big = [i.filename for i in infos if i.file_size > max_bytes]
            if too_big:
                raise ShardFormatError(f"npz members {too_big} inflate past {max_bytes} bytes")
            methods = {i.compress_type for i in infos} - {zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED}
            if methods:
                raise ShardFormatError(f"npz compression methods {sorted(methods)}")
            return {name: load_npy(archive.read(f"{name}.npy")) for name in names}
    except (
        zipfile.BadZipFile,
        zipfile.LargeZipFile,
        zlib.error,  # a damaged DEFLATE stream
        NotImplementedError,  # a damaged compression-method field
        RuntimeError,  # "encrypted" flag set
        KeyError,
        ValueError,
        OSError,
        EOFError,
    ) as error:
        raise ShardFormatError(f"unreadable npz: {error!r}") from None


def parse_json(data: bytes | memoryview | str, what: str) -> Any:
    """JSON someone handed over: `ShardFormatError` naming `what` for anything that is not
    UTF-8 JSON, nesting too deep for the parser (`RecursionError`) included. Work and memory
    O(len(data))."""
    try:
        return json.loads(data if isinstance(data, str) else bytes(data))
    except (ValueError, RecursionError, MemoryError) as error:
        raise ShardFormatError(f"{what}: not JSON ({type(error).__name__}: {error})") from None


def meta_bytes(meta: Mapping[str, Any]) -> bytes:
    """The canonical `meta.json` of a pack: UTF-8, keys sorted, no spaces added by indent."""
    return json.dumps(meta, ensure_ascii=False, sort_keys=True).encode()


@dataclass(frozen=True, slots=True)
class ShardInfo:
    name: str
    samples: int
    tokens: int
    """Real (non-padding) tokens of the packed samples in this shard."""
    bytes: int
    sha256: str

    def to_json(self) -> dict:
        return asdict(self)


def sample_digest(members: Mapping[str, bytes | str]) -> str:
    """sha256 over a WebDataset sample dict: `{"__key__": key, "input_ids.npy": bytes, ...}`.

    Members are taken in sorted name order, each as (name length, name, value length, value),
    so it does not depend on dict order and no two different samples share a byte stream. The
    build computes it on the dict it hands to the tar writer, verify on the members it reads.
    """
    digest = hashlib.sha256()
    for name in sorted(members):
        value = members[name]
        data = value.encode() if isinstance(value, str) else bytes(value)
        encoded = name.encode()
        digest.update(len(encoded).to_bytes(8, "little"))
        digest.update(encoded)
        digest.update(len(data).to_bytes(8, "little"))
        digest.update(data)
    return digest.hexdigest()


def manifest_header(version: str, shard_format: int, source: str | os.PathLike[str]) -> str:
    """First line of a build's `manifest.yaml` copy: lvita version, shard format, source path."""
    return f"# lvita {version}, shard format {shard_format}, from {os.fspath(source)}\n"


@dataclass(frozen=True, slots=True)
class BuildManifest:
    """A build's copy of its stage manifest (`manifest.yaml`), as written, unresolved."""

    path: Path
    text: str
    data: dict[str, Any]
    """The YAML mapping (``${VAR}`` references and relative paths as the author wrote them)."""
    source: str | None
    """The manifest the build was made from, from the header line (None without one)."""

    @property
    def tokenizer_spec(self) -> str:
        """The tokenizer: ``qwen2.5`` (bundled) or a directory, ``${VAR}`` expanded and a
        relative path resolved against the source manifest's directory, as the build did."""
        spec = expand_env(str(self.data.get("tokenizer", BUNDLED_TOKENIZER)))
        if spec == BUNDLED_TOKENIZER:
            return spec
        path = os.path.expanduser(spec)
        if os.path.isabs(path):
            return path
        if self.source is None:
            raise ShardFormatError(
                f"{self.path}: cannot resolve tokenizer {spec!r} (no source line)"
            )
        return os.path.normpath(os.path.join(os.path.dirname(self.source), path))


def read_build_manifest(out_dir: str | os.PathLike[str]) -> BuildManifest:
    """The `manifest.yaml` copy of a build directory; `ShardFormatError` when it is missing,
    unreadable or not a YAML mapping."""
    path = Path(out_dir) / MANIFEST_COPY
    try:
        text = path.read_text(encoding="utf-8")
        data = yaml.safe_load(text)
    except (OSError, UnicodeError, yaml.YAMLError, RecursionError) as error:
        raise ShardFormatError(f"{path}: cannot read the build's manifest copy: {error}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ShardFormatError(f"{path}: not a YAML mapping ({type(data).__name__})")
    header = _HEADER.match(text.split("\n", 1)[0])
    return BuildManifest(path, text, data, header.group("source").strip() if header else None)
