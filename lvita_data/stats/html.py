"""`lvita stats --html FILE`: one self-contained HTML page of a build's statistics.

Inline CSS, matplotlib plots (Agg, no pyplot state) embedded as base64 PNG data URIs, HTML tables;
no script and no external reference, so the file opens anywhere, offline. Input: the dict of
`lvita_data.stats.compute.compute_stats`. The same stats give byte-identical HTML.
"""

from __future__ import annotations

import base64
import io
import os
import re
from collections.abc import Sequence
from html import escape

from lvita_data.fileio import write_text_atomic
from lvita_data.stats.rejects import MAX_EXAMPLES
from lvita_data.stats.text import DATASET_COLUMNS, EXAMPLE_COLUMNS, dataset_rows, example_rows, pct

PACKED = "#1f77b4"
"""Colour of the packed / after-packing series (the test looks for it in the screenshot)."""
TARGET = "#ff7f0e"
REASON_COLOURS = (
    "#d62728",
    "#9467bd",
    "#8c564b",
    "#e377c2",
    "#7f7f7f",
    "#bcbd22",
    "#17becf",
    "#2ca02c",
    "#ff9896",
    "#c5b0d5",
    "#c49c94",
    "#f7b6d2",
    "#dbdb8d",
    "#9edae5",
    "#98df8a",
    "#aec7e8",
    "#ffbb78",
)
MODALITY_COLOURS = {
    "text": "#7f7f7f",
    "image": "#2ca02c",
    "multi_image": "#17becf",
    "video": "#9467bd",
}

NUMERIC = re.compile(r"^[+-]?[\d,.]+( ?(%|pp))?$|^[\d,]+ / [\d,]+$")
"""Cells right-aligned in the tables."""

CSS = """
body { font-family: "DejaVu Sans", Arial, sans-serif; margin: 24px; color: #222;
       background: #fff; }
h1 { font-size: 22px; margin: 0 0 4px 0; }
h2 { font-size: 17px; margin: 28px 0 8px 0; border-bottom: 1px solid #ddd; }
.sub { color: #666; margin-bottom: 16px; }
.cards { display: flex; flex-wrap: wrap; gap: 10px; }
.card { border: 1px solid #ddd; border-radius: 6px; padding: 8px 14px; min-width: 120px;
        background: #fafafa; }
.card .v { font-size: 20px; font-weight: bold; }
.card .k { font-size: 12px; color: #666; }
.grid { display: grid; grid-template-columns: repeat(2, minmax(0, 1fr)); gap: 12px; }
figure { margin: 0; border: 1px solid #eee; border-radius: 6px; padding: 6px; }
figure.wide { grid-column: 1 / span 2; }
figure img { width: 100%; height: auto; display: block; }
figcaption { font-size: 12px; color: #555; }
table { border-collapse: collapse; font-size: 13px; margin: 6px 0 12px 0; }
th, td { border: 1px solid #ddd; padding: 3px 8px; }
th { background: #f0f0f0; }
td.n { text-align: right; font-variant-numeric: tabular-nums; }
tr.total td { font-weight: bold; background: #f7f7f7; }
.note { color: #666; font-size: 12px; }
"""


def _png(fig) -> str:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100, metadata={"Software": None})
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def _figure(width: float, height: float):
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), layout="constrained")


def _short(edge: int) -> str:
    if edge >= 1024 and edge % 1024 == 0:
        return f"{edge // 1024}K"
    return str(edge)


def plot_lengths(stats: dict) -> str:
    hist = stats["sample_lengths"]["histogram"]
    edges, counts = hist["edges"], hist["counts"]
    labels = [f"{_short(a)}-{_short(b)}" for a, b in zip(edges[:-1], edges[1:], strict=True)]
    fig = _figure(5.6, 3.3)
    ax = fig.add_subplot()
    ax.bar(range(len(counts)), counts, color=PACKED)
    ax.set_xticks(range(len(counts)), labels, rotation=45, ha="right", fontsize=8)
    ax.set_xlabel("sample length (tokens)")
    ax.set_ylabel("samples")
    ax.set_title("Before packing: sample lengths")
    return _png(fig)


