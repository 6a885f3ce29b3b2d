"""Out-of-core build at several times the memory budget: time, measured memory, recall.

    .venv/bin/python bench/build_scale.py                       # 1M, 2M, 4M x 384 and 200k x 1152
    .venv/bin/python bench/build_scale.py --sets 1000000x384    # one set

For each set: clustered synthetic vectors (bench/ann.py's mixture) written block by block as ingest-schema Parquet
shards (titles, subreddits, times), then built through `ray_jobs/build_index.py` with
`index.build_memory` = --budget, exactly as a user runs it. Measured, never estimated:
- the driver's anonymous memory (RssAnon of the build process, sampled from /proc every
  5 ms by this script) and every shard task's (sampled inside the task, in the summary);
- wall seconds per phase (the build's summary), scratch and index bytes (files on disk);
- recall@10 at each --Ls on --queries held-out queries (drawn from the same clusters, not
  in the index) against exact ground truth computed blockwise over the corpus vectors.
Then the per-vector costs of each phase are fitted on the measured sets and the build of
230M x 1152 on the seed machine (--target-threads cores, --target-budget) is extrapolated
with `memescale.build.plan` (time and peak RAM).

Outputs bench/results/build_scale.json, build_scale.md (the table) and build_scale.png.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
sys.path.insert(0, str(ROOT))

from memescale.index import Index
from memescale.index.eval import exact_ground_truth, recall_at_k
from memescale.memwatch import PeakRssAnon
from memescale.testing.sample_data import write_vector_shards

SUBREDDITS = np.array(["memes", "dankmemes", "me_irl", "funny", "pics", "wholesomememes", "ProgrammerHumor",
                       "gaming", "aww", "AdviceAnimals"], dtype=object)


MIXTURE = "cone-1"  # the version of `clustered`'s mixture: sets written by another are redrawn


def clustered(n: int, d: int, seed: int, clusters: int = 1024, rank: int = 24, block: int = 100_000):
    """Blocks of a clustered, normalised Gaussian mixture shaped like model embeddings: one
    common direction (the cone every model's embeddings sit in: mean cosine between
    unrelated rows about 0.3, as bench/ann.py's `synthetic_gap` images), a unit centre per
    cluster plus a rank-`rank` spread and a little isotropic noise, Zipf-like cluster sizes;
    the mixture is fixed by d, the draws by `seed`. Generated block by block; yields
    (first_row, (m, d) float32 block).

    Without the cone (1,024 mutually orthogonal clusters, as an earlier version drew them)
    a graph routes between clusters only through the few edges that cross them, and recall
    depends on the entry point more than on the build."""
    mix = np.random.default_rng(12345 + d)
    cone = mix.standard_normal(d).astype(np.float32)
    cone /= np.linalg.norm(cone)
    centres = mix.standard_normal((clusters, d)).astype(np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    bases = mix.standard_normal((clusters, rank, d)).astype(np.float32) / math.sqrt(d)
    weights = 1.0 / np.arange(1, clusters + 1) ** 0.5
    weights /= weights.sum()
    rng = np.random.default_rng(seed)
    for lo in range(0, n, block):
        m = min(block, n - lo)
        x = np.empty((m, d), np.float32)
        for a in range(0, m, 4096):  # (4096, rank, d) float32 gathers
            b = min(m, a + 4096)
            c = rng.choice(clusters, size=b - a, p=weights)
            z = rng.standard_normal((b - a, rank)).astype(np.float32) * 0.3
            x[a:b] = 1.1 * cone + centres[c] + np.einsum("mr,mrd->md", z, bases[c])
            x[a:b] += rng.standard_normal((b - a, d)).astype(np.float32) * (0.12 / math.sqrt(d))
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        yield lo, x


def write_set(folder: Path, n: int, d: int, per_file: int = 20_000) -> None:
    """Ingest-schema shards of the n x d set under folder/embeddings (skipped when complete)."""
    done = folder / "embeddings.done"
    if done.exists() and done.read_text() == f"{MIXTURE} {n}":
        return
    shutil.rmtree(folder / "embeddings", ignore_errors=True)
    for lo, x in clustered(n, d, seed=1):
        rows = np.arange(lo, lo + len(x))
        write_vector_shards(folder / "embeddings", x, per_file=per_file, first_row=lo, overrides={
            "subreddit": SUBREDDITS[rows % len(SUBREDDITS)],
            "title": np.char.add("a meme about topic ", (rows % 9973).astype(str)).astype(object),
            "created_utc": 1_400_000_000 + rows * 37,
        })
    done.write_text(f"{MIXTURE} {n}")


def du(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.exists() else 0


def build(folder: Path, config: str, budget: str, threads_per_task: int, extra: list[str], resume: bool = False) -> dict:
    """Run the build job (a fresh OUT; WORK too unless `resume`: then the phases and shard
    graphs an interrupted run finished are reused, as a user's rerun would); returns its
    summary plus the driver's measured peak."""
    out, work = folder / "index", folder / "index.work"
    shutil.rmtree(out, ignore_errors=True)
    if not resume:
        shutil.rmtree(work, ignore_errors=True)
    cmd = [sys.executable, str(ROOT / "ray_jobs" / "build_index.py"), "--config", config,
           "--embeddings", str(folder / "embeddings"), "--out", str(out), "--work", str(work),
           "--threads-per-task", str(threads_per_task), "--no-query-sample",
           "--set", f'index.build_memory="{budget}"'] + [a for s in extra for a in ("--set", s)]
    t0 = time.perf_counter()
    log = open(folder / "build.log", "w")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
    with PeakRssAnon(proc.pid) as peak:
        rc = proc.wait()
    log.close()
    if rc != 0:
        raise SystemExit(f"build failed ({rc}); see {folder / 'build.log'}")
    summary = json.loads((out / "build_summary.json").read_text())
    summary["driver_peak_rss_anon_external"] = peak.peak_bytes
    summary["wall_seconds"] = time.perf_counter() - t0
    summary["scratch_bytes"] = du(work)
    summary["index_bytes"] = du(out)
    return summary


def evaluate(folder: Path, n: int, d: int, nq: int, Ls: list[int], k: int = 10) -> dict:
    """recall@k at each L on nq held-out queries, against blockwise exact ground truth over the
    corpus's own vectors file (node order)."""
    queries = next(clustered(nq, d, seed=2, block=nq))[1]
    vec_files = sorted((folder / "index.work").rglob("vectors.npy"))
    base = np.load(vec_files[0], mmap_mode="r")[:, :d]
    gt, _ = exact_ground_truth(base, queries, k)
    out = {}
    with Index.open(folder / "index", threads=2) as index:
        for L in Ls:
            ids, _, _ = index.search(queries, k, L)
            out[f"recall@{k}_L{L}"] = round(recall_at_k(ids, gt, k), 4)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sets", default="1000000x384,2000000x384,4000000x384,200000x1152")
    ap.add_argument("--budget", default="1GiB")
    ap.add_argument("--config", default=str(ROOT / "configs" / "cpu.toml"))
    ap.add_argument("--set", action="append", default=["index.R=32", "index.L=64", "index.weight_beta=0.0"],
                    metavar="SECTION.KEY=VALUE", help="config overrides for every build")
    ap.add_argument("--threads-per-task", type=int, default=2)
    ap.add_argument("--queries", type=int, default=1000)
    ap.add_argument("--Ls", default="50,100,200,400")
    ap.add_argument("--data", default="/tmp/memescale-build-scale", help="where sets and indexes go (tens of GB)")
    ap.add_argument("--target-vectors", type=int, default=230_000_000)
    ap.add_argument("--target-dim", type=int, default=1152)
    ap.add_argument("--target-budget", default="64GiB")
    ap.add_argument("--target-threads", type=int, default=6)
    ap.add_argument("--target-config", default=str(ROOT / "configs" / "gpu.toml"), help="R and L of the target build")
    ap.add_argument("--graph-growth", type=float, default=1.0,
                    help="exponent b of a graph's build time ~ points^b, measured by bench/construction.py --sizes; "
                         "scales the fitted graph cost from the measured shards' size to the target's")
    ap.add_argument("--report-only", action="store_true",
                    help="rewrite the report and extrapolation from bench/results/build_scale.json")
    ap.add_argument("--resume", action="store_true",
                    help="keep each set's work folder: rerun an interrupted build (its wall time is then this run's)")
    ap.add_argument("--evaluate-only", action="store_true",
                    help="measure recall again on the indexes already built for --sets (at --Ls), keeping "
                         "their build figures")
    a = ap.parse_args(argv)
    RESULTS.mkdir(parents=True, exist_ok=True)
    rows = previous_sets()
    if a.report_only:
        report(rows, a)
        return 0
    Ls = [int(x) for x in a.Ls.split(",")]
    for spec in a.sets.split(","):
        n, d = (int(x) for x in spec.lower().split("x"))
        folder = Path(a.data) / f"{n}x{d}"
        if a.evaluate_only:
            old = next((s for s in rows if (s["n"], s["d"]) == (n, d)), None)
            if old is None or not (folder / "index").exists():
                print(f"[{n}x{d}] no earlier build to evaluate; skipped", flush=True)
                continue
            old.update(evaluate(folder, n, d, a.queries, Ls))
            print(json.dumps({k: v for k, v in old.items() if k.startswith("recall")}), flush=True)
            continue
        folder.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        write_set(folder, n, d)
        print(f"[{n}x{d}] data ready in {time.perf_counter() - t0:.0f} s", flush=True)
        s = build(folder, a.config, a.budget, a.threads_per_task, a.set, a.resume)
        s["resumed"] = a.resume
        s.update(evaluate(folder, n, d, a.queries, Ls))
        s.update(n=n, d=d, budget=a.budget, loadavg=os.getloadavg())
        rows = sorted([r for r in rows if (r["n"], r["d"]) != (n, d)] + [s], key=lambda r: (r["d"], r["n"]))
        print(json.dumps({k: s[k] for k in ("n", "d", "wall_seconds", "driver_peak_rss_anon_external", "seconds")
                          if k in s}), flush=True)
        (RESULTS / "build_scale.json").write_text(json.dumps({"sets": rows}, indent=1, default=str))
    report(rows, a)
    return 0


def previous_sets() -> list[dict]:
    """The sets measured by earlier runs (bench/results/build_scale.json): a run measures the sets it
    names and keeps the others' rows, so one set can be redone without redoing all."""
    try:
        old = json.loads((RESULTS / "build_scale.json").read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return []
    return list(old["sets"] if isinstance(old, dict) else old)


def _shape(s: dict) -> tuple:
    """A measured build's (d, R, L, construction code bytes, merge): what changes a graph
    phase's cost per unit."""
    return (s["d"], s.get("plan", {}).get("R"), s.get("plan", {}).get("L"), s.get("build_pq_bytes", 0),
            s.get("merge", "prune"))


GRAPH_SHAPED = ("graphs", "merge", "refine")  # phases whose cost per unit depends on d, R and L beyond the units


def extrapolate(rows: list[dict], n: int, d: int, budget: str, threads: int, R: int = 64, L: int = 128,
                pq_bytes: int = 48, build_pq_bytes: int = 0, graph_growth: float = 1.0, merge: str = "prune") -> dict:
    """The plan of an n x d build on `threads` cores within `budget`, priced with per-phase
    costs fitted on the measured sets (`plan.fitted_costs`: a phase's measured seconds over
    the seconds its own plan predicted), next to the plan's own default costs. Each phase is
    fitted on the largest set that timed it (not reused from an earlier run: `--resume` or a
    partial rerun; for the shard graphs, none skipped as already built): the graph-shaped
    phases (shard graphs, merge, refinement) on the largest of the sets built at the target's
    d, R, L and construction codes if there is one (a row's bytes and the codes change the
    cost per unit), the streaming phases on the largest set at the target's d if there is
    one, else the largest overall (their fixed costs amortised over the most rows); where
    the two largest sets that timed a streaming phase share that width, on the slope between
    them (`_slope_costs`: the fixed part is not priced per vector). graph_growth: the exponent
    b of a graph's build seconds ~ points^b (`bench/construction.py --sizes`); the shard
    graphs' cost per point is scaled by (target shard / reference shard)^(b - 1), since the
    target's shards are far larger than any measured one."""
    from memescale.build.plan import COSTS, MEASURED_PHASES, fitted_costs, plan_build
    from memescale.config import parse_bytes

    def timed_it(s: dict, name: str, phases: tuple[str, ...]) -> bool:
        """s timed the whole phase: measured, planned, not reused, and for the shard graphs
        none skipped (a resumed run rebuilds only the graphs an interruption lost)."""
        if name in s.get("reused", []) or s.get("seconds", {}).get(name, 0) <= 0:
            return False
        if sum(s.get("plan", {}).get("seconds", {}).get(p, 0) for p in phases) <= 0:
            return False
        return name != "graphs" or not any(sh.get("skipped") for sh in s.get("shards", []))

    costs, refs, off_shape = dict(COSTS), {}, []
    for name, phases in MEASURED_PHASES.items():
        timed = [s for s in rows if timed_it(s, name, phases)]
        if name in GRAPH_SHAPED:  # the shard graphs do not depend on the merge; what follows them does
            want = (d, R, L, build_pq_bytes) + ((merge,) if name != "graphs" else ())
            shaped = [s for s in timed if _shape(s)[:len(want)] == want]
            if timed and not shaped:
                off_shape.append(name)
            timed = shaped or timed
        else:  # a row's width changes more than the units say (fp16 decode, the PQ transforms' d x D)
            timed = [s for s in timed if s["d"] == d] or timed
        if not timed:
            continue
        timed.sort(key=lambda s: s["n"] * s["d"])
        ref = timed[-1]
        fitted = fitted_costs(ref["plan"]["seconds"], {name: ref["seconds"][name]})
        costs.update({p: fitted[p] for p in phases})
        refs[name] = ref
        if name not in GRAPH_SHAPED and len(timed) > 1 and timed[-2]["d"] == ref["d"]:
            slope = _slope_costs(timed[-2], ref, name, phases)
            if slope:
                costs.update(slope)
                refs[name] = [timed[-2], ref]
    kw = dict(R=R, L=L, overlap=2, pq_bytes=pq_bytes, budget_bytes=parse_bytes(budget, "budget"), threads=threads,
              threads_per_task=threads, build_pq_bytes=build_pq_bytes, merge=merge)
    default = plan_build(n, d, **kw)
    growth, ref_shard = 1.0, 0
    if "graphs" in refs:
        g = refs["graphs"] if isinstance(refs["graphs"], dict) else refs["graphs"][-1]
        ref_shard = max(g["partition"]["sizes"]) if g.get("partition") else g["n"]
        growth = (default.shard_vectors / ref_shard) ** (graph_growth - 1.0)
        costs["graphs"] *= growth
    fitted = plan_build(n, d, costs=costs, **kw)
    hours = fitted.seconds["total"] / 3600
    fits: dict[str, list[str]] = {}
    for name, ref in refs.items():
        key = (" and ".join(f"{r['n']:,} x {r['d']}" for r in ref) if isinstance(ref, list)
               else f"{ref['n']:,} x {ref['d']}")
        fits.setdefault(key, []).append(name)
    text = (f"{hours:.0f} h ({hours / 24:.1f} days; the plan's default costs say "
            f"{default.seconds['total'] / 3600:.0f} h), peak RAM {fitted.peak_memory_bytes / 2**30:.1f} GiB "
            f"(driver {fitted.driver_memory_bytes / 2**30:.1f} GiB + {fitted.tasks_at_once} x "
            f"{fitted.task_memory_bytes / 2**30:.1f} GiB shard tasks), {fitted.shards} shards, R={R} L={L}, "
            f"construction codes {build_pq_bytes} B, merge {merge}. Costs fitted on "
            + "; ".join(f"the {k} build ({', '.join(v)})" for k, v in fits.items())
            + (f"; the shard graphs' cost per point x {growth:.2f} for shards of {default.shard_vectors:,} against "
               f"{ref_shard:,} points (points^{graph_growth})" if graph_growth != 1.0 and ref_shard else "")
            + (f". NOT AT THE TARGET'S SHAPE: {', '.join(off_shape)} priced from a build of another d, R, L, "
               f"codes or merge" if off_shape else "")
            + ". Hours per phase: "
            + ", ".join(f"{k} {v / 3600:.1f}" for k, v in fitted.seconds.items() if k != "total"))
    return {"text": text, "plan": fitted.to_dict(), "default_costs_plan": default.to_dict(), "costs": costs,
            "fitted_on": fits, "off_shape": off_shape, "graph_growth_factor": growth,
            "fitted_shape": {"d": d, "R": R, "L": L, "build_pq_bytes": build_pq_bytes, "merge": merge}}


def _slope_costs(small: dict, big: dict, name: str, phases: tuple[str, ...]) -> dict[str, float] | None:
    """Costs of a streaming phase from two sets of the same width: measured seconds = a + b x
    (planned seconds of the sub-phases that grow with N), so a fixed part (a sample's
    training, start-up) is not priced per vector. b scales those sub-phases' costs; a goes to
    the sub-phases whose planned seconds do not grow (PQ training), or is dropped. None when
    the two sets do not give a positive slope and intercept."""
    from memescale.build.plan import COSTS

    ps, pb = small["plan"]["seconds"], big["plan"]["seconds"]
    grow = [p for p in phases if pb.get(p, 0) > ps.get(p, 0) * (1 + 1e-9)]
    fixed = [p for p in phases if p not in grow and pb.get(p, 0) > 0]
    dv = sum(pb[p] for p in grow) - sum(ps[p] for p in grow)
    if not grow or dv <= 0:
        return None
    b = (big["seconds"][name] - small["seconds"][name]) / dv
    a = big["seconds"][name] - b * sum(pb[p] for p in grow)
    if b <= 0 or a < 0:
        return None
    out = {p: b * COSTS[p] for p in grow}
    pf = sum(pb[p] for p in fixed)
    out.update({p: a / pf * COSTS[p] for p in fixed} if pf > 0 else {})
    return out


def _mib(x: float) -> str:
    return f"{x / 2**20:,.0f}"


def report(rows: list[dict], a: argparse.Namespace) -> None:
    """The markdown table, the extrapolation and the plot."""
    lines = ["| set | shards | tasks at once | driver peak RssAnon MiB (B/vector) | task peak / declared MiB | "
             "scratch GiB | index GiB | wall s | per phase s | " + " | ".join(f"recall@10 L={L}" for L in a.Ls.split(","))
             + " |", "|" + "---|" * (9 + len(a.Ls.split(",")))]
    for s in rows:
        n = s["n"]
        drv = s["driver_peak_rss_anon_external"]
        tasks = [t for t in s.get("shards", []) if not t.get("skipped")]
        tpeak = max((t.get("peak_rss_anon", t.get("peak_rss", 0)) for t in tasks), default=0)
        tdecl = max((t.get("declared_memory", 0) for t in tasks), default=0)
        phases = ", ".join(f"{k} {v:.0f}" for k, v in s.get("seconds", {}).items() if k != "total")
        plan = s.get("plan", {})
        label = (f"{n:,} x {s['d']}, R={plan.get('R')} L={plan.get('L')}"
                 + (f", codes {s['build_pq_bytes']} B" if s.get("build_pq_bytes") else "")
                 + (f", merge {s['merge']}" if s.get("merge", "prune") != "prune" else "")
                 + (f" (reused: {', '.join(s['reused'])})" if s.get("reused") else ""))
        lines.append(f"| {label} | {len(s.get('shards', []))} | {s.get('plan', {}).get('tasks_at_once', '')} | "
                     f"{_mib(drv)} ({drv / n:.1f}) | {_mib(tpeak)} / {_mib(tdecl)} | {s['scratch_bytes'] / 2**30:.2f} | "
                     f"{s['index_bytes'] / 2**30:.2f} | {s['wall_seconds']:.0f} | {phases} | "
                     + " | ".join(str(s.get(f"recall@10_L{L}", "")) for L in a.Ls.split(",")) + " |")
    from memescale.config import load_config

    target = load_config(a.target_config).index
    ext = extrapolate(rows, a.target_vectors, a.target_dim, a.target_budget, a.target_threads, target.R, target.L,
                      target.pq_bytes, target.build_pq_bytes, a.graph_growth, target.merge)
    lines += ["", f"Extrapolated to {a.target_vectors:,} x {a.target_dim} on {a.target_threads} cores, "
              f"{a.target_budget}: " + ext["text"]]
    # growth compares builds of one shape
    same_d = sorted((s for s in rows if _shape(s) == _shape(rows[0]) and not s.get("reused")), key=lambda s: s["n"])
    if len(same_d) >= 2:
        lo, hi = same_d[0], same_d[-1]
        b = math.log(hi["wall_seconds"] / lo["wall_seconds"]) / math.log(hi["n"] / lo["n"])
        lines.append(f"Build time grows as N^{b:.2f} from {lo['n']:,} to {hi['n']:,} vectors (target: <= N^1.15).")
    by_phase = [s for s in rows if s.get("driver_peak_rss_anon_by_phase")]
    if by_phase:
        lines += ["", "Driver peak RssAnon MiB by phase (the build's own sampling):", "",
                  "| set | " + " | ".join(by_phase[0]["driver_peak_rss_anon_by_phase"]) + " |",
                  "|" + "---|" * (1 + len(by_phase[0]["driver_peak_rss_anon_by_phase"]))]
        for s in by_phase:
            lines.append(f"| {s['n']:,} x {s['d']} | "
                         + " | ".join(_mib(v) for v in s["driver_peak_rss_anon_by_phase"].values()) + " |")
    text = "\n".join(lines)
    print(text)
    (RESULTS / "build_scale.md").write_text(text + "\n")
    (RESULTS / "build_scale.json").write_text(json.dumps({"sets": rows, "extrapolation": ext}, indent=1,
                                                         default=str))
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    for d in sorted({s["d"] for s in rows}):
        ss = sorted((s for s in rows if s["d"] == d), key=lambda s: s["n"])
        ax1.plot([s["n"] for s in ss], [s["wall_seconds"] for s in ss], "o-", label=f"d={d}")
        ax2.plot([s["n"] for s in ss], [s["driver_peak_rss_anon_external"] / 2**20 for s in ss], "o-", label=f"d={d}")
    ax1.set(xlabel="vectors", ylabel="build wall seconds", xscale="log", yscale="log")
    ax2.set(xlabel="vectors", ylabel="driver peak RssAnon (MiB)", xscale="log")
    ax1.legend()
    ax2.legend()
    fig.tight_layout()
    fig.savefig(RESULTS / "build_scale.png", dpi=110)


if __name__ == "__main__":
    sys.exit(main())
