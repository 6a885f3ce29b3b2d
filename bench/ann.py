"""Side-by-side ANN benchmark: memescale's disk index against diskannpy, faiss and hnswlib.

    .venv/bin/python bench/ann.py --dataset ../shared/data/ann/pypi-minilm
    .venv/bin/python bench/ann.py --dataset synthetic-gap   # 200k x 1152 images, text queries
    .venv/bin/python bench/ann.py --scaling            # synthetic 100k..800k scaling run

Every library runs in its own process (and the peers in their own virtual environments, made
by bench/setup_peers.sh), pinned to the same --cores CPUs with --threads threads, one after
the other, never concurrently:
- memescale (bench/peers/memescale_runner.py, project venv): built twice, plain PQ and
  query-aware PQ (trained on the first --eval-start OOD queries); timed from a cold start
  (page cache evicted before each L), direct (O_DIRECT reads with native AIO: every read from
  the device, as diskannpy reads) and warm.
- diskannpy 0.7.0 disk index (bench/peers/diskann_runner.py, .venv-diskann): same R, L,
  alpha (its fixed 1.2), same PQ bytes in RAM; O_DIRECT reads; searched at --threads and
  at the --diskann-threads extras.
- faiss IVF-PQ (same PQ bytes), faiss IVF-PQ + exact re-rank, hnswlib
  (bench/peers/faiss_hnsw_runner.py, .venv-peers): in-RAM references.
Queries [0, eval_start) of both sets are the query-aware PQ's training sample and are never
evaluated; every system is evaluated on the same queries [eval_start, 2000).

recall@10 = |top-10 found ∩ gt[:, :10]| / 10 averaged over queries; QPS = evaluated queries /
wall seconds of one batch search over all of them.

Outputs: a table on stdout, bench/results/ann.json, bench/results/ann_recall_qps.png and a
plain-text verdict on the targets (also bench/results/ann_summary.txt).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
sys.path.insert(0, str(BENCH / "peers"))
import _common as C  # noqa: E402

PEERS_DIR = BENCH / "peers"
VENV_DISKANN = ROOT / ".venv-diskann" / "bin" / "python"
VENV_DISKANN_RUST = ROOT / ".venv-diskann-rust" / "bin" / "python"
VENV_LANCEDB = ROOT / ".venv-lancedb" / "bin" / "python"
VENV_PEERS = ROOT / ".venv-peers" / "bin" / "python"

# Targets from the index's issue.
TARGET_RECALL = 0.95
TARGET_QPS_RATIO = 1.5
# Against 2026's peers: QPS (direct I/O) over the better DiskANN and over LanceDB, build time
# and p99 single-query latency relative to diskannpy-rust.
TARGET_DISKANN_RATIO = 2.0
TARGET_LANCEDB_RATIO = 5.0
TARGET_BUILD_RATIO = 0.7
TARGET_P99_RATIO = 0.7

STYLE = {  # curve key -> (label, colour, line style, marker)
    "memescale-qa-warm": ("memescale, query-aware PQ, warm", "C3", "-", "o"),
    "memescale-qa-cold": ("memescale, query-aware PQ, cold start", "C3", "--", "o"),
    "memescale-qa-direct": ("memescale, query-aware PQ, direct I/O", "C3", ":", "o"),
    "memescale-plain-warm": ("memescale, plain PQ, warm", "C1", "-", "s"),
    "memescale-plain-cold": ("memescale, plain PQ, cold start", "C1", "--", "s"),
    "memescale-plain-direct": ("memescale, plain PQ, direct I/O", "C1", ":", "s"),
    "diskannpy-t2": ("diskannpy disk index, 2 threads", "C0", "-", "^"),
    "diskannpy-t8": ("diskannpy disk index, 8 threads", "C0", ":", "^"),
    "diskannpy-rust-t2": ("diskannpy-rust disk index, 2 threads", "C4", "-", "v"),
    "diskannpy-rust-t8": ("diskannpy-rust disk index, 8 threads", "C4", ":", "v"),
    "lancedb-r10": ("LanceDB IVF-PQ + refine x10, on disk", "C5", "-", "D"),
    "lancedb-r40": ("LanceDB IVF-PQ + refine x40, on disk", "C5", "--", "D"),
    "faiss-ivfpq": ("faiss IVF-PQ (RAM)", "C2", "-", "v"),
    "faiss-ivfpq-rflat": ("faiss IVF-PQ + exact re-rank (RAM)", "C2", "--", "v"),
    "hnswlib": ("hnswlib (RAM, full vectors)", "C4", "-", "D"),
}


PLOT_SKIP = {"memescale-plain-cold", "memescale-plain-direct"}  # in the table and JSON only


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dataset", default=str(ROOT.parent / "shared" / "data" / "ann" / "pypi-minilm"),
                    help="a dataset folder (base.npy, queries_{id,ood}.npy, gt_{id,ood}.npy), or synthetic-gap: "
                         "200k x 1152 'images' and 2,000 'text' queries across a modality gap (`synthetic_gap`)")
    ap.add_argument("--results", default=str(BENCH / "results"), help="output folder")
    ap.add_argument("--work", default="", help="index folder (default RESULTS/work)")
    ap.add_argument("--systems", default="memescale,diskannpy,diskannpy-rust,lancedb,faiss,hnswlib",
                    help="comma list among memescale, diskannpy, diskannpy-rust, lancedb, faiss, hnswlib")
    ap.add_argument("--latency-Ls", default="30,35,40,45,50,60,70,85,100,150",
                    help="search L of the one-query-at-a-time latency sweep (memescale and the DiskANNs); "
                    "fine where recall crosses 0.95, where the latency targets are read")
    ap.add_argument("--R", type=int, default=64)
    ap.add_argument("--L", type=int, default=100, help="build list size")
    ap.add_argument("--alpha", type=float, default=1.2)
    ap.add_argument("--pq-bytes", type=int, default=48)
    ap.add_argument("--build-pq-bytes", type=int, default=0,
                    help="memescale's construction ranked by navigation codes of this many bytes (0: exact)")
    ap.add_argument("--beam-width", type=int, default=4)
    ap.add_argument("--Ls", default="10,20,30,40,50,70,100,150,200", help="search L sweep")
    ap.add_argument("--nprobes", default="1,2,4,8,16,32,64,128,256", help="faiss sweep")
    ap.add_argument("--lancedb-nprobes", default="4,8,16,32,64,128",
                    help="LanceDB sweep (one query per call: about 100 QPS, so one pass per point)")
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--cores", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--diskann-threads", default="8",
                    help="extra diskannpy search thread counts ('' for none)")
    ap.add_argument("--cache-nodes", type=int, default=1024,
                    help="records both disk indexes keep in RAM, breadth-first from their entry "
                         "point(s) (memescale's default; diskannpy gets the same)")
    ap.add_argument("--reps", type=int, default=3, help="timed repetitions per point (best kept)")
    ap.add_argument("--eval-start", type=int, default=1000)
    ap.add_argument("--max-base", type=int, default=0, help="smoke runs: first N base vectors")
    ap.add_argument("--max-queries", type=int, default=0, help="smoke runs: evaluated queries")
    ap.add_argument("--metadata", default="text", choices=["text", "none"])
    ap.add_argument("--reuse", action="store_true",
                    help="reuse indexes already built with the same parameters (build seconds "
                         "are then the stored ones)")
    ap.add_argument("--reuse-results", default="",
                    help="comma list of systems whose JSON results in WORK are reused as they are")
    ap.add_argument("--scaling", action="store_true", help="run the synthetic scaling benchmark")
    ap.add_argument("--scaling-sizes", default="100000,200000,400000,800000")
    ap.add_argument("--scaling-Ls", default="20,50,100")
    ap.add_argument("--scaling-systems", default="memescale",
                    help="add diskannpy to build it at every size too (about as long again)")
    ap.add_argument("--scaling-queries", type=int, default=1000,
                    help="synthetic queries per set (half train, half evaluated)")
    return ap.parse_args(argv)


# ----------------------------------------------------------------------------------------
# Running the systems


def run_logged(name: str, cmd: list[str], log_path: Path) -> None:
    """Run one system's process; its output goes to log_path (its progress lines to stderr)."""
    print(f"$ {' '.join(shlex.quote(c) for c in cmd)}", flush=True)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.PIPE, text=True, cwd=ROOT)
        for line in proc.stderr:
            log.write(line)
            if line.startswith("["):
                print("   " + line.rstrip(), flush=True)
        rc = proc.wait()
    if rc != 0:
        tail = log_path.read_text(errors="replace").splitlines()[-25:]
        raise SystemExit(f"{name} failed (exit {rc}); last lines of {log_path}:\n" + "\n".join(tail))
    print(f"   ({name}: {time.perf_counter() - t0:.0f} s)", flush=True)


