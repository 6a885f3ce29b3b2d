"""memescale.ingest.dumps: line outcomes, zstd framing and failures, start_line, chunks, path globs."""

from __future__ import annotations

import io
import json
import struct
from collections import Counter
from pathlib import Path

import pytest
import zstandard
from conftest import shared_path

from memescale.ingest import dumps as dumps
from memescale.ingest.dumps import (
    BadLine,
    DumpPathError,
    DumpReadError,
    DumpRecord,
    expand_dump_paths,
    iter_chunks,
    iter_records,
)


def rec(i: int, **extra) -> bytes:
    return json.dumps({"id": f"p{i}", "n": i, **extra}).encode()


# Every kind of bad line, between good ones; the expected outcome of each line.
MIXED_LINES = [
    (rec(0), "p0"),
    (b"", "empty"),
    (b"{not json", "invalid_json"),
    (rec(3), "p3"),
    (b'{"id": "p4", "t": "a\x00b"}', "nul_byte"),
    (b'{"id": "p5", "t": "\xff\xfe"}', "bad_utf8"),
    (b"[1, 2, 3]", "not_object"),
    (b'"just a string"', "not_object"),
    (b'{"title": "no id"}', "missing_id"),
    (b'{"id": 9}', "missing_id"),
    (b'{"id": ""}', "missing_id"),
    (b"[" * 200_000 + b"]" * 200_000, "invalid_json"),
    (b"   \r", "empty"),
    (rec(13) + b"\r", "p13"),
    (rec(14), "p14"),
]


def outcome_key(o) -> str:
    return o.record["id"] if isinstance(o, DumpRecord) else o.reason


def write_plain(path: Path, lines: list[bytes], final_newline: bool = True) -> Path:
    path.write_bytes(b"\n".join(lines) + (b"\n" if final_newline else b""))
    return path


def zst(data: bytes, checksum: bool = False) -> bytes:
    return zstandard.ZstdCompressor(level=3, write_checksum=checksum).compress(data)


def write_zst(path: Path, lines: list[bytes], lines_per_frame: int | None = None) -> Path:
    """Lines compressed as one frame, or as one frame per `lines_per_frame` lines."""
    step = lines_per_frame or max(len(lines), 1)
    frames = [b"".join(l + b"\n" for l in lines[i : i + step]) for i in range(0, len(lines), step)]
    path.write_bytes(b"".join(zst(f) for f in frames))
    return path


def keys(path: Path, **kw) -> list[str]:
    return [outcome_key(o) for o in iter_records(str(path), **kw)]


# --- line outcomes -------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["d.ndjson", "d.jsonl", "RS_2024-01.zst"])
def test_every_line_has_one_outcome(tmp_path, name):
    lines = [line for line, _ in MIXED_LINES]
    path = tmp_path / name
    (write_zst if name.endswith(".zst") else write_plain)(path, lines)
    outcomes = list(iter_records(str(path)))
    assert [o.line for o in outcomes] == list(range(len(MIXED_LINES)))
    assert [outcome_key(o) for o in outcomes] == [want for _, want in MIXED_LINES]
    assert all(isinstance(o, (DumpRecord, BadLine)) for o in outcomes)
    assert {o.reason for o in outcomes if isinstance(o, BadLine)} <= set(dumps.BAD_LINE_REASONS)


def test_last_line_without_newline_counts(tmp_path):
    path = write_plain(tmp_path / "d.ndjson", [rec(0), rec(1)], final_newline=False)
    assert keys(path) == ["p0", "p1"]


def test_empty_plain_file_has_no_lines(tmp_path):
    path = tmp_path / "d.ndjson"
    path.write_bytes(b"")
    assert list(iter_records(str(path))) == []
    assert list(iter_chunks(str(path), 10)) == []


def test_shared_sample_parses_cleanly_plain_and_zst(tmp_path):
    sample = shared_path("reddit", "submissions_sample.ndjson")
    plain = list(iter_records(str(sample)))
    assert len(plain) == 31 and all(isinstance(o, DumpRecord) for o in plain)
    packed = tmp_path / "RS_sample.zst"
    packed.write_bytes(zst(sample.read_bytes(), checksum=True))
    assert [(o.line, o.record) for o in iter_records(str(packed))] == [(o.line, o.record) for o in plain]


# --- long lines ------------------------------------------------------------------------------