def plot_pack_fill(stats: dict) -> str:
    hist = stats["pack_tokens"]["histogram"]
    capacity = stats["max_seq_len"]
    edges = [100 * e / capacity for e in hist["edges"]]
    widths = [b - a for a, b in zip(edges[:-1], edges[1:], strict=True)]
    fig = _figure(5.6, 3.3)
    ax = fig.add_subplot()
    ax.bar(edges[:-1], hist["counts"], width=widths, align="edge", color=PACKED, edgecolor="white")
    ax.axvline(100 * stats["fill"], color=TARGET, linestyle="--", label=f"fill {stats['fill']:.1%}")
    ax.set_xlim(0, 100)
    ax.set_xlabel("real tokens / max_seq_len (%)")
    ax.set_ylabel("packs")
    ax.set_title("After packing: fill per pack")
    ax.legend(loc="upper left", fontsize=8)
    return _png(fig)


def plot_samples_per_pack(stats: dict) -> str:
    hist = stats["samples_per_pack"]["histogram"]
    fig = _figure(5.6, 3.3)
    ax = fig.add_subplot()
    ax.bar([int(k) for k in hist], list(hist.values()), color=PACKED)
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.yaxis.get_major_locator().set_params(integer=True)
    ax.set_xlabel("samples in the pack")
    ax.set_ylabel("packs")
    ax.set_title(f"Samples per pack (mean {stats['samples_per_pack']['mean']:.2f})")
    return _png(fig)


def plot_share(stats: dict) -> str:
    rows = stats["datasets"]
    names = [d["name"] for d in rows]
    fig = _figure(11.4, max(2.6, 0.32 * len(rows) + 1.2))
    ax = fig.add_subplot()
    y = list(range(len(rows)))
    has_target = any(d["target_share"] is not None for d in rows)
    height = 0.4 if has_target else 0.7
    ax.barh(
        [v - (height / 2 if has_target else 0) for v in y],
        [100 * d["share"] for d in rows],
        height=height,
        color=PACKED,
        label="packed share",
    )
    if has_target:
        ax.barh(
            [v + height / 2 for v in y],
            [100 * (d["target_share"] or 0.0) for d in rows],
            height=height,
            color=TARGET,
            label="target (planned) share",
        )
    ax.set_yticks(y, names, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("share of tokens (%)")
    ax.set_title("Token share per dataset vs the manifest's target")
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8)
    return _png(fig)


def plot_modalities(stats: dict) -> str:
    rows = stats["datasets"]
    modalities = [m for m in MODALITY_COLOURS if any(m in d["modalities"] for d in rows)]
    modalities += sorted({m for d in rows for m in d["modalities"]} - set(modalities))
    fig = _figure(5.6, max(2.6, 0.3 * len(rows) + 1.2))
    ax = fig.add_subplot()
    left = [0] * len(rows)
    for modality in modalities:
        values = [d["modalities"].get(modality, 0) for d in rows]
        ax.barh(
            range(len(rows)),
            values,
            left=left,
            color=MODALITY_COLOURS.get(modality, "#aaaaaa"),
            label=modality,
        )
        left = [a + b for a, b in zip(left, values, strict=True)]
    ax.set_yticks(range(len(rows)), [d["name"] for d in rows], fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("packed samples")
    ax.set_title("Modality mix per dataset")
    ax.xaxis.get_major_locator().set_params(integer=True)
    if modalities:
        ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8)
    return _png(fig)