def common_args(a, dataset: str) -> list[str]:
    return ["--dataset", dataset, "--max-base", str(a.max_base), "--max-queries",
            str(a.max_queries), "--eval-start", str(a.eval_start), "--k", str(a.k),
            "--cores", str(a.cores), "--reps", str(a.reps)]


def need(python: Path) -> str:
    if not python.exists():
        raise SystemExit(f"{python} is missing: run `bash bench/setup_peers.sh ann` first")
    return str(python)


def run_systems(a, dataset: str, work: Path, systems: list[str], Ls: str, tag: str = "",
                memescale_variants: str = "plain,qa", modes: str = "cold,direct,warm") -> dict:
    """Run each requested system's runner; returns {system: parsed JSON}."""
    reuse_results = set(filter(None, a.reuse_results.split(",")))
    out = {}
    jobs = []
    if "memescale" in systems:
        js = work / f"memescale{tag}.json"
        cmd = [sys.executable, str(PEERS_DIR / "memescale_runner.py"), *common_args(a, dataset),
               "--workdir", str(work / f"memescale{tag}"), "--out", str(js),
               "--variants", memescale_variants, "--modes", modes,
               "--R", str(a.R), "--L", str(a.L), "--alpha", str(a.alpha),
               "--pq-bytes", str(a.pq_bytes), "--build-pq-bytes", str(a.build_pq_bytes),
               "--beam-width", str(a.beam_width), "--Ls", Ls, "--threads", str(a.threads), "--metadata", a.metadata,
               "--cache-nodes", str(a.cache_nodes), "--latency-Ls", a.latency_Ls]
        jobs.append(("memescale", cmd, js))
    for name, venv in (("diskannpy", VENV_DISKANN), ("diskannpy-rust", VENV_DISKANN_RUST)):
        if name not in systems:
            continue
        js = work / f"{name}{tag}.json"
        threads = ",".join([str(a.threads)] + [t for t in a.diskann_threads.split(",") if t])
        cmd = [need(venv), str(PEERS_DIR / "diskann_runner.py"), *common_args(a, dataset),
               "--workdir", str(work / f"{name}{tag}"), "--out", str(js),
               "--R", str(a.R), "--L", str(a.L), "--alpha", str(a.alpha),
               "--pq-bytes", str(a.pq_bytes), "--beam-width", str(a.beam_width), "--Ls", Ls,
               "--threads", threads, "--build-threads", str(a.threads),
               "--cache-nodes", str(a.cache_nodes), "--cache-mechanism", "2", "--latency-Ls", a.latency_Ls]
        jobs.append((name, cmd, js))
    if "lancedb" in systems:
        js = work / f"lancedb{tag}.json"
        cmd = [need(VENV_LANCEDB), str(PEERS_DIR / "lancedb_runner.py"), *common_args(a, dataset),
               "--workdir", str(work / f"lancedb{tag}"), "--out", str(js), "--pq-bytes", str(a.pq_bytes),
               "--nprobes", a.lancedb_nprobes, "--threads", str(a.threads), "--reps", "1"]
        jobs.append(("lancedb", cmd, js))
    libs = [x for x in ("faiss-ivfpq", "faiss-ivfpq-rflat") if "faiss" in systems]
    libs += ["hnswlib"] if "hnswlib" in systems else []
    if libs:
        js = work / f"faiss_hnsw{tag}.json"
        cmd = [need(VENV_PEERS), str(PEERS_DIR / "faiss_hnsw_runner.py"), *common_args(a, dataset),
               "--out", str(js), "--libs", ",".join(libs), "--R", str(a.R), "--L", str(a.L),
               "--pq-bytes", str(a.pq_bytes), "--nprobes", a.nprobes, "--efs", Ls,
               "--threads", str(a.threads)]
        jobs.append(("faiss_hnsw", cmd, js))
    for name, cmd, js in jobs:
        if a.reuse and name != "faiss_hnsw":
            cmd.append("--reuse")
        if name in reuse_results or (name == "faiss_hnsw" and reuse_results & {"faiss", "hnswlib"}):
            if js.exists():
                print(f"(reusing results {js})")
                out[name] = json.loads(js.read_text())
                continue
        run_logged(name, cmd, work / "logs" / f"{name}{tag}.log")
        out[name] = json.loads(js.read_text())
    return out


