"""The sharded index build on Ray: the steps of `memescale.build.stages`, run by a driver
with one memory-bounded Ray task per shard graph, every phase out-of-core.

    corpus, weight columns (driver)              WORK/corpus/, WORK/index_vectors/
    plan (driver)                                shards and tasks at once from index.build_memory
    balanced partition (driver, streamed)        WORK/partition/
    build_shard x k (Ray tasks, memory=...)      WORK/graphs/shard-XXXX.*
    merge + re-prune, border refinement (driver) WORK/graph/
    text-query sample, PQ training and codes     WORK/pq/
    write (records streamed, metadata from Parquet)  OUT/

Each phase folder is keyed by a fingerprint of its inputs and parameters (`fingerprint.Phase`):
a rerun reuses the phases whose fingerprint matches (and every shard graph whose checksums
are valid), redoes the others, and the summary lists what was reused. Each shard task
declares `memory=` from its size (`stages.shard_memory_bytes`) and at most the plan's
`tasks_at_once` per node run together, so driver plus tasks stay within `index.build_memory`
on every node (Ray places each task where its declared memory fits); the
driver's and each task's peak anonymous memory are measured (sampled from /proc) and
reported. WORK must be on storage every node sees (a shared filesystem) on a cluster.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import ray

from memescale.build import stages
from memescale.build.fingerprint import Phase, phase_fingerprint
from memescale.build.plan import BuildPlan, plan_for_config
from memescale.config import Config, IndexConfig
from memescale.crashpoints import crash_point
from memescale.durable import fsync_tree
from memescale.index.build import IndexParams
from memescale.index.disk import FORMAT_VERSION
from memescale.index.partition import DiskPartition
from memescale.memwatch import PeakRssAnon, release_free_memory, rss_anon
from memescale.metrics import record

log = logging.getLogger(__name__)


@dataclass
class ShardResult:
    shard: int
    size: int
    seconds: float
    peak_rss_anon: int
    declared_memory: int
    node: str
    skipped: bool


# A shard of at least this many members gets a fresh worker: its peak memory is its own
# alone (a reused worker keeps what earlier shards left in its heap: about 190 MiB after
# 105k-member shards at 1152-d, past their declared memory). Smaller ones build in less time
# than a worker takes to start and import the kernels, and leave little, so they share.
FRESH_WORKER_MIN_MEMBERS = 20_000


def _build_shard(graphs: str, partition: str, vectors_path: str, shard: int, graph: dict, threads: int,
                 declared: int) -> ShardResult:
    """`stages.build_shard_graph` in a Ray worker, reporting its time and peak RssAnon.
    graph: its keyword arguments R, L, alpha, seed and build_pq_bytes."""
    release_free_memory()  # a shared worker: what an earlier shard freed goes back first
    t0 = time.perf_counter()
    with PeakRssAnon() as peak:
        size = stages.build_shard_graph(graphs, partition, vectors_path, shard, threads=threads, **graph)
    return ShardResult(shard, size, time.perf_counter() - t0, peak.peak_bytes, declared,
                       ray.get_runtime_context().get_node_id(), False)


@ray.remote(max_calls=1)
def build_shard(*args) -> ShardResult:
    """`_build_shard` in a worker of its own, which exits after it."""
    return _build_shard(*args)


@ray.remote
def build_small_shard(*args) -> ShardResult:
    """`_build_shard` in a shared worker (shards under FRESH_WORKER_MIN_MEMBERS)."""
    return _build_shard(*args)


def build_shard_graphs(graphs: Path, part: DiskPartition, vectors_path: str, d: int, ic: IndexConfig,
                       threads_per_task: int, at_once: int) -> list[ShardResult]:
    """One `build_shard` task (`build_small_shard` under FRESH_WORKER_MIN_MEMBERS) per shard
    whose graph in `graphs` is not valid yet (the others are reported as skipped), each
    declaring `stages.shard_memory_bytes`, at most `at_once` in flight; waits for all of them."""
    from tqdm import tqdm

    graph = {"R": ic.R, "L": ic.L, "alpha": ic.alpha, "seed": ic.seed, "build_pq_bytes": ic.build_pq_bytes}
    todo, results = [], []
    sizes = part.sizes().tolist()
    for s, size in enumerate(sizes):
        mem = stages.shard_memory_bytes(size, d, ic.R, threads_per_task, build_pq_bytes=ic.build_pq_bytes)
        if stages.shard_is_built(graphs, s):
            results.append(ShardResult(s, size, 0.0, 0, mem, "", True))
        else:
            todo.append((s, mem))
    refs: list = []
    with tqdm(total=part.k, initial=len(results), desc="shard graphs", unit="shard") as bar:
        while todo or refs:
            while todo and len(refs) < max(1, at_once):
                s, mem = todo.pop(0)
                task = build_shard if sizes[s] >= FRESH_WORKER_MIN_MEMBERS else build_small_shard
                refs.append(task.options(memory=mem, num_cpus=threads_per_task).remote(
                    str(graphs), str(part.folder), vectors_path, s, graph, threads_per_task, mem))
            ready, refs = ray.wait(refs, num_returns=1)
            r: ShardResult = ray.get(ready[0])
            results.append(r)
            record("memescale_build_shards_built")
            record("memescale_build_shard_seconds", r.seconds)
            record("memescale_build_shard_peak_bytes", r.peak_rss_anon, shard=str(r.shard), kind="peak")
            record("memescale_build_shard_peak_bytes", r.declared_memory, shard=str(r.shard), kind="declared")
            bar.update(1)
            crash_point("build.shard_graph_done")
    return sorted(results, key=lambda r: r.shard)


class _Phases:
    """Wall-clock seconds per named phase, each from the end of the previous one, and which
    phases were reused from WORK."""

    def __init__(self, rss: PeakRssAnon | None = None) -> None:
        self.start = self.last = time.perf_counter()
        self.seconds: dict[str, float] = {}
        self.reused: list[str] = []
        self.rss = rss
        self.peak_rss_anon: dict[str, int] = {}  # the driver's peak RssAnon in each phase

    def done(self, name: str, reused: bool = False) -> None:
        crash_point(f"build.{name}_done")
        if self.rss is not None:
            self.peak_rss_anon[name] = self.rss.take_stage_peak()
        release_free_memory()  # this phase's temporaries are not kept resident through the next
        now = time.perf_counter()
        self.seconds[name] = now - self.last
        self.last = now
        record("memescale_build_phase_seconds", self.seconds[name], phase=name)
        record("memescale_build_driver_rss_bytes", rss_anon())
        if reused:
            self.reused.append(name)

    def with_total(self) -> dict[str, float]:
        return {**self.seconds, "total": self.last - self.start}


def build_from_shards(cfg: Config, embeddings: str, out_dir: str, work_dir: str | None = None,
                      threads_per_task: int = 0, query_sample: bool = True) -> dict:
    """Build the index of every vector under `embeddings` into `out_dir`; returns the summary
    also written to OUT/build_summary.json (vectors, dim, weights, plan, partition, shards,
    refine_L, refine_fraction, refined_nodes, mean_degree, max_degree, seconds per phase,
    reused phases, driver_peak_rss_anon and driver_peak_rss_anon_by_phase, bytes_written).

    Parameters come from `cfg.index`; WORK is `work_dir` or OUT.work. The number of shards
    and how many shard tasks run at once come from the plan (`plan.plan_for_config`:
    `index.build_memory`, `index.shards` as an override); threads_per_task <= 0: chosen by
    the plan. With several shards the merged graph gets the refinement pass of
    `stages.refine_borders`. `query_sample`: train query-aware PQ on the text tower's
    encodings of post titles (False: plain PQ). The index vectors are checked as
    `build_index` checks its input (`stages.check_build_inputs`) before any shard is built.
    Raises `plan.BuildPlanError` when the budget cannot hold the build.
    """
    with PeakRssAnon() as driver:
        summary = _build(cfg, embeddings, out_dir, work_dir, threads_per_task, query_sample, driver)
    summary["driver_peak_rss_anon"] = driver.peak_bytes
    summary["driver_rss_anon_growth"] = driver.growth_bytes
    (Path(out_dir) / "build_summary.json").write_text(json.dumps(summary, indent=1))
    fsync_tree(out_dir)  # the index is reported built only once every file of it is on disk
    return summary


def _build(cfg: Config, embeddings: str, out_dir: str, work_dir: str | None, threads_per_task: int,
           query_sample: bool, rss: PeakRssAnon | None = None) -> dict:
    ic = cfg.index
    work = stages.default_work_dir(out_dir, work_dir)
    phase = _Phases(rss)

    corpus = stages.collect_corpus(embeddings, work)
    phase.done("corpus", corpus.reused)
    weighting = stages.fit_weights(corpus, ic.weight_beta, ic.seed)
    vectors, vectors_fp = corpus.vectors, corpus.fingerprint
    vectors_path = corpus.work_dir / "corpus" / "vectors.npy"
    if ic.weight_beta > 0:
        iv = Phase(work, "index_vectors", phase_fingerprint(corpus.fingerprint, weight_beta=ic.weight_beta,
                                                            seed=ic.seed))
        reused = iv.is_complete()
        vectors, vectors_fp = stages.write_index_vectors(corpus, weighting, iv), iv.fingerprint
        vectors_path = iv.dir / stages.INDEX_VECTORS
        phase.done("index_vectors", reused)
    stages.check_build_inputs(vectors, corpus, block=stages.block_rows(vectors.shape[1]))
    n, d = vectors.shape
    plan: BuildPlan = plan_for_config(cfg, n, corpus.vectors.shape[1], threads_per_task)
    log.info("build plan", extra={"plan": plan.to_dict()})

    pp = Phase(work, "partition", phase_fingerprint(vectors_fp, shards=plan.shards, overlap=ic.shard_overlap,
                                                    seed=ic.seed))
    reused = pp.is_complete()
    part = stages.partition_corpus(vectors, pp, plan.shards, ic.shard_overlap, ic.seed)
    report = stages.partition_report(vectors, part, ic.seed)
    log.info("partition", extra={"partition": report})
    phase.done("partition", reused)

    navigation = {"build_pq_bytes": ic.build_pq_bytes} if ic.build_pq_bytes else {}  # exact: as before it existed
    gp = Phase(work, "graphs", phase_fingerprint(pp.fingerprint, R=ic.R, L=ic.L, alpha=ic.alpha, seed=ic.seed,
                                                 lanes="int8", **navigation))
    reused = gp.is_complete()
    if not reused:
        gp.resume()  # keeps the shard graphs an interrupted run of the same fingerprint finished
    nodes = sum(1 for node in ray.nodes() if node.get("Alive"))  # the plan is per node
    results = build_shard_graphs(gp.dir, part, str(vectors_path), d, ic, plan.threads_per_task,
                                 plan.tasks_at_once * max(1, nodes))
    if not reused:
        gp.finish(shards=part.k)
    phase.done("graphs", reused)

    merging = {"merge": ic.merge} if ic.merge != "prune" else {}  # "prune": as before the option existed
    mp = Phase(work, "graph", phase_fingerprint(gp.fingerprint, R=ic.R, alpha=ic.alpha, refine_L=ic.refine_L,
                                                refine_fraction=ic.refine_fraction, seed=ic.seed, **merging))
    if mp.is_complete():
        neighbours = np.load(mp.dir / "neighbours.npy", mmap_mode="r")
        degrees = np.load(mp.dir / "degrees.npy", mmap_mode="r")
        entry_points = np.load(mp.dir / "entry_points.npy")
        info = mp.info()
        refined, refine_L, refine_fraction = info["refined"], info["refine_L"], info["refine_fraction"]
        phase.done("merge", True)
        phase.done("refine", True)
    else:
        mp.start()
        neighbours, degrees, entry_points = stages.merge_shards(gp.dir, vectors, part, ic.R, ic.alpha, mp.dir,
                                                                mode=ic.merge)
        phase.done("merge")
        # with construction codes, the refinement's searches rank by codes instead of rows read at random
        refines = part.k > 1 and ic.refine_L > 0 and ic.refine_fraction > 0
        nav_codes = mp.dir / "nav_codes.tmp.npy"
        nav = stages.graph_navigation_codes(vectors, ic.build_pq_bytes, ic.seed, nav_codes) if refines else None
        refined, refine_L, refine_fraction = stages.refine_borders(
            vectors, (neighbours, degrees), part, ic.refine_L, ic.refine_fraction, ic.alpha, ic.seed,
            mp.dir / "refine.tmp.npy", nav=nav)
        del nav
        nav_codes.unlink(missing_ok=True)
        neighbours.flush()
        degrees.flush()
        np.save(mp.dir / "entry_points.npy", entry_points)
        mp.finish(refined=refined, refine_L=refine_L, refine_fraction=refine_fraction)
        phase.done("refine")

    queries = stages.query_sample(cfg.model, corpus, weighting, seed=ic.seed) if query_sample else None
    params = dataclasses.replace(IndexParams.from_config(ic), queries=queries)
    aware = {"queries": cfg.model.name, "eta": "held-out"} if query_sample else {"queries": None}
    qp = Phase(work, "pq", phase_fingerprint(vectors_fp, pq_bytes=ic.pq_bytes, seed=ic.seed, codec_format=FORMAT_VERSION,
                                             **aware))
    reused = qp.is_complete()
    codec, codes = stages.train_pq_codes(vectors, params, qp)
    phase.done("pq", reused)

    info = {"shards": part.k, "model": cfg.model.name}
    if refine_L:
        info.update(refine_L=refine_L, refine_fraction=refine_fraction)
    ws = stages.write_output(out_dir, vectors, (neighbours, degrees), codec, codes, corpus.meta_path, entry_points,
                             params, weighting, **info)
    phase.done("write")

    deg_mean, deg_max = _degree_stats(degrees)
    return {
        "vectors": n, "dim": d, "weights": list(weighting.names), "plan": plan.to_dict(), "partition": report,
        "shards": [r.__dict__ for r in results],
        "refine_L": refine_L, "refine_fraction": refine_fraction, "refined_nodes": refined,
        "build_pq_bytes": ic.build_pq_bytes, "merge": ic.merge, "mean_degree": deg_mean, "max_degree": deg_max,
        "seconds": phase.with_total(), "reused": phase.reused,
        "driver_peak_rss_anon_by_phase": phase.peak_rss_anon,
        "bytes_written": ws.bytes_written,
    }


def _degree_stats(degrees: np.ndarray, block: int = 1 << 20) -> tuple[float, int]:
    """Mean and max of an (N,) degree array, read `block` entries at a time."""
    total, top = 0, 0
    for lo in range(0, len(degrees), block):
        part = np.asarray(degrees[lo:lo + block], np.int64)
        total += int(part.sum())
        top = max(top, int(part.max(initial=0)))
    return total / max(1, len(degrees)), top
