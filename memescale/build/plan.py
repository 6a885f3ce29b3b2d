"""The build plan: how a sharded build of N vectors of width d fits a RAM budget.

`plan_build` derives, from the budget the user sets (`index.build_memory`, bytes of RAM the
whole build may use on a node):

- shards k: unless given, the smallest k for which the idle driver plus ONE shard task fits
  the budget. A shard holds at most ``ceil(overlap * N / k * (1 + SHARD_SLACK))`` vectors (the
  partition's hard cap, `memescale.index.partition.assign_shards`); with k = 1 it holds all N
  once. Fewer shards mean fewer border edges to repair and less merge work, so the smallest
  k that fits is the best one.
- tasks at once: how many shard tasks of that size fit next to the driver, capped by
  threads // threads_per_task and by k. The pipeline gets this concurrency from Ray by
  declaring `task_memory_bytes` per task (`memory=`) on a node with the budget's memory.
- declared memory per task: `stages.shard_memory_bytes` of the largest shard.
- driver memory: ``driver_fixed_bytes(d') + DRIVER_BYTES_PER_VECTOR * N``. The fixed part is
  the interpreter with its libraries plus DRIVER_ROWS_IN_FLIGHT float32 rows of width d' (the
  samples the partition and PQ are trained on, one block of a blockwise pass and its
  temporaries); the per-vector part is the contract of the out-of-core driver (at most 24
  bytes per vector: e.g. shard membership counts and per-node degrees, never a vector or
  a graph row). That is the driver's peak, in its own phases; while the shard tasks run it
  is idle and holds `driver_idle_bytes` (DRIVER_BASE_BYTES + the per-vector part), so the
  budget must hold max(driver peak, idle driver + tasks at once x task memory).
- scratch disk bytes (WORK) and index disk bytes (OUT), per file.
- estimated seconds per phase from `COSTS`.

It raises `BuildPlanError` (a ValueError) when the budget cannot hold the driver's peak, or
the idle driver plus one shard of the smallest useful size (at least MIN_SHARD_PER_OVERLAP x overlap vectors, and at
most MAX_SHARDS shards), naming the smallest budget that works.

Every figure is a closed form in N, d, R, L, k: planning 230M vectors costs microseconds and
reads nothing. Pure Python + numpy; no Ray.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from memescale.build.stages import shard_memory_bytes
from memescale.index.disk import META_QUANTILE, RecordLayout
from memescale.index.vamana import nav_dsub_for
from memescale.index.weighting import WEIGHT_NAMES

__all__ = [
    "COSTS", "DRIVER_BASE_BYTES", "DRIVER_BYTES_PER_VECTOR", "DRIVER_ROWS_IN_FLIGHT", "MAX_SHARDS",
    "MIN_SHARD_PER_OVERLAP", "BuildPlan", "BuildPlanError", "driver_fixed_bytes", "driver_idle_bytes", "driver_memory_bytes",
    "fitted_costs", "format_plan", "load_costs", "machine_budget", "plan_build", "plan_for_config", "shard_vectors",
]

GiB = 2**30
MiB = 2**20

# Driver memory: interpreter + numpy/numba/pyarrow/Ray's core worker and their compiled kernels
# (a warm driver starts near 170 MiB RssAnon), plus this many float32 rows of the index width in
# flight, plus the per-vector contract.
DRIVER_BASE_BYTES = 256 * MiB
DRIVER_ROWS_IN_FLIGHT = 163_840
DRIVER_BYTES_PER_VECTOR = 24

SHARD_SLACK = 0.05  # the partition's cap over the mean shard size (partition.assign_shards' slack)
MIN_SHARD_PER_OVERLAP = 1000  # a shard below 1,000 x overlap vectors is not worth a task
MAX_SHARDS = 4096
META_BYTES_PER_ROW = 256  # msgpack metadata of one node in its record (title, url, subreddit, ...)
PARQUET_RATIO = 0.5  # the metadata's compressed Parquet size relative to its msgpack size
PQ_TRAIN_ROWS = 25_000  # IndexParams.pq_train_size
OPQ_ITERS = 16  # IndexParams.opq_iters
MACHINE_MARGIN = 0.125  # without a budget: total RAM minus this share (at least 2 GiB) for the OS

# Seconds per unit of work per thread (`threads` says whether a phase runs on all threads,
# one task's threads or one thread). The units follow how each algorithm scales:
#   corpus      per vector x d            Parquet decode + fp16 memmap write (one thread)
#   weights     per vector x d'           the weighting's columns appended (one thread)
#   partition   per vector x k x d'       blockwise nearest-centroid assignment
#   graphs      per member x (L+R) x R x d'  Vamana, two passes (members: overlap x N, or N)
#   merge       per vector x overlap x R x R x d'  re-pruning the union of the shard lists
#   refine      per refined node x (refine_L+R) x R x d'
#   pq_train    per train row x 256 x d' x opq_iters (independent of N)
#   pq_encode   per vector x 256 x d'
#   write       per byte of records written (one thread: msgpack + sector packing + I/O)
# Seeded from single runs on a 2-core development machine (20k x 384, R 32, L 64, 2 threads;
# partition: 200k x 384 into 64 shards;
# corpus and write are estimates of Parquet decode and record writing throughput).
# `bench/build_scale.py` measures the wall time of every phase at several N; to update a
# constant, divide a phase's measured seconds x its threads by its units (`_units` below for
# that N, d, R, L, k) and replace the value here.
COSTS: dict[str, float] = {
    "corpus": 2.0e-9,
    "weights": 2.0e-9,
    "partition": 4.3e-10,
    "graphs": 4.3e-10,
    "merge": 7.0e-11,
    "refine": 4.9e-10,
    "pq_train": 1.6e-10,
    "pq_encode": 1.9e-9,
    "write": 4.0e-9,
}
SERIAL_PHASES = ("corpus", "weights", "write")


class BuildPlanError(ValueError):
    """The budget cannot hold the driver plus one shard task of the smallest useful size."""


@dataclass
class BuildPlan:
    """What a build of `n` x `d` (index width `index_dim`) will do within `budget_bytes`.

    All sizes in bytes; `seconds` per phase plus "total"; `scratch` and `index_disk` per file
    plus "total".
    """

    n: int
    d: int
    index_dim: int
    R: int
    L: int
    overlap: int
    pq_bytes: int
    budget_bytes: int
    budget_source: str  # "config" or "machine" (total RAM minus a margin)
    threads: int
    threads_per_task: int
    shards: int
    shards_derived: bool
    shard_vectors: int  # the largest shard's size
    tasks_at_once: int
    task_memory_bytes: int  # declared per shard task (stages.shard_memory_bytes)
    driver_fixed_bytes: int
    driver_bytes_per_vector: int
    driver_memory_bytes: int  # the driver's peak, in its own phases (samples and blocks in flight)
    driver_idle_bytes: int  # the driver while the shard tasks run: DRIVER_BASE_BYTES + per vector
    peak_memory_bytes: int  # max(driver peak, driver idle + tasks_at_once x task_memory_bytes)
    scratch: dict[str, int] = field(default_factory=dict)
    index_disk: dict[str, int] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)
    costs_source: str = "default"  # "default" (COSTS) or "given" (measured costs, `load_costs`)
    # rows of the index vectors the merge and the refinement read at random (`random_reads`)
    random_reads: dict[str, int] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def driver_fixed_bytes(index_dim: int) -> int:
    """The driver's memory independent of N for index vectors of width `index_dim`."""
    return DRIVER_BASE_BYTES + DRIVER_ROWS_IN_FLIGHT * 4 * index_dim