# ----------------------------------------------------------------------------------------
# Turning results into curves, tables and verdicts


def curves_from(raw: dict) -> list[dict]:
    """Flatten every system's results into curves: one per (system variant, mode, threads,
    query set), each with build seconds, index RAM and points sorted by the swept knob."""
    curves = []

    def add(key, qs, param_name, points, build_s, ram, extra=None):
        pts = sorted((p for p in points if p["query_set"] == qs), key=lambda p: p[param_name])
        if pts:
            curves.append({"key": key, "label": STYLE.get(key, (key,))[0], "query_set": qs,
                           "param": param_name, "build_s": build_s, "ram_bytes": ram,
                           "points": pts, **(extra or {})})

    if "memescale" in raw:
        for v in raw["memescale"]["variants"]:
            for run in v["runs"]:
                for qs in C.QUERY_SETS:
                    add(f"memescale-{v['variant']}-{run['mode']}", qs, "L", run["points"],
                        v["build"]["seconds"], v["index_ram_files_bytes"],
                        {"ram_rss_delta_bytes": v["index_ram_rss_delta_bytes"],
                         "disk_bytes": sum(v["files"].values())})
    for name in ("diskannpy", "diskannpy-rust"):
        if name not in raw:
            continue
        d = raw[name]
        for run in d["runs"]:
            for qs in C.QUERY_SETS:
                add(f"{name}-t{run['threads']}", qs, "L", run["points"], d["build"]["seconds"],
                    run["index_ram_files_bytes"],
                    {"ram_rss_delta_bytes": run["index_ram_rss_delta_bytes"],
                     "disk_bytes": sum(v for k, v in d["files"].items()
                                       if k.endswith("_disk.index"))})
    if "lancedb" in raw:
        d = raw["lancedb"]
        for refine in sorted({p["refine"] for p in d["points"]}):
            for qs in C.QUERY_SETS:
                add(f"lancedb-r{refine}", qs, "param", [p for p in d["points"] if p["refine"] == refine],
                    d["build"]["seconds"], d.get("index_ram_bytes"), {"disk_bytes": d.get("disk_bytes")})
    if "faiss_hnsw" in raw:
        for p in raw["faiss_hnsw"]["peers"]:
            run = p["runs"][0]
            for qs in C.QUERY_SETS:
                add(p["library"], qs, "param", run["points"], p["build"]["seconds"],
                    run["index_ram_bytes"], {"ram_rss_delta_bytes": run["index_ram_rss_delta_bytes"]})
    return curves


def at_recall(curve: dict, r: float) -> dict | None:
    """QPS, reads and knob where the curve first reaches recall r (linear in recall between
    the two sweep points around it, QPS interpolated in log space); None if it never does."""
    pts = curve["points"]
    for i, p in enumerate(pts):
        if p["recall"] >= r:
            if i == 0 or pts[i - 1]["recall"] >= p["recall"]:
                return {"qps": p["qps"], "reads": p.get("mean_reads"), "knob": p[curve["param"]],
                        "recall": p["recall"], "interpolated": False}
            q = pts[i - 1]
            t = (r - q["recall"]) / (p["recall"] - q["recall"])
            reads = None
            if p.get("mean_reads") is not None and q.get("mean_reads") is not None:
                reads = q["mean_reads"] + t * (p["mean_reads"] - q["mean_reads"])
            return {"qps": math.exp(math.log(q["qps"]) + t * (math.log(p["qps"]) - math.log(q["qps"]))),
                    "reads": reads, "knob": f"{q[curve['param']]}-{p[curve['param']]}",
                    "recall": r, "interpolated": True}
    return None


def find(curves, key, qs):
    for c in curves:
        if c["key"] == key and c["query_set"] == qs:
            return c
    return None


def fmt(x, spec=".1f", none="-"):
    return none if x is None else format(x, spec)


def print_tables(curves: list[dict], k: int) -> str:
    lines = []
    for qs in C.QUERY_SETS:
        lines.append(f"\n=== {qs.upper()} queries: every sweep point (recall@{k}, QPS at the "
                     f"pinned threads, mean 4 KiB reads and PQ comparisons per query) ===")
        lines.append(f"{'system':44s} {'knob':>6s} {'recall':>7s} {'QPS':>9s} {'reads/q':>8s} "
                     f"{'pq/q':>7s} {'p50 ms':>7s} {'disk KiB/q':>10s}")
        for c in curves:
            if c["query_set"] != qs:
                continue
            for p in c["points"]:
                lines.append(
                    f"{c['label'][:44]:44s} {p[c['param']]:6d} {p['recall']:7.4f} {p['qps']:9.1f} "
                    f"{fmt(p.get('mean_reads')):>8s} {fmt(p.get('mean_pq_comparisons'), '.0f'):>7s} "
                    f"{fmt(p.get('latency_ms_p50'), '.2f'):>7s} "
                    f"{fmt(p.get('phys_read_kib_per_query')):>10s}")
            lines.append("")
    lines += head_to_head(curves, k)
    lines.append(f"\n=== Summary: build, index RAM, and the cost of reaching recall@{k} >= "
                 f"{TARGET_RECALL} ===")
    lines.append(f"{'system':44s} {'set':4s} {'build s':>8s} {'RAM MiB':>8s} {'RSS+MiB':>8s} "
                 f"{'max rec':>8s} {'knob@.95':>9s} {'QPS@.95':>9s} {'reads@.95':>9s}")
    for c in curves:
        r = at_recall(c, TARGET_RECALL)
        rss = c.get("ram_rss_delta_bytes")
        lines.append(
            f"{c['label'][:44]:44s} {c['query_set']:4s} {c['build_s']:8.1f} "
            f"{c['ram_bytes'] / 2**20:8.1f} {fmt(None if rss is None else rss / 2**20):>8s} "
            f"{max(p['recall'] for p in c['points']):8.4f} "
            f"{str(r['knob']) if r else '-':>9s} {fmt(r['qps'] if r else None):>9s} "
            f"{fmt(r['reads'] if r else None):>9s}")
    text = "\n".join(lines)
    print(text, flush=True)
    return text


