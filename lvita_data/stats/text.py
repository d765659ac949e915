"""`lvita stats` as text: the terminal report of a build's statistics.

`format_stats(stats)` lays out the dict of `lvita_data.stats.compute.compute_stats` as aligned
tables and bar histograms: the summary, the per-dataset table (with the mixture-group columns
only when a group holds several datasets), modality mix, length and fill histograms, samples per
pack, rejects by reason and dataset, and a few example rejects (`example_rows`, also for the
HTML report). `pct` and `delta` format shares for this report and for the HTML report
(`lvita_data.stats.html`).
"""

from __future__ import annotations

from collections.abc import Sequence

from lvita_data.stats.rejects import MAX_EXAMPLES

DATASET_COLUMNS = (
    "dataset",
    "group",
    "ratio",
    "selected",
    "samples",
    "rejects",
    "tokens",
    "share",
    "target",
    "delta",
    "frames",
    "modality",
)
"""Columns of the per-dataset table, in the terminal report and in the HTML report."""
EXAMPLE_COLUMNS = ("dataset", "reason", "phase", "file", "record", "detail")
"""Columns of the example rejects, in the terminal report and in the HTML report."""
_EXAMPLE_SHRINK = (
    (3, 20, True),
    (5, 24, False),
    (0, 12, False),
    (1, 12, False),
    (4, 8, False),
    (2, 8, False),
)
"""(column, narrowest, keep the end) in the order the example columns give way when a row is
wider than the terminal: the file path first (its name is at the end), then the detail. The
narrowest widths (84) plus the separators (10) fit 120 columns, whatever the rejects hold."""


def pct(value: float | None) -> str:
    """A share as a percentage with 2 decimals; "-" when unknown."""
    return "-" if value is None else f"{value:.2%}"


def delta(value: float | None) -> str:
    """A share difference in percentage points (signed, 2 decimals); "-" when unknown."""
    return "-" if value is None else f"{value * 100:+.2f} pp"


TERMINAL_WIDTH = 120
"""Terminal tables and lines are fitted to this many columns."""


def table(
    header: Sequence[str],
    rows: list[Sequence[str]],
    left: Sequence[int] = (0,),
    width: int = TERMINAL_WIDTH,
) -> list[str]:
    """Aligned columns: the columns numbered in `left` left-aligned, the others right-aligned;
    a rule under the header (and above a final TOTAL row). When the table is wider than
    `width`, the last column (free text such as ``image 20 + text 3``) wraps at its `` + ``
    separators onto continuation lines."""
    table_rows = [list(header), *[list(r) for r in rows]]
    widths = [max(len(row[i]) for row in table_rows) for i in range(len(header))]
    room = width - sum(widths[:-1]) - 2 * (len(widths) - 1)
    if sum(widths) + 2 * (len(widths) - 1) > width and room >= 20:
        widths[-1] = max(
            room, max(len(part) for row in table_rows for part in row[-1].split(" + "))
        )
    rule = "  ".join("-" * w for w in widths)
    lines = []
    for number, row in enumerate(table_rows):
        if number == len(table_rows) - 1 and row[0] == "TOTAL":
            lines.append(rule)
        for k, last in enumerate(_wrap_parts(row[-1], widths[-1])):
            cells = [c if k == 0 else "" for c in row[:-1]] + [last]
            aligned = [
                c.ljust(w) if i in left else c.rjust(w)
                for i, (c, w) in enumerate(zip(cells, widths, strict=True))
            ]
            lines.append("  ".join(aligned).rstrip())
        if number == 0:
            lines.append(rule)
    return lines


def _wrap_parts(text: str, width: int) -> list[str]:
    """`text` on lines of at most `width` characters, broken only between `` + `` parts."""
    lines: list[str] = []
    for part in text.split(" + "):
        if lines and len(lines[-1]) + 3 + len(part) <= width:
            lines[-1] += " + " + part
        else:
            lines.append(part if not lines else "+ " + part)
    return lines


def wrap_line(text: str, width: int = TERMINAL_WIDTH) -> list[str]:
    """A long report line broken at its ", " separators, continuation lines indented."""
    lines: list[str] = []
    for part in text.split(", "):
        if lines and len(lines[-1]) + 2 + len(part) <= width:
            lines[-1] += ", " + part
        else:
            lines.append(part if not lines else "    " + part)
    return lines


def _bars(labels: list[str], counts: list[int], width: int = 40) -> list[str]:
    top = max(counts, default=0)
    label_width = max((len(s) for s in labels), default=0)
    count_width = max((len(str(c)) for c in counts), default=1)
    lines = []
    for label, count in zip(labels, counts, strict=True):
        bar = "#" * (round(width * count / top) if top else 0)
        if count and not bar:
            bar = "."
        line = f"  {label.rjust(label_width)}  {str(count).rjust(count_width)}  {bar}"
        lines.append(line.rstrip())
    return lines


