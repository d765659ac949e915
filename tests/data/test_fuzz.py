"""Fuzzing every reader of a build: mutated real shards give the right data or lvita's error.

A small real build (3 packs of 1024 tokens in 2 shards: captions with JPEG source images, a
video, text; shard format 3 with images as source bytes and as tiles) is copied and altered by
one `Mutation` per example (tar header bytes, crafted ustar and PAX fields with a valid
checksum, truncation, `.npy` and `.npz` headers, arrays with wrong values, `meta.json`, the
bytes of `media.tar` and of the PNG/JPEG members inside it, `index.json` entries, the manifest
copy, Energon's files), the checksums of `index.json` and the per-sample digests
rewritten to match where the mutation says so (the careful attacker of issue 15). Then every
reader runs on it in a long-lived worker process (`FuzzWorker`, started once per module: the
readers' imports and the tokenizer are paid once) with an address-space limit of
`MEMORY_LIMIT` and a wall-clock limit of `CASE_SECONDS` per case:

- the loader (`ShardLoader`, every batch, pixels decoded): the batches, whose per-pack
  invariants are checked (cu_seqlens, positions, vocabulary, labels, tile shapes), or a
  `LoaderError`;
- `lvita verify --json` and `lvita stats --json` through `pipelines.cli.run`: a documented exit
  code (verify 0 / 6, stats 0 / 3 / 5), never a traceback; verify must report a problem for
  every mutation that changed a shard or `index.json`;
- Energon: `read_layout` of each shard (a layout or `EnergonMetadataError`) and
  `check_energon_metadata` (a list of problems, never an exception).

Anything else (another exception, `MemoryError`, a hang, a dead worker) fails the example.
Deterministic: ``derandomize=True`` and `FUZZ_EXAMPLES` examples per test (``make fuzz`` sets
``LVITA_FUZZ_EXAMPLES`` far higher). The cases the fuzzer found are kept as explicit tests
(`test_regressions`).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import resource
import select
import shutil
import struct
import subprocess
import sys
import tarfile
import traceback
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path

import pytest

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from pack_media import flat, packed  # noqa: E402

FUZZ_EXAMPLES = int(os.environ.get("LVITA_FUZZ_EXAMPLES", "20"))
"""Examples per fuzz test (3 tests; ``make fuzz`` runs 500 each)."""
CASE_SECONDS = 60.0
"""Wall-clock limit of one case (every reader on one mutated build); a case takes ~0.5-2 s."""
MEMORY_LIMIT = 3 << 30
"""RLIMIT_AS of the worker process (its imports take ~1.3 GiB of address space)."""

MANIFEST = """\
schema_version: 1
stage: fuzz
seed: 3
tokenizer: qwen2.5
pack:
  max_seq_len: 1024
  reset_attention: true
  group_by: none
image:
  max_tiles: 2
  min_tiles: 1
video:
  max_frames: 2
  max_fps: 1.0
  fit_to_budget: true
rejects:
  max_rate: 0.9
  min_selected: 1
shards:
  packs_per_shard: 2
  image_storage: {storage}
datasets:
  - name: cap
    format: longvita_jsonl
    path: {root}/longvita/image_caption.jsonl
    media_root: {root}/longvita
    max_samples: 2
  - name: vid
    format: longvita_jsonl
    path: {root}/longvita/video_qa.jsonl
    media_root: {root}/longvita
    max_samples: 1
  - name: chat
    format: text_jsonl
    path: {root}/text/short_chat.jsonl
    max_samples: 3
"""

# ---------------------------------------------------------------------------------------------
# The worker: runs every reader on a build directory, in its own process, under RLIMIT_AS


def _outcome(fn) -> dict:
    """{"outcome": "ok", "value": ...}, "error" for an LvitaError, "crash" for anything else."""
    from lvita_data.errors import LvitaError

    try:
        return {"outcome": "ok", "value": fn()}
    except LvitaError as error:
        return {"outcome": "error", "type": type(error).__name__, "message": str(error)[:2000]}
    except BaseException as error:  # noqa: BLE001  (what the fuzzer is looking for)
        if isinstance(error, KeyboardInterrupt):
            raise
        return {"outcome": "crash", "type": type(error).__name__, "message": traceback.format_exc()}


def _read_with_loader(path: str) -> list:
    """Every batch of the build, each pack's invariants checked; the keys read."""
    import numpy as np

    from lvita_data.loader import ShardLoader
    from lvita_data.schema import IGNORE_INDEX
    from lvita_data.tokenizer.tokenizer import load_tokenizer

    vocab = load_tokenizer("qwen2.5").vocab_size
    loader = ShardLoader(path, batch_size=2, shuffle=False)
    keys = []
    try:
        for batch in loader:
            for b in range(batch.batch_size):
                ids, labels = batch.input_ids[b], batch.labels[b]
                cu = batch.cu_seqlens_per_pack[b]
                assert cu[0] == 0 and cu[-1] == ids.shape[0] and (np.diff(cu) > 0).all(), cu
                expected = np.arange(ids.shape[0]) - np.repeat(cu[:-1], np.diff(cu))
                assert (batch.position_ids[b] == expected).all(), "positions vs cu_seqlens"
                assert ((ids >= 0) & (ids < vocab)).all(), "ids outside the vocabulary"
                assert ((labels == IGNORE_INDEX) | (labels == ids)).all(), "labels"
            assert batch.pixel_values.shape[1:] == (3, 448, 448)
            assert batch.pixel_values.shape[0] == batch.image_token_positions.shape[0]
            keys += batch.keys
    finally:
        loader.close()
    return keys


