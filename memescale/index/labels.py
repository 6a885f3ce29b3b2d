"""Per-node filter labels: subreddit, month, score bucket, NSFW flag, and their counts.

Stored with the index (written by `disk.write_index` from the same metadata stream as the
records) so that hard filters run inside the graph search and a planner can estimate how
many nodes a filter matches:

``labels.bin``
    64-byte header + N records of 8 bytes (`LABEL_DTYPE`): subreddit id (int32, -1 none),
    month (int16, months since 2005-01, -1 unknown), score bucket (uint8, `score_bucket`),
    flags (uint8, bit 0: NSFW). Held in RAM: 8 bytes per node.
``label_vocab.bin``
    64-byte header + msgpack: the subreddit names by id (lower-cased, most frequent first),
    their node counts, and the node counts per month and per score bucket.
``postings.bin``
    64-byte header + (S + 2) int64 offsets + N int32 node ids grouped by subreddit id (node
    order within a subreddit): the members of any subreddit, memory-mapped, 4 bytes per node
    on disk. Nodes without a subreddit come last.
``month_postings.bin``, ``score_postings.bin``
    the same by month (months ascending, unknown last) and by score bucket, so the nodes of
    any month range, or of any minimum score bucket, are one contiguous slice.

Writing is streamed: `LabelWriter.add` takes each block of metadata (dicts, or Arrow batches
read column-wise) and keeps 8 bytes
per node in a memory-mapped scratch file; `finish` renumbers the subreddits by frequency and
lays the postings out with a counting sort (one pass, no O(N) sort in RAM).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, NamedTuple

import msgpack
import numpy as np

LABELS_FILE = "labels.bin"
VOCAB_FILE = "label_vocab.bin"
POSTINGS_FILE = "postings.bin"
MONTH_POSTINGS_FILE = "month_postings.bin"
SCORE_POSTINGS_FILE = "score_postings.bin"
MAGIC_LABELS = b"MSIXLBL\x00"
MAGIC_VOCAB = b"MSIXVOC\x00"
MAGIC_POSTINGS = b"MSIXPST\x00"
LABEL_DTYPE = np.dtype([("sub", "<i4"), ("month", "<i2"), ("bucket", "u1"), ("flags", "u1")])
NSFW = 1
MONTH0_YEAR = 2005
# score bucket b holds SCORE_BOUNDS[b - 1] <= score < SCORE_BOUNDS[b]; bucket 0: below 0 or unknown
SCORE_BOUNDS = (0, 1, 10, 100, 1000, 10_000, 100_000)
_BLOCK = 1 << 20


def month_of(seconds: int) -> int:
    """Months since 2005-01 of a unix time (UTC); -1 before that."""
    d = datetime.fromtimestamp(seconds, UTC)
    m = (d.year - MONTH0_YEAR) * 12 + d.month - 1
    return m if m >= 0 else -1


def score_bucket(score: int | None) -> int:
    """The bucket of a score: 0 for none or negative, then one per power of ten."""
    if score is None:
        return 0
    return int(np.searchsorted(np.asarray(SCORE_BOUNDS), score, side="right"))


def as_int(v: Any) -> int | None:
    """An int from an int, a numeric string or a float (exact for 64-bit ints); else None."""
    if v is None or isinstance(v, bool):
        return None
    if isinstance(v, int):
        return v
    try:
        return int(v)
    except (TypeError, ValueError, OverflowError):  # OverflowError: an infinite float
        pass
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return int(f) if math.isfinite(f) else None


def _truthy(v: Any) -> bool:
    return v is True or v == 1 or (isinstance(v, str) and v.lower() in ("true", "1", "yes"))


def is_nsfw(meta: Any) -> bool:
    """Whether a node's metadata marks it NSFW (the post's over_18, or curate's nsfw)."""
    return _truthy(meta.get("over_18")) or _truthy(meta.get("nsfw"))


def label_row(m: Any, sub_id) -> tuple[int, int, int, int]:
    """(subreddit id, month, score bucket, flags) of one metadata dict; `sub_id(name)` maps
    a lower-cased subreddit name to its id."""
    if not isinstance(m, dict):
        return -1, -1, 0, 0
    name = m.get("subreddit")
    sub = sub_id(str(name).lower()) if isinstance(name, str) and name else -1
    t = as_int(m.get("created_utc"))
    month = month_of(t) if t is not None and 0 <= t < 2**32 else -1
    flags = NSFW if is_nsfw(m) else 0
    return sub, month, score_bucket(as_int(m.get("score"))), flags