def test_very_long_line_is_parsed_across_many_reads(tmp_path):
    long_title = "x" * 5_000_000  # spans hundreds of zstd output blocks
    path = write_zst(tmp_path / "d.zst", [rec(0), rec(1, title=long_title), rec(2)])
    outcomes = list(iter_records(str(path)))
    assert [outcome_key(o) for o in outcomes] == ["p0", "p1", "p2"]
    assert outcomes[1].record["title"] == long_title


@pytest.mark.parametrize("name", ["d.zst", "d.ndjson"])
def test_line_over_limit_is_dropped_and_counted(tmp_path, name, monkeypatch):
    monkeypatch.setattr(dumps, "PLAIN_READ_SIZE", 1000)  # the long line spans many reads
    lines = [rec(0), rec(1, title="y" * 50_000), rec(2), rec(3, title="z" * 20_000)]
    path = tmp_path / name
    if name.endswith(".zst"):
        write_zst(path, lines)
    else:
        write_plain(path, lines, final_newline=False)
    assert keys(path, max_line_bytes=10_000) == ["p0", "too_long", "p2", "too_long"]
    assert keys(path, max_line_bytes=100_000) == ["p0", "p1", "p2", "p3"]


# --- zstd framing, truncation, corruption ---------------------------------------------------


def test_multiple_frames_and_skippable_frames(tmp_path):
    skippable = struct.pack("<II", 0x184D2A50, 3) + b"abc"
    path = tmp_path / "d.zst"
    path.write_bytes(zst(rec(0) + b"\n" + rec(1)) + skippable + zst(b"\n" + rec(2) + b"\n"))
    assert keys(path) == ["p0", "p1", "p2"]


def test_window_larger_than_zstd_default_is_accepted(tmp_path):
    params = zstandard.ZstdCompressionParameters.from_level(3, window_log=28)
    buf = io.BytesIO()
    with zstandard.ZstdCompressor(compression_params=params).stream_writer(buf, closefd=False) as w:
        w.write(b"".join(rec(i) + b"\n" for i in range(3)))
    path = tmp_path / "d.zst"
    path.write_bytes(buf.getvalue())
    assert keys(path) == ["p0", "p1", "p2"]


