"""Disk format: round trips, metadata budget and spill, corruption and version checks, the
streaming writer (same bytes from every metadata source, bounded memory)."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import zlib

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from memescale.index import Index, IndexFormatError, IndexParams, build_index, train_pq, write_index
from memescale.index.disk import (
    ARRAYS_FILE,
    CODES_FILE,
    FORMAT_VERSION,
    INDEX_FILES,
    OVERFLOW_FILE,
    RECORDS_FILE,
    SECTOR,
    RecordLayout,
)


def unit_vectors(n: int, d: int, seed: int = 0) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def small_params(**kw) -> IndexParams:
    base = dict(R=12, L=24, alpha=1.2, pq_bytes=8, seed=1, threads=2, opq_iters=2, pq_train_size=2000, progress=False)
    base.update(kw)
    return IndexParams(**base)


def metadata_for(n: int) -> list[dict]:
    meta = [{"url": f"https://i.redd.it/{i:08x}.jpg", "title": f"póst {i} 🐍" * (1 + i % 3), "score": i - 50,
             "nsfw": i % 7 == 0, "tags": ["a", "b"][: i % 3], "t": 1.5 * i} for i in range(n)]
    meta[3] = {}
    meta[5] = {"title": "x" * 20000, "nested": {"k": [1, 2, {"z": None}]}}  # far above the budget: spilled
    meta[8] = {"blob": b"\x00\x01\xff"}
    return meta


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    out = tmp_path_factory.mktemp("idx")
    X = unit_vectors(400, 32)
    meta = metadata_for(400)
    stats = build_index(X, meta, out, small_params())
    return out, X, meta, stats


def test_vectors_and_metadata_round_trip(built):
    out, X, meta, stats = built
    assert stats.count == 400 and stats.meta_spilled == 1
    with Index.open(out, threads=1) as index:
        assert len(index) == 400 and index.dim == 32
        ids = np.array([0, 5, 399, 3, 8, 5])
        np.testing.assert_array_equal(index.vectors(ids), X[ids].astype(np.float16))
        assert index.vectors(ids).dtype == np.float16
        assert index.metadata(ids) == [meta[i] for i in ids]
        assert index.metadata(range(400)) == meta
        with pytest.raises(IndexError):
            index.metadata([400])
        index.verify()


def test_layout_packs_sectors_and_never_straddles():
    for dim, R, sizes in [(384, 64, np.full(1000, 200)), (32, 12, np.zeros(10)), (384, 64, np.full(10, 5000)),
                          (3000, 64, np.full(10, 100))]:
        lay = RecordLayout.plan(dim, R, 1000, sizes)
        assert lay.record_size % 8 == 0 and lay.meta_budget >= 8
        if lay.sectors_per_node == 1:
            assert lay.nodes_per_sector * lay.record_size <= SECTOR
            offs = np.array([lay.offset(i) for i in range(1000)])
            assert (offs // SECTOR == (offs + lay.record_size - 1) // SECTOR).all()
        else:
            assert lay.record_size == lay.sectors_per_node * SECTOR
        assert lay.meta_budget >= min(int(sizes.max()), SECTOR - lay.meta_off - 4) or lay.sectors_per_node > 1


def test_budget_spills_only_the_tail():
    sizes = np.concatenate([np.full(9995, 150), np.full(5, 3000)])
    lay = RecordLayout.plan(384, 64, 10000, sizes)
    assert 150 <= lay.meta_budget < 3000 and lay.nodes_per_sector == 3


def copy_index(src, dst):
    dst.mkdir()
    for name in INDEX_FILES:
        (dst / name).write_bytes((src / name).read_bytes())
    return dst


def flip(path, offset):
    raw = bytearray(path.read_bytes())
    raw[offset] ^= 0x40
    path.write_bytes(bytes(raw))


@pytest.mark.parametrize("name", INDEX_FILES)
def test_truncated_file_is_rejected(built, tmp_path, name):
    d = copy_index(built[0], tmp_path / "t")
    raw = (d / name).read_bytes()
    (d / name).write_bytes(raw[: max(10, len(raw) - 100)])
    with pytest.raises(IndexFormatError, match=name) as e:
        Index.open(d)
    assert "truncated" in str(e.value) or "size mismatch" in str(e.value)


@pytest.mark.parametrize("name, offset", [(RECORDS_FILE, 20), (CODES_FILE, 12), (ARRAYS_FILE, 24), (OVERFLOW_FILE, 16)])
def test_flipped_header_byte_is_rejected(built, tmp_path, name, offset):
    d = copy_index(built[0], tmp_path / "h")
    flip(d / name, offset)
    with pytest.raises(IndexFormatError, match=f"{name}.*header checksum"):
        Index.open(d)


@pytest.mark.parametrize("name", [CODES_FILE, ARRAYS_FILE, OVERFLOW_FILE])
def test_flipped_payload_byte_is_rejected_on_open(built, tmp_path, name):
    d = copy_index(built[0], tmp_path / "p")
    flip(d / name, (d / name).stat().st_size - 3)
    with pytest.raises(IndexFormatError, match=f"{name}.*payload checksum"):
        Index.open(d)


def test_corrupt_record_is_found_by_verify(built, tmp_path):
    d = copy_index(built[0], tmp_path / "r")
    flip(d / RECORDS_FILE, SECTOR + 100)
    with Index.open(d, threads=1) as index:  # open checks the header and size only
        with pytest.raises(IndexFormatError, match=f"{RECORDS_FILE}.*record checksum"):
            index.verify()


def rewrite_version(path, header_len, version):
    """Set the version field and recompute the header CRC, as a future writer would."""
    raw = bytearray(path.read_bytes())
    raw[8:12] = struct.pack("<I", version)
    raw[header_len - 4 : header_len] = struct.pack("<I", zlib.crc32(bytes(raw[: header_len - 4])))
    path.write_bytes(bytes(raw))


@pytest.mark.parametrize("name, header_len", [(RECORDS_FILE, 88), (CODES_FILE, 48), (ARRAYS_FILE, 48)])
def test_wrong_version_is_rejected(built, tmp_path, name, header_len):
    d = copy_index(built[0], tmp_path / "v")
    rewrite_version(d / name, header_len, FORMAT_VERSION + 1)
    with pytest.raises(IndexFormatError, match=f"{name}.*unsupported format version {FORMAT_VERSION + 1}"):
        Index.open(d)


def test_missing_file_and_wrong_kind(built, tmp_path):
    d = copy_index(built[0], tmp_path / "m")
    (d / CODES_FILE).unlink()
    with pytest.raises(IndexFormatError, match=f"{CODES_FILE}.*missing"):
        Index.open(d)
    (d / CODES_FILE).write_bytes((d / ARRAYS_FILE).read_bytes())
    with pytest.raises(IndexFormatError, match=f"{CODES_FILE}.*bad magic"):
        Index.open(d)


def test_build_is_byte_identical_for_a_seed(tmp_path):
    X = unit_vectors(700, 16, seed=4)
    meta = metadata_for(700)
    build_index(X, meta, tmp_path / "a", small_params(threads=2))
    build_index(X, meta, tmp_path / "b", small_params(threads=1))
    for name in INDEX_FILES:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
    build_index(X, meta, tmp_path / "c", small_params(seed=2))
    assert (tmp_path / "a" / RECORDS_FILE).read_bytes() != (tmp_path / "c" / RECORDS_FILE).read_bytes()


def test_corrupt_neighbour_id_is_skipped_and_counted(built, tmp_path):
    d = copy_index(built[0], tmp_path / "n")
    with Index.open(d, threads=1, cache_nodes=0) as index:
        lay = index.layout
        entry = int(index.entry_points[0])
        want, _, _ = index.search(np.ones((2, 32), np.float32), 5, L=20)
    raw = bytearray((d / RECORDS_FILE).read_bytes())
    at = int(lay.offset(entry)) + lay.nbr_off
    raw[at : at + 4] = struct.pack("<i", 10**9)
    (d / RECORDS_FILE).write_bytes(bytes(raw))
    for cache in (0, 10):  # read from disk, or met while choosing the cached records
        with Index.open(d, threads=1, cache_nodes=cache) as index:
            assert entry not in index._cache_ids
            ids, scores, st = index.search(np.ones((2, 32), np.float32), 5, L=20)
            assert st.corrupt.tolist() == [1, 1] and st.summary()["corrupt_records"] == 2
            assert entry not in ids and (ids >= 0).all()
            assert len(set(ids[0].tolist()) & set(want[0].tolist())) >= 3  # the rest of its list still routes
            with pytest.raises(IndexFormatError, match=f"node {entry}: record checksum mismatch"):
                index.metadata([entry])
            with pytest.raises(IndexFormatError, match=f"node {entry}: record checksum mismatch"):
                index.vectors([entry])


@pytest.mark.parametrize("io", ["mmap", "direct"])
def test_flipped_bits_never_return_a_wrong_score_or_metadata(built, tmp_path, io):
    """Bits flipped at random offsets of records.bin: every result still has its true score
    and metadata; a damaged record that would have been a result is dropped and counted."""
    out, X, meta, _ = built
    d = copy_index(out, tmp_path / "flip")
    with Index.open(d, threads=1) as index:
        lay = index.layout
    rng = np.random.default_rng(7)
    raw = bytearray((d / RECORDS_FILE).read_bytes())
    starts = lay.offset(np.arange(len(X)))
    flipped = set()
    while len(flipped) < 25:
        at = int(rng.integers(lay.sector, len(raw)))
        node = int(np.searchsorted(starts, at, side="right") - 1)
        if at >= starts[node] + lay.record_size or node in flipped:
            continue  # sector padding outside every record, or a node already hit
        raw[at] ^= 1 << int(rng.integers(8))
        flipped.add(node)
    (d / RECORDS_FILE).write_bytes(bytes(raw))
    X16 = X.astype(np.float16).astype(np.float32)
    queries = np.concatenate([X[sorted(flipped)], unit_vectors(30, 32, seed=9)])
    try:
        index = Index.open(d, threads=2, io=io)
    except Exception as e:  # noqa: BLE001 - the platform cannot read directly
        pytest.skip(f"direct I/O unavailable here: {e}")
    with index:
        ids, scores, st = index.search(queries, 10, L=60)
        got = ids[ids >= 0]
        assert not set(got.tolist()) & flipped
        np.testing.assert_allclose(scores[ids >= 0], np.einsum("ij,ij->i", X16[got], np.repeat(
            queries, 10, axis=0)[(ids >= 0).ravel()]), rtol=1e-4, atol=1e-4)
        assert index.metadata(np.unique(got)) == [meta[i] for i in np.unique(got)]
        # each flipped node, queried with its own vector, was its own best match: dropped and counted
        assert (st.corrupt[: len(flipped)] >= 1).all()
        assert (ids[: len(flipped), 0] != np.array(sorted(flipped))).all()
        assert (ids >= 0).sum(axis=1).min() >= 9  # the places are refilled from the rest
        sound = index.records_ok(np.arange(len(X)))
        assert set(np.flatnonzero(~sound).tolist()) == flipped


def test_params_from_project_config():
    from memescale.config import IndexConfig

    p = IndexParams.from_config(IndexConfig(R=16, L=40, alpha=1.3, pq_bytes=12, seed=7), threads=1)
    assert (p.R, p.L, p.alpha, p.pq_bytes, p.seed, p.threads, p.queries) == (16, 40, 1.3, 12, 7, 1, None)


# ---------------------------------------------------------------------------- streaming writer


def random_parts(n: int, d: int, R: int, M: int, seed: int = 0):
    """Vectors, a random graph with valid ids, and a small PQ codec with its codes."""
    rng = np.random.default_rng(seed)
    X = unit_vectors(n, d, seed)
    neighbours = rng.integers(0, n, (n, R)).astype(np.int32)
    degrees = rng.integers(1, R + 1, n).astype(np.int32)
    codec = train_pq(X[:1000], M, opq_iters=0, kmeans_iters=2, train_size=1000, seed=seed, threads=1, progress=False)
    return X, (neighbours, degrees), codec, codec.encode(X, threads=1)


def meta_table(n: int) -> pa.Table:
    rows = [{"url": f"https://i.redd.it/{i:08x}.jpg", "title": f"póst {i} 🐍" * (1 + i % 3) if i % 9 else None,
             "score": i - 50, "over_18": i % 7 == 0, "tags": ["a", "b"][: i % 3], "t": 1.5 * i} for i in range(n)]
    rows[17]["title"] = "x" * 5000  # above the 99.9th percentile: spilled (two of them from 3000 rows)
    rows[-5]["title"] = "y" * 2000
    return pa.Table.from_pylist(rows)


def test_streamed_metadata_sources_write_identical_files(tmp_path):
    n = 3000
    X, graph, codec, codes = random_parts(n, 8, 4, 4)
    table = meta_table(n)
    pq.write_table(table, tmp_path / "meta.parquet", row_group_size=300)
    dicts = table.to_pylist()
    entry = np.array([0, 1])

    def batches():  # blocks of odd sizes, an empty one, then the rest as a Table
        whole = table.combine_chunks().to_batches()[0]
        lo = 0
        for k in [7, 1, 0, 13, 58, 401]:
            yield whole.slice(lo, k)
            lo += k
        yield table.slice(lo)

    block = 2 * SECTOR  # records assembled 2 sectors at a time: chunk edges cut across metadata blocks
    ref = write_index(tmp_path / "list", X, graph, codec, codes, dicts, entry, {"k": 1})
    assert ref.nodes_per_sector > 1 and ref.meta_spilled == 2
    assert 7 % ref.nodes_per_sector and (2 * ref.nodes_per_sector) % 401
    for name, source in [("parquet", tmp_path / "meta.parquet"), ("batches", batches()), ("table", table),
                         ("list_blocks", dicts)]:
        stats = write_index(tmp_path / name, X, graph, codec, codes, source, entry, {"k": 1}, block_bytes=block)
        assert stats == ref
        for f in INDEX_FILES:
            assert (tmp_path / name / f).read_bytes() == (tmp_path / "list" / f).read_bytes(), (name, f)
        assert sorted(p.name for p in (tmp_path / name).iterdir()) == sorted(INDEX_FILES)
    with Index.open(tmp_path / "parquet", threads=1) as index:
        assert index.metadata(range(n)) == dicts
        index.verify()


def test_streamed_metadata_must_match_the_node_count(tmp_path):
    X, graph, codec, codes = random_parts(300, 8, 4, 4)
    table = meta_table(300)
    entry = np.array([0])
    for bad in [table.slice(0, 299), iter([table, table.slice(0, 1)])]:
        with pytest.raises(ValueError, match="metadata has .* entries for 300 vectors"):
            write_index(tmp_path / "x", X, graph, codec, codes, bad, entry)
    with pytest.raises(TypeError, match="RecordBatches or Tables"):
        write_index(tmp_path / "x", X, graph, codec, codes, iter(table.to_pylist()), entry)
    assert not list((tmp_path / "x").iterdir())  # nothing half-written is left behind


MEMORY_CHILD = r"""
import json, sys
import numpy as np
import pyarrow.parquet as pq
from memescale.index import PQCodec, write_index
from memescale.memwatch import PeakRssAnon

