"""Construction ranked by navigation codes against construction ranked by exact distances.

    .venv/bin/python bench/navigation.py --dataset minilm                 # the shared 100k x 384 set
    .venv/bin/python bench/navigation.py --dataset synthetic-gap --n 200000 --R 64 --L 128

Builds the same Vamana graph (`build_vamana` over int8 rows, as a shard task does) twice per
round, with `nav_dsub=0` (every candidate scored on its full row) and with the default
navigation codes (`vamana.NAV_DSUB` dimensions per byte), alternating for `--rounds` rounds in
one process so that both see the same machine. Reports build seconds (the best and every
round's) and the graph's recall@10 for queries searched with exact distances
(`greedy_search`) at several L, against exact ground truth. Writes
bench/results/navigation-<dataset>.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from memescale.index.kernels import exact_topk, int8_scale, quantize_int8, squared_norms  # noqa: E402
from memescale.index.vamana import NAV_DSUB, VISIT_TABLE, build_vamana, greedy_search  # noqa: E402

RESULTS = ROOT / "bench" / "results"
SHARED = ROOT.parent / "shared" / "data" / "ann" / "pypi-minilm"


def load(dataset: str, n: int, nq: int) -> tuple[np.ndarray, np.ndarray]:
    """(base (n, d) float16, queries (nq, d) float32)."""
    if dataset == "minilm":
        if not (SHARED / "base.npy").exists():
            raise SystemExit(f"the shared MiniLM set is not at {SHARED}")
        base = np.load(SHARED / "base.npy")[:n].astype(np.float16)
        return base, np.load(SHARED / "queries_ood.npy")[:nq].astype(np.float32)
    import ann

    if dataset == "synthetic-gap":
        data = ann.synthetic_gap(n=n, nq=nq)
        return data["base"], data["queries_ood"].astype(np.float32)
    data = ann.synthetic(n, nq)
    return data["base"], data["queries_ood"].astype(np.float32)


def graph_recall(base: np.ndarray, norms: np.ndarray, graph: tuple, queries: np.ndarray, gt: np.ndarray,
                 L: int) -> float:
    nb, deg, medoid = graph
    vis = np.zeros(VISIT_TABLE, np.int64)
    hits = 0
    for i, q in enumerate(queries):
        ids, d, vis = greedy_search(base.view(np.uint16), norms, nb, deg, medoid, q, np.float32(q @ q), L, vis, i + 1)
        hits += len(np.intersect1d(ids[np.argsort(d, kind="stable")[:10]], gt[i]))
    return hits / (10 * len(queries))


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dataset", choices=["minilm", "synthetic", "synthetic-gap"], default="minilm")
    ap.add_argument("--n", type=int, default=100_000)
    ap.add_argument("--queries", type=int, default=500)
    ap.add_argument("--R", type=int, default=64)
    ap.add_argument("--L", type=int, default=100)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--Ls", default="16,32,64,128")
    a = ap.parse_args(argv)

    base, queries = load(a.dataset, a.n, a.queries)
    n, d = base.shape
    X8 = quantize_int8(base, int8_scale(base[:: max(1, n // 20_000)].astype(np.float32)))
    gt, _ = exact_topk(queries, base, 10)
    norms = np.empty(n, np.float32)
    squared_norms(base.view(np.uint16), 0, n, norms)
    build_vamana(X8[:20_000], R=a.R, L=a.L, threads=a.threads, progress=False, nav_dsub=0)  # compile both kernels
    build_vamana(X8[:20_000], R=a.R, L=a.L, threads=a.threads, progress=False, nav_dsub=NAV_DSUB)

    Ls = [int(x) for x in a.Ls.split(",")]
    runs: dict[str, dict] = {}
    for _ in range(a.rounds):
        for name, nav in (("exact", 0), (f"codes ({-(-d // NAV_DSUB)} B)", NAV_DSUB)):
            t = time.perf_counter()
            graph = build_vamana(X8, R=a.R, L=a.L, threads=a.threads, progress=False, nav_dsub=nav)
            seconds = time.perf_counter() - t
            r = runs.setdefault(name, {"seconds": [], "load": []})
            r["seconds"].append(round(seconds, 1))
            r["load"].append(round(os.getloadavg()[0], 2))
            r["recall"] = {L: round(graph_recall(base, norms, graph, queries, gt, L), 4) for L in Ls}
            print(name, f"{seconds:.1f} s", r["recall"], flush=True)

    names = list(runs)
    ratio = min(runs[names[1]]["seconds"]) / min(runs[names[0]]["seconds"])
    lines = [f"{a.dataset}: {n:,} x {d}, R={a.R} L={a.L}, {a.threads} threads, {len(queries)} queries, "
             f"{a.rounds} rounds alternating", "",
             "| construction ranked by | build s (best; every round) | load average | "
             + " | ".join(f"recall@10 L={L}" for L in Ls) + " |", "|" + "---|" * (3 + len(Ls))]
    for name, r in runs.items():
        lines.append(f"| {name} | {min(r['seconds'])} ({', '.join(map(str, r['seconds']))}) | "
                     f"{', '.join(map(str, r['load']))} | " + " | ".join(str(r["recall"][L]) for L in Ls) + " |")
    lines += ["", f"codes / exact build time: {ratio:.2f}x"]
    text = "\n".join(lines)
    print(text)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"navigation-{a.dataset}.md").write_text(text + "\n")
    (RESULTS / f"navigation-{a.dataset}.json").write_text(json.dumps({"args": vars(a), "runs": runs}, indent=1))


if __name__ == "__main__":
    main()