def driver_idle_bytes(n: int) -> int:
    """The driver while shard tasks run (it holds no sample or block then): DRIVER_BASE_BYTES
    + DRIVER_BYTES_PER_VECTOR x n."""
    return DRIVER_BASE_BYTES + DRIVER_BYTES_PER_VECTOR * n


def driver_memory_bytes(n: int, index_dim: int) -> int:
    """driver_fixed_bytes + DRIVER_BYTES_PER_VECTOR x n: the out-of-core driver's contract."""
    return driver_fixed_bytes(index_dim) + DRIVER_BYTES_PER_VECTOR * n


def shard_vectors(n: int, k: int, overlap: int) -> int:
    """The largest shard's size with k shards: all n for k = 1, else the partition's cap
    ceil(overlap * n / k * (1 + SHARD_SLACK)), at most n."""
    if k <= 1:
        return n
    return min(n, math.ceil(overlap * n / k * (1 + SHARD_SLACK)))


def machine_budget() -> int:
    """This machine's total RAM minus MACHINE_MARGIN of it (at least 2 GiB)."""
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return max(0, total - max(2 * GiB, int(total * MACHINE_MARGIN)))


def _valid_shards(n: int, overlap: int) -> list[int]:
    """Shard counts worth planning, ascending: 1, then every k > overlap (fewer would put
    every vector in every shard) whose largest shard still has MIN_SHARD_PER_OVERLAP x
    overlap vectors, up to MAX_SHARDS."""
    ks = [1]
    floor = MIN_SHARD_PER_OVERLAP * overlap
    for k in range(overlap + 1, MAX_SHARDS + 1):
        if shard_vectors(n, k, overlap) < floor:
            break
        ks.append(k)
    return ks


