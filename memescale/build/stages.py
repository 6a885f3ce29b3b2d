"""The sharded index build's steps as plain functions over a work directory WORK.

`memescale.build.pipeline.build_from_shards` calls them in this order, the shard step as Ray
tasks; each names what it reads and writes:

    collect_corpus       embedding shards -> WORK/vectors.npy (N, d) fp16 + WORK/meta.parquet
    fit_weights          a sample of the metadata -> the Weighting (deterministic for a seed)
    write_index_vectors  vectors + metadata -> WORK/index_vectors.npy (N, d') fp16: what the
                         index stores (the embeddings with the weighting's columns appended)
    check_build_inputs   the index vectors and metadata (the check `build_index` runs too)
    partition_corpus     index vectors -> WORK/partition.npz (balanced, overlapping shards)
    build_shard_graph    WORK/partition.npz + index vectors -> WORK/shard-XXXX.npz (+ .sha256)
    merge_shards         WORK/shard-*.npz -> one graph (N, R), each node's lists re-pruned to R
    refine_borders       the merged graph, refined in place around shard borders
    query_sample         post titles -> (nq, d') text queries for query-aware PQ
    train_codec          index vectors (+ query sample) -> PQ codec and codes (as `build_index`)
    write_output         graph, codes, metadata -> OUT/ (index files + weighting.json)

The graph, codec and codes pass from one step to the next in memory; everything before the
merge is a file in WORK that a rerun can reuse (`load_partition`, `shard_is_built`).
Nothing here imports Ray.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np

from memescale.config import ModelConfig
from memescale.index.build import IndexParams, check_build_inputs, train_codec, write_built_index
from memescale.index.disk import WriteStats
from memescale.index.merge import border_nodes, merge_shard_graphs
from memescale.index.partition import Partition, assign_shards, balanced_kmeans, cohesion, plain_kmeans_partition
from memescale.index.pq import PQCodec
from memescale.index.vamana import build_vamana, find_medoid, refine_graph
from memescale.index.weighting import Weighting, fit_weighting
from memescale.shards.corpus import Corpus, collect_corpus

__all__ = [
    "INDEX_VECTORS", "PARTITION", "PYTHON_OVERHEAD", "build_shard_graph", "check_build_inputs", "collect_corpus",
    "default_work_dir", "fit_weights", "gather_rows", "load_partition", "merge_shards", "partition_corpus",
    "partition_report", "query_sample", "refine_borders", "shard_is_built", "shard_memory_bytes", "shard_path",
    "train_codec", "write_index_vectors", "write_output",
]

INDEX_VECTORS = "index_vectors.npy"
PARTITION = "partition.npz"
PYTHON_OVERHEAD = 600 * 2**20  # interpreter, numpy, numba and their caches in a fresh worker
WEIGHTING_SAMPLE = 200_000  # metadata rows the weighting's quantiles are fitted on


def default_work_dir(out_dir: str | Path, work_dir: str | Path | None = None) -> Path:
    """`work_dir`, or OUT.work next to the output folder."""
    return Path(work_dir or Path(out_dir).with_name(Path(out_dir).name + ".work"))


def fit_weights(corpus: Corpus, beta: float, seed: int) -> Weighting:
    """The weighting of the index vectors, fitted on up to WEIGHTING_SAMPLE rows of the
    corpus metadata drawn with `seed`; beta <= 0: no extra columns. O(sample log sample)."""
    n, d = corpus.vectors.shape
    if beta <= 0:
        return Weighting(d, balance=False)
    rng = np.random.default_rng(seed)
    return fit_weighting(corpus.metadata(np.sort(rng.choice(n, min(n, WEIGHTING_SAMPLE), replace=False))), d, beta)


def write_index_vectors(corpus: Corpus, weighting: Weighting, path: str | Path, block: int = 65536) -> np.ndarray:
    """Write the corpus vectors with the weighting's columns appended to `path` (normally
    WORK/index_vectors.npy): (N, weighting.dim) float16, written to a temporary file and
    renamed. Returns it memory-mapped read-only. Time O(N d'), memory O(block d')."""
    path = Path(path)
    n = len(corpus)
    tmp = path.with_suffix(".tmp.npy")
    out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float16, shape=(n, weighting.dim))
    for lo in range(0, n, block):
        hi = min(n, lo + block)
        out[lo:hi] = weighting.extend_base(corpus.vectors[lo:hi], corpus.metadata(np.arange(lo, hi)))
    out.flush()
    del out
    os.replace(tmp, path)
    return np.load(path, mmap_mode="r")


def partition_corpus(vectors: np.ndarray, work: str | Path, shards: int, overlap: int, seed: int,
                     sample_size: int = 100_000) -> Partition:
    """Balanced partition of `vectors` (N, d) into `shards` shards, each vector in `overlap`
    of them (`partition.balanced_kmeans` on a sample of `sample_size`, then `assign_shards`);
    one shard: every vector. Written to WORK/partition.npz. Time O(N shards d)."""
    n = len(vectors)
    if shards <= 1:
        part = Partition(np.zeros((1, vectors.shape[1]), np.float32), [np.arange(n, dtype=np.int64)])
    else:
        rng = np.random.default_rng(seed)
        sample = np.asarray(vectors[np.sort(rng.choice(n, min(n, sample_size), replace=False))])
        part = assign_shards(vectors, balanced_kmeans(sample, shards, seed=seed), overlap=overlap)
    part.save(Path(work) / PARTITION)
    return part


def load_partition(work: str | Path) -> Partition | None:
    """The partition in WORK/partition.npz, or None when there is none yet."""
    path = Path(work) / PARTITION
    return Partition.load(path) if path.exists() else None


def partition_report(vectors: np.ndarray, part: Partition, seed: int) -> dict:
    """Shard sizes and cohesion of the balanced partition next to plain k-means (on a
    sample of up to 50,000 vectors drawn with `seed`); with one shard, its size only."""
    if len(part.shards) <= 1:
        return {"shards": 1, "sizes": [len(part.shards[0])]}
    rng = np.random.default_rng(seed)
    n = len(vectors)
    idx = np.sort(rng.choice(n, min(n, 50_000), replace=False))
    x = np.asarray(vectors[idx], dtype=np.float32)
    sub = Partition(part.centroids, [np.nonzero(np.isin(idx, ids))[0] for ids in part.shards])
    plain = plain_kmeans_partition(x, len(part.shards), overlap=2, seed=seed)
    return {"shards": len(part.shards), "sizes": part.sizes().tolist(),
            "cohesion_balanced": round(cohesion(x, sub), 4),
            "plain_kmeans_sizes_on_sample": plain.sizes().tolist(),
            "cohesion_plain_kmeans": round(cohesion(x, plain), 4)}


def shard_path(work: str | Path, shard: int) -> Path:
    """WORK/shard-XXXX.npz: shard `shard`'s graph."""
    return Path(work) / f"shard-{shard:04d}.npz"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def shard_is_built(path: str | Path) -> bool:
    """A shard graph is reused only when its file matches the checksum written after it."""
    path = Path(path)
    check = path.with_suffix(".sha256")
    return path.exists() and check.exists() and check.read_text().strip() == _sha256(path)


