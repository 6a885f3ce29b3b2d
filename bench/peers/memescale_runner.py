"""Build and sweep memescale's disk index; write the results as JSON.

Runs in the project's .venv; bench/ann.py starts it as a subprocess, like the peers, so that
thread pinning happens before numba loads and RSS figures belong to this index alone.

Variants: "plain" (PQ trained on the base vectors only) and "qa" (query-aware PQ trained with
the first --eval-start queries of --qa-sample as the query sample; those queries are never
evaluated). Each variant is built in a child process (build seconds, peak RSS), then opened
here and swept over L twice:
- cold: before each L the index is closed, its files are evicted from the page cache
  (posix_fadvise DONTNEED) and it is reopened, so the batch starts with nothing cached. Pages
  read by earlier queries of the same batch stay cached for later ones (as they would in a
  server); the physical bytes read per query (/proc/self/io) say how cold the batch really was.
- direct: the index opened with io="direct": every record read is an O_DIRECT read from the
  device (Linux native AIO), as diskannpy reads, so no page cache is involved at all; only
  the index's own node cache (--cache-nodes records copied into RAM at open) saves reads.
  Best of --reps timed passes (each pass reads everything from the device again).
- warm: after one untimed pass over the queries, best of --reps timed passes.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402


def _format_version() -> int:
    """The index format this code writes: an index of another version is rebuilt, not reused."""
    from memescale.index.disk import FORMAT_VERSION

    return FORMAT_VERSION


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dataset", required=True)
    ap.add_argument("--workdir", required=True, help="one sub-folder per variant")
    ap.add_argument("--out", required=True, help="JSON results file")
    ap.add_argument("--variants", default="plain,qa")
    ap.add_argument("--qa-sample", default="ood", choices=["ood", "id", "both"],
                    help="which training half of the queries the query-aware PQ learns from")
    ap.add_argument("--max-base", type=int, default=0)
    ap.add_argument("--max-queries", type=int, default=0)
    ap.add_argument("--eval-start", type=int, default=1000)
    ap.add_argument("--R", type=int, default=64)
    ap.add_argument("--L", type=int, default=100)
    ap.add_argument("--alpha", type=float, default=1.2)
    ap.add_argument("--pq-bytes", type=int, default=48)
    ap.add_argument("--build-pq-bytes", type=int, default=0,
                    help="navigation code bytes of the construction searches (index.build_pq_bytes; 0: exact)")
    ap.add_argument("--beam-width", type=int, default=4)
    ap.add_argument("--Ls", default="10,20,30,50,70,100,150,200")
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--cores", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--modes", default="cold,direct,warm")
    ap.add_argument("--latency-Ls", default="", help="comma list of L for the one-query-at-a-time latency sweep")
    ap.add_argument("--cache-nodes", type=int, default=1024,
                    help="records kept in RAM by Index.open (breadth-first from the entry points)")
    ap.add_argument("--metadata", default="text", choices=["text", "none"],
                    help="text: each record carries a result's metadata (title from base.txt, "
                         "url, subreddit, time, score), as the real index does")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--build-variant", help=argparse.SUPPRESS)
    ap.add_argument("--reuse", action="store_true",
                    help="reuse indexes in --workdir built with the same parameters")
    return ap.parse_args(argv)


def make_metadata(dataset: Path, n: int, kind: str) -> list[dict] | None:
    """Per-vector metadata of the size a real result carries (url, title, subreddit, time, score)."""
    if kind == "none":
        return None
    titles_path = dataset / "base.txt"
    titles = titles_path.read_text().splitlines()[:n] if titles_path.exists() else []
    titles += [""] * (n - len(titles))
    t0 = 1_600_000_000
    return [{"url": f"https://i.redd.it/{i:010x}.jpg", "title": titles[i][:300],
             "subreddit": "Python", "created_utc": t0 + 97 * i, "score": i % 1000,
             "permalink": f"/r/Python/comments/{i:x}/", "width": 1024, "height": 768,
             "over_18": False}
            for i in range(n)]


def train_sample(data: dict, which: str):
    import numpy as np
    if which == "both":
        return np.concatenate([data["train"]["id"], data["train"]["ood"]])
    return data["train"][which]


def build_variant(a, data, variant: str, out_dir: Path, params: dict) -> None:
    """Child process: build one variant into out_dir and record build seconds and peak RSS."""
    import numpy as np

    from memescale.index import IndexParams, build_index
    base16 = np.load(Path(a.dataset) / "base.npy", mmap_mode="r")
    n = data["base"].shape[0]
    base16 = np.ascontiguousarray(base16[:n])
    meta = make_metadata(Path(a.dataset), n, a.metadata)
    queries = train_sample(data, a.qa_sample) if variant == "qa" else None
    shutil.rmtree(out_dir, ignore_errors=True)
    # Compile the numba kernels (or load them from numba's cache) on a tiny build first, so
    # the timed build measures building, not a one-time JIT compilation.
    t0 = time.perf_counter()
    tmp = out_dir.parent / f".jit-warmup-{variant}"
    build_index(base16[:2000], None, str(tmp),
                IndexParams(R=a.R, L=a.L, alpha=a.alpha, pq_bytes=a.pq_bytes, build_pq_bytes=a.build_pq_bytes,
                            seed=a.seed, threads=a.threads, queries=None if queries is None else queries[:200]))
    shutil.rmtree(tmp, ignore_errors=True)
    jit_s = time.perf_counter() - t0
    p = IndexParams(R=a.R, L=a.L, alpha=a.alpha, pq_bytes=a.pq_bytes, build_pq_bytes=a.build_pq_bytes,
                    seed=a.seed, threads=a.threads, queries=queries)
    C.log(f"[memescale:{variant}] building n={n} R={a.R} L={a.L} alpha={a.alpha} "
          f"pq_bytes={a.pq_bytes} build_pq_bytes={a.build_pq_bytes} queries={None if queries is None else queries.shape}")
    rss0 = C.peak_rss_bytes()
    t0 = time.perf_counter()
    info = build_index(base16, meta, str(out_dir), p)
    info = info.as_dict() if hasattr(info, "as_dict") else info
    secs = time.perf_counter() - t0
    build = {"seconds": secs, "peak_rss_bytes": C.peak_rss_bytes(), "jit_warmup_seconds": jit_s,
             "peak_rss_before_bytes": rss0, "info": _jsonable(info)}
    (out_dir / "bench_params.json").write_text(json.dumps({"params": params, "build": build}))
    C.log(f"[memescale:{variant}] built in {secs:.1f} s (PQ score-aware eta {info.get('pq_eta')})")


def _jsonable(x):
    try:
        json.dumps(x, default=C._json_default)
        return x
    except TypeError:
        return repr(x)[:2000]


def evict(path: Path) -> None:
    """Drop the page-cache pages of every file under `path` (they must not be mapped)."""
    for f in path.rglob("*"):
        if f.is_file():
            fd = os.open(f, os.O_RDONLY)
            try:
                os.fsync(fd)  # dirty pages (a fresh build) would survive DONTNEED
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def pq_diagnostics(index, data, k: int) -> dict:
    """How well the PQ codes alone rank the evaluated queries' neighbours (no graph): ADC-only
    recall@k over all N codes, the share of the true top-k inside the ADC top-100 (what the
    re-rank can recover), and the codec's query-weighted squared error on held-out queries."""
    import numpy as np

    codec, codes = getattr(index, "codec", None), getattr(index, "codes", None)
    if codec is None or codes is None or not hasattr(codec, "scores"):
        return {}
    try:
        from memescale.index import query_weighted_error
    except ImportError:
        query_weighted_error = None
    out = {}
    sample = np.random.default_rng(0).choice(codes.shape[0], min(20_000, codes.shape[0]),
                                             replace=False)
    sample.sort()
    for qs in C.QUERY_SETS:
        Q, gt = data["queries"][qs], data["gt"][qs]
        top = np.empty((len(Q), 100), np.int64)
        for lo in range(0, len(Q), 100):
            S = codec.scores(Q[lo:lo + 100], codes)
            part = np.argpartition(-S, 99, axis=1)[:, :100]
            order = np.argsort(-np.take_along_axis(S, part, 1), axis=1)
            top[lo:lo + 100] = np.take_along_axis(part, order, 1)
        in100 = np.mean([len(set(t.tolist()) & set(g[:k].tolist())) / k for t, g in zip(top, gt)])
        d = {"adc_recall": C.recall_at_k(top, gt, k), "true_topk_in_adc_top100": float(in100)}
        if query_weighted_error is not None:
            d["query_weighted_error"] = float(query_weighted_error(
                codec, data["base"][sample], Q, codes[sample]))
        out[qs] = d
        C.log(f"[memescale] PQ alone, {qs}: recall@{k} {d['adc_recall']:.4f}, true top-{k} in "
              f"top-100 {in100:.4f}, query-weighted error {d.get('query_weighted_error', 0):.6f}")
    return out


