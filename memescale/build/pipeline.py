"""The sharded index build on Ray: the steps of `memescale.build.stages`, run by a driver
with one Ray task per shard graph.

    collect_corpus, weight columns (driver)      WORK/vectors.npy, meta.parquet, index_vectors.npy
    balanced partition (driver, on a sample)     WORK/partition.npz
    build_shard x k (Ray tasks, memory=...)      WORK/shard-XXXX.npz (+ .sha256)
    merge + re-prune, border refinement (driver)
    text-query sample, PQ training and codes (driver)
    write                                        OUT/

A rerun reuses the collected corpus, the index vectors, the partition and every shard graph
whose checksum is valid. Each shard task declares `memory=` from its size
(`stages.shard_memory_bytes`), so Ray runs only as many at once as fit on a node; its
measured peak RSS is returned and reported. WORK must be on storage every node sees (a
shared filesystem) when running on a cluster.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import resource
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import ray

from memescale.build import stages
from memescale.config import Config, IndexConfig
from memescale.index.build import IndexParams
from memescale.index.partition import Partition
from memescale.metrics import record

log = logging.getLogger(__name__)


@dataclass
class ShardResult:
    shard: int
    size: int
    seconds: float
    peak_rss: int
    declared_memory: int
    node: str
    skipped: bool


@ray.remote(max_calls=1)  # a fresh worker per shard: its peak RSS is this shard's alone
def build_shard(work_dir: str, vectors_path: str, shard: int, R: int, L: int, alpha: float, seed: int,
                threads: int, declared: int) -> ShardResult:
    """`stages.build_shard_graph` in a Ray worker, reporting its time and peak RSS."""
    t0 = time.perf_counter()
    size = stages.build_shard_graph(work_dir, vectors_path, shard, R, L, alpha, seed, threads)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return ShardResult(shard, size, time.perf_counter() - t0, peak, declared,
                       ray.get_runtime_context().get_node_id(), False)


def build_shard_graphs(work: Path, vectors_path: str, part: Partition, d: int, ic: IndexConfig,
                       threads_per_task: int) -> list[ShardResult]:
    """One `build_shard` task per shard whose graph in WORK is not valid yet (the others are
    reported as skipped), each declaring `stages.shard_memory_bytes`; waits for all of them."""
    from tqdm import tqdm

    refs, results = [], []
    for s, ids in enumerate(part.shards):
        mem = stages.shard_memory_bytes(len(ids), d, ic.R, threads_per_task)
        if stages.shard_is_built(stages.shard_path(work, s)):
            results.append(ShardResult(s, len(ids), 0.0, 0, mem, "", True))
            continue
        refs.append(build_shard.options(memory=mem, num_cpus=threads_per_task).remote(
            str(work), vectors_path, s, ic.R, ic.L, ic.alpha, ic.seed, threads_per_task, mem))
    with tqdm(total=len(part.shards), initial=len(results), desc="shard graphs", unit="shard") as bar:
        while refs:
            ready, refs = ray.wait(refs, num_returns=1)
            r: ShardResult = ray.get(ready[0])
            results.append(r)
            record("memescale_build_shards_built")
            record("memescale_build_shard_seconds", r.seconds)
            bar.update(1)
    return sorted(results, key=lambda r: r.shard)


class _Phases:
    """Wall-clock seconds per named phase, each from the end of the previous one."""

    def __init__(self) -> None:
        self.start = self.last = time.perf_counter()
        self.seconds: dict[str, float] = {}

    def done(self, name: str) -> None:
        now = time.perf_counter()
        self.seconds[name] = now - self.last
        self.last = now

    def with_total(self) -> dict[str, float]:
        return {**self.seconds, "total": self.last - self.start}


def build_from_shards(cfg: Config, embeddings: str, out_dir: str, work_dir: str | None = None,
                      threads_per_task: int = 1, query_sample: bool = True) -> dict:
    """Build the index of every vector under `embeddings` into `out_dir`; returns the summary
    also written to OUT/build_summary.json (vectors, dim, weights, partition, shards,
    refine_L, refine_fraction, refined_nodes, mean_degree, max_degree, seconds per phase,
    bytes_written).

    Parameters come from `cfg.index`; WORK is `work_dir` or OUT.work. With several shards
    the merged graph gets the refinement pass of `stages.refine_borders` (`index.refine_L`,
    `index.refine_fraction`). `query_sample`: train query-aware PQ on the text tower's
    encodings of post titles (False: plain PQ). The index vectors are checked as
    `build_index` checks its input (`stages.check_build_inputs`) before any shard is built.
    """
    ic = cfg.index
    params = IndexParams.from_config(ic)
    work = stages.default_work_dir(out_dir, work_dir)
    phase = _Phases()

    corpus = stages.collect_corpus(embeddings, work)  # reused when WORK holds a complete one
    weighting = stages.fit_weights(corpus, ic.weight_beta, ic.seed)
    vectors = corpus.vectors
    if ic.weight_beta > 0:
        path = work / stages.INDEX_VECTORS
        vectors = np.load(path, mmap_mode="r") if path.exists() else stages.write_index_vectors(corpus, weighting, path)
    stages.check_build_inputs(vectors, corpus.meta)
    n, d = vectors.shape
    phase.done("corpus")

    part = stages.load_partition(work)
    if part is None:
        part = stages.partition_corpus(vectors, work, ic.shards, ic.shard_overlap, ic.seed)
    report = stages.partition_report(vectors, part, ic.seed)
    log.info("partition", extra={"partition": report})
    phase.done("partition")

    assert isinstance(vectors, np.memmap)  # the shard tasks map the vectors file by name
    results = build_shard_graphs(work, str(vectors.filename), part, d, ic, threads_per_task)
    phase.done("graphs")

    X = np.asarray(vectors)
    neighbours, degrees, entry_points = stages.merge_shards(work, X, part, ic.R, ic.alpha)
    phase.done("merge")

    refined, refine_L, refine_fraction = stages.refine_borders(X, (neighbours, degrees), part, ic.refine_L,
                                                               ic.refine_fraction, ic.alpha, ic.seed)
    phase.done("refine")

    queries = stages.query_sample(cfg.model, corpus, weighting, seed=ic.seed) if query_sample else None
    params = dataclasses.replace(params, queries=queries)
    codec, codes = stages.train_codec(X, params)
    phase.done("pq")

    info = {"shards": len(part.shards), "model": cfg.model.name}
    if refine_L:
        info.update(refine_L=refine_L, refine_fraction=refine_fraction)
    ws = stages.write_output(out_dir, X, (neighbours, degrees), codec, codes, corpus.metadata(), entry_points,
                             params, weighting, **info)
    phase.done("write")

    summary = {
        "vectors": n, "dim": d, "weights": list(weighting.names), "partition": report,
        "shards": [r.__dict__ for r in results],
        "refine_L": refine_L, "refine_fraction": refine_fraction, "refined_nodes": refined,
        "mean_degree": float(degrees.mean()), "max_degree": int(degrees.max()),
        "seconds": phase.with_total(),
        "bytes_written": ws.bytes_written,
    }
    (Path(out_dir) / "build_summary.json").write_text(json.dumps(summary, indent=1))
    return summary
