"""`lvita stats`: numbers consistent with the build, JSON, terminal table, HTML in Chromium."""

from __future__ import annotations

import io
import json
import shutil
import tarfile
from collections import Counter
from html import escape
from pathlib import Path

import numpy as np
import pytest
import yaml
from headless import CHROMIUM, screenshot

from lvita_data.build.plan import plan_stage
from lvita_data.build.run import build_stage
from lvita_data.errors import StatsError
from lvita_data.manifest import load_manifest
from lvita_data.schema import IGNORE_INDEX, Reject, RejectReason, media_modality
from lvita_data.shards.format import ShardInfo, load_npy
from lvita_data.stats.compute import compute_stats
from lvita_data.stats.html import PACKED, render_html, write_html
from lvita_data.stats.scan import read_pack_metas
from lvita_data.stats.text import format_stats
from lvita_data.tokenizer.tokenizer import load_tokenizer
from pipelines.cli import EXIT_CODES, run

REPO = Path(__file__).resolve().parents[2]
STAGE1 = REPO / "manifests" / "demo" / "stage1.yaml"


@pytest.fixture(scope="module")
def demo_env(demo_corpus):
    root, _, _ = demo_corpus
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("LVITA_DEMO_ROOT", str(root))
        yield root


@pytest.fixture(scope="module")
def stage1_build(demo_env, tmp_path_factory) -> Path:
    """Demo stage 1, as the manifest says."""
    out = tmp_path_factory.mktemp("stats_stage1") / "build"
    build_stage(str(STAGE1), str(out), workers=1, progress=False)
    return out


@pytest.fixture(scope="module")
def variant_build(demo_env, tmp_path_factory) -> tuple[Path, Path]:
    """Demo stage 1 with pack.align 8 (alignment padding), pack.max_tiles 10 (rejects at packing,
    so packed shares drift from the target), 8 packs per shard (several shards) and one mixture
    group. Returns (manifest, build directory)."""
    base = tmp_path_factory.mktemp("stats_variant")
    data = yaml.safe_load(STAGE1.read_text(encoding="utf-8"))
    data["pack"].update(align=8, max_tiles=10)
    data["shards"] = {"packs_per_shard": 8}
    for entry in data["datasets"]:
        entry["group"] = "captions"
    manifest = base / "stage1_variant.yaml"
    manifest.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    out = base / "build"
    build_stage(str(manifest), str(out), workers=1, progress=False)
    return manifest, out


def _packs(out: Path):
    """(meta, arrays) of every pack, shards in index order, read independently of lvita.stats."""
    index = json.loads((out / "index.json").read_text(encoding="utf-8"))
    for shard in index["shards"]:
        members: dict[str, dict[str, bytes]] = {}
        with tarfile.open(out / shard["name"]) as tar:
            for member in tar:
                key, _, name = member.name.partition(".")
                if name in ("meta.json", "arrays.npz") or name.endswith(".npy"):
                    members.setdefault(key, {})[name] = tar.extractfile(member).read()
        for key in sorted(members):
            item = members[key]
            arrays = {n[:-4]: load_npy(b) for n, b in item.items() if n.endswith(".npy")}
            if "arrays.npz" in item:  # format 2
                with np.load(io.BytesIO(item["arrays.npz"]), allow_pickle=False) as npz:
                    arrays = {name: npz[name] for name in npz.files}
            yield json.loads(item["meta.json"]), arrays


