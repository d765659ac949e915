"""Strict manifest parsing: errors name the file and the field."""

import textwrap
from pathlib import Path

import pytest

from lvita_data.errors import ManifestError
from lvita_data.manifest import expand_dataset_files, load_manifest

GOOD = """
schema_version: 1
stage: stage2
seed: 4242
pack: {max_seq_len: 4096, reset_attention: true}
video: {max_frames: 16}
datasets:
  - name: captions
    format: longvita_jsonl
    path: ${LVITA_TEST_ROOT:-data}/captions.jsonl
    media_root: media
    ratio: 2
    max_samples: 10
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "stage.yaml"
    path.write_text(textwrap.dedent(text))
    return path


def test_good_manifest_resolves_paths_and_env(tmp_path, monkeypatch):
    monkeypatch.delenv("LVITA_TEST_ROOT", raising=False)
    manifest = load_manifest(write(tmp_path, GOOD))
    entry = manifest.datasets[0]
    assert entry.path == str(tmp_path / "data" / "captions.jsonl")
    assert entry.media_root == str(tmp_path / "media")
    assert entry.ratio == 2.0 and isinstance(entry.ratio, float)
    assert manifest.video.max_frames == 16 and manifest.video.max_fps == 1.0
    assert manifest.image.max_tiles == 12 and manifest.tokenizer == "qwen2.5"
    monkeypatch.setenv("LVITA_TEST_ROOT", "/abs/root")
    assert load_manifest(write(tmp_path, GOOD)).datasets[0].path == "/abs/root/captions.jsonl"


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (("seed: 4242", "seed: 4242\ncolour: red"), "unknown key(s) ['colour']"),
        (("max_seq_len: 4096", "max_seq_len: 4096, pad: 1"), "pack: unknown key(s) ['pad']"),
        (("ratio: 2", "ratio: 2\n    weight: 1"), "datasets[0]: unknown key(s) ['weight']"),
        (("schema_version: 1", "schema_version: 2"), "schema_version must be 1"),
        (("seed: 4242", "seed: '42'"), "seed: expected int"),
        (("format: longvita_jsonl", "format: csv"), "datasets[0].format"),
        (("max_seq_len: 4096", "max_seq_len: -1"), "max_seq_len must be > 0"),
        (("ratio: 2", "ratio: -1"), "ratio must be >= 0"),
        (("stage: stage2\n", ""), "missing key(s) ['stage']"),
        (
            ("${LVITA_TEST_ROOT:-data}", "${LVITA_UNSET_VARIABLE_X}"),
            "LVITA_UNSET_VARIABLE_X is not set",
        ),
        (("reset_attention: true", "reset_attention: 1"), "reset_attention: expected bool"),
    ],
)
def test_errors_name_file_and_field(tmp_path, monkeypatch, edit, message):
    monkeypatch.delenv("LVITA_UNSET_VARIABLE_X", raising=False)
    old, new = edit
    assert old in GOOD
    path = write(tmp_path, GOOD.replace(old, new))
    with pytest.raises(ManifestError) as info:
        load_manifest(path)
    assert message in str(info.value)
    assert str(path) in str(info.value)


def test_duplicate_names_and_bad_yaml(tmp_path):
    doubled = GOOD + GOOD[GOOD.index("  - name") :]
    with pytest.raises(ManifestError, match="duplicate dataset names"):
        load_manifest(write(tmp_path, doubled))
    with pytest.raises(ManifestError, match="invalid YAML"):
        load_manifest(write(tmp_path, "datasets: [\n"))
    with pytest.raises(ManifestError, match="cannot read"):
        load_manifest(tmp_path / "absent.yaml")


def test_expand_files_reports_missing(tmp_path):
    (tmp_path / "d").mkdir()
    for name in ("b.jsonl", "a.jsonl", "skip.txt"):
        (tmp_path / "d" / name).write_text("{}\n")
    text = GOOD.replace(
        "path: ${LVITA_TEST_ROOT:-data}/captions.jsonl",
        "path: [d, 'd/*.jsonl', d/a.jsonl, nowhere.jsonl, 'none-*.jsonl']",
    )
    entry = load_manifest(write(tmp_path, text)).datasets[0]
    files, missing = expand_dataset_files(entry)
    d = tmp_path / "d"
    assert files == [str(d / "a.jsonl"), str(d / "b.jsonl")] * 2 + [str(d / "a.jsonl")]
    assert missing == [str(tmp_path / "nowhere.jsonl"), str(tmp_path / "none-*.jsonl")]
