"""`lvita build`: a stage manifest -> packed, checksummed WebDataset shards (resumable).

1. Plan (`planner.plan_stage`): exact lengths per selected sample, rejects with reasons.
2. Pack (`packing.plan_packs`): best-fit-decreasing per packing group (`pack.group_by`), with
   `pack.align` and `pack.max_tiles`, packs shuffled with the stage seed.
3. Shard: packs in order, `shards.packs_per_shard` per shard. The build plan (which sample goes
   into which pack and shard) is a pure function of the manifest and the data, and is saved in
   `.lvita-build/plan.json` together with the manifest's hash.
4. Write: each shard is one task (local processes or Ray): re-read its records, tokenize them,
   decode and tile the pixels, assemble the packs, write the tar under a temporary name, rename,
   then write a completion record `.lvita-build/done/{shard}.json` (rename too). A sample whose
   pixels fail to decode here (e.g. a JPEG truncated after a valid header) leaves its pack with a
   counted reject. Shard bytes depend only on the build plan, never on the worker count, the
   executor or the order tasks finish in.
5. Finish: `index.json` (per shard: name, samples, tokens, bytes, sha256), `stats.json`,
   `rejects.jsonl`, `manifest.yaml` (a copy, tool version in its header) and Energon's
   `.nv-meta/`, all written atomically.
`--resume` keeps shards whose completion record and file size match and redoes the rest; after a
`kill -9` at any point the finished directory is byte-identical to an uninterrupted build.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from pathlib import Path

import numpy as np
from tqdm import tqdm

from lvita_data import __version__
from lvita_data.errors import LvitaError, SkipSample
from lvita_data.manifest import StageManifest, load_manifest
from lvita_data.packed import assemble_pack
from lvita_data.packing import plan_packs
from lvita_data.pixels import encode_tiles, plan_tiles, video_tiles
from lvita_data.planner import StagePlan, _tokenizer_and_template, plan_stage
from lvita_data.samples import SampleRules, tokenize_record
from lvita_data.schema import Reject, RejectReason, TokenizedSample
from lvita_data.shards import (
    SHARD_FORMAT_VERSION,
    ShardInfo,
    npy_bytes,
    sample_key,
    shard_name,
    tile_member,
    write_json_atomic,
    write_shard,
    write_text_atomic,
)
from lvita_data.sources import open_source

STATE_DIR = ".lvita-build"


class BuildError(LvitaError):
    """The output directory does not match the manifest, or a build step failed."""


@dataclass(frozen=True, slots=True)
class FileRef:
    dataset: str
    format: str
    path: str
    media_root: str | None


@dataclass(slots=True)
class BuildPlan:
    """Everything a shard task needs; saved as JSON so a resumed build can check it."""

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
            RejectReason.too_long if reason == "too_long" else RejectReason.too_many_tiles,
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


@lru_cache(maxsize=16)
def _open(ref: FileRef):
    return open_source(ref.path, fmt=ref.format, dataset=ref.dataset, media_root=ref.media_root)


def _tiles_of(sample: TokenizedSample) -> list:
    tiles = []
    for kind, index in sample.media_order:
        if kind == "image":
            tiles.extend(plan_tiles(sample.plan.images[index]))
        else:
            tiles.extend(video_tiles(sample.plan.videos[index]))
    return tiles


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


@dataclass(frozen=True, slots=True)
class ShardTask:
    index: int
    name: str
    path: str
    done_path: str
    packs: list[list[tuple[int, int]]]
    pack_offset: int
    files: list[FileRef]
    manifest: StageManifest


def build_shard(task: ShardTask) -> dict:
    """Write one shard (runs in a worker process or a Ray task); returns its completion record."""
    tokenizer, template = _tokenizer_and_template(task.manifest.tokenizer)
    rules = SampleRules.from_manifest(task.manifest, template)
    rejects: list[Reject] = []
    real_tokens = 0

    def packed_samples() -> Iterator[dict[str, bytes]]:
        nonlocal real_tokens
        for pack_number, pack in enumerate(task.packs):
            members = []
            for file_index, row in pack:
                ref = task.files[file_index]
                try:
                    record = _open(ref).read(row)
                    contents = tokenizer.encode_batch([t.content for t in record.turns])
                    sample = tokenize_record(record, contents, rules)
                    tiles = encode_tiles(_tiles_of(sample), fmt=task.manifest.shards.tile_format)
                except SkipSample as skip:
                    rejects.append(
                        Reject(
                            ref.dataset, ref.path, str(row), RejectReason(skip.reason), skip.detail
                        )
                    )
                    continue
                members.append((sample, ref, tiles))
            if members:
                key = sample_key(task.pack_offset + pack_number)
                sample, tokens = _pack_sample(
                    key, members, task.manifest, tokenizer.special_ids.pad
                )
                real_tokens += tokens
                yield sample

    info = write_shard(task.path, packed_samples(), real_tokens=0)
    info = ShardInfo(info.name, info.samples, real_tokens, info.bytes, info.sha256)
    record = {"shard": info.to_json(), "rejects": [r.to_json() for r in rejects]}
    write_json_atomic(task.done_path, record)
    return record


def _is_done(task: ShardTask) -> bool:
    try:
        with open(task.done_path, encoding="utf-8") as handle:
            record = json.load(handle)
        return os.path.getsize(task.path) == record["shard"]["bytes"]
    except (OSError, ValueError, KeyError):
        return False


def _run_local(tasks: list[ShardTask], workers: int) -> Iterator[dict]:
    if workers <= 1 or len(tasks) <= 1:
        yield from map(build_shard, tasks)
        return
    with ProcessPoolExecutor(max_workers=min(workers, len(tasks))) as pool:
        yield from pool.map(build_shard, tasks)


def _run_ray(tasks: list[ShardTask], workers: int) -> Iterator[dict]:
    try:
        import ray
    except Exception as error:  # ray is an optional extra; its import can fail in many ways
        raise BuildError(f"--executor ray needs Ray: pip install 'lvita[ray]' ({error})") from None
    if not ray.is_initialized():
        ray.init(num_cpus=workers or None, include_dashboard=False, log_to_driver=False)
    remote = ray.remote(build_shard)
    pending = [remote.remote(task) for task in tasks]
    while pending:
        done, pending = ray.wait(pending, num_returns=1)
        yield ray.get(done[0])


EXECUTORS: dict[str, Callable[[list[ShardTask], int], Iterator[dict]]] = {
    "local": _run_local,
    "ray": _run_ray,
}


def _plan_path(out: Path) -> Path:
    return out / STATE_DIR / "plan.json"


def _check_output_dir(out: Path, build_plan: BuildPlan, resume: bool) -> None:
    saved = _plan_path(out)
    if saved.exists():
        if not resume:
            raise BuildError(f"{out} holds a build already; pass --resume to finish or redo it")
        if json.loads(saved.read_text(encoding="utf-8")) != json.loads(
            json.dumps(build_plan.to_json())
        ):
            raise BuildError(
                f"{out} was built from a different manifest or different data; use a new --out"
            )
    elif out.exists() and any(p.name != STATE_DIR for p in out.iterdir()):
        raise BuildError(f"{out} is not empty and holds no lvita build")


def _tasks(out: Path, build_plan: BuildPlan, manifest: StageManifest) -> list[ShardTask]:
    done_dir = out / STATE_DIR / "done"
    return [
        ShardTask(
            index=index,
            name=shard_name(build_plan.stage, index),
            path=str(out / shard_name(build_plan.stage, index)),
            done_path=str(done_dir / f"{shard_name(build_plan.stage, index)}.json"),
            packs=packs,
            pack_offset=build_plan.pack_offset[index],
            files=build_plan.files,
            manifest=manifest,
        )
        for index, packs in enumerate(build_plan.shards)
    ]


def _stats(
    plan: StagePlan, shards: list[ShardInfo], rejects: list[Reject], manifest: StageManifest
) -> dict:
    packs = sum(s.samples for s in shards)
    tokens = sum(s.tokens for s in shards)
    capacity = manifest.pack.max_seq_len
    return {
        "stage": manifest.stage,
        "max_seq_len": capacity,
        "packs": packs,
        "tokens": tokens,
        "padding_tokens": packs * capacity - tokens,
        "fill": tokens / (packs * capacity) if packs else 0.0,
        "planned_samples": plan.num_samples,
        "rejects": len(rejects),
        "datasets": [d.to_json() for d in plan.datasets],
    }


def _energon_metadata(out: Path, shards: list[ShardInfo]) -> None:
    meta = out / ".nv-meta"
    meta.mkdir(exist_ok=True)
    write_text_atomic(
        str(meta / "dataset.yaml"),
        "__module__: megatron.energon\n__class__: CrudeWebdataset\nsubflavors:\n  lvita: packed\n",
    )
    names = "".join(f"    - {s.name}\n" for s in shards)
    write_text_atomic(str(meta / "split.yaml"), f"split_parts:\n  train:\n{names}exclude: []\n")
    write_json_atomic(
        str(meta / ".info.json"), {"shard_counts": {s.name: s.samples for s in shards}}
    )


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
    manifest = load_manifest(manifest_path)
    out = Path(out_dir)
    if resume and out.exists():
        remove_temporaries(out_dir)
    plan = plan_stage(manifest, workers=workers, progress=progress)
    build_plan = make_build_plan(plan)
    _check_output_dir(out, build_plan, resume)
    (out / STATE_DIR / "done").mkdir(parents=True, exist_ok=True)
    if not _plan_path(out).exists():
        write_json_atomic(str(_plan_path(out)), build_plan.to_json(), indent=None)
    tasks = _tasks(out, build_plan, manifest)
    todo = [t for t in tasks if not _is_done(t)]
    bar = tqdm(
        total=len(tasks),
        initial=len(tasks) - len(todo),
        desc=f"shards {manifest.stage}",
        unit="shard",
        disable=not progress,
    )
    for _ in EXECUTORS[executor](todo, workers):
        bar.update(1)
    bar.close()
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
    write_json_atomic(str(out / "stats.json"), _stats(plan, shards, rejects, manifest))
    source_text = Path(manifest.source_path).read_text(encoding="utf-8")
    header = (
        f"# lvita {__version__}, shard format {SHARD_FORMAT_VERSION}, from {manifest.source_path}\n"
    )
    write_text_atomic(str(out / "manifest.yaml"), header + source_text)
    _energon_metadata(out, shards)
    write_json_atomic(str(out / "index.json"), index)
    return index


def remove_temporaries(out_dir: str) -> int:
    """Delete `*.tmp-*` files a killed build left behind; returns how many."""
    removed = 0
    for path in Path(out_dir).rglob("*.tmp-*"):
        path.unlink()
        removed += 1
    return removed


__all__ = ["BuildError", "BuildPlan", "build_shard", "build_stage", "make_build_plan"]
