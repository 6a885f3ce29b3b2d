"""Vamana construction variants side by side: passes, and navigation codes against exact distances.

    .venv/bin/python bench/construction.py --dataset minilm                 # the shared 100k x 384 set
    .venv/bin/python bench/construction.py --dataset synthetic-gap --n 200000 --R 64 --L 128
    .venv/bin/python bench/construction.py --variants two-pass,one-pass    # Algorithm 3 against one pass
    .venv/bin/python bench/construction.py --dataset minilm-1152 --variants two-pass,two-pass-codes:24

`minilm-1152` is the shared set mapped by a fixed isometry into 1152 dimensions (distances
unchanged): real neighbourhoods at the real model's width, the rows' bytes of SigLIP's.

Builds the same Vamana graph (`build_vamana` over int8 rows, as a shard task does) once per
variant per round, alternating for `--rounds` rounds in one process so that every variant
sees the same machine. Variants: `two-pass` (Algorithm 3: alpha 1, then alpha; every candidate
scored on its full row), `one-pass` (a single pass with alpha), and either with `-codes`
(the construction searches ranked by navigation codes of `vamana.NAV_DSUB` dimensions per
byte) or `-codes:S` (S dimensions per byte). Reports build seconds (the best and every round's) and the graph's recall@10 for
queries searched with exact distances (`greedy_search`) at several L, against exact ground
truth. Writes bench/results/construction-<dataset>-<query set>.{json,md} (with `--sizes`,
construction-<dataset>-growth.{json,md}).
"""

from __future__ import annotations

import argparse
import json
import math
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


def variant(name: str) -> tuple[int, int]:
    """(passes, nav_dsub) of a variant name (module doc)."""
    head, codes, dsub = name.partition("-codes")
    passes = {"two-pass": 2, "one-pass": 1}.get(head)
    if passes is None or (dsub and not dsub[1:].isdigit()):
        raise SystemExit(f"unknown variant {name!r}: two-pass or one-pass, optionally -codes or -codes:S")
    return passes, (int(dsub[1:]) if dsub else NAV_DSUB) if codes else 0


