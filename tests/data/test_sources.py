"""Readers of native formats (`lvita_data.records`) on small hand-made files."""

from __future__ import annotations

import os
import random
from pathlib import Path

import orjson
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from lvita_data.errors import SkipSample, SourceError
from lvita_data.records import READERS, Source, base, open_source
from lvita_data.schema import MediaRef, RawRecord, RejectReason, Turn

IMAGE_STRUCT = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
CAULDRON_SCHEMA = pa.schema(
    [
        ("images", pa.list_(IMAGE_STRUCT)),
        (
            "texts",
            pa.list_(
                pa.struct(
                    [("user", pa.string()), ("assistant", pa.string()), ("source", pa.string())]
                )
            ),
        ),
    ]
)
ONEVISION_SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("image", IMAGE_STRUCT),
        ("conversations", pa.list_(pa.struct([("from", pa.string()), ("value", pa.string())]))),
        ("data_source", pa.string()),
    ]
)


def write_jsonl(path: Path, rows: list) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(
        b"".join((r if isinstance(r, bytes) else orjson.dumps(r)) + b"\n" for r in rows)
    )
    return path


def msg(role: str, content: str) -> dict[str, str]:
    return {"role": role, "content": content}


def conv(sender: str, value: str) -> dict[str, str]:
    return {"from": sender, "value": value}


def reason_of(source: Source, row: int) -> str:
    with pytest.raises(SkipSample) as info:
        source.read(row)
    return info.value.reason


def longvita(tmp_path: Path, rows: list, media_root: str | None = "media") -> Source:
    path = write_jsonl(tmp_path / "data" / "train.jsonl", rows)
    root = None if media_root is None else str(tmp_path / media_root)
    return open_source(str(path), fmt="longvita_jsonl", dataset="lv", media_root=root)


# --------------------------------------------------------------------------------------------
# longvita_jsonl


def test_longvita_normalizes_roles_media_and_keeps_content(tmp_path: Path) -> None:
    rows = [
        {
            "messages": [
                msg("system", "Be brief.  "),
                msg("Human", "<image>\n<image>\nCompare them.\n"),
                msg("gpt", "  Same.  "),
                msg("user", "<video>\nAnd this?"),
                msg("assistant", "A clip."),
            ],
            "images": ["a/1.jpg", "./b/../b/2.png"],
            "videos": "clips/frames_dir/",
        }
    ]
    source = longvita(tmp_path, rows)
    assert len(source) == 1
    record = source.read(0)
    assert isinstance(record, RawRecord)
    assert record.dataset == "lv"
    assert record.record_id == "0"
    assert record.source_file == str(tmp_path / "data" / "train.jsonl")
    assert record.turns == (
        Turn("system", "Be brief.  "),
        Turn("user", "<image>\n<image>\nCompare them.\n"),
        Turn("assistant", "  Same.  "),
        Turn("user", "<video>\nAnd this?"),
        Turn("assistant", "A clip."),
    )
    root = tmp_path / "media"
    assert record.images == (
        MediaRef(kind="image", path=str(root / "a/1.jpg"), name="a/1.jpg"),
        MediaRef(kind="image", path=str(root / "b/2.png"), name="./b/../b/2.png"),
    )
    assert record.videos == (
        MediaRef(kind="video", path=str(root / "clips/frames_dir"), name="clips/frames_dir/"),
    )
    for ref in record.images + record.videos:
        assert os.path.isabs(ref.path)


def test_longvita_accepts_llava_style_conversations_and_missing_media_is_not_checked(
    tmp_path: Path,
) -> None:
    rows = [
        {
            "conversations": [conv("human", "<image>\nWhat?"), conv("gpt", "A cat.")],
            "images": "does/not/exist.jpg",
        },
        {"messages": [msg("user", "Hi"), msg("assistant", "Hello")]},
        {"messages": [msg("user", "Hi"), msg("assistant", "Hello")], "images": None},
    ]
    source = longvita(tmp_path, rows)
    record = source.read(0)
    assert record.turns[0] == Turn("user", "<image>\nWhat?")
    assert record.images[0].path == str(tmp_path / "media/does/not/exist.jpg")
    assert source.read(1).images == () and source.read(1).videos == ()
    assert source.read(2).images == ()


