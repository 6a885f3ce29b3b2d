"""On-disk index format: files, headers, records, checksums and their errors.

An index is a folder of four files, all little-endian:

``records.bin``
    Sector 0 (4096 bytes) is the header (`RecordLayout`: magic, format version, dim, dtype,
    R, sector size, record size, nodes per sector, sectors per node, field offsets, metadata
    budget, node count, file size, CRC-32 of everything after sector 0, CRC-32 of the
    header). Node i's record starts at byte
    ``sector * (1 + (i // nodes_per_sector) * sectors_per_node) + (i % nodes_per_sector) * record_size``:
    records of at most one sector are packed ``nodes_per_sector`` to a sector and never
    straddle one; larger records (only when the vector and neighbour list alone exceed a
    sector) take ``sectors_per_node`` whole sectors. A record holds, at fixed offsets:
    the fp16 vector (dim x 2 bytes), the degree (uint32), R neighbour ids (int32, -1
    padded), the record's CRC-32 (uint32, at ``meta_off - 4``: zlib's CRC of the record's
    ``record_size`` bytes with this field read as zero) and the metadata field: a uint32
    length followed by ``meta_budget`` bytes.

``pq_codes.bin``
    64-byte header (rows = N, cols = M, payload CRC-32) + N x M uint8 PQ codes.

``arrays.bin``
    64-byte header + a msgpack payload of named small arrays (entry points, PQ codebooks and
    transforms) and a dict of build information.

``metadata_overflow.bin``
    64-byte header + concatenated msgpack blobs of the metadata too large for its record.

``labels.bin``, ``label_vocab.bin``, ``postings.bin``
    per-node filter labels (subreddit, month, score bucket, NSFW), their counts, and the
    members of each subreddit (`labels.py`).

``image_ids.bin``
    64-byte header (rows = the nodes whose metadata has an integer ``image_id``) + those
    image ids sorted ascending (int64) + the node id of each (int32): the stable-id map
    that `like`, deletes and duplicate-free inserts look up (binary search on a memory
    map, 12 bytes per node on disk, none in RAM).

Metadata: each node's dict is msgpack-encoded. The per-record budget is chosen from the
data at write time: the 99.9th percentile of encoded sizes (at least 8 bytes), then grown to
use the padding the sector packing leaves anyway, and capped so that a record stays within
one sector (search never needs more than one read per node). A blob larger than the budget
is spilled whole to ``metadata_overflow.bin``: its record stores the length with the high
bit set and the blob's uint64 offset in that file. Nothing is truncated.

Generations: an index folder that has been updated (`memescale.index.live`) holds a
``CURRENT`` file, JSON ``{"generation": g, "dir": "gen-00000g"}``, naming the subfolder
with generation g's files (generation 0, as built, is the folder itself: ``"dir": "."``).
`resolve_generation` follows it; it is replaced atomically (write, fsync, rename, fsync
the folder), so a reader sees the old or the new generation, never a mix.

Integrity: opening checks every header (magic, version, CRC) and sizes, and the CRC-32 of
the small files; the record file's payload CRC is checked by `verify_records` (a full
read). Any failure raises `IndexFormatError` naming the file and the problem. Each record's
own CRC is checked where search would return it (`search.Index`): a damaged record is
dropped from the results and counted, never returned with a wrong score or metadata.
"""

from __future__ import annotations

import json
import os
import struct
import zlib
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeAlias, overload

import msgpack
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ..crashpoints import crash_point
from ..durable import fsync_dir
from .kernels import parallel_for, record_crcs, resolve_threads
from .labels import LABELS_FILE, MONTH_POSTINGS_FILE, POSTINGS_FILE, SCORE_POSTINGS_FILE, VOCAB_FILE, LabelWriter

FORMAT_VERSION = 2  # 2: a CRC-32 in every record
SECTOR = 4096
RECORDS_FILE = "records.bin"
CODES_FILE = "pq_codes.bin"
ARRAYS_FILE = "arrays.bin"
OVERFLOW_FILE = "metadata_overflow.bin"
IDS_FILE = "image_ids.bin"
INDEX_FILES = (RECORDS_FILE, CODES_FILE, ARRAYS_FILE, OVERFLOW_FILE, IDS_FILE, LABELS_FILE, VOCAB_FILE, POSTINGS_FILE,
               MONTH_POSTINGS_FILE, SCORE_POSTINGS_FILE)

