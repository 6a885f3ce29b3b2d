"""Filtered search at every selectivity: the planner against post-filtering.

    .venv/bin/python bench/filters.py                 # the shared 100k MiniLM set
    .venv/bin/python bench/filters.py --queries 300
    .venv/bin/python bench/filters.py --dataset synthetic-1m

`--dataset synthetic-1m`: 1M vectors made from the shared set, ten per base vector, each
the base vector plus Gaussian noise of norm 0.5, renormalised (seeded; cosine about 0.89 to
its source, 0.8 between siblings), with the same kind of labels; queries and ground truth as
for the shared set. The built index is kept in `--work` and reused by a rerun with the same
dataset (delete the folder to rebuild).

On ../shared/data/ann/pypi-minilm (384-d): the base vectors get synthetic labels, subreddits
with Zipf-like sizes drawn so that single subreddits hold 50%, 10%, 1%, 0.1% and 0.01% of
the images (the rest spread over a long tail), upload times over 2010-2024 and scores. The
index is built once (R=64, L=100, 48 PQ bytes). Each filter runs through `SearchEngine`, as
the server runs it, twice: with the planner (labels inside the traversal, or a member scan)
and with post-filtering only (the same index seen without its labels: one search, then one
4x deeper when too few survive, as before the labels existed). Per filter: recall@10 against
exact filtered ground truth, QPS (one query at a time, one thread, the best of 3 rounds), index reads per query,
and whether page 10 of 24 is full where the matching set is that large. Then, for each filter
a scan can take, both plans forced: where the planner's choice should switch.
Writes bench/results/filters[-<dataset>].{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
sys.path.insert(0, str(ROOT))

import memescale.search.engine as engine_mod  # noqa: E402
from memescale.config import ServeConfig  # noqa: E402
from memescale.index import Index, IndexParams, build_index  # noqa: E402
from memescale.index.eval import exact_ground_truth  # noqa: E402
from memescale.search.engine import SearchEngine, parse_filters  # noqa: E402
from memescale.search.requests import Filters  # noqa: E402

DATA = ROOT.parent / "shared" / "data" / "ann" / "pypi-minilm"
SHARES = {"half": 0.5, "tenth": 0.1, "one_pct": 0.01, "tenth_pct": 0.001, "hundredth_pct": 0.0001}
T0, T1 = 1_262_304_000, 1_704_067_200  # 2010-01-01 .. 2024-01-01
ROUNDS = 3


class WithoutLabels:
    """The index as the engine saw it before labels: it post-filters."""

    def __init__(self, index: Index):
        self._i = index

    def __getattr__(self, name):
        if name in ("labels", "scan"):
            raise AttributeError(name)
        return getattr(self._i, name)

    def __len__(self) -> int:
        return len(self._i)


def synthetic(base: np.ndarray, copies: int, noise: float = 0.5, seed: int = 0) -> np.ndarray:
    """(copies * n, d) float32 unit rows: row j * n + i is base[i] plus noise of norm `noise`."""
    rng = np.random.default_rng(seed)
    n, d = base.shape
    out = np.empty((copies * n, d), np.float32)
    for j in range(copies):
        g = rng.standard_normal((n, d), dtype=np.float32)
        g *= noise / np.linalg.norm(g, axis=1, keepdims=True)
        v = base / np.linalg.norm(base, axis=1, keepdims=True) + g
        out[j * n:(j + 1) * n] = v / np.linalg.norm(v, axis=1, keepdims=True)
    return out


def labels_for(n: int, seed: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)
    sub = np.empty(n, object)
    order = rng.permutation(n)
    at = 0
    for name, share in SHARES.items():
        k = int(round(share * n))
        sub[order[at:at + k]] = name
        at += k
    tail = order[at:]  # a long tail of small subreddits
    sub[tail] = [f"tail{int(z) % 5000}" for z in rng.zipf(1.3, tail.size)]
    return [{"image_id": 10**12 + i, "subreddit": sub[i], "created_utc": int(rng.integers(T0, T1)),
             "score": int(rng.pareto(1.1) * 10), "over_18": bool(rng.random() < 0.08), "title": f"row {i}"}
            for i in range(n)]


def run(engine: SearchEngine, queries: np.ndarray, f: Filters, keep: np.ndarray, x: np.ndarray) -> dict:
    spec = parse_filters(f)
    rows = np.flatnonzero(keep)
    want = rows[exact_ground_truth(x[rows], queries, min(10, rows.size))[0]] if rows.size else None
    hits, reads, plans = 0, 0, set()
    for q in queries[:5]:  # warm up: kernels compiled, caches filled
        engine.search(q, None, spec, False, 0, 10)
    dt = float("inf")
    for _ in range(ROUNDS):  # the best of a few rounds: this machine's speed wanders
        t0 = time.perf_counter()
        pages = [engine.search(q, None, spec, False, 0, 10) for q in queries]
        dt = min(dt, time.perf_counter() - t0)
    for i, page in enumerate(pages):
        reads += page["stats"]["reads"]
        plans.add(page["stats"].get("plan", "graph"))
        if want is not None:
            hits += len({r["id"] for r in page["results"]} & set(want[i].tolist()))
    denom = 10 * len(queries) if rows.size >= 10 else max(1, rows.size * len(queries))
    deep = engine.search(queries[0], None, spec, False, 9 * 24, 24)
    return {"recall": hits / denom, "qps": len(queries) / dt, "reads": reads / len(queries), "plans": sorted(plans),
            "page10_full": len(deep["results"]) == min(24, max(0, rows.size - 9 * 24))}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--queries", type=int, default=500)
    p.add_argument("--dataset", choices=["shared", "synthetic-1m"], default="shared")
    p.add_argument("--search-L", type=int, default=ServeConfig().search_L,
                   help="serve.search_L of every engine (the unfiltered list size; filters scale it)")
    p.add_argument("--work", default=None, help="default /tmp/memescale-bench-filters-<dataset>")
    args = p.parse_args()
    if not DATA.exists():
        sys.exit(f"needs the shared data set at {DATA}")
    x = np.load(DATA / "base.npy").astype(np.float32)
    if args.dataset == "synthetic-1m":
        x = synthetic(x, 10)
    q_all = np.load(DATA / "queries_id.npy").astype(np.float32)[: args.queries]
    md = labels_for(len(x))
    work = Path(args.work or f"/tmp/memescale-bench-filters-{args.dataset}")
    print(f"load average at start: {os.getloadavg()}", flush=True)
    done = work / "index.done"
    if not done.exists():
        shutil.rmtree(work, ignore_errors=True)
        t0 = time.perf_counter()
        build_index(x, md, work / "index", IndexParams(R=64, L=100, pq_bytes=48, seed=0, threads=2, progress=False))
        print(f"built in {time.perf_counter() - t0:.0f} s", flush=True)
        done.write_text(f"{len(x)}\n")
    filters = {"none": Filters(nsfw=True)}
    filters.update({f"sub {name} ({share:.2%})": Filters(nsfw=True, subreddits=[name]) for name, share in SHARES.items()})
    filters["sfw, 2016 on"] = Filters(after="2016-01-01")
    filters["2023-06 on"] = Filters(nsfw=True, after="2023-06-01")
    filters["not 'half', score >= 100"] = Filters(nsfw=True, exclude_subreddits=["half"], min_score=100)
    report = []
    with Index.open(work / "index", threads=1) as index:
        planned = SearchEngine(index, index.weighting, ServeConfig(search_L=args.search_L))
        post = SearchEngine(WithoutLabels(index), index.weighting, ServeConfig(search_L=args.search_L))  # type: ignore[arg-type]
        run(planned, q_all, filters["none"], np.ones(len(md), bool), x)  # warm: the page cache holds the records
        for name, f in filters.items():
            spec = parse_filters(f)
            keep = np.fromiter((spec.keep(m) for m in md), bool, len(md))
            a = run(planned, q_all, f, keep, x)
            b = run(post, q_all, f, keep, x)
            row = {"filter": name, "share": float(keep.mean()), "matches": int(keep.sum()), "planner": a, "postfilter": b}
            report.append(row)
            print(json.dumps(row), flush=True)
        # the planner's crossover: each plan forced, for the filters a scan can take
        sweep = []
        forced_graph = SearchEngine(index, index.weighting, ServeConfig(search_L=args.search_L, filter_scan_max=0))
        forced_scan = SearchEngine(index, index.weighting, ServeConfig(search_L=args.search_L, filter_scan_max=len(x)))
        q_sweep = q_all[: min(100, len(q_all))]
        for name, f in filters.items():
            if not (f.subreddits or f.after):
                continue
            spec = parse_filters(f)
            keep = np.fromiter((spec.keep(m) for m in md), bool, len(md))
            over, engine_mod.SCAN_OVER_TRAVERSAL = engine_mod.SCAN_OVER_TRAVERSAL, float("inf")
            try:
                a = run(forced_scan, q_sweep, f, keep, x)
            finally:
                engine_mod.SCAN_OVER_TRAVERSAL = over
            b = run(forced_graph, q_sweep, f, keep, x)
            chosen = next(r["planner"]["plans"] for r in report if r["filter"] == name)
            sweep.append({"filter": name, "share": float(keep.mean()), "scan": a, "graph": b, "chosen": chosen})
            print(json.dumps(sweep[-1]), flush=True)
    unfiltered = report[0]["planner"]["qps"]
    RESULTS.mkdir(parents=True, exist_ok=True)
    stem = "filters" if args.dataset == "shared" else f"filters-{args.dataset}"
    (RESULTS / f"{stem}.json").write_text(json.dumps({"dataset": args.dataset, "n": len(x), "queries": len(q_all),
                                                      "search_L": args.search_L,
                                                      "rows": report, "sweep": sweep}, indent=1))
    lines = ["| filter | share | matches | plan | recall@10 planner / post-filter | QPS planner / post-filter "
             "(planner / unfiltered) | reads/query planner / post-filter | page 10 of 24 full: planner / post |",
             "|---|---|---|---|---|---|---|---|"]
    for r in report:
        a, b = r["planner"], r["postfilter"]
        lines.append(f"| {r['filter']} | {r['share']:.4%} | {r['matches']:,} | {', '.join(a['plans'])} | "
                     f"{a['recall']:.3f} / {b['recall']:.3f} | {a['qps']:,.0f} / {b['qps']:,.0f} "
                     f"({a['qps'] / unfiltered:.2f}) | {a['reads']:.0f} / {b['reads']:.0f} | "
                     f"{'yes' if a['page10_full'] else 'no'} / {'yes' if b['page10_full'] else 'no'} |")
    lines += ["", f"Each plan forced ({len(q_sweep)} queries):", "",
              "| filter | share | scan: QPS, recall@10 | graph-filtered: QPS, recall@10 | faster | planner chose |",
              "|---|---|---|---|---|---|"]
    for r in sweep:
        a, b = r["scan"], r["graph"]
        lines.append(f"| {r['filter']} | {r['share']:.4%} | {a['qps']:,.0f}, {a['recall']:.3f} | "
                     f"{b['qps']:,.0f}, {b['recall']:.3f} | {'scan' if a['qps'] > b['qps'] else 'graph-filtered'} | "
                     f"{', '.join(r['chosen'])} |")
    table = "\n".join(lines)
    (RESULTS / f"{stem}.md").write_text(table + "\n")
    print(table)
    print(f"load average at end: {os.getloadavg()}")


if __name__ == "__main__":
    main()