def test_len_counts_every_row_including_malformed_and_blank(tmp_path: Path) -> None:
    good = orjson.dumps({"messages": [msg("user", "q"), msg("assistant", "a")]})
    path = tmp_path / "x.jsonl"
    path.write_bytes(good + b"\n{broken\n\n" + good + b"\n")
    source = open_source(str(path), fmt="longvita_jsonl", dataset="d", media_root=None)
    assert len(source) == 4  # the final "\n" does not open a row; the blank middle line does
    assert source.read(0).record_id == "0"
    assert reason_of(source, 1) == "malformed_json"
    assert reason_of(source, 2) == "malformed_json"
    assert source.read(3).record_id == "3"
    path.write_bytes(good + b"\n" + good)  # no final newline
    assert len(open_source(str(path), fmt="longvita_jsonl", dataset="d", media_root=None)) == 2
    path.write_bytes(b"")
    assert len(open_source(str(path), fmt="longvita_jsonl", dataset="d", media_root=None)) == 0
    with pytest.raises(IndexError):
        source.read(4)


@pytest.mark.parametrize(
    ("row", "reason"),
    [
        (b'{"messages": [{"role": "user", "content": "unterminated', "malformed_json"),
        (b"\xff\xfe not json", "malformed_json"),
        ([1, 2], "bad_field_type"),
        ({"messages": "user: hi"}, "bad_field_type"),
        ({"messages": ["hi"]}, "bad_field_type"),
        ({"messages": [msg("user", "q"), {"role": "assistant", "content": 3}]}, "bad_field_type"),
        (
            {"messages": [msg("user", "q"), {"role": "assistant", "content": None}]},
            "bad_field_type",
        ),
        ({"messages": [{"role": 1, "content": "q"}, msg("assistant", "a")]}, "bad_field_type"),
        ({"messages": [msg("user", "q"), msg("assistant", "a")], "images": 7}, "bad_field_type"),
        (
            {"messages": [msg("user", "<image>q"), msg("assistant", "a")], "images": ["a", 1]},
            "bad_field_type",
        ),
        ({"messages": [msg("user", "q"), msg("assistant", "a")], "videos": [""]}, "bad_field_type"),
        ({"text": "no conversation"}, "bad_field_type"),
        ({"messages": [msg("robot", "q"), msg("assistant", "a")]}, "unknown_role"),
        (
            {"messages": [msg("user", "q"), msg("system", "s"), msg("assistant", "a")]},
            "unknown_role",
        ),
        ({"messages": []}, "empty_conversation"),
        ({"messages": [msg("user", "q")]}, "no_assistant_turn"),
        ({"messages": [msg("system", "s")]}, "no_assistant_turn"),
        ({"messages": [msg("user", "q"), msg("assistant", " \n")]}, "no_assistant_turn"),
        (
            {"messages": [msg("user", "<image><image>q"), msg("assistant", "a")], "images": ["x"]},
            "tag_mismatch",
        ),
        ({"messages": [msg("user", "q"), msg("assistant", "a")], "images": ["x"]}, "tag_mismatch"),
        ({"messages": [msg("user", "<video>q"), msg("assistant", "a")]}, "tag_mismatch"),
        (
            {"messages": [msg("user", "<image>q"), msg("assistant", "a")], "images": ["../x.jpg"]},
            "media_path_escape",
        ),
        (
            {"messages": [msg("user", "<image>q"), msg("assistant", "a")], "images": ["a/../../x"]},
            "media_path_escape",
        ),
        (
            {"messages": [msg("user", "<image>q"), msg("assistant", "a")], "images": ["/etc/x"]},
            "media_path_escape",
        ),
        (
            {"messages": [msg("user", "<video>q"), msg("assistant", "a")], "videos": ["/v.mp4"]},
            "media_path_escape",
        ),
    ],
)
def test_longvita_reject_reasons(tmp_path: Path, row, reason: str) -> None:
    ok = {"messages": [msg("user", "q"), msg("assistant", "a")]}
    source = longvita(tmp_path, [ok, row, ok])
    assert len(source) == 3
    assert reason_of(source, 1) == reason
    assert source.read(2).record_id == "2"


