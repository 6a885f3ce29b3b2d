"""Stream Reddit submission dumps (Pushshift / Arctic Shift): `.zst` or plain NDJSON, line by line.

A dump is a sequence of lines; line numbers are 0-based and count every line, good or bad, so
a (dump file name, line number) pair names one input position across restarts. Every line
has exactly one outcome:

* `DumpRecord(line, record)`: the line is a JSON object with a non-empty string ``id``;
* `BadLine(line, reason)`: anything else, counted and skipped (reasons in `BAD_LINE_REASONS`);

and a stream that cannot be read to its end (truncated or corrupt zstd, an I/O error) ends
with one `DumpReadError` naming the file and the number of lines read before it stopped.
Nothing in a dump's contents raises; nothing can hang (every loop consumes input).

Memory is O(decoded block + min(longest line, max_line_bytes)): zstd input is fed in
`ZSTD_READ_SIZE` pieces, lines are assembled from pieces without quadratic copying, and a
line longer than ``max_line_bytes`` is dropped while it streams (reason ``too_long``).
Lines before a resume point are split but not parsed, which costs far less than parsing.

Truncation: python-zstandard's ``stream_reader`` reports end-of-file when its input ends in
the middle of a frame, indistinguishable from a complete stream. Frames are therefore
decoded with ``decompressobj`` one frame at a time (its ``eof`` flag marks the end of a
frame), so input that stops inside a frame is reported, not silently accepted. The output of
one input piece is bounded by the piece size times the zstd expansion limit (at most
32768x, for RLE blocks on hostile input).
"""

from __future__ import annotations

import glob
import json
import os
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

import zstandard

ZSTD_MAX_WINDOW = 2**31  # Pushshift / Arctic Shift dumps are compressed with --long=31
ZSTD_READ_SIZE = 1 << 14  # compressed bytes fed to the decoder per step
PLAIN_READ_SIZE = 1 << 20
MAX_LINE_BYTES = 32 << 20  # real submissions are at most a few hundred KB

ZSTD_SUFFIXES = (".zst", ".zstd")
PLAIN_SUFFIXES = (".ndjson", ".jsonl", ".json")

BAD_LINE_REASONS = (
    "empty",  # blank line
    "nul_byte",  # contains a NUL byte
    "bad_utf8",  # not UTF-8
    "invalid_json",  # not JSON (including nesting too deep to parse)
    "not_object",  # JSON, but not an object
    "missing_id",  # no non-empty string "id"
    "too_long",  # longer than max_line_bytes
)


class DumpPathError(ValueError):
    """A dump path pattern matches no file, or names a file of an unsupported kind."""


class _StreamError(Exception):
    """Internal: the byte stream stopped before its end (truncated, corrupt or unreadable)."""


@dataclass(frozen=True, slots=True)
class DumpRecord:
    """Line `line` parsed into `record` (a dict with a non-empty string ``id``)."""

    line: int
    record: dict


@dataclass(frozen=True, slots=True)
class BadLine:
    """Line `line` was skipped; `reason` is one of `BAD_LINE_REASONS`."""

    line: int
    reason: str


@dataclass(frozen=True, slots=True)
class DumpReadError:
    """The dump `dump` (file name) could not be read past line `line` (lines read before it)."""

    dump: str
    line: int
    detail: str

    def __str__(self) -> str:
        return f"{self.dump}: {self.detail} (stopped after {self.line} lines)"


DumpOutcome = DumpRecord | BadLine | DumpReadError


@dataclass(slots=True)
class Chunk:
    """Lines [first_line, first_line + n_lines) of one dump: the unit of resume.

    `index` is ``first_line // chunk_lines``; (`dump`, `index`) names the chunk across runs.
    `records` holds the parsed records in line order; `bad_lines` counts the rest, by reason
    in `bad_reasons`. `error` is set only on the last chunk of a dump that could not be read
    to its end (the chunk then holds the lines read before the failure). `skipped` is true
    only for such a final error chunk whose index was in `skip`: its lines were not parsed,
    so its records are empty and earlier output for it must be kept.
    """

    dump: str
    index: int
    first_line: int
    n_lines: int = 0
    records: list[dict] = field(default_factory=list)
    bad_lines: int = 0
    bad_reasons: Counter = field(default_factory=Counter)
    error: str | None = None
    skipped: bool = False


