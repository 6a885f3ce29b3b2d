"""Sharded build on Ray: shard count vs recall, declared vs measured memory, and build-time scaling.

    .venv/bin/python bench/build_sharded.py --dataset ../shared/data/ann/pypi-minilm
    .venv/bin/python bench/build_sharded.py --scaling 100000,200000,400000,800000

1. The 100k shared set built as 8 shards and as 1 shard (same R, L, alpha, PQ): recall@10 and
   4 KiB reads per query at equal search L on both query sets, shard sizes, cohesion next to
   plain k-means, and every shard task's peak RSS next to the memory it declared to Ray. The
   8-shard index is built once per `--refine` setting (the refinement pass over the merged
   graph: its L and the share of border nodes it re-searches; 0 = no pass), the later builds
   reusing the first one's shard graphs.
2. Synthetic clustered 384-d vectors at growing N, sharded at a constant shard size (N /
   shards = `--scaling-shard`, 50k: every shard task builds 100k vectors, the overlap), as a
   memory-bounded build is run: build seconds by phase, with N log N drawn through the first
   point; writes a PNG.
Results go to bench/results/build_sharded.json and build_scaling.png.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

from ann import synthetic  # noqa: E402  (the ANN benchmark's clustered data generator)

from memescale.build.pipeline import build_from_shards
from memescale.config import IndexConfig, load_config
from memescale.index import Index
from memescale.index.eval import recall_at_k
from memescale.ray_runtime import init_ray
from memescale.testing.sample_data import write_vector_shards


def recall_at(index_dir: Path, queries: np.ndarray, gt: np.ndarray, L: int, k: int = 10) -> tuple[float, float]:
    """(recall@k, mean 4 KiB reads per query) of one batch search at list size L."""
    with Index.open(index_dir, threads=2) as index:
        ids, _, stats = index.search(queries.astype(np.float32), k, L)
    return recall_at_k(ids, gt, k), float(np.mean(stats.reads))


def parse_refine(text: str) -> list[tuple[int, float]]:
    """"0,32:0.3,16" -> [(0, 0.0), (32, 0.3), (16, 1.0)]: refinement L and fraction per build."""
    out = []
    for item in text.split(","):
        L, _, f = item.partition(":")
        out.append((int(L), float(f or 1.0) if int(L) else 0.0))
    return out


def cfg_for(shards: int, a, refine_L: int = IndexConfig.refine_L,
            refine_fraction: float = IndexConfig.refine_fraction):
    return load_config(ROOT / "configs" / "tiny.toml", [
        f"index.shards={shards}", f"index.R={a.R}", f"index.L={a.L}", f"index.alpha={a.alpha}",
        f"index.pq_bytes={a.pq_bytes}", "index.weight_beta=0", "ray.num_cpus=2", "ray.object_store_mb=512",
        f"index.refine_L={refine_L}", f"index.refine_fraction={refine_fraction}"])


def shard_comparison(a, work: Path) -> dict:
    ds = Path(a.dataset)
    base = np.load(ds / "base.npy")
    for old in [*work.glob("idx*"), *work.glob("shards_*")]:  # nothing of an earlier run is reused
        shutil.rmtree(old)
    write_vector_shards(work / "emb", base, per_file=20_000)
    out: dict = {"n": len(base), "Ls": a.Ls, "runs": ["shards_1"]}
    runs = [(1, 0, 0.0)] + [(8, L, f) for L, f in a.refine]
    for shards, refine, fraction in runs:
        key = "shards_1" if shards == 1 else f"shards_8_refine{refine}" + (f"_f{fraction:g}" if refine else "")
        if shards > 1:
            out["runs"].append(key)
        idx = work / key
        t = time.perf_counter()
        s = build_from_shards(cfg_for(shards, a, refine, fraction), str(work / "emb"), str(idx),
                              work_dir=str(work / f"idx{shards}.work"), query_sample=False)
        out[key] = {"build_s": time.perf_counter() - t, "refine_L": s["refine_L"],
                    "refine_fraction": s["refine_fraction"], "refined_nodes": s["refined_nodes"],
                    "partition": s["partition"],
                    "seconds": s["seconds"], "shards": s["shards"], "mean_degree": s["mean_degree"],
                    "max_degree": s["max_degree"]}
        for qs in ("id", "ood"):
            q, gt = np.load(ds / f"queries_{qs}.npy"), np.load(ds / f"gt_{qs}.npy")
            res = {L: recall_at(idx, q, gt, L) for L in a.Ls}
            out[key][f"recall_{qs}"] = {L: r for L, (r, _) in res.items()}
            out[key][f"reads_{qs}"] = {L: n for L, (_, n) in res.items()}
    return out


def print_comparison(cmp: dict) -> None:
    one = cmp["shards_1"]
    keys = cmp["runs"]
    for key in keys:
        c = cmp[key]
        sec = c["seconds"]
        print(f"{key}: build {c['build_s']:.1f} s (shard graphs {sec['graphs']:.1f}, merge {sec['merge']:.1f}, "
              f"refine {sec.get('refine', 0.0):.1f} over {c['refined_nodes']} nodes), mean degree "
              f"{c['mean_degree']:.1f}, max {c['max_degree']}")
        for qs in ("id", "ood"):
            cells = []
            for L in cmp["Ls"]:
                r, n = c[f"recall_{qs}"][L], c[f"reads_{qs}"][L]
                diff = r - one[f"recall_{qs}"][L]
                ok = "" if key == "shards_1" else f" {diff:+.4f} {'ok' if diff >= -0.01 else 'MISSED'}"
                cells.append(f"L={L}: {r:.4f} ({n:.1f} reads){ok}")
            print(f"   {qs:>3}  " + " | ".join(cells))
        for sh in c["shards"]:
            if not sh["skipped"]:
                print(f"   shard {sh['shard']}: {sh['size']} vectors, {sh['seconds']:.1f} s, peak RSS "
                      f"{sh['peak_rss_anon'] / 2**20:.0f} MB <= declared {sh['declared_memory'] / 2**20:.0f} MB: "
                      f"{sh['peak_rss_anon'] <= sh['declared_memory']}")
    print("partition:", json.dumps(cmp[keys[-1]]["partition"]))


def scaling(a, work: Path, sizes: list[int], rows: list[dict], save) -> list[dict]:
    """Build each size in turn; `rows` holds earlier results (a size run again replaces its
    row) and `save(rows)` is called after every size, so an interrupted run keeps its rows."""
    for n in sizes:
        base = synthetic(n, 10, seed=0)["base"]
        d = work / f"syn{n}"
        shutil.rmtree(d, ignore_errors=True)
        write_vector_shards(d / "emb", base, per_file=50_000)
        shards = max(2, round(n / a.scaling_shard))  # every vector in 2 shards: 2n / shards per task
        t = time.perf_counter()
        s = build_from_shards(cfg_for(shards, a), str(d / "emb"), str(d / "idx"), query_sample=False)
        rows[:] = sorted([r for r in rows if r["n"] != n] + [{
            "n": n, "shards": shards, "build_s": time.perf_counter() - t, "seconds": s["seconds"],
            "max_peak_rss_mb": max(x["peak_rss_anon"] for x in s["shards"]) / 2**20,
            "declared_mb": max(x["declared_memory"] for x in s["shards"]) / 2**20}], key=lambda r: r["n"])
        save(rows)
        print(f"N={n:>7}  shards={shards}  build {time.perf_counter() - t:7.1f} s  "
              + "  ".join(f"{k} {v:.1f}" for k, v in s["seconds"].items()), flush=True)
        shutil.rmtree(d, ignore_errors=True)
    return rows


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = np.array([r["n"] for r in rows], float)
    t = np.array([r["build_s"] for r in rows])
    ref = t[0] * (n * np.log(n)) / (n[0] * math.log(n[0]))
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(n, t, "o-", label="memescale sharded build (measured)")
    ax.plot(n, ref, "--", label="N log N through the first point")
    ax.plot(n, t[0] * n / n[0], ":", label="linear through the first point")
    ax.set_xlabel("vectors (384-d, synthetic clustered)")
    ax.set_ylabel("build seconds (2 cores)")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", default=str(ROOT.parent / "shared" / "data" / "ann" / "pypi-minilm"))
    p.add_argument("--scaling", default="", help="comma-separated sizes for the scaling run (skips part 1)")
    p.add_argument("--scaling-shard", type=int, default=50_000,
                   help="scaling run: N / shards (each shard task builds twice that, the overlap)")
    p.add_argument("--R", type=int, default=64)
    p.add_argument("--L", type=int, default=100)
    p.add_argument("--alpha", type=float, default=1.2)
    p.add_argument("--pq-bytes", type=int, default=48)
    p.add_argument("--Ls", type=lambda s: [int(x) for x in s.split(",")], default=[20, 30, 50, 100])
    p.add_argument("--refine", type=parse_refine, default=parse_refine(f"0,{IndexConfig.refine_L}:{IndexConfig.refine_fraction}"),
                   help="8-shard builds to compare: comma-separated L:fraction of the refinement pass (0: "
                        f"no pass; L alone: fraction 1); default 0,{IndexConfig.refine_L}:{IndexConfig.refine_fraction}")
    p.add_argument("--work", default=str(ROOT / "bench" / "results" / "work" / "build"))
    a = p.parse_args()
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    init_ray(cfg_for(1, a).ray)
    results_dir = ROOT / "bench" / "results"
    out_path = results_dir / "build_sharded.json"
    results = json.loads(out_path.read_text()) if out_path.exists() else {}
    if a.scaling:
        def save(rows: list[dict]) -> None:
            results["scaling"] = rows
            out_path.write_text(json.dumps(results, indent=1))

        rows = scaling(a, work, [int(x) for x in a.scaling.split(",")], results.get("scaling", []), save)
        plot(rows, results_dir / "build_scaling.png")
        n0, t0 = rows[0]["n"], rows[0]["build_s"]
        for r in rows:
            nlogn = (r["n"] * math.log(r["n"])) / (n0 * math.log(n0))
            print(f"N={r['n']:>7}: {r['build_s']:.1f} s = {r['build_s'] / t0:.2f}x the first "
                  f"(N log N predicts {nlogn:.2f}x); peak shard RSS {r['max_peak_rss_mb']:.0f} MB "
                  f"of {r['declared_mb']:.0f} MB declared")
    else:
        cmp = shard_comparison(a, work)
        results["shards"] = cmp
        out_path.write_text(json.dumps(results, indent=1))
        print_comparison(cmp)
    out_path.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