@pytest.mark.parametrize("which", ["stage1", "variant"])
def test_numbers_match_the_build(which, stage1_build, variant_build):
    out = stage1_build if which == "stage1" else variant_build[1]
    stats = compute_stats(out)
    index = json.loads((out / "index.json").read_text(encoding="utf-8"))
    rejects = [
        json.loads(line) for line in (out / "rejects.jsonl").read_text().splitlines() if line
    ]
    capacity = index["max_seq_len"]
    assert stats["stage"] == index["stage"] and stats["max_seq_len"] == capacity
    assert stats["shards"] == len(index["shards"])
    assert stats["packs"] == sum(s["samples"] for s in index["shards"])
    assert stats["tokens"] == sum(s["tokens"] for s in index["shards"])
    assert stats["padding_tokens"] == stats["packs"] * capacity - stats["tokens"]
    assert stats["padding_tokens"] == (
        stats["alignment_padding_tokens"] + stats["tail_padding_tokens"]
    )
    assert stats["fill"] == pytest.approx(stats["tokens"] / (stats["packs"] * capacity), abs=1e-6)

    # Recompute from the arrays of the tars: padding is pad id + IGNORE_INDEX outside the samples.
    pad = load_tokenizer("qwen2.5").special_ids.pad
    real = per_pack = 0
    lengths, pack_tokens, samples_per_pack = [], [], Counter()
    per_dataset: dict[str, Counter] = {}
    for meta, arrays in _packs(out):
        per_pack += 1
        samples = meta["samples"]
        samples_per_pack[len(samples)] += 1
        cu = arrays["cu_seqlens"]
        assert cu[-1] == capacity and arrays["input_ids"].shape == (capacity,)
        assert cu[:-1].tolist() == [s["offset"] for s in samples]
        used = np.zeros(capacity, dtype=bool)
        for s in samples:
            used[s["offset"] : s["offset"] + s["length"]] = True
            lengths.append(s["length"])
            counts = per_dataset.setdefault(s["dataset"], Counter())
            counts["samples"] += 1
            counts["tokens"] += s["length"]
            modality = media_modality(len(s.get("images") or ()), len(s.get("videos") or ()))
            counts["modality:" + modality] += 1
        assert (arrays["input_ids"][~used] == pad).all()
        assert (arrays["labels"][~used] == IGNORE_INDEX).all()
        real += int(used.sum())
        pack_tokens.append(int(used.sum()))
    assert per_pack == stats["packs"]
    assert real == stats["tokens"]
    assert stats["samples"] == len(lengths)
    assert sum(stats["sample_lengths"]["histogram"]["counts"]) == len(lengths)
    assert sum(stats["pack_tokens"]["histogram"]["counts"]) == per_pack
    assert stats["sample_lengths"]["max"] == max(lengths)
    assert stats["pack_tokens"]["min"] == min(pack_tokens)
    assert stats["samples_per_pack"]["histogram"] == {
        str(k): v for k, v in sorted(samples_per_pack.items())
    }
    assert stats["samples_per_pack"]["mean"] == pytest.approx(len(lengths) / per_pack, abs=1e-6)

    # Per dataset: packed samples + rejects == what the manifest's selection picked.
    plan = {d["name"]: d for d in stats["plan"]}
    reject_counts = Counter(r["dataset"] for r in rejects)
    for d in stats["datasets"]:
        assert d["samples"] == per_dataset[d["name"]]["samples"]
        assert d["tokens"] == per_dataset[d["name"]]["tokens"]
        assert sum(d["rejects"].values()) == reject_counts[d["name"]]
        assert d["selected"] == d["samples"] + reject_counts[d["name"]]
        assert d["selected"] == plan[d["name"]]["selected"]
        assert d["target_tokens"] == plan[d["name"]]["tokens"]
        assert d["modalities"] == {
            k.split(":")[1]: v
            for k, v in sorted(per_dataset[d["name"]].items())
            if k.startswith("modality:")
        }
    assert sum(d["share"] for d in stats["datasets"]) == pytest.approx(1.0, abs=1e-5)
    assert sum(d["target_share"] for d in stats["datasets"]) == pytest.approx(1.0, abs=1e-5)
    assert stats["rejects"] == len(rejects)
    assert stats["rejects_by_reason"] == dict(sorted(Counter(r["reason"] for r in rejects).items()))
    assert sum(m["samples"] for m in stats["modalities"].values()) == stats["samples"]


def test_variant_alignment_rejects_and_groups(variant_build):
    _, out = variant_build
    stats = compute_stats(out)
    assert stats["shards"] > 1
    assert stats["alignment_padding_tokens"] > 0
    assert stats["rejects_by_reason"].get("too_many_tiles", 0) > 0
    # Rejected at packing: the packed shares drift from what the manifest's selection planned.
    assert any(abs(d["share_delta"]) > 0.01 for d in stats["datasets"])
    assert sum(d["share_delta"] for d in stats["datasets"]) == pytest.approx(0.0, abs=1e-5)
    assert [g["name"] for g in stats["groups"]] == ["captions"]
    assert stats["groups"][0]["tokens"] == stats["tokens"]
    assert stats["tiles_per_pack"]["max"] <= 10
    text = format_stats(stats)
    assert "mixture groups:" in text and "captions" in text