def dump_format(path: str) -> str:
    """``"zstd"`` or ``"plain"`` from the file name's suffix; DumpPathError for anything else."""
    name = path.lower()
    if name.endswith(ZSTD_SUFFIXES):
        return "zstd"
    if name.endswith(PLAIN_SUFFIXES):
        return "plain"
    raise DumpPathError(
        f"{path}: unsupported dump file (expected {', '.join(ZSTD_SUFFIXES + PLAIN_SUFFIXES)})"
    )


def expand_dump_paths(patterns: list[str]) -> list[str]:
    """Expand glob patterns (``**`` recursive) into the sorted, de-duplicated list of files.

    Raises DumpPathError when a pattern matches no regular file, or a match has an unsupported
    suffix (see `dump_format`): a typo must not silently ingest nothing.
    """
    found: set[str] = set()
    for pattern in patterns:
        matches = glob.glob(os.path.expanduser(pattern), recursive=True)
        matches = [p for p in matches if os.path.isfile(p)]
        if not matches:
            raise DumpPathError(f"dump pattern {pattern!r} matches no file")
        found.update(matches)
    paths = sorted(found)
    for p in paths:
        dump_format(p)
    return paths


def parse_line(raw: bytes) -> dict | str:
    """The record on one line (without its newline), or the reason it is bad. O(len(raw))."""
    if b"\x00" in raw:
        return "nul_byte"
    if not raw.strip():
        return "empty"
    try:
        obj = json.loads(raw)
    except UnicodeDecodeError:
        return "bad_utf8"
    except (ValueError, RecursionError):
        return "invalid_json"
    if not isinstance(obj, dict):
        return "not_object"
    post_id = obj.get("id")
    if not isinstance(post_id, str) or not post_id:
        return "missing_id"
    return obj


def iter_records(
    path: str, start_line: int = 0, max_line_bytes: int = MAX_LINE_BYTES
) -> Iterator[DumpOutcome]:
    """One `DumpRecord` or `BadLine` per line from `start_line` on, then a `DumpReadError` if
    the dump could not be read to its end.

    Lines before `start_line` are still read (and decompressed) but not parsed or yielded.
    Raises (on first iteration) DumpPathError for an unsupported suffix and OSError if the
    file cannot be opened; everything that goes wrong after that is an outcome.
    Time O(file), memory as in the module docstring.
    """
    line = 0
    try:
        for raw in _lines(path, max_line_bytes):
            if line >= start_line:
                outcome = _outcome(raw)
                if isinstance(outcome, dict):
                    yield DumpRecord(line, outcome)
                else:
                    yield BadLine(line, outcome)
            line += 1
    except _StreamError as e:
        yield DumpReadError(os.path.basename(path), line, str(e))


def iter_chunks(
    path: str,
    chunk_lines: int,
    skip: Iterable[int] = (),
    max_line_bytes: int = MAX_LINE_BYTES,
) -> Iterator[Chunk]:
    """The dump cut into `Chunk`s of `chunk_lines` lines (the last may be shorter), in order.

    Chunks whose index is in `skip` are read but not parsed and not yielded, except a final
    error chunk (see `Chunk`). A dump that stops with an error always yields a final chunk
    carrying it, possibly with no lines (when it stopped at a chunk boundary). Raises (on
    first iteration) ValueError for chunk_lines < 1, plus what `iter_records` raises.
    Time O(file), memory O(chunk + longest line).
    """
    if chunk_lines < 1:
        raise ValueError(f"chunk_lines must be >= 1, got {chunk_lines}")
    dump = os.path.basename(path)
    skip = frozenset(skip)
    chunk = Chunk(dump=dump, index=0, first_line=0, skipped=0 in skip)
    error = None
    try:
        for raw in _lines(path, max_line_bytes):
            if chunk.n_lines == chunk_lines:
                if not chunk.skipped:
                    yield chunk
                chunk = _next_chunk(chunk, chunk_lines, skip)
            if not chunk.skipped:
                _add_line(chunk, raw)
            chunk.n_lines += 1
    except _StreamError as e:
        error = str(DumpReadError(dump, chunk.first_line + chunk.n_lines, str(e)))
    if error is None:
        if chunk.n_lines and not chunk.skipped:
            yield chunk
        return
    if chunk.n_lines == chunk_lines:  # stopped at a boundary: the error opens the next chunk
        if not chunk.skipped:
            yield chunk
        chunk = _next_chunk(chunk, chunk_lines, skip)
    chunk.error = error
    yield chunk


