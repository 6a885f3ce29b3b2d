"""Build and sweep the in-RAM peers (faiss IVF-PQ, with and without re-ranking, and hnswlib).

Runs in .venv-peers (faiss-cpu 1.15, hnswlib 0.8.0, numpy 2); bench/ann.py starts it as a
subprocess. Both libraries keep their whole index in RAM, so there are no sector reads:
- faiss "IVF{nlist},PQ{m}" (inner product): m = --pq-bytes sub-quantisers of 8 bits, the same
  code size as the disk indexes' in-RAM PQ. Sweeps nprobe. Reports the mean number of PQ codes
  scanned per query (faiss.cvar.indexIVF_stats.ndis).
- faiss "IVF{nlist},PQ{m},RFlat": the same, re-ranking the top k * --refine-factor with the
  exact float32 vectors, which it holds in RAM (as the disk indexes re-rank with vectors they
  read from disk). Sweeps nprobe.
- hnswlib "ip" with M = R / 2 (so 2M = R links on the base layer) and ef_construction = L.
  Sweeps ef.
Index RAM is the serialised index size (what the index object holds) and the RSS growth of
building it (which also counts allocator slack and training buffers).

Usage (normally via bench/ann.py):
  .venv-peers/bin/python bench/peers/faiss_hnsw_runner.py --dataset ../shared/data/ann/pypi-minilm \
      --out WORK/faiss_hnsw.json
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dataset", required=True)
    ap.add_argument("--out", required=True, help="JSON results file")
    ap.add_argument("--libs", default="faiss-ivfpq,faiss-ivfpq-rflat,hnswlib")
    ap.add_argument("--max-base", type=int, default=0)
    ap.add_argument("--max-queries", type=int, default=0)
    ap.add_argument("--eval-start", type=int, default=1000)
    ap.add_argument("--R", type=int, default=64)
    ap.add_argument("--L", type=int, default=100)
    ap.add_argument("--pq-bytes", type=int, default=48)
    ap.add_argument("--nlist", type=int, default=0, help="IVF lists (0: power of 2 near 4 sqrt(N))")
    ap.add_argument("--nprobes", default="1,2,4,8,16,32,64,128")
    ap.add_argument("--refine-factor", type=int, default=10)
    ap.add_argument("--efs", default="10,20,30,50,70,100,150,200")
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--cores", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=2, help="timed repetitions per point; best kept")
    ap.add_argument("--seed", type=int, default=0)
    return ap.parse_args(argv)


def sweep(name, data, k, reps, values, set_value, search, extra=None):
    """Time `search(Q)` for every value of the swept parameter on both query sets."""
    points = []
    for qs in C.QUERY_SETS:
        Q, gt = data["queries"][qs], data["gt"][qs]
        for v in values:
            set_value(v)
            best, ids, ext = None, None, {}
            for _ in range(reps):
                t0 = time.perf_counter()
                ids = search(Q)
                dt = time.perf_counter() - t0
                best = dt if best is None else min(best, dt)
                if extra:
                    ext = extra(len(Q))
            pt = {"query_set": qs, "param": v, "recall": C.recall_at_k(ids, gt, k),
                  "qps": len(Q) / best, "seconds": best, "mean_reads": None, **ext}
            points.append(pt)
            C.log(f"[{name}] {qs:3s} {v:5d} recall@{k}={pt['recall']:.4f} qps={pt['qps']:9.1f}"
                  + "".join(f" {a}={b:.0f}" for a, b in ext.items()))
    return points


def run_faiss(a, data, refine: bool) -> dict:
    import faiss

    faiss.omp_set_num_threads(a.threads)
    base = data["base"]
    n, d = base.shape
    nlist = a.nlist or 2 ** round(math.log2(4 * math.sqrt(n)))
    key = f"IVF{nlist},PQ{a.pq_bytes}" + (",RFlat" if refine else "")
    name = "faiss-ivfpq-rflat" if refine else "faiss-ivfpq"
    C.log(f"[{name}] building {key} on n={n}")
    rss0 = C.rss_bytes()
    t0 = time.perf_counter()
    index = faiss.index_factory(d, key, faiss.METRIC_INNER_PRODUCT)
    # index_factory turns on polysemous training (a slow code reordering used only by
    # Hamming-filtered search, which this benchmark does not use).
    ivf = faiss.downcast_index(index.base_index) if refine else index
    ivf.do_polysemous_training = False
    index.train(base)
    index.add(base)
    build_s = time.perf_counter() - t0
    rss = C.rss_bytes() - rss0
    size = int(faiss.serialize_index(index).size)
    C.log(f"[{name}] built in {build_s:.1f} s, serialised {size / 2**20:.1f} MiB")
    if refine:
        index.k_factor = a.refine_factor
    stats = faiss.cvar.indexIVF_stats

    def set_nprobe(v):
        ivf.nprobe = v
        stats.reset()

    def search(Q):
        stats.reset()
        return index.search(Q, a.k)[1]

    def extra(nq):
        return {"mean_codes_scanned": stats.ndis / nq}

    nprobes = [p for p in (int(x) for x in a.nprobes.split(",")) if p <= nlist]
    points = sweep(name, data, a.k, a.reps, nprobes, set_nprobe, search, extra)
    return {"library": name, "version": faiss.__version__, "factory": key,
            "params": {"nlist": nlist, "pq_bytes": a.pq_bytes,
                       "refine_factor": a.refine_factor if refine else None, "swept": "nprobe"},
            "build": {"seconds": build_s, "peak_rss_bytes": C.peak_rss_bytes()},
            "runs": [{"threads": a.threads, "index_ram_bytes": size,
                      "index_ram_rss_delta_bytes": rss, "points": points}]}


def run_hnsw(a, data) -> dict:
    import hnswlib

    base = data["base"]
    n, d = base.shape
    M = max(2, a.R // 2)
    C.log(f"[hnswlib] building M={M} ef_construction={a.L} on n={n}")
    rss0 = C.rss_bytes()
    t0 = time.perf_counter()
    index = hnswlib.Index(space="ip", dim=d)
    index.init_index(max_elements=n, ef_construction=a.L, M=M, random_seed=a.seed)
    index.add_items(base, num_threads=a.threads)
    build_s = time.perf_counter() - t0
    rss = C.rss_bytes() - rss0
    # Level-0 element = links (4 + 2M * 4) + vector (4d) + label (8); upper levels are small.
    size = n * (4 + 2 * M * 4 + 4 * d + 8)
    C.log(f"[hnswlib] built in {build_s:.1f} s, RSS +{rss / 2**20:.1f} MiB")

    def search(Q):
        return index.knn_query(Q, k=a.k, num_threads=a.threads)[0]

    efs = [max(a.k, int(x)) for x in a.efs.split(",")]
    points = sweep("hnswlib", data, a.k, a.reps, efs, index.set_ef, search)
    return {"library": "hnswlib", "version": "0.8.0",
            "params": {"M": M, "ef_construction": a.L, "swept": "ef"},
            "build": {"seconds": build_s, "peak_rss_bytes": C.peak_rss_bytes()},
            "runs": [{"threads": a.threads, "index_ram_bytes": size,
                      "index_ram_rss_delta_bytes": rss, "points": points}]}


def main(argv=None):
    a = parse_args(argv)
    cpus = C.pin_threads(a.cores, a.threads)
    data = C.load_dataset(a.dataset, a.max_base, a.eval_start, a.max_queries)
    out = {"cpus": cpus, "n": int(data["base"].shape[0]), "peers": []}
    for lib in a.libs.split(","):
        if lib == "faiss-ivfpq":
            out["peers"].append(run_faiss(a, data, refine=False))
        elif lib == "faiss-ivfpq-rflat":
            out["peers"].append(run_faiss(a, data, refine=True))
        elif lib == "hnswlib":
            out["peers"].append(run_hnsw(a, data))
        else:
            raise SystemExit(f"unknown peer {lib!r}")
        C.write_json(a.out, out)  # partial results survive a later failure
    C.log(f"[peers] results in {a.out}")


if __name__ == "__main__":
    main()
