"""Helpers shared by bench/ann.py and the peer runners.

Only numpy and the standard library: this module is imported from three virtual
environments (the project's numpy 2, diskannpy's numpy 1, faiss/hnswlib's numpy 2).

Array contracts:
- base: (N, d) float32, L2-normalised rows (the dataset stores float16).
- queries: (nq, d) float32.
- gt: (nq, >=k) int32, exact neighbours by inner product, best first.
- found ids: (nq, >=k) integer array; -1 or any id not in gt counts as a miss.

Recall and exact ground truth come from the project's memescale/index/eval.py, loaded by its
path (it needs numpy alone), since the peers' environments do not have the package installed.
"""

from __future__ import annotations

import importlib.util
import json
import os
import resource
import sys
import time
from pathlib import Path

import numpy as np


def _load_eval():
    path = Path(__file__).resolve().parents[2] / "memescale" / "index" / "eval.py"
    spec = importlib.util.spec_from_file_location("_memescale_index_eval", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


_eval = _load_eval()

QUERY_SETS = ("id", "ood")


def pin_threads(cores: int = 2, threads: int | None = None) -> list[int]:
    """Restrict this process to `cores` CPUs and tell thread pools to use `threads` threads.

    Must run before the library that owns the thread pool is imported (OpenMP and numba read
    their environment at load time). Returns the CPUs kept.
    """
    threads = threads or cores
    cpus = sorted(os.sched_getaffinity(0))[:cores]
    os.sched_setaffinity(0, cpus)
    for var in ("OMP_NUM_THREADS", "NUMBA_NUM_THREADS", "MKL_NUM_THREADS",
                "OPENBLAS_NUM_THREADS"):
        os.environ[var] = str(threads)
    return cpus


def load_dataset(path: str | os.PathLike, max_base: int = 0, eval_start: int = 1000,
                 max_queries: int = 0) -> dict:
    """Load base vectors, the evaluation half of both query sets and their ground truth.

    Queries [0, eval_start) are the training sample (query-aware PQ may learn from them);
    queries [eval_start, ...) are evaluated. With `max_base` > 0 only the first max_base base
    vectors are used and the ground truth is recomputed exactly (float32 inner product), so
    small smoke runs still measure real recall. `max_queries` > 0 caps the evaluated queries.

    Returns {"base": (N, d) f32, "train": {set: (nt, d) f32}, "queries": {set: (nq, d) f32},
    "gt": {set: (nq, 100) int32}}.
    """
    p = Path(path)
    base = np.load(p / "base.npy", mmap_mode="r")
    full = base.shape[0]
    n = full if max_base <= 0 else min(max_base, full)
    base = np.ascontiguousarray(base[:n], dtype=np.float32)
    out = {"base": base, "train": {}, "queries": {}, "gt": {}}
    for s in QUERY_SETS:
        q = np.load(p / f"queries_{s}.npy").astype(np.float32)
        gt = np.load(p / f"gt_{s}.npy")
        ev = slice(eval_start, None if max_queries <= 0 else eval_start + max_queries)
        out["train"][s] = np.ascontiguousarray(q[:eval_start])
        out["queries"][s] = np.ascontiguousarray(q[ev])
        if n == full:
            out["gt"][s] = np.ascontiguousarray(gt[ev], dtype=np.int32)
        else:
            out["gt"][s] = exact_topk(base, out["queries"][s], 100)
    return out


def exact_topk(base: np.ndarray, queries: np.ndarray, k: int) -> np.ndarray:
    """Exact top-k by inner product, best first (ties: lower id): (nq, k) int32."""
    return _eval.exact_ground_truth(base, queries, min(k, base.shape[0]))[0].astype(np.int32)


def recall_at_k(found: np.ndarray, gt: np.ndarray, k: int = 10) -> float:
    """Mean over queries of |found[:, :k] ∩ gt[:, :k]| / k (-1 in found is a miss)."""
    return _eval.recall_at_k(found, gt, k)


def rss_bytes() -> int:
    """Current resident set size of this process (from /proc, no psutil needed)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def rss_parts() -> dict[str, int]:
    """Resident memory split as /proc/self/status reports it: anon (heap, private arrays) and
    file (mapped file pages, e.g. an index file read through mmap), in bytes."""
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            key = line.split(":")[0]
            if key in ("VmRSS", "RssAnon", "RssFile"):
                out[key] = int(line.split()[1]) * 1024
    return out


def peak_rss_bytes() -> int:
    """Peak resident set size of this process so far (ru_maxrss is in KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def io_read_bytes() -> int:
    """Bytes this process has caused to be fetched from the storage layer (/proc/self/io).

    O_DIRECT reads count here; page-cache hits do not.
    """
    try:
        with open("/proc/self/io") as f:
            for line in f:
                if line.startswith("read_bytes:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return -1


def dir_bytes(path: str | os.PathLike) -> dict[str, int]:
    """Size of every file under `path` (relative name -> bytes)."""
    root = Path(path)
    return {str(f.relative_to(root)): f.stat().st_size for f in sorted(root.rglob("*"))
            if f.is_file()}


def timed(fn, *args, **kwargs):
    """Run fn and return (result, wall seconds)."""
    t = time.perf_counter()
    r = fn(*args, **kwargs)
    return r, time.perf_counter() - t


def write_json(path: str | os.PathLike, obj) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(str(path) + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1, default=_json_default))
    tmp.replace(path)


def _json_default(o):
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    raise TypeError(f"not JSON serialisable: {type(o)}")


def log(*a) -> None:
    print(*a, file=sys.stderr, flush=True)


def latency_sweep(search_one, data: dict, Ls: str, k: int, tag: str) -> list[dict]:
    """Interactive latency: `search_one(query (d,) float32, L)` -> ids (best first), called
    one query at a time and each call timed alone, after 50 untimed warm-up queries; p50 and
    p99 over the evaluated queries of both sets at each L of the comma list `Ls` (at least k).
    Returns one point per (set, L): query_set, L, recall, p50_ms, p99_ms."""
    for q in data["queries"]["id"][:50]:
        search_one(q, max(k, 20))
    points = []
    for qs in QUERY_SETS:
        Q, gt = data["queries"][qs], data["gt"][qs]
        for L in [max(int(x), k) for x in Ls.split(",")]:
            ids = np.full((len(Q), k), -1, np.int64)
            lat = np.empty(len(Q))
            for i, q in enumerate(Q):
                t0 = time.perf_counter()
                found = np.asarray(search_one(q, L))[:k]
                lat[i] = time.perf_counter() - t0
                ids[i, :len(found)] = found
            pt = {"query_set": qs, "L": L, "recall": recall_at_k(ids, gt, k),
                  "p50_ms": float(np.percentile(lat, 50) * 1e3), "p99_ms": float(np.percentile(lat, 99) * 1e3)}
            points.append(pt)
            log(f"[{tag}] latency {qs:3s} L={L:4d} recall@{k}={pt['recall']:.4f} "
                f"p50={pt['p50_ms']:.2f} ms p99={pt['p99_ms']:.2f} ms")
    return points
