"""`lvita build`: a stage manifest -> packed, checksummed WebDataset shards (resumable).

1. Check the output directory before any work: a directory that holds a build needs `--resume`,
   and then the manifest hash saved with it must match; a non-empty directory that holds no build
   is refused. The build holds an exclusive lock (`.lvita-build/lock`, `lockf`) while it runs.
2. Plan (`planner.plan_stage`): exact lengths per selected sample, rejects with reasons.
3. Pack (`packing.plan_packs`): best-fit-decreasing per packing group (`pack.group_by`), with
   `pack.align` and `pack.max_tiles`, packs shuffled with the stage seed.
4. Shard: packs in order, `shards.packs_per_shard` per shard. The build plan (which sample goes
   into which pack and shard) is a pure function of the manifest and the data, and is saved in
   `.lvita-build/plan.json` together with the manifest's hash; a resumed build recomputes it and
   refuses to go on if it differs (the data changed).
5. Write: each shard is one task (`--executor local`: this process or a pool of `--workers`
   processes; `--executor ray`: Ray tasks, `ray.init(num_cpus=workers)` locally, or the cluster
   of `RAY_ADDRESS`). A task reads its records once each in (file, row) order, tokenizes them,
   decodes and tiles the pixels (the only place pixels are touched), assembles the packs, writes
   the tar under a temporary name and renames it, then writes its completion record
   `.lvita-build/done/{shard}.json` (atomically too) and returns it as a plain dict. A sample
   whose pixels fail to decode here (e.g. a JPEG truncated after a valid header) leaves its pack
   with a counted reject. Shard bytes depend only on the build plan, never on the worker count,
   the executor or the order tasks finish in.
6. Finish: leftover temporaries are removed, then `rejects.jsonl`, `stats.json`, `manifest.yaml`
   (a copy, tool version in its header), Energon's `.nv-meta/` and last `index.json` (per shard:
   name, samples, tokens, bytes, sha256) are written atomically.

`--resume` removes temporaries, keeps shards whose completion record and file size match (they
are not rewritten) and redoes the rest; after a `kill -9` at any point the finished directory,
`.lvita-build/` included, is byte-identical to an uninterrupted build. Pool workers exit when the
build process dies, so a killed build leaves no writer behind.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass, field, replace
from functools import lru_cache
from pathlib import Path

import numpy as np
from tqdm import tqdm

from lvita_data import __version__
from lvita_data.build.plan import StagePlan, _tokenizer_and_template, plan_stage
from lvita_data.errors import BuildError, SkipSample
from lvita_data.fileio import TEMP_MARKER, write_json_atomic, write_text_atomic
from lvita_data.manifest import StageManifest, load_manifest
from lvita_data.media.tiles import encode_tiles, sample_tiles
from lvita_data.packing.assemble import assemble_pack
from lvita_data.packing.plan import plan_packs
from lvita_data.pool import watch_parent
from lvita_data.records import open_source
from lvita_data.samples.tokenize import SampleRules, tokenize_record
from lvita_data.schema import RawRecord, Reject, RejectReason, TokenizedSample
from lvita_data.shards.energon import write_energon_metadata
from lvita_data.shards.format import (
    SHARD_FORMAT_VERSION,
    STATE_DIR,
    ShardInfo,
    npy_bytes,
    sample_digest,
    sample_key,
    shard_name,
    tile_member,
)
from lvita_data.shards.writer import write_shard
from lvita_data.stats.compute import compute_stats

LOCK_WAIT_S = 5.0
"""How long a build waits for the lock of its output directory before giving up."""


@dataclass(frozen=True, slots=True)
class FileRef:
    dataset: str
    format: str
    path: str
    media_root: str | None


@dataclass(slots=True)
class BuildPlan:
    """Everything the shard tasks need; saved as JSON so a resumed build can check it."""

    manifest_sha256: str
    stage: str
    files: list[FileRef]
    shards: list[list[list[tuple[int, int]]]]
    """shard -> pack -> (file index, row) of each packed sample."""
    pack_offset: list[int]
    """Global index of the first pack of each shard (keys stay unique across shards)."""
    plan_rejects: list[Reject] = field(default_factory=list)
    pack_rejects: list[Reject] = field(default_factory=list)

    def to_json(self) -> dict:
        return {
            "format": SHARD_FORMAT_VERSION,
            "manifest_sha256": self.manifest_sha256,
            "stage": self.stage,
            "files": [asdict(f) for f in self.files],
            "shards": self.shards,
            "pack_offset": self.pack_offset,
        }


def manifest_digest(manifest: StageManifest) -> str:
    """Hash of the parsed manifest (paths already resolved) and the tool's shard format."""
    text = repr((manifest, SHARD_FORMAT_VERSION))
    return hashlib.sha256(text.encode()).hexdigest()