def test_skip_sample_carries_detail(tmp_path: Path) -> None:
    source = longvita(tmp_path, [{"messages": [msg("robot", "q"), msg("assistant", "a")]}])
    with pytest.raises(SkipSample) as info:
        source.read(0)
    assert "robot" in info.value.detail


def test_without_media_root_paths_resolve_against_the_source_directory(tmp_path: Path) -> None:
    rows = [
        {"messages": [msg("user", "<image>q"), msg("assistant", "a")], "images": ["img/1.jpg"]},
        {"messages": [msg("user", "<image>q"), msg("assistant", "a")], "images": ["../1.jpg"]},
    ]
    source = longvita(tmp_path, rows, media_root=None)
    assert source.media_root is None
    assert source.read(0).images[0].path == str(tmp_path / "data" / "img" / "1.jpg")
    assert reason_of(source, 1) == "media_path_escape"


def test_media_root_prefix_sibling_is_an_escape(tmp_path: Path) -> None:
    rows = [{"messages": [msg("user", "<image>q"), msg("assistant", "a")], "images": ["../m2/x"]}]
    source = longvita(tmp_path, rows, media_root="m")
    assert reason_of(source, 0) == "media_path_escape"


# --------------------------------------------------------------------------------------------
# llava_json


def test_llava_json_array_inserts_image_tag_and_checks_counts(tmp_path: Path) -> None:
    rows = [
        {
            "id": "a",
            "image": "coco/1.jpg",
            "conversations": [conv("human", "Q?"), conv("gpt", "A")],
        },
        {
            "image": "coco/2.jpg",
            "conversations": [
                conv("gpt", "Hi."),
                conv("human", "Describe.<image>"),
                conv("gpt", "Ok."),
            ],
        },
        {
            "image": ["m/1.jpg", "m/2.jpg"],
            "conversations": [conv("human", "Both?"), conv("gpt", "Yes.")],
        },
        {
            "image": ["m/1.jpg", "m/2.jpg"],
            "conversations": [conv("human", "<image>\nOnly one tag"), conv("gpt", "No.")],
        },
        {"conversations": [conv("human", "text only"), conv("gpt", "fine")]},
        {"conversations": [conv("human", "<image>\nno image"), conv("gpt", "bad")]},
        {"image": "x.jpg", "conversations": [conv("bot", "<image>hi"), conv("gpt", "a")]},
        {"image": 5, "conversations": [conv("human", "<image>hi"), conv("gpt", "a")]},
        {"image": "x.jpg", "conversations": []},
        {"image": "../x.jpg", "conversations": [conv("human", "<image>hi"), conv("gpt", "a")]},
    ]
    path = tmp_path / "sharegpt4v.json"
    path.write_bytes(orjson.dumps(rows, option=orjson.OPT_INDENT_2))
    source = open_source(str(path), fmt="llava_json", dataset="s", media_root=str(tmp_path / "img"))
    assert len(source) == len(rows)
    r0 = source.read(0)
    assert r0.turns == (Turn("user", "<image>\nQ?"), Turn("assistant", "A"))
    assert r0.images[0].path == str(tmp_path / "img/coco/1.jpg")
    assert r0.record_id == "0"
    r1 = source.read(1)  # tag present (not first): kept where it is
    assert r1.turns[1] == Turn("user", "Describe.<image>")
    r2 = source.read(2)
    assert r2.turns[0].content == "<image>\n<image>\nBoth?"
    assert len(r2.images) == 2
    assert reason_of(source, 3) == "tag_mismatch"
    assert source.read(4).images == ()
    assert reason_of(source, 5) == "tag_mismatch"
    assert reason_of(source, 6) == "unknown_role"
    assert reason_of(source, 7) == "bad_field_type"
    assert reason_of(source, 8) == "empty_conversation"
    assert reason_of(source, 9) == "media_path_escape"


