"""Checksum manifests of checkpoint directories: ``checksums.json`` maps the relative path of
every other file of the directory to its size and sha256; written last, it is also the
completion marker (`pipelines.train.checkpoint` decides what a missing one means).

`write_checksums` and `find_problems` are collective over the default group (or run alone without
one): rank 0 lists the files, every rank hashes its share (`split_by_size`: about as many bytes
each), the digests are gathered, and every rank ends with the same result. sha256 streams files
in 1 MiB blocks (`lvita_data.fileio.sha256_file`), so memory stays bounded. The rest is pure or
plain file I/O.

Example ``checksums.json``::

    {"format_version": 1, "algorithm": "sha256",
     "files": {"__0_0.distcp": {"size": 2761544, "sha256": "9c1f..."}, "trainer.json": {...}}}
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

from lvita_data.fileio import sha256_file, write_json_atomic
from pipelines.train import group

CHECKSUMS_FILE = "checksums.json"
MANIFEST_VERSION = 1


class ManifestUnreadable(Exception):
    """``checksums.json`` exists but is not a manifest this code wrote (message: why)."""


def file_sizes(directory: Path) -> dict[str, int]:
    """Size of every file under `directory` but the manifest, by relative POSIX path, sorted."""
    sizes = {}
    for path in sorted(directory.rglob("*")):
        name = path.relative_to(directory).as_posix()
        if path.is_file() and name != CHECKSUMS_FILE:
            sizes[name] = path.stat().st_size
    return sizes


def split_by_size(sizes: Mapping[str, int], parts: int) -> list[list[str]]:
    """Largest file first onto the least loaded part, so every rank hashes about as many bytes
    (DCP writes one large ``.distcp`` per rank and a few small files)."""
    loads = [0] * parts
    shares: list[list[str]] = [[] for _ in range(parts)]
    for name in sorted(sizes, key=lambda n: (-sizes[n], n)):
        part = loads.index(min(loads))
        shares[part].append(name)
        loads[part] += sizes[name]
    return shares


def hash_files(directory: Path, names: list[str]) -> dict[str, str]:
    return {name: sha256_file(directory / name) for name in names}


def write_manifest(directory: Path, sizes: Mapping[str, int], digests: Mapping[str, str]) -> None:
    files = {name: {"size": sizes[name], "sha256": digests[name]} for name in sorted(sizes)}
    manifest = {"format_version": MANIFEST_VERSION, "algorithm": "sha256", "files": files}
    write_json_atomic(directory / CHECKSUMS_FILE, manifest)


def read_manifest(directory: Path) -> dict[str, dict]:
    """The ``files`` of ``directory/checksums.json``.

    Raises:
        FileNotFoundError: there is none.
        ManifestUnreadable: it is damaged or of another version.
    """
    text = (directory / CHECKSUMS_FILE).read_text(encoding="utf-8", errors="replace")
    try:
        manifest = json.loads(text)
        version, files = manifest["format_version"], manifest["files"]
        well_formed = all(
            isinstance(e["size"], int) and isinstance(e["sha256"], str) for e in files.values()
        )
    except (ValueError, KeyError, TypeError, AttributeError) as error:
        raise ManifestUnreadable(f"not valid JSON of the expected shape ({error})") from None
    if version != MANIFEST_VERSION or not well_formed:
        raise ManifestUnreadable(f"format_version {version!r} or entries not understood")
    return files


def compare_sizes(expected: Mapping[str, dict], sizes: Mapping[str, int]) -> list[str]:
    """Problems visible without reading a file: missing, unexpected, wrong size."""
    problems = [f"{name}: missing" for name in expected if name not in sizes]
    unexpected = [name for name in sizes if name not in expected]
    problems += [f"{name}: unexpected file (not in {CHECKSUMS_FILE})" for name in unexpected]
    for name, entry in expected.items():
        if name in sizes and sizes[name] != entry["size"]:
            kind = "truncated" if sizes[name] < entry["size"] else "grown"
            problems.append(
                f"{name}: size {sizes[name]} bytes, {CHECKSUMS_FILE} records {entry['size']} "
                f"({kind})"
            )
    return problems


def compare_digests(expected: Mapping[str, dict], digests: Mapping[str, str]) -> list[str]:
    return [
        f"{name}: sha256 {digest[:16]}..., {CHECKSUMS_FILE} records "
        f"{expected[name]['sha256'][:16]}... (contents altered)"
        for name, digest in sorted(digests.items())
        if digest != expected[name]["sha256"]
    ]


# --------------------------------------------------------------------------------------------
# Collective


def write_checksums(directory: Path) -> None:
    """Hash every file of `directory` (collective); rank 0 writes the manifest, atomically."""
    sizes = group.from_rank0(file_sizes(directory) if group.rank() == 0 else None)
    share = split_by_size(sizes, group.world_size())[group.rank()]
    digests: dict[str, str] = {}
    for part in group.gather(hash_files(directory, share)):
        digests.update(part)
    if group.rank() == 0:
        write_manifest(directory, sizes, digests)


def find_problems(directory: Path) -> list[str] | None:
    """Every file of `directory` that is missing, unexpected, of another size or another sha256
    than its manifest records ([] if none), or None if there is no manifest (collective)."""
    problems, expected, to_hash = group.from_rank0(
        _problems_before_hashing(directory) if group.rank() == 0 else None
    )
    if problems is None or not to_hash:
        return problems
    share = split_by_size(to_hash, group.world_size())[group.rank()]
    try:
        local = compare_digests(expected, hash_files(directory, share))
    except OSError as error:  # reported, not raised: the other ranks are waiting to gather
        local = [f"{error.filename}: unreadable ({error.strerror})"]
    return problems + sorted(p for part in group.gather(local) for p in part)


def _problems_before_hashing(
    directory: Path,
) -> tuple[list[str] | None, dict[str, dict], dict[str, int]]:
    """Rank 0: the problems seen without hashing, the manifest, and the files left to hash."""
    try:
        expected = read_manifest(directory)
    except FileNotFoundError:
        return None, {}, {}
    except (ManifestUnreadable, OSError) as error:
        return [f"{CHECKSUMS_FILE}: unreadable: {error}"], {}, {}
    sizes = file_sizes(directory)
    to_hash = {n: s for n, s in sizes.items() if n in expected and s == expected[n]["size"]}
    return compare_sizes(expected, sizes), expected, to_hash
