"""The one tar reader on hand-crafted hostile headers: each is refused in bounded time, naming
the shard and the byte offset (strict), or reported as a problem (lenient); never a hang. The
same for a format-3 pack's `media.tar` (`read_media_tar`), hand-crafted and mutated.

Every case starts from a tar lvita's own writer makes (two members, PAX headers as lvita writes
them) and rewrites one field, fixing the header checksum so that only the field is wrong.
"""

from __future__ import annotations

import io
import tarfile
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lvita_data.errors import ShardFormatError
from lvita_data.shards.format import (
    MEDIA_NAME,
    load_npy,
    media_tar_bytes,
    npy_bytes,
    parse_json,
    read_media_tar,
)
from lvita_data.shards.tar import BLOCK, TarWriter, scan_tar, scan_tar_file

SECONDS = 2.0
"""A scan of these few-KiB tars takes microseconds; anything near this bound is a hang."""


def lvita_tar() -> bytearray:
    buffer = io.BytesIO()
    writer = TarWriter(buffer)
    writer.write_sample({"__key__": "000000000", "meta.json": b"{}", "x.npy": b"a" * 700})
    writer.close()
    return bytearray(buffer.getvalue())


def with_checksum(block: bytearray) -> bytearray:
    block[148:156] = b" " * 8
    block[148:156] = b"%06o\0 " % sum(block[:BLOCK])
    return block


def set_field(data: bytearray, block_offset: int, start: int, value: bytes, width: int):
    block = bytearray(data[block_offset : block_offset + BLOCK])
    block[start : start + width] = value[:width].ljust(width, b"\0")
    data[block_offset : block_offset + BLOCK] = with_checksum(block)
    return data


def set_pax(data: bytearray, records: bytes) -> bytearray:
    """The first member's PAX data replaced by `records` (its size field set to their length)."""
    set_field(data, 0, 124, b"%011o\0" % len(records), 12)
    data[BLOCK : 2 * BLOCK] = records.ljust(BLOCK, b"\0")
    return data