def test_llava_jsonl_video_layouts(tmp_path: Path) -> None:
    rows = [
        {  # LLaVA-Video-178K: <image> stands for the video
            "id": "v0",
            "conversations": [conv("human", "<image>\nWhat happens?"), conv("gpt", "Stuff.")],
            "data_source": "academic",
            "video": "academic_source/a.mp4",
        },
        {"video": "b.mp4", "conversations": [conv("human", "<video>\nQ"), conv("gpt", "A")]},
        {"video": "frames/c", "conversations": [conv("human", "Q"), conv("gpt", "A")]},
        {"video": "d.mp4", "conversations": [conv("human", "<video><video>Q"), conv("gpt", "A")]},
        b'{"video": "e.mp4", "conversations": [',
        {"video": ["a.mp4", 3], "conversations": [conv("human", "Q"), conv("gpt", "A")]},
    ]
    path = write_jsonl(tmp_path / "llava_video_178k.jsonl", rows)
    source = open_source(str(path), fmt="llava_json", dataset="v", media_root=str(tmp_path / "v"))
    assert len(source) == 6
    r0 = source.read(0)
    assert r0.turns[0] == Turn("user", "<video>\nWhat happens?")
    assert r0.images == ()
    assert r0.videos == (
        MediaRef(
            kind="video",
            path=str(tmp_path / "v/academic_source/a.mp4"),
            name="academic_source/a.mp4",
        ),
    )
    assert source.read(1).turns[0].content == "<video>\nQ"
    r2 = source.read(2)
    assert r2.turns[0].content == "<video>\nQ"
    assert r2.videos[0].path == str(tmp_path / "v/frames/c")
    assert reason_of(source, 3) == "tag_mismatch"
    assert reason_of(source, 4) == "malformed_json"
    assert reason_of(source, 5) == "bad_field_type"


# --------------------------------------------------------------------------------------------
# text_jsonl


def test_text_jsonl_alpaca_and_messages(tmp_path: Path) -> None:
    rows = [
        {"instruction": "Summarize.", "input": "Long text ...", "output": "Short."},
        {"instruction": "Say hi.", "input": "", "output": "Hi."},
        {"instruction": "Say hi.", "output": "Hi."},
        {"messages": [msg("system", "sys"), msg("user", "q"), msg("assistant", "a")]},
        {"instruction": "x", "input": 3, "output": "y"},
        {"instruction": "x", "output": None},
        {"instruction": "x", "output": ""},
        {"instruction": "Look: <image>", "output": "y"},
        {"prompt": "x", "completion": "y"},
    ]
    path = write_jsonl(tmp_path / "long_alpaca.jsonl", rows)
    source = open_source(str(path), fmt="text_jsonl", dataset="t", media_root=None)
    assert len(source) == 9
    assert source.read(0).turns == (
        Turn("user", "Summarize.\nLong text ..."),
        Turn("assistant", "Short."),
    )
    assert source.read(1).turns[0] == Turn("user", "Say hi.")
    assert source.read(2).turns[0] == Turn("user", "Say hi.")
    r3 = source.read(3)
    assert [t.role for t in r3.turns] == ["system", "user", "assistant"]
    assert r3.images == () and r3.videos == ()
    assert reason_of(source, 4) == "bad_field_type"
    assert reason_of(source, 5) == "bad_field_type"
    assert reason_of(source, 6) == "no_assistant_turn"
    assert reason_of(source, 7) == "tag_mismatch"
    assert reason_of(source, 8) == "bad_field_type"


