"""The parquet files: ``cauldron/`` (the_cauldron schema) and ``onevision/`` (LLaVA-OneVision).

Images are embedded as PNG or JPEG bytes; row groups of 8. Charts, pages and text come from each
file's own generator, so both files are deterministic for the same pyarrow version.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa

from lvita_data.demo.builder import Builder, conv, write_parquet
from lvita_data.demo.pictures import draw_chart, draw_document, image_bytes
from lvita_data.demo.prose import Prose

_IMAGE_STRUCT = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
_CHART_SIZES = [(640, 480), (600, 400), (448, 448), (800, 400), (512, 512), (400, 600)]
_PAGE_SIZES = [(448, 448), (800, 300), (600, 800), (1024, 512), (320, 240), (700, 700)]


def _chartqa_texts(rng: np.random.Generator, k: int, data: dict) -> list[dict[str, str]]:
    """The tallest-bar question, then ``k % 3`` value questions."""
    labels, values = data["labels"], data["values"]
    best = labels[int(np.argmax(values))]
    texts = [
        {
            "user": "Which bar is the tallest?",
            "assistant": f"Bar {best} is the tallest.",
            "source": "chartqa",
        }
    ]
    for _ in range(k % 3):
        i = int(rng.integers(len(labels)))
        texts.append(
            {
                "user": f"What is the value of bar {labels[i]}?",
                "assistant": str(values[i]),
                "source": "chartqa",
            }
        )
    return texts


def _chartqa_row(rng: np.random.Generator, k: int) -> tuple[list[dict[str, Any]], list[dict]]:
    """(images, texts) of row `k`: one chart, or two small ones (1x1 grids) when k % 8 == 5."""
    count = 2 if k % 8 == 5 else 1
    charts = []
    for j in range(count):
        width, height = _CHART_SIZES[k % len(_CHART_SIZES)] if count == 1 else (448 + 64 * j, 448)
        charts.append(draw_chart(rng, width, height))
    images = [{"bytes": image_bytes(img, "PNG"), "path": None} for img, _ in charts]
    texts = _chartqa_texts(rng, k, charts[0][1])
    if count == 2:
        texts[0]["user"] = "Which of the two charts has more bars?"
        first, second = charts[0][1]["labels"], charts[1][1]["labels"]
        texts[0]["assistant"] = f"The {'first' if len(first) >= len(second) else 'second'} chart."
    return images, texts


def write_cauldron(builder: Builder) -> int:
    """24 chart QA rows; row 17's image list holds a null."""
    rel = "cauldron/chartqa-00000-of-00001.parquet"
    rng = builder.rng(rel)
    images_col, texts_col = [], []
    for k in range(24):
        images, texts = _chartqa_row(rng, k)
        images_col.append(images)
        texts_col.append(texts)
    images_col[17] = [images_col[17][0], None]  # a null image in the list
    builder.mark_bad(rel, 17, "null_image", "bad_field_type")
    text_struct = pa.struct(
        [("user", pa.string()), ("assistant", pa.string()), ("source", pa.string())]
    )
    table = pa.table(
        {
            "images": pa.array(images_col, type=pa.list_(_IMAGE_STRUCT)),
            "texts": pa.array(texts_col, type=pa.list_(text_struct)),
        }
    )
    write_parquet(builder.root / rel, table)
    return table.num_rows


def _onevision_row(rng: np.random.Generator, prose: Prose, k: int) -> tuple[Any, list, str]:
    """(image, conversations, data_source): a text page to read, or text only when k % 8 == 3."""
    if k % 8 == 3:
        question = prose.question()
        return None, [conv("human", question), conv("gpt", prose.paragraph(3))], "magpie_demo"
    width, height = _PAGE_SIZES[k % len(_PAGE_SIZES)]
    image, text = draw_document(rng, prose, width, height)
    image_cell = {"bytes": image_bytes(image, "JPEG"), "path": f"ov_{k:05d}.jpg"}
    tag = "" if k % 8 == 6 else "<image>\n"  # no tag: inserted on read
    conversations = [conv("human", f"{tag}What text is written in the image?"), conv("gpt", text)]
    return image_cell, conversations, "synthdog_demo"


def write_onevision(builder: Builder) -> int:
    """24 rows of text pages and text-only chat; row 20 has a null image but an ``<image>`` tag."""
    rel = "onevision/ov-00000-of-00001.parquet"
    rng = builder.rng(rel)
    prose = Prose(rng)
    rows = [_onevision_row(rng, prose, k) for k in range(24)]
    images = [image for image, _, _ in rows]
    images[20] = None
    builder.mark_bad(rel, 20, "null_image_with_tag", "tag_mismatch")
    conv_struct = pa.struct([("from", pa.string()), ("value", pa.string())])
    table = pa.table(
        {
            "id": pa.array([f"ov_demo_{k:05d}" for k in range(24)], type=pa.string()),
            "image": pa.array(images, type=_IMAGE_STRUCT),
            "conversations": pa.array([c for _, c, _ in rows], type=pa.list_(conv_struct)),
            "data_source": pa.array([s for _, _, s in rows], type=pa.string()),
        }
    )
    write_parquet(builder.root / rel, table)
    return table.num_rows