def _group_labels(plan: StagePlan, group_by: str) -> list[int] | None:
    if group_by == "none":
        return None
    labels = []
    datasets = {name: i for i, name in enumerate(d.name for d in plan.datasets)}
    for index, file_plan in enumerate(plan.files):
        label = index if group_by == "file" else datasets[file_plan.dataset]
        labels.extend([label] * len(file_plan.samples))
    return labels


def make_build_plan(plan: StagePlan) -> BuildPlan:
    """Pack the planned samples and cut the packs into shards (pure given the stage plan)."""
    manifest = plan.manifest
    entries = {d.name: d for d in manifest.datasets}
    files = [
        FileRef(f.dataset, entries[f.dataset].format, f.path, entries[f.dataset].media_root)
        for f in plan.files
    ]
    refs = [(i, int(s.record)) for i, f in enumerate(plan.files) for s in f.samples]
    lengths = [s.length for f in plan.files for s in f.samples]
    tiles = [s.num_tiles for f in plan.files for s in f.samples]
    config = manifest.pack
    packing = plan_packs(
        np.asarray(lengths, dtype=np.int64),
        config.max_seq_len,
        groups=_group_labels(plan, config.group_by),
        window=config.window,
        align=config.align,
        tiles=tiles if config.max_tiles is not None else None,
        max_tiles=config.max_tiles,
        seed=manifest.seed,
    )
    pack_rejects = [
        Reject(
            files[refs[i][0]].dataset,
            files[refs[i][0]].path,
            str(refs[i][1]),
            RejectReason(reason),
            f"{lengths[i]} tokens, {tiles[i]} tiles (after pack.align = {config.align})",
        )
        for i, reason in packing.rejected
    ]
    per_shard = manifest.shards.packs_per_shard
    packs = [[refs[i] for i in pack] for pack in packing.packs]
    shards = [packs[i : i + per_shard] for i in range(0, len(packs), per_shard)]
    return BuildPlan(
        manifest_sha256=manifest_digest(manifest),
        stage=manifest.stage,
        files=files,
        shards=shards,
        pack_offset=list(range(0, len(packs), per_shard)),
        plan_rejects=list(plan.rejects()),
        pack_rejects=pack_rejects,
    )


# --------------------------------------------------------------------------------------------
# shard tasks (run in this process, a pool worker or a Ray worker)


@dataclass(frozen=True, slots=True)
class BuildContext:
    """What every shard task of a build shares (sent once per worker, not once per task)."""

    files: list[FileRef]
    manifest: StageManifest


@dataclass(frozen=True, slots=True)
class ShardTask:
    index: int
    path: str
    done_path: str
    packs: list[list[tuple[int, int]]]
    pack_offset: int


@lru_cache(maxsize=16)
def _open_cached(ref: FileRef, identity: tuple[int, int, int]):
    del identity  # part of the cache key only: a file changed on disk is opened again
    return open_source(ref.path, fmt=ref.format, dataset=ref.dataset, media_root=ref.media_root)


def _open(ref: FileRef):
    try:
        stat = os.stat(ref.path)
        identity = (stat.st_ino, stat.st_size, stat.st_mtime_ns)
    except OSError:
        identity = (0, 0, 0)  # open_source reports the problem
    return _open_cached(ref, identity)


def _sample_meta(sample: TokenizedSample, ref: FileRef, offset: int, num_tiles: int) -> dict:
    return {
        "dataset": sample.dataset,
        "file": ref.path,
        "record": sample.record_id,
        "length": sample.plan.length,
        "offset": offset,
        "num_tiles": num_tiles,
        "media_order": [list(item) for item in sample.media_order],
        "images": [
            {"size": [p.width, p.height], "grid": list(p.grid), "tiles": p.num_tiles}
            for p in sample.plan.images
        ],
        "videos": [
            {
                "frames": list(v.frame_indices),
                "requested_frames": v.requested_frames,
                "source_frames": v.num_source_frames,
                "fps": v.fps,
            }
            for v in sample.plan.videos
        ],
    }