def _run_cli(argv: list[str]) -> dict:
    from pipelines.cli import run

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = run(argv)
    return {"code": code, "stdout": out.getvalue()[-20000:], "stderr": err.getvalue()[-4000:]}


def _read_energon(path: str) -> dict:
    from lvita_data.shards.energon import check_energon_metadata, read_layout

    layouts = [read_layout(shard) for shard in sorted(Path(path).glob("*.tar"))]
    return {"problems": check_energon_metadata(path, layouts)}


def run_readers(path: str) -> dict:
    """Every reader on one build directory (see the module docstring)."""
    return {
        "loader": _outcome(lambda: _read_with_loader(path)),
        "verify": _outcome(
            lambda: _run_cli(["verify", path, "--json", "--quiet", "--workers", "1"])
        ),
        "stats": _outcome(lambda: _run_cli(["stats", path, "--json"])),
        "energon": _outcome(lambda: _read_energon(path)),
    }


def _worker_main() -> None:
    resource.setrlimit(resource.RLIMIT_AS, (MEMORY_LIMIT, MEMORY_LIMIT))
    for line in sys.stdin:
        result = run_readers(json.loads(line)["path"])
        sys.stdout.write(json.dumps(result) + "\n")
        sys.stdout.flush()


class FuzzWorker:
    """A worker process that runs `run_readers` per case, restarted after a hang or a crash."""

    def __init__(self) -> None:
        self.process: subprocess.Popen | None = None

    def _start(self) -> subprocess.Popen:
        env = {**os.environ, "OMP_NUM_THREADS": "1", "RAYON_NUM_THREADS": "1"}
        return subprocess.Popen(
            [sys.executable, __file__, "--worker"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env=env,
            cwd=Path(__file__).resolve().parents[2],
        )

    def run(self, path: Path) -> dict:
        if self.process is None or self.process.poll() is not None:
            self.process = self._start()
        process = self.process
        assert process.stdin is not None and process.stdout is not None
        process.stdin.write(json.dumps({"path": str(path)}) + "\n")
        process.stdin.flush()
        ready, _, _ = select.select([process.stdout], [], [], CASE_SECONDS)
        line = process.stdout.readline() if ready else ""
        if not line:
            self.close()
            what = "did not answer within" if not ready else "died within"
            raise AssertionError(f"the readers {what} {CASE_SECONDS} s (hang or crash)")
        return json.loads(line)

    def close(self) -> None:
        if self.process is not None:
            self.process.kill()
            self.process.wait()
            self.process = None


if __name__ == "__main__" and sys.argv[1:] == ["--worker"]:
    _worker_main()
    raise SystemExit(0)

# ---------------------------------------------------------------------------------------------
# Builds, originals and the check of one case


@dataclass(frozen=True, repr=False)
class Original:
    """An intact build and what its readers give."""

    def __repr__(self) -> str:
        return f"Original({self.path.name})"

    def _repr_pretty_(self, printer, cycle) -> None:  # Hypothesis' pretty printer
        printer.text(repr(self))

    path: Path
    results: dict
    shards: tuple[str, ...]
    headers: dict[str, tuple[tuple[int, int, str, int], ...]]
    """Per shard: (first header offset, data offset, name, size) of each member."""


@pytest.fixture(scope="module")
def worker():
    running = FuzzWorker()
    yield running
    running.close()


@pytest.fixture(scope="module")
def originals(demo_corpus, tmp_path_factory, worker) -> dict[str, Original]:
    from lvita_data.build.run import build_stage
    from lvita_data.shards.tar import scan_tar

    work = tmp_path_factory.mktemp("fuzz")
    out = {}
    for storage in ("source", "tiles"):
        manifest = work / f"{storage}.yaml"
        manifest.write_text(MANIFEST.format(root=demo_corpus[0], storage=storage), "utf-8")
        build = work / storage
        build_stage(str(manifest), str(build), workers=1, progress=False)
        index = json.loads((build / "index.json").read_text(encoding="utf-8"))
        shards = tuple(s["name"] for s in index["shards"])
        headers = {}
        for name in shards:
            scan = scan_tar((build / name).read_bytes())
            headers[name] = tuple(
                (m.header_offset, m.data_offset, m.name, m.size) for m in scan.members
            )
        results = worker.run(build)
        assert all(r["outcome"] == "ok" for r in results.values()), results
        assert results["verify"]["value"]["code"] == 0, results["verify"]
        out[storage] = Original(build, results, shards, headers)
    return out


VERIFY_CODES = (0, 6)
STATS_CODES = (0, 3, 5)


def check_case(original: Original, path: Path, results: dict, *, changed: bool) -> None:
    """The properties of one mutated build (see the module docstring)."""
    crashes = {name: r for name, r in results.items() if r["outcome"] == "crash"}
    assert not crashes, "\n".join(f"{n}: {r['message']}" for n, r in crashes.items())
    loader = results["loader"]
    if loader["outcome"] == "error":
        assert loader["type"] == "LoaderError", loader
    for name, codes in (("verify", VERIFY_CODES), ("stats", STATS_CODES)):
        value = results[name]["value"]
        assert value["code"] in codes, f"{name}: exit {value['code']}: {value['stderr']}"
        assert "Traceback" not in value["stderr"], value["stderr"]
        assert len(value["stderr"].strip().splitlines()) <= 1, value["stderr"]
    verify = results["verify"]["value"]
    if changed:
        assert verify["code"] == 6, "verify found nothing wrong with a changed build"
    if results["energon"]["outcome"] == "error":
        assert results["energon"]["type"] == "EnergonMetadataError", results["energon"]


def run_case(original: Original, mutation, tmp_path: Path, worker: FuzzWorker) -> None:
    target = tmp_path / "case"
    if target.exists():
        shutil.rmtree(target)
    shutil.copytree(original.path, target)
    changed = mutation.apply(original, target)
    results = worker.run(target)
    check_case(original, target, results, changed=changed)


# ---------------------------------------------------------------------------------------------
# Mutations


def _set_checksum(block: bytearray) -> None:
    block[148:156] = b" " * 8
    block[148:156] = b"%06o\0 " % sum(block[:512])


def _rewrite_index(target: Path, shard: str) -> None:
    """Make index.json's size and sha256 of `shard` match its bytes (the careful attacker)."""
    import hashlib

    index_path = target / "index.json"
    index = json.loads(index_path.read_text(encoding="utf-8"))
    data = (target / shard).read_bytes()
    for entry in index["shards"]:
        if entry["name"] == shard:
            entry["bytes"], entry["sha256"] = len(data), hashlib.sha256(data).hexdigest()
    index_path.write_text(json.dumps(index, indent=1), encoding="utf-8")


def _rewrite_digests(target: Path, shard: str) -> None:
    """Make the per-sample digests of `shard` match its members (the careful attacker)."""
    from lvita_data.shards.format import STATE_DIR, sample_digest

    done = target / STATE_DIR / "done" / f"{shard}.json"
    record = json.loads(done.read_text(encoding="utf-8"))
    samples: dict[str, dict[str, bytes]] = {}
    with tarfile.open(target / shard) as archive:
        for member in archive:
            key, part = member.name.split(".", 1)
            samples.setdefault(key, {"__key__": key})[part] = archive.extractfile(member).read()
    record["digests"] = {key: sample_digest(members) for key, members in samples.items()}
    done.write_text(json.dumps(record), encoding="utf-8")


@dataclass(frozen=True)
class ShardBytes:
    """Raw bytes written at an offset of a shard (or the shard cut at `truncate`)."""

    storage: str
    shard: int
    offset: int
    data: bytes = b""
    truncate: bool = False
    rewrite_index: bool = False

    def apply(self, original: Original, target: Path) -> bool:
        name = original.shards[self.shard % len(original.shards)]
        path = target / name
        data = bytearray(path.read_bytes())
        offset = self.offset % (len(data) + 1)
        if self.truncate:
            del data[offset:]
        else:
            data[offset : offset + len(self.data)] = self.data
        changed = bytes(data) != (original.path / name).read_bytes()
        path.write_bytes(bytes(data))
        if self.rewrite_index:
            _rewrite_index(target, name)
        return changed


USTAR_FIELDS = {
    "name": (0, 100),
    "size": (124, 12),
    "type": (156, 1),
    "link": (157, 100),
    "magic": (257, 6),
    "prefix": (345, 155),
    "mode": (100, 8),
}


@dataclass(frozen=True)
class HeaderField:
    """One field of a member's ustar header (or of its PAX header block) set to `value`, the
    header checksum recomputed so that only the field is wrong."""

    storage: str
    shard: int
    member: int
    field: str
    value: bytes
    pax_block: bool = False
    rewrite_index: bool = True

    def apply(self, original: Original, target: Path) -> bool:
        name = original.shards[self.shard % len(original.shards)]
        members = original.headers[name]
        header_offset, data_offset, _, _ = members[self.member % len(members)]
        block_offset = header_offset if self.pax_block else data_offset - 512
        path = target / name
        data = bytearray(path.read_bytes())
        block = bytearray(data[block_offset : block_offset + 512])
        start, length = USTAR_FIELDS[self.field]
        block[start : start + length] = self.value[:length].ljust(length, b"\0")
        _set_checksum(block)
        data[block_offset : block_offset + 512] = block
        path.write_bytes(bytes(data))
        if self.rewrite_index:
            _rewrite_index(target, name)
        return bytes(data) != (original.path / name).read_bytes()


@dataclass(frozen=True)
class PaxRecords:
    """A member's PAX data block replaced by `records` (its size field and checksum fixed)."""

    storage: str
    shard: int
    member: int
    records: bytes

    def apply(self, original: Original, target: Path) -> bool:
        name = original.shards[self.shard % len(original.shards)]
        members = original.headers[name]
        header_offset = members[self.member % len(members)][0]
        path = target / name
        data = bytearray(path.read_bytes())
        block = bytearray(data[header_offset : header_offset + 512])
        records = self.records[:512]
        block[124:136] = b"%011o\0" % len(records)
        _set_checksum(block)
        data[header_offset : header_offset + 512] = block
        data[header_offset + 512 : header_offset + 1024] = records.ljust(512, b"\0")
        path.write_bytes(bytes(data))
        _rewrite_index(target, name)
        return bytes(data) != (original.path / name).read_bytes()


def _npy(header: str, body: bytes) -> bytes:
    text = header.encode("latin1", "replace")
    total = -(-(10 + len(text) + 1) // 64) * 64
    text = text.ljust(total - 10 - 1) + b"\n"
    return b"\x93NUMPY\x01\x00" + struct.pack("<H", len(text)) + text + body


def _npz(arrays: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name, data in arrays.items():
            archive.writestr(f"{name}.npy", data, compress_type=zipfile.ZIP_DEFLATED)
    return buffer.getvalue()


@dataclass(frozen=True)
class Member:
    """One member of one pack replaced (`transform` of its bytes, see `TRANSFORMS`), the shard
    rewritten by lvita's own writer; index.json and the per-sample digests rewritten to match
    when `careful`. A pack's image and tile members (inside its media.tar) are members here too:
    when one of them is changed, media.tar is rewritten around them; when media.tar itself is,
    its bytes are kept as the transform left them."""

    storage: str
    pack: int
    member: str
    transform: str
    argument: object = None
    careful: bool = True

    def apply(self, original: Original, target: Path) -> bool:
        from lvita_data.shards.writer import write_shard

        shard_names = list(original.shards)
        packs = []
        for shard in shard_names:
            with tarfile.open(original.path / shard) as archive:
                samples: dict[str, dict[str, bytes]] = {}
                for info in archive:
                    key, part = info.name.split(".", 1)
                    samples.setdefault(key, {"__key__": key})[part] = archive.extractfile(
                        info
                    ).read()
            packs += [(shard, flat(sample)) for sample in samples.values()]
        shard, sample = packs[self.pack % len(packs)]
        parts = sorted(p for p in sample if p != "__key__")
        if self.member in parts:
            member = self.member
        else:  # a stable choice (str hashes differ from process to process)
            member = parts[zlib.crc32(self.member.encode()) % len(parts)]
        result = TRANSFORMS[self.transform](sample, member, self.argument, packs)
        if result is None:
            return False
        changed = {k: v for k, v in result.items() if v is not None}
        new_sample = packed(changed, keep_media_tar=member == "media.tar")
        by_shard = [s for sh, s in packs if sh == shard]
        position = next(i for i, s in enumerate(by_shard) if s is sample)
        by_shard = [packed(s) for s in by_shard]
        by_shard[position] = new_sample
        write_shard(str(target / shard), by_shard)
        if self.careful:
            _rewrite_index(target, shard)
            _rewrite_digests(target, shard)
        return (target / shard).read_bytes() != (original.path / shard).read_bytes()


def _t_bytes(sample, member, argument, packs):
    """Raw replacement bytes."""
    return {**sample, member: argument}


def _t_flip(sample, member, argument, packs):
    offset, value = argument
    data = bytearray(sample[member])
    if not data:
        return None
    data[offset % len(data)] = value
    return {**sample, member: bytes(data)}


def _t_truncate(sample, member, argument, packs):
    data = sample[member]
    return {**sample, member: data[: argument % (len(data) + 1)]}


def _t_drop(sample, member, argument, packs):
    return {**sample, member: None}


def _t_rename(sample, member, argument, packs):
    """The member under another part name (`argument`)."""
    return {**{k: v for k, v in sample.items() if k != member}, argument: sample[member]}


def _t_key(sample, member, argument, packs):
    """The sample under another key: a key of another pack (duplicate) or `argument`."""
    key = packs[argument][1]["__key__"] if isinstance(argument, int) else argument
    return {**sample, "__key__": key}


def _arrays_of(sample) -> dict:
    import numpy as np

    from lvita_data.shards.format import ARRAY_MEMBERS, ARRAYS_NPZ, load_npz

    if ARRAYS_NPZ in sample:
        return load_npz(sample[ARRAYS_NPZ], ARRAY_MEMBERS, 1 << 24)
    return {n: np.load(io.BytesIO(sample[f"{n}.npy"])) for n in ARRAY_MEMBERS}


def _with_arrays(sample, arrays) -> dict:
    from lvita_data.shards.format import ARRAY_MEMBERS, ARRAYS_NPZ, npy_bytes, npz_bytes

    if ARRAYS_NPZ in sample:
        return {**sample, ARRAYS_NPZ: npz_bytes({n: arrays[n] for n in ARRAY_MEMBERS})}
    return {**sample, **{f"{n}.npy": npy_bytes(arrays[n]) for n in ARRAY_MEMBERS}}


def _t_array_value(sample, member, argument, packs):
    """One element of one array set to a value: (array name, index, value)."""
    import numpy as np

    name, index, value = argument
    arrays = {k: v.copy() for k, v in _arrays_of(sample).items()}
    array = arrays[name]
    array[index % array.shape[0]] = np.int32(np.clip(value, -(2**31), 2**31 - 1))
    return _with_arrays(sample, arrays)


def _t_array_shape(sample, member, argument, packs):
    """One array replaced by a plain array of another dtype or length: (name, dtype, length)."""
    import numpy as np

    name, dtype, length = argument
    arrays = dict(_arrays_of(sample))
    arrays[name] = np.resize(arrays[name], length).astype(dtype)
    return _with_arrays(sample, arrays)


def _t_npy_header(sample, member, argument, packs):
    """One array's .npy bytes with a crafted header: (name, header dict text, body bytes)."""
    from lvita_data.shards.format import ARRAY_MEMBERS, ARRAYS_NPZ, npy_bytes

    name, header, body = argument
    crafted = _npy(header, body)
    if ARRAYS_NPZ in sample:
        arrays = _arrays_of(sample)
        encoded = {n: npy_bytes(arrays[n]) for n in ARRAY_MEMBERS}
        encoded[name] = crafted
        return {**sample, ARRAYS_NPZ: _npz(encoded)}
    return {**sample, f"{name}.npy": crafted}


def _t_meta(sample, member, argument, packs):
    """meta.json with the value at a path replaced: (path of keys / indexes, new value)."""
    path, value = argument
    meta = json.loads(sample["meta.json"])
    node = meta
    for step in path[:-1]:
        if isinstance(node, dict) and node:
            node = node[sorted(node)[step % len(node)]] if isinstance(step, int) else node.get(step)
        elif isinstance(node, list) and node:
            node = node[step % len(node)] if isinstance(step, int) else None
        if not isinstance(node, (dict, list)):
            return None
    last = path[-1]
    if isinstance(node, dict):
        key = sorted(node)[last % len(node)] if isinstance(last, int) and node else str(last)
        if value == "<delete>":
            node.pop(key, None)
        else:
            node[key] = value
    elif node:
        node[last % len(node) if isinstance(last, int) else 0] = value
    return {**sample, "meta.json": json.dumps(meta).encode()}


def _png(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height (one tiny IDAT): a decompression bomb."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        crc = zlib.crc32(kind + body)
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", crc)

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(b"\0" * 64))
        + chunk(b"IEND", b"")
    )


def _t_image(sample, member, argument, packs):
    """An image member (`image*` or `tile*`) replaced by a crafted PNG (width, height)."""
    images = sorted(p for p in sample if p.startswith(("image", "tile")))
    if not images:
        return None
    return {**sample, images[0]: _png(*argument)}


TRANSFORMS = {
    "bytes": _t_bytes,
    "flip": _t_flip,
    "truncate": _t_truncate,
    "drop": _t_drop,
    "rename": _t_rename,
    "key": _t_key,
    "array_value": _t_array_value,
    "array_shape": _t_array_shape,
    "npy_header": _t_npy_header,
    "meta": _t_meta,
    "image": _t_image,
}


@dataclass(frozen=True)
class BuildFile:
    """A file of the build other than the shards: JSON value replaced at a path, or raw bytes."""

    storage: str
    file: str
    path: tuple = ()
    value: object = None
    raw: bytes | None = None

    def apply(self, original: Original, target: Path) -> bool:
        path = target / self.file
        before = path.read_bytes() if path.exists() else None
        if self.raw is not None:
            path.write_bytes(self.raw)
        elif self.file.endswith(".json"):
            data = json.loads(before) if before else {}
            node = data
            for step in self.path[:-1]:
                if isinstance(node, dict) and node:
                    node = (
                        node[sorted(node)[step % len(node)]]
                        if isinstance(step, int)
                        else node.setdefault(step, {})
                    )
                elif isinstance(node, list) and node:
                    node = node[step % len(node)]
                else:
                    break
            if isinstance(node, dict):
                last = self.path[-1] if self.path else "x"
                key = sorted(node)[last % len(node)] if isinstance(last, int) and node else last
                if self.value == "<delete>":
                    node.pop(key, None)
                else:
                    node[key] = self.value
            elif isinstance(node, list) and node:
                node[(self.path[-1] if isinstance(self.path[-1], int) else 0) % len(node)] = (
                    self.value
                )
            path.write_text(json.dumps(data), encoding="utf-8")
        after = path.read_bytes()
        if self.file != "index.json" or after == before:
            return False
        try:  # the same JSON written another way is no change, nor is the informative "tool"
            old, new = json.loads(before), json.loads(after)
        except ValueError:
            return True
        if isinstance(old, dict) and isinstance(new, dict):
            old, new = ({k: v for k, v in d.items() if k != "tool"} for d in (old, new))
        return old != new


# ---------------------------------------------------------------------------------------------
# Strategies

storages = st.sampled_from(["source", "tiles"])
small_ints = st.integers(-3, 40)
weird_numbers = st.sampled_from(
    [0, -1, -(2**31), 2**31, 2**63, 10**18, 10**30, 1.5, float("nan"), True, None]
)
json_values = st.recursive(
    st.one_of(
        st.none(),
        st.booleans(),
        small_ints,
        weird_numbers.filter(lambda v: v == v),
        st.text(max_size=12),
        st.sampled_from(["../x", "/etc/passwd", "a/b", "image000000.jpg", "tile000000.png"]),
    ),
    lambda inner: st.one_of(
        st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=6), inner, max_size=3)
    ),
    max_leaves=6,
)
json_paths = st.lists(
    st.one_of(
        st.integers(0, 20),
        st.sampled_from(
            [
                "samples",
                "images",
                "videos",
                "grid",
                "size",
                "media_order",
                "member",
                "tiles",
                "frames",
                "shards",
                "name",
                "samples",
                "bytes",
                "max_seq_len",
                "format",
                "stage",
                "num_tiles",
                "stored_tiles",
                "offset",
                "length",
                "tile_format",
            ]
        ),
    ),
    min_size=1,
    max_size=5,
)