_MONTH0 = (MONTH0_YEAR - 1970) * 12  # 2005-01 in months since 1970-01


def _ints(col: Any) -> tuple[np.ndarray, np.ndarray] | None:
    """(values int64, valid bool) of an Arrow column as `as_int` reads each value (integers;
    floats truncated when finite; null, bool and non-finite not valid; values past 2^62 are
    clipped there, beyond every bound they are compared with); None for a type read row by
    row (strings: numeric text, dictionaries)."""
    import pyarrow as pa

    t = col.type
    if pa.types.is_null(t) or pa.types.is_boolean(t):
        return np.zeros(len(col), np.int64), np.zeros(len(col), bool)
    if pa.types.is_integer(t):
        v = col.to_numpy(zero_copy_only=False) if col.null_count == 0 else col.fill_null(0).to_numpy()
        valid = np.ones(len(col), bool) if col.null_count == 0 else col.is_valid().to_numpy(zero_copy_only=False)
        if v.dtype == np.uint64:  # past int64: as large as any bound here
            v = np.minimum(v, np.uint64(2**63 - 1))
        return v.astype(np.int64), valid
    if pa.types.is_floating(t):
        v = col.fill_null(np.nan).to_numpy(zero_copy_only=False).astype(np.float64)
        valid = np.isfinite(v)  # past int64: clipped, as large as any bound here
        return np.clip(np.trunc(np.where(valid, v, 0.0)), -(2.0**62), 2.0**62).astype(np.int64), valid
    return None


def _truthy_column(col: Any) -> np.ndarray | None:
    """`_truthy` of each value of an Arrow column (null: False); None for a type read row by row."""
    import pyarrow as pa
    import pyarrow.compute as pc

    t = col.type
    if pa.types.is_null(t):
        return np.zeros(len(col), bool)
    if pa.types.is_boolean(t):
        return col.fill_null(False).to_numpy(zero_copy_only=False).astype(bool)
    if pa.types.is_integer(t) or pa.types.is_floating(t):
        v = col.fill_null(0).to_numpy(zero_copy_only=False)
        return np.asarray(v == 1, bool)
    if pa.types.is_string(t) or pa.types.is_large_string(t):
        low = pc.utf8_lower(col)
        return pc.fill_null(pc.is_in(low, value_set=pa.array(["true", "1", "yes"])), False).to_numpy(
            zero_copy_only=False).astype(bool)
    return None


def batch_labels(batch: Any, sub_id) -> np.ndarray | None:
    """The `label_row` of every row of an Arrow RecordBatch (n,) LABEL_DTYPE, column-wise:
    no Python object per row, one `sub_id` call per distinct subreddit string. None when a
    column has a type this reads row by row (the caller falls back to `label_row`)."""
    import pyarrow as pa

    n = batch.num_rows
    names = batch.schema.names
    out = np.zeros(n, LABEL_DTYPE)
    out["sub"] = -1
    out["month"] = -1
    if "subreddit" in names:
        col = batch.column("subreddit")
        if not (pa.types.is_string(col.type) or pa.types.is_large_string(col.type) or pa.types.is_null(col.type)):
            return None
        if not pa.types.is_null(col.type) and n:
            enc = col.dictionary_encode()
            ids = np.array([sub_id(v.lower()) if v else -1 for v in enc.dictionary.to_pylist()] + [-1], np.int32)
            idx = enc.indices.fill_null(len(ids) - 1).to_numpy(zero_copy_only=False)
            out["sub"] = ids[idx]
    if "created_utc" in names:
        iv = _ints(batch.column("created_utc"))
        if iv is None:
            return None
        t, valid = iv
        valid &= (t >= 0) & (t < 2**32)
        months = np.where(valid, t, 0).astype("datetime64[s]").astype("datetime64[M]").astype(np.int64) - _MONTH0
        out["month"] = np.where(valid & (months >= 0), months, -1)
    if "score" in names:
        iv = _ints(batch.column("score"))
        if iv is None:
            return None
        score, valid = iv
        out["bucket"] = np.where(valid, np.searchsorted(np.asarray(SCORE_BOUNDS), score, side="right"), 0)
    nsfw = np.zeros(n, bool)
    for field in ("over_18", "nsfw"):
        if field in names:
            f = _truthy_column(batch.column(field))
            if f is None:
                return None
            nsfw |= f
    out["flags"] = np.where(nsfw, NSFW, 0)
    return out