USTAR = 2 * BLOCK  # the first member's ustar header (after its PAX header and data)
HOSTILE = {
    "PAX size pointing backwards": lambda d: set_pax(d, b"13 size=-512\n"),
    "PAX size 10^18": lambda d: set_pax(d, b"28 size=1000000000000000000\n"),
    "PAX size not a number": lambda d: set_pax(d, b"11 size=zz\n"),
    "PAX size with a sign": lambda d: set_pax(d, b"11 size=+1\n"),
    "zero-length PAX record": lambda d: set_pax(d, b"0 size=1\n"),
    "PAX record length shorter than its key": lambda d: set_pax(d, b"5 size=10\n"),
    "PAX record length past its data": lambda d: set_pax(d, b"99999 size=1\n"),
    "negative PAX record length": lambda d: set_pax(d, b"-5 size=1\n"),
    "PAX record without key=value": lambda d: set_pax(d, b"6 abc\n"),
    "PAX path with a directory": lambda d: set_pax(d, b"23 path=../000000000.x\n"),
    "PAX path absolute": lambda d: set_pax(d, b"22 path=/etc/000000000\n"),
    "PAX header of 10^9 bytes": lambda d: set_field(d, 0, 124, b"%011o\0" % 10**9, 12),
    "ustar size 10^18 (base-256)": lambda d: set_field(
        d, USTAR, 124, b"\x80" + (10**18).to_bytes(11, "big"), 12
    ),
    "ustar size negative (base-256)": lambda d: set_field(
        d, USTAR, 124, b"\xff" + (5).to_bytes(11, "big"), 12
    ),
    "ustar size not octal": lambda d: set_field(d, USTAR, 124, b"0000000009\0", 12),
    "ustar size with a minus": lambda d: set_field(d, USTAR, 124, b"-000000001\0", 12),
    "ustar size past the file": lambda d: set_field(d, USTAR, 124, b"%011o\0" % 10**6, 12),
    "ustar name with a slash": lambda d: (
        set_field(d, 0, 124, b"%011o\0" % 0, 12)
        and set_field(d, USTAR, 0, b"a/000000000.meta.json", 100)
    ),
    "symlink": lambda d: set_field(d, USTAR, 156, b"2", 1),
    "hard link": lambda d: set_field(d, USTAR, 156, b"1", 1),
    "directory": lambda d: set_field(d, USTAR, 156, b"5", 1),
    "character device": lambda d: set_field(d, USTAR, 156, b"3", 1),
    "GNU long name of 10^9 bytes": lambda d: set_field(
        set_field(d, 0, 156, b"L", 1), 0, 124, b"%011o\0" % 10**9, 12
    ),
    "truncated in a member": lambda d: d[: 3 * BLOCK + 100],
    "truncated before the end marker": lambda d: d[: len(d) - 11 * BLOCK],
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_strict_reader_refuses_hostile_headers_naming_shard_and_offset(tmp_path, case):
    data = HOSTILE[case](lvita_tar())
    path = tmp_path / "hostile.tar"
    path.write_bytes(bytes(data))
    start = time.perf_counter()
    with pytest.raises(ShardFormatError, match=r"hostile\.tar: .*\(at byte \d+\)"):
        scan_tar_file(path)
    assert time.perf_counter() - start < SECONDS


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_lenient_reader_reports_hostile_headers(case):
    data = bytes(HOSTILE[case](lvita_tar()))
    start = time.perf_counter()
    scan = scan_tar(data)
    assert scan.problems, case
    assert time.perf_counter() - start < SECONDS


def test_an_intact_tar_passes_both_modes():
    data = bytes(lvita_tar())
    assert not scan_tar(data).problems
    assert [m.name for m in scan_tar(data, strict=True).members] == [
        "000000000.meta.json",
        "000000000.x.npy",
    ]


def test_a_scan_advances_at_least_one_block_per_step():
    """A tar of nothing but PAX headers, each pointing at the next: n / 512 steps at most."""
    records = b"16 mtime=0.0000\n"
    block = bytearray(BLOCK)
    block[0:10] = b"PaxHeader\0"
    block[124:136] = b"%011o\0" % len(records)
    block[156:157] = b"x"
    block[257:263] = b"ustar\0"
    header = bytes(with_checksum(block)) + records.ljust(BLOCK, b"\0")
    data = header * 2000  # 2 MB of headers with no member and no end marker
    start = time.perf_counter()
    with pytest.raises(ShardFormatError, match="truncated"):
        scan_tar(data, strict=True)
    assert time.perf_counter() - start < SECONDS


HOSTILE_NPY = {
    "object dtype": "{'descr': '|O', 'fortran_order': False, 'shape': (4,), }",
    "structured dtype": "{'descr': [('a', '<i4')], 'fortran_order': False, 'shape': (1,), }",
    "string dtype": "{'descr': '<U1', 'fortran_order': False, 'shape': (1,), }",
    "shape larger than the member": "{'descr': '<i4', 'fortran_order': False, 'shape': (9,), }",
    "shape of 10^12": "{'descr': '<i4', 'fortran_order': False, 'shape': (1000000000000,), }",
    "negative shape": "{'descr': '<i4', 'fortran_order': False, 'shape': (-1,), }",
    "code in the header": "__import__('os').system('true')",
    "unterminated header": "{",
    "missing key": "{'descr': '<i4', 'shape': (1,), }",
    "extra key": "{'descr': '<i4', 'fortran_order': False, 'shape': (1,), 'x': 1}",
}


@pytest.mark.parametrize("case", sorted(HOSTILE_NPY))
def test_npy_headers_are_validated_before_use(case):
    header = HOSTILE_NPY[case].encode()
    padded = header.ljust(64 - 10 - 1) + b"\n"
    data = b"\x93NUMPY\x01\x00" + len(padded).to_bytes(2, "little") + padded + bytes(4)
    with pytest.raises(ShardFormatError):
        load_npy(data)


def test_npy_with_a_huge_header_length_is_refused():
    data = b"\x93NUMPY\x02\x00" + (1 << 30).to_bytes(4, "little") + b"{"
    with pytest.raises(ShardFormatError, match="header of"):
        load_npy(data)


def test_npy_round_trip_and_deeply_nested_json():
    import numpy as np

    array = np.arange(7, dtype=np.int32)
    assert load_npy(npy_bytes(array)).tolist() == array.tolist()
    with pytest.raises(ShardFormatError, match="not JSON"):
        parse_json(b"[" * 100_000, "meta.json")


# ---------------------------------------------------------------------------------------------
# media.tar, the member of a format-3 pack that is itself a tar (`read_media_tar`)


def media_tar(members: dict[str, bytes], fmt: int = tarfile.USTAR_FORMAT, kind=tarfile.REGTYPE):
    """A tar of `members` written by `tarfile` (any name, any type), for hostile cases."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=fmt) as archive:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size, info.type = len(data), kind
            info.linkname = "tile000000.png" if kind in (tarfile.SYMTYPE, tarfile.LNKTYPE) else ""
            archive.addfile(info, io.BytesIO(data) if kind == tarfile.REGTYPE else None)
    return buffer.getvalue()


def pax_media() -> bytearray:
    """A media tar with PAX headers, as lvita's shard writer writes its members."""
    buffer = io.BytesIO()
    writer = TarWriter(buffer)
    writer.add("tile000000.png", b"\x89PNG" * 40)
    writer.close()
    return bytearray(buffer.getvalue())


LVITA_MEDIA = {"image000000.jpg": b"\xff\xd8" + bytes(700), "tile000000.png": b"\x89PNG" * 40}
HOSTILE_MEDIA = {
    "a path in a name": lambda: media_tar({"../tile000000.png": b"x"}),
    "a directory in a name": lambda: media_tar({"a/tile000000.png": b"x"}),
    "a name that is no media": lambda: media_tar({"meta.json": b"{}"}),
    "an uppercase extension": lambda: media_tar({"tile000000.PNG": b"x"}),
    "a member twice": lambda: (
        media_tar_bytes(LVITA_MEDIA)[: -2 * BLOCK] + media_tar_bytes(LVITA_MEDIA)
    ),
    "a symlink": lambda: media_tar({"tile000001.png": b""}, kind=tarfile.SYMTYPE),
    "a hard link": lambda: media_tar({"tile000001.png": b""}, kind=tarfile.LNKTYPE),
    "a directory": lambda: media_tar({"tile000001.png": b""}, kind=tarfile.DIRTYPE),
    "PAX size pointing backwards": lambda: bytes(set_pax(pax_media(), b"13 size=-512\n")),
    "truncated inside a member": lambda: media_tar_bytes(LVITA_MEDIA)[:900],
    "not a tar": lambda: b"PK\x03\x04" + bytes(2000),
}


@pytest.mark.parametrize("case", sorted(HOSTILE_MEDIA))
def test_media_tar_reader_refuses_hostile_members(case):
    data = HOSTILE_MEDIA[case]()
    start = time.perf_counter()
    with pytest.raises(ShardFormatError, match=r"^media\.tar: "):
        read_media_tar(data)
    assert time.perf_counter() - start < SECONDS


def test_media_tar_round_trip():
    data = media_tar_bytes(LVITA_MEDIA)
    assert len(data) == 3 * BLOCK + 2 * BLOCK + 2 * BLOCK  # headers, data, end of archive
    read = read_media_tar(data)
    assert {name: bytes(view) for name, view in read.items()} == LVITA_MEDIA
    with tarfile.open(fileobj=io.BytesIO(data)) as archive:  # what a user opens it with
        assert {m.name: archive.extractfile(m).read() for m in archive} == LVITA_MEDIA
    assert read_media_tar(media_tar_bytes({})) == {}
    tarfile_written = media_tar(LVITA_MEDIA, tarfile.PAX_FORMAT)  # any valid tar is read
    assert {n: bytes(v) for n, v in read_media_tar(tarfile_written).items()} == LVITA_MEDIA


@settings(max_examples=200, derandomize=True, deadline=None, database=None)
@given(
    edits=st.lists(
        st.tuples(st.integers(0, 5 * BLOCK), st.binary(min_size=1, max_size=16)), max_size=4
    ),
    cut=st.integers(0, 7 * BLOCK),
)
def test_media_tar_reader_on_mutated_media(edits, cut):
    """A real media.tar with bytes overwritten and cut: a dict of views inside the data, or
    `ShardFormatError`; bounded time, and memory that a view of the input bounds."""
    data = bytearray(media_tar_bytes(LVITA_MEDIA))
    for offset, value in edits:
        data[offset : offset + len(value)] = value
    data = bytes(data[:cut])
    start = time.perf_counter()
    try:
        media = read_media_tar(data)
    except ShardFormatError as error:
        assert str(error).startswith("media.tar: ")
    else:
        assert all(MEDIA_NAME.match(name) for name in media)
        assert sum(len(view) for view in media.values()) <= len(data)
        assert all(view.obj is not None for view in media.values())
    assert time.perf_counter() - start < SECONDS