def test_truncated_zst_ends_with_counted_error(tmp_path):
    lines = [rec(i, pad="q" * 200) for i in range(40)]
    whole = write_zst(tmp_path / "whole.zst", lines, lines_per_frame=10).read_bytes()
    assert keys(tmp_path / "whole.zst") == [f"p{i}" for i in range(40)]
    for cut in (len(whole) - 1, len(whole) // 2, 30, 3):
        path = tmp_path / "RS_cut.zst"
        path.write_bytes(whole[:cut])
        outcomes = list(iter_records(str(path)))
        *good, last = outcomes
        assert isinstance(last, DumpReadError), cut
        assert last.dump == "RS_cut.zst" and "truncated" in last.detail
        assert last.line == len(good) and len(good) % 10 == 0  # whole frames only
        assert [outcome_key(o) for o in good] == [f"p{i}" for i in range(len(good))]
        assert "RS_cut.zst" in str(last) and f"after {last.line} lines" in str(last)


def test_truncated_zst_mid_line_drops_the_partial_line(tmp_path):
    # Line 0 spans two 128 KiB blocks; the cut loses the second, so only part of it decodes.
    data = rec(0, pad="a" * 200_000) + b"\n" + rec(1) + b"\n"
    path = tmp_path / "d.zst"
    path.write_bytes(zst(data)[:-5])
    outcomes = list(iter_records(str(path)))
    assert len(outcomes) == 1 and isinstance(outcomes[0], DumpReadError)
    assert outcomes[0].line == 0 and "truncated" in outcomes[0].detail


@pytest.mark.parametrize(
    "blob, words",
    [
        (b"", "empty"),
        (b"this is not zstd at all\n" * 10, "corrupt"),
        (b"\x28\xb5\x2f\xfd" + bytes(range(256)) * 4, "corrupt"),
    ],
)
def test_unreadable_zst_is_an_error_at_line_zero(tmp_path, blob, words):
    path = tmp_path / "bad.zst"
    path.write_bytes(blob)
    outcomes = list(iter_records(str(path)))
    assert len(outcomes) == 1 and isinstance(outcomes[0], DumpReadError)
    assert outcomes[0].line == 0 and words in outcomes[0].detail


def test_corrupt_zst_bytes_end_the_file_with_an_error(tmp_path):
    data = b"".join(rec(i, pad="c" * 300) + b"\n" for i in range(2000))
    blob = bytearray(zst(data, checksum=True))
    blob[len(blob) // 2 : len(blob) // 2 + 64] = bytes(64)
    path = tmp_path / "d.zst"
    path.write_bytes(bytes(blob))
    outcomes = list(iter_records(str(path)))
    assert isinstance(outcomes[-1], DumpReadError) and "corrupt" in outcomes[-1].detail
    assert outcomes[-1].line == len(outcomes) - 1


def test_unsupported_suffix_raises(tmp_path):
    path = tmp_path / "d.gz"
    path.write_bytes(b"x")
    with pytest.raises(DumpPathError):
        list(iter_records(str(path)))


# --- start_line ------------------------------------------------------------------------------


def counting_parse(monkeypatch) -> list[bytes]:
    calls: list[bytes] = []
    real = dumps.parse_line

    def parse(raw):
        calls.append(raw)
        return real(raw)

    monkeypatch.setattr(dumps, "parse_line", parse)
    return calls


@pytest.mark.parametrize("start", [0, 1, 7, 14, 15, 100])
def test_start_line_skips_without_parsing(tmp_path, monkeypatch, start):
    path = write_zst(tmp_path / "d.zst", [line for line, _ in MIXED_LINES])
    calls = counting_parse(monkeypatch)
    outcomes = list(iter_records(str(path), start_line=start))
    assert [o.line for o in outcomes] == list(range(start, len(MIXED_LINES)))
    assert [outcome_key(o) for o in outcomes] == [want for _, want in MIXED_LINES[start:]]
    assert len(calls) == max(len(MIXED_LINES) - start, 0)


def test_start_line_past_truncation_still_reports_it(tmp_path):
    whole = write_zst(tmp_path / "w.zst", [rec(i) for i in range(20)], lines_per_frame=10).read_bytes()
    path = tmp_path / "d.zst"
    path.write_bytes(whole[:-4])
    outcomes = list(iter_records(str(path), start_line=15))
    assert len(outcomes) == 1 and isinstance(outcomes[0], DumpReadError) and outcomes[0].line == 10


# --- chunks ----------------------------------------------------------------------------------


def test_chunks_cover_every_line_once(tmp_path):
    lines = [line for line, _ in MIXED_LINES] * 3 + [rec(99)]  # 46 lines
    path = write_zst(tmp_path / "RS_x.zst", lines)
    chunks = list(iter_chunks(str(path), 10))
    assert [(c.index, c.first_line, c.n_lines) for c in chunks] == [
        (0, 0, 10), (1, 10, 10), (2, 20, 10), (3, 30, 10), (4, 40, 6)
    ]
    assert all(c.dump == "RS_x.zst" and c.error is None and not c.skipped for c in chunks)
    outcomes = list(iter_records(str(path)))
    assert [r for c in chunks for r in c.records] == [o.record for o in outcomes if isinstance(o, DumpRecord)]
    for c in chunks:
        assert len(c.records) + c.bad_lines == c.n_lines
        assert sum(c.bad_reasons.values()) == c.bad_lines
    total_reasons = sum((c.bad_reasons for c in chunks), start=Counter())
    assert total_reasons["empty"] == 6 and total_reasons["missing_id"] == 9


def test_chunks_exact_multiple_has_no_empty_tail(tmp_path):
    path = write_plain(tmp_path / "d.ndjson", [rec(i) for i in range(20)])
    assert [(c.index, c.n_lines) for c in iter_chunks(str(path), 5)] == [(0, 5), (1, 5), (2, 5), (3, 5)]
    assert [(c.index, c.n_lines) for c in iter_chunks(str(path), 1000)] == [(0, 20)]
    assert len(list(iter_chunks(str(path), 1))) == 20


def test_skipped_chunks_are_neither_parsed_nor_yielded(tmp_path, monkeypatch):
    path = write_zst(tmp_path / "d.zst", [rec(i) for i in range(23)])
    calls = counting_parse(monkeypatch)
    chunks = list(iter_chunks(str(path), 5, skip={1, 3, 4}))
    assert [(c.index, c.first_line, c.n_lines) for c in chunks] == [(0, 0, 5), (2, 10, 5)]
    assert [r["id"] for r in chunks[1].records] == [f"p{i}" for i in range(10, 15)]
    assert len(calls) == 10


def test_truncated_dump_sets_error_on_final_chunk(tmp_path):
    whole = write_zst(tmp_path / "w.zst", [rec(i) for i in range(30)], lines_per_frame=7).read_bytes()
    path = tmp_path / "RS_t.zst"
    path.write_bytes(whole[:-3])  # the last frame (lines 28, 29) is cut off
    chunks = list(iter_chunks(str(path), 10))
    assert [(c.index, c.n_lines, c.error is None) for c in chunks] == [(0, 10, True), (1, 10, True), (2, 8, False)]
    assert "RS_t.zst" in chunks[-1].error and "truncated" in chunks[-1].error
    assert [r["id"] for r in chunks[-1].records] == [f"p{i}" for i in range(20, 28)]


def test_truncation_at_chunk_boundary_yields_empty_error_chunk(tmp_path):
    whole = write_zst(tmp_path / "w.zst", [rec(i) for i in range(30)], lines_per_frame=10).read_bytes()
    path = tmp_path / "d.zst"
    path.write_bytes(whole[:-3])
    chunks = list(iter_chunks(str(path), 10))
    assert [(c.index, c.first_line, c.n_lines, c.error is None) for c in chunks] == [
        (0, 0, 10, True), (1, 10, 10, True), (2, 20, 0, False)
    ]


def test_truncation_inside_a_skipped_chunk_is_still_reported(tmp_path, monkeypatch):
    whole = write_zst(tmp_path / "w.zst", [rec(i) for i in range(30)], lines_per_frame=7).read_bytes()
    path = tmp_path / "d.zst"
    path.write_bytes(whole[:-3])
    calls = counting_parse(monkeypatch)
    chunks = list(iter_chunks(str(path), 10, skip={0, 1, 2}))
    assert len(chunks) == 1 and calls == []
    last = chunks[0]
    assert (last.index, last.n_lines, last.skipped, last.records) == (2, 8, True, [])
    assert "truncated" in last.error


def test_chunk_lines_must_be_positive(tmp_path):
    path = write_plain(tmp_path / "d.ndjson", [rec(0)])
    with pytest.raises(ValueError):
        list(iter_chunks(str(path), 0))


# --- paths -----------------------------------------------------------------------------------


def test_expand_dump_paths_sorted_deduplicated(tmp_path):
    for name in ["RS_2006-02.zst", "RS_2005-12.zst", "RS_2006-01.zst", "extra.ndjson"]:
        (tmp_path / name).write_bytes(b"")
    (tmp_path / "RS_dir.zst").mkdir()
    got = expand_dump_paths([str(tmp_path / p) for p in ["RS_*.zst", "RS_2006-01.zst", "*.ndjson"]])
    want = ["RS_2005-12.zst", "RS_2006-01.zst", "RS_2006-02.zst", "extra.ndjson"]
    assert got == [str(tmp_path / n) for n in want]


def test_expand_dump_paths_rejects_no_match_and_bad_suffix(tmp_path):
    (tmp_path / "RS_2006-01.zst").write_bytes(b"")
    (tmp_path / "notes.txt").write_bytes(b"")
    with pytest.raises(DumpPathError, match="RS_2099"):
        expand_dump_paths([str(tmp_path / "RS_*.zst"), str(tmp_path / "RS_2099-*.zst")])
    with pytest.raises(DumpPathError, match="notes.txt"):
        expand_dump_paths([str(tmp_path / "*")])


@pytest.mark.parametrize("read_size", [1, 2, 3, 7, 64, 4096])
def test_line_splitting_is_independent_of_read_boundaries(tmp_path, monkeypatch, read_size):
    monkeypatch.setattr(dumps, "PLAIN_READ_SIZE", read_size)
    lines = [rec(i, pad="w" * (i * 37 % 300)) for i in range(60)]
    lines[5] = lines[17] = b""
    lines[40] = rec(40, pad="v" * 3000)
    path = write_plain(tmp_path / "d.ndjson", lines, final_newline=False)
    want = ["empty" if not l else ("too_long" if len(l) > 2000 else f"p{i}") for i, l in enumerate(lines)]
    assert keys(path, max_line_bytes=2000) == want