def main(argv=None):
    a = parse_args(argv)
    cpus = C.pin_threads(a.cores, a.threads)
    data = C.load_dataset(a.dataset, a.max_base, a.eval_start, a.max_queries)
    n, d = data["base"].shape
    work = Path(a.workdir)
    params = {"R": a.R, "L": a.L, "alpha": a.alpha, "pq_bytes": a.pq_bytes, "build_pq_bytes": a.build_pq_bytes,
              "n": n, "d": d,
              "dataset": str(Path(a.dataset).resolve()),
              "threads": a.threads, "metadata": a.metadata, "qa_sample": a.qa_sample,
              "eval_start": a.eval_start, "seed": a.seed, "format": _format_version()}
    if a.build_variant:
        build_variant(a, data, a.build_variant, work / a.build_variant, params)
        return
    results = {"library": "memescale", "cpus": cpus, "n": n, "d": d,
               "params": {**params, "beam_width": a.beam_width, "cache_nodes": a.cache_nodes},
               "variants": []}
    for variant in a.variants.split(","):
        vdir = work / variant
        meta_file = vdir / "bench_params.json"
        reuse = (a.reuse and meta_file.exists()
                 and json.loads(meta_file.read_text())["params"] == params)
        if not reuse:
            cmd = [sys.executable, __file__, *(argv if argv is not None else sys.argv[1:]),
                   "--build-variant", variant]
            subprocess.run(cmd, check=True)
        else:
            C.log(f"[memescale:{variant}] reusing {vdir}")
        build = json.loads(meta_file.read_text())["build"]
        build["reused"] = bool(reuse)
        res = sweep_variant(a, data, variant, vdir)
        res["build"] = build
        results["variants"].append(res)
        C.write_json(a.out, results)
    C.log(f"[memescale] results in {a.out}")