# --------------------------------------------------------------------------------------------
# hf_parquet


def write_cauldron(path: Path, images: list, texts: list, **kwargs) -> Path:
    table = pa.table({"images": images, "texts": texts}, schema=CAULDRON_SCHEMA)
    pq.write_table(table, path, **kwargs)
    return path


def write_onevision(path: Path, rows: list[tuple], **kwargs) -> Path:
    ids, images, conversations, sources = zip(*rows, strict=True)
    table = pa.table(
        {
            "id": list(ids),
            "image": list(images),
            "conversations": list(conversations),
            "data_source": list(sources),
        },
        schema=ONEVISION_SCHEMA,
    )
    pq.write_table(table, path, **kwargs)
    return path


def test_cauldron_parquet_images_first_and_embedded_bytes(tmp_path: Path) -> None:
    qa = {"user": "What is shown?", "assistant": "A chart.", "source": "chartqa"}
    qa2 = {"user": "Value of A?", "assistant": "42", "source": "chartqa"}
    images = [
        [{"bytes": b"IMG0", "path": None}],
        [{"bytes": b"IMG1a", "path": "x.png"}, {"bytes": b"IMG1b", "path": None}],
        [],
        [{"bytes": b"IMG3", "path": None}, None],
        [{"bytes": None, "path": "charts/c.png"}],
        [{"bytes": None, "path": None}],
        [{"bytes": b"IMG6", "path": None}],
        [{"bytes": b"IMG7", "path": None}],
    ]
    texts = [
        [qa, qa2],
        [qa],
        [qa],
        [qa],
        [qa],
        [qa],
        [{"user": "q", "assistant": None, "source": "s"}],
        [{"user": "<image>\nq", "assistant": "a", "source": "s"}],
    ]
    path = write_cauldron(tmp_path / "chartqa-00000-of-00001.parquet", images, texts)
    source = open_source(str(path), fmt="hf_parquet", dataset="c", media_root=str(tmp_path))
    assert len(source) == 8
    r0 = source.read(0)
    assert r0.turns == (
        Turn("user", "<image>\nWhat is shown?"),
        Turn("assistant", "A chart."),
        Turn("user", "Value of A?"),
        Turn("assistant", "42"),
    )
    assert r0.images == (MediaRef(kind="image", data=b"IMG0", name="0:0"),)
    assert r0.images[0].data == b"IMG0"
    r1 = source.read(1)
    assert r1.turns[0].content == "<image>\n<image>\nWhat is shown?"
    assert [(m.name, m.data) for m in r1.images] == [("1:0", b"IMG1a"), ("1:1", b"IMG1b")]
    r2 = source.read(2)
    assert r2.images == () and r2.turns[0].content == "What is shown?"
    assert reason_of(source, 3) == "bad_field_type"  # a null image in the list
    assert source.read(4).images[0].path == str(tmp_path / "charts/c.png")
    assert reason_of(source, 5) == "bad_field_type"
    assert reason_of(source, 6) == "bad_field_type"
    assert source.read(7).turns[0].content == "<image>\nq"  # tags already there: kept