def _range_labels(edges: list[int]) -> list[str]:
    labels = []
    for i, (lo, hi) in enumerate(zip(edges[:-1], edges[1:], strict=True)):
        close = "]" if i == len(edges) - 2 else ")"
        labels.append(f"[{lo:,}, {hi:,}{close}")
    return labels


def _mix(counts: dict[str, int]) -> str:
    return " + ".join(f"{k} {v}" for k, v in counts.items()) or "-"


def dataset_rows(stats: dict, *, frames_sep: str = "/") -> list[tuple[str | int, ...]]:
    """The cells of `DATASET_COLUMNS`, one row per dataset and a TOTAL row (counts as ints); the
    terminal report and the HTML report format the same rows."""
    frames = stats["frames"]
    rows: list[tuple[str | int, ...]] = []
    for d in stats["datasets"]:
        f = d["frames"]
        rows.append(
            (
                d["name"],
                d["group"],
                "-" if d["ratio"] is None else f"{d['ratio']:g}",
                d["selected"],
                d["samples"],
                sum(d["rejects"].values()),
                f"{d['tokens']:,}",
                pct(d["share"]),
                pct(d["target_share"]),
                delta(d["share_delta"]),
                f"{f['chosen']}{frames_sep}{f['requested']}" if f["videos"] else "-",
                _mix(d["modalities"]),
            )
        )
    rows.append(
        (
            "TOTAL",
            "",
            "",
            sum(d["selected"] for d in stats["datasets"]),
            stats["samples"],
            stats["rejects"],
            f"{stats['tokens']:,}",
            pct(1.0 if stats["tokens"] else 0.0),
            pct(1.0) if stats["planned_tokens"] else "-",
            "",
            f"{frames['chosen']}{frames_sep}{frames['requested']}" if frames["videos"] else "-",
            _mix({m: v["samples"] for m, v in stats["modalities"].items()}),
        )
    )
    return rows


_PHASE_NAMES = {"plan": "planning", "pack": "packing", "build": "building"}


def _phases(by_phase: dict[str, int]) -> str:
    """`` (planning 20, building 1)``: where the rejects were found, when known."""
    parts = [f"{_PHASE_NAMES.get(p, p)} {n}" for p, n in by_phase.items() if n]
    return f" ({', '.join(parts)})" if parts else ""


def example_rows(stats: dict) -> list[tuple[str, ...]]:
    """The cells of `EXAMPLE_COLUMNS`: the example rejects of each dataset and reason (stats.json
    `reject_examples`), in dataset and reason order."""
    return [
        (
            name,
            reason,
            _PHASE_NAMES.get(e["phase"], e["phase"]),
            e["file"],
            e["record"],
            e["detail"],
        )
        for name, reasons in stats.get("reject_examples", {}).items()
        for reason, examples in reasons.items()
        for e in examples
    ]


def _printable(text: str) -> str:
    """Untrusted text for a terminal: control characters (a newline, an escape sequence) spelled
    out as Python escapes (``\\n``, ``\\x1b``)."""
    return "".join(c if c.isprintable() else ascii(c)[1:-1] for c in text)


def _cut(text: str, width: int, *, keep_end: bool = False) -> str:
    """`text` in at most `width` characters, an ellipsis where it was cut."""
    if len(text) <= width:
        return text
    return "…" + text[len(text) - width + 1 :] if keep_end else text[: width - 1] + "…"


def _example_table(stats: dict, width: int = TERMINAL_WIDTH) -> list[str]:
    """The example rejects as a table of at most `width` columns: the file path cut at its start,
    the detail (then the other columns) at its end, as `_EXAMPLE_SHRINK` says."""
    rows = [tuple(map(_printable, row)) for row in example_rows(stats)]
    if not rows:
        return []
    widths = [max(len(row[i]) for row in (EXAMPLE_COLUMNS, *rows)) for i in range(len(rows[0]))]
    over = sum(widths) + 2 * (len(widths) - 1) - width
    keep_end = [False] * len(widths)
    for column, narrowest, end in _EXAMPLE_SHRINK:
        cut = max(0, min(over, widths[column] - narrowest))
        widths[column] -= cut
        over -= cut
        keep_end[column] = end
    fitted = [
        tuple(_cut(c, w, keep_end=e) for c, w, e in zip(row, widths, keep_end, strict=True))
        for row in rows
    ]
    return table(EXAMPLE_COLUMNS, fitted, left=range(len(widths)), width=width)


