"""`lvita show`: documents = cu_seqlens, decode round trip, label mask, media markers, counts,
--pack / --key, CLI errors, terminal text, HTML (escaped, tiles inlined, drawn in Chromium)."""

from __future__ import annotations

import base64
import io
import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from headless import CHROMIUM, screenshot
from PIL import Image

from lvita_data.build.run import build_stage
from lvita_data.errors import ShowError
from lvita_data.loader import ShardLoader
from lvita_data.schema import IGNORE_INDEX
from lvita_data.show.html import TILE_PX, render_html, tile_png
from lvita_data.show.model import describe_pack, visible
from lvita_data.show.read import find_pack, show_pack, vision_ids
from lvita_data.show.text import format_pack
from lvita_data.tokenizer.tokenizer import load_tokenizer
from pipelines.cli import EXIT_CODES

LVITA = [sys.executable, "-m", "pipelines"]
HOSTILE_FILE = "hostile<i>.jsonl"
HOSTILE = {
    "messages": [
        {
            "role": "user",
            "content": "Is <script>alert('x')</script> & <b>bold</b> safe? \x1b[31mred\x1b[0m "
            "\u202eevil\u202c",
        },
        {"role": "assistant", "content": "<img src=x onerror=alert(1)> 日本語のテキスト 🙂 é"},
    ]
}
MANIFEST = """\
schema_version: 1
stage: showtest
seed: 11
tokenizer: qwen2.5
pack:
  max_seq_len: 2048
  reset_attention: true
  group_by: none
image:
  max_tiles: 4
  min_tiles: 1
video:
  max_frames: 3
  max_fps: 1.0
  fit_to_budget: true
rejects:
  max_rate: 0.5
  min_selected: 1
shards:
  packs_per_shard: 5
  image_storage: {storage}
datasets:
  - name: lv_image_caption
    format: longvita_jsonl
    path: {root}/longvita/image_caption.jsonl
    media_root: {root}/longvita
    ratio: 0.5
  - name: lv_video_qa
    format: longvita_jsonl
    path: {root}/longvita/video_qa.jsonl
    media_root: {root}/longvita
    ratio: 0.3
  - name: short_chat
    format: text_jsonl
    path: {root}/text/short_chat.jsonl
    ratio: 0.5
  - name: hostile
    format: text_jsonl
    path: {hostile}
    ratio: 1.0
"""


@pytest.fixture(scope="module")
def builds(demo_corpus, tmp_path_factory) -> dict[str, Path]:
    """An image + video + text stage of 2048-token packs in shards of 5, with one record of
    hostile text, built with each image storage (format 2 "source", format 1 "tiles")."""
    root = demo_corpus[0]
    work = tmp_path_factory.mktemp("show")
    hostile = work / HOSTILE_FILE
    hostile.write_text(json.dumps(HOSTILE) + "\n", encoding="utf-8")
    out = {}
    for storage in ("source", "tiles"):
        manifest = work / f"showtest-{storage}.yaml"
        text = MANIFEST.format(root=root, storage=storage, hostile=hostile)
        manifest.write_text(text, encoding="utf-8")
        out[storage] = work / storage
        build_stage(str(manifest), str(out[storage]), workers=1, progress=False)
    return out


@pytest.fixture(scope="module")
def build(builds) -> Path:
    return builds["source"]


def _packs_with(build: Path, predicate) -> list[int]:
    loader = ShardLoader(build, shuffle=False, decode_pixels=False)
    return [g for g in range(loader.num_packs) if predicate(loader.read_pack(g).meta)]


def _kinds(meta: dict) -> set[str]:
    return {item["kind"] for s in meta["samples"] for item in s["media_order"]}