def head_to_head(curves: list[dict], k: int) -> list[str]:
    """memescale and diskannpy at the same search L: recall, reads and QPS side by side."""
    cols = [("memescale-plain-warm", "plain"), ("memescale-qa-warm", "q-aware"),
            ("diskannpy-t2", "diskann")]
    qcols = [("memescale-qa-warm", "qa warm"), ("memescale-qa-cold", "qa cold"),
             ("memescale-qa-direct", "qa direct"), ("diskannpy-t2", "dk 2thr"),
             ("diskannpy-t8", "dk 8thr")]
    lines = []
    for qs in C.QUERY_SETS:
        have = {key: find(curves, key, qs) for key, _ in cols + qcols}
        if not (have["diskannpy-t2"] and (have["memescale-qa-warm"] or have["memescale-plain-warm"])):
            continue
        lines.append(f"\n=== {qs.upper()}: memescale vs diskannpy at the same L (recall@{k} | "
                     f"4 KiB reads per query | QPS) ===")
        lines.append(f"{'L':>4s} | " + " ".join(f"{n:>8s}" for _, n in cols) + " | "
                     + " ".join(f"{n:>7s}" for _, n in cols) + " | "
                     + " ".join(f"{n:>9s}" for _, n in qcols))
        byL = {key: {p["L"]: p for p in c["points"]} for key, c in have.items() if c}
        for L in sorted(byL["diskannpy-t2"]):
            def get(key, field, L=L, byL=byL):
                p = byL.get(key, {}).get(L)
                return None if p is None else p.get(field)
            lines.append(f"{L:4d} | " + " ".join(fmt(get(key, "recall"), "8.4f") for key, _ in cols)
                         + " | " + " ".join(fmt(get(key, "mean_reads"), "7.1f") for key, _ in cols)
                         + " | " + " ".join(fmt(get(key, "qps"), "9.0f") for key, _ in qcols))
    return lines


def verdict(curves: list[dict], threads: int) -> tuple[list[dict], str]:
    """Check the targets; returns (structured verdicts, plain text)."""
    out = []
    dk = f"diskannpy-t{threads}"

    def add(name, met, detail):
        out.append({"target": name, "met": met, "detail": detail})

    # 1. recall >= 0.95 on both sets (query-aware build; warm and cold search the same graph).
    for key in ("memescale-qa-warm", "memescale-plain-warm"):
        for qs in C.QUERY_SETS:
            c = find(curves, key, qs)
            if c:
                r = at_recall(c, TARGET_RECALL)
                best = max(p["recall"] for p in c["points"])
                add(f"recall@10 >= {TARGET_RECALL} ({c['label']}, {qs})", r is not None,
                    f"max recall {best:.4f}" + (f", first reached at L={r['knob']}" if r else
                                                f" at L<={c['points'][-1]['L']}"))
    # 2./3. QPS >= 1.5x and reads <= diskannpy's at equal recall.
    for key in ("memescale-qa-warm", "memescale-qa-cold", "memescale-qa-direct"):
        for qs in C.QUERY_SETS:
            m, d = find(curves, key, qs), find(curves, dk, qs)
            if not (m and d):
                continue
            r = min(TARGET_RECALL, max(p["recall"] for p in m["points"]),
                    max(p["recall"] for p in d["points"]))
            am, ad = at_recall(m, r), at_recall(d, r)
            ratio = am["qps"] / ad["qps"]
            add(f"QPS >= {TARGET_QPS_RATIO}x diskannpy at equal recall ({m['label']}, {qs})",
                ratio >= TARGET_QPS_RATIO,
                f"at recall {r:.3f}: memescale {am['qps']:.0f} QPS (L {am['knob']}) vs diskannpy "
                f"{ad['qps']:.0f} QPS (L {ad['knob']}): {ratio:.2f}x")
            if key.endswith("warm"):  # reads do not depend on the cache state
                if am["reads"] is None or ad["reads"] is None:
                    add(f"sector reads <= diskannpy's at equal recall ({qs})", None,
                        "reads not available")
                else:
                    add(f"sector reads <= diskannpy's at equal recall ({qs})",
                        am["reads"] <= ad["reads"],
                        f"at recall {r:.3f}: memescale {am['reads']:.1f} reads/query vs "
                        f"diskannpy {ad['reads']:.1f} (measured O_DIRECT 4 KiB reads)")
    # 4. build time.
    d = find(curves, dk, "id")
    for key in ("memescale-qa-warm", "memescale-plain-warm"):
        m = find(curves, key, "id")
        if m and d:
            add(f"build time <= diskannpy's ({m['label'].split(' (')[0]})",
                m["build_s"] <= d["build_s"],
                f"memescale {m['build_s']:.1f} s vs diskannpy {d['build_s']:.1f} s")
    # 5. query-aware PQ beats plain PQ on OOD at fixed L.
    qa, pl = find(curves, "memescale-qa-warm", "ood"), find(curves, "memescale-plain-warm", "ood")
    if qa and pl:
        rows = []
        wins = losses = 0
        for p, q in zip(qa["points"], pl["points"]):
            delta = p["recall"] - q["recall"]
            wins += delta > 0.0005
            losses += delta < -0.0005
            rows.append(f"L={p['L']}: {p['recall']:.4f} vs {q['recall']:.4f} ({delta:+.4f})")
        idq, idp = find(curves, "memescale-qa-warm", "id"), find(curves, "memescale-plain-warm", "id")
        id_delta = np.mean([p["recall"] - q["recall"] for p, q in zip(idq["points"], idp["points"])])
        add("query-aware PQ beats plain PQ on OOD at fixed L", wins > losses and wins >= len(rows) / 2,
            f"OOD recall query-aware vs plain: {'; '.join(rows)} ({wins} better, {losses} worse); "
            f"mean ID change {id_delta:+.4f}")
    return out, verdict_text(out, "=== Targets ===")


def verdict_text(out: list[dict], title: str) -> str:
    """Structured verdicts as lines under `title` ([MET] / [NOT MET] / [n/a]), printed and returned."""
    lines = ["\n" + title]
    for v in out:
        mark = {True: "MET    ", False: "NOT MET", None: "n/a    "}[v["met"]]
        lines.append(f"[{mark}] {v['target']}: {v['detail']}")
    text = "\n".join(lines)
    print(text, flush=True)
    return text


def latency_at(points: list[dict], qs: str, r: float) -> dict | None:
    """The single-query latency point of set qs at the smallest swept L reaching recall r."""
    ok = sorted((p for p in points if p["query_set"] == qs and p["recall"] >= r), key=lambda p: p["L"])
    return ok[0] if ok else None