def test_build_stats_json_is_compute_stats(stage1_build, demo_env):
    """What build.py passes in memory (before index.json and manifest.yaml exist) gives the same
    dict as reading the finished directory; the build's stats.json is that dict."""
    stats = compute_stats(stage1_build)
    manifest = load_manifest(STAGE1)
    plan = plan_stage(manifest, progress=False)
    index = json.loads((stage1_build / "index.json").read_text(encoding="utf-8"))
    rejects = [
        Reject(**{**r, "reason": RejectReason(r["reason"])})
        for r in map(json.loads, (stage1_build / "rejects.jsonl").read_text().splitlines())
    ]
    in_memory = compute_stats(
        stage1_build,
        shards=[ShardInfo(**s) for s in index["shards"]],
        rejects=rejects,
        plan=plan,
        manifest=manifest,
    )
    assert in_memory == stats
    assert compute_stats(stage1_build, workers=2) == stats
    saved = json.loads((stage1_build / "stats.json").read_text(encoding="utf-8"))
    assert saved == stats  # build.py writes compute_stats(...)


def test_json_round_trip_and_determinism(stage1_build):
    stats = compute_stats(stage1_build)
    text = json.dumps(stats, sort_keys=False)
    assert json.loads(text) == stats
    assert json.dumps(compute_stats(stage1_build)) == text


def test_terminal_table_lists_every_dataset(stage1_build):
    stats = compute_stats(stage1_build)
    text = format_stats(stats)
    table = text.splitlines()
    for d in stats["datasets"]:
        assert any(line.startswith(d["name"] + " ") for line in table), d["name"]
    assert "fill" in text and "padding" in text and "samples per pack" in text
    assert "sample lengths before packing" in text and "pack fill after packing" in text
    assert "rejects by reason and dataset" in text
    assert all(line == line.rstrip() for line in table)
    header = next(line for line in table if line.startswith("dataset "))
    rule = table[table.index(header) + 1]
    assert set(rule) == {"-", " "}
    rows = table[table.index(header) : table.index(header) + len(stats["datasets"]) + 4]
    assert all(len(row) <= len(rule) for row in rows)
    # numeric columns are right-aligned: the tokens column ends at the same place in every row
    ends = {
        row.index(f"{d['tokens']:,}") + len(f"{d['tokens']:,}")
        for d, row in zip(stats["datasets"], rows[2:], strict=False)
    }
    assert len(ends) == 1