@pytest.mark.parametrize("storage", ["source", "tiles"])
def test_every_pack_cut_exactly_as_the_loader_reads_it(builds, storage):
    """Boundaries = cu_seqlens, segments tile each document, text round-trips through the
    tokenizer, masked spans are exactly labels == -100, one marker per media item over its
    tiles' placeholders, tokens per part sum to T."""
    tokenizer = load_tokenizer("qwen2.5")
    loader = ShardLoader(builds[storage], shuffle=False, decode_pixels=False)
    seen = dict.fromkeys(("image", "video", "padding", "trained", "special"), 0)
    for index in range(loader.num_packs):
        pack = loader.read_pack(index)
        view = show_pack(builds[storage], pack=index).view
        ids, labels, cu = pack.input_ids, pack.labels, pack.cu_seqlens
        assert [d.start for d in view.documents] + [view.documents[-1].stop] == cu.tolist()
        assert view.seq_len == len(ids) and view.key == pack.key
        shown_masked = np.zeros(len(ids), dtype=bool)
        total = 0
        media = []
        for document, sample in zip(view.documents, pack.meta["samples"], strict=True):
            assert (document.dataset, document.record) == (sample["dataset"], sample["record"])
            assert document.length == sample["length"]
            stops = [document.start] + [s.stop for s in document.segments]
            assert [s.start for s in document.segments] == stops[:-1]
            assert stops[-1] == document.stop
            counts = document.counts
            parts = counts["trained"] + counts["masked"] + counts["vision"] + counts["padding"]
            assert parts == document.stop - document.start
            total += parts
            real = ids[document.start : document.start + document.length].tolist()
            pieces = []
            for segment in document.segments:
                span = ids[segment.start : segment.stop].tolist()
                if segment.kind == "text":
                    assert segment.text == tokenizer.decode(span)
                    assert len(set(labels[segment.start : segment.stop] == IGNORE_INDEX)) == 1
                    pieces.append(segment.text)
                    seen["trained"] += not segment.masked
                    seen["special"] += any(special for _, special in segment.pieces)
                else:
                    assert segment.supervised == 0
                    seen[segment.kind] += 1
                    if segment.kind != "padding":
                        pieces.append(tokenizer.decode(span))
                        media.append(segment)
                shown_masked[segment.start : segment.stop] = segment.masked
            assert "".join(pieces) == tokenizer.decode(real)  # the round trip
            orders = [item["kind"] for item in sample["media_order"]]
            assert [s.kind for s in document.segments if s.kind in ("image", "video")] == orders
        assert total == view.seq_len
        assert (shown_masked == (labels == IGNORE_INDEX)).all()
        # one marker per media item, over exactly its tiles' placeholders
        assert [t for s in media for t in s.tiles] == list(range(len(pack.tile_sources)))
        for segment in media:
            block = pack.placeholders[list(segment.tiles)]
            assert block.min() == segment.start + 1 and block.max() == segment.stop - 2
            context = np.isin(ids[segment.start : segment.stop], loader.vision_ids).sum()
            assert context == 256 * len(segment.tiles)
            if segment.kind == "image" and len(segment.tiles) > 1:
                rows = segment.grid[1]
                assert segment.num_tokens == 258 + rows + 258 * (len(segment.tiles) - 1)
            assert f"{segment.num_tokens:,} tokens" in segment.label
    assert all(seen.values()), seen  # not vacuous: every kind of segment occurred


def test_pack_and_key_select_the_same_pack(build):
    loader = ShardLoader(build, shuffle=False, decode_pixels=False)
    assert loader.num_packs > 5 and len(loader.shard_names) > 1
    last = loader.num_packs - 1
    for index in (0, 6, last):
        by_pack = show_pack(build, pack=index).view
        assert by_pack.key == loader.read_raw(index)[0]
        assert show_pack(build, key=by_pack.key).view == by_pack
    assert show_pack(build).view == show_pack(build, pack=0).view

    class OtherKeys(ShardLoader):  # keys that are not the pack numbers: found by a scan
        def read_raw(self, index):
            key, members = super().read_raw(index)
            return "other" + key, members

    other = OtherKeys(build, shuffle=False, decode_pixels=False)
    assert find_pack(other, key=loader.read_raw(last)[0]) == last
    with pytest.raises(ShowError, match="no pack has key"):
        find_pack(other, key="other000000001")
    key = show_pack(build, pack=6).view.key
    runs = [
        subprocess.run([*LVITA, "show", str(build), *flag], capture_output=True, text=True)
        for flag in (["--pack", "6"], ["--key", key])
    ]
    assert [r.returncode for r in runs] == [0, 0]
    assert runs[0].stdout == runs[1].stdout and f"key {key}" in runs[0].stdout