def octal(value: int, width: int = 12) -> bytes:
    return (b"%0*o" % (width - 1, value)) + b"\0"


def base256(value: int, width: int = 12) -> bytes:
    negative = value < 0
    body = abs(value).to_bytes(width - 1, "big")[-(width - 1) :]
    return bytes([0xFF if negative else 0x80]) + body


size_values = st.one_of(
    st.sampled_from(
        [
            octal(0),
            octal(1),
            octal(511),
            octal(512),
            octal(10**9),
            base256(10**18),
            base256(-5),
            base256(2**80),
            b"zzzzzzzzzzz\0",
            b"-0000000001\0",
            b"\0" * 12,
            b" " * 12,
            b"77777777777\0",
            b"0x10\0",
        ]
    ),
    st.integers(0, 1 << 20).map(octal),
    st.binary(min_size=12, max_size=12),
)
name_values = st.sampled_from(
    [
        b"../000000000.meta.json",
        b"/etc/000000000.meta.json",
        b"a/000000000.meta.json",
        b"000000000.meta.json",
        b"",
        b"000000000",
        b".meta.json",
        b"000000001.meta.json",
        b"\xff\xfe.meta.json",
        b"000000000.META.JSON",
        b"__x__.meta.json",
    ]
) | st.binary(max_size=100)
type_values = st.sampled_from(
    [b"0", b"\0", b"1", b"2", b"3", b"5", b"6", b"7", b"g", b"L", b"K", b"x", b"S", b"V", b"D"]
)