def peers_verdict(curves: list[dict], raw: dict, threads: int) -> tuple[list[dict], str]:
    """The targets against the better DiskANN (C++ or Rust), LanceDB, and diskannpy-rust's build
    time and p99 latency; returns (structured verdicts, plain text)."""
    out = []

    def add(name, met, detail):
        out.append({"target": name, "met": met, "detail": detail})

    for qs in C.QUERY_SETS:
        m = find(curves, "memescale-qa-direct", qs)
        if not m:
            continue
        am = at_recall(m, TARGET_RECALL)
        peers = [(k, at_recall(c, TARGET_RECALL)) for k in (f"diskannpy-t{threads}", f"diskannpy-rust-t{threads}")
                 if (c := find(curves, k, qs))]
        reached = [(k, r) for k, r in peers if r]
        if peers:
            if am is None:
                add(f"QPS >= {TARGET_DISKANN_RATIO}x the better DiskANN at recall {TARGET_RECALL} ({qs})", False,
                    "memescale does not reach the recall")
            elif not reached:
                add(f"QPS >= {TARGET_DISKANN_RATIO}x the better DiskANN at recall {TARGET_RECALL} ({qs})", True,
                    "no DiskANN reaches the recall")
            else:
                k, best = max(reached, key=lambda kr: kr[1]["qps"])
                ratio = am["qps"] / best["qps"]
                add(f"QPS >= {TARGET_DISKANN_RATIO}x the better DiskANN at recall {TARGET_RECALL} ({qs})",
                    ratio >= TARGET_DISKANN_RATIO,
                    f"memescale direct I/O {am['qps']:.0f} QPS (L {am['knob']}) vs {k} {best['qps']:.0f} "
                    f"(L {best['knob']}): {ratio:.2f}x")
        lances = [c for c in curves if c["key"].startswith("lancedb-") and c["query_set"] == qs]
        if lances:
            top = max((p for c in lances for p in c["points"]), key=lambda p: (p["recall"], p["qps"]))
            r = min(top["recall"], max(p["recall"] for p in m["points"]))
            am_l = at_recall(m, r)
            lq = max(p["qps"] for c in lances for p in c["points"] if p["recall"] >= r)
            add(f"QPS >= {TARGET_LANCEDB_RATIO}x LanceDB at its best recall ({qs})",
                am_l is not None and am_l["qps"] / lq >= TARGET_LANCEDB_RATIO,
                f"LanceDB's best recall {top['recall']:.4f} (nprobes {top['param']}, refine x{top['refine']}); at "
                f"recall {r:.4f}: memescale {am_l['qps'] if am_l else 0:.0f} QPS vs LanceDB {lq:.0f}"
                + (f": {am_l['qps'] / lq:.2f}x" if am_l else "")
                + ("" if top["recall"] >= TARGET_RECALL else f"; LanceDB cannot reach recall {TARGET_RECALL}"))
    m = find(curves, "memescale-qa-direct", "id") or find(curves, "memescale-qa-warm", "id")
    rust = raw.get("diskannpy-rust")
    if m and rust:
        ratio = m["build_s"] / rust["build"]["seconds"]
        add(f"build time <= {TARGET_BUILD_RATIO}x diskannpy-rust's at equal R/L", ratio <= TARGET_BUILD_RATIO,
            f"memescale {m['build_s']:.1f} s vs diskannpy-rust {rust['build']['seconds']:.1f} s: {ratio:.2f}x")
    mlat = next((v["latency"] for v in raw.get("memescale", {}).get("variants", []) if v.get("latency")), None)
    if mlat and rust and rust.get("latency"):
        for qs in C.QUERY_SETS:
            a, b = latency_at(mlat, qs, TARGET_RECALL), latency_at(rust["latency"], qs, TARGET_RECALL)
            if a and b:
                ratio = a["p99_ms"] / b["p99_ms"]
                add(f"p99 single-query latency <= {TARGET_P99_RATIO}x diskannpy-rust's at recall {TARGET_RECALL} "
                    f"({qs})", ratio <= TARGET_P99_RATIO,
                    f"memescale L {a['L']}: p50 {a['p50_ms']:.2f} / p99 {a['p99_ms']:.2f} ms vs diskannpy-rust "
                    f"L {b['L']}: p50 {b['p50_ms']:.2f} / p99 {b['p99_ms']:.2f} ms: {ratio:.2f}x")
            else:
                add(f"p99 single-query latency <= {TARGET_P99_RATIO}x diskannpy-rust's at recall {TARGET_RECALL} "
                    f"({qs})", None, "recall not reached in the latency sweep by "
                    + ("memescale" if not a else "diskannpy-rust"))
    return out, verdict_text(out, "=== Targets against 2026's peers ===")


def latency_table(raw: dict) -> str:
    """One-query-at-a-time latency of memescale (direct I/O) and the DiskANNs, per set and L."""
    rows = []
    mlat = next((v["latency"] for v in raw.get("memescale", {}).get("variants", []) if v.get("latency")), None)
    for name, points in (("memescale (direct I/O)", mlat), ("diskannpy", raw.get("diskannpy", {}).get("latency")),
                         ("diskannpy-rust", raw.get("diskannpy-rust", {}).get("latency"))):
        for p in points or []:
            rows.append(f"| {name} | {p['query_set']} | {p['L']} | {p['recall']:.4f} | {p['p50_ms']:.2f} | "
                        f"{p['p99_ms']:.2f} |")
    if not rows:
        return ""
    return "\n".join(["\n=== Single-query latency (one thread, one query at a time) ===",
                      "| system | set | L | recall@10 | p50 ms | p99 ms |", "|---|---|---|---|---|---|", *rows])


def plot(curves: list[dict], path: Path, title: str, k: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(15, 6.2), sharey=True)
    for ax, qs in zip(axes, C.QUERY_SETS):
        for c in curves:
            if c["query_set"] != qs or c["key"] in PLOT_SKIP:
                continue
            label, colour, ls, marker = STYLE.get(c["key"], (c["key"], None, "-", "."))
            xs = [p["recall"] for p in c["points"]]
            ys = [p["qps"] for p in c["points"]]
            ax.plot(xs, ys, ls, color=colour, marker=marker, ms=4, lw=1.4, label=label)
        ax.axvline(TARGET_RECALL, color="grey", lw=0.8, ls=":")
        ax.set_yscale("log")
        ax.set_xlim(0.5, 1.0)
        ax.set_xlabel(f"recall@{k}")
        ax.set_title({"id": "in-distribution queries", "ood": "out-of-distribution queries"}[qs])
        ax.grid(True, which="both", alpha=0.3)
    axes[0].set_ylabel("queries per second (log)")
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=3, fontsize=9, frameon=False)
    fig.suptitle(title, fontsize=11)
    fig.tight_layout(rect=(0, 0.12, 1, 0.95))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def machine_state() -> dict:
    try:
        up = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    except OSError:
        up = ""
    return {"loadavg": os.getloadavg(), "uptime": up, "cpus": os.cpu_count(),
            "time": time.strftime("%Y-%m-%d %H:%M:%S")}


