"""The sharded index build on Ray: corpus -> partition -> one Vamana task per shard -> merge
-> query-aware PQ -> the disk index.

    collect_corpus (driver, streaming)           WORK/vectors.npy + meta.parquet
    weighting: scores and recency appended       WORK/index_vectors.npy (what the index stores)
    balanced partition (driver, on a sample)     WORK/partition.npz
    build_shard x k (Ray tasks, memory=...)      WORK/shard-XXXX.npz (+ .sha256), skipped when valid
    merge + re-prune to R (driver, numba)
    refinement: a Vamana pass over the merged graph's border nodes (driver, numba)
    text-query sample: encoder text tower over post titles; train PQ on it
    write_index                                  OUT/

Each shard task declares `memory=` from its size (vectors + graph + working set), so Ray
runs only as many at once as fit on a node; its measured peak RSS is returned and reported.
WORK must be on storage every node sees (a shared filesystem) when running on a cluster.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import resource
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import ray

from memescale.config import Config
from memescale.corpus import Corpus, collect_corpus
from memescale.index import write_index
from memescale.index.partition import Partition, assign_shards, balanced_kmeans, cohesion, plain_kmeans_partition
from memescale.metrics import record
from memescale.weighting import Weighting, fit_weighting

log = logging.getLogger(__name__)

INDEX_VECTORS = "index_vectors.npy"
PYTHON_OVERHEAD = 600 * 2**20  # interpreter, numpy, numba and their caches in a fresh worker


def shard_memory_bytes(n: int, d: int, R: int, threads: int, slack: float = 1.3) -> int:
    """What one shard task needs: fp16 vectors + building graph + visit stamps + output + overhead."""
    vectors = n * d * 2
    graph = n * int(np.ceil(slack * R)) * 4 + n * R * 4
    stamps = threads * n * 4
    return int(1.25 * (vectors + graph + stamps + n * 16)) + PYTHON_OVERHEAD


@dataclass
class ShardResult:
    shard: int
    size: int
    seconds: float
    peak_rss: int
    declared_memory: int
    node: str
    skipped: bool


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def shard_is_built(path: Path) -> bool:
    """A shard graph is reused only when its file matches the checksum written after it."""
    check = path.with_suffix(".sha256")
    return path.exists() and check.exists() and check.read_text().strip() == _sha256(path)


def gather_rows(npy_path: str, ids: np.ndarray, block: int = 4096) -> np.ndarray:
    """Rows `ids` (sorted int64) of a 2-D .npy file, read block by block with plain reads.

    Unlike fancy-indexing a memmap, this leaves no file pages mapped into the process, so
    the task's RSS is the rows it keeps plus one block's span. O(bytes spanned by ids)."""
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


@ray.remote(max_calls=1)  # a fresh worker per shard: its peak RSS is this shard's alone
def build_shard(work_dir: str, vectors_path: str, shard: int, R: int, L: int, alpha: float, seed: int,
                threads: int, declared: int) -> ShardResult:
    """Build shard `shard`'s Vamana graph from the shared vectors; write it with its checksum."""
    from memescale.index import build_vamana

    t0 = time.perf_counter()
    work = Path(work_dir)
    out = work / f"shard-{shard:04d}.npz"
    ids = np.load(work / "partition.npz")[f"shard_{shard}"]
    X = gather_rows(vectors_path, ids)
    nbrs, deg, medoid = build_vamana(X, R, L, alpha, seed + shard, threads=threads, progress=False)
    tmp = out.with_suffix(".tmp.npz")
    np.savez(tmp, neighbours=nbrs, degrees=deg, medoid=np.int64(ids[medoid]))
    os.replace(tmp, out)
    out.with_suffix(".sha256").write_text(_sha256(out))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return ShardResult(shard, len(ids), time.perf_counter() - t0, peak, declared,
                       ray.get_runtime_context().get_node_id(), False)