MAGIC_RECORDS = b"MSIXREC\x00"
MAGIC_CODES = b"MSIXPQC\x00"
MAGIC_ARRAYS = b"MSIXARR\x00"
MAGIC_OVERFLOW = b"MSIXMOV\x00"
MAGIC_CODEC = b"MSIXCDC\x00"
MAGIC_IDS = b"MSIXIDS\x00"

DTYPE_FP16 = 1
SPILL_BIT = 0x8000_0000
META_MIN_BUDGET = 8  # room for a spilled blob's uint64 offset
META_QUANTILE = 0.999

# magic, version, header_size, payload_size, rows, cols, payload_crc, header_crc
_SMALL = struct.Struct("<8sIIQQQII")
SMALL_HEADER = 64
# magic, version, header_size, sector, dim, dtype, R, record_size, nodes_per_sector,
# sectors_per_node, vec_off, deg_off, nbr_off, meta_off, meta_budget, count, file_size,
# payload_crc, header_crc
_RECORD = struct.Struct("<8sIIIIIIIIIIIIIIQQII")
_CHUNK = 1 << 24


class IndexFormatError(Exception):
    """An index file is missing, truncated, corrupt or of an unsupported format version."""

    def __init__(self, path: str | os.PathLike, problem: str):
        self.path = str(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}")


CURRENT_FILE = "CURRENT"




def write_durably(path: str | os.PathLike, data: bytes) -> None:
    """Replace `path` with `data` atomically and durably: temp file, fsync, rename, fsync dir."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def current_generation(index_dir: str | os.PathLike) -> tuple[int, Path]:
    """(generation number, folder of its files) of the index folder (module doc)."""
    root = Path(index_dir)
    try:
        raw = (root / CURRENT_FILE).read_bytes()
    except FileNotFoundError:
        return 0, root
    try:
        obj = json.loads(raw)
        gen, sub = int(obj["generation"]), str(obj["dir"])
    except (ValueError, KeyError, TypeError) as e:
        raise IndexFormatError(root / CURRENT_FILE, f"unreadable generation pointer: {e}") from None
    if "/" in sub or sub in ("", ".."):
        raise IndexFormatError(root / CURRENT_FILE, f"bad generation folder {sub!r}")
    return gen, root / sub


def resolve_generation(index_dir: str | os.PathLike) -> Path:
    """The folder holding the current generation's files of the index folder `index_dir`."""
    return current_generation(index_dir)[1]


def _crc_file(f, start: int, length: int) -> int:
    crc = 0
    f.seek(start)
    left = length
    while left > 0:
        block = f.read(min(_CHUNK, left))
        if not block:
            break
        crc = zlib.crc32(block, crc)
        left -= len(block)
    return crc


def _read_head(path: Path, nbytes: int) -> tuple[bytes, int]:
    """The first `nbytes` of the file (fewer if it is shorter) and its size."""
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            return f.read(nbytes), size
    except FileNotFoundError:
        raise IndexFormatError(path, "file is missing") from None
    except OSError as e:
        raise IndexFormatError(path, f"cannot read: {e}") from e


def _check_magic(path: Path, magic: bytes, want: bytes) -> None:
    if magic != want:
        raise IndexFormatError(path, f"bad magic {magic!r} (expected {want!r}): not this kind of index file")


def _check_version(path: Path, version: int) -> None:
    if version != FORMAT_VERSION:
        raise IndexFormatError(path, f"unsupported format version {version} (this code reads version {FORMAT_VERSION})")


# ---------------------------------------------------------------------------- small files


class _StreamedSmallFile:
    """`write_small_file` fed in pieces: the header is written last (CRC and size are only
    known then) and the file appears under its name on `close`. Memory O(1)."""

    def __init__(self, path: Path, magic: bytes, rows: int = 0, cols: int = 0):
        self.path, self.magic, self.rows, self.cols = Path(path), magic, rows, cols
        self.tmp = self.path.with_name(self.path.name + ".tmp")
        self.f = open(self.tmp, "wb")
        self.f.write(b"\x00" * SMALL_HEADER)
        self.size = 0
        self.crc = 0

    def write(self, data) -> None:
        data = memoryview(data).cast("B")
        self.crc = zlib.crc32(data, self.crc)
        self.f.write(data)
        self.size += len(data)

    def close(self) -> None:
        head = _SMALL.pack(self.magic, FORMAT_VERSION, SMALL_HEADER, self.size, self.rows, self.cols, self.crc, 0)
        head = head[:-4] + struct.pack("<I", zlib.crc32(head[:-4]))
        self.f.seek(0)
        self.f.write(head.ljust(SMALL_HEADER, b"\x00"))
        self.f.close()
        os.replace(self.tmp, self.path)

    def abort(self) -> None:
        self.f.close()
        self.tmp.unlink(missing_ok=True)


