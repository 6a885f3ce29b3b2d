"""Navigation precision: what a disk index's PQ navigation costs against the same graph
navigated with exact distances, and what the score-aware weight eta does to it.

    .venv/bin/python bench/navigation.py --dataset synthetic-gap --n 100000   # 1152-d images and texts
    .venv/bin/python bench/navigation.py --dataset minilm                     # the shared 100k x 384 set

Builds one Vamana graph (`build_vamana` over int8 rows, R and L as given) and one query-aware
codec (`train_pq` on the first --train OOD queries: a quarter of them held out to choose eta).
Then, for the evaluated ID ("images") and OOD ("texts") queries, recall@10 at each L of:
- `pq eta=E`: the index's beam search (`Index.search`: PQ navigation, the expanded records
  re-ranked exactly) with every vector coded at each eta of `pq.ETA_CHOICES`, the chosen one
  marked;
- `exact navigation`: greedy search over the same graph with exact distances (what any
  navigation code could reach at best on this graph);
- `pq scan + re-rank X`: every code scored, the best X re-ranked exactly (the codes alone,
  no graph) at the chosen eta.
Writes bench/results/navigation-<dataset>.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH / "peers"))
import _common as C  # noqa: E402

from memescale.index.build import IndexParams, write_built_index  # noqa: E402
from memescale.index.kernels import int8_scale, int8_stride, quantize_int8  # noqa: E402
from memescale.index.pq import ETA_CHOICES, train_pq  # noqa: E402
from memescale.index.search import Index  # noqa: E402
from memescale.index.vamana import VISIT_TABLE, build_vamana, greedy_search, vector_norms  # noqa: E402


def load(a) -> dict:
    """base (n, d) float16; train (nt, d), id and ood (ne, d) float32 queries; gt_id, gt_ood (ne, 10)."""
    if a.dataset == "synthetic-gap":
        sys.path.insert(0, str(BENCH))
        from ann import synthetic_gap
        s = synthetic_gap(a.n, a.train + a.queries)
        base = s["base"]
        ood = s["queries_ood"].astype(np.float32)
        data = {"base": base, "train": ood[:a.train], "ood": ood[a.train:],
                "id": s["queries_id"][a.train:].astype(np.float32)}
    else:
        folder = Path(a.dataset if a.dataset != "minilm" else BENCH.parent.parent / "shared/data/ann/pypi-minilm")
        base = np.load(folder / "base.npy")[: a.n or None].astype(np.float16)
        ood = np.load(folder / "queries_ood.npy").astype(np.float32)
        data = {"base": base, "train": ood[:a.train], "ood": ood[a.train:a.train + a.queries],
                "id": np.load(folder / "queries_id.npy")[a.train:a.train + a.queries].astype(np.float32)}
    for qs in ("id", "ood"):
        data[f"gt_{qs}"] = C.exact_topk(data["base"], data[qs], 10)
    return data


def exact_navigation(X: np.ndarray, norms: np.ndarray, graph: tuple[np.ndarray, np.ndarray], start: int,
                     Q: np.ndarray, L: int) -> tuple[np.ndarray, float]:
    """Top-10 ids (nq, 10) of greedy search with exact distances, and expansions per query."""
    vis = np.zeros(VISIT_TABLE, np.int64)
    found = np.empty((len(Q), 10), np.int64)
    expanded = 0
    for i, q in enumerate(Q):
        ids, ds, vis = greedy_search(X, norms, graph[0], graph[1], start, q, np.float32(q @ q), L, vis, i + 1)
        found[i] = ids[np.argsort(ds)[:10]]
        expanded += len(ids)
    return found, expanded / len(Q)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dataset", default="synthetic-gap", help="synthetic-gap, minilm, or a dataset folder")
    ap.add_argument("--n", type=int, default=100_000, help="base vectors (synthetic-gap: generated; else a prefix)")
    ap.add_argument("--train", type=int, default=1000, help="OOD queries the codec trains on")
    ap.add_argument("--queries", type=int, default=1000, help="evaluated queries per set")
    ap.add_argument("--R", type=int, default=64)
    ap.add_argument("--L", type=int, default=100, help="build list size")
    ap.add_argument("--pq-bytes", type=int, default=48)
    ap.add_argument("--Ls", default="20,30,50,100,200,400")
    ap.add_argument("--scan", default="10,100,400,1000")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--results", default=str(BENCH / "results"))
    a = ap.parse_args(argv)
    Ls = [int(x) for x in a.Ls.split(",")]
    t0 = time.perf_counter()
    data = load(a)
    base = data["base"]
    n, d = base.shape
    print(f"{a.dataset}: {n:,} x {d}, {len(data['train'])} training and {len(data['id'])} + {len(data['ood'])} "
          f"evaluated queries ({time.perf_counter() - t0:.0f} s)", flush=True)
    t0 = time.perf_counter()
    X8 = quantize_int8(base, int8_scale(base[::int8_stride(n)]))
    nb, deg, medoid = build_vamana(X8, a.R, a.L, 1.2, 0, threads=a.threads)
    del X8
    graph_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    codec = train_pq(base, a.pq_bytes, queries=data["train"], threads=a.threads)
    pq_s = time.perf_counter() - t0
    print(f"graph {graph_s:.0f} s (mean degree {deg.mean():.1f}), codec {pq_s:.0f} s, chosen eta {codec.eta:g}",
          flush=True)
    rows: list[dict] = []

    def add(method: str, qs: str, L: int | None, found: np.ndarray, **extra) -> None:
        r = round(C.recall_at_k(found, data[f"gt_{qs}"], 10), 4)
        rows.append({"method": method, "queries": qs, "L": L, "recall@10": r, **extra})
        print(f"  {method:28s} {qs:4s} {'' if L is None else f'L={L}':6s} recall@10 {r:.4f} "
              + " ".join(f"{k} {v}" for k, v in extra.items()), flush=True)

    work = Path(tempfile.mkdtemp(prefix="memescale-navigation-"))
    try:
        params = IndexParams(R=a.R, L=a.L, pq_bytes=a.pq_bytes, threads=a.threads)
        for eta in ETA_CHOICES:
            codes = codec.encode(base, threads=a.threads, eta=eta)
            folder = work / f"eta-{eta:g}"
            write_built_index(folder, base, (nb, deg), codec, codes, None, np.array([medoid]), params)
            name = f"pq eta={eta:g}" + (" (chosen)" if eta == codec.eta else "")
            with Index.open(folder, threads=a.threads) as index:
                for qs in ("id", "ood"):
                    for L in Ls:
                        ids, _, stats = index.search(data[qs], 10, L=L)
                        add(name, qs, L, ids, reads=round(float(stats["reads"].mean()), 1))
            if eta == codec.eta:
                for qs in ("id", "ood"):
                    est = codec.scores(data[qs], codes)
                    exact = data[qs] @ base.T.astype(np.float32)
                    for width in (int(x) for x in a.scan.split(",")):
                        best = np.argpartition(-est, width - 1, axis=1)[:, :width]
                        order = np.argsort(-np.take_along_axis(exact, best, axis=1), axis=1)[:, :10]
                        add(f"pq scan + re-rank {width}", qs, None, np.take_along_axis(best, order, axis=1))
            shutil.rmtree(folder)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    X = base.view(np.uint16)
    norms = vector_norms(X, a.threads)
    for qs in ("id", "ood"):
        for L in Ls:
            found, expanded = exact_navigation(X, norms, (nb, deg), int(medoid), data[qs], L)
            add("exact navigation", qs, L, found, expanded=round(expanded, 1))

    out = Path(a.results)
    out.mkdir(parents=True, exist_ok=True)
    tag = a.dataset if a.dataset in ("synthetic-gap", "minilm") else Path(a.dataset).name
    summary = {"args": vars(a), "n": n, "d": d, "graph_seconds": graph_s, "pq_seconds": pq_s, "chosen_eta": codec.eta,
               "load_average_at_end": os.getloadavg(), "rows": rows}
    (out / f"navigation-{tag}.json").write_text(json.dumps(summary, indent=1))
    methods = list(dict.fromkeys(r["method"] for r in rows if r["L"] is not None))
    lines = [f"recall@10 on {tag} ({n:,} x {d}, R={a.R} L={a.L}, {a.pq_bytes} PQ bytes; chosen eta {codec.eta:g})", "",
             "| method | queries | " + " | ".join(f"L={L}" for L in Ls) + " |",
             "|---|---|" + "---|" * len(Ls)]
    for m in methods:
        for qs in ("id", "ood"):
            got = {r["L"]: r["recall@10"] for r in rows if r["method"] == m and r["queries"] == qs}
            lines.append(f"| {m} | {qs} | " + " | ".join(f"{got.get(L, float('nan')):.3f}" for L in Ls) + " |")
    lines.append("")
    lines += [f"- {r['method']} ({r['queries']}): {r['recall@10']:.3f}" for r in rows if r["L"] is None]
    (out / f"navigation-{tag}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