# ----------------------------------------------------------------------------------------
# Main benchmark


def main_bench(a) -> None:
    results = Path(a.results)
    work = Path(a.work) if a.work else results / "work"
    work.mkdir(parents=True, exist_ok=True)
    systems = [s for s in a.systems.split(",") if s]
    if a.dataset == "synthetic-gap":
        folder = work / "synthetic-gap"
        write_synthetic_gap(folder, GAP_BASE, GAP_QUERIES)
        a.dataset = str(folder)
    start = machine_state()
    print(f"machine at start: {start['uptime']}", flush=True)
    t0 = time.perf_counter()
    raw = run_systems(a, a.dataset, work, systems, a.Ls)
    end = machine_state()
    print(f"machine at end: {end['uptime']} ({time.perf_counter() - t0:.0f} s in all)", flush=True)

    curves = curves_from(raw)
    table = print_tables(curves, a.k)
    verdicts, vtext = verdict(curves, a.threads)
    peer_verdicts, ptext = peers_verdict(curves, raw, a.threads)
    lat = latency_table(raw)
    print(lat, flush=True)
    notes = notes_text(a, raw, start, end)
    print(notes, flush=True)

    results.mkdir(parents=True, exist_ok=True)
    n = next(iter(raw.values()))["n"] if raw else 0
    name = Path(a.dataset).name
    stem = "ann" if name == "pypi-minilm" else f"ann-{name}"  # one set of result files per dataset
    C.write_json(results / f"{stem}.json", {
        "command": " ".join(shlex.quote(x) for x in sys.argv), "args": vars(a),
        "machine": {"start": start, "end": end}, "n": n, "targets": verdicts + peer_verdicts,
        "curves": curves, "raw": raw})
    (results / f"{stem}_summary.txt").write_text("\n".join([table, vtext, ptext, lat, notes]) + "\n")
    title = (f"{name}: {n:,} base vectors, {a.threads} threads on {a.cores} "
             f"cores; R={a.R} L={a.L} alpha={a.alpha} PQ {a.pq_bytes} B; load avg "
             f"{start['loadavg'][0]:.1f} -> {end['loadavg'][0]:.1f}")
    if curves:
        plot(curves, results / f"{stem}_recall_qps.png", title, a.k)
    print(f"\nwrote {results / (stem + '.json')}, {results / (stem + '_summary.txt')}, "
          f"{results / (stem + '_recall_qps.png')}")


def notes_text(a, raw, start, end) -> str:
    lines = ["\n=== Notes ==="]
    lines.append(f"machine: {start['cpus']} CPUs; load average at start {start['loadavg']}, at end "
                 f"{end['loadavg']} (shared machine: other work ran at the same time).")
    if "diskannpy" in raw:
        d = raw["diskannpy"]
        lines.append(
            f"diskannpy: R={d['params']['R']} L={d['params']['L']} alpha 1.2 (fixed in its disk "
            f"builder), PQ bytes used {d['build'].get('pq_bytes_used')}, full float32 vectors on "
            f"disk, node cache {d['params']['cache_nodes']} nodes, beam width "
            f"{d['params']['beam_width']}. Its batch_search returns no per-query statistics: reads "
            f"are /proc/self/io read_bytes / 4096 / queries (O_DIRECT, so every read is physical).")
    if "diskannpy-rust" in raw:
        d = raw["diskannpy-rust"]
        lines.append(
            f"diskannpy-rust {d['version']}: R={d['params']['R']} L={d['params']['L']} alpha "
            f"{d['params']['alpha']}, {d['build'].get('pq_bytes_used')} PQ chunks (bytes) in RAM, full float32 "
            f"vectors on disk, node cache {d['params']['cache_nodes']} nodes, beam width {d['params']['beam_width']}; "
            "reads are its own search_stats mean_ios (and /proc/self/io agrees: its reads reach the device).")
    if "lancedb" in raw:
        d = raw["lancedb"]
        lines.append(
            f"LanceDB {d['version']}: IVF{d['params']['partitions']}-PQ{d['params']['pq_bytes']} (dot) over a local Lance "
            f"table, refine factors {d['params']['refine']} (top k x r re-ranked with the full vectors), queries one "
            f"per call from {d['params']['threads']} threads; it reports no reads per query.")
    if "memescale" in raw:
        m = raw["memescale"]
        lines.append(
            f"memescale: node cache {m['params'].get('cache_nodes')} records (breadth-first from the "
            f"entry point), beam width {m['params'].get('beam_width')}; reads/q = the index's own count "
            "of 4 KiB record reads. 'cold start' = page cache evicted (posix_fadvise DONTNEED) and "
            "index reopened before each L: the batch starts cold, later queries reuse pages earlier "
            "ones read ('disk KiB/q' = what really came from disk). 'direct I/O' = O_DIRECT reads "
            "with Linux native AIO, every record read from the device (the like-for-like match for "
            "diskannpy, which reads the same way); each worker thread keeps its queries' reads in flight together. "
            f"'warm' = best of {a.reps} passes after one untimed pass (everything in the page cache).")
    if "memescale" in raw:
        for v in raw["memescale"]["variants"]:
            for qs, d in (v.get("pq_diagnostics") or {}).items():
                lines.append(
                    f"memescale {v['variant']} PQ alone (no graph), {qs}: recall@{a.k} "
                    f"{d['adc_recall']:.4f}, true top-{a.k} inside the PQ top-100 "
                    f"{d['true_topk_in_adc_top100']:.4f}, query-weighted error "
                    f"{d.get('query_weighted_error', float('nan')):.6f}")
    lines.append("faiss and hnswlib keep everything in RAM: they have no reads, and are there "
                 "as references for speed and recall, not as disk indexes.")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------
# Scaling on synthetic data