class LabelWriter:
    """Collects the labels of N nodes block by block (memory: 8 bytes per node in a
    memory-mapped scratch file + one entry per distinct subreddit)."""

    def __init__(self, scratch: Path, n: int):
        self.scratch = Path(scratch)
        self.n = n
        self.rows = np.lib.format.open_memmap(self.scratch, mode="w+", dtype=LABEL_DTYPE, shape=(n,))
        self.rows["sub"] = -1
        self.rows["month"] = -1
        self.names: dict[str, int] = {}

    def _sub_id(self, name: str) -> int:
        i = self.names.get(name)
        if i is None:
            i = self.names[name] = len(self.names)
        return i

    def add(self, first: int, rows: list, batch: Any = None) -> None:
        """Labels of nodes first .. first + len(rows) - 1 from their metadata dicts, or
        column-wise from `batch` (the same rows as an Arrow RecordBatch) where given and
        its column types allow (`batch_labels`)."""
        block = None if batch is None else batch_labels(batch, self._sub_id)
        if block is None:
            block = np.array([label_row(m, self._sub_id) for m in rows], dtype=LABEL_DTYPE)
        self.rows[first : first + len(rows)] = block

    def finish(self, out_dir: Path, write_small) -> None:
        """Write the three label files into `out_dir` with `write_small` (`disk._StreamedSmallFile`)."""
        rows, n = self.rows, self.n
        counts = np.zeros(len(self.names) + 1, np.int64)  # last: no subreddit
        for lo in range(0, n, _BLOCK):
            s = np.asarray(rows["sub"][lo : lo + _BLOCK])
            counts += np.bincount(np.where(s < 0, len(self.names), s), minlength=len(counts))
        names = np.array(list(self.names), dtype=object)
        order = np.lexsort((names, -counts[:-1])) if len(names) else np.zeros(0, np.int64)
        remap = np.empty(len(self.names) + 1, np.int32)
        remap[order] = np.arange(len(order), dtype=np.int32)
        remap[-1] = -1
        months = np.zeros(0, np.int64)
        buckets = np.zeros(len(SCORE_BOUNDS) + 1, np.int64)
        flags = np.zeros(2, np.int64)
        out = write_small(out_dir / LABELS_FILE, MAGIC_LABELS, n, LABEL_DTYPE.itemsize)
        for lo in range(0, n, _BLOCK):
            b = np.array(rows[lo : lo + _BLOCK])
            s = b["sub"]
            b["sub"] = remap[np.where(s < 0, len(self.names), s)]
            m = b["month"][b["month"] >= 0].astype(np.int64)
            if m.size:
                if m.max() >= months.size:
                    months = np.concatenate([months, np.zeros(int(m.max()) + 1 - months.size, np.int64)])
                months += np.bincount(m, minlength=months.size)
            buckets += np.bincount(b["bucket"], minlength=buckets.size)
            flags += np.bincount(b["flags"] & NSFW, minlength=2)
            rows[lo : lo + _BLOCK] = b
            out.write(b.tobytes())
        out.close()
        final_counts = np.append(counts[:-1][order], counts[-1])
        vocab = {"subreddits": names[order].tolist(), "sub_counts": final_counts[:-1].tolist(),
                 "no_sub": int(final_counts[-1]), "month_counts": months.tolist(),
                 "bucket_counts": buckets.tolist(), "nsfw": int(flags[1]), "nodes": n}
        v = write_small(out_dir / VOCAB_FILE, MAGIC_VOCAB)
        v.write(msgpack.packb(vocab, use_bin_type=True))
        v.close()
        # postings: counting sort by final subreddit id (no subreddit last), then by month
        self._postings(out_dir / POSTINGS_FILE, write_small, "sub", final_counts)
        month_counts = np.append(months, n - int(months.sum()))
        self._postings(out_dir / MONTH_POSTINGS_FILE, write_small, "month", month_counts)
        self._postings(out_dir / SCORE_POSTINGS_FILE, write_small, "bucket", np.append(buckets, 0))

    def _postings(self, path: Path, write_small, field: str, counts: np.ndarray) -> None:
        """Node ids grouped by `field` (values 0 .. len(counts) - 2; negative: the last group)
        with a counting sort: one pass over the labels, 4 bytes per node of scratch file."""
        rows, n = self.rows, self.n
        offsets = np.zeros(len(counts) + 1, np.int64)
        np.cumsum(counts, out=offsets[1:])
        post_tmp = self.scratch.with_name(self.scratch.name + ".postings")
        post = np.lib.format.open_memmap(post_tmp, mode="w+", dtype=np.int32, shape=(n,))
        cursor = offsets[:-1].copy()
        for lo in range(0, n, _BLOCK):
            s = np.asarray(rows[field][lo : lo + _BLOCK]).astype(np.int64)
            s = np.where(s < 0, len(counts) - 1, s)
            order_b = np.argsort(s, kind="stable")
            ss = s[order_b]
            starts = np.flatnonzero(np.r_[True, ss[1:] != ss[:-1]])
            for a, z in zip(starts, np.r_[starts[1:], ss.size]):
                g = int(ss[a])
                c = int(cursor[g])
                post[c : c + (z - a)] = (order_b[a:z] + lo).astype(np.int32)
                cursor[g] = c + (z - a)
        p = write_small(path, MAGIC_POSTINGS, len(counts), 0)
        p.write(offsets.astype("<i8").tobytes())
        for lo in range(0, n, _BLOCK):
            p.write(np.ascontiguousarray(post[lo : lo + _BLOCK], "<i4"))
        p.close()
        del post
        os.remove(post_tmp)

    def close(self) -> None:
        self.rows = None  # type: ignore[assignment]
        self.scratch.unlink(missing_ok=True)
        self.scratch.with_name(self.scratch.name + ".postings").unlink(missing_ok=True)