def _pack_sample(
    key: str,
    members: Sequence[tuple[TokenizedSample, FileRef, list[bytes]]],
    manifest: StageManifest,
    pad_id: int,
) -> tuple[dict[str, bytes], int]:
    config = manifest.pack
    arrays = assemble_pack(
        [(s.input_ids, s.labels) for s, _, _ in members],
        capacity=config.max_seq_len,
        pad_id=pad_id,
        reset_positions=config.reset_attention,
        align=config.align,
    )
    tile_format = manifest.shards.tile_format
    out: dict[str, bytes] = {"__key__": key}  # type: ignore[dict-item]
    for name in ("input_ids", "labels", "position_ids", "cu_seqlens"):
        out[f"{name}.npy"] = npy_bytes(getattr(arrays, name))
    metas, tile_index = [], 0
    for (sample, ref, tiles), offset in zip(members, arrays.cu_seqlens[:-1].tolist(), strict=True):
        metas.append(_sample_meta(sample, ref, offset, len(tiles)))
        for blob in tiles:
            out[tile_member(tile_index, tile_format)] = blob
            tile_index += 1
    meta = {
        "stage": manifest.stage,
        "format": SHARD_FORMAT_VERSION,
        "tile_format": tile_format,
        "num_tiles": tile_index,
        "samples": metas,
    }
    out["meta.json"] = json.dumps(meta, ensure_ascii=False, sort_keys=True).encode()
    return out, sum(s.plan.length for s, _, _ in members)


def _reject(ref: FileRef, row: int, skip: SkipSample) -> Reject:
    return Reject(ref.dataset, ref.path, str(row), RejectReason(skip.reason), skip.detail)


def _tokenized_samples(
    task: ShardTask, context: BuildContext, tokenizer, rules: SampleRules
) -> dict[tuple[int, int], TokenizedSample | Reject]:
    """Every distinct record of the shard, read in (file, row) order (each file and parquet row
    group once) and tokenized in one batch; a record that fails becomes its `Reject`."""
    outcomes: dict[tuple[int, int], TokenizedSample | Reject] = {}
    records: list[tuple[tuple[int, int], RawRecord]] = []
    for file_index, row in sorted({(f, r) for pack in task.packs for f, r in pack}):
        ref = context.files[file_index]
        try:
            records.append(((file_index, row), _open(ref).read(row)))
        except SkipSample as skip:
            outcomes[file_index, row] = _reject(ref, row, skip)
    texts = list(dict.fromkeys(turn.content for _, record in records for turn in record.turns))
    encoded = dict(zip(texts, tokenizer.encode_batch(texts), strict=True))
    for key, record in records:
        try:
            contents = [encoded[turn.content] for turn in record.turns]
            outcomes[key] = tokenize_record(record, contents, rules)
        except SkipSample as skip:
            outcomes[key] = _reject(context.files[key[0]], key[1], skip)
    return outcomes


def build_shard(task: ShardTask, context: BuildContext) -> dict:
    """Write one shard and its completion record; returns the record (a plain dict)."""
    manifest = context.manifest
    tokenizer, template = _tokenizer_and_template(manifest.tokenizer)
    rules = SampleRules.from_manifest(manifest, template)
    samples = _tokenized_samples(task, context, tokenizer, rules)
    rejects: list[Reject] = []
    digests: dict[str, str] = {}
    real_tokens = 0

    def packed_samples() -> Iterator[dict[str, bytes]]:
        nonlocal real_tokens
        for pack_number, pack in enumerate(task.packs):
            members = []
            for file_index, row in pack:
                ref, sample = context.files[file_index], samples[file_index, row]
                if isinstance(sample, Reject):
                    rejects.append(sample)
                    continue
                try:
                    tiles = encode_tiles(sample_tiles(sample), fmt=manifest.shards.tile_format)
                except SkipSample as skip:
                    rejects.append(_reject(ref, row, skip))
                    continue
                members.append((sample, ref, tiles))
            if members:
                key = sample_key(task.pack_offset + pack_number)
                packed, tokens = _pack_sample(key, members, manifest, tokenizer.special_ids.pad)
                real_tokens += tokens
                digests[key] = sample_digest(packed)
                yield packed

    info = write_shard(task.path, packed_samples())
    info = replace(info, tokens=real_tokens)
    record = {
        "shard": info.to_json(),
        "rejects": [r.to_json() for r in rejects],
        "digests": digests,
    }
    write_json_atomic(task.done_path, record)
    return record


