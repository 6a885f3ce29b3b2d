"""Live updates against fresh builds: recall, cost and QPS over rounds of inserts and deletes.

    .venv/bin/python bench/updates.py                 # the shared 100k MiniLM set, 10 rounds
    .venv/bin/python bench/updates.py --rounds 3 --start 20000

On ../shared/data/ann/pypi-minilm: an index is built from --start rows; each round then
inserts --insert (fraction of the live set) held-out rows, written as ingest-schema Parquet
shards and inserted with `memescale.index.update.insert_shards` (what
`ray_jobs/update_index.py --embeddings` runs), deletes --delete of the live rows at random
(`delete_ids`), and measures, at equal L and for both query sets (in-distribution and
out-of-distribution):
- recall@10 of the live index (base + delta + tombstones) against exact ground truth over
  the live rows, then again after `consolidate`;
- recall@10 of a fresh build of the same rows with the same parameters (`--fresh-every`);
- insert rows/s, delete latency (the command's wall time: durable and visible on return),
  consolidation seconds against the fresh build's, QPS with the delta live and consolidated.
Prints a table per round and writes bench/results/updates.{json,md}.
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

from memescale.index import Index, IndexParams  # noqa: E402
from memescale.index.eval import exact_ground_truth, recall_at_k  # noqa: E402
from memescale.index.live import LiveIndex  # noqa: E402
from memescale.index.update import consolidate, delete_ids, insert_shards  # noqa: E402
from memescale.index.weighting import build_weighted_index  # noqa: E402
from memescale.testing.sample_data import read_node_rows, write_vector_shards  # noqa: E402

DATA = ROOT.parent / "shared" / "data" / "ann" / "pypi-minilm"
ID0 = 10**12  # write_vector_shards: image_id = row + 10**12


def same_rows(rows: np.ndarray) -> dict[str, np.ndarray]:
    """Shard columns that give rows `rows` of the full set the metadata they have there
    (write_vector_shards derives it from the row number)."""
    return {"image_id": rows + ID0, "post_id": np.array([f"p{i}" for i in rows], dtype=object),
            "url": np.array([f"https://i.redd.it/{i}.jpg" for i in rows], dtype=object),
            "title": np.array([f"post {i}" for i in rows], dtype=object), "created_utc": 1_600_000_000 + rows,
            "score": rows % 100, "over_18": rows % 10 == 0,
            "permalink": np.array([f"https://www.reddit.com/r/memes/comments/p{i}/" for i in rows], dtype=object),
            "content_hash": np.array([f"h{i}" for i in rows], dtype=object)}


def image_ids(index, ids: np.ndarray) -> np.ndarray:
    flat = ids.ravel()
    out = np.full(flat.size, -1, np.int64)
    ok = flat >= 0
    out[ok] = [m["image_id"] for m in index.metadata(flat[ok])]
    return out.reshape(ids.shape)


def measure(index, queries: np.ndarray, gt_rows: np.ndarray, L: int, reps: int = 5) -> tuple[float, float]:
    """(recall@10 in row space, best-of-reps QPS after one untimed pass) of `index` (Index or LiveIndex)."""
    index.search(queries, 10, L)  # page in the records this L touches
    best = 0.0
    for _ in range(reps):
        t0 = time.perf_counter()
        ids, _, _ = index.search(queries, 10, L)
        best = max(best, len(queries) / (time.perf_counter() - t0))
    return recall_at_k(image_ids(index, ids) - ID0, gt_rows, 10), best


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--start", type=int, default=40_000, help="rows in the first build")
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--insert", type=float, default=0.10, help="rows inserted per round, share of the live set")
    p.add_argument("--delete", type=float, default=0.05, help="rows deleted per round, share of the live set")
    p.add_argument("--Ls", default="20,50,100", help="search list sizes: recall and QPS at each")
    p.add_argument("--R", type=int, default=64)
    p.add_argument("--build-L", type=int, default=100)
    p.add_argument("--pq-bytes", type=int, default=48)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--fresh-every", type=int, default=1, help="fresh build every this many rounds (and the last)")
    p.add_argument("--qps-reps", type=int, default=9, help="alternating QPS runs of the last round's comparison")
    p.add_argument("--work", default="/tmp/memescale-bench-updates")
    args = p.parse_args()
    Ls = [int(v) for v in args.Ls.split(",")]
    if not DATA.exists():
        sys.exit(f"needs the shared data set at {DATA}")
    base = np.load(DATA / "base.npy").astype(np.float32)
    queries = {"id": np.load(DATA / "queries_id.npy").astype(np.float32),
               "ood": np.load(DATA / "queries_ood.npy").astype(np.float32)}
    work = Path(args.work)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    print(f"load average at start: {os.getloadavg()}", flush=True)
    t0 = time.perf_counter()
    write_vector_shards(work / "all", base, per_file=1000)
    vectors, metadata = read_node_rows(work / "all")
    print(f"{len(base):,} rows written as shards ({time.perf_counter() - t0:.0f} s)", flush=True)

    rng = np.random.default_rng(0)
    order = rng.permutation(len(base))
    live = np.zeros(len(base), bool)
    live[order[: args.start]] = True
    held = list(order[args.start:])
    params = IndexParams(R=args.R, L=args.build_L, pq_bytes=args.pq_bytes, seed=0, threads=args.threads,
                         progress=False)
    index_dir = work / "index"
    t0 = time.perf_counter()
    rows = np.flatnonzero(live)
    build_weighted_index(vectors[rows], [metadata[i] for i in rows], index_dir, params, 0.2)
    first_build = time.perf_counter() - t0
    print(f"first build of {rows.size:,} rows: {first_build:.1f} s", flush=True)

    report = []
    for rnd in range(1, args.rounds + 1):
        n_live = int(live.sum())
        n_ins = min(len(held), int(round(args.insert * n_live)))
        ins_rows, held = np.array(held[:n_ins], np.int64), held[n_ins:]
        shard_dir = work / f"insert-{rnd:02d}"
        t_insert, ins = 0.0, {"inserted": 0}
        if n_ins:
            write_vector_shards(shard_dir, base[ins_rows], per_file=n_ins, overrides=same_rows(ins_rows))
            t = time.perf_counter()
            ins = insert_shards(index_dir, str(shard_dir), threads=args.threads)
            t_insert = time.perf_counter() - t
        live[ins_rows] = True
        n_del = int(round(args.delete * n_live))
        del_rows = rng.choice(np.flatnonzero(live), n_del, replace=False)
        t = time.perf_counter()
        dl = delete_ids(index_dir, del_rows + ID0, threads=args.threads)
        t_delete = time.perf_counter() - t
        live[del_rows] = False
        rows = np.flatnonzero(live)
        gts = {name: rows[exact_ground_truth(vectors[rows].astype(np.float32), q, 10)[0]] for name, q in queries.items()}
        entry: dict = {"round": rnd, "live": int(rows.size), "inserted": ins["inserted"], "deleted": dl["found"],
                       "insert_s": round(t_insert, 2), "insert_rows_per_s": round(ins["inserted"] / max(t_insert, 1e-9), 1),
                       "delete_s": round(t_delete, 3)}
        with LiveIndex.open(index_dir, threads=args.threads) as li:
            entry["delta"] = li.counts()["delta"]
            for name, q in queries.items():
                for L in Ls:
                    entry[f"live_recall_{name}_L{L}"], entry[f"live_qps_{name}_L{L}"] = \
                        measure(li, q, gts[name], L)
        if rnd == args.rounds:  # the same index before consolidation, for the interleaved QPS comparison
            shutil.rmtree(work / "before", ignore_errors=True)
            shutil.copytree(index_dir, work / "before")
        c = consolidate(index_dir, threads=args.threads)
        entry["consolidate_s"] = c["seconds"]
        entry["consolidate_parts_s"] = {k: c[k] for k in ("vectors_s", "repair_s", "insert_s", "write_s")}
        entry["consolidate_rss_growth_mb"] = round(c["rss_anon_growth"] / 2**20, 1)
        with LiveIndex.open(index_dir, threads=args.threads) as li:
            for name, q in queries.items():
                for L in Ls:
                    entry[f"cons_recall_{name}_L{L}"], entry[f"cons_qps_{name}_L{L}"] = \
                        measure(li, q, gts[name], L)
        if rnd % args.fresh_every == 0 or rnd == args.rounds:
            fresh = work / "fresh"
            shutil.rmtree(fresh, ignore_errors=True)
            t = time.perf_counter()
            build_weighted_index(vectors[rows], [metadata[i] for i in rows], fresh, params, 0.2)
            entry["fresh_build_s"] = round(time.perf_counter() - t, 1)
            with Index.open(fresh, threads=args.threads) as fi:
                for name, q in queries.items():
                    for L in Ls:
                        entry[f"fresh_recall_{name}_L{L}"], entry[f"fresh_qps_{name}_L{L}"] = \
                            measure(fi, q, gts[name], L)
            entry["update_cost_vs_rebuild"] = round((t_insert + c["seconds"]) / entry["fresh_build_s"], 3)
        entry["load"] = os.getloadavg()[0]
        report.append(entry)
        print(json.dumps(entry), flush=True)

    # QPS with the last round's delta live against the consolidated index, measured in
    # alternation (the machine's other load moves single measurements by tens of percent)
    qps_ab: dict[str, dict[str, float]] = {}
    with LiveIndex.open(work / "before", threads=args.threads) as before, \
            LiveIndex.open(index_dir, threads=args.threads) as after:
        for L in Ls:
            runs: dict[str, list[float]] = {"delta": [], "consolidated": []}
            for _ in range(args.qps_reps):
                for name, ix in (("delta", before), ("consolidated", after)):
                    runs[name].append(measure(ix, queries["id"], gts["id"], L, reps=1)[1])
            qps_ab[f"L{L}"] = {k: float(np.median(v)) for k, v in runs.items()}
            qps_ab[f"L{L}"]["ratio"] = qps_ab[f"L{L}"]["delta"] / qps_ab[f"L{L}"]["consolidated"]
            print(f"QPS ID at L={L}, median of {args.qps_reps} alternating runs: delta live "
                  f"{qps_ab[f'L{L}']['delta']:,.0f}, consolidated {qps_ab[f'L{L}']['consolidated']:,.0f} "
                  f"(ratio {qps_ab[f'L{L}']['ratio']:.3f})", flush=True)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "updates.json").write_text(json.dumps({"args": vars(args), "first_build_s": first_build,
                                                      "rounds": report, "qps_delta_vs_consolidated": qps_ab},
                                                     indent=1))
    lines = []
    for L in Ls:
        lines += [f"L = {L}:", "",
                  "| round | live | +ins | -del | recall@10 ID live / cons / fresh | recall@10 OOD live / cons / fresh | "
                  "QPS ID live / cons / fresh | insert rows/s | delete s | consolidate s | fresh build s | "
                  "(insert + consolidate) / rebuild | load |",
                  "|" + "---|" * 13]
        for e in report:
            def f(k, e=e, fmt="{:.4f}"):
                return fmt.format(e[k]) if k in e else "-"
            q = lambda k, e=e: f(k, e, "{:,.0f}")  # noqa: E731
            lines.append(f"| {e['round']} | {e['live']:,} | {e['inserted']:,} | {e['deleted']:,} | "
                         f"{f(f'live_recall_id_L{L}')} / {f(f'cons_recall_id_L{L}')} / {f(f'fresh_recall_id_L{L}')} | "
                         f"{f(f'live_recall_ood_L{L}')} / {f(f'cons_recall_ood_L{L}')} / "
                         f"{f(f'fresh_recall_ood_L{L}')} | "
                         f"{q(f'live_qps_id_L{L}')} / {q(f'cons_qps_id_L{L}')} / {q(f'fresh_qps_id_L{L}')} | "
                         f"{e['insert_rows_per_s']:,.0f} | {e['delete_s']:.3f} | {e['consolidate_s']:.1f} | "
                         f"{e.get('fresh_build_s', '-')} | {e.get('update_cost_vs_rebuild', '-')} | {e['load']:.2f} |")
        lines.append("")
    lines.append("QPS ID, last round's delta live / consolidated (median of alternating runs): " + ", ".join(
        f"L={L[1:]} {v['delta']:,.0f} / {v['consolidated']:,.0f} ({v['ratio']:.2f}x)" for L, v in qps_ab.items()))
    table = "\n".join(lines)
    (RESULTS / "updates.md").write_text(table + "\n")
    print(table)


if __name__ == "__main__":
    main()