def test_cli_stats_json_and_errors(stage1_build, tmp_path, capsys):
    assert run(["stats", str(stage1_build), "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == compute_stats(stage1_build)
    assert run(["stats", str(stage1_build)]) == 0
    assert "lv_image_caption" in capsys.readouterr().out
    assert run(["stats", str(tmp_path)]) == EXIT_CODES[StatsError] == 5
    err = capsys.readouterr().err
    assert err.startswith("lvita stats: ") and "index.json" in err
    assert run(["stats", str(tmp_path / "nothing"), "--json"]) == 5


def test_inconsistent_index_is_an_error(stage1_build):
    manifest = load_manifest(STAGE1)
    index = json.loads((stage1_build / "index.json").read_text(encoding="utf-8"))
    shard = ShardInfo(**{**index["shards"][0], "tokens": index["shards"][0]["tokens"] + 1})
    with pytest.raises(StatsError, match="inconsistent"):
        compute_stats(stage1_build, shards=[shard], manifest=manifest)
    with pytest.raises(StatsError, match="missing"):
        compute_stats(stage1_build, shards=[ShardInfo("nope.tar", 0, 0, 0, "")], manifest=manifest)


def test_a_damaged_tar_header_is_an_error_not_the_end_of_the_shard(stage1_build, tmp_path):
    """`tarfile` ends an archive silently at a damaged header; the shard tar reader does not."""
    copy = tmp_path / "copy"
    shutil.copytree(stage1_build, copy)
    name = json.loads((copy / "index.json").read_text(encoding="utf-8"))["shards"][0]["name"]
    path = copy / name
    assert len(list(read_pack_metas(path))) > 1
    with tarfile.open(path) as tar:
        members = tar.getmembers()
    first_key = members[0].name.split(".")[0]
    victim = next(m for m in members if not m.name.startswith(first_key + "."))  # 2nd pack
    data = bytearray(path.read_bytes())
    data[victim.offset + 148] ^= 0xFF  # the checksum field of its first header
    path.write_bytes(bytes(data))
    with tarfile.open(path) as tar:  # tarfile stops there without a word
        assert len(tar.getmembers()) < len(members)
    with pytest.raises(StatsError, match="cannot read shard"):
        compute_stats(copy)


def test_without_planner_report_targets_are_null(stage1_build, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(stage1_build, copy)
    (copy / "stats.json").unlink()
    stats = compute_stats(copy)
    assert stats["plan"] is None and stats["planned_tokens"] is None
    assert all(d["target_share"] is None for d in stats["datasets"])
    assert stats["tokens"] == compute_stats(stage1_build)["tokens"]
    assert "target shares are unknown" in format_stats(stats)
    assert "target shares unknown" in render_html(stats)


def test_html_is_self_contained(variant_build, tmp_path):
    _, out = variant_build
    path = tmp_path / "report.html"
    assert run(["stats", str(out), "--html", str(path)]) == 0
    html = path.read_text(encoding="utf-8")
    assert html.count('src="data:image/png;base64,') >= 5
    assert "http://" not in html and "https://" not in html
    assert "<script" not in html and "<link" not in html and "url(" not in html
    for d in compute_stats(out)["datasets"]:
        assert d["name"] in html
    assert render_html(compute_stats(out)) == html  # deterministic, PNGs included


@pytest.mark.skipif(
    CHROMIUM is None,
    reason="needs Debian's chromium for the headless render (apt-get install -y chromium)",
)
def test_html_renders_in_headless_chromium(variant_build, tmp_path):
    _, out = variant_build
    html = tmp_path / "report.html"
    write_html(compute_stats(out), html)
    image = screenshot(html, tmp_path)
    assert image.shape[:2] == (2000, 1200)
    # Not blank: varied pixels and many colours (text, plots, tables) ...
    assert image.std() > 20
    colours = np.unique(image.reshape(-1, 3), axis=0)
    assert len(colours) > 200
    # ... and the embedded plots were decoded and drawn: their bar colour covers a real area.
    target = np.array([int(PACKED[i : i + 2], 16) for i in (1, 3, 5)])
    plotted = (np.abs(image - target).max(axis=2) <= 12).sum()
    assert plotted > 5000, f"only {plotted} pixels of the plot colour {PACKED}"


def test_terminal_reports_fit_120_columns(variant_build):
    """The stats report and the plan report wrap long mixes and reject lists instead of
    running past 120 columns; nothing is lost (every reason and dataset is still printed)."""
    from lvita_data.build.report import format_report
    from lvita_data.stats.text import table

    out = variant_build[1]
    stats = compute_stats(out)
    text = format_stats(stats)
    assert max(map(len, text.splitlines())) <= 120
    for reason in stats["rejects_by_reason"]:
        assert reason in text
    wide = table(("name", "n", "mix"), [("a", "1", " + ".join(f"kind{i} {i}" for i in range(40)))])
    assert max(map(len, wide)) <= 120 and sum("kind39 39" in line for line in wide) == 1
    manifest = load_manifest(variant_build[0])
    report = format_report(plan_stage(manifest, progress=False))
    assert max(map(len, report.splitlines())) <= 120


STAGE2 = REPO / "manifests" / "demo" / "stage2.yaml"
EXAMPLE_FIELDS = ("file", "record", "reason", "detail", "phase")


@pytest.fixture(scope="module")
def stage2_build(demo_env, tmp_path_factory) -> Path:
    """Demo stage 2: ~20 rejects of many reasons, at planning and while building."""
    out = tmp_path_factory.mktemp("stats_stage2") / "build"
    build_stage(str(STAGE2), str(out), workers=1, progress=False)
    return out


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line]


def _first_examples(rejects: list[dict], limit: int = 3) -> dict:
    """The first `limit` rejects of each dataset and reason, in file order (independently)."""
    expected: dict[str, dict[str, list]] = {}
    for r in rejects:
        kept = expected.setdefault(r["dataset"], {}).setdefault(r["reason"], [])
        if len(kept) < limit:
            kept.append({k: r.get(k, "plan" if k == "phase" else "") for k in EXAMPLE_FIELDS})
    return expected


def test_reject_examples_are_the_first_of_each_dataset_and_reason(stage2_build):
    saved = json.loads((stage2_build / "stats.json").read_text(encoding="utf-8"))
    stats = compute_stats(stage2_build)
    assert saved == stats  # computed from the build's Reject objects == read from rejects.jsonl
    rejects = _jsonl(stage2_build / "rejects.jsonl")
    examples = stats["reject_examples"]
    assert examples == _first_examples(rejects)
    assert list(examples) == list(stats["rejects_by_dataset"])
    for name, reasons in examples.items():
        assert list(reasons) == list(stats["rejects_by_dataset"][name])  # sorted reasons
        for reason, kept in reasons.items():
            assert len(kept) == min(3, stats["rejects_by_dataset"][name][reason])
            assert all(list(e) == list(EXAMPLE_FIELDS) for e in kept)
            assert all(type(v) is str for e in kept for v in e.values())
    assert len({e["phase"] for r in examples.values() for k in r.values() for e in k}) > 1
    assert max(len(k) for r in examples.values() for k in r.values()) == 3  # not vacuous


@pytest.fixture
def tampered_build(stage2_build, tmp_path) -> tuple[Path, list[dict]]:
    """A copy of stage 2 whose rejects.jsonl has 5 more lv_bad_records bad_field_type rejects
    (8 in all) and a first detail with markup, a terminal escape, a newline and 600 more
    characters."""
    copy = tmp_path / "copy"
    shutil.copytree(stage2_build, copy)
    rejects = _jsonl(copy / "rejects.jsonl")
    rejects[0]["detail"] = "<script>alert(1)</script>\x1b[31mred\nnext line " + "x" * 600
    extra = next(
        r for r in rejects if (r["dataset"], r["reason"]) == ("lv_bad_records", "bad_field_type")
    )
    rejects += [{**extra, "record": f"extra-{i}", "detail": f"extra {i}"} for i in range(5)]
    lines = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rejects)
    (copy / "rejects.jsonl").write_text(lines, encoding="utf-8")
    return copy, rejects


def test_reject_examples_keep_at_most_3_and_both_paths_agree(tampered_build):
    from lvita_data.stats.rejects import MAX_EXAMPLE_CHARS, RejectTally, read_rejects

    copy, rejects = tampered_build
    stats = compute_stats(copy)
    dataset = next(r["dataset"] for r in rejects if r["record"] == "extra-0")
    assert stats["rejects_by_dataset"][dataset]["bad_field_type"] == 8
    kept = stats["reject_examples"][dataset]["bad_field_type"]
    assert [e["record"] for e in kept] == [
        r["record"] for r in rejects if r["dataset"] == dataset and r["reason"] == "bad_field_type"
    ][:3]
    assert all(not e["record"].startswith("extra-") for e in kept)
    first = rejects[0]
    detail = stats["reject_examples"][first["dataset"]][first["reason"]][0]["detail"]
    assert len(detail) == MAX_EXAMPLE_CHARS and detail.endswith("…")
    assert detail.startswith("<script>alert(1)</script>\x1b[31mred\nnext line xxx")
    # The build passes Reject objects, `lvita stats` reads rejects.jsonl: the same reject keys.
    objects = [Reject(**{**r, "reason": RejectReason(r["reason"])}) for r in rejects]
    names = list(stats["rejects_by_dataset"])
    from_objects = RejectTally.of(objects).to_json(names)
    assert from_objects == read_rejects(copy / "rejects.jsonl").to_json(names)
    assert from_objects == {k: stats[k] for k in from_objects}


def test_reject_examples_in_the_terminal_fit_120_columns(stage2_build, tampered_build):
    for out in (stage2_build, tampered_build[0]):
        stats = compute_stats(out)
        lines = format_stats(stats).splitlines()
        assert max(map(len, lines)) <= 120
        start = next(i for i, line in enumerate(lines) if line.startswith("example rejects ("))
        header = lines[start + 1].split()
        assert header == ["dataset", "reason", "phase", "file", "record", "detail"]
        rows = lines[start + 3 : start + 3 + sum(len(k) for k in _kept(stats))]
        assert len(rows) == sum(len(k) for k in _kept(stats)) and all(rows)
        for row, example in zip(rows, [e for k in _kept(stats) for e in k], strict=True):
            assert f"  {example['record']}  " in row
            assert row.split()[1] == example["reason"]
    text = format_stats(compute_stats(tampered_build[0]))
    assert "\x1b" not in text and "<script>alert(1)</script>\\x1b[31mred" in text  # escaped
    assert sum(line.endswith("…") for line in text.splitlines()) >= 1  # the long detail, cut
    assert "…" in text.split("example rejects (")[1].splitlines()[3]  # long paths cut at the start


def _kept(stats: dict) -> list[list[dict]]:
    return [k for reasons in stats["reject_examples"].values() for k in reasons.values()]


def test_reject_examples_in_html_are_escaped(tampered_build):
    copy, rejects = tampered_build
    html = render_html(compute_stats(copy))
    assert "Example rejects" in html
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html
    assert "<script" not in html
    for r in rejects[1:]:
        if r["record"].startswith("extra-"):
            assert f">{r['record']}<" not in html  # not among the first 3
        else:
            assert escape(r["detail"]) in html