class LabelFilter(NamedTuple):
    """Conditions on a node's labels (`labels.py`) for it to be returned; non-matching nodes
    are still traversed. Built by `label_filter`."""

    active: bool
    sub_mode: int  # 0: any subreddit, 1: one of sub_ids, 2: none of sub_ids
    sub_ids: np.ndarray  # (S,) int32 sorted subreddit ids
    month_lo: int  # inclusive month range (labels.month_of); unknown months are -1
    month_hi: int
    min_bucket: int  # lowest score bucket (labels.score_bucket)
    allow_nsfw: bool


MONTH_ANY = (-(2**15), 2**15 - 1)  # the month range of no time condition
NO_FILTER = LabelFilter(False, 0, np.zeros(0, np.int32), *MONTH_ANY, 0, True)



@dataclass
class NodeLabels:
    """An index's labels as search uses them: `rows` (N,) LABEL_DTYPE in RAM, the vocabulary
    and counts, and the postings (memory-mapped)."""

    rows: np.ndarray
    subreddits: dict[str, int]
    sub_counts: np.ndarray
    month_counts: np.ndarray
    bucket_counts: np.ndarray
    nsfw: int
    offsets: np.ndarray
    postings: np.ndarray
    month_offsets: np.ndarray
    month_postings: np.ndarray
    score_offsets: np.ndarray
    score_postings: np.ndarray

    @property
    def n(self) -> int:
        return int(self.rows.shape[0])

    def members(self, sub: int) -> np.ndarray:
        """Node ids (int32, ascending) of subreddit id `sub`."""
        return self.postings[int(self.offsets[sub]) : int(self.offsets[sub + 1])]

    def score_members(self, min_bucket: int) -> np.ndarray:
        """Node ids (int32) whose score bucket is `min_bucket` or higher."""
        b = max(0, min(int(min_bucket), self.bucket_counts.size))
        return self.score_postings[int(self.score_offsets[b]) : int(self.score_offsets[self.bucket_counts.size])]

    def month_members(self, lo: int, hi: int) -> np.ndarray:
        """Node ids (int32) of the months lo .. hi (inclusive, clipped to those recorded)."""
        last = self.month_offsets.shape[0] - 3  # the last recorded month (then: unknown)
        lo, hi = max(lo, 0), min(hi, last)
        if hi < lo:
            return self.month_postings[:0]
        return self.month_postings[int(self.month_offsets[lo]) : int(self.month_offsets[hi + 1])]

    def filter(self, allow_nsfw: bool = True, after: int | None = None, before: int | None = None,
               include: frozenset[str] | None = None, exclude: frozenset[str] | None = None,
               min_score: int | None = None) -> LabelFilter:
        """The `LabelFilter` of hard filters: subreddit names (lower case; unknown ones match
        nothing), unix-second bounds (after inclusive, before exclusive) and a minimum score.
        Times and scores are matched at label resolution (month, score bucket), a superset
        of the exact condition: check the exact values on the results."""
        if allow_nsfw and after is None and before is None and include is None and not exclude and min_score is None:
            return NO_FILTER
        lo = month_of(max(0, after)) if after is not None else -(2**15)
        hi = month_of(max(0, before - 1)) if before is not None else 2**15 - 1
        if before is not None and before <= 0:
            hi = -2  # nothing
        mode, names = (1, include) if include is not None else ((2, exclude) if exclude else (0, frozenset()))
        ids = np.array(sorted(self.subreddits[s] for s in names if s in self.subreddits), np.int32)
        bucket = score_bucket(min_score) if min_score is not None else 0
        return LabelFilter(True, mode, ids, max(lo, -(2**15)), min(hi, 2**15 - 1), bucket, bool(allow_nsfw))

    def selectivity(self, flt: LabelFilter) -> float:
        """Estimated share of nodes `flt` matches, from the label counts (the conditions taken
        as independent). 1.0 for no filter."""
        if not flt.active or self.n == 0:
            return 1.0
        share = 1.0
        if flt.sub_mode:
            hit = float(self.sub_counts[flt.sub_ids].sum()) / self.n
            share *= hit if flt.sub_mode == 1 else 1.0 - hit
        months = self.month_counts
        if flt.month_lo > -(2**15) or flt.month_hi < 2**15 - 1:
            lo, hi = max(flt.month_lo, 0), min(flt.month_hi, months.size - 1)
            share *= float(months[lo:hi + 1].sum()) / self.n if hi >= lo else 0.0
        if flt.min_bucket:
            share *= float(self.bucket_counts[flt.min_bucket:].sum()) / self.n
        if not flt.allow_nsfw:
            share *= 1.0 - self.nsfw / self.n
        return max(0.0, min(1.0, share))