def test_bad_pack_key_or_build_is_one_line_and_its_exit_code(build, tmp_path):
    assert EXIT_CODES[ShowError] == 2
    count = ShardLoader(build, shuffle=False).num_packs
    cases = [
        (["--pack", str(count)], 2, f"lvita show: pack {count} is outside 0..{count - 1}"),
        (["--pack", "-1"], 2, "lvita show: pack -1 is outside"),
        (["--key", "999999999"], 2, "lvita show: no pack has key '999999999'"),
        (["--key", "<nope>"], 2, "lvita show: no pack has key '<nope>'"),
    ]
    for flags, code, message in cases:
        result = subprocess.run(
            [*LVITA, "show", str(build), *flags], capture_output=True, text=True
        )
        assert result.returncode == code, result.stderr
        assert result.stderr.startswith(message) and result.stderr.count("\n") == 1
        assert result.stdout == ""
    result = subprocess.run([*LVITA, "show", str(tmp_path)], capture_output=True, text=True)
    assert result.returncode == 3 and result.stderr.startswith("lvita show: ")
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr


def test_terminal_text_fits_120_columns_and_shows_the_parts(build):
    (index,) = _packs_with(build, lambda meta: {"image", "video"} <= _kinds(meta))[:1]
    view = show_pack(build, pack=index).view
    plain = subprocess.run(
        [*LVITA, "show", str(build), "--pack", str(index)], capture_output=True, text=True
    ).stdout
    assert "\x1b" not in plain  # stdout is a pipe: no colours
    assert plain.rstrip("\n") == format_pack(view)
    assert max(map(len, plain.splitlines())) <= 120
    header = plain.splitlines()[:2]
    assert f"shard {view.shard}" in header[0] and f"key {view.key}" in header[0]
    assert f"pack {index}" in header[0] and f"T {view.seq_len:,} tokens" in header[1]
    assert f"{view.real_tokens:,} real" in header[1] and f"{view.padding:,} padding" in header[1]
    for document in view.documents:
        assert document.dataset in plain and f"record {document.record}" in plain
        for segment in document.segments:
            if segment.kind != "text":
                assert f"[{segment.label}]" in plain
    assert re.search(r"^ trained │ ", plain, re.M) and re.search(r"^  masked │ ", plain, re.M)
    marker = r"\[image 1: (1 tile|\dx\d grid \+ thumbnail, \d+ tiles), [\d,]+ tokens]"
    assert re.search(marker, plain)
    coloured = subprocess.run(
        [*LVITA, "show", str(build), "--pack", str(index), "--color", "always"],
        capture_output=True,
        text=True,
    ).stdout
    assert "\x1b[32m" in coloured and re.sub(r"\x1b\[[0-9;]*m", "", coloured) == plain


def test_untrusted_text_is_escaped_in_the_terminal_and_the_html(build, tmp_path):
    (index,) = _packs_with(build, lambda m: any(s["dataset"] == "hostile" for s in m["samples"]))
    shown = show_pack(build, pack=index, with_tiles=True)
    text = format_pack(shown.view, color=True)
    assert "\x1b[31m" not in text and "\\x1b[31m" in text  # the data's ESC cannot colour
    assert "\u202e" not in text and "\\u202e" in text
    assert "日本語のテキスト 🙂 é" in text
    html = render_html(shown.view, shown.tiles)
    assert "<script" not in html and "<img src=x" not in html and "<b>" not in html
    assert "&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt;" in html
    assert "&lt;img src=x onerror=alert(1)&gt;" in html and "\u202e" not in html
    assert "hostile&lt;i&gt;.jsonl" in html and "<i>" not in html
    assert visible("a\x1b\u202eb\n\t") == "a\\x1b\\u202eb\n\\x09"