def sweep_variant(a, data, variant: str, vdir: Path) -> dict:
    import numpy as np

    from memescale.index import Index

    files = C.dir_bytes(vdir)
    gc.collect()
    rss0 = C.rss_parts()
    t0 = time.perf_counter()
    index = Index.open(str(vdir), threads=a.threads, cache_nodes=a.cache_nodes)
    load_s = time.perf_counter() - t0
    rss1 = C.rss_parts()
    ram = rss1["VmRSS"] - rss0["VmRSS"]
    # JIT compilation happens on the first search: keep it out of every timed pass.
    index.search(data["queries"]["id"][:8], a.k, L=max(a.k, 20), beam_width=a.beam_width)
    out = {"variant": variant, "files": files, "index_ram_rss_delta_bytes": ram,
           "index_ram_rss_delta_parts": {k: rss1[k] - rss0[k] for k in rss0},
           "cached_nodes": int(getattr(index, "cached_nodes", 0)),
           "index_ram_files_bytes": sum(v for k, v in files.items() if not k.startswith("records")
                                        and not k.startswith("metadata") and not k.endswith(".json")),
           "load_seconds": load_s, "runs": []}
    C.log(f"[memescale:{variant}] opened in {load_s:.2f} s, RSS +{ram / 2**20:.1f} MiB "
          f"(anon +{(rss1['RssAnon'] - rss0['RssAnon']) / 2**20:.1f}, "
          f"file +{(rss1['RssFile'] - rss0['RssFile']) / 2**20:.1f})")
    Ls = [max(a.k, int(x)) for x in a.Ls.split(",")]

    def one(idx, Q, L):
        io0 = C.io_read_bytes()
        t = time.perf_counter()
        ids, scores, stats = idx.search(Q, a.k, L=L, beam_width=a.beam_width)
        dt = time.perf_counter() - t
        return ids, stats, dt, C.io_read_bytes() - io0

    def point(qs, L, mode, ids, stats, dt, phys, Q, gt):
        get = lambda name: getattr(stats, name, None) if not isinstance(stats, dict) else stats.get(name)  # noqa: E731
        ms = np.asarray(get("ms") if get("ms") is not None else [], dtype=np.float64)
        pt = {"query_set": qs, "L": L, "mode": mode, "recall": C.recall_at_k(ids, gt, a.k),
              "qps": len(Q) / dt, "seconds": dt,
              "mean_reads": float(np.mean(get("reads"))) if get("reads") is not None else None,
              "mean_pq_comparisons": float(np.mean(get("pq_comparisons")))
              if get("pq_comparisons") is not None else None,
              "p99_reads": float(np.percentile(get("reads"), 99)) if get("reads") is not None else None,
              "latency_ms_mean": float(ms.mean()) if ms.size else None,
              "latency_ms_p50": float(np.percentile(ms, 50)) if ms.size else None,
              "latency_ms_p99": float(np.percentile(ms, 99)) if ms.size else None,
              "phys_read_kib_per_query": phys / 1024 / len(Q) if phys >= 0 else None}
        C.log(f"[memescale:{variant}] {mode} {qs:3s} L={L:4d} recall@{a.k}={pt['recall']:.4f} "
              f"qps={pt['qps']:8.1f} reads/q={pt['mean_reads'] or 0:.1f} "
              f"pq/q={pt['mean_pq_comparisons'] or 0:.0f} disk KiB/q={pt['phys_read_kib_per_query'] or 0:.1f}")
        return pt

    out["pq_diagnostics"] = pq_diagnostics(index, data, a.k)
    for mode in a.modes.split(","):
        run = {"threads": a.threads, "mode": mode, "points": []}
        searcher = (Index.open(str(vdir), threads=a.threads, cache_nodes=a.cache_nodes, io="direct")
                    if mode == "direct" else None)
        for qs in C.QUERY_SETS:
            Q, gt = data["queries"][qs], data["gt"][qs]
            if mode == "warm":
                one(index, Q, max(Ls))  # bring every page the sweep can touch into the page cache
            for L in Ls:
                if mode == "cold":
                    index.close()
                    evict(vdir)
                    index = Index.open(str(vdir), threads=a.threads, cache_nodes=a.cache_nodes)
                    ids, stats, dt, phys = one(index, Q, L)
                else:
                    best = None
                    for _ in range(a.reps):
                        r = one(searcher or index, Q, L)
                        if best is None or r[2] < best[2]:
                            best = r
                    ids, stats, dt, phys = best
                run["points"].append(point(qs, L, mode, ids, stats, dt, phys, Q, gt))
        if searcher is not None:
            searcher.close()
        out["runs"].append(run)
    index.close()
    if a.latency_Ls and variant == a.variants.split(",")[-1]:  # one variant: the last (qa by default)
        out["latency"] = latency_sweep(a, data, variant, vdir)
    return out


def latency_sweep(a, data, variant: str, vdir: Path) -> list[dict]:
    """Interactive latency (`C.latency_sweep`) with the index opened with direct I/O and one thread."""
    from memescale.index import Index

    with Index.open(str(vdir), threads=1, cache_nodes=a.cache_nodes, io="direct") as index:
        return C.latency_sweep(lambda q, L: index.search(q[None], a.k, L=L, beam_width=a.beam_width)[0][0],
                               data, a.latency_Ls, a.k, f"memescale:{variant}")


if __name__ == "__main__":
    main()