def _fmt_bytes(b: float) -> str:
    for unit, size in (("TiB", 2**40), ("GiB", GiB), ("MiB", MiB), ("KiB", 1024)):
        if abs(b) >= size:
            return f"{b / size:.2f} {unit}"
    return f"{int(b)} B"


def random_reads(n: int, dx: int, R: int, overlap: int, k: int, refine_L: int, refine_fraction: float,
                 build_pq_bytes: int = 0, merge: str = "prune") -> dict[str, int]:
    """Rows of the index vectors (fp16, width dx) that the merge and the refinement fetch in
    no order the file's layout serves: the merge re-prunes each node's overlap x R candidates
    (each fetched once per node; none with merge="interleave"); the refinement's searches
    score (refine_L + R) x R rows per refined node, or with navigation codes (build_pq_bytes
    > 0; `codes_bytes` in all) read the rows of the nodes they expand and prune, about
    refine_L + R; and the refinement's prunes of lists its reverse edges overfill
    (`refine_prune_rows`, an upper bound: each of the refined nodes' R new reverse edges lands
    on a different full list, whose ceil(1.3 R) candidates are read). Their time (`seconds`)
    assumes the rows come from RAM; that holds while the vectors file (`vectors_bytes`) fits
    the page cache beside the build's memory. Past that, each read is a disk read of
    `disk_bytes_per_read` on average (the 4 KiB pages a row at any offset spans)."""
    refined = 0 if k <= 1 or refine_L <= 0 else int(refine_fraction * n)
    row = 2 * dx
    codes = build_pq_bytes > 0
    code_bytes = -(-dx // nav_dsub_for(dx, build_pq_bytes)) if codes else 0  # navigation_codes' M
    return {"merge_rows": n * overlap * R if k > 1 and merge == "prune" else 0,
            "refine_rows": refined * (refine_L + R) * (1 if codes else R),
            "refine_prune_rows": min(n, refined * R) * math.ceil(1.3 * R) if refined else 0, "row_bytes": row,
            "codes_bytes": n * code_bytes,
            "disk_bytes_per_read": 4095 + row, "vectors_bytes": n * row}


def _units(n: int, dx: int, d: int, R: int, L: int, overlap: int, k: int, refine_L: int,
           refine_fraction: float, merge: str = "prune") -> dict[str, float]:
    members = n if k <= 1 else overlap * n
    refined = 0.0 if k <= 1 or refine_L <= 0 else refine_fraction * n
    return {
        "corpus": n * d,
        "weights": n * dx if dx > d else 0.0,
        "partition": n * k * dx if k > 1 else 0.0,
        "graphs": members * (L + R) * R * dx,
        # interleaving compares ids only: priced as a prune of one dimension
        "merge": n * (overlap if k > 1 else 1) * R * R * (dx if merge == "prune" else 1),
        "refine": refined * (refine_L + R) * R * dx,
        "pq_train": min(n, PQ_TRAIN_ROWS) * 256 * dx * OPQ_ITERS,
        "pq_encode": n * 256 * dx,
    }


def plan_build(n: int, d: int, *, R: int, L: int, overlap: int, pq_bytes: int, budget_bytes: int | None,
               threads: int, threads_per_task: int = 1, shards: int | None = None,
               meta_bytes_per_row: int = META_BYTES_PER_ROW, extra_dims: int = len(WEIGHT_NAMES) + 1,
               refine_L: int = 32, refine_fraction: float = 0.3, build_pq_bytes: int = 0, merge: str = "prune",
               costs: dict[str, float] | None = None) -> BuildPlan:
    """The plan of a build of `n` vectors of the model's width `d` (the index stores
    d' = d + extra_dims: the weighting's columns, `len(WEIGHT_NAMES) + 1` at most, 0 without
    weighting). See the module doc for what is derived and how.

    budget_bytes: RAM for driver + concurrent shard tasks; None or 0: `machine_budget()`.
    shards: a fixed shard count (None or 0: derive the smallest that fits). threads: cores
    of the node; threads_per_task: threads each shard task builds with.
    meta_bytes_per_row: the msgpack metadata size of one record (disk estimates).
    build_pq_bytes: the shard tasks' navigation codes (`index.build_pq_bytes`; their memory).
    merge: `index.merge` ("prune" or "interleave": its time and random reads).
    costs: per-phase costs replacing `COSTS`' (e.g. `fitted_costs` of a measured build).

    Raises BuildPlanError when the driver plus one shard task cannot fit (the message names
    the smallest budget that works), ValueError for arguments out of range. O(MAX_SHARDS).
    """
    if n < 1 or d < 1 or R < 1 or L < 1 or overlap < 1 or pq_bytes < 1 or threads < 1 or threads_per_task < 1:
        raise ValueError(f"plan_build needs n, d, R, L, overlap, pq_bytes, threads, threads_per_task >= 1 "
                         f"(got n={n}, d={d}, R={R}, L={L}, overlap={overlap}, pq_bytes={pq_bytes}, "
                         f"threads={threads}, threads_per_task={threads_per_task})")
    source = "config" if budget_bytes else "machine"
    budget = int(budget_bytes) if budget_bytes else machine_budget()
    dx = d + max(0, int(extra_dims))
    tpt = min(threads_per_task, threads)
    driver = driver_memory_bytes(n, dx)
    idle = driver_idle_bytes(n)
    if driver > budget:
        k_min = int(shards) if shards else _valid_shards(n, overlap)[-1]
        need = max(driver, idle + shard_memory_bytes(shard_vectors(n, k_min, overlap), dx, R, tpt,
                                                     build_pq_bytes=build_pq_bytes))
        raise BuildPlanError(
            f"build memory {_fmt_bytes(budget)} cannot hold the driver's own phases ({_fmt_bytes(driver)} for "
            f"{n:,} vectors of width {dx}); the smallest budget that works is {_fmt_bytes(need)} "
            f"({need} bytes): set index.build_memory to at least that")

    def task(k: int) -> int:
        return shard_memory_bytes(shard_vectors(n, k, overlap), dx, R, tpt, build_pq_bytes=build_pq_bytes)

    if shards:
        k, derived = int(shards), False
        if idle + task(k) > budget:
            raise BuildPlanError(
                f"index.shards={k}: the driver ({_fmt_bytes(idle)} while shards build) plus one shard task of "
                f"{shard_vectors(n, k, overlap):,} vectors ({_fmt_bytes(task(k))}) exceed the build memory "
                f"{_fmt_bytes(budget)}; the smallest budget that works with {k} shards is "
                f"{_fmt_bytes(max(driver, idle + task(k)))} ({max(driver, idle + task(k))} bytes), or leave "
                f"index.shards at 0 "
                f"to derive the shard count")
    else:
        ks = _valid_shards(n, overlap)
        fits = [k for k in ks if idle + task(k) <= budget]
        if not fits:
            need = max(driver, idle + task(ks[-1]))
            raise BuildPlanError(
                f"build memory {_fmt_bytes(budget)} cannot hold the driver ({_fmt_bytes(idle)} for "
                f"{n:,} vectors) plus one shard task of the smallest useful size ({shard_vectors(n, ks[-1], overlap):,} "
                f"vectors in {ks[-1]} shards: {_fmt_bytes(task(ks[-1]))}); the smallest budget that works is "
                f"{_fmt_bytes(need)} ({need} bytes): set index.build_memory to at least that")
        k, derived = fits[0], True
    mem = task(k)
    at_once = max(1, min(k, (budget - idle) // mem, max(1, threads // tpt)))
    m = shard_vectors(n, k, overlap)
    M = min(pq_bytes, dx)
    members = n if k <= 1 else overlap * n
    graph_row = 4 * R + 4
    scratch = {
        "vectors_fp16": n * d * 2,
        "index_vectors": n * dx * 2 if dx > d else 0,
        "metadata_parquet": int(n * meta_bytes_per_row * PARQUET_RATIO),
        "partition": members * 8,
        "shard_graphs": members * graph_row,
        "merged_graph": n * graph_row,
        "pq_codes": n * M,
    }
    scratch["total"] = sum(scratch.values())
    layout = RecordLayout.plan(dx, R, n, np.array([meta_bytes_per_row], np.int64))
    index_disk = {
        "records": layout.file_size,
        "codes": n * M + 4096,
        "metadata_overflow": int(math.ceil(n * (1 - META_QUANTILE)) * meta_bytes_per_row * 4),
        "arrays": 256 * dx * 4 + dx * dx * 4 + 65536,
    }
    index_disk["total"] = sum(index_disk.values())

    cost = {**COSTS, **(costs or {})}
    units = _units(n, dx, d, R, L, overlap, k, refine_L, refine_fraction, merge)
    seconds: dict[str, float] = {}
    for phase, u in units.items():
        if phase == "graphs":  # shards run in waves of at_once tasks, each on tpt threads
            waves = math.ceil(k / at_once)
            seconds[phase] = waves * (u / k) * cost[phase] / tpt
        else:
            seconds[phase] = u * cost[phase] / (1 if phase in SERIAL_PHASES else threads)
    seconds["write"] = layout.file_size * cost["write"]
    seconds["total"] = sum(seconds.values())
    return BuildPlan(n=n, d=d, index_dim=dx, R=R, L=L, overlap=overlap, pq_bytes=M, budget_bytes=budget,
                     budget_source=source, threads=threads, threads_per_task=tpt, shards=k, shards_derived=derived,
                     shard_vectors=m, tasks_at_once=int(at_once), task_memory_bytes=mem,
                     driver_fixed_bytes=driver_fixed_bytes(dx), driver_bytes_per_vector=DRIVER_BYTES_PER_VECTOR,
                     driver_memory_bytes=driver, driver_idle_bytes=idle,
                     peak_memory_bytes=max(driver, idle + int(at_once) * mem),
                     scratch=scratch, index_disk=index_disk, seconds={p: round(s, 3) for p, s in seconds.items()},
                     costs_source="given" if costs else "default",
                     random_reads=random_reads(n, dx, R, overlap, k, refine_L, refine_fraction, build_pq_bytes, merge))


# The build summary's phases (memescale.build.pipeline) -> the plan's phases they time.
MEASURED_PHASES = {"corpus": ("corpus",), "index_vectors": ("weights",), "partition": ("partition",),
                   "graphs": ("graphs",), "merge": ("merge",), "refine": ("refine",),
                   "pq": ("pq_train", "pq_encode"), "write": ("write",)}


def fitted_costs(planned_seconds: dict[str, float], measured: dict[str, float],
                 costs: dict[str, float] | None = None) -> dict[str, float]:
    """Per-phase costs that make a plan (its `seconds`, e.g. the build summary's
    plan["seconds"]) predict the `measured` seconds of that build (the summary's "seconds"):
    a phase the plan priced is scaled by measured / planned; a phase not measured, reused or
    not planned keeps its cost. `costs`: the costs the plan was made with (default COSTS).
    Use the result as `plan_build(..., costs=...)` to extrapolate."""
    base = {**COSTS, **(costs or {})}
    out = dict(base)
    for name, phases in MEASURED_PHASES.items():
        planned = sum(planned_seconds.get(p, 0.0) for p in phases)
        if name in measured and measured[name] > 0 and planned > 0:
            for p in phases:
                out[p] = base[p] * measured[name] / planned
    return out


def load_costs(path: str | os.PathLike) -> tuple[dict[str, float], dict[str, Any] | None]:
    """Per-phase costs (seconds per unit per thread, as `COSTS`) from a JSON file: an object
    with "costs", or `bench/build_scale.py`'s results (their "extrapolation" holds the costs
    fitted on the builds it measured, and the build shape they were fitted for). Costs are per
    unit of work, but a row's bytes, R, L and construction codes change them: they price best
    the shape they were fitted on. Returns (costs, that shape as {"d", "R", "L",
    "build_pq_bytes", "merge"} or None where the file does not say). Raises ValueError naming what is
    wrong."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"cannot read costs from {path}: {e}") from e
    costs, shape = None, None
    if isinstance(data, dict):
        ext: dict[str, Any] = data["extrapolation"] if isinstance(data.get("extrapolation"), dict) else {}
        costs = data.get("costs") if data.get("costs") is not None else ext.get("costs")
        shape = ext.get("fitted_shape") if isinstance(ext.get("fitted_shape"), dict) else None
    if not isinstance(costs, dict) or not costs:
        raise ValueError(f"{path} has no \"costs\" object (nor build_scale's \"extrapolation\".\"costs\")")
    unknown = sorted(set(costs) - set(COSTS))
    if unknown:
        raise ValueError(f"{path}: unknown phases {unknown}; the phases are {sorted(COSTS)}")
    bad = [k for k, v in costs.items()
           if not isinstance(v, (int, float)) or isinstance(v, bool) or not (v > 0 and math.isfinite(v))]
    if bad:
        raise ValueError(f"{path}: costs must be positive finite numbers (not {', '.join(bad)})")
    return {k: float(v) for k, v in costs.items()}, shape


def plan_for_config(cfg: Any, n: int, d: int, threads_per_task: int = 1, threads: int | None = None,
                    shards: int | None = None, costs: dict[str, float] | None = None) -> BuildPlan:
    """`plan_build` with the parameters of `cfg` (a memescale.config.Config): index.R, L,
    shard_overlap, pq_bytes, build_memory (0: machine), shards (0: derive; `shards` overrides
    it), refine_L, refine_fraction, build_pq_bytes, and the weighting's columns when
    index.weight_beta > 0.
    threads: ray.num_cpus, else this machine's cores. `d` is the embeddings' width.
    threads_per_task <= 0: chosen here, so that the shard tasks that fit at once use every
    thread (planned with one thread per task first, then with threads // tasks at once when
    that still fits; each thread's scratch is part of a task's declared memory).
    costs: measured per-phase costs replacing `COSTS`' (`load_costs`)."""
    ic = cfg.index
    threads = threads or cfg.ray.num_cpus or os.cpu_count() or 1

    def plan(tpt: int) -> BuildPlan:
        return plan_build(n, d, R=ic.R, L=ic.L, overlap=ic.shard_overlap, pq_bytes=ic.pq_bytes,
                          budget_bytes=ic.build_memory or None, threads=threads, threads_per_task=tpt,
                          shards=shards if shards is not None else (ic.shards or None),
                          extra_dims=len(WEIGHT_NAMES) + 1 if ic.weight_beta > 0 else 0,
                          refine_L=ic.refine_L, refine_fraction=ic.refine_fraction,
                          build_pq_bytes=ic.build_pq_bytes, merge=ic.merge, costs=costs)

    if threads_per_task > 0:
        return plan(threads_per_task)
    first = plan(1)
    wide = max(1, threads // max(1, first.tasks_at_once))
    if wide == 1:
        return first
    try:
        return plan(wide)
    except BuildPlanError:
        return first


def format_plan(plan: BuildPlan) -> str:
    """The plan as a human-readable table."""
    def hours(s: float) -> str:
        return f"{s:,.0f} s ({s / 3600:.1f} h)"

    rows = [
        ("vectors", f"{plan.n:,} x {plan.d} (index width {plan.index_dim})"),
        ("graph", f"R {plan.R}, L {plan.L}, overlap {plan.overlap}, PQ {plan.pq_bytes} B"),
        ("build memory", f"{_fmt_bytes(plan.budget_bytes)} ({plan.budget_source})"),
        ("shards", f"{plan.shards} ({'derived' if plan.shards_derived else 'index.shards'}), "
                   f"largest {plan.shard_vectors:,} vectors"),
        ("tasks at once", f"{plan.tasks_at_once} x {plan.threads_per_task} thread(s) of {plan.threads}"),
        ("memory per task", _fmt_bytes(plan.task_memory_bytes)),
        ("driver memory", f"{_fmt_bytes(plan.driver_memory_bytes)} = {_fmt_bytes(plan.driver_fixed_bytes)} + "
                          f"{plan.driver_bytes_per_vector} B/vector"),
        ("peak memory", f"{_fmt_bytes(plan.peak_memory_bytes)} of {_fmt_bytes(plan.budget_bytes)}"),
        ("scratch disk", _fmt_bytes(plan.scratch["total"])),
        *((f"  {k}", _fmt_bytes(v)) for k, v in plan.scratch.items() if k != "total"),
        ("index disk", _fmt_bytes(plan.index_disk["total"])),
        *((f"  {k}", _fmt_bytes(v)) for k, v in plan.index_disk.items() if k != "total"),
        ("estimated time", hours(plan.seconds["total"])
         + (" (measured costs)" if plan.costs_source == "given" else " (default costs)")),
        *((f"  {k}", hours(v)) for k, v in plan.seconds.items() if k != "total"),
    ]
    rr = plan.random_reads
    if rr.get("merge_rows") or rr.get("refine_rows"):
        reads = rr["merge_rows"] + rr["refine_rows"] + rr["refine_prune_rows"]
        rows.append(("random reads", f"up to {reads / 1e9:,.1f} G rows of {_fmt_bytes(rr['row_bytes'])} (merge "
                                     f"{rr['merge_rows'] / 1e9:,.1f} G, refinement searches "
                                     f"{rr['refine_rows'] / 1e9:,.1f} G and prunes {rr['refine_prune_rows'] / 1e9:,.1f} G) "
                                     f"in {_fmt_bytes(rr['vectors_bytes'])} of index vectors"
                                     + (f" (navigation codes: {_fmt_bytes(rr['codes_bytes'])})" if rr.get("codes_bytes")
                                        else "") + ": the time above "
                                     f"holds while these fit the page cache; past it, "
                                     f"{_fmt_bytes(reads * rr['disk_bytes_per_read'])} of disk reads"))
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)
