"""`lvita stats`: numbers consistent with the build, JSON, terminal table, HTML in Chromium."""

from __future__ import annotations

import io
import json
import shutil
import subprocess
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import yaml

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


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.skipif(
    CHROMIUM is None,
    reason="needs Debian's chromium for the headless render (apt-get install -y chromium)",
)
def test_html_renders_in_headless_chromium(variant_build, tmp_path):
    from PIL import Image

    _, out = variant_build
    html = tmp_path / "report.html"
    write_html(compute_stats(out), html)
    shot = tmp_path / "shot.png"
    command = [
        CHROMIUM,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--hide-scrollbars",
        f"--user-data-dir={tmp_path / 'profile'}",
        f"--screenshot={shot}",
        "--window-size=1200,2000",
        html.as_uri(),
    ]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120, check=False)
    assert shot.is_file(), f"no screenshot (rc {result.returncode}): {result.stderr[-2000:]}"
    image = np.asarray(Image.open(shot).convert("RGB")).astype(np.int32)
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