def shard_memory_bytes(n: int, d: int, R: int, threads: int, slack: float = 1.3) -> int:
    """What `build_shard_graph` needs for a shard of `n` vectors of width `d`: fp16 vectors +
    the graph while building and its output + visit stamps per thread + the interpreter."""
    vectors = n * d * 2
    graph = n * int(np.ceil(slack * R)) * 4 + n * R * 4
    stamps = threads * n * 4
    return int(1.25 * (vectors + graph + stamps + n * 16)) + PYTHON_OVERHEAD


def gather_rows(npy_path: str | Path, ids: np.ndarray, block: int = 4096) -> np.ndarray:
    """Rows `ids` (sorted int64) of a 2-D .npy file, read block by block with plain reads.

    Unlike fancy-indexing a memmap, this leaves no file pages mapped into the process, so
    the caller's RSS is the rows it keeps plus one block's span. O(bytes spanned by ids)."""
    with open(npy_path, "rb") as f:
        major, _ = np.lib.format.read_magic(f)
        read_header = np.lib.format.read_array_header_1_0 if major == 1 else np.lib.format.read_array_header_2_0
        shape, _, dtype = read_header(f)
        start, width = f.tell(), shape[1]
        row_bytes = width * dtype.itemsize
        out = np.empty((len(ids), width), dtype)
        for lo in range(0, len(ids), block):
            part = ids[lo:lo + block]
            first, last = int(part[0]), int(part[-1])
            f.seek(start + first * row_bytes)
            span = np.fromfile(f, dtype, count=(last - first + 1) * width).reshape(-1, width)
            out[lo:lo + len(part)] = span[part - first]
    return out


