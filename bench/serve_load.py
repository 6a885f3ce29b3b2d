"""Load benchmark of the serving app: a bounded number of concurrent HTTP clients for a bounded
time against the app on loopback, over a 100k-vector index.

    .venv/bin/python bench/serve_load.py                       # both scenarios, 50 QPS, 30 s each
    .venv/bin/python bench/serve_load.py --scenario minilm --rate 0 --clients 8   # closed loop

Scenarios (the tiny encoder makes 64-d vectors, so a query's vector must come from where the
index's vectors came from):
- ``minilm``: the 100k x 384 MiniLM vectors of ../shared/data/ann/pypi-minilm as the index,
  their sentences as titles plus synthetic Reddit metadata; queries are *embedding* queries
  (the set's out-of-distribution query vectors sent as JSON): no encoder in the path.
- ``text``: 100k synthetic unit vectors at the tiny model's 64 dims with synthetic metadata;
  queries are *text* (the set's query sentences), encoded by the tiny model in the Encoder.

Load: open loop at --rate requests/s (evenly spaced arrivals), at most --clients requests in
flight; an arrival that finds every client busy waits, and its latency counts from its
scheduled time (no coordinated omission). --rate 0: closed loop, --clients back-to-back.
Every request is a default search (k=24, NSFW filtered out, dedup on). Reported: achieved
QPS, latency p50/p90/p99/max, errors by status, and the per-stage breakdown the API returns
(encode = in the Api handler, everything before the search call: the Encoder round trip for
text; search = the Index.search passes in the Searcher; metadata = records' metadata and
vectors read for filters, dedup and the results;
searcher hop = the Api -> Searcher -> Api call around those two; http = the rest: client ->
Serve proxy -> Api request parsing and back).

Indexes are built once into --work (default bench/results/serve_load/) and reused. The
client shares the machine's cores with the app: on 2 cores it costs a few % of the budget.
Results: stdout and <work>/serve_load_<rate>qps.json (serve_load_closed.json for --rate 0).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import socket
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

DATASET = ROOT.parent / "shared" / "data" / "ann" / "pypi-minilm"


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def build_if_missing(out: Path, vectors: np.ndarray, metadata: list[dict], args) -> None:
    from memescale.testing.sample_index import build_sample_index

    if (out / "records.bin").exists() and (out / "weighting.json").exists():
        log(f"reusing index {out}")
        return
    log(f"building {vectors.shape[0]} x {vectors.shape[1]} index into {out} (R={args.R} L={args.L_build} "
        f"pq_bytes={args.pq_bytes})")
    t = time.perf_counter()
    st, _ = build_sample_index(out, vectors, metadata, R=args.R, L=args.L_build,
                               pq_bytes=min(args.pq_bytes, vectors.shape[1]))
    log(f"built in {time.perf_counter() - t:.0f} s ({st.bytes_written / 1e6:.0f} MB)")


def scenario_minilm(args) -> tuple[Path, list[dict]]:
    from memescale.testing.sample_index import synthetic_metadata

    base = np.load(DATASET / "base.npy", mmap_mode="r")[: args.n]
    out = Path(args.work) / f"minilm-{base.shape[0]}-R{args.R}-L{args.L_build}-pq{args.pq_bytes}"
    if not (out / "records.bin").exists():
        titles = (DATASET / "base.txt").read_text().splitlines()
        md = synthetic_metadata(base.shape[0], seed=0, image_base_url="https://i.example.org")
        for m, t in zip(md, titles):
            m["title"] = t[:200]
        build_if_missing(out, np.asarray(base, np.float32), md, args)
    queries = np.load(DATASET / "queries_ood.npy").astype(np.float32)
    bodies = [{"embedding": [round(float(v), 5) for v in q], "k": args.k} for q in queries[: args.max_queries]]
    return out, bodies


def scenario_text(args) -> tuple[Path, list[dict]]:
    from memescale.testing.sample_index import random_unit_vectors, synthetic_metadata

    out = Path(args.work) / f"synthetic64-{args.n}-R{args.R}-L{args.L_build}-pq{min(args.pq_bytes, 32)}"
    if not (out / "records.bin").exists():
        pq = args.pq_bytes
        args.pq_bytes = min(pq, 32)
        build_if_missing(out, random_unit_vectors(args.n, 64, seed=0),
                         synthetic_metadata(args.n, seed=0, image_base_url="https://i.example.org"), args)
        args.pq_bytes = pq
    texts = (DATASET / "queries_ood.txt").read_text().splitlines() if DATASET.exists() else [
        f"synthetic query {i}" for i in range(2000)]
    # Sentences over the model's context would be (correctly) refused with a 422: leave them out.
    from memescale.embed.torchvision_shim import ensure_torchvision
    from memescale.search.requests import token_count

    ensure_torchvision()
    import open_clip

    tok = open_clip.get_tokenizer("ViT-B-32")  # the tiny model's tokenizer (CLIP BPE, 77 tokens)
    bodies = [{"text": t, "k": args.k} for t in texts[: args.max_queries]
              if t.strip() and token_count(tok, t) <= tok.context_length]
    return out, bodies


async def run_load(url: str, bodies: list[dict], rate: float, clients: int, duration: float) -> tuple[list[dict], float]:
    import aiohttp

    records: list[dict] = []
    sem = asyncio.Semaphore(clients)
    connector = aiohttp.TCPConnector(limit=clients, force_close=False)
    timeout = aiohttp.ClientTimeout(total=30)
    payloads = [json.dumps(b).encode() for b in bodies]

    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        async def one(i: int, scheduled: float) -> None:
            async with sem:
                sent = time.perf_counter()
                rec = {"scheduled": scheduled, "sent": sent}
                try:
                    async with session.post(url, data=payloads[i % len(payloads)],
                                            headers={"Content-Type": "application/json"}) as resp:
                        body = await resp.read()
                        rec["status"] = resp.status
                        if resp.status == 200:
                            rec["stats"] = json.loads(body)["stats"]
                except Exception as e:  # timeouts, resets: counted as errors
                    rec["status"] = type(e).__name__
                rec["done"] = time.perf_counter()
                records.append(rec)

        t0 = time.perf_counter()
        tasks = []
        if rate > 0:
            n = int(rate * duration)
            for i in range(n):
                at = t0 + i / rate
                delay = at - time.perf_counter()
                if delay > 0:
                    await asyncio.sleep(delay)
                tasks.append(asyncio.create_task(one(i, at)))
        else:
            counter = iter(range(10**9))

            async def worker() -> None:
                while time.perf_counter() - t0 < duration:
                    await one(next(counter), time.perf_counter())

            tasks = [asyncio.create_task(worker()) for _ in range(clients)]
        await asyncio.gather(*tasks)
        return records, time.perf_counter() - t0


def pct(a, q) -> float:
    return float(np.percentile(np.asarray(a, np.float64), q)) if len(a) else float("nan")


def summarise(name: str, records: list[dict], wall: float, args) -> dict:
    ok = [r for r in records if r.get("status") == 200]
    lat = [(r["done"] - r["scheduled"]) * 1000 for r in ok]
    service = [(r["done"] - r["sent"]) * 1000 for r in ok]
    errors: dict[str, int] = {}
    for r in records:
        if r.get("status") != 200:
            errors[str(r.get("status"))] = errors.get(str(r.get("status")), 0) + 1
    stage = {}
    for key in ("encode_ms", "search_ms", "metadata_ms", "ms", "total_ms", "reads", "pq_comparisons"):
        vals = [r["stats"][key] for r in ok]
        stage[key] = {"p50": pct(vals, 50), "p99": pct(vals, 99)}
    hop = [r["stats"]["total_ms"] - r["stats"]["encode_ms"] - r["stats"]["search_ms"] - r["stats"]["metadata_ms"]
           for r in ok]
    stage["searcher_hop_ms"] = {"p50": pct(hop, 50), "p99": pct(hop, 99)}
    rest = [(r["done"] - r["sent"]) * 1000 - r["stats"]["total_ms"] for r in ok]
    stage["http_ms"] = {"p50": pct(rest, 50), "p99": pct(rest, 99)}
    out = {
        "scenario": name, "rate": args.rate, "clients": args.clients, "duration_s": round(wall, 2),
        "requests": len(records), "ok": len(ok), "errors": errors, "qps": round(len(ok) / wall, 2),
        "latency_ms": {"p50": pct(lat, 50), "p90": pct(lat, 90), "p99": pct(lat, 99), "max": max(lat, default=float("nan"))},
        "service_ms": {"p50": pct(service, 50), "p99": pct(service, 99)},
        "stages": stage,
    }
    l, s = out["latency_ms"], stage
    print(f"\n== {name}: {out['qps']:.1f} QPS achieved ({args.rate or 'closed loop'} offered, {args.clients} clients, "
          f"{wall:.1f} s), {len(ok)} ok, errors: {errors or 'none'}")
    print(f"   latency ms  p50 {l['p50']:7.2f}  p90 {l['p90']:7.2f}  p99 {l['p99']:7.2f}  max {l['max']:7.2f}")
    print("   breakdown   p50 / p99 ms: "
          + ", ".join(f"{k.removesuffix('_ms')} {s[k]['p50']:.2f} / {s[k]['p99']:.2f}"
                      for k in ("encode_ms", "search_ms", "metadata_ms", "searcher_hop_ms", "http_ms")))
    print(f"   index       {s['ms']['p50']:.2f} ms p50 in Index.search, reads p50 {s['reads']['p50']:.0f}, "
          f"PQ comparisons p50 {s['pq_comparisons']['p50']:.0f}")
    target = l["p99"] <= 50 and not errors and (args.rate == 0 or out["qps"] >= 0.95 * args.rate)
    print(f"   target p99 <= 50 ms at {args.rate or '-'} QPS: {'met' if target else 'NOT met'}")
    out["target_met"] = bool(target)
    return out


def tree_cpu() -> dict[str, float]:
    """CPU seconds used so far by this process and each descendant (the local Ray cluster it
    started: raylet, GCS, Serve proxy, controller and replicas), keyed by a short name."""
    import psutil

    me = psutil.Process()
    out: dict[str, float] = {}
    for p in [me, *me.children(recursive=True)]:
        try:
            t = p.cpu_times()
            name = "client (this process)" if p.pid == me.pid else " ".join(p.cmdline()[:1])
            name = name.rsplit("/", 1)[-1].removeprefix("ray::")[:48]
            out[name] = out.get(name, 0.0) + t.user + t.system
        except psutil.Error:
            pass
    return out


def tree_cpu_seconds() -> float:
    return sum(tree_cpu().values())


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--scenario", choices=["minilm", "text", "both"], default="both")
    p.add_argument("--n", type=int, default=100_000, help="index size")
    p.add_argument("--rate", type=float, default=50.0, help="offered requests/s (0: closed loop)")
    p.add_argument("--clients", type=int, default=16, help="max requests in flight")
    p.add_argument("--duration", type=float, default=30.0, help="seconds of load per scenario")
    p.add_argument("--warmup", type=float, default=3.0)
    p.add_argument("--k", type=int, default=24)
    p.add_argument("--max-queries", type=int, default=2000)
    p.add_argument("--R", type=int, default=48)
    p.add_argument("--L-build", type=int, default=96)
    p.add_argument("--pq-bytes", type=int, default=48)
    p.add_argument("--search-L", type=int, default=100,
                   help="serve.search_L (100: recall@10 0.96 on the minilm set's OOD queries)")
    p.add_argument("--config", default=str(ROOT / "configs" / "tiny.toml"))
    p.add_argument("--set", action="append", default=[], metavar="serve.KEY=VALUE")
    p.add_argument("--work", default=str(ROOT / "bench" / "results" / "serve_load"))
    p.add_argument("--build-only", action="store_true", help="build (or check) the indexes and stop")
    args = p.parse_args()
    Path(args.work).mkdir(parents=True, exist_ok=True)

    import ray

    from memescale.config import load_config
    from memescale.ray_runtime import RAY_ENV, init_ray
    from serve import app as serve_app

    scenarios = ["minilm", "text"] if args.scenario == "both" else [args.scenario]
    prepared = {name: (scenario_minilm if name == "minilm" else scenario_text)(args) for name in scenarios}
    if args.build_only:
        return
    cfg = load_config(args.config)
    results = []
    init_ray(cfg.ray)  # one local Ray for all scenarios; Serve restarts per scenario
    for name in scenarios:
        index_dir, bodies = prepared[name]
        port = free_port()
        overrides = [f'serve.telemetry_path="{Path(args.work) / "telemetry.jsonl"}"',
                     f"serve.search_L={args.search_L}", *args.set]
        t = time.perf_counter()
        base = serve_app.start(index_dir, args.config, "127.0.0.1", port, overrides)
        log(f"{name}: app up in {time.perf_counter() - t:.1f} s at {base}")
        url = base + "/api/search"
        try:
            asyncio.run(run_load(url, bodies[::7], max(args.rate, 20), args.clients, args.warmup))
            cpu0 = tree_cpu()
            records, wall = asyncio.run(run_load(url, bodies, args.rate, args.clients, args.duration))
            cpu1 = tree_cpu()
            per = {k: v - cpu0.get(k, 0.0) for k, v in cpu1.items()}
            cpu = sum(per.values())
            res = summarise(name, records, wall, args)
            res["cpu_cores_used"] = round(cpu / wall, 3)
            res["cpu_ms_per_request"] = round(cpu * 1000 / max(1, res["ok"]), 2)
            res["loadavg_after"] = os.getloadavg()
            print(f"   CPU         {res['cpu_cores_used']:.2f} cores used by the app + client "
                  f"({res['cpu_ms_per_request']:.1f} ms per request); load average {res['loadavg_after'][0]:.2f} "
                  f"on {os.cpu_count()} CPUs")
            res["cpu_ms_per_request_by_process"] = {
                k: round(v * 1000 / max(1, res["ok"]), 2) for k, v in sorted(per.items(), key=lambda kv: -kv[1]) if v > 0.05}
            print("               " + ", ".join(f"{k} {v:.1f}" for k, v in list(res["cpu_ms_per_request_by_process"].items())[:8]))
            results.append(res)
        finally:
            serve_app.stop()
    ray.shutdown()
    report = {"args": vars(args), "cpus": os.cpu_count(), "loadavg": os.getloadavg(), "python": platform.python_version(),
              "results": results, "ray_env": RAY_ENV}
    path = Path(args.work) / f"serve_load_{'closed' if args.rate == 0 else f'{args.rate:g}qps'}.json"
    path.write_text(json.dumps(report, indent=1))
    log(f"wrote {path}")


if __name__ == "__main__":
    main()