def load(dataset: str, n: int, nq: int, kind: str) -> tuple[np.ndarray, np.ndarray]:
    """(base (n, d) float16, queries (nq, d) float32); kind: "id" or "ood" queries."""
    if dataset.startswith("minilm"):
        if not (SHARED / "base.npy").exists():
            raise SystemExit(f"the shared MiniLM set is not at {SHARED}")
        base = np.load(SHARED / "base.npy")[:n].astype(np.float32)
        queries = np.load(SHARED / f"queries_{kind}.npy")[:nq].astype(np.float32)
        if dataset == "minilm-1152":  # the same vectors, isometrically embedded at the real model's width
            Q = np.linalg.qr(np.random.default_rng(0).standard_normal((1152, base.shape[1])))[0].T.astype(np.float32)
            base, queries = base @ Q, queries @ Q
        return base.astype(np.float16), queries
    import ann

    data = ann.synthetic_gap(n=n, nq=nq) if dataset == "synthetic-gap" else ann.synthetic(n, nq)
    return data["base"], data[f"queries_{kind}"].astype(np.float32)


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
    ap.add_argument("--dataset", choices=["minilm", "minilm-1152", "synthetic", "synthetic-gap"], default="minilm")
    ap.add_argument("--n", type=int, default=100_000)
    ap.add_argument("--queries", type=int, default=500)
    ap.add_argument("--R", type=int, default=64)
    ap.add_argument("--L", type=int, default=100)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--Ls", default="16,32,64,128")
    ap.add_argument("--variants", default="two-pass,two-pass-codes",
                    help="comma-separated (module doc), the first the reference of the time ratios")
    ap.add_argument("--query-set", choices=["id", "ood"], default="ood")
    ap.add_argument("--sizes", default="",
                    help="comma-separated graph sizes (each <= --n): time the first variant on the first rows of each "
                         "size instead (how the cost per inserted point grows with a shard's size)")
    a = ap.parse_args(argv)

    base, queries = load(a.dataset, a.n, a.queries, a.query_set)
    n, d = base.shape
    X8 = quantize_int8(base, int8_scale(base[:: max(1, n // 20_000)].astype(np.float32)))
    gt, _ = exact_topk(queries, base, 10)
    norms = np.empty(n, np.float32)
    squared_norms(base.view(np.uint16), 0, n, norms)
    variants = {name: variant(name) for name in a.variants.split(",")}
    for passes, nav in variants.values():  # compile the kernels each variant uses
        build_vamana(X8[:20_000], R=a.R, L=a.L, threads=a.threads, progress=False, nav_dsub=nav, passes=passes)

    if a.sizes:
        growth(a, X8, *next(iter(variants.items())))
        return
    Ls = [int(x) for x in a.Ls.split(",")]
    runs: dict[str, dict] = {}
    for _ in range(a.rounds):
        for name, (passes, nav) in variants.items():
            if nav:
                name += f" ({-(-d // nav)} B)"
            t = time.perf_counter()
            graph = build_vamana(X8, R=a.R, L=a.L, threads=a.threads, progress=False, nav_dsub=nav, passes=passes)
            seconds = time.perf_counter() - t
            r = runs.setdefault(name, {"seconds": [], "load": []})
            r["seconds"].append(round(seconds, 1))
            r["load"].append(round(os.getloadavg()[0], 2))
            r["recall"] = {L: round(graph_recall(base, norms, graph, queries, gt, L), 4) for L in Ls}
            print(name, f"{seconds:.1f} s", r["recall"], flush=True)

    names = list(runs)
    lines = [f"{a.dataset}: {n:,} x {d}, R={a.R} L={a.L}, {a.threads} threads, {len(queries)} {a.query_set} queries, "
             f"{a.rounds} rounds alternating", "",
             "| construction | build s (best; every round) | load average | "
             + " | ".join(f"recall@10 L={L}" for L in Ls) + " |", "|" + "---|" * (3 + len(Ls))]
    for name, r in runs.items():
        lines.append(f"| {name} | {min(r['seconds'])} ({', '.join(map(str, r['seconds']))}) | "
                     f"{', '.join(map(str, r['load']))} | " + " | ".join(str(r["recall"][L]) for L in Ls) + " |")
    lines.append("")
    lines += [f"{name} / {names[0]} build time: {min(runs[name]['seconds']) / min(runs[names[0]]['seconds']):.2f}x"
              for name in names[1:]]
    text = "\n".join(lines)
    print(text)
    write_results(f"construction-{a.dataset}-{a.query_set}", text, {"args": vars(a), "runs": runs})


def write_results(stem: str, text: str, payload: dict) -> None:
    """bench/results/<stem>.md (the table) and <stem>.json (the figures)."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{stem}.md").write_text(text + "\n")
    (RESULTS / f"{stem}.json").write_text(json.dumps(payload, indent=1))


def growth(a: argparse.Namespace, X8: np.ndarray, name: str, variant_: tuple[int, int]) -> None:
    """Build seconds of one variant at each of --sizes (the first rows), and the exponent b of
    seconds ~ size^b between consecutive sizes: b > 1 is the extra cost per point of a larger
    graph (longer search paths, colder rows), which a per-point cost fitted on small shards
    leaves out."""
    passes, nav = variant_
    rows = []
    sizes = sorted({int(x) for x in a.sizes.split(",")})
    for size in sizes:
        if size > X8.shape[0]:
            raise SystemExit(f"size {size:,} exceeds --n {X8.shape[0]:,}")
        t = time.perf_counter()
        build_vamana(X8[:size], R=a.R, L=a.L, threads=a.threads, progress=False, nav_dsub=nav, passes=passes)
        seconds = time.perf_counter() - t
        rows.append({"n": size, "seconds": round(seconds, 1), "us_per_point_thread": round(seconds * a.threads / size * 1e6),
                     "load": round(os.getloadavg()[0], 2)})
        print(rows[-1], flush=True)
    lines = [f"{a.dataset}, {name}: R={a.R} L={a.L}, {a.threads} threads", "",
             "| points | build s | us per point x thread | exponent from the previous size | load average |",
             "|---|---|---|---|---|"]
    for i, r in enumerate(rows):
        b = (f"{math.log(r['seconds'] / rows[i - 1]['seconds']) / math.log(r['n'] / rows[i - 1]['n']):.3f}"
             if i else "")
        lines.append(f"| {r['n']:,} | {r['seconds']} | {r['us_per_point_thread']} | {b} | {r['load']} |")
    if len(rows) >= 2:
        b = math.log(rows[-1]["seconds"] / rows[0]["seconds"]) / math.log(rows[-1]["n"] / rows[0]["n"])
        lines += ["", f"seconds ~ points^{b:.3f} from {rows[0]['n']:,} to {rows[-1]['n']:,}"]
    text = "\n".join(lines)
    print(text)
    write_results(f"construction-{a.dataset}-growth", text, {"args": vars(a), "rows": rows})


if __name__ == "__main__":
    main()
