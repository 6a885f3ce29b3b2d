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
    padded) and the metadata field: a uint32 length followed by ``meta_budget`` bytes.

``pq_codes.bin``
    64-byte header (rows = N, cols = M, payload CRC-32) + N x M uint8 PQ codes.

``arrays.bin``
    64-byte header + a msgpack payload of named small arrays (entry points, PQ codebooks and
    transforms) and a dict of build information.

``metadata_overflow.bin``
    64-byte header + concatenated msgpack blobs of the metadata too large for its record.

Metadata: each node's dict is msgpack-encoded. The per-record budget is chosen from the
data at write time: the 99.9th percentile of encoded sizes (at least 8 bytes), then grown to
use the padding the sector packing leaves anyway, and capped so that a record stays within
one sector (search never needs more than one read per node). A blob larger than the budget
is spilled whole to ``metadata_overflow.bin``: its record stores the length with the high
bit set and the blob's uint64 offset in that file. Nothing is truncated.

Integrity: opening checks every header (magic, version, CRC) and sizes, and the CRC-32 of
the three small files; the record file's payload CRC is checked by `verify_records` (a full
read). Any failure raises `IndexFormatError` naming the file and the problem.
"""

from __future__ import annotations

import os
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgpack
import numpy as np

FORMAT_VERSION = 1
SECTOR = 4096
RECORDS_FILE = "records.bin"
CODES_FILE = "pq_codes.bin"
ARRAYS_FILE = "arrays.bin"
OVERFLOW_FILE = "metadata_overflow.bin"
INDEX_FILES = (RECORDS_FILE, CODES_FILE, ARRAYS_FILE, OVERFLOW_FILE)

MAGIC_RECORDS = b"MSIXREC\x00"
MAGIC_CODES = b"MSIXPQC\x00"
MAGIC_ARRAYS = b"MSIXARR\x00"
MAGIC_OVERFLOW = b"MSIXMOV\x00"
MAGIC_CODEC = b"MSIXCDC\x00"

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


def _check_magic(path: Path, magic: bytes, want: bytes) -> None:
    if magic != want:
        raise IndexFormatError(path, f"bad magic {magic!r} (expected {want!r}): not this kind of index file")


def _check_version(path: Path, version: int) -> None:
    if version != FORMAT_VERSION:
        raise IndexFormatError(path, f"unsupported format version {version} (this code reads version {FORMAT_VERSION})")


# ---------------------------------------------------------------------------- small files


def write_small_file(path: Path, magic: bytes, payload: bytes | np.ndarray, rows: int = 0, cols: int = 0) -> None:
    """Write a 64-byte header (magic, version, sizes, CRCs) followed by `payload`."""
    data = memoryview(payload).cast("B") if not isinstance(payload, bytes) else payload
    crc = zlib.crc32(data)
    head = _SMALL.pack(magic, FORMAT_VERSION, SMALL_HEADER, len(data), rows, cols, crc, 0)
    head = head[:-4] + struct.pack("<I", zlib.crc32(head[:-4]))
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(head.ljust(SMALL_HEADER, b"\x00"))
        f.write(data)
    os.replace(tmp, path)


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

    @classmethod
    def plan(cls, dim: int, R: int, count: int, meta_sizes: np.ndarray) -> RecordLayout:
        """Choose the record size and metadata budget for `count` nodes (see module doc)."""
        vec_off = 0
        deg_off = _align(2 * dim, 4)
        nbr_off = deg_off + 4
        meta_off = nbr_off + 4 * R
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

    def offset(self, i: np.ndarray | int) -> np.ndarray | int:
        """Byte offset of node i's record in the file."""
        return self.sector * (1 + (i // self.nodes_per_sector) * self.sectors_per_node) + (
            i % self.nodes_per_sector
        ) * self.record_size

    def as_array(self) -> np.ndarray:
        """int64 layout vector handed to the numba searcher (field order: search._REC ... _R)."""
        return np.array(
            [self.record_size, self.nodes_per_sector, self.sectors_per_node, self.sector,
             self.vec_off, self.deg_off, self.nbr_off, self.meta_off, self.dim, self.R],
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
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            raw = f.read(_RECORD.size)
    except FileNotFoundError:
        raise IndexFormatError(path, "file is missing") from None
    except OSError as e:
        raise IndexFormatError(path, f"cannot read: {e}") from e
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


def _pack_metadata(metadata: list[dict] | None, n: int) -> list[bytes]:
    if metadata is None:
        return [b""] * n
    if len(metadata) != n:
        raise ValueError(f"metadata has {len(metadata)} entries for {n} vectors")
    out = []
    for i, m in enumerate(metadata):
        if m is None or m == {}:
            out.append(b"")
            continue
        if not isinstance(m, dict):
            raise ValueError(f"metadata[{i}] is a {type(m).__name__}, expected a dict")
        out.append(msgpack.packb(m, use_bin_type=True))
    return out


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
    metadata: list[dict] | None,
    entry_points: np.ndarray,
    info: dict[str, Any] | None = None,
) -> WriteStats:
    """Write an index folder from its parts.

    vectors: (N, d) float16/float32 (stored fp16); graph: (neighbours (N, R) int32 padded
    with -1, degrees (N,) int32); codec: a `PQCodec`; codes: (N, M) uint8 from codec.encode;
    metadata: N dicts (or None); entry_points: (E,) int node ids, search starts there;
    info: JSON-like build information stored in ``arrays.bin``. O(N * record_size) I/O.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    neighbours, degrees = graph
    X = np.asarray(vectors)
    n, dim = X.shape
    R = neighbours.shape[1]
    if neighbours.shape[0] != n or degrees.shape != (n,) or codes.shape[0] != n:
        raise ValueError("vectors, graph and codes disagree on the number of nodes")
    blobs = _pack_metadata(metadata, n)
    sizes = np.fromiter((len(b) for b in blobs), np.int64, n)
    layout = RecordLayout.plan(dim, R, n, sizes)

    overflow = bytearray()
    spilled = 0
    crc = 0
    rec_path = out / RECORDS_FILE
    tmp = rec_path.with_name(rec_path.name + ".tmp")
    nodes_per_chunk = max(1, (1 << 22) // (layout.nodes_per_sector * layout.sectors_per_node * SECTOR)) * layout.nodes_per_sector
    with open(tmp, "wb") as f:
        f.write(b"\x00" * SECTOR)
        for lo in range(0, n, nodes_per_chunk):
            hi = min(n, lo + nodes_per_chunk)
            m = hi - lo
            rec = np.zeros((m, layout.record_size), np.uint8)
            rec[:, layout.vec_off : layout.vec_off + 2 * dim] = np.ascontiguousarray(X[lo:hi], np.float16).view(np.uint8)
            rec[:, layout.deg_off : layout.deg_off + 4] = degrees[lo:hi].astype("<u4")[:, None].view(np.uint8)
            nb = np.where(np.arange(R)[None, :] < degrees[lo:hi, None], neighbours[lo:hi], -1).astype("<i4")
            rec[:, layout.nbr_off : layout.nbr_off + 4 * R] = nb.view(np.uint8)
            mo = layout.meta_off
            for j in range(m):
                blob = blobs[lo + j]
                if not blob:
                    continue
                if len(blob) <= layout.meta_budget:
                    rec[j, mo : mo + 4] = np.frombuffer(struct.pack("<I", len(blob)), np.uint8)
                    rec[j, mo + 4 : mo + 4 + len(blob)] = np.frombuffer(blob, np.uint8)
                else:
                    ptr = struct.pack("<IQ", len(blob) | SPILL_BIT, len(overflow))
                    rec[j, mo : mo + 12] = np.frombuffer(ptr, np.uint8)
                    overflow += blob
                    spilled += 1
            if layout.nodes_per_sector > 1:
                pad = -m % layout.nodes_per_sector
                rec = np.pad(rec, ((0, pad), (0, 0))).reshape(-1, layout.nodes_per_sector * layout.record_size)
                rec = np.pad(rec, ((0, 0), (0, SECTOR - rec.shape[1])))
            data = rec.tobytes()
            crc = zlib.crc32(data, crc)
            f.write(data)
        f.seek(0)
        f.write(layout.pack_header(crc))
    os.replace(tmp, rec_path)

    write_small_file(out / CODES_FILE, MAGIC_CODES, np.ascontiguousarray(codes, np.uint8), n, codes.shape[1])
    write_small_file(out / OVERFLOW_FILE, MAGIC_OVERFLOW, bytes(overflow))
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