def test_onevision_parquet(tmp_path: Path) -> None:
    img = {"bytes": b"JPEG", "path": "ov_0.jpg"}
    rows = [
        ("id0", img, [conv("human", "<image>\nRead it."), conv("gpt", "Hello")], "synthdog"),
        ("id1", None, [conv("human", "Text only?"), conv("gpt", "Yes")], "magpie"),
        ("id2", None, [conv("human", "<image>\nRead it."), conv("gpt", "?")], "synthdog"),
        ("id3", img, [conv("human", "No tag."), conv("gpt", "Ok")], "synthdog"),
        ("id4", img, [conv("human", "<image><image>"), conv("gpt", "Ok")], "synthdog"),
        ("id5", img, [conv("system", "s"), conv("human", "<image>q")], "synthdog"),
        ("id6", img, [conv("human", "<image>q"), conv("model", "a")], "synthdog"),
    ]
    path = write_onevision(tmp_path / "ov-00000-of-00001.parquet", rows)
    source = open_source(str(path), fmt="hf_parquet", dataset="ov", media_root=None)
    assert len(source) == 7
    r0 = source.read(0)
    assert r0.record_id == "0"
    assert r0.turns == (Turn("user", "<image>\nRead it."), Turn("assistant", "Hello"))
    assert r0.images == (MediaRef(kind="image", data=b"JPEG", name="0:0"),)
    assert source.read(1).images == ()
    assert reason_of(source, 2) == "tag_mismatch"
    assert source.read(3).turns[0].content == "<image>\nNo tag."
    assert reason_of(source, 4) == "tag_mismatch"
    assert reason_of(source, 5) == "no_assistant_turn"
    assert reason_of(source, 6) == "unknown_role"


def test_parquet_written_by_hf_datasets(tmp_path: Path) -> None:
    datasets = pytest.importorskip("datasets")
    features = datasets.Features(
        {
            "images": datasets.Sequence(datasets.Image()),
            "texts": [
                {
                    "user": datasets.Value("string"),
                    "assistant": datasets.Value("string"),
                    "source": datasets.Value("string"),
                }
            ],
        }
    )
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), (255, 0, 0)).save(buffer, format="PNG")
    data = buffer.getvalue()
    ds = datasets.Dataset.from_dict(
        {
            "images": [[{"bytes": data, "path": None}]],
            "texts": [[{"user": "Color?", "assistant": "Red.", "source": "demo"}]],
        },
        features=features,
    )
    path = tmp_path / "hf.parquet"
    ds.to_parquet(str(path))
    record = open_source(str(path), fmt="hf_parquet", dataset="hf", media_root=None).read(0)
    assert record.turns[0].content == "<image>\nColor?"
    assert record.images[0].data == data


def test_parquet_row_group_cache(tmp_path: Path) -> None:
    rows = [
        (
            f"id{i}",
            {"bytes": f"IMG{i}".encode(), "path": None},
            [conv("human", f"<image>\nRow {i}?"), conv("gpt", f"Answer {i}")],
            "demo",
        )
        for i in range(12)
    ]
    path = write_onevision(tmp_path / "ov.parquet", rows, row_group_size=3)
    assert pq.ParquetFile(path).metadata.num_row_groups == 4
    source = open_source(str(path), fmt="hf_parquet", dataset="ov", media_root=None)
    assert len(source) == 12
    assert source.row_groups_read == 0  # len() comes from the metadata
    for row in (0, 1, 5, 9):
        record = source.read(row)
        assert record.record_id == str(row)
        assert record.turns[1].content == f"Answer {row}"
        assert record.images[0].data == f"IMG{row}".encode()
        assert record.images[0].name == f"{row}:0"
    assert source.row_groups_read == 3  # groups 0, 1 and 3; rows 0 and 1 share group 0
    for row in (11, 2, 10):  # out-of-order reads stay correct
        assert source.read(row).turns[1].content == f"Answer {row}"
    with pytest.raises(IndexError):
        source.read(12)


def test_parquet_row_group_cache_cauldron_with_empty_row_groups(tmp_path: Path) -> None:
    qa = [{"user": "q", "assistant": "a", "source": "s"}]
    path = tmp_path / "c.parquet"
    with pq.ParquetWriter(path, CAULDRON_SCHEMA) as writer:
        for start in (0, 3):
            writer.write_table(
                pa.table(
                    {
                        "images": [
                            [{"bytes": f"I{start + i}".encode(), "path": None}] for i in range(3)
                        ],
                        "texts": [qa] * 3,
                    },
                    schema=CAULDRON_SCHEMA,
                )
            )
    source = open_source(str(path), fmt="hf_parquet", dataset="c", media_root=None)
    assert len(source) == 6
    assert [source.read(r).images[0].data for r in range(6)] == [f"I{r}".encode() for r in range(6)]


