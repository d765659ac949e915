"""What `lvita verify` found: `Problem` (one finding, located as exactly as the check can), the
`VerifyReport` of a build (counts, problems, text and JSON forms) and `SampleProblems`, which
collects the problems of one sample up to `MAX_PROBLEMS_PER_SAMPLE`.

Kinds of problem, by the check that finds them: ``files`` and ``accounting`` / ``plan``
(`lvita_data.verify.accounting`), ``checksum``, ``tar`` and ``digest`` (`lvita_data.verify.shard`),
``sample`` (`lvita_data.verify.sample`), ``energon`` and ``build`` (`lvita_data.verify.run`).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from lvita_data.shards.format import ARRAY_MEMBERS

MAX_PROBLEMS_PER_SAMPLE = 8
ARRAY_NPY = frozenset(f"{name}.npy" for name in ARRAY_MEMBERS)
"""The array members of format 1 (inside `arrays.npz` in formats 2 and 3)."""


@dataclass(frozen=True, slots=True)
class Problem:
    kind: str
    """files | checksum | tar | sample | digest | accounting | plan | energon | build"""
    message: str
    shard: str | None = None
    key: str | None = None
    member: str | None = None
    offset: int | None = None
    """Byte offset inside the shard, where known."""

    def to_json(self) -> dict:
        return {k: v for k, v in asdict(self).items() if v is not None}

    def __str__(self) -> str:
        where = []
        if self.shard:
            where.append(self.shard)
        if self.key:
            where.append(f"sample {self.key}")
        if self.member:
            where.append(self.member)
        if self.offset is not None:
            where.append(f"byte {self.offset}")
        prefix = ": ".join(where)
        return f"[{self.kind}] {prefix + ': ' if prefix else ''}{self.message}"


@dataclass(slots=True)
class VerifyReport:
    out_dir: str
    shards: int = 0
    samples: int = 0
    tokens: int = 0
    tiles: int = 0
    """Stored tile members (video frames, and every image tile when images are stored as
    tiles)."""
    images: int = 0
    """Source image members."""
    digests_checked: int = 0
    tiles_decoded: bool = True
    """Whether tiles (and source images) were decoded."""
    problems: list[Problem] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def to_json(self) -> dict:
        return {
            "out_dir": self.out_dir,
            "ok": self.ok,
            "shards": self.shards,
            "samples": self.samples,
            "tokens": self.tokens,
            "tiles": self.tiles,
            "images": self.images,
            "tiles_decoded": self.tiles_decoded,
            "digests_checked": self.digests_checked,
            "problems": [p.to_json() for p in self.problems],
        }

    def format(self, limit: int = 200) -> str:
        lines = [
            f"lvita verify {self.out_dir}: {self.shards} shard(s), {self.samples} packed "
            f"sequence(s), {self.tokens:,} tokens, {self.tiles} tile(s)"
            + (f", {self.images} source image(s)" if self.images else "")
            + ("" if self.tiles_decoded else " (not decoded)" if self.images else "")
            + ("" if self.tiles_decoded or self.images else " (tiles not decoded)")
            + f", {self.digests_checked} sample digest(s) checked"
        ]
        if self.ok:
            lines.append("OK: checksums, tar structure, per-sample invariants and accounting")
            return "\n".join(lines)
        lines.append(f"{len(self.problems)} problem(s):")
        lines.extend(f"  {p}" for p in self.problems[:limit])
        if len(self.problems) > limit:
            lines.append(f"  ... and {len(self.problems) - limit} more (use --json for all)")
        return "\n".join(lines)


class SampleProblems:
    """The problems of one sample (its shard and key filled in), at most `MAX_PROBLEMS_PER_SAMPLE`:
    one badly damaged sample does not flood the report."""

    def __init__(self, shard: str, key: str, arrays_in: str | None = None) -> None:
        self.shard, self.key = shard, key
        self.arrays_in = arrays_in
        """Format 2: the member holding the arrays (``arrays.npz``); a problem the checks
        place in an array's ``{name}.npy`` is reported in it, the message naming the array."""
        self.problems: list[Problem] = []

    def add(
        self, message: str, member: str | None = None, kind: str = "sample", exact: bool = False
    ) -> None:
        """`exact`: `member` is a member of the tar as named (e.g. an unknown `.npy` member)."""
        if self.arrays_in is not None and member in ARRAY_NPY and not exact:
            message, member = f"{member}: {message}", self.arrays_in
        if len(self.problems) < MAX_PROBLEMS_PER_SAMPLE:
            self.problems.append(Problem(kind, message, self.shard, self.key, member))