work = sys.argv[1]
X = np.load(work + "/vectors.npy", mmap_mode="r")
nb = np.load(work + "/neighbours.npy", mmap_mode="r")
deg = np.load(work + "/degrees.npy", mmap_mode="r")
codes = np.load(work + "/codes.npy", mmap_mode="r")
codec = PQCodec.from_arrays(dict(np.load(work + "/codec.npz")))
# warm-up on 100 nodes: the kernels and Arrow's compute functions (tens of MiB on first use)
# are a fixed cost once per process, as in a build's driver
small = next(pq.ParquetFile(work + "/meta.parquet").iter_batches(batch_size=100))
write_index(work + "/small", X[:100], (np.minimum(nb[:100], 99), deg[:100]), codec, codes[:100], small, np.array([0]))
del small
with PeakRssAnon(interval_s=0.002) as peak:
    stats = write_index(work + "/index", X, (nb, deg), codec, codes, work + "/meta.parquet", np.array([0]))
print(json.dumps({"growth": peak.growth_bytes, "spilled": stats.meta_spilled}))
"""


def test_writer_memory_is_bounded_with_memmapped_inputs(tmp_path):
    """RssAnon growth while writing N nodes from memmaps and a Parquet file stays within a
    fixed amount plus 24 bytes per node (one dict or blob per node would exceed it)."""
    n, d, R, M = 300_000, 8, 4, 4
    rng = np.random.default_rng(0)
    X = np.lib.format.open_memmap(tmp_path / "vectors.npy", "w+", np.float16, (n, d))
    X[:] = rng.standard_normal((n, d))
    np.save(tmp_path / "neighbours.npy", rng.integers(0, n, (n, R), dtype=np.int32))
    np.save(tmp_path / "degrees.npy", rng.integers(1, R + 1, n, dtype=np.int32))
    np.save(tmp_path / "codes.npy", rng.integers(0, 256, (n, M), dtype=np.uint8))
    codec = train_pq(np.asarray(X[:1000], np.float32), M, opq_iters=0, kmeans_iters=1, train_size=1000, threads=1,
                     progress=False)
    np.savez(tmp_path / "codec.npz", **codec.to_arrays())
    ids = np.arange(n)
    title = np.char.add("a meme title number ", ids.astype(str)).astype(object)
    title[[5, 77]] = "z" * 3000
    meta = pa.table({"image_id": ids, "url": np.char.add("https://i.redd.it/", ids.astype(str)),
                     "title": title, "subreddit": np.array(["memes", "dankmemes", "me_irl"])[ids % 3],
                     "score": ids % 1000, "created_utc": 1_600_000_000 + ids, "over_18": ids % 11 == 0})
    pq.write_table(meta, tmp_path / "meta.parquet", row_group_size=65536)
    del X, meta, title

    # Arrow's default pool (mimalloc) keeps tens of MiB of freed Parquet decode buffers
    # mapped; the system pool returns them, so the growth measured is what the writer holds.
    env = {**os.environ, "ARROW_DEFAULT_MEMORY_POOL": "system"}
    out = subprocess.run([sys.executable, "-c", MEMORY_CHILD, str(tmp_path)], capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stderr
    res = json.loads(out.stdout.strip().splitlines()[-1])
    assert res["spilled"] == 2
    assert res["growth"] < (64 << 20) + 24 * n, res
    with Index.open(tmp_path / "index", threads=1, cache_nodes=0) as index:
        assert len(index) == n
        got = index.metadata([0, 5, n - 1])
    want = pq.read_table(tmp_path / "meta.parquet").take([0, 5, n - 1]).to_pylist()
    assert got == want


def test_a_built_index_is_fsynced_before_build_returns(tmp_path, monkeypatch):
    """Every file of the index and then its folder are fsync'd before `build_index` returns."""
    import memescale.durable as durable

    synced: list[str] = []
    real_file, real_dir = durable.fsync_file, durable.fsync_dir
    monkeypatch.setattr(durable, "fsync_file", lambda p: (synced.append(os.path.basename(p)), real_file(p)))
    monkeypatch.setattr(durable, "fsync_dir", lambda p: (synced.append(f"dir:{os.path.basename(p)}"), real_dir(p)))
    out = tmp_path / "idx"
    build_index(unit_vectors(300, 16), metadata_for(300), out, small_params())
    files = sorted(p.name for p in out.iterdir() if p.is_file())
    assert RECORDS_FILE in files and CODES_FILE in files
    assert sorted(synced[:-1]) == files and synced[-1] == "dir:idx"


def test_image_ids_read_column_wise_equal_the_row_by_row_ids():
    import pyarrow as pa

    from memescale.index.disk import _batch_image_ids, _image_id

    for col in (pa.array([5, None, -1, 0, 2**63 - 1], pa.int64()),
                pa.array([5, None, 2**63, 2**64 - 1, 0], pa.uint64()),
                pa.array(["5", None, "x", "1", ""], pa.string()),
                pa.array([1.0, None, 2.0, 3.5, 0.0], pa.float64()),
                pa.array([1, None, 2**62, 1, -3], pa.int64()).dictionary_encode()):
        batch = pa.RecordBatch.from_pydict({"image_id": col})
        want = np.array([_image_id(m) for m in batch.to_pylist()], np.int64)
        np.testing.assert_array_equal(_batch_image_ids(batch), want, err_msg=str(col.type))