def write_small_file(path: Path, magic: bytes, payload: bytes | np.ndarray, rows: int = 0, cols: int = 0) -> None:
    """Write a 64-byte header (magic, version, sizes, CRCs) followed by `payload`."""
    f = _StreamedSmallFile(path, magic, rows, cols)
    try:
        f.write(payload)
    except BaseException:
        f.abort()
        raise
    f.close()


def read_small_file(path: Path, magic: bytes) -> tuple[bytes, int, int]:
    """Read and fully verify a file written by `write_small_file`: (payload, rows, cols)."""
    try:
        raw = Path(path).read_bytes()
    except FileNotFoundError:
        raise IndexFormatError(path, "file is missing") from None
    except OSError as e:
        raise IndexFormatError(path, f"cannot read: {e}") from e
    if len(raw) < SMALL_HEADER:
        raise IndexFormatError(path, f"truncated: {len(raw)} bytes, shorter than the {SMALL_HEADER}-byte header")
    fields = _SMALL.unpack_from(raw)
    got_magic, version, header_size, size, rows, cols, crc, head_crc = fields
    _check_magic(path, got_magic, magic)
    if zlib.crc32(raw[: _SMALL.size - 4]) != head_crc:
        raise IndexFormatError(path, "header checksum mismatch: the header is corrupt")
    _check_version(path, version)
    if len(raw) != header_size + size:
        raise IndexFormatError(
            path, f"size mismatch: header says {header_size + size} bytes, file has {len(raw)} (truncated or appended)"
        )
    payload = raw[header_size:]
    if zlib.crc32(payload) != crc:
        raise IndexFormatError(path, "payload checksum mismatch: the data is corrupt")
    return payload, rows, cols


def map_small_file(path: Path, magic: bytes) -> tuple[np.ndarray, int, int]:
    """The payload of a `write_small_file` file as a read-only uint8 memory map (empty
    array for an empty payload), with rows and cols. Checks the header and size, not the
    payload CRC (`read_small_file` does, reading it all). Memory O(1)."""
    raw, size = _read_head(path, _SMALL.size)
    if len(raw) < _SMALL.size:
        raise IndexFormatError(path, f"truncated: {size} bytes, shorter than the {SMALL_HEADER}-byte header")
    got_magic, version, header_size, payload, rows, cols, _, head_crc = _SMALL.unpack(raw)
    _check_magic(path, got_magic, magic)
    if zlib.crc32(raw[: _SMALL.size - 4]) != head_crc:
        raise IndexFormatError(path, "header checksum mismatch: the header is corrupt")
    _check_version(path, version)
    if size != header_size + payload:
        raise IndexFormatError(path, f"size mismatch: header says {header_size + payload} bytes, file has {size}")
    if payload == 0:
        return np.zeros(0, np.uint8), rows, cols
    return np.memmap(path, np.uint8, "r", offset=header_size, shape=(payload,)), rows, cols


def pack_arrays(arrays: dict[str, np.ndarray], info: dict[str, Any]) -> bytes:
    """msgpack bytes of named arrays (dtype, shape, raw little-endian data) and an info dict."""
    enc = {
        name: {"dtype": a.dtype.str, "shape": list(a.shape), "data": np.ascontiguousarray(a).tobytes()}
        for name, a in arrays.items()
    }
    return msgpack.packb({"arrays": enc, "info": info}, use_bin_type=True)