def index_vectors(corpus: Corpus, beta: float, seed: int, block: int = 65536) -> tuple[np.ndarray, Weighting]:
    """The vectors the index stores: the embeddings with the weighting's columns appended
    (fitted on a sample of the metadata), written to WORK/index_vectors.npy (fp16, reused)."""
    n, d = corpus.vectors.shape
    if beta <= 0:
        return corpus.vectors, Weighting(d, balance=False)
    rng = np.random.default_rng(seed)
    weighting = fit_weighting(corpus.metadata(np.sort(rng.choice(n, min(n, 200_000), replace=False))), d, beta)
    path = corpus.work_dir / INDEX_VECTORS
    if not path.exists():
        tmp = path.with_suffix(".tmp.npy")
        out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float16, shape=(n, weighting.dim))
        for lo in range(0, n, block):
            hi = min(n, lo + block)
            out[lo:hi] = weighting.extend_base(corpus.vectors[lo:hi], corpus.metadata(np.arange(lo, hi)))
        out.flush()
        del out
        os.replace(tmp, path)
    return np.load(path, mmap_mode="r"), weighting


def partition_corpus(vectors: np.ndarray, work: Path, shards: int, overlap: int, seed: int,
                     sample_size: int = 100_000) -> Partition:
    """Balanced partition of `vectors` (reused from WORK/partition.npz when present)."""
    path = work / "partition.npz"
    if path.exists():
        z = np.load(path)
        return Partition(z["centroids"], [z[f"shard_{s}"] for s in range(len(z["centroids"]))])
    n = len(vectors)
    rng = np.random.default_rng(seed)
    if shards <= 1:
        part = Partition(np.zeros((1, vectors.shape[1]), np.float32), [np.arange(n, dtype=np.int64)])
    else:
        sample = np.asarray(vectors[np.sort(rng.choice(n, min(n, sample_size), replace=False))])
        part = assign_shards(vectors, balanced_kmeans(sample, shards, seed=seed), overlap=overlap)
    tmp = work / "partition.tmp.npz"
    np.savez(tmp, centroids=part.centroids, **{f"shard_{s}": ids for s, ids in enumerate(part.shards)})
    os.replace(tmp, path)
    return part


def partition_report(vectors: np.ndarray, part: Partition, seed: int) -> dict:
    """Shard sizes and cohesion of the balanced partition next to plain k-means (on a sample)."""
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


def text_query_sample(cfg: Config, corpus: Corpus, n: int = 2000, seed: int = 0) -> np.ndarray | None:
    """The encoder's text tower over a sample of post titles: the queries query-aware PQ
    trains for. None when the corpus has no titles."""
    from memescale.encoder import ImageTextEncoder

    titles = [t for t in corpus.meta.column("title").to_pylist() if t]
    if not titles:
        return None
    rng = np.random.default_rng(seed)
    pick = [titles[i] for i in rng.choice(len(titles), min(n, len(titles)), replace=False)]
    enc = ImageTextEncoder(cfg.model)
    return np.concatenate([enc.encode_texts(pick[i:i + 256]) for i in range(0, len(pick), 256)])