def _next_chunk(chunk: Chunk, chunk_lines: int, skip: frozenset[int]) -> Chunk:
    index = chunk.index + 1
    return Chunk(dump=chunk.dump, index=index, first_line=index * chunk_lines,
                 skipped=index in skip)


def _add_line(chunk: Chunk, raw: bytes | None) -> None:
    outcome = _outcome(raw)
    if isinstance(outcome, dict):
        chunk.records.append(outcome)
    else:
        chunk.bad_lines += 1
        chunk.bad_reasons[outcome] += 1


def _outcome(raw: bytes | None) -> dict | str:
    """`parse_line` of a line, or ``too_long`` for a line dropped for its length (None)."""
    return "too_long" if raw is None else parse_line(raw)


def _lines(path: str, max_line_bytes: int) -> Iterator[bytes | None]:
    """Every line of the decoded dump without its newline; None for a line over the limit.

    A final line without a newline counts; an empty file has no lines. Raises _StreamError
    when the stream stops early (the partial line before the failure is not yielded).
    """
    fmt = dump_format(path)
    with open(path, "rb") as fh:
        blocks = _zstd_blocks(fh) if fmt == "zstd" else _plain_blocks(fh)
        yield from _split_lines(blocks, max_line_bytes)


def _plain_blocks(fh) -> Iterator[bytes]:
    while True:
        try:
            block = fh.read(PLAIN_READ_SIZE)
        except OSError as e:
            raise _StreamError(f"read error: {e}") from e
        if not block:
            return
        yield block


def _zstd_blocks(fh) -> Iterator[bytes]:
    """Decoded bytes of every frame in `fh`, in order; _StreamError if a frame is cut off,
    the data is not zstd, a frame is corrupt, or the file holds no frame at all."""
    dctx = zstandard.ZstdDecompressor(max_window_size=ZSTD_MAX_WINDOW)
    frame = dctx.decompressobj()
    in_frame = False  # bytes of the current frame have been fed but its end not reached
    frames = 0
    while True:
        try:
            piece = fh.read(ZSTD_READ_SIZE)
        except OSError as e:
            raise _StreamError(f"read error: {e}") from e
        if not piece:
            break
        while piece:
            try:
                out = frame.decompress(piece)
            except zstandard.ZstdError as e:
                raise _StreamError(f"corrupt zstd data: {e}") from e
            in_frame = True
            if out:
                yield out
            if not frame.eof:
                break
            frames += 1
            piece = frame.unused_data
            frame = dctx.decompressobj()
            in_frame = False
    if in_frame:
        raise _StreamError("truncated zstd stream (input ends inside a frame)")
    if frames == 0:
        raise _StreamError("empty zstd file (no frame)")


def _split_lines(blocks: Iterable[bytes], max_line_bytes: int) -> Iterator[bytes | None]:
    """Lines of the concatenated `blocks`. O(total bytes): a long line is joined once."""
    pending: list[bytes] = []  # pieces of the line being assembled
    pending_len = 0
    too_long = False  # the line being assembled already exceeded the limit
    for block in blocks:
        parts = block.split(b"\n")
        for part in parts[:-1]:
            if pending or too_long:
                size = pending_len + len(part)
                line = None if too_long or size > max_line_bytes else b"".join(pending) + part
                pending, pending_len, too_long = [], 0, False
                yield line
            else:
                yield part if len(part) <= max_line_bytes else None
        tail = parts[-1]
        if tail and not too_long:
            pending.append(tail)
            pending_len += len(tail)
            if pending_len > max_line_bytes:
                pending, pending_len, too_long = [], 0, True
    if pending or too_long:
        yield None if too_long else b"".join(pending)