# --------------------------------------------------------------------------------------------
# whole-file errors


@pytest.mark.parametrize("fmt", sorted(READERS))
def test_missing_file_and_directory_are_source_errors(tmp_path: Path, fmt: str) -> None:
    for path in (tmp_path / "missing.jsonl", tmp_path):
        with pytest.raises(SourceError, match=str(path)):
            open_source(str(path), fmt=fmt, dataset="d", media_root=None)


def test_unreadable_inputs_are_source_errors(tmp_path: Path) -> None:
    not_parquet = tmp_path / "x.parquet"
    not_parquet.write_bytes(b"PAR1 this is not parquet")
    with pytest.raises(SourceError, match="x.parquet"):
        open_source(str(not_parquet), fmt="hf_parquet", dataset="d", media_root=None)

    other = tmp_path / "other.parquet"
    pq.write_table(pa.table({"a": [1, 2]}), other)
    with pytest.raises(SourceError, match="other.parquet"):
        open_source(str(other), fmt="hf_parquet", dataset="d", media_root=None)

    obj = tmp_path / "obj.json"
    obj.write_bytes(orjson.dumps({"conversations": []}))
    with pytest.raises(SourceError, match="obj.json"):
        open_source(str(obj), fmt="llava_json", dataset="d", media_root=None)

    broken = tmp_path / "broken.json"
    broken.write_bytes(b'[{"conversations": []}, {')
    with pytest.raises(SourceError, match="broken.json"):
        open_source(str(broken), fmt="llava_json", dataset="d", media_root=None)

    with pytest.raises(SourceError, match="unknown format"):
        open_source(str(obj), fmt="csv", dataset="d", media_root=None)


def test_json_file_with_jsonl_content_is_read_as_lines(tmp_path: Path) -> None:
    row = {"conversations": [conv("human", "q"), conv("gpt", "a")]}
    path = write_jsonl(tmp_path / "lines.json", [row, row, b"{oops"])
    source = open_source(str(path), fmt="llava_json", dataset="d", media_root=None)
    assert len(source) == 3
    assert source.read(1).turns[1] == Turn("assistant", "a")
    assert reason_of(source, 2) == "malformed_json"


def test_source_attributes(tmp_path: Path) -> None:
    source = longvita(tmp_path, [{"messages": [msg("user", "q"), msg("assistant", "a")]}])
    assert source.path == str(tmp_path / "data" / "train.jsonl")
    assert source.dataset == "lv"
    assert source.media_root == str(tmp_path / "media")
    assert "rows=1" in repr(source)


def outcome(function, *args, **kwargs):
    try:
        return function(*args, **kwargs)
    except SkipSample as skip:
        return skip.reason, skip.detail


NAMES = [
    "a.jpg", "x/y/z.png", "a..b/c.jpg", "é/ü.jpg", "a\\b.jpg", "a b/c", "./a.jpg", "a/./b.jpg",
    "a//b.jpg", "a/", "../a.jpg", "a/../../b.jpg", "a/../b.jpg", "/abs.jpg", ".hidden.jpg",
    "a/.h.jpg", "a/..", "..", ".", "", "x\x00.jpg", "//a.jpg", 7, None,
]  # fmt: skip