pax_values = st.one_of(
    st.sampled_from(
        [
            b"0 size=1\n",
            b"5 size=10\n",
            b"3 x\n",
            b"30 size=1000000000000000000\n",
            b"13 size=-512\n",
            b"11 size=zz\n",
            b"99999 size=1\n",
            b"-5 size=1\n",
            b"20 path=../../etc/x\n",
            b"23 path=/abs/m.json\n",
            b"12 size=512\n",
            b"16 mtime=0.0\n0 a\n",
            b"ab size=1\n",
            b" \n",
            b"9 size=\n",
            b"27 path=000000000.meta.json\n",
            b"11 size= 1\n",
        ]
    ),
    st.binary(max_size=80),
)


@st.composite
def shard_bytes(draw, storage: str | None = None) -> ShardBytes:
    return ShardBytes(
        storage=storage or draw(storages),
        shard=draw(st.integers(0, 1)),
        offset=draw(st.one_of(st.integers(0, 4096), st.integers(0, 1 << 18))),
        data=draw(st.binary(min_size=1, max_size=16)),
        truncate=draw(st.booleans()),
        rewrite_index=draw(st.booleans()),
    )


@st.composite
def header_fields(draw) -> HeaderField:
    field = draw(st.sampled_from(sorted(USTAR_FIELDS)))
    value = {
        "size": size_values,
        "name": name_values,
        "type": type_values,
        "link": name_values,
        "prefix": name_values,
        "magic": st.sampled_from([b"ustar\0", b"ustar ", b"xxxxx\0", b""]),
        "mode": st.binary(min_size=8, max_size=8),
    }[field]
    return HeaderField(
        storage=draw(storages),
        shard=draw(st.integers(0, 1)),
        member=draw(st.integers(0, 20)),
        field=field,
        value=draw(value),
        pax_block=draw(st.booleans()),
        rewrite_index=draw(st.booleans()),
    )


