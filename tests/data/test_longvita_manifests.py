"""The four Long-VITA stage manifests reproduce the original mixture (reference sections 4 and 5).

The expectations below are the reference table (shared/reference/long-vita.md section 5), written
per original config group of VITA-MLLM/Long-VITA `configs/long_vita_finetune_stage{1..4}.yaml`.
Where the two differ, the original wins. Checked differences:
- Ratios, file counts and caps: none. Every row of the table matches the original configs.
- Several table rows are more than one original group: "LIMA; databricks-dolly-15k" is `lima` and
  `databricks-dolly-15k`; the math row is six groups (one file each, own cap); the long-text row
  is the group `Long`; LLaVA-Video-178K is eight groups `lmms-lab/LLaVA-Video-178K_<span>_<cap|qa>`
  (2 + 8, 2 + 9, 2 + 7, 2 + 7 files = 39). The manifests carry the original group names.
- Comic: the table names `VITA-MLLM/Comic-9K`. The published annotation file is
  `Long-VITA-Training-Data/jsonl/Comic/summary.jsonl` (its media are in the HF dataset
  `VITA-MLLM/Comic`). The configs say `datasets/jsonl/Comic-9K/summary.jsonl`, or in one revision
  `datasets/jsonl/VITA-MLLM/Comic-9K/summary.jsonl`. The manifests use the published path.
- MovieNet: no file of it was seen in the published training data. The manifests keep the
  config's `jsonl/MovieNet/MovieNet.jsonl` (another revision: `VITA-MLLM/MovieNet/summary.jsonl`).
"""

from __future__ import annotations

import os
from collections import Counter, defaultdict
from pathlib import Path

import pytest

from lvita_data.manifest import StageManifest, load_manifest

MANIFEST_DIR = Path(__file__).resolve().parents[2] / "manifests" / "longvita"
STAGES = ("stage1", "stage2", "stage3", "stage4")
DATA_DEFAULT = str(MANIFEST_DIR.parents[1] / "data" / "Long-VITA-Training-Data")
MEDIA_DEFAULT = str(MANIFEST_DIR.parents[1] / "data" / "media")

# stage: (seed, packed length, reset attention, video max_frames or None)
STAGE_SETTINGS = {
    "stage1": (42, 32768, True, None),
    "stage2": (4242, 16384, True, 64),
    "stage3": (424242, 131072, False, 512),
    "stage4": (42424242, 1048576, False, 4096),
}

_GENERAL = (0, 1, 0.1, 0.1)
_CAPTION = (1, 1, 0.1, 0.1)
_LONG = (0, 0, 1, 1)
# original group: (files, cap per file, ratios S1..S4)
GROUPS: dict[str, tuple[int, int | None, tuple[float, ...]]] = {
    "LLaVA": (1, None, (0, 0, 0, 0)),  # llava_v1_5_mix665k: ratio 0 everywhere
    "LLaVA-ReCap": (3, None, _CAPTION),
    "ALLaVA": (7, None, _CAPTION),
    "LVIS": (1, None, _GENERAL),
    "ShareGPT4V": (2, None, _CAPTION),
    "the_cauldron": (29, None, _GENERAL),
    "Docmatix": (1, None, _CAPTION),
    "LLaVA-OneVision-Mid-Data": (4, None, _CAPTION),
    "LLaVA-OneVision-Data": (65, None, _GENERAL),
    "M4-Instruct-Data": (2, None, _GENERAL),
    "OpenHermes": (1, 300_000, _GENERAL),
    "lima": (1, None, _GENERAL),
    "databricks-dolly-15k": (1, None, _GENERAL),
    "MetaMathQA": (1, 100_000, _GENERAL),
    "MathInstruct": (1, 80_000, _GENERAL),
    "orca-math-word-problems-200k": (1, 50_000, _GENERAL),
    "atlas-math-sets": (1, 100_000, _GENERAL),
    "goat": (1, 30_000, _GENERAL),
    "camel-ai": (1, 30_000, _GENERAL),
    "Long-Instruction-with-Paraphrasing": (11, None, _LONG),
    "Long": (8, None, _LONG),
    "VideoGPT-plus_Training_Dataset": (11, None, _GENERAL),
    "Share14/ShareGemini_cap": (2, None, _GENERAL),
    "Comic-9K": (1, None, _LONG),
    "Movie": (1, None, (0, 0, 0, 1)),
    **{
        f"lmms-lab/LLaVA-Video-178K_{span}_{kind}": (n, None, _LONG)
        for span, kind, n in [
            ("0_30_s", "cap", 2),
            ("0_30_s", "qa", 8),
            ("30_60_s", "cap", 2),
            ("30_60_s", "qa", 9),
            ("1_2_m", "cap", 2),
            ("1_2_m", "qa", 7),
            ("2_3_m", "cap", 2),
            ("2_3_m", "qa", 7),
        ]
    },
}

CAULDRON_SUBSETS = {
    "chart2text", "cocoqa", "datikz", "diagram_image_to_text", "docvqa", "finqa", "geomverse",
    "iam", "intergps", "localized_narratives", "mimic_cgd", "multihiertt", "nlvr2", "ocrvqa",
    "okvqa", "plotqa", "raven", "rendered_text", "robut_sqa", "robut_wikisql", "screen2words",
    "spot_the_diff", "tabmwp", "tat_qa", "textvqa", "vistext", "visualmrc", "vqav2", "websight",
}  # fmt: skip
VIDEO_GROUPS = {"M4-Instruct-Data", "VideoGPT-plus_Training_Dataset", "Share14/ShareGemini_cap"}