def synthetic(n: int, nq: int, d: int = 384, clusters: int = 1024, rank: int = 24,
              seed: int = 0) -> dict:
    """A clustered, normalised Gaussian mixture shaped like text embeddings.

    Each cluster is a random unit centre plus a random rank-`rank` spread and a little
    isotropic noise (low local intrinsic dimension, as real embeddings have); cluster sizes
    follow a Zipf-like law. ID queries come from the same mixture; OOD queries are shifted
    by one common direction (a 'modality gap'), then renormalised. The base of size n is a
    prefix of the base of any larger n for the same seed. Returns float16 arrays.
    """
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((clusters, d)).astype(np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    bases = rng.standard_normal((clusters, rank, d)).astype(np.float32) / math.sqrt(d)
    weights = 1.0 / np.arange(1, clusters + 1) ** 0.5
    weights /= weights.sum()
    gap = rng.standard_normal(d).astype(np.float32)
    gap /= np.linalg.norm(gap)

    def draw(count, rng_):
        out = np.empty((count, d), np.float16)
        for lo in range(0, count, 4096):  # (4096, rank, d) float32 gathers stay ~150 MB
            m = min(4096, count - lo)
            c = rng_.choice(clusters, size=m, p=weights)
            z = rng_.standard_normal((m, rank)).astype(np.float32) * 0.3
            x = centres[c] + np.einsum("mr,mrd->md", z, bases[c])
            x += rng_.standard_normal((m, d)).astype(np.float32) * (0.12 / math.sqrt(d))
            x /= np.linalg.norm(x, axis=1, keepdims=True)
            out[lo:lo + m] = x
        return out

    base = draw(n, np.random.default_rng(seed + 1))
    q_id = draw(nq, np.random.default_rng(seed + 2)).astype(np.float32)
    q_ood = draw(nq, np.random.default_rng(seed + 3)).astype(np.float32) + 0.6 * gap
    q_ood /= np.linalg.norm(q_ood, axis=1, keepdims=True)
    return {"base": base, "queries_id": q_id.astype(np.float16), "queries_ood": q_ood.astype(np.float16)}


GAP_BASE, GAP_QUERIES = 200_000, 2000
GAP_TARGETS = {"source": 0.30, "unrelated": 0.165, "centroid": 0.30}  # cosines of real CLIP caption/image pairs


def synthetic_gap(n: int = 200_000, nq: int = 2000, d: int = 1152, clusters: int = 2048, rank: int = 32,
                  seed: int = 0, block: int = 4096) -> dict:
    """A cross-modal stress set: "images" from a clustered mixture in a cone, and "texts"
    made from held-out images through one fixed linear map, a common offset and noise.

    Images: unit vectors x = normalise(w g + c_k + B_k z + noise) around one common direction
    g (embeddings of one model share a cone), clusters c_k with a rank-`rank` spread B_k,
    Zipf-like cluster sizes. Texts: t = normalise(a x + a G x + c o + e), G a fixed Gaussian
    map (d x d / sqrt d), o a fixed offset half along the images' mean direction, e fresh
    isotropic noise; a and c are solved from the images' measured statistics (mean cosine to
    their mean direction, mean cosine between unrelated pairs) so that a text's cosine to its
    source image, to unrelated images and to the images' centroid land on GAP_TARGETS
    (`tests/test_bench_synthetic_gap.py` checks them).

    Returns float16 "base" (n, d), "queries_id" (nq, d): held-out images (image-to-image
    search), "queries_ood" (nq, d): texts made from other held-out images, and "sources"
    (nq, d) float32: those images. The base of size n is a prefix of any larger n's.
    """
    mix = np.random.default_rng(seed)
    g = mix.standard_normal(d).astype(np.float32)
    g /= np.linalg.norm(g)
    centres = mix.standard_normal((clusters, d)).astype(np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    bases = mix.standard_normal((clusters, rank, d)).astype(np.float32) / math.sqrt(d)
    weights = 1.0 / np.arange(1, clusters + 1) ** 0.5
    weights /= weights.sum()
    G = mix.standard_normal((d, d)).astype(np.float32) / math.sqrt(d)
    w_off = mix.standard_normal(d).astype(np.float32)

    def images(count: int, rng: np.random.Generator) -> np.ndarray:
        out = np.empty((count, d), np.float32)
        for lo in range(0, count, block):  # whole blocks drawn, so any count's rows are a prefix of more's
            m = min(block, count - lo)
            c = rng.choice(clusters, size=block, p=weights)
            z = rng.standard_normal((block, rank)).astype(np.float32) * 0.25
            e = rng.standard_normal((block, d)).astype(np.float32) * (0.1 / math.sqrt(d))
            x = 1.1 * g + centres[c[:m]] + np.einsum("mr,mrd->md", z[:m], bases[c[:m]]) + e[:m]
            out[lo:lo + m] = x / np.linalg.norm(x, axis=1, keepdims=True)
        return out

    base = np.empty((n, d), np.float16)
    rng = np.random.default_rng(seed + 1)
    for lo in range(0, n, 16 * block):
        base[lo:lo + 16 * block] = images(min(16 * block, n - lo), rng)
    # the images' statistics, measured on a sample of their own (the texts do not depend on n)
    sample = images(4096, np.random.default_rng(seed + 5))
    mu = sample.mean(0)
    mu /= np.linalg.norm(mu)
    m1 = float((sample @ mu).mean())
    half = len(sample) // 2
    m2 = float(np.einsum("ij,ij->i", sample[:half], sample[half:2 * half]).mean())
    k = 0.5  # the offset's cosine to the images' mean direction
    o = w_off - (w_off @ mu) * mu
    o = k * mu + math.sqrt(1 - k * k) * o / np.linalg.norm(o)
    A, B = GAP_TARGETS["source"], GAP_TARGETS["unrelated"]
    p = (A - B) / (1 - m2)  # a / |t|
    q = (A - p) / (k * m1)  # c / |t|
    inv_s2 = 1 - 2 * p * p - q * q - 2 * p * q * k * m1
    if inv_s2 <= 0:
        raise ValueError(f"image statistics m1={m1:.3f} m2={m2:.3f} cannot reach the gap targets")
    scale = 1 / math.sqrt(inv_s2)
    a, c = p * scale, q * scale

    q_id = images(nq, np.random.default_rng(seed + 2))
    sources = images(nq, np.random.default_rng(seed + 3))
    noise = np.random.default_rng(seed + 4).standard_normal((nq, d)).astype(np.float32) / math.sqrt(d)
    t = a * sources + a * (sources @ G.T) + c * o + noise
    t /= np.linalg.norm(t, axis=1, keepdims=True)
    return {"base": base, "queries_id": q_id.astype(np.float16), "queries_ood": t.astype(np.float16),
            "sources": sources}


def write_synthetic_gap(folder: Path, n: int, nq: int, block: int = 4096) -> None:
    """The synthetic-gap dataset folder (`synthetic_gap`, 1152-d) in the real one's layout:
    queries_id are images, queries_ood texts; exact top-100 ground truth by inner product."""
    if (folder / "gt_ood.npy").exists():
        return
    folder.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    s = synthetic_gap(n, nq, block=block)
    for qs in C.QUERY_SETS:
        np.save(folder / f"queries_{qs}.npy", s[f"queries_{qs}"])
        np.save(folder / f"gt_{qs}.npy", C.exact_topk(s["base"], s[f"queries_{qs}"].astype(np.float32), 100))
    np.save(folder / "base.npy", s["base"])
    print(f"   synthetic-gap {n:,} x {s['base'].shape[1]} written to {folder} ({time.perf_counter() - t0:.0f} s)",
          flush=True)


def write_synthetic(folder: Path, n: int, nq: int) -> None:
    """Write a dataset folder in the same layout as the real one (exact top-100 ground truth)."""
    if (folder / "gt_ood.npy").exists():
        return
    folder.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    s = synthetic(n, nq)
    for qs in C.QUERY_SETS:
        q = s[f"queries_{qs}"].astype(np.float32)
        np.save(folder / f"queries_{qs}.npy", s[f"queries_{qs}"])
        np.save(folder / f"gt_{qs}.npy", C.exact_topk(s["base"], q, 100))
    np.save(folder / "base.npy", s["base"])
    print(f"   synthetic {n:,} x 384 written to {folder} ({time.perf_counter() - t0:.0f} s)",
          flush=True)


def main_scaling(a) -> None:
    results = Path(a.results)
    work = (Path(a.work) if a.work else results / "work") / "scaling"
    systems = [s for s in a.scaling_systems.split(",") if s]
    a.eval_start = a.scaling_queries // 2
    a.max_base = a.max_queries = 0
    start = machine_state()
    print(f"machine at start: {start['uptime']}", flush=True)
    rows = []
    for n in [int(x) for x in a.scaling_sizes.split(",")]:
        folder = work / f"data-{n}"
        write_synthetic(folder, n, a.scaling_queries)
        raw = run_systems(a, str(folder), work, systems, a.scaling_Ls, tag=f"-{n}",
                          memescale_variants="qa", modes="warm")
        for c in curves_from(raw):
            for p in c["points"]:
                rows.append({"n": n, "system": c["key"], "query_set": c["query_set"],
                             "build_s": c["build_s"], "ram_bytes": c["ram_bytes"],
                             "L": p.get("L", p.get("param")), "recall": p["recall"],
                             "qps": p["qps"], "mean_reads": p.get("mean_reads"),
                             "mean_pq_comparisons": p.get("mean_pq_comparisons")})
        C.write_json(results / "ann_scaling.json", {"machine_start": start, "rows": rows})
    end = machine_state()
    lines = [f"\n=== Scaling on synthetic clustered data (384-d, {a.threads} threads) ===",
             f"{'system':24s} {'N':>8s} {'set':4s} {'build s':>8s} {'s/100k':>7s} {'RAM MiB':>8s} "
             f"{'L':>4s} {'recall':>7s} {'QPS':>8s} {'reads/q':>8s} {'pq/q':>7s}"]
    for r in sorted(rows, key=lambda r: (r["system"], r["query_set"], r["L"], r["n"])):
        lines.append(f"{r['system'][:24]:24s} {r['n']:8d} {r['query_set']:4s} {r['build_s']:8.1f} "
                     f"{r['build_s'] / r['n'] * 1e5:7.1f} {r['ram_bytes'] / 2**20:8.1f} "
                     f"{r['L']:4d} {r['recall']:7.4f} {r['qps']:8.1f} {fmt(r['mean_reads']):>8s} "
                     f"{fmt(r['mean_pq_comparisons'], '.0f'):>7s}")
    lines.append(f"machine: load average {start['loadavg']} at start, {end['loadavg']} at end")
    text = "\n".join(lines)
    print(text)
    (results / "ann_scaling.txt").write_text(text + "\n")
    C.write_json(results / "ann_scaling.json", {"machine_start": start, "machine_end": end,
                                                "rows": rows})
    plot_scaling(rows, results / "ann_scaling.png")
    print(f"wrote {results / 'ann_scaling.json'}, {results / 'ann_scaling.txt'}, "
          f"{results / 'ann_scaling.png'}")


def plot_scaling(rows: list[dict], path: Path) -> None:
    """Three panels against N: build seconds; reads per query; recall@10 (one colour per L,
    solid = ID queries, dashed = OOD; one marker per system)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(16, 4.8))
    systems = sorted({r["system"] for r in rows})
    Ls = sorted({r["L"] for r in rows})
    markers = "os^Dv"
    for i, s in enumerate(systems):
        mk = markers[i % len(markers)]
        name = STYLE.get(s, (s,))[0].replace(", warm", "").replace(", 2 threads", "")
        rs = [r for r in rows if r["system"] == s]
        ns = sorted({r["n"] for r in rs})
        builds = [next(r["build_s"] for r in rs if r["n"] == n) for n in ns]
        axes[0].plot(ns, builds, "-" + mk, color=f"C{i}", label=name)
        for j, L in enumerate(Ls):
            for qs, ls in (("id", "-"), ("ood", "--")):
                sel = sorted((r for r in rs if r["L"] == L and r["query_set"] == qs),
                             key=lambda r: r["n"])
                label = f"{name}, L={L}, {qs.upper()}"
                reads = [r["mean_reads"] for r in sel]
                if sel and all(x is not None for x in reads):
                    axes[1].plot([r["n"] for r in sel], reads, ls + mk, color=f"C{j + 2}", label=label)
                axes[2].plot([r["n"] for r in sel], [r["recall"] for r in sel], ls + mk,
                             color=f"C{j + 2}", label=label)
    titles = ("build seconds (2 threads)", "mean 4 KiB reads per query", "recall@10")
    for ax, t in zip(axes, titles):
        ax.set_xscale("log")
        ax.set_xlabel("N (vectors, synthetic clustered 384-d)")
        ax.set_title(t)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv=None):
    a = parse_args(argv)
    if a.scaling:
        main_scaling(a)
    else:
        main_bench(a)


if __name__ == "__main__":
    main()