@st.composite
def pax_records(draw) -> PaxRecords:
    return PaxRecords(
        draw(storages), draw(st.integers(0, 1)), draw(st.integers(0, 20)), draw(pax_values)
    )


npy_headers = st.one_of(
    st.sampled_from(
        [
            "{'descr': '|O', 'fortran_order': False, 'shape': (4,), }",
            "{'descr': '<f8', 'fortran_order': False, 'shape': (1024,), }",
            "{'descr': '<i4', 'fortran_order': False, 'shape': (1000000000000,), }",
            "{'descr': '<i4', 'fortran_order': False, 'shape': (-1,), }",
            "{'descr': '<i4', 'fortran_order': True, 'shape': (32, 32), }",
            "{'descr': '>i4', 'fortran_order': False, 'shape': (1024,), }",
            "{'descr': '<i4', 'fortran_order': False, 'shape': (2000,), }",
            "{'descr': [('a', '<i4')], 'fortran_order': False, 'shape': (1024,), }",
            "{'descr': '<U1', 'fortran_order': False, 'shape': (1024,), }",
            "{'descr': 'V4', 'fortran_order': False, 'shape': (1024,), }",
            "{'descr': '<i4', 'shape': (1024,), }",
            "__import__('os').system('true')",
            "{'descr': '<i4', 'fortran_order': False, 'shape': (1024,), 'x': 1}",
            "[1, 2]",
            "{",
        ]
    ),
    st.text(max_size=60),
)