def unpack_arrays(path: Path, payload: bytes) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Inverse of `pack_arrays`; malformed content raises IndexFormatError naming `path`."""
    try:
        obj = msgpack.unpackb(payload, raw=False)
        arrays = {
            name: np.frombuffer(a["data"], dtype=np.dtype(a["dtype"])).reshape(a["shape"]).copy()
            for name, a in obj["arrays"].items()
        }
        return arrays, dict(obj["info"])
    except (ValueError, KeyError, TypeError, msgpack.ExtraData, msgpack.FormatError, msgpack.StackError) as e:
        raise IndexFormatError(path, f"malformed array payload: {e}") from e


# ---------------------------------------------------------------------------- record layout


def _align(n: int, a: int) -> int:
    return (n + a - 1) // a * a


@dataclass(frozen=True)
class RecordLayout:
    """Geometry of ``records.bin``; all sizes in bytes."""

    dim: int
    R: int
    count: int
    record_size: int
    nodes_per_sector: int
    sectors_per_node: int
    vec_off: int
    deg_off: int
    nbr_off: int
    meta_off: int
    meta_budget: int
    sector: int = SECTOR

    @property
    def crc_off(self) -> int:
        """Offset of the record's own CRC-32 (uint32), just before the metadata field."""
        return self.meta_off - 4

    @classmethod
    def plan(cls, dim: int, R: int, count: int, meta_sizes: np.ndarray) -> RecordLayout:
        """Choose the record size and metadata budget for `count` nodes (see module doc)."""
        vec_off = 0
        deg_off = _align(2 * dim, 4)
        nbr_off = deg_off + 4
        meta_off = nbr_off + 4 * R + 4  # the record's CRC-32 sits between
        fixed = meta_off + 4
        want = int(np.quantile(meta_sizes, META_QUANTILE, method="higher")) if len(meta_sizes) else 0
        want = max(want, META_MIN_BUDGET)
        if fixed + META_MIN_BUDGET > SECTOR:
            spn = -(-(fixed + want) // SECTOR)
            nps, record = 1, spn * SECTOR
        else:
            record = min(_align(fixed + want, 8), SECTOR)
            nps = SECTOR // record
            record = SECTOR // nps // 8 * 8
            spn = 1
        return cls(dim, R, count, record, nps, spn, vec_off, deg_off, nbr_off, meta_off, record - fixed)

    @property
    def sectors(self) -> int:
        """Sectors after the header sector."""
        return -(-self.count // self.nodes_per_sector) * self.sectors_per_node

    @property
    def file_size(self) -> int:
        return self.sector * (1 + self.sectors)

    @overload
    def offset(self, i: int) -> int: ...
    @overload
    def offset(self, i: np.ndarray) -> np.ndarray: ...

    def offset(self, i: np.ndarray | int) -> np.ndarray | int:
        """Byte offset of node i's record in the file."""
        return self.sector * (1 + (i // self.nodes_per_sector) * self.sectors_per_node) + (
            i % self.nodes_per_sector
        ) * self.record_size

    def as_array(self) -> np.ndarray:
        """int64 layout vector handed to the numba searcher (field order: search._REC ... _R)."""
        return np.array(
            [self.record_size, self.nodes_per_sector, self.sectors_per_node, self.sector,
             self.vec_off, self.deg_off, self.nbr_off, self.meta_off, self.dim, self.R, self.crc_off],
            np.int64,
        )

    def pack_header(self, payload_crc: int) -> bytes:
        head = _RECORD.pack(
            MAGIC_RECORDS, FORMAT_VERSION, self.sector, self.sector, self.dim, DTYPE_FP16, self.R,
            self.record_size, self.nodes_per_sector, self.sectors_per_node, self.vec_off, self.deg_off,
            self.nbr_off, self.meta_off, self.meta_budget, self.count, self.file_size, payload_crc, 0,
        )
        head = head[:-4] + struct.pack("<I", zlib.crc32(head[:-4]))
        return head.ljust(self.sector, b"\x00")


def read_record_header(path: Path) -> tuple[RecordLayout, int]:
    """Parse and check the header of ``records.bin`` and the file size: (layout, payload CRC)."""
    raw, size = _read_head(path, _RECORD.size)
    if len(raw) < _RECORD.size:
        raise IndexFormatError(path, f"truncated: {size} bytes, shorter than the header")
    (magic, version, header_size, sector, dim, dtype, R, record, nps, spn, vec_off, deg_off, nbr_off,
     meta_off, budget, count, file_size, payload_crc, head_crc) = _RECORD.unpack(raw)
    _check_magic(path, magic, MAGIC_RECORDS)
    if zlib.crc32(raw[:-4]) != head_crc:
        raise IndexFormatError(path, "header checksum mismatch: the header is corrupt")
    _check_version(path, version)
    if dtype != DTYPE_FP16:
        raise IndexFormatError(path, f"unsupported vector dtype code {dtype}")
    layout = RecordLayout(dim, R, count, record, nps, spn, vec_off, deg_off, nbr_off, meta_off, budget, sector)
    if header_size != sector or layout.file_size != file_size:
        raise IndexFormatError(path, "inconsistent header geometry")
    if size != file_size:
        raise IndexFormatError(
            path, f"size mismatch: header says {file_size} bytes, file has {size} (truncated or appended)"
        )
    return layout, payload_crc


def verify_records(path: Path) -> None:
    """Full check of ``records.bin``: header, size and the CRC-32 of every record sector."""
    layout, crc = read_record_header(path)
    with open(path, "rb") as f:
        got = _crc_file(f, layout.sector, layout.file_size - layout.sector)
    if got != crc:
        raise IndexFormatError(path, "record checksum mismatch: the records are corrupt")


# ---------------------------------------------------------------------------- writing

BLOCK_BYTES = 1 << 22  # records.bin bytes assembled per write (and pq codes bytes per write)
META_BLOCK_ROWS = 8192  # metadata rows turned into dicts at a time

MetadataSource: TypeAlias = (
    Sequence | str | os.PathLike | pa.Table | pa.RecordBatch | Iterable[pa.RecordBatch | pa.Table] | None
)


def _row_blocks(metadata: MetadataSource, n: int) -> Iterator[tuple[list, pa.RecordBatch | None]]:
    """Normalise a metadata source (see `write_index`) into blocks of at most META_BLOCK_ROWS
    row dicts in node order, each with the RecordBatch it came from (None for dicts given as
    such); only one block's dicts are alive at a time."""
    if isinstance(metadata, Sequence) and not isinstance(metadata, (str, bytes)):
        if len(metadata) != n:
            raise ValueError(f"metadata has {len(metadata)} entries for {n} vectors")
        for lo in range(0, n, META_BLOCK_ROWS):
            yield list(metadata[lo : lo + META_BLOCK_ROWS]), None
        return
    if isinstance(metadata, (str, os.PathLike)):
        with pq.ParquetFile(metadata) as pf:
            for batch in pf.iter_batches(batch_size=META_BLOCK_ROWS):
                yield batch.to_pylist(), batch
        return
    parts: Any = [metadata] if isinstance(metadata, (pa.Table, pa.RecordBatch)) else metadata  # iter() checks it
    try:
        it = iter(parts)
    except TypeError:
        raise TypeError(f"metadata: unsupported source {type(metadata).__name__}") from None
    for part in it:
        if isinstance(part, pa.Table):
            batches = part.to_batches(max_chunksize=META_BLOCK_ROWS)
        elif isinstance(part, pa.RecordBatch):
            batches = [part]
        else:
            raise TypeError(f"metadata: a stream must yield pyarrow RecordBatches or Tables, got {type(part).__name__}")
        for batch in batches:
            for lo in range(0, batch.num_rows, META_BLOCK_ROWS):
                b = batch.slice(lo, META_BLOCK_ROWS)
                yield b.to_pylist(), b


def _batch_image_ids(batch: pa.RecordBatch) -> np.ndarray:
    """`_image_id` of every row of a RecordBatch, column-wise: (n,) int64."""
    n = batch.num_rows
    col = batch.column("image_id") if "image_id" in batch.schema.names else None
    if col is not None and pa.types.is_dictionary(col.type):
        col = col.dictionary_decode()
    if col is None or not pa.types.is_integer(col.type):
        return np.full(n, -1, np.int64)  # a dict's value would not be an int either
    v = col.fill_null(0).to_numpy(zero_copy_only=False)
    ok = v < np.uint64(2**63) if v.dtype == np.uint64 else v >= 0
    if col.null_count:
        ok &= col.is_valid().to_numpy(zero_copy_only=False)
    return np.where(ok, v.astype(np.int64), -1)


def _encode_block(rows: list, first: int, packer: msgpack.Packer) -> list[bytes]:
    """msgpack blobs of one block's row dicts (b"" for None or {}); `first` is the block's
    first node id, for error messages."""
    out = []
    for j, m in enumerate(rows):
        if m is None:
            out.append(b"")
        elif not isinstance(m, dict):
            raise ValueError(f"metadata[{first + j}] is a {type(m).__name__}, expected a dict")
        else:
            out.append(packer.pack(m) if m else b"")
    return out


def _image_id(m: Any) -> int:
    v = m.get("image_id") if isinstance(m, dict) else None
    return v if type(v) is int and 0 <= v < 2**63 else -1


def _spool_metadata(metadata: MetadataSource, n: int, spool: Path, ids: np.ndarray, labels: Any) -> np.ndarray:
    """First pass: encode every row's metadata into `spool` (blobs concatenated in node
    order) and return their sizes, (n,) uint32; write each row's integer ``image_id`` (-1
    when it has none) into `ids` (n,) int64 (a memory map) and its filter labels into
    `labels` (a `labels.LabelWriter`). Memory: one block + 4 bytes per node."""
    sizes = np.zeros(n, np.uint32)
    packer = msgpack.Packer(use_bin_type=True)
    row = 0
    with open(spool, "wb") as f:
        for rows, batch in _row_blocks(metadata, n):
            if row + len(rows) <= n:
                ids[row : row + len(rows)] = (np.fromiter(map(_image_id, rows), np.int64, len(rows)) if batch is None
                                              else _batch_image_ids(batch))
                labels.add(row, rows, batch)
            blobs = _encode_block(rows, row, packer)
            del rows
            k = len(blobs)
            if row + k > n:
                raise ValueError(f"metadata has more than {n} entries for {n} vectors")
            lens = np.fromiter(map(len, blobs), np.int64, k)
            if k and lens.max() >= SPILL_BIT:
                j = int(np.argmax(lens))
                raise ValueError(f"metadata[{row + j}] encodes to {lens[j]} bytes (at most {SPILL_BIT - 1})")
            sizes[row : row + k] = lens
            f.write(b"".join(blobs))
            row += k
    if row != n:
        raise ValueError(f"metadata has {row} entries for {n} vectors")
    return sizes


def _place_metadata(rec: np.ndarray, sizes: np.ndarray, buf: np.ndarray, layout: RecordLayout,
                    overflow: _StreamedSmallFile) -> int:
    """Fill the metadata fields of the first len(sizes) rows of `rec` (rows, record_size)
    uint8 from `buf` (their blobs, concatenated); blobs over the budget go to `overflow`.
    Returns how many were spilled. Memory O(rec.size + buf.size)."""
    m, mo, budget = len(sizes), layout.meta_off, layout.meta_budget
    inrec = sizes <= budget
    lengths = np.where(inrec, sizes, 0).astype("<u4")
    rec[:m, mo : mo + 4] = lengths.view(np.uint8).reshape(m, 4)
    spill = np.flatnonzero(~inrec)
    src = buf
    if spill.size:
        starts = np.cumsum(sizes, dtype=np.int64) - sizes
        keep = np.ones(len(buf), bool)
        for j in spill.tolist():
            s, size = int(starts[j]), int(sizes[j])
            rec[j, mo : mo + 12] = np.frombuffer(struct.pack("<IQ", size | SPILL_BIT, overflow.size), np.uint8)
            overflow.write(buf[s : s + size])
            keep[s : s + size] = False
        src = buf[keep]
    # row-major boolean assignment: blob bytes land in node order, each at its record's field
    rec[:m, mo + 4 : mo + 4 + budget][np.arange(budget)[None, :] < lengths[:, None]] = src
    return int(spill.size)


def _seal_records(rec: np.ndarray, m: int, layout: RecordLayout, pool: ThreadPoolExecutor | None = None,
                  threads: int = 1) -> None:
    """Write the CRC-32 of each of the first m records of `rec` ((rows, record_size) uint8,
    C-contiguous) into its CRC field, on `threads` slices of the rows run on `pool`.
    O(m * record_size)."""
    crcs = np.zeros(m, np.uint32)
    words, rw, cw = rec.view(np.int32).ravel(), layout.record_size // 4, layout.crc_off // 4

    def part(lo: int, hi: int) -> None:
        record_crcs(words[lo * rw:], rw, cw, hi - lo, crcs[lo:hi])

    parallel_for(part, m, threads, pool)
    rec[:m, layout.crc_off : layout.crc_off + 4] = crcs.astype("<u4")[:, None].view(np.uint8)


ID_SORT_ROWS = 1 << 21  # image ids sorted in RAM at a time by `write_id_map` (about 44 B each while sorted)
_ID_SCAN = 1 << 20  # image ids scanned per block


def write_id_map(path: Path, ids: np.ndarray, sort_rows: int = ID_SORT_ROWS) -> int:
    """Write ``image_ids.bin`` (module doc) for `ids` (N,) int64 in node order (-1: no id;
    a memory map is read in blocks). Returns the number of ids mapped.

    Sorted in value ranges of about `sort_rows` ids each (cut at quantiles of a sample),
    one streamed pass over `ids` per range: memory O(sort_rows + a block), time
    O(N log N + N * N / sort_rows) reads. Ties keep node order."""
    path = Path(path)
    n = int(ids.shape[0])
    valid = 0
    for lo in range(0, n, _ID_SCAN):
        valid += int(np.count_nonzero(np.asarray(ids[lo : lo + _ID_SCAN]) >= 0))
    ranges = max(1, -(-valid // max(1, sort_rows)))
    if ranges > 1:
        rng = np.random.default_rng(0)
        sample = np.asarray(ids[np.sort(rng.integers(0, n, 65536))])
        sample = np.sort(sample[sample >= 0])
        cuts = np.unique(sample[(np.arange(1, ranges) * len(sample)) // ranges]) if len(sample) else np.zeros(0)
    else:
        cuts = np.zeros(0, np.int64)
    bounds = [-1, *cuts.tolist(), 2**63 - 1]
    out = _StreamedSmallFile(path, MAGIC_IDS, valid, 12)
    node_tmp = path.with_name(path.name + ".nodes.tmp")
    try:
        with open(node_tmp, "w+b") as nodes_f:
            for b in range(len(bounds) - 1):
                keys, nodes = [], []
                for lo in range(0, n, _ID_SCAN):
                    v = np.asarray(ids[lo : lo + _ID_SCAN])
                    hit = np.flatnonzero((v > bounds[b]) & (v <= bounds[b + 1]))
                    keys.append(v[hit])
                    nodes.append((hit + lo).astype(np.int32))
                k = np.concatenate(keys)
                order = np.argsort(k, kind="stable")
                out.write(np.ascontiguousarray(k[order], "<i8"))
                nodes_f.write(np.ascontiguousarray(np.concatenate(nodes)[order], "<i4").tobytes())
                del keys, nodes, k, order
            nodes_f.seek(0)
            while block := nodes_f.read(_CHUNK):
                out.write(block)
        if out.size != 12 * valid:
            raise AssertionError(f"id map of {out.size} bytes for {valid} ids")
        out.close()
    except BaseException:
        out.abort()
        raise
    finally:
        node_tmp.unlink(missing_ok=True)
    return valid


@dataclass
class WriteStats:
    """What `write_index` laid out."""

    record_size: int
    nodes_per_sector: int
    sectors_per_node: int
    meta_budget: int
    meta_spilled: int
    bytes_written: int


def write_index(
    out_dir: str | os.PathLike,
    vectors: np.ndarray,
    graph: tuple[np.ndarray, np.ndarray],
    codec: Any,
    codes: np.ndarray,
    metadata: MetadataSource,
    entry_points: np.ndarray,
    info: dict[str, Any] | None = None,
    *,
    block_bytes: int = BLOCK_BYTES,
) -> WriteStats:
    """Write an index folder from its parts, streaming every input in blocks.

    vectors: (N, d) float16/float32 (stored fp16); graph: (neighbours (N, R) int32 padded
    with -1, degrees (N,) int32); codes: (N, M) uint8 from codec.encode. Any of these may be
    np.memmap files larger than RAM: they are read in row blocks of about `block_bytes`
    bytes of output. codec: a `PQCodec`; entry_points: (E,) int node ids, search starts
    there; info: JSON-like build information stored in ``arrays.bin``.

    metadata, one dict per node in node order (or None: no metadata), as any of
      - a list (or any Sequence whose slices are lists) of N dicts (None or {} for a node
        without metadata);
      - a Parquet file path (str or PathLike): its rows, all columns, read in record batches;
      - a pyarrow Table or RecordBatch, or an iterable of them (a RecordBatchReader, a
        generator), of N rows in total, blocks of any size.
    A row's dict is what ``batch.to_pylist()`` gives; the bytes written are the same for
    every form given the same dicts. Two passes: the first msgpack-encodes the rows block by
    block into a spool file next to the output (about the total encoded size, deleted
    before returning) and keeps only their sizes, which fix the budget (module doc); the
    second writes the records, spilling oversized blobs to ``metadata_overflow.bin``.

    Memory: O(block_bytes + META_BLOCK_ROWS rows' dicts) plus 4 bytes per node (encoded
    sizes; 8 while the budget quantile is taken). Time O(N * record_size) I/O plus one
    encode per row. Raises ValueError when the counts disagree or a row is not a dict.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    neighbours, degrees = graph
    X = np.asarray(vectors)
    n, dim = X.shape
    R = neighbours.shape[1]
    if neighbours.shape[0] != n or degrees.shape != (n,) or codes.shape[0] != n:
        raise ValueError("vectors, graph and codes disagree on the number of nodes")
    spool = out / (RECORDS_FILE + ".meta.tmp")
    ids_tmp = out / (IDS_FILE + ".ids.tmp")
    rec_path = out / RECORDS_FILE
    tmp = rec_path.with_name(rec_path.name + ".tmp")
    overflow = codes_file = labels = None
    try:
        ids = np.lib.format.open_memmap(ids_tmp, mode="w+", dtype=np.int64, shape=(n,))
        ids[:] = -1
        labels = LabelWriter(out / (LABELS_FILE + ".tmp.npy"), n)
        sizes = None if metadata is None else _spool_metadata(metadata, n, spool, ids, labels)
        # no metadata: every blob is empty, which plans the same budget as no sizes at all
        layout = RecordLayout.plan(dim, R, n, np.zeros(0, np.uint32) if sizes is None else sizes)
        nps, rs = layout.nodes_per_sector, layout.record_size
        nodes_per_chunk = max(1, block_bytes // (nps * layout.sectors_per_node * SECTOR)) * nps
        overflow = _StreamedSmallFile(out / OVERFLOW_FILE, MAGIC_OVERFLOW)
        spilled = 0
        crc = 0
        threads = resolve_threads(None)
        with open(tmp, "wb") as f, (nullcontext() if sizes is None else open(spool, "rb")) as sp, \
                ThreadPoolExecutor(threads) as pool:
            f.write(b"\x00" * SECTOR)
            for lo in range(0, n, nodes_per_chunk):
                hi = min(n, lo + nodes_per_chunk)
                m = hi - lo
                rec = np.zeros((-(-m // nps) * nps, rs), np.uint8)
                vec = np.ascontiguousarray(X[lo:hi], np.float16)
                rec[:m, layout.vec_off : layout.vec_off + 2 * dim] = vec.view(np.uint8)
                deg = np.asarray(degrees[lo:hi])
                rec[:m, layout.deg_off : layout.deg_off + 4] = deg.astype("<u4")[:, None].view(np.uint8)
                nb = np.where(np.arange(R)[None, :] < deg[:, None], neighbours[lo:hi], -1).astype("<i4")
                rec[:m, layout.nbr_off : layout.nbr_off + 4 * R] = nb.view(np.uint8)
                del nb
                if sizes is not None:
                    assert sp is not None  # the spool is open whenever there are sizes
                    sz = sizes[lo:hi]
                    want = int(sz.sum(dtype=np.int64))
                    buf = np.frombuffer(sp.read(want), np.uint8)
                    if len(buf) != want:
                        raise OSError(f"{spool}: metadata spool is short")
                    spilled += _place_metadata(rec, sz, buf, layout, overflow)
                    del buf
                _seal_records(rec, m, layout, pool, threads)
                if nps > 1 and nps * rs < SECTOR:
                    page = np.zeros((len(rec) // nps, SECTOR), np.uint8)
                    page[:, : nps * rs] = rec.reshape(-1, nps * rs)
                    rec = page
                crc = zlib.crc32(rec.data, crc)
                f.write(rec.data)
                del rec
            f.seek(0)
            f.write(layout.pack_header(crc))
        crash_point("index.records_written")
        os.replace(tmp, rec_path)
        crash_point("index.records_renamed")
        sizes = None
        spool.unlink(missing_ok=True)

        M = codes.shape[1]
        codes_file = _StreamedSmallFile(out / CODES_FILE, MAGIC_CODES, n, M)
        step = max(1, block_bytes // max(1, M))
        for lo in range(0, n, step):
            codes_file.write(np.ascontiguousarray(codes[lo : lo + step], np.uint8))
        codes_file.close()
        codes_file = None
        overflow.close()
        overflow = None
        write_id_map(out / IDS_FILE, ids)
        del ids
        labels.finish(out, _StreamedSmallFile)
    finally:
        spool.unlink(missing_ok=True)
        ids_tmp.unlink(missing_ok=True)
        if labels is not None:
            labels.close()
        tmp.unlink(missing_ok=True)
        for w in (overflow, codes_file):
            if w is not None:
                w.abort()
    arrays = {"entry_points": np.asarray(entry_points, np.int64)}
    arrays.update({f"pq_{k}": v for k, v in codec.to_arrays().items()})
    write_small_file(out / ARRAYS_FILE, MAGIC_ARRAYS, pack_arrays(arrays, dict(info or {})))
    written = sum(os.path.getsize(out / name) for name in INDEX_FILES)
    return WriteStats(layout.record_size, layout.nodes_per_sector, layout.sectors_per_node, layout.meta_budget, spilled, written)


def decode_metadata(path: Path, blob: bytes) -> dict:
    """msgpack blob -> dict ({} for an empty blob); malformed bytes raise IndexFormatError."""
    if not blob:
        return {}
    try:
        return msgpack.unpackb(blob, raw=False, strict_map_key=False)
    except (ValueError, msgpack.ExtraData, msgpack.FormatError, msgpack.StackError) as e:
        raise IndexFormatError(path, f"malformed metadata: {e}") from e