def format_stats(stats: dict) -> str:
    """A readable terminal report: summary, per-dataset table, histograms, rejects."""
    capacity = stats["max_seq_len"]
    spp = stats["samples_per_pack"]
    frames = stats["frames"]
    lines = [
        f"stage {stats['stage']}: {stats['shards']} shard(s), {stats['packs']:,} packs of "
        f"T = {capacity:,}, {stats['samples']:,} samples, {stats['tokens']:,} tokens",
        f"fill {stats['fill']:.2%}; padding {stats['padding_tokens']:,} tokens "
        f"(alignment {stats['alignment_padding_tokens']:,}, tail "
        f"{stats['tail_padding_tokens']:,})",
        f"samples per pack: mean {spp['mean']:.2f}, min {spp['min']}, max {spp['max']}; "
        f"tiles per pack: mean {stats['tiles_per_pack']['mean']:.1f}, "
        f"max {stats['tiles_per_pack']['max']}",
        f"video frames: {frames['chosen']:,} chosen of {frames['requested']:,} requested over "
        f"{frames['videos']} video(s), {frames['videos_fitted']} lowered to fit",
        f"rejects: {stats['rejects']}{_phases(stats.get('rejects_by_phase', {}))}",
        "",
    ]
    header = DATASET_COLUMNS
    rows = [tuple(map(str, row)) for row in dataset_rows(stats)]
    if all(d["group"] == d["name"] for d in stats["datasets"]):
        header, rows = header[:1] + header[2:], [row[:1] + row[2:] for row in rows]
        lines += table(header, rows, left=(0, len(header) - 1))
    else:
        lines += table(header, rows, left=(0, 1, len(header) - 1))
    if any(g["datasets"] != [g["name"]] for g in stats["groups"]):
        lines += ["", "mixture groups:"]
        lines += table(
            ("group", "datasets", "tokens", "share", "target", "delta"),
            [
                (
                    g["name"],
                    str(len(g["datasets"])),
                    f"{g['tokens']:,}",
                    pct(g["share"]),
                    pct(g["target_share"]),
                    delta(g["share_delta"]),
                )
                for g in stats["groups"]
            ],
        )
    lines += ["", "modality mix (packed):"]
    lines += table(
        ("modality", "samples", "tokens", "share"),
        [
            (m, str(v["samples"]), f"{v['tokens']:,}", pct(v["share"]))
            for m, v in stats["modalities"].items()
        ],
    )
    hist = stats["sample_lengths"]["histogram"]
    summary = stats["sample_lengths"]
    lines += [
        "",
        f"sample lengths before packing (tokens; min {summary['min']:,}, median "
        f"{summary['p50']:,}, mean {summary['mean']:,.0f}, max {summary['max']:,}):",
        *_bars(_range_labels(hist["edges"]), hist["counts"]),
    ]
    hist = stats["pack_tokens"]["histogram"]
    fills = [f"{e / capacity:.0%}" for e in hist["edges"]]
    labels = [f"{lo:>4}-{hi:<4}" for lo, hi in zip(fills[:-1], fills[1:], strict=True)]
    first = next((i for i, c in enumerate(hist["counts"]) if c), len(labels))
    lines += [
        "",
        "pack fill after packing (real tokens / T, packs per bin; empty low bins left out):",
        *_bars(labels[first:], hist["counts"][first:]),
        "",
        "samples per pack:",
        *_bars(list(spp["histogram"]), list(spp["histogram"].values())),
    ]
    by_dataset = stats["rejects_by_dataset"]
    if by_dataset:
        reasons = list(stats["rejects_by_reason"])
        matrix = [
            (name, *(str(counts.get(r, 0)) for r in reasons), str(sum(counts.values())))
            for name, counts in by_dataset.items()
        ]
        matrix.append(
            (
                "TOTAL",
                *(str(stats["rejects_by_reason"][r]) for r in reasons),
                str(stats["rejects"]),
            )
        )
        lines += ["", "rejects by reason and dataset:"]
        wide = table(("dataset", *reasons, "total"), matrix)
        if max(map(len, wide)) > TERMINAL_WIDTH:  # many reasons: one row per reason instead
            names = list(by_dataset)
            transposed = [
                (
                    r,
                    *(str(by_dataset[n].get(r, 0)) for n in names),
                    str(stats["rejects_by_reason"][r]),
                )
                for r in reasons
            ]
            transposed.append(
                ("TOTAL", *(str(sum(by_dataset[n].values())) for n in names), str(stats["rejects"]))
            )
            wide = table(("reason", *names, "total"), transposed)
        if max(map(len, wide)) > TERMINAL_WIDTH:  # many of both: one line per dataset
            wide = [
                line
                for name, counts in by_dataset.items()
                for line in wrap_line(
                    f"{name}: " + ", ".join(f"{r} {c}" for r, c in counts.items() if c)
                )
            ]
        lines += wide
    examples = _example_table(stats)
    if examples:
        first = f"the first {MAX_EXAMPLES} per dataset and reason, in rejects.jsonl order"
        lines += ["", f"example rejects ({first}):", *examples]
    if stats["planned_tokens"] is None:
        lines += [
            "",
            "(no planner report in stats.json: the target shares are unknown)",
        ]
    return "\n".join(lines)


__all__ = [
    "DATASET_COLUMNS",
    "EXAMPLE_COLUMNS",
    "TERMINAL_WIDTH",
    "delta",
    "example_rows",
    "format_stats",
    "pct",
    "table",
    "wrap_line",
]
