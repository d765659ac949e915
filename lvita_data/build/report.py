"""The terminal report of a stage plan (`lvita plan`, `lvita build`): one row per dataset."""

from __future__ import annotations

from collections import Counter

from lvita_data.build.plan import StagePlan
from lvita_data.stats.text import table, wrap_line


def format_report(plan: StagePlan) -> str:
    """A terminal table (one row per dataset, then totals), rejects by reason, problems."""
    header = (
        "dataset",
        "files",
        "missing",
        "records",
        "selected",
        "samples",
        "tokens",
        "rejects",
        "modality",
    )
    rows = []
    for d in plan.datasets:
        missing = len(d.files_missing) + len(d.files_failed)
        counts = (d.files_found, missing, d.records, d.selected, d.samples)
        mix = " + ".join(f"{k} {v}" for k, v in sorted(d.modalities.items())) or "-"
        rows.append((d.name, *map(str, counts), f"{d.tokens:,}", str(sum(d.rejects.values())), mix))
    totals = [
        sum(d.files_found for d in plan.datasets),
        sum(len(d.files_missing) + len(d.files_failed) for d in plan.datasets),
        sum(d.records for d in plan.datasets),
        sum(d.selected for d in plan.datasets),
        plan.num_samples,
    ]
    rejected = sum(sum(d.rejects.values()) for d in plan.datasets)
    modality: Counter = Counter()
    for d in plan.datasets:
        modality.update(d.modalities)
    mix = " + ".join(f"{k} {v}" for k, v in sorted(modality.items())) or "-"
    rows.append(("TOTAL", *map(str, totals), f"{plan.num_tokens:,}", str(rejected), mix))
    lines = table(header, rows, left=(0, len(header) - 1))
    for d in plan.datasets:
        if d.rejects:
            reasons = ", ".join(f"{k} {v}" for k, v in sorted(d.rejects.items()))
            lines += wrap_line(f"rejects {d.name}: {reasons}")
    lines += [f"MISSING {d.name}: {m}" for d in plan.datasets for m in d.files_missing]
    lines += [f"FAILED  {d.name}: {m}" for d in plan.datasets for m in d.files_failed]
    fitted = sum(d.videos_fitted for d in plan.datasets)
    requested = sum(d.frames_requested for d in plan.datasets)
    chosen = sum(d.frames_chosen for d in plan.datasets)
    summary = (
        f"stage {plan.manifest.stage}: {plan.num_samples:,} samples, {plan.num_tokens:,} tokens, "
        f"max_seq_len {plan.manifest.pack.max_seq_len:,}; video frames {chosen:,} of {requested:,} "
        f"requested ({fitted} sample(s) lowered to fit)"
    )
    return "\n".join([*wrap_line(summary.replace("; ", ", ", 1)), *lines])