@st.composite
def members(draw) -> Member:
    transform = draw(st.sampled_from(sorted(TRANSFORMS)))
    member = draw(
        st.sampled_from(
            [
                "meta.json",
                "arrays.npz",
                "media.tar",
                "input_ids.npy",
                "cu_seqlens.npy",
                "image000000.jpg",
                "tile000000.png",
                "tile000001.png",
                "labels.npy",
            ]
        )
    )
    argument = {
        "bytes": st.binary(max_size=64),
        "flip": st.tuples(st.integers(0, 1 << 17), st.integers(0, 255)),
        "truncate": st.integers(0, 1 << 17),
        "drop": st.none(),
        "rename": st.sampled_from(
            [
                "tile000009.png",
                "image000001.jpg",
                "media.tar",
                "x.npy",
                "meta.txt",
                "arrays.npz",
                "tile000000.jpg",
                "..",
                "a/b.json",
                "input_ids.npy",
            ]
        ),
        "key": st.one_of(
            st.integers(0, 2),
            st.sampled_from(["../000000000", "x", "", "000000009", "/abs", "a/b", "000000000/x"]),
        ),
        "array_value": st.tuples(
            st.sampled_from(["input_ids", "labels", "position_ids", "cu_seqlens"]),
            st.integers(0, 2000),
            st.one_of(
                st.integers(-200, 2000),
                st.sampled_from([-100, -1, 151643, 160000, 10**9, -(2**31)]),
            ),
        ),
        "array_shape": st.tuples(
            st.sampled_from(["input_ids", "labels", "position_ids", "cu_seqlens"]),
            st.sampled_from(["<i4", "<i8", "<f4", "|u1", ">i4", "<i2"]),
            st.sampled_from([0, 1, 2, 3, 1023, 1024, 1025, 4096]),
        ),
        "npy_header": st.tuples(
            st.sampled_from(["input_ids", "labels", "position_ids", "cu_seqlens"]),
            npy_headers,
            st.binary(max_size=64) | st.just(bytes(4096)),
        ),
        "meta": st.tuples(json_paths, json_values | st.just("<delete>")),
        "image": st.tuples(
            st.sampled_from([1, 447, 448, 640, 4096, 100000, 2**31 - 1]),
            st.sampled_from([1, 448, 480, 100000, 2**31 - 1]),
        ),
    }[transform]
    return Member(
        draw(storages),
        draw(st.integers(0, 2)),
        member,
        transform,
        draw(argument),
        draw(st.booleans()),
    )


