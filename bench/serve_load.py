"""Load benchmark of the serving app: a bounded number of concurrent HTTP clients for a bounded
time against the app on loopback, over a 100k-vector index.

    .venv/bin/python bench/serve_load.py                       # both scenarios, 50 QPS, 30 s each
    .venv/bin/python bench/serve_load.py --scenario minilm --rate 0 --clients 8   # closed loop

Scenarios (the tiny encoder makes 64-d vectors, so a query's vector must come from where the
index's vectors came from):
- ``minilm``: the 100k x 384 MiniLM vectors of ../shared/data/ann/pypi-minilm as the index,
  their sentences as titles plus synthetic Reddit metadata; queries are *embedding* queries
  (the set's out-of-distribution query vectors sent as JSON): no encoder in the path.
- ``text``: 100k synthetic unit vectors at the configured model's width with synthetic
  metadata; queries are *text* (the set's query sentences), encoded in the Encoder (the tiny
  model with tiny.toml; SigLIP SO400M with `--config configs/cpu.toml --set
  model.random_weights=true --set 'model.pretrained=""'`, its int8 text tower as cpu.toml has it).

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

--overload: the overload drill instead of one load level, per scenario: capacity (closed
loop, --clients), normal (open loop at half capacity, its p99 the reference), a burst at
--overload-factor x capacity for --overload-duration s with enough clients that the client
never throttles, then half capacity again. Reported: admitted requests' p99 against normal,
503s (with Retry-After, and how fast), other errors, whether any Serve replica died, and the
seconds after the burst until each second's throughput and p99 are normal again. Targets:
admitted p99 <= 2x normal, every excess request a 503 with Retry-After, no replica lost,
back to normal within 5 s.

Indexes are built once into --work (default bench/results/serve_load/) and reused. The
client shares the machine's cores with the app: on 2 cores it costs a few % of the budget at
50 QPS, and most of a core during a burst, when it sends hundreds of requests a second.
--server-cpus/--client-cpus split them: Ray and every process it starts (GCS, raylet, Serve's
proxy, controller and replicas) run on the server's CPUs, the load generator's thread on the
client's, and capacity is measured under the same split. That stands in for a client on
another machine where cores are to spare; on 2 cores the server's one core is too few (its
capacity halves: bench/README.md).
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
    """100k synthetic unit vectors at the configured model's width and text queries that fit its
    context. With --config configs/cpu.toml and random weights (SigLIP SO400M's tokenizer needs
    `transformers` and the hub: stand-in tokens then, `encoder.StandInTokenizer`) this times the
    real text tower in the serving path."""
    from memescale.config import load_config
    from memescale.embed.encoder import load_tokenizer, token_count
    from memescale.embed.torchvision_shim import ensure_torchvision
    from memescale.testing.sample_index import random_unit_vectors, synthetic_metadata

    ensure_torchvision()
    cfg = load_config(args.config, [s for s in args.set if s.startswith("model.")])
    dim = _model_dim(cfg.model)
    out = Path(args.work) / f"synthetic{dim}-{args.n}-R{args.R}-L{args.L_build}-pq{min(args.pq_bytes, 32)}"
    if not (out / "records.bin").exists():
        pq = args.pq_bytes
        args.pq_bytes = min(pq, 32)
        build_if_missing(out, random_unit_vectors(args.n, dim, seed=0),
                         synthetic_metadata(args.n, seed=0, image_base_url="https://i.example.org"), args)
        args.pq_bytes = pq
    texts = (DATASET / "queries_ood.txt").read_text().splitlines() if DATASET.exists() else [
        f"synthetic query {i}" for i in range(2000)]
    # Sentences over the model's context would be (correctly) refused with a 422: leave them out.
    tok = load_tokenizer(cfg.model)
    ctx = int(getattr(tok, "context_length", 77))
    bodies = [{"text": t, "k": args.k} for t in texts[: args.max_queries]
              if t.strip() and (token_count(tok, t) or 0) <= ctx]
    return out, bodies


def _model_dim(model_cfg) -> int:
    """The embedding width of the configured open_clip model, from its config (not built)."""
    import open_clip

    if model_cfg.config_file:
        open_clip.add_model_config(model_cfg.config_file)
    return int(open_clip.get_model_config(model_cfg.name)["embed_dim"])


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
                        rec["retry_after"] = resp.headers.get("Retry-After")
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


def serve_replicas() -> set[str]:
    """Actor ids of the Serve replicas alive now."""
    import ray

    # Serve names each replica's actor after its deployment and replica id; a replacement gets a new one
    return {a["name"] for a in ray.util.list_named_actors(all_namespaces=True) if "REPLICA" in a["name"].upper()}


def per_second(records: list[dict], t0: float, seconds: int) -> list[dict]:
    """Ok requests and their p99 latency (from the scheduled time) in each second after t0."""
    out = []
    for sec in range(seconds):
        lat = [(r["done"] - r["scheduled"]) * 1000 for r in records
               if r.get("status") == 200 and t0 + sec <= r["scheduled"] < t0 + sec + 1]
        out.append({"second": sec, "ok": len(lat), "p99_ms": pct(lat, 99)})
    return out


def overload_drill(name: str, url: str, bodies: list[dict], args) -> dict:
    """Capacity, normal, a burst at --overload-factor x capacity, then normal again (module doc)."""
    # capacity: a closed loop of as many clients as the server admits at once (more would be
    # refused, which says nothing about capacity)
    records, wall = asyncio.run(run_load(url, bodies, 0, args.capacity_clients, 10.0))
    capacity = sum(r.get("status") == 200 for r in records) / wall
    normal_rate = 0.5 * capacity
    records, wall = asyncio.run(run_load(url, bodies, normal_rate, args.clients, 15.0))
    normal = [(r["done"] - r["scheduled"]) * 1000 for r in records if r.get("status") == 200]
    normal_p99 = pct(normal, 99)
    before = serve_replicas()
    burst_rate = args.overload_factor * capacity
    clients = int(min(4096, burst_rate * 2))  # never the client's limit: excess must reach the server
    burst, burst_wall = asyncio.run(run_load(url, bodies, burst_rate, clients, args.overload_duration))
    t_after = time.perf_counter()
    after, _ = asyncio.run(run_load(url, bodies, normal_rate, args.clients, 15.0))
    alive = serve_replicas()
    ok = [r for r in burst if r.get("status") == 200]
    shed = [r for r in burst if r.get("status") == 503]
    other: dict[str, int] = {}
    for r in burst + after:
        if r.get("status") not in (200, 503):
            other[str(r.get("status"))] = other.get(str(r.get("status")), 0) + 1
    admitted_p99 = pct([(r["done"] - r["scheduled"]) * 1000 for r in ok], 99)
    shed_ms = [(r["done"] - r["sent"]) * 1000 for r in shed]
    seconds = per_second(after, t_after, 15)
    good = [s["ok"] >= 0.9 * normal_rate and s["p99_ms"] <= 2 * normal_p99 for s in seconds[:-1]]
    recovered_s = next((i for i in range(len(good)) if all(good[i:])), None)
    out = {
        "scenario": name, "mode": "overload", "capacity_qps": round(capacity, 1), "normal_rate": round(normal_rate, 1),
        "normal_p99_ms": round(normal_p99, 2), "burst_rate": round(burst_rate, 1),
        "burst_s": round(burst_wall, 1), "burst_requests": len(burst), "burst_ok": len(ok),
        "burst_ok_qps": round(len(ok) / burst_wall, 1), "admitted_p99_ms": round(admitted_p99, 2),
        "shed_503": len(shed), "shed_with_retry_after": sum(r.get("retry_after") is not None for r in shed),
        "shed_ms": {"p50": round(pct(shed_ms, 50), 2), "p99": round(pct(shed_ms, 99), 2)},
        "other_errors": other, "replicas_before": len(before), "replicas_lost": len(before - alive),
        "after_per_second": seconds, "recovered_after_s": recovered_s, "loadavg": os.getloadavg(),
    }
    checks = {
        "admitted p99 <= 2x normal": admitted_p99 <= 2 * normal_p99,
        "excess refused with 503 + Retry-After": bool(shed) and out["shed_with_retry_after"] == len(shed) and not other,
        "no replica lost": not (before - alive),
        "normal again within 5 s": recovered_s is not None and recovered_s <= 5,
    }
    out["checks"] = checks
    print(f"\n== {name} overload: capacity {capacity:.1f} QPS; normal {normal_rate:.1f} QPS p99 {normal_p99:.1f} ms; "
          f"burst {burst_rate:.1f} QPS for {burst_wall:.0f} s: {len(ok)} ok ({out['burst_ok_qps']} QPS) p99 "
          f"{admitted_p99:.1f} ms, {len(shed)} x 503 (p50 {out['shed_ms']['p50']:.1f} / p99 {out['shed_ms']['p99']:.1f} ms, "
          f"{out['shed_with_retry_after']} with Retry-After), other errors {other or 'none'}; replicas lost "
          f"{out['replicas_lost']} of {len(before)}; normal again after {recovered_s} s")
    print("   " + "; ".join(f"{k}: {'met' if v else 'NOT met'}" for k, v in checks.items()))
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


def cpu_list(spec: str) -> set[int]:
    """CPU ids from "0", "0,2" or "0-3" ("" -> empty: no pinning); ValueError for ids this
    machine does not have."""
    out: set[int] = set()
    for part in filter(None, (x.strip() for x in spec.split(","))):
        lo, _, hi = part.partition("-")
        out.update(range(int(lo), int(hi or lo) + 1))
    have = os.sched_getaffinity(0)
    if out - have:
        raise ValueError(f"CPUs {sorted(out - have)} are not available (this process may use {sorted(have)})")
    return out


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
    p.add_argument("--overload", action="store_true", help="run the overload drill (module doc)")
    p.add_argument("--overload-factor", type=float, default=4.0)
    p.add_argument("--overload-duration", type=float, default=30.0)
    p.add_argument("--capacity-clients", type=int, default=4,
                   help="closed-loop clients that measure capacity in the overload drill (what the server admits)")
    p.add_argument("--server-cpus", default="", help="CPU ids for Ray and the app, e.g. 0 or 0-3 (default: all)")
    p.add_argument("--client-cpus", default="", help="CPU ids for the load generator, e.g. 1 (default: all)")
    args = p.parse_args()
    server_cpus, client_cpus = cpu_list(args.server_cpus), cpu_list(args.client_cpus)
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
    if server_cpus:  # processes started from this thread (Ray's, and through the raylet every worker) inherit it
        os.sched_setaffinity(0, server_cpus)
    init_ray(cfg.ray)  # one local Ray for all scenarios; Serve restarts per scenario
    for name in scenarios:
        index_dir, bodies = prepared[name]
        port = free_port()
        overrides = [f'serve.telemetry_path="{Path(args.work) / "telemetry.jsonl"}"',
                     f"serve.search_L={args.search_L}", *args.set]
        t = time.perf_counter()
        base = serve_app.start(index_dir, args.config, "127.0.0.1", port, overrides)
        log(f"{name}: app up in {time.perf_counter() - t:.1f} s at {base}")
        if client_cpus:  # this thread runs the load from here on; Serve's processes keep the server's CPUs
            os.sched_setaffinity(0, client_cpus)
        url = base + "/api/search"
        try:
            asyncio.run(run_load(url, bodies[::7], max(args.rate, 20), args.clients, args.warmup))
            if args.overload:
                results.append(overload_drill(name, url, bodies, args))
                continue
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
            if server_cpus:
                os.sched_setaffinity(0, server_cpus)
            serve_app.stop()
    ray.shutdown()
    report = {"args": vars(args), "cpus": os.cpu_count(), "server_cpus": sorted(server_cpus), "client_cpus": sorted(client_cpus), "loadavg": os.getloadavg(), "python": platform.python_version(),
              "results": results, "ray_env": RAY_ENV}
    tag = "overload" if args.overload else ("closed" if args.rate == 0 else f"{args.rate:g}qps")
    path = Path(args.work) / f"serve_load_{tag}.json"
    path.write_text(json.dumps(report, indent=1))
    log(f"wrote {path}")


if __name__ == "__main__":
    main()