def build_shard_graph(work: str | Path, vectors_path: str | Path, shard: int, R: int, L: int, alpha: float,
                      seed: int, threads: int) -> int:
    """Build shard `shard`'s Vamana graph (seed + shard) over its rows of the .npy at
    `vectors_path`, as listed in WORK/partition.npz; write WORK/shard-XXXX.npz (`neighbours`
    (n, R) int32 local ids padded with -1, `degrees` (n,) int32, `medoid` the global id of
    its medoid) and then its .sha256. Returns the shard's size n. Memory: `shard_memory_bytes`."""
    out = shard_path(work, shard)
    ids = np.load(Path(work) / PARTITION)[f"shard_{shard}"]
    X = gather_rows(vectors_path, ids)
    nbrs, deg, medoid = build_vamana(X, R, L, alpha, seed + shard, threads=threads, progress=False)
    tmp = out.with_suffix(".tmp.npz")
    np.savez(tmp, neighbours=nbrs, degrees=deg, medoid=np.int64(ids[medoid]))
    os.replace(tmp, out)
    out.with_suffix(".sha256").write_text(_sha256(out))
    return len(ids)


def merge_shards(work: str | Path, vectors: np.ndarray, part: Partition, R: int,
                 alpha: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Every shard graph in WORK merged over global ids and re-pruned to R (`merge_shard_graphs`).

    Returns (neighbours (N, R) int32 padded with -1, degrees (N,) int32, entry points: each
    shard's medoid, (shards,) int64)."""
    graphs, medoids = [], []
    for s, ids in enumerate(part.shards):
        z = np.load(shard_path(work, s))
        graphs.append((ids, z["neighbours"], z["degrees"]))
        medoids.append(int(z["medoid"]))
    neighbours, degrees = merge_shard_graphs(vectors, graphs, R, alpha)
    return neighbours, degrees, np.array(medoids, np.int64)


def refine_borders(vectors: np.ndarray, graph: tuple[np.ndarray, np.ndarray], part: Partition, refine_L: int,
                   fraction: float, alpha: float, seed: int) -> tuple[int, int, float]:
    """One more Vamana pass (`vamana.refine_graph`, search list size `refine_L`, from the
    medoid of all vectors) over the `fraction` of nodes nearest a shard border: they gain the
    cross-shard edges no shard graph had. `graph` (neighbours, degrees) is updated in place
    (O(N R) extra memory). No pass with one shard, refine_L <= 0 or fraction <= 0.

    Returns (nodes refined, refine_L, fraction) as applied: (0, 0, 0.0) without a pass."""
    if len(part.shards) <= 1 or refine_L <= 0 or fraction <= 0:
        return 0, 0, 0.0
    neighbours, degrees = graph
    points = border_nodes(vectors, part.centroids, part.shards, fraction)
    refine_graph(vectors, neighbours, degrees, find_medoid(vectors), refine_L, alpha, seed=seed, overwrite=True,
                 points=points)
    return len(points), refine_L, fraction


def query_sample(model: ModelConfig, corpus: Corpus, weighting: Weighting, n: int = 2000,
                 seed: int = 0) -> np.ndarray | None:
    """The encoder's text tower over up to `n` post titles drawn with `seed`, extended to the
    index width with zero weights: the (nq, weighting.dim) float32 queries query-aware PQ
    trains for. None when the corpus has no titles. Raises ValueError when the model's text
    width is not the embeddings' (the index was ingested with another model)."""
    from memescale.embed.encoder import ImageTextEncoder

    titles = [t for t in corpus.meta.column("title").to_pylist() if t]
    if not titles:
        return None
    rng = np.random.default_rng(seed)
    pick = [titles[i] for i in rng.choice(len(titles), min(n, len(titles)), replace=False)]
    enc = ImageTextEncoder(model)
    queries = np.concatenate([enc.encode_texts(pick[i:i + 256]) for i in range(0, len(pick), 256)])
    if queries.shape[1] != weighting.base_dim:
        raise ValueError(f"the config's model {model.name} encodes {queries.shape[1]}-d texts but the "
                         f"embeddings are {weighting.base_dim}-d: build with the ingest's model config")
    return weighting.extend_queries(queries)


def write_output(out_dir: str | Path, vectors: np.ndarray, graph: tuple[np.ndarray, np.ndarray], codec: PQCodec,
                 codes: np.ndarray, metadata: list[dict], entry_points: np.ndarray, params: IndexParams,
                 weighting: Weighting, **info) -> WriteStats:
    """The index folder OUT (`write_built_index`, `info` appended to the build information)
    and OUT/weighting.json."""
    ws = write_built_index(out_dir, vectors, graph, codec, codes, metadata, entry_points, params, **info)
    weighting.save(out_dir)
    return ws