def _is_done(task: ShardTask) -> bool:
    try:
        with open(task.done_path, encoding="utf-8") as handle:
            shard = json.load(handle)["shard"]
        return shard["name"] == os.path.basename(task.path) and (
            os.path.getsize(task.path) == shard["bytes"]
        )
    except (OSError, ValueError, KeyError, TypeError):
        return False


# --------------------------------------------------------------------------------------------
# executors: (tasks, context, workers) -> completion records, in any order

_WORKER_CONTEXT: BuildContext | None = None


def _init_pool_worker(context: BuildContext) -> None:
    global _WORKER_CONTEXT
    _WORKER_CONTEXT = context
    watch_parent()


def _build_shard_in_pool(task: ShardTask) -> dict:
    assert _WORKER_CONTEXT is not None, "pool worker without a build context"
    return build_shard(task, _WORKER_CONTEXT)


def _run_local(tasks: list[ShardTask], context: BuildContext, workers: int) -> Iterator[dict]:
    if workers <= 1 or len(tasks) <= 1:
        for task in tasks:
            yield build_shard(task, context)
        return
    with ProcessPoolExecutor(
        max_workers=min(workers, len(tasks)),
        initializer=_init_pool_worker,
        initargs=(context,),
    ) as pool:
        futures = [pool.submit(_build_shard_in_pool, task) for task in tasks]
        try:
            for future in as_completed(futures):
                yield future.result()
        except BaseException:
            for future in futures:  # a failed shard stops the build now, not after all others
                future.cancel()
            raise


def _run_ray(tasks: list[ShardTask], context: BuildContext, workers: int) -> Iterator[dict]:
    """Ray tasks (1 CPU each, retried if a worker dies): a local Ray of `workers` CPUs, or the
    cluster of `RAY_ADDRESS`, or the Ray this process is already connected to. A Ray this
    function started is shut down when it ends."""
    try:
        import ray
    except Exception as error:  # ray is an optional extra; its import can fail in many ways
        raise BuildError(f"--executor ray needs Ray: pip install 'lvita[ray]' ({error})") from None
    started = False
    if not ray.is_initialized():
        if os.environ.get("RAY_ADDRESS"):
            ray.init(log_to_driver=False)
        else:
            ray.init(num_cpus=max(1, workers), include_dashboard=False, log_to_driver=False)
        started = True
    pending: list = []
    try:
        shared = ray.put(context)
        remote = ray.remote(num_cpus=1, max_retries=3)(build_shard)
        pending = [remote.remote(task, shared) for task in tasks]
        while pending:
            done, pending = ray.wait(pending, num_returns=1)
            yield ray.get(done[0])
    finally:
        for ref in pending:
            with contextlib.suppress(Exception):
                ray.cancel(ref, force=True)
        if started:
            ray.shutdown()


EXECUTORS: dict[str, Callable[[list[ShardTask], BuildContext, int], Iterator[dict]]] = {
    "local": _run_local,
    "ray": _run_ray,
}


# --------------------------------------------------------------------------------------------
# the output directory


def _plan_path(out: Path) -> Path:
    return out / STATE_DIR / "plan.json"


def _check_before_planning(out: Path, digest: str, resume: bool) -> None:
    """Refuse a wrong output directory at once, before the (long) planning pass."""
    saved = _plan_path(out)
    if saved.exists():
        if not resume:
            raise BuildError(f"{out} holds a build already; pass --resume to finish or redo it")
        try:
            saved_digest = json.loads(saved.read_text(encoding="utf-8"))["manifest_sha256"]
        except (OSError, ValueError, KeyError, TypeError) as error:
            raise BuildError(f"{saved} is unreadable ({error}); use a new --out") from None
        if saved_digest != digest:
            raise BuildError(f"{out} was built from a different manifest; use a new --out")
    elif out.exists() and (not out.is_dir() or any(p.name != STATE_DIR for p in out.iterdir())):
        raise BuildError(f"{out} is not empty and holds no lvita build")


def _check_plan(out: Path, build_plan: BuildPlan) -> None:
    saved = _plan_path(out)
    if saved.exists():
        if json.loads(saved.read_text(encoding="utf-8")) != json.loads(
            json.dumps(build_plan.to_json())
        ):
            raise BuildError(
                f"{out} was built from different data (the build plan changed); use a new --out"
            )
    else:
        write_json_atomic(str(saved), build_plan.to_json(), indent=None)