def build_from_shards(cfg: Config, embeddings: str, out_dir: str, work_dir: str | None = None,
                      threads_per_task: int = 1, query_sample: bool = True) -> dict:
    """Build the index of every vector under `embeddings` into `out_dir`; returns a summary.

    With several shards the merged graph gets a refinement pass (`vamana.refine_graph`) over
    the `index.refine_fraction` of nodes nearest a shard border, with search list size
    `index.refine_L` (0: no pass). On the 100k MiniLM set (8 shards, R=64) the defaults cost
    ~7 CPU-s (the shard graphs ~53) and bring the worst recall@10 gap to the 1-shard build at
    equal L (20-100) from 0.018 to 0.006; every node (fraction 1) costs ~20 CPU-s and leaves
    0.004 (bench/README.md, sharded build)."""
    from memescale.index import find_medoid, train_pq
    from memescale.index.merge import border_nodes, merge_shard_graphs
    from memescale.index.vamana import refine_graph

    ic = cfg.index
    t_start = time.perf_counter()
    work = Path(work_dir or Path(out_dir).with_name(Path(out_dir).name + ".work"))
    corpus = collect_corpus(embeddings, work)
    vectors, weighting = index_vectors(corpus, ic.weight_beta, ic.seed)
    n, d = vectors.shape
    t_corpus = time.perf_counter()
    part = partition_corpus(vectors, work, ic.shards, ic.shard_overlap, ic.seed)
    report = partition_report(vectors, part, ic.seed)
    log.info("partition", extra={"partition": report})
    t_part = time.perf_counter()

    refs, results = {}, []
    for s, ids in enumerate(part.shards):
        path = work / f"shard-{s:04d}.npz"
        mem = shard_memory_bytes(len(ids), d, ic.R, threads_per_task)
        if shard_is_built(path):
            results.append(ShardResult(s, len(ids), 0.0, 0, mem, "", True))
            continue
        refs[s] = build_shard.options(memory=mem, num_cpus=threads_per_task).remote(
            str(work), vectors.filename, s, ic.R, ic.L, ic.alpha, ic.seed, threads_per_task, mem)
    from tqdm import tqdm

    pending = list(refs.values())
    with tqdm(total=len(part.shards), initial=len(results), desc="shard graphs", unit="shard") as bar:
        while pending:
            ready, pending = ray.wait(pending, num_returns=1)
            r: ShardResult = ray.get(ready[0])
            results.append(r)
            record("memescale_build_shards_built")
            record("memescale_build_shard_seconds", r.seconds)
            bar.update(1)
    t_graph = time.perf_counter()

    shard_graphs, medoids = [], []
    for s, ids in enumerate(part.shards):
        z = np.load(work / f"shard-{s:04d}.npz")
        shard_graphs.append((ids, z["neighbours"], z["degrees"]))
        medoids.append(int(z["medoid"]))
    X = np.asarray(vectors)
    neighbours, degrees = merge_shard_graphs(X, shard_graphs, ic.R, ic.alpha)
    del shard_graphs
    t_merge = time.perf_counter()
    refine_L, refine_fraction = ic.refine_L, ic.refine_fraction
    refined = 0
    if len(part.shards) > 1 and refine_L > 0 and refine_fraction > 0:
        # one more Vamana pass, its searches over all shards at once: border nodes gain the
        # cross-shard edges no shard graph had (graph updated in place, O(N R) extra memory)
        points = border_nodes(X, part.centroids, part.shards, refine_fraction)
        refine_graph(X, neighbours, degrees, find_medoid(X), refine_L, ic.alpha, seed=ic.seed, overwrite=True,
                     points=points)
        refined = len(points)
    else:
        refine_L, refine_fraction = 0, 0.0
    t_refine = time.perf_counter()

    queries = text_query_sample(cfg, corpus, seed=ic.seed) if query_sample else None
    if queries is not None:
        if queries.shape[1] != weighting.base_dim:
            raise ValueError(f"the config's model {cfg.model.name} encodes {queries.shape[1]}-d texts but the "
                             f"embeddings are {weighting.base_dim}-d: build with the ingest's model config")
        queries = weighting.extend_queries(queries)
    M = min(ic.pq_bytes, d)
    codec = train_pq(X, M, queries=queries, seed=ic.seed)
    codes = codec.encode(X)
    t_pq = time.perf_counter()

    info = {"R": ic.R, "L": ic.L, "alpha": ic.alpha, "pq_bytes": M, "seed": ic.seed,
            "query_aware": queries is not None, "shards": len(part.shards), "model": cfg.model.name}
    if refine_L:
        info.update(refine_L=refine_L, refine_fraction=refine_fraction)
    entry = np.array(medoids, np.int64)
    ws = write_index(out_dir, X, (neighbours, degrees), codec, codes, corpus.metadata(), entry, info)
    weighting.save(out_dir)
    t_end = time.perf_counter()
    summary = {
        "vectors": n, "dim": d, "weights": list(weighting.names), "partition": report,
        "shards": [r.__dict__ for r in sorted(results, key=lambda r: r.shard)],
        "refine_L": refine_L, "refine_fraction": refine_fraction, "refined_nodes": refined,
        "mean_degree": float(degrees.mean()), "max_degree": int(degrees.max()),
        "seconds": {"corpus": t_corpus - t_start, "partition": t_part - t_corpus, "graphs": t_graph - t_part,
                    "merge": t_merge - t_graph, "refine": t_refine - t_merge, "pq": t_pq - t_refine,
                    "write": t_end - t_pq,
                    "total": t_end - t_start},
        "bytes_written": ws.bytes_written,
    }
    (Path(out_dir) / "build_summary.json").write_text(json.dumps(summary, indent=1))
    return summary