@pytest.mark.parametrize("media_root", ["media", "/", None])
def test_plain_names_resolve_as_normpath_does(tmp_path: Path, media_root: str | None) -> None:
    """`Source.resolve`'s concatenation for plain names against `resolve_media` (normpath)."""
    write_jsonl(tmp_path / "a.jsonl", [{"messages": []}])
    root = None if media_root is None else str(tmp_path / media_root)
    source = open_source(
        str(tmp_path / "a.jsonl"), fmt="longvita_jsonl", dataset="d", media_root=root
    )
    for name in NAMES:
        for kind in ("image", "video"):
            expected = outcome(base.resolve_media, name, kind, source._media_base)
            assert outcome(source.resolve, name, kind) == expected, name


class CheckedList(list):
    """A list `turns_from_list` does not take its one-pass path for."""


def test_one_pass_turns_equal_the_checked_path() -> None:
    items = [
        {"role": "user", "content": "hi <image>"},
        {"from": "gpt", "value": "yo"},
        {"from": "human", "value": "<video> q"},
        {"role": "assistant", "content": "ok"},
        {"role": "assistant", "content": "  \n"},
        {"role": "human", "content": "<image><video><image>"},
        {"role": "User", "content": "x"},
        {"role": " assistant ", "content": " "},
        {"role": "system", "content": ""},
        {"role": "robot", "content": "x"},
        {"role": "user", "content": 3},
        {"role": ["user"], "content": "x"},
        {"role": "user"},
        "not a mapping",
    ]
    rng = random.Random(0)
    for _ in range(300):
        value = [dict(item) if isinstance(item, dict) else item for item in rng.choices(items, k=3)]
        for keys in (("role", "content"), ("from", "value")):
            kwargs = dict(role_key=keys[0], content_key=keys[1], where="messages")
            checked = outcome(base.turns_from_list, CheckedList(value), **kwargs)
            assert outcome(base.turns_from_list, value, **kwargs) == checked
            turns = checked if isinstance(checked, list) else [Turn("user", "a <video>")]
            for turns_ in (turns, turns[::-1], []):
                assert outcome(base.validate_turns, turns_) == outcome(validate_reference, turns_)
                for media in ((0, 0), (1, 0), (0, 1), (1, 1)):
                    expected = outcome(check_tags_reference, turns_, *media)
                    assert outcome(base.check_tags, turns_, *media) == expected


def validate_reference(turns) -> None:
    """`validate_turns` as first written (the spec the one-pass loop must keep)."""
    if not turns:
        raise base.skip(RejectReason.empty_conversation, "no turns")
    for i, turn in enumerate(turns):
        if turn.role == "system" and i > 0:
            raise base.skip(RejectReason.unknown_role, f"system turn at position {i} (only first)")
    if not any(t.role == "assistant" and t.content.strip() for t in turns):
        raise base.skip(RejectReason.no_assistant_turn, "no assistant turn with content")


def check_tags_reference(turns, num_images: int, num_videos: int) -> None:
    for tag, expected in (("<image>", num_images), ("<video>", num_videos)):
        found = base.count_tags(turns, tag)
        if found != expected:
            raise base.skip(
                RejectReason.tag_mismatch,
                f"{found} {tag} tag(s) in the turns but {expected} {tag[1:-1]}(s)",
            )


def test_json_lines_split_in_slices_equals_one_split(tmp_path: Path, monkeypatch) -> None:
    """Newlines are found slice by slice (a bounded mask); rows must not depend on where the
    slices fall, including a line or a newline on a slice border."""
    lines = [b'{"a": %d}' % i + b" " * (i % 5) for i in range(40)]
    path = tmp_path / "rows.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n\n" + b'{"z": 1}')
    reference = base.JsonRows(str(path))
    expected = [reference.line(i) for i in range(len(reference))]
    assert len(expected) == 42 and expected[40] == b"" and expected[41] == b'{"z": 1}'
    for size in (1, 7, 8, 64, 1 << 20):
        monkeypatch.setattr(base, "SPLIT_SLICE", size)
        rows = base.JsonRows(str(path))
        assert [rows.line(i) for i in range(len(rows))] == expected, size
