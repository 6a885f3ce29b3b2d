"""Build and sweep a LanceDB IVF-PQ index with refine (on disk); write the results as JSON.

Runs in .venv-lancedb (lancedb 0.40.0); bench/ann.py starts it as a subprocess. This is what
a user picking an embedded on-disk vector store does: one table (id, vector float32) in a
local Lance dataset, `create_index(index_type="IVF_PQ", metric="dot")` with sqrt(N)
partitions (LanceDB's own default) and --pq-bytes sub-vectors of 8 bits (the same PQ bytes
per vector in RAM as the disk indexes), then `search(q).distance_type("dot").nprobes(p)
.refine_factor(r)`: the top k x r by PQ are re-ranked with the full vectors read from disk.
Queries go one per call, as its Python API takes them, from --threads threads at once; the
sweep is over nprobes at each --refine factor. LanceDB reports no reads per query.

Usage (normally via bench/ann.py):
  .venv-lancedb/bin/python bench/peers/lancedb_runner.py --dataset ../shared/data/ann/pypi-minilm \
      --workdir WORK/lancedb --out WORK/lancedb.json
"""

from __future__ import annotations

import argparse
import math
import os
import shutil
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dataset", required=True)
    ap.add_argument("--workdir", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--max-base", type=int, default=0)
    ap.add_argument("--max-queries", type=int, default=0)
    ap.add_argument("--eval-start", type=int, default=1000)
    ap.add_argument("--pq-bytes", type=int, default=48)
    ap.add_argument("--nprobes", default="1,2,4,8,16,32,64,128,256")
    ap.add_argument("--refine", default="10,40", help="comma list of refine factors")
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--cores", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=2)
    return ap.parse_args(argv)


def main(argv=None):
    for var in ("LANCE_LOG", "LANCEDB_LOG", "RUST_LOG"):  # one deprecation warning per query otherwise
        os.environ.setdefault(var, "error")
    import lancedb
    import numpy as np
    import pyarrow as pa

    a = parse_args(argv)
    cpus = C.pin_threads(a.cores, a.threads)
    data = C.load_dataset(a.dataset, a.max_base, a.eval_start, a.max_queries)
    base = data["base"]
    n, d = base.shape
    work = Path(a.workdir)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    partitions = max(1, int(math.sqrt(n)))
    C.log(f"[lancedb] building n={n} d={d} IVF{partitions}-PQ{a.pq_bytes} (dot)")
    t0 = time.perf_counter()
    db = lancedb.connect(str(work))
    vectors = pa.FixedSizeListArray.from_arrays(pa.array(base.reshape(-1), pa.float32()), d)
    table = db.create_table("vectors", pa.table({"id": pa.array(np.arange(n, dtype=np.int64)), "vector": vectors}))
    load_s = time.perf_counter() - t0
    table.create_index(metric="dot", num_partitions=partitions, num_sub_vectors=a.pq_bytes, index_type="IVF_PQ")
    build_s = time.perf_counter() - t0
    C.log(f"[lancedb] built in {build_s:.1f} s (table written in {load_s:.1f} s)")

    def one(q, nprobes: int, refine: int):
        r = (table.search(q).distance_type("dot").nprobes(nprobes).refine_factor(refine)
             .limit(a.k).select(["id"]).to_arrow())
        ids = r.column("id").to_numpy()
        return np.pad(ids, (0, a.k - len(ids)), constant_values=-1)

    points = []
    with ThreadPoolExecutor(a.threads) as pool:
        list(pool.map(lambda q: one(q, 8, 10), data["queries"]["id"][:50]))
        for qs in C.QUERY_SETS:
            Q, gt = data["queries"][qs], data["gt"][qs]
            for refine in [int(x) for x in a.refine.split(",")]:
                for nprobes in [int(x) for x in a.nprobes.split(",")]:
                    best, ids = None, None
                    for _ in range(a.reps):
                        t = time.perf_counter()
                        ids = np.stack(list(pool.map(lambda q, p=nprobes, r=refine: one(q, p, r), Q)))
                        dt = time.perf_counter() - t
                        best = dt if best is None else min(best, dt)
                    pt = {"query_set": qs, "param": nprobes, "refine": refine,
                          "recall": C.recall_at_k(ids, gt, a.k), "qps": len(Q) / best, "seconds": best}
                    points.append(pt)
                    C.log(f"[lancedb] {qs:3s} nprobes={nprobes:4d} refine={refine:3d} "
                          f"recall@{a.k}={pt['recall']:.4f} qps={pt['qps']:8.1f}")
    from importlib.metadata import version
    files = C.dir_bytes(work)
    results = {"library": "lancedb", "version": version("lancedb"), "cpus": cpus, "n": n, "d": d,
               "params": {"partitions": partitions, "pq_bytes": a.pq_bytes, "metric": "dot",
                          "refine": a.refine, "threads": a.threads},
               "build": {"seconds": build_s, "table_seconds": load_s, "peak_rss_bytes": C.peak_rss_bytes()},
               "disk_bytes": sum(files.values()),
               # what its searches keep in RAM: the IVF centroids and PQ codes (the index files)
               "index_ram_bytes": sum(v for k, v in files.items() if "_indices" in k), "points": points}
    C.write_json(a.out, results)
    C.log(f"[lancedb] results in {a.out}")


if __name__ == "__main__":
    main()