def load_labels(index_dir: Path) -> NodeLabels:
    """Read an index folder's label files (`disk.IndexFormatError` when one is bad)."""
    from .disk import IndexFormatError, map_small_file, read_small_file

    payload, n, cols = read_small_file(index_dir / LABELS_FILE, MAGIC_LABELS)
    if cols != LABEL_DTYPE.itemsize or len(payload) != n * cols:
        raise IndexFormatError(index_dir / LABELS_FILE, f"holds {len(payload)} bytes for {n} x {cols}")
    rows = np.frombuffer(payload, LABEL_DTYPE)
    raw, _, _ = read_small_file(index_dir / VOCAB_FILE, MAGIC_VOCAB)
    try:
        v = msgpack.unpackb(raw, raw=False)
        names = list(v["subreddits"])
        sub_counts = np.asarray(v["sub_counts"], np.int64)
        month_counts = np.asarray(v["month_counts"], np.int64)
        bucket_counts = np.asarray(v["bucket_counts"], np.int64)
        nsfw = int(v["nsfw"])
    except (ValueError, KeyError, TypeError, msgpack.ExtraData, msgpack.FormatError) as e:
        raise IndexFormatError(index_dir / VOCAB_FILE, f"unreadable label vocabulary: {e}") from None
    def postings(name: str, want: int) -> tuple[np.ndarray, np.ndarray]:
        post, groups, _ = map_small_file(index_dir / name, MAGIC_POSTINGS)
        if groups != want or len(post) != 8 * (groups + 1) + 4 * n:
            raise IndexFormatError(index_dir / name, f"{groups} groups, {len(post)} bytes for {n} nodes")
        return post[: 8 * (groups + 1)].view("<i8"), post[8 * (groups + 1):].view("<i4")

    subs = postings(POSTINGS_FILE, len(names) + 1)
    months = postings(MONTH_POSTINGS_FILE, month_counts.size + 1)
    scores = postings(SCORE_POSTINGS_FILE, bucket_counts.size + 1)
    return NodeLabels(rows, {s: i for i, s in enumerate(names)}, sub_counts, month_counts, bucket_counts, nsfw,
                      *subs, *months, *scores)