@pytest.fixture(autouse=True)
def _default_roots(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("LVITA_DATA_ROOT", raising=False)
    monkeypatch.delenv("LVITA_MEDIA_ROOT", raising=False)


def _load(stage: str) -> StageManifest:
    return load_manifest(MANIFEST_DIR / f"{stage}.yaml")


def _by_group(manifest: StageManifest) -> dict[str, list]:
    groups: dict[str, list] = defaultdict(list)
    for entry in manifest.datasets:
        groups[entry.group].append(entry)
    return groups


def test_llava_video_and_table_totals_match_the_reference_rows() -> None:
    video = sum(n for g, (n, _, _) in GROUPS.items() if g.startswith("lmms-lab/LLaVA-Video-178K"))
    math = [g for g, (_, cap, _) in GROUPS.items() if cap and g != "OpenHermes"]
    assert video == 39
    assert len(math) == 6
    assert len(CAULDRON_SUBSETS) == 29


@pytest.mark.parametrize("stage", STAGES)
def test_stage_settings_follow_reference_section_4(stage: str) -> None:
    manifest = _load(stage)
    seed, max_seq_len, reset, max_frames = STAGE_SETTINGS[stage]
    assert manifest.stage == stage
    assert manifest.seed == seed
    assert manifest.tokenizer == "qwen2.5"
    assert manifest.pack.max_seq_len == max_seq_len
    assert manifest.pack.reset_attention is reset
    assert manifest.image.max_tiles == 12
    if max_frames is None:
        assert manifest.video is None
    else:
        assert manifest.video is not None
        assert manifest.video.max_frames == max_frames
        assert manifest.video.max_fps == 1.0


@pytest.mark.parametrize("index, stage", list(enumerate(STAGES)))
def test_groups_files_ratios_and_caps_match_the_original(index: int, stage: str) -> None:
    groups = _by_group(_load(stage))
    expected = {g for g, (_, _, ratios) in GROUPS.items() if ratios[index] > 0}
    assert set(groups) == expected, "groups with ratio 0 are omitted, all others present"
    for group, entries in groups.items():
        num_files, cap, ratios = GROUPS[group]
        assert len(entries) == num_files, group
        for entry in entries:
            assert entry.format == "longvita_jsonl"
            assert entry.ratio == ratios[index], entry.name
            assert entry.max_samples == cap, entry.name
            assert isinstance(entry.path, str), "one file per entry"


def test_entry_counts_per_stage() -> None:
    counts = {stage: len(_load(stage).datasets) for stage in STAGES}
    assert counts == {"stage1": 17, "stage2": 136, "stage3": 195, "stage4": 196}


@pytest.mark.parametrize("stage", STAGES)
def test_paths_are_unique_and_under_the_data_root_default(stage: str) -> None:
    manifest = _load(stage)
    data_root = os.path.normpath(MANIFEST_DIR / DATA_DEFAULT) + os.sep
    media_root = os.path.normpath(MANIFEST_DIR / MEDIA_DEFAULT) + os.sep
    paths = [entry.path for entry in manifest.datasets]
    duplicates = [p for p, n in Counter(paths).items() if n > 1]
    assert not duplicates
    for entry in manifest.datasets:
        assert entry.path.startswith(data_root + "jsonl" + os.sep), entry.path
        assert entry.path.endswith(".jsonl"), entry.path
        assert entry.media_root is None or entry.media_root.startswith(media_root), entry.name


def test_video_groups_only_where_the_stage_takes_video() -> None:
    assert not VIDEO_GROUPS & set(_by_group(_load("stage1")))
    for stage in STAGES[1:]:
        assert set(_by_group(_load(stage))) >= VIDEO_GROUPS


def test_named_files_of_the_original() -> None:
    groups = _by_group(_load("stage4"))
    cauldron = {Path(e.path).stem for e in groups["the_cauldron"]}
    assert cauldron == CAULDRON_SUBSETS
    recap = {Path(e.path).parent.name for e in groups["LLaVA-ReCap"]}
    assert recap == {"LLaVA-ReCap-558K", "LLaVA-ReCap-118K", "LLaVA-ReCap-CC3M"}
    ov_data = {Path(e.path).name for e in groups["LLaVA-OneVision-Data"]}
    assert {"GeoQA+(MathV360K).jsonl", "ai2d(cauldron,llava_format).jsonl"} <= ov_data
    video = [Path(e.path).name for g, es in groups.items() if "LLaVA-Video-178K" in g for e in es]
    assert "sharegptvideo_qa_255k_processed.jsonl" in video
    assert Path(groups["Comic-9K"][0].path).parts[-2:] == ("Comic", "summary.jsonl")


def test_env_vars_move_both_roots(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("LVITA_DATA_ROOT", str(tmp_path / "annotations"))
    monkeypatch.setenv("LVITA_MEDIA_ROOT", str(tmp_path / "media"))
    manifest = _load("stage2")
    for entry in manifest.datasets:
        assert entry.path.startswith(str(tmp_path / "annotations" / "jsonl") + os.sep)
        assert entry.media_root is None or entry.media_root.startswith(str(tmp_path / "media"))
