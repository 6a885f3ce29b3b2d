"""The sharded index build's steps as plain functions, each phase in its own folder of WORK.

`memescale.build.pipeline.build_from_shards` calls them in this order, the shard step as Ray
tasks. Each phase is a `fingerprint.Phase`: WORK/<phase>/ keyed by the fingerprint of what it
was made from, reused by a rerun only when that matches, else redone (with the phases after
it). Every step streams over N in blocks from disk: the driver's anonymous memory is a fixed
amount plus a few bytes per vector (each step's docstring says which).

    collect_corpus       embedding shards -> corpus/vectors.npy (N, d) fp16 + meta.parquet
    fit_weights          a sample of the metadata -> the Weighting (deterministic for a seed)
    write_index_vectors  vectors + metadata -> index_vectors/index_vectors.npy (N, d') fp16:
                         what the index stores (the embeddings + the weighting's columns)
    check_build_inputs   the index vectors and metadata (the check `build_index` runs too)
    partition_corpus     index vectors -> partition/partition/ (a DiskPartition: centroids,
                         member.npy (N, overlap), one sorted id file per shard)
    build_shard_graph    a shard's ids + vectors -> graphs/shard-XXXX.{neighbours,degrees}.npy
                         + shard-XXXX.json (checksums, medoid), one Ray task each
    merge_shards         the shard graphs -> graph/neighbours.npy (N, R) + degrees.npy
    refine_borders       the merged graph, refined in place around shard borders
    query_sample         post titles -> (nq, d') text queries for query-aware PQ
    train_pq_codes       index vectors (+ query sample) -> pq/codec.npz + codes.npy
    write_output         graph, codes, metadata (Parquet) -> OUT/ (index files + weighting.json)

Nothing here imports Ray.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np

from memescale.build.fingerprint import Phase
from memescale.config import ModelConfig
from memescale.index.build import IndexParams, check_build_inputs, train_codec, write_built_index
from memescale.index.disk import MetadataSource, WriteStats
from memescale.index.kernels import as_fp16, int8_scale, int8_stride, quantize_int8
from memescale.index.merge import border_nodes, merge_shard_files
from memescale.index.partition import (
    DiskPartition,
    Partition,
    assign_shards_to_disk,
    balanced_kmeans,
    cohesion,
    plain_kmeans_partition,
    single_shard_partition,
)
from memescale.index.pq import PQCodec
from memescale.index.vamana import (
    build_vamana,
    find_medoid,
    nav_dsub_for,
    navigation_codes,
    navigation_scratch_bytes,
    refine_graph,
)
from memescale.index.weighting import SOURCE_KEYS, Weighting, fit_weighting
from memescale.shards.corpus import Corpus, RowDicts, collect_corpus

__all__ = [
    "INDEX_VECTORS", "PARTITION", "PYTHON_OVERHEAD", "build_shard_graph", "check_build_inputs", "collect_corpus",
    "default_work_dir", "fit_weights", "gather_rows", "merge_shards", "partition_corpus", "partition_report",
    "query_sample", "refine_borders", "shard_files", "shard_is_built", "shard_medoid", "shard_memory_bytes",
    "train_codec", "train_pq_codes", "write_index_vectors", "write_output",
]

INDEX_VECTORS = "index_vectors.npy"
PARTITION = "partition"  # the DiskPartition folder inside the partition phase's folder
PYTHON_OVERHEAD = 256 * 2**20  # interpreter, numpy, numba, pyarrow and compiled kernels in a fresh worker
THREAD_SCRATCH = 4 * 2**20  # one graph-building thread's visited set and candidate lists
BLOCK_BYTES = 16 * 2**20  # float32 bytes of one block of a blockwise pass over N (`block_rows`)
PARTITION_SAMPLE = 32_768  # rows the centroids are trained on (at least 64 per shard)
WEIGHTING_SAMPLE = 200_000  # metadata rows the weighting's quantiles are fitted on


def block_rows(dim: int, budget: int = BLOCK_BYTES) -> int:
    """Rows of width `dim` one blockwise pass takes at a time: `budget` bytes of float32 rows
    (at least 1024), so that a pass's working set is independent of N."""
    return max(1024, budget // (4 * max(1, dim)))


def default_work_dir(out_dir: str | Path, work_dir: str | Path | None = None) -> Path:
    """`work_dir`, or OUT.work next to the output folder."""
    return Path(work_dir or Path(out_dir).with_name(Path(out_dir).name + ".work"))


def _signal_columns(corpus: Corpus, names: tuple[str, ...] | list[str] | None = None) -> list[str]:
    """The metadata columns the weighting's signals (`names`, default all) are read from."""
    have = set(corpus.schema.names)
    keys = [k for nm, ks in SOURCE_KEYS.items() if names is None or nm in names for k in ks]
    return [k for k in dict.fromkeys(keys) if k in have]


def fit_weights(corpus: Corpus, beta: float, seed: int) -> Weighting:
    """The weighting of the index vectors, fitted on up to WEIGHTING_SAMPLE rows of the
    corpus metadata drawn with `seed`; beta <= 0: no extra columns. Reads only the sampled
    rows' signal columns (`Corpus.rows`: the row groups holding them), as `RowDicts`.
    Time O(sample log sample), memory O(sample x 9 B per signal column + one row group)."""
    n, d = corpus.vectors.shape
    if beta <= 0:
        return Weighting(d, balance=False)
    rng = np.random.default_rng(seed)
    ids = np.sort(rng.choice(n, min(n, WEIGHTING_SAMPLE), replace=False))
    return fit_weighting(RowDicts(corpus.rows(ids, _signal_columns(corpus))), d, beta)


def write_index_vectors(corpus: Corpus, weighting: Weighting, phase: Phase, block: int | None = None) -> np.ndarray:
    """The corpus vectors with the weighting's columns appended, in the fingerprinted phase
    folder `phase` (normally ``Phase(WORK, "index_vectors", phase_fingerprint(corpus.fingerprint,
    weight_beta=beta, seed=seed))``, see `memescale.build.fingerprint`): (N, weighting.dim)
    float16 in phase.dir/INDEX_VECTORS. When `phase.is_complete()` the file is reused as it is
    (check that before calling to report the reuse); otherwise the folder is cleared, the file
    written and the phase finished. Returns it memory-mapped read-only.

    Blockwise over `corpus.metadata_batches(block)` (the signal columns only, read as
    `RowDicts`) zipped with the vector rows, `block` rows at a time (default: 4 MiB of
    float32 rows, at least 1024): time O(N d'), memory O(block d') independent of N."""
    path = phase.dir / INDEX_VECTORS
    if phase.is_complete():
        return np.load(path, mmap_mode="r")
    phase.start()
    n = len(corpus)
    block = block or max(1024, (4 << 20) // (4 * weighting.dim))
    out = np.lib.format.open_memmap(path, mode="w+", dtype=np.float16, shape=(n, weighting.dim))
    columns = _signal_columns(corpus, weighting.names)
    lo = 0
    if columns:
        for batch in corpus.metadata_batches(block, columns=columns):
            hi = lo + batch.num_rows
            out[lo:hi] = weighting.extend_base(corpus.vectors[lo:hi], RowDicts(batch))
            lo = hi
    else:  # no signal is read from the metadata: each row's is missing
        for lo in range(0, n, block):
            hi = min(n, lo + block)
            out[lo:hi] = weighting.extend_base(corpus.vectors[lo:hi], [{}] * (hi - lo))
        lo = n
    if lo != n:
        raise RuntimeError(f"the corpus metadata has {lo} rows for {n} vectors")
    out.flush()
    del out
    phase.finish(rows=n, dim=weighting.dim, weights=list(weighting.names))
    return np.load(path, mmap_mode="r")


def partition_corpus(vectors: np.ndarray, phase: Phase, shards: int, overlap: int, seed: int,
                     sample_size: int | None = None) -> DiskPartition:
    """Balanced partition of `vectors` (N, d) (a memmap) into `shards` shards, each vector in
    `overlap` of them, in the phase folder (phase.dir/partition: a `DiskPartition`; reused
    when the phase is complete). Centroids: `balanced_kmeans` on `sample_size` rows drawn with
    `seed` (default max(PARTITION_SAMPLE, 64 shards)); assignment: `assign_shards_to_disk`,
    streamed in `block_rows` blocks. One shard: every vector. Time O(N shards d); memory
    O(sample d + block (shards + d)), on disk N * overlap * 12 B."""
    folder = phase.dir / PARTITION
    if phase.is_complete():
        return DiskPartition.load(folder)
    phase.start()
    n, d = vectors.shape
    if shards <= 1:
        part = single_shard_partition(folder, n, d)
    else:
        rng = np.random.default_rng(seed)
        size = min(n, sample_size or max(PARTITION_SAMPLE, 64 * shards))
        sample = np.asarray(vectors[np.sort(rng.choice(n, size, replace=False))])
        centroids = balanced_kmeans(sample, shards, seed=seed)
        part = assign_shards_to_disk(vectors, centroids, folder, overlap=overlap, sample=sample, seed=seed,
                                     block=block_rows(d + shards))
    phase.finish(shards=part.k, sizes=part.sizes().tolist())
    return part


def partition_report(vectors: np.ndarray, part: DiskPartition, seed: int) -> dict:
    """Shard sizes and cohesion of the balanced partition next to plain k-means (on a
    sample of up to 50,000 vectors drawn with `seed`; memberships read from `part.member`);
    with one shard, its size only."""
    if part.k <= 1:
        return {"shards": 1, "sizes": part.sizes().tolist()}
    rng = np.random.default_rng(seed)
    n = len(vectors)
    idx = np.sort(rng.choice(n, min(n, 50_000), replace=False))
    x = np.asarray(vectors[idx], dtype=np.float32)
    member = np.asarray(part.member[idx])
    sub = Partition(np.asarray(part.centroids), [np.flatnonzero((member == s).any(axis=1)) for s in range(part.k)])
    plain = plain_kmeans_partition(x, part.k, overlap=part.overlap, seed=seed)
    return {"shards": part.k, "sizes": part.sizes().tolist(),
            "cohesion_balanced": round(cohesion(x, sub), 4),
            "plain_kmeans_sizes_on_sample": plain.sizes().tolist(),
            "cohesion_plain_kmeans": round(cohesion(x, plain), 4)}


def shard_files(graphs: str | Path, shard: int) -> dict[str, Path]:
    """Shard `shard`'s graph in the folder `graphs`: `neighbours` (n, R) int32 local ids
    padded with -1 and `degrees` (n,) int32 (.npy, memory-mappable), and `done` (JSON: its
    size, the global id of its medoid and the sha256 of both arrays, written last)."""
    stem = Path(graphs) / f"shard-{shard:04d}"
    return {"neighbours": stem.with_suffix(".neighbours.npy"), "degrees": stem.with_suffix(".degrees.npy"),
            "done": stem.with_suffix(".json")}


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def shard_is_built(graphs: str | Path, shard: int) -> bool:
    """A shard graph is reused only when both arrays match the checksums written after them."""
    files = shard_files(graphs, shard)
    try:
        done = json.loads(files["done"].read_text())
        return all(done["sha256"][k] == _sha256(files[k]) for k in ("neighbours", "degrees"))
    except (OSError, ValueError, KeyError, TypeError):
        return False


def shard_medoid(graphs: str | Path, shard: int) -> int:
    """The global id of a built shard graph's medoid (an entry point of the merged graph)."""
    return int(json.loads(shard_files(graphs, shard)["done"].read_text())["medoid"])


def shard_memory_bytes(n: int, d: int, R: int, threads: int, slack: float = 1.3, build_pq_bytes: int = 0) -> int:
    """What `build_shard_graph` declares for a shard of `n` vectors of width `d`: the int8
    vectors, their ids and norms, the navigation codes and their training's scratch (with
    build_pq_bytes > 0), the graph while building (ceil(slack R) per node) and its output (R
    per node), each thread's visited set, candidate lists and ADC table, and the interpreter,
    with a quarter on top for allocator slack."""
    dsub = nav_dsub_for(d, build_pq_bytes)
    codes = -(-d // dsub) if dsub else 0
    per_node = d + 8 + 4 + codes + int(np.ceil(slack * R)) * 4 + R * 4 + 16
    scratch = threads * THREAD_SCRATCH + (navigation_scratch_bytes(d, dsub) if dsub else 0)
    return int(1.25 * (n * per_node + scratch)) + PYTHON_OVERHEAD


GATHER_SPAN_BYTES = 16 << 20  # the most file bytes `gather_rows` reads at once


def gather_rows(npy_path: str | Path, ids: np.ndarray, block: int = 4096, int8_scale: float | None = None,
                span_bytes: int = GATHER_SPAN_BYTES) -> np.ndarray:
    """Rows `ids` (sorted int64) of a 2-D .npy file, read with plain reads of at most `block`
    rows kept and `span_bytes` of file spanned each (a block ends early where its ids spread
    too far: sparse ids, such as a strided sample, are read a few rows at a time); with
    `int8_scale`, returned as `kernels.quantize_int8(rows, int8_scale)` (int8), each block
    quantized as it is read.

    Unlike fancy-indexing a memmap, this leaves no file pages mapped into the process, so
    the caller's RSS is the rows it keeps plus at most `span_bytes`. O(bytes spanned by ids)
    read, in O(len(ids) / block + bytes spanned / span_bytes + gaps) reads."""
    with open(npy_path, "rb") as f:
        major, _ = np.lib.format.read_magic(f)
        read_header = np.lib.format.read_array_header_1_0 if major == 1 else np.lib.format.read_array_header_2_0
        shape, _, dtype = read_header(f)
        start, width = f.tell(), shape[1]
        row_bytes = width * dtype.itemsize
        max_rows = max(1, span_bytes // row_bytes)  # rows one read may span
        out = np.empty((len(ids), width), dtype if int8_scale is None else np.int8)
        lo = 0
        while lo < len(ids):
            first = int(ids[lo])
            hi = min(len(ids), lo + block)
            hi = lo + max(1, int(np.searchsorted(ids[lo:hi], first + max_rows, side="left")))
            part = ids[lo:hi]
            f.seek(start + first * row_bytes)
            span = np.fromfile(f, dtype, count=(int(part[-1]) - first + 1) * width).reshape(-1, width)
            if int8_scale is None:
                out[lo:hi] = span[part - first]
            else:
                quantize_int8(span[part - first], int8_scale, out=out[lo:hi])
            lo = hi
    return out


def _save_npy(path: Path, array: np.ndarray) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        np.save(f, array)
    os.replace(tmp, path)


def build_shard_graph(graphs: str | Path, partition: str | Path, vectors_path: str | Path, shard: int, R: int,
                      L: int, alpha: float, seed: int, threads: int, build_pq_bytes: int = 0) -> int:
    """Build shard `shard`'s Vamana graph (seed + shard) over its rows of the .npy at
    `vectors_path`, as listed in the DiskPartition folder `partition`; write its
    `shard_files` in the folder `graphs` (the JSON with the checksums last). Returns the
    shard's size n. The graph is built over the rows quantized to int8 (`quantize_int8`, one
    scale from a sample of the shard): half the bytes of fp16 per distance, and distance
    evaluation is bound by fetching rows. build_pq_bytes > 0: the construction searches rank
    by navigation codes of that many bytes per row (`nav_dsub_for`; shards under 256 rows
    rank exactly). Memory: `shard_memory_bytes`."""
    files = shard_files(graphs, shard)
    ids = np.array(DiskPartition.load(partition).shard_ids(shard), np.int64)
    sample = gather_rows(vectors_path, ids[::int8_stride(len(ids))])
    X = gather_rows(vectors_path, ids, int8_scale=int8_scale(sample))
    del sample
    nav_dsub = nav_dsub_for(X.shape[1], build_pq_bytes, len(ids))
    nbrs, deg, medoid = build_vamana(X, R, L, alpha, seed + shard, threads=threads, progress=False, nav_dsub=nav_dsub)
    del X
    _save_npy(files["neighbours"], nbrs)
    _save_npy(files["degrees"], deg)
    done = {"size": len(ids), "medoid": int(ids[medoid]),
            "sha256": {k: _sha256(files[k]) for k in ("neighbours", "degrees")}}
    tmp = files["done"].with_suffix(".tmp")
    tmp.write_text(json.dumps(done))
    os.replace(tmp, files["done"])
    return len(ids)


def graph_navigation_codes(vectors: np.ndarray, build_pq_bytes: int, seed: int, path: str | Path,
                           threads: int | None = None) -> tuple[np.ndarray, ...] | None:
    """`vamana.navigation_codes` of all the (index) vectors, about `build_pq_bytes` bytes per
    row, the codes memory-mapped at `path`, for the refinement's searches to rank by: in RAM
    or the page cache they stand in for most of the rows a search would read at random.
    None for build_pq_bytes <= 0 (the searches read the rows). Memory: the codes' file +
    `navigation_scratch_bytes`."""
    dsub = nav_dsub_for(vectors.shape[1], build_pq_bytes, len(vectors))
    if not dsub:
        return None
    X = as_fp16(vectors).view(np.uint16)
    out = np.lib.format.open_memmap(path, mode="w+", dtype=np.uint8, shape=(len(X), -(-X.shape[1] // dsub)))
    return navigation_codes(X, dsub, seed, threads, out=out)


def merge_shards(graphs: str | Path, vectors: np.ndarray, part: DiskPartition, R: int, alpha: float,
                 out: str | Path, threads: int | None = None,
                 mode: str = "prune") -> tuple[np.memmap, np.memmap, np.ndarray]:
    """Every shard graph in `graphs` merged over global ids to R per node, re-pruned or
    interleaved (`mode`; `merge.merge_shard_files`, blockwise over node ids, the shard lists
    memory-mapped) into
    the folder `out`: neighbours.npy (N, R) int32 padded with -1 and degrees.npy (N,) int32.

    Returns (neighbours, degrees) as writable memmaps and the entry points: each shard's
    medoid, (shards,) int64. Memory O(block overlap R) + 4 B per vector (norms)."""
    out = Path(out)
    n = len(vectors)
    neighbours = np.lib.format.open_memmap(out / "neighbours.npy", mode="w+", dtype=np.int32, shape=(n, R))
    degrees = np.lib.format.open_memmap(out / "degrees.npy", mode="w+", dtype=np.int32, shape=(n,))
    shards = []
    for s in range(part.k):
        files = shard_files(graphs, s)
        shards.append((part.shard_ids(s), np.load(files["neighbours"], mmap_mode="r"),
                       np.load(files["degrees"], mmap_mode="r")))
    merge_shard_files(vectors, part.member, shards, R, alpha, neighbours, degrees, threads=threads, mode=mode)
    entry = np.array([shard_medoid(graphs, s) for s in range(part.k)], np.int64)
    return neighbours, degrees, entry


def refine_borders(vectors: np.ndarray, graph: tuple[np.ndarray, np.ndarray], part: DiskPartition, refine_L: int,
                   fraction: float, alpha: float, seed: int, scratch: str | Path,
                   threads: int | None = None, nav: tuple[np.ndarray, ...] | None = None) -> tuple[int, int, float]:
    """One more Vamana pass (`vamana.refine_graph`, search list size `refine_L`, from the
    medoid of all vectors) over the `fraction` of nodes nearest a shard border
    (`merge.border_nodes` from `part.member`): they gain the cross-shard edges no shard graph
    had. `graph` (neighbours, degrees: int32 memmaps) is updated in place; the pass's working
    graph is the file `scratch` (deleted after). nav: `graph_navigation_codes` for the
    searches to rank by, as the shard graphs' construction does: a search reads the rows of
    the nodes it expands, not of every neighbour it scores. No pass with one shard,
    refine_L <= 0 or fraction <= 0. Memory: 8 B per vector + 16 B per refined node besides memmaps.

    Returns (nodes refined, refine_L, fraction) as applied: (0, 0, 0.0) without a pass."""
    if part.k <= 1 or refine_L <= 0 or fraction <= 0:
        return 0, 0, 0.0
    neighbours, degrees = graph
    block = block_rows(vectors.shape[1] + part.k)
    points = border_nodes(vectors, np.asarray(part.centroids), part.member, fraction, block=block)
    start = find_medoid(vectors, block=block_rows(2 * vectors.shape[1]))  # float64 rows
    refine_graph(vectors, neighbours, degrees, start, refine_L, alpha, seed=seed, threads=threads,
                 overwrite=True, points=points, work_graph=scratch, block=block, nav=nav)
    return len(points), refine_L, fraction


def query_sample(model: ModelConfig, corpus: Corpus, weighting: Weighting, n: int = 2000,
                 seed: int = 0) -> np.ndarray | None:
    """The encoder's text tower over up to `n` post titles drawn with `seed`, extended to the
    index width with zero weights: the (nq, weighting.dim) float32 queries query-aware PQ
    trains for. Reads only the titles of 2n rows drawn at random (`Corpus.column` with ids)
    and keeps the first n non-empty ones; while fewer remain, draws 4x as many again, up to
    32n rows (fewer titles when even those have too few). Memory O(n + one row group).
    None when no drawn row has a title. Raises ValueError when the model's text
    width is not the embeddings' (the index was ingested with another model)."""
    from memescale.embed.encoder import ImageTextEncoder

    rows = len(corpus)
    if rows == 0 or "title" not in corpus.schema.names:
        return None
    rng = np.random.default_rng(seed)
    draw = 2 * n  # x2: room for the empty titles dropped; x4 more while too few remain
    while True:
        ids = rng.choice(rows, min(rows, draw), replace=False)
        pick = [t for t in corpus.column("title", ids).to_pylist() if t][:n]
        if len(pick) >= n or draw >= rows or draw >= 32 * n:
            break
        draw *= 4
    if not pick:
        return None
    enc = ImageTextEncoder(model)
    queries = np.concatenate([enc.encode_texts(pick[i:i + 256]) for i in range(0, len(pick), 256)])
    if queries.shape[1] != weighting.base_dim:
        raise ValueError(f"the config's model {model.name} encodes {queries.shape[1]}-d texts but the "
                         f"embeddings are {weighting.base_dim}-d: build with the ingest's model config")
    return weighting.extend_queries(queries)


def train_pq_codes(vectors: np.ndarray, params: IndexParams, phase: Phase) -> tuple[PQCodec, np.ndarray]:
    """PQ codec and codes of `vectors` (`index.build.train_codec`: trained on a sample,
    encoded blockwise) in the phase folder: codec.npz and codes.npy (N, M) uint8, returned
    memory-mapped; reused when the phase is complete. Memory O(train d) besides memmaps."""
    if phase.is_complete():
        return PQCodec.load(phase.dir / "codec.npz"), np.load(phase.dir / "codes.npy", mmap_mode="r")
    phase.start()
    codec, codes = train_codec(vectors, params, codes_path=phase.dir / "codes.npy")
    codec.save(phase.dir / "codec.npz")
    phase.finish(M=codec.M, eta=codec.eta)
    return codec, codes


def write_output(out_dir: str | Path, vectors: np.ndarray, graph: tuple[np.ndarray, np.ndarray], codec: PQCodec,
                 codes: np.ndarray, metadata: MetadataSource, entry_points: np.ndarray, params: IndexParams,
                 weighting: Weighting, **info) -> WriteStats:
    """The index folder OUT (`write_built_index`: every input streamed in blocks, `metadata`
    e.g. the corpus's Parquet path; `info` appended to the build information) and
    OUT/weighting.json."""
    ws = write_built_index(out_dir, vectors, graph, codec, codes, metadata, entry_points, params, **info)
    weighting.save(out_dir)
    return ws