BUILD_FILES = [
    "index.json",
    "manifest.yaml",
    "stats.json",
    "rejects.jsonl",
    ".nv-meta/.info.json",
    ".nv-meta/split.yaml",
    ".nv-meta/dataset.yaml",
    ".nv-meta/index.sqlite",
    ".nv-meta/index.uuid",
    "fuzz-000000.tar.idx",
    ".lvita-build/done/fuzz-000000.tar.json",
    ".lvita-build/plan.json",
]
raw_contents = st.one_of(
    st.sampled_from(
        [
            b"",
            b"\xff\xfe\x00",
            b"[]",
            b"null",
            b"{}",
            b"1e999",
            b'{"format": 2}',
            b"!!python/object/apply:os.system ['true']\n",
            b"tokenizer: !!python/name:os.system\n",
            b"# lvita 0.1.0, shard format 2, from /x.yaml\ntokenizer: /nonexistent\npack: {}\n",
            b"# lvita 0.1.0, shard format 2, from /x.yaml\ntokenizer: [1]\n",
            b"# lvita 0.1.0, shard format 2, from /x.yaml\ntokenizer: ../../etc\n",
            b"# x\npack: [1, 2]\nshards: 5\n",
            b"a: &a [*a]\n",
            b"split_parts: {train: ['{a..zzzzzzzz}']}\n",
            b"split_parts: {train: ['{1..99999999}']}\n",
            b'{"shard_counts": {"fuzz-000000.tar": -1}}',
            b"SQLite format 3\x00" + bytes(200),
            b'{"dataset": 1}\n{',
        ]
    ),
    st.binary(max_size=64),
)


@st.composite
def build_files(draw) -> BuildFile:
    file = draw(st.sampled_from(BUILD_FILES))
    if draw(st.booleans()) or not file.endswith(".json"):
        return BuildFile(draw(storages), file, raw=draw(raw_contents))
    return BuildFile(
        draw(storages), file, tuple(draw(json_paths)), draw(json_values | st.just("<delete>"))
    )


# ---------------------------------------------------------------------------------------------
# Tests

FUZZ = settings(
    max_examples=FUZZ_EXAMPLES,
    derandomize=True,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
    print_blob=True,
)


@pytest.mark.timeout(300 + 10 * FUZZ_EXAMPLES)
@FUZZ
@given(mutation=st.one_of(shard_bytes(), header_fields(), pax_records()))
def test_fuzz_tar_bytes_and_headers(originals, worker, tmp_path, mutation):
    run_case(originals[mutation.storage], mutation, tmp_path, worker)