@contextlib.contextmanager
def _locked(out: Path) -> Iterator[None]:
    """Exclusive POSIX lock (`lockf`) on `.lvita-build/lock`, released by the kernel when this
    process dies; unlike `flock`, forked workers do not inherit it."""
    fd = os.open(out / STATE_DIR / "lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        deadline = time.monotonic() + LOCK_WAIT_S
        while True:
            try:
                fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except OSError as error:
                if error.errno not in (errno.EACCES, errno.EAGAIN):
                    raise
                if time.monotonic() > deadline:
                    raise BuildError(f"another lvita build is writing {out}") from None
                time.sleep(0.1)
        yield
    finally:
        os.close(fd)


def _tasks(out: Path, build_plan: BuildPlan) -> list[ShardTask]:
    done_dir = out / STATE_DIR / "done"
    return [
        ShardTask(
            index=index,
            path=str(out / shard_name(build_plan.stage, index)),
            done_path=str(done_dir / f"{shard_name(build_plan.stage, index)}.json"),
            packs=packs,
            pack_offset=build_plan.pack_offset[index],
        )
        for index, packs in enumerate(build_plan.shards)
    ]


def _finish(out: Path, plan: StagePlan, build_plan: BuildPlan, tasks: list[ShardTask]) -> dict:
    manifest = plan.manifest
    remove_temporaries(str(out))  # e.g. of a Ray worker that died and whose task was retried
    records = [json.loads(Path(t.done_path).read_text(encoding="utf-8")) for t in tasks]
    shards = [ShardInfo(**r["shard"]) for r in records]
    build_rejects = [
        Reject(**{**x, "reason": RejectReason(x["reason"])}) for r in records for x in r["rejects"]
    ]
    rejects = build_plan.plan_rejects + build_plan.pack_rejects + build_rejects
    index = {
        "format": SHARD_FORMAT_VERSION,
        "tool": f"lvita {__version__}",
        "stage": manifest.stage,
        "max_seq_len": manifest.pack.max_seq_len,
        "shards": [s.to_json() for s in shards],
    }
    write_text_atomic(
        str(out / "rejects.jsonl"),
        "".join(json.dumps(r.to_json(), ensure_ascii=False) + "\n" for r in rejects),
    )
    write_json_atomic(
        str(out / "stats.json"),
        compute_stats(out, shards=shards, rejects=rejects, plan=plan, manifest=manifest),
    )
    source_text = Path(manifest.source_path).read_text(encoding="utf-8")
    header = (
        f"# lvita {__version__}, shard format {SHARD_FORMAT_VERSION}, from {manifest.source_path}\n"
    )
    write_text_atomic(str(out / "manifest.yaml"), header + source_text)
    write_energon_metadata(out, shards)
    write_json_atomic(str(out / "index.json"), index)
    return index


def build_stage(
    manifest_path: str,
    out_dir: str,
    *,
    workers: int = 1,
    executor: str = "local",
    resume: bool = False,
    progress: bool = True,
) -> dict:
    """Build (or finish) the shards of a stage; returns the index written to index.json."""
    if executor not in EXECUTORS:
        raise BuildError(f"unknown executor {executor!r}; expected one of {sorted(EXECUTORS)}")
    manifest = load_manifest(manifest_path)
    out = Path(out_dir)
    _check_before_planning(out, manifest_digest(manifest), resume)
    (out / STATE_DIR / "done").mkdir(parents=True, exist_ok=True)
    with _locked(out):
        remove_temporaries(out_dir)
        plan = plan_stage(manifest, workers=workers, progress=progress)
        build_plan = make_build_plan(plan)
        _check_plan(out, build_plan)
        tasks = _tasks(out, build_plan)
        todo = [t for t in tasks if not _is_done(t)]
        context = BuildContext(files=build_plan.files, manifest=manifest)
        bar = tqdm(
            total=len(tasks),
            initial=len(tasks) - len(todo),
            desc=f"shards {manifest.stage}",
            unit="shard",
            disable=not progress,
        )
        for _ in EXECUTORS[executor](todo, context, workers):
            bar.update(1)
        bar.close()
        return _finish(out, plan, build_plan, tasks)


def remove_temporaries(out_dir: str) -> int:
    """Delete the temporary files (`*.tmp-*`) a killed build left behind; returns how many."""
    removed = 0
    for path in Path(out_dir).rglob(f"*{TEMP_MARKER}*"):
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
            removed += 1
    return removed


__all__ = [
    "BuildContext",
    "BuildError",
    "BuildPlan",
    "ShardTask",
    "build_shard",
    "build_stage",
    "make_build_plan",
    "remove_temporaries",
]
