"""Build and sweep diskannpy's disk index (StaticDiskIndex); write the results as JSON.

Runs in .venv-diskann (diskannpy 0.7.0, the C++ DiskANN, numpy 1.x) or .venv-diskann-rust
(diskannpy-rust 0.49.1, Microsoft's Rust rewrite with the same module name and the same
build_disk_index / StaticDiskIndex entry points); bench/ann.py starts it as a subprocess.
The installed package decides which API is called (`RUST` below).

What diskannpy-rust 0.49.1 takes and returns, where it differs from 0.7.0:
- Build: `distance_metric="innerproduct"`, `alpha` and `num_of_pq_chunks` (the in-RAM PQ
  bytes per vector) are parameters; no search memory budget is needed to set the PQ size.
- Search: `batch_search(queries, k, complexity, num_threads)` returns a response with
  `search_stats` (mean_ios: the mean 4 KiB reads per query, mean_comps, latencies), reported
  as its reads; /proc/self/io is recorded beside them.

What diskannpy 0.7.0 exposes, and what this runner measures around it:
- Build: `build_disk_index(R, L, search_memory_maximum, ...)`. Alpha is not a parameter of the
  disk builder: it is DiskANN's built-in 1.2. The in-RAM PQ code size is set through the search
  memory budget (DiskANN takes floor(budget / N) bytes per vector), so the budget is chosen to
  give exactly --pq-bytes; the log line confirming it is kept in the JSON. Vectors on disk are
  full-precision float32 (pq_disk_bytes=0). Inner product ("mips") is turned into L2 by
  DiskANN with one extra dimension.
- Search: `batch_search` returns ids and distances only, no per-query statistics (the C++
  QueryStats with n_ios is not passed through). Sector reads are therefore measured from
  /proc/self/io read_bytes over the batch: DiskANN reads with O_DIRECT, so every node read
  reaches the block layer and none is served by the page cache; read_bytes / 4096 / nq is its
  mean number of 4 KiB reads per query (nodes held in its own node cache cost none).

Usage (normally via bench/ann.py):
  .venv-diskann/bin/python bench/peers/diskann_runner.py --dataset ../shared/data/ann/pypi-minilm \
      --workdir WORK/diskann --out WORK/diskann.json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

SECTOR = 4096


def _rust() -> bool:
    import inspect

    import diskannpy as dap
    return "num_of_pq_chunks" in inspect.signature(dap.build_disk_index).parameters


def _version() -> tuple[str, str]:
    from importlib import metadata
    for name in ("diskannpy-rust", "diskannpy"):
        try:
            return name, metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return "diskannpy", "unknown"


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dataset", required=True)
    ap.add_argument("--workdir", required=True, help="folder for the index files")
    ap.add_argument("--out", required=True, help="JSON results file")
    ap.add_argument("--max-base", type=int, default=0)
    ap.add_argument("--max-queries", type=int, default=0)
    ap.add_argument("--eval-start", type=int, default=1000)
    ap.add_argument("--R", type=int, default=64)
    ap.add_argument("--L", type=int, default=100)
    ap.add_argument("--alpha", type=float, default=1.2,
                    help="recorded only: diskannpy's disk builder always uses 1.2")
    ap.add_argument("--pq-bytes", type=int, default=48)
    ap.add_argument("--beam-width", type=int, default=4)
    ap.add_argument("--Ls", default="10,20,30,50,70,100,150,200")
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--cores", type=int, default=2)
    ap.add_argument("--threads", default="2", help="comma list of search thread counts")
    ap.add_argument("--build-threads", type=int, default=2)
    ap.add_argument("--cache-nodes", type=int, default=0,
                    help="DiskANN's in-RAM node cache (0 = every node read comes from disk)")
    ap.add_argument("--cache-mechanism", type=int, default=2,
                    help="1: nodes visited by sample queries; 2: breadth-first from the medoid "
                         "(what memescale does)")
    ap.add_argument("--reps", type=int, default=2, help="timed repetitions per point; best kept")
    ap.add_argument("--latency-Ls", default="", help="comma list of L for the one-query-at-a-time latency sweep")
    ap.add_argument("--build-only", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--reuse", action="store_true",
                    help="reuse an index in --workdir built with the same parameters")
    return ap.parse_args(argv)


def main(argv=None):
    a = parse_args(argv)
    # The build child gets exactly the build threads (MKL and OpenMP read these at load time).
    cpus = C.pin_threads(a.cores, a.build_threads if a.build_only
                         else max(int(t) for t in a.threads.split(",")))
    data = C.load_dataset(a.dataset, a.max_base, a.eval_start, a.max_queries)
    base = data["base"]
    n, d = base.shape
    work = Path(a.workdir)
    params = {"R": a.R, "L": a.L, "pq_bytes": a.pq_bytes, "n": n, "d": d,
              "dataset": str(Path(a.dataset).resolve()),
              "build_threads": a.build_threads}
    # floor(budget_bytes / N) = pq_bytes; half a byte of slack survives the C++ side's
    # six-decimal formatting of the budget in GB.
    budget_gb = (a.pq_bytes + 0.5) * n / 2**30
    meta_file = work / "bench_params.json"
    reuse = a.reuse and meta_file.exists() and json.loads(meta_file.read_text())["params"] == params
    if a.build_only:
        build_index(a, base, work, budget_gb, params, meta_file)
        return
    if not reuse:
        # Build in a child process so that the RSS measured after loading the index here is
        # the index's and not the build's leftover heap.
        shutil.rmtree(work, ignore_errors=True)
        subprocess.run([sys.executable, __file__, *(argv if argv is not None else sys.argv[1:]),
                        "--build-only"], check=True)
    else:
        C.log(f"[diskann] reusing index in {work}")
    build = json.loads(meta_file.read_text())["build"]
    build["reused"] = bool(reuse)
    with redirect_stdout_fd(work / "search.log"):
        results = search(a, data, work, params, build, cpus)
    C.write_json(a.out, results)
    C.log(f"[diskann] results in {a.out}")


def build_index(a, base, work: Path, budget_gb: float, params: dict, meta_file: Path) -> None:
    """Build the disk index into `work` and record build seconds and peak RSS."""
    import diskannpy as dap
    import numpy as np

    n, d = base.shape
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    C.log(f"[diskann] building n={n} d={d} R={a.R} L={a.L} pq_bytes={a.pq_bytes} "
          f"(budget {budget_gb:.6f} GB)")
    # DiskANN logs to the C++ stdout: keep it in a file, and check the PQ size it used.
    log_path = work / "build.log"
    rust = _rust()
    with redirect_stdout_fd(log_path):
        t0 = time.perf_counter()
        if rust:
            dap.build_disk_index(
                data=base, distance_metric="innerproduct", index_directory=str(work),
                complexity=a.L, graph_degree=a.R, build_memory_maximum=8.0, num_threads=a.build_threads,
                alpha=a.alpha, num_of_pq_chunks=a.pq_bytes, vector_dtype=np.float32)
        else:
            dap.build_disk_index(
                data=base, distance_metric="mips", index_directory=str(work),
                complexity=a.L, graph_degree=a.R, search_memory_maximum=budget_gb,
                build_memory_maximum=8.0, num_threads=a.build_threads, pq_disk_bytes=0,
                vector_dtype=np.float32)
        build_s = time.perf_counter() - t0
    text = log_path.read_text(errors="replace")
    m = re.findall(r"[Cc]ompressing .*?into (\d+) bytes", text)
    build = {"seconds": build_s, "peak_rss_bytes": C.peak_rss_bytes(),
             "pq_bytes_used": a.pq_bytes if rust else (int(m[-1]) if m else None),
             "pq_log": [ln.strip() for ln in text.splitlines() if "ompressing" in ln][-1:]}
    meta_file.write_text(json.dumps({"params": params, "build": build}))
    C.log(f"[diskann] built in {build_s:.1f} s; PQ bytes per vector used: {build['pq_bytes_used']}")


@contextlib.contextmanager
def redirect_stdout_fd(path: Path):
    """Send file descriptor 1 (where DiskANN's C++ code logs) to `path` for the block."""
    sys.stdout.flush()
    saved = os.dup(1)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(fd, 1)
    try:
        yield
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(fd)
        os.close(saved)


def search(a, data, work: Path, params: dict, build: dict, cpus) -> dict:
    """Load the index once per thread count and sweep L over both query sets."""
    import diskannpy as dap
    import numpy as np

    n, d = data["base"].shape
    files = C.dir_bytes(work)

    rust = _rust()
    library, version = _version()
    results = {"library": library, "version": version, "cpus": cpus, "n": n, "d": d,
               "params": {**params, "alpha": a.alpha if rust else 1.2, "beam_width": a.beam_width,
                          "cache_nodes": a.cache_nodes, "cache_mechanism": None if rust else a.cache_mechanism,
                          "pq_disk_bytes": 0,
                          "metric": "innerproduct" if rust else "mips"},
               "build": build, "files": files, "runs": []}

    def open_index(threads: int):
        if rust:
            return dap.StaticDiskIndex(index_directory=str(work), num_threads=threads, beam_width=a.beam_width,
                                       num_nodes_to_cache=a.cache_nodes, distance_metric="innerproduct",
                                       vector_dtype=np.float32, dimensions=d)
        return dap.StaticDiskIndex(index_directory=str(work), num_threads=threads,
                                   num_nodes_to_cache=a.cache_nodes, cache_mechanism=a.cache_mechanism,
                                   distance_metric="mips", vector_dtype=np.float32, dimensions=d)

    def batch(index, Q, L: int, threads: int):
        """(ids, reads per query from the library's own statistics or None)"""
        if rust:
            r = index.batch_search(Q, a.k, L, threads)
            return r.identifiers, float(r.search_stats["mean_ios"])
        ids, _ = index.batch_search(Q, a.k, L, threads, a.beam_width)
        return ids, None

    def one(index, q, L: int):
        if rust:
            return index.search(q, a.k, L).identifiers
        # 0.7.0's single-query search waits forever for a thread context: a batch of one
        return index.batch_search(q[None], a.k, L, 1, a.beam_width)[0][0]

    for threads in [int(t) for t in a.threads.split(",")]:
        rss0 = C.rss_parts()
        t0 = time.perf_counter()
        index = open_index(threads)
        load_s = time.perf_counter() - t0
        rss1 = C.rss_parts()
        ram = rss1["VmRSS"] - rss0["VmRSS"]
        # In-RAM parts by file: PQ codes and pivots (the graph and vectors stay on disk).
        ram_files = sum(v for k, v in files.items() if "pq_compressed" in k or "pq_pivots" in k)
        run = {"threads": threads, "index_ram_rss_delta_bytes": ram,
               "index_ram_rss_delta_parts": {k: rss1[k] - rss0[k] for k in rss0},
               "index_ram_files_bytes": ram_files, "load_seconds": load_s, "points": []}
        C.log(f"[diskann] {threads} threads: loaded in {load_s:.2f} s, RSS +{ram / 2**20:.1f} MiB")
        # One untimed pass so one-time allocations do not land in the first point.
        batch(index, data["queries"]["id"][:100], max(a.k, 20), threads)
        for qs in C.QUERY_SETS:
            Q, gt = data["queries"][qs], data["gt"][qs]
            for L in [int(x) for x in a.Ls.split(",")]:
                L = max(L, a.k)
                best, reads, io_reads = None, None, None
                for _ in range(a.reps):
                    io0 = C.io_read_bytes()
                    t0 = time.perf_counter()
                    ids, own_reads = batch(index, Q, L, threads)
                    dt = time.perf_counter() - t0
                    io1 = C.io_read_bytes()
                    if best is None or dt < best:
                        best = dt
                    if io0 >= 0:
                        io_reads = (io1 - io0) / SECTOR / len(Q)
                    reads = own_reads if own_reads is not None else io_reads
                pt = {"query_set": qs, "L": L, "recall": C.recall_at_k(ids, gt, a.k),
                      "qps": len(Q) / best, "seconds": best, "mean_reads": reads, "io_reads": io_reads,
                      "reads_source": "search_stats mean_ios" if rust else "/proc/self/io read_bytes / 4096 (O_DIRECT)"}
                run["points"].append(pt)
                C.log(f"[diskann] t={threads} {qs:3s} L={L:4d} recall@{a.k}={pt['recall']:.4f} "
                      f"qps={pt['qps']:8.1f} reads/q={reads if reads is None else round(reads, 1)}")
        results["runs"].append(run)
        if a.latency_Ls and "latency" not in results:
            # on the first index loaded: 0.7.0 hangs when a second index is opened in one process
            results["latency"] = C.latency_sweep(lambda q, L, index=index: one(index, q, L), data, a.latency_Ls,
                                                 a.k, "diskann")
        del index
    return results


if __name__ == "__main__":
    main()