@pytest.mark.timeout(300 + 10 * FUZZ_EXAMPLES)
@FUZZ
@given(mutation=members())
def test_fuzz_members(originals, worker, tmp_path, mutation):
    run_case(originals[mutation.storage], mutation, tmp_path, worker)


@pytest.mark.timeout(300 + 10 * FUZZ_EXAMPLES)
@FUZZ
@given(mutation=build_files())
def test_fuzz_build_files(originals, worker, tmp_path, mutation):
    run_case(originals[mutation.storage], mutation, tmp_path, worker)


REGRESSIONS = {
    # what the fuzzer found before the fixes of issue 15 (the reader and the exception it threw)
    "damaged PNG tile (loader: ValueError)": Member(
        "tiles", 1, "tile000000.png", "flip", (158, 204)
    ),
    "1x1 PNG tile (loader: ValueError)": Member("tiles", 1, "tile000000.png", "image", (1, 1)),
    "PNG tile claiming 10^10 pixels (loader: DecompressionBombError)": Member(
        "tiles", 1, "tile000000.png", "image", (100000, 100000)
    ),
    "JPEG claiming 2^62 pixels (loader: bomb)": Member(
        "source", 1, "image000000.jpg", "image", (2**31 - 1, 2**31 - 1)
    ),
    ".npy header '{' (loader: tokenize.TokenError)": Member(
        "source", 1, "arrays.npz", "npy_header", ("input_ids", "{", b"\x1c\x8e")
    ),
    "object .npy (loader)": Member(
        "tiles",
        0,
        "input_ids.npy",
        "npy_header",
        ("input_ids", "{'descr': '|O', 'fortran_order': False, 'shape': (4,), }", bytes(64)),
    ),
    "position_ids off cu_seqlens (loader: silent)": Member(
        "tiles", 0, "position_ids.npy", "array_value", ("position_ids", 2000, 151643), False
    ),
    "shifted document boundary (loader: silent)": Member(
        "source", 2, "arrays.npz", "array_value", ("cu_seqlens", 1, 40)
    ),
    "token id outside the vocabulary (loader: silent)": Member(
        "tiles", 1, "input_ids.npy", "array_value", ("input_ids", 5, 160000)
    ),
    "label neither -100 nor the id (loader: silent)": Member(
        "tiles", 0, "labels.npy", "array_value", ("labels", 287, -31)
    ),
    "duplicate sample key across shards (loader: silent)": Member(
        "source", 2, "meta.json", "key", 0
    ),
    "sample key with a path (loader)": Member("source", 0, "meta.json", "key", "../000000000"),
    "num_tiles 10^18 (verify: hang)": Member(
        "tiles", 0, "meta.json", "meta", (["num_tiles"], 10**18)
    ),
    "meta.json nested 100,000 deep (RecursionError)": Member(
        "source", 0, "meta.json", "bytes", b"[" * 100_000
    ),
    "index.json a number (loader: TypeError)": BuildFile("tiles", "index.json", raw=b"2"),
    "index.json not UTF-8 (loader: UnicodeDecodeError)": BuildFile(
        "source", "index.json", raw=b"\xc1"
    ),
    "negative sample count (loader: 9 batches became 1)": BuildFile(
        "source", "index.json", ("shards", 0, "samples"), -1
    ),
    "shard path outside the build (loader: read it)": BuildFile(
        "source", "index.json", ("shards", 0, "name"), "../source/fuzz-000000.tar"
    ),
    "max_seq_len a string (stats: ValueError)": BuildFile(
        "tiles", "index.json", ("max_seq_len",), "1024"
    ),
    "rejects.jsonl a list (verify: AttributeError)": BuildFile("tiles", "rejects.jsonl", raw=b"[]"),
    "rejects.jsonl not UTF-8 (verify: UnicodeDecodeError)": BuildFile(
        "source", "rejects.jsonl", raw=b"\xe7"
    ),
    "split.yaml {1..99999999} (verify: MemoryError)": BuildFile(
        "source", ".nv-meta/split.yaml", raw=b"split_parts: {train: ['{1..99999999}']}\n"
    ),
    "split.yaml python tag (verify: ConstructorError)": BuildFile(
        "source", ".nv-meta/split.yaml", raw=b"split_parts: !!python/name:os.system\n"
    ),
    "manifest tokenizer that does not exist (loader: SourceError)": BuildFile(
        "source",
        "manifest.yaml",
        raw=b"# lvita 0.1.0, shard format 2, from /x.yaml\ntokenizer: /nonexistent\npack: {}\n",
    ),
    "PAX size pointing backwards (verify: hang)": PaxRecords("source", 0, 1, b"13 size=-512\n"),
    "zero-length PAX record (hang)": PaxRecords("tiles", 1, 0, b"0 size=1\n"),
    "ustar size 10^18": HeaderField("source", 0, 2, "size", base256(10**18)),
}


@pytest.mark.parametrize("case", sorted(REGRESSIONS))
def test_regressions(originals, worker, tmp_path, case):
    mutation = REGRESSIONS[case]
    run_case(originals[mutation.storage], mutation, tmp_path, worker)