def test_html_inlines_every_tile_at_its_placeholders(build, tmp_path):
    (index, *_) = _packs_with(build, lambda meta: {"image", "video"} <= _kinds(meta))
    path = tmp_path / "deep" / "pack.html"
    result = subprocess.run(
        [*LVITA, "show", str(build), "--pack", str(index), "--html", str(path)],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0 and result.stdout == f"wrote {path}\n"
    html = path.read_text(encoding="utf-8")
    shown = show_pack(build, pack=index, with_tiles=True)
    assert html == render_html(shown.view, shown.tiles)  # deterministic
    assert "http://" not in html and "https://" not in html and "<script" not in html
    uris = re.findall(r'src="data:image/png;base64,([^"]+)"', html)
    assert len(uris) == shown.view.num_tiles == len(shown.tiles) > 3
    for uri, tile in zip(uris, shown.tiles, strict=True):
        assert base64.b64decode(uri) == tile_png(tile)
    drawn = np.asarray(Image.open(io.BytesIO(base64.b64decode(uris[0]))).convert("RGB"))
    assert drawn.shape == (TILE_PX, TILE_PX, 3)
    expected = shown.tiles[0].reshape(TILE_PX, 2, TILE_PX, 2, 3).mean(axis=(1, 3))
    assert np.abs(drawn - expected).max() <= 1  # the loader's pixels, halved
    # each block's tiles are drawn between the text before and after its placeholders
    blocks = 0
    for document in shown.view.documents:
        segments = document.segments
        for before, media, after in zip(segments, segments[1:], segments[2:], strict=False):
            if media.kind in ("image", "video"):
                marks = [
                    f'title="tokens [{before.start}, {before.stop})"',
                    f'alt="tile {media.tiles[0]} of the pack"',
                    f'alt="tile {media.tiles[-1]} of the pack"',
                    f'title="tokens [{after.start}, {after.stop})"',
                ]
                positions = [html.index(mark) for mark in marks]
                assert positions == sorted(positions)
                blocks += 1
    assert blocks >= 2


@pytest.mark.skipif(
    CHROMIUM is None,
    reason="needs Debian's chromium for the headless render (apt-get install -y chromium)",
)
def test_html_renders_in_headless_chromium(build, tmp_path):
    (index, *_) = _packs_with(build, lambda meta: {"image", "video"} <= _kinds(meta))
    html = tmp_path / "pack.html"
    result = subprocess.run(
        [*LVITA, "show", str(build), "--pack", str(index), "--html", str(html)],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr
    image = screenshot(html, tmp_path)
    assert image.shape[:2] == (2000, 1200)
    assert image.std() > 20
    assert len(np.unique(image.reshape(-1, 3), axis=0)) > 200  # tiles were decoded and drawn
    for colour, area in (("#d7f5dd", 2000), ("#1f6fb4", 500)):  # trained text, media frames
        target = np.array([int(colour[i : i + 2], 16) for i in (1, 3, 5)])
        covered = (np.abs(image - target).max(axis=2) <= 6).sum()
        assert covered > area, f"only {covered} pixels of {colour}"


def test_describe_pack_on_a_hand_made_pack_and_a_meta_that_does_not_fit():
    tokenizer = load_tokenizer("qwen2.5")
    special = tokenizer.special_ids
    answer = [*tokenizer.encode("hi"), special.im_end]
    real = [
        special.im_start,
        *tokenizer.encode("user\n"),
        special.img_start,
        *[special.img_context] * 256,
        special.img_end,
        *answer,
    ]
    ids = np.array(real + [special.pad] * 3, dtype=np.int32)
    labels = np.full(len(ids), IGNORE_INDEX, dtype=np.int32)
    labels[len(real) - len(answer) : len(real)] = answer
    placeholders = np.flatnonzero(ids == special.img_context).reshape(1, 256)
    image = {"grid": [1, 1], "tiles": 1}
    sample = {"dataset": "d", "file": "f", "record": "7", "length": len(real)}
    sample.update(media_order=[["image", 0]], images=[image], videos=[])

    def describe(meta):
        cu = np.array([0, len(ids)], dtype=np.int32)
        return describe_pack(
            ids, labels, cu, meta, placeholders, decode=tokenizer.decode, ids=vision_ids(tokenizer)
        )

    (document,) = describe({"samples": [sample]})
    masked = 1 + len(tokenizer.encode("user\n"))
    assert [(s.kind, s.masked, s.num_tokens) for s in document.segments] == [
        ("text", True, masked),
        ("image", True, 258),
        ("text", False, len(answer)),
        ("padding", True, 3),
    ]
    assert document.segments[1].label == "image 1: 1 tile, 258 tokens"
    assert document.segments[2].pieces == (("hi", False), ("<|im_end|>", True))
    assert document.counts == dict(
        trained=len(answer), masked=masked, vision=258, padding=3, tiles=1
    )
    bad = [
        {**image, "grid": ['1" onload="x', 1]},  # untrusted meta: never reaches the page
        {**image, "grid": [2, 2]},  # 5 tiles, the meta says 1
        {**image, "tiles": 2},
    ]
    for wrong in bad:
        with pytest.raises(ValueError):
            describe({"samples": [{**sample, "images": [wrong]}]})
    with pytest.raises(ValueError, match="media_order"):
        describe({"samples": [{**sample, "media_order": [["audio", 0]]}]})
    with pytest.raises(ValueError, match="tiles"):
        describe({"samples": [{**sample, "media_order": []}]})  # a tile left over