def plot_frames(stats: dict) -> str | None:
    rows = [d for d in stats["datasets"] if d["frames"]["videos"]]
    if not rows:
        return None
    fig = _figure(5.6, max(2.6, 0.4 * len(rows) + 1.2))
    ax = fig.add_subplot()
    y = list(range(len(rows)))
    ax.barh(
        [v - 0.2 for v in y],
        [d["frames"]["requested"] for d in rows],
        0.4,
        color=TARGET,
        label="requested",
    )
    ax.barh(
        [v + 0.2 for v in y],
        [d["frames"]["chosen"] for d in rows],
        0.4,
        color=PACKED,
        label="chosen",
    )
    ax.set_yticks(y, [d["name"] for d in rows], fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("video frames")
    ax.set_title("Frames chosen vs requested")
    ax.legend(loc="lower right", fontsize=8)
    return _png(fig)


def plot_rejects(stats: dict) -> str | None:
    by_dataset = stats["rejects_by_dataset"]
    if not by_dataset:
        return None
    reasons = list(stats["rejects_by_reason"])
    names = list(by_dataset)
    fig = _figure(5.6, max(2.6, 0.35 * len(names) + 1.2))
    ax = fig.add_subplot()
    left = [0] * len(names)
    for number, reason in enumerate(reasons):
        values = [by_dataset[n].get(reason, 0) for n in names]
        ax.barh(
            range(len(names)),
            values,
            left=left,
            color=REASON_COLOURS[number % len(REASON_COLOURS)],
            label=reason,
        )
        left = [a + b for a, b in zip(left, values, strict=True)]
    ax.set_yticks(range(len(names)), names, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("rejected records")
    ax.set_title("Rejects by reason and dataset")
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=7)
    return _png(fig)


def _html_table(
    header: Sequence[str], rows: Sequence[Sequence[object]], *, total: bool = False
) -> str:
    head = "".join(f"<th>{escape(str(h))}</th>" for h in header)
    body = []
    for number, row in enumerate(rows):
        cls = ' class="total"' if total and number == len(rows) - 1 else ""
        cells = "".join(
            f'<td class="n">{escape(str(c))}</td>'
            if i > 0 and NUMERIC.match(str(c))
            else f"<td>{escape(str(c))}</td>"
            for i, c in enumerate(row)
        )
        body.append(f"<tr{cls}>{cells}</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def _figure_html(uri: str | None, caption: str, *, wide: bool = False) -> str:
    if uri is None:
        return ""
    cls = ' class="wide"' if wide else ""
    return (
        f'<figure{cls}><img alt="{escape(caption)}" src="{uri}">'
        f"<figcaption>{escape(caption)}</figcaption></figure>"
    )


def render_html(stats: dict) -> str:
    """The report as one HTML string."""
    frames = stats["frames"]
    spp = stats["samples_per_pack"]
    cards = [
        ("packs", f"{stats['packs']:,}"),
        ("samples", f"{stats['samples']:,}"),
        ("tokens", f"{stats['tokens']:,}"),
        ("fill", f"{stats['fill']:.2%}"),
        ("padding tokens", f"{stats['padding_tokens']:,}"),
        ("samples / pack", f"{spp['mean']:.2f}"),
        ("frames chosen / requested", f"{frames['chosen']:,} / {frames['requested']:,}"),
        ("rejects", f"{stats['rejects']:,}"),
        *(
            (f"rejects while {phase}", f"{stats.get('rejects_by_phase', {}).get(key, 0):,}")
            for key, phase in (("plan", "planning"), ("pack", "packing"), ("build", "building"))
            if stats.get("rejects_by_phase", {}).get(key)
        ),
    ]
    card_html = "".join(
        f'<div class="card"><div class="v">{escape(v)}</div><div class="k">{escape(k)}</div></div>'
        for k, v in cards
    )
    figures = "".join(
        [
            _figure_html(plot_lengths(stats), "Sample lengths before packing (power-of-two bins)"),
            _figure_html(plot_pack_fill(stats), "Real tokens per pack after packing"),
            _figure_html(
                plot_share(stats),
                "Packed token share per dataset next to the target: the share of planned tokens "
                "that the manifest's ratio / max_samples selection yields",
                wide=True,
            ),
            _figure_html(plot_samples_per_pack(stats), "Samples per pack"),
            _figure_html(plot_modalities(stats), "Packed samples per modality and dataset"),
            _figure_html(plot_frames(stats), "Video frames chosen vs requested per dataset"),
            _figure_html(plot_rejects(stats), "Rejected records by reason and dataset"),
        ]
    )
    rows = dataset_rows(stats, frames_sep=" / ")
    dataset_table = _html_table(
        DATASET_COLUMNS,
        rows,
        total=True,
    )
    modality_table = _html_table(
        ("modality", "samples", "tokens", "share"),
        [
            (m, v["samples"], f"{v['tokens']:,}", pct(v["share"]))
            for m, v in stats["modalities"].items()
        ],
    )
    by_dataset = stats["rejects_by_dataset"]
    if by_dataset:
        reasons = list(stats["rejects_by_reason"])
        matrix = [
            (name, *(counts.get(r, 0) for r in reasons), sum(counts.values()))
            for name, counts in by_dataset.items()
        ]
        matrix.append(
            (
                "TOTAL",
                *(stats["rejects_by_reason"][r] for r in reasons),
                stats["rejects"],
            )
        )
        reject_table = _html_table(("dataset", *reasons, "total"), matrix, total=True)
        examples = example_rows(stats)
        if examples:  # untrusted text (paths, record ids, details): _html_table escapes it
            reject_table += (
                f'<p class="note">Example rejects: the first {MAX_EXAMPLES} of each dataset and '
                "reason, in rejects.jsonl order.</p>" + _html_table(EXAMPLE_COLUMNS, examples)
            )
    else:
        reject_table = '<p class="note">No rejects.</p>'
    lengths = stats["sample_lengths"]
    packs = stats["pack_tokens"]
    summary_table = _html_table(
        ("", "min", "median", "p90", "mean", "max"),
        [
            (
                "sample length (tokens)",
                lengths["min"],
                lengths["p50"],
                lengths["p90"],
                f"{lengths['mean']:.1f}",
                lengths["max"],
            ),
            (
                "real tokens per pack",
                packs["min"],
                packs["p50"],
                packs["p90"],
                f"{packs['mean']:.1f}",
                packs["max"],
            ),
        ],
    )
    note = (
        ""
        if stats["planned_tokens"] is not None
        else '<p class="note">No planner report in stats.json: target shares unknown.</p>'
    )
    title = f"lvita build statistics: {stats['stage']}"
    subtitle = (
        f"{stats['shards']} shard(s), max_seq_len {stats['max_seq_len']:,}; padding "
        f"{stats['padding_tokens']:,} tokens (alignment {stats['alignment_padding_tokens']:,}, "
        f"tail {stats['tail_padding_tokens']:,}); {frames['videos']} video(s), "
        f"{frames['videos_fitted']} lowered to fit"
    )
    return (
        "<!DOCTYPE html>\n"
        '<html lang="en"><head><meta charset="utf-8">'
        f"<title>{escape(title)}</title><style>{CSS}</style></head><body>"
        f'<h1>{escape(title)}</h1><div class="sub">{escape(subtitle)}</div>'
        f'<div class="cards">{card_html}</div>'
        f'<h2>Plots</h2><div class="grid">{figures}</div>'
        f"<h2>Datasets</h2>{note}{dataset_table}"
        f"<h2>Lengths</h2>{summary_table}"
        f"<h2>Modality mix</h2>{modality_table}"
        f"<h2>Rejects</h2>{reject_table}"
        "</body></html>\n"
    )


def write_html(stats: dict, path: str | os.PathLike[str]) -> None:
    """Write the report atomically (a temporary file, then rename)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    write_text_atomic(os.fspath(path), render_html(stats))


__all__ = ["render_html", "write_html"]
