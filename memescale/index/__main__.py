"""Command line: build a disk index from .npy vectors, or search one.

    python -m memescale.index build --vectors X.npy [--queries Q.npy] [--metadata M.jsonl]
        [--R R] [--L L] [--alpha A] [--pq-bytes M] [--seed S] [--threads N] --out DIR
    python -m memescale.index search --index DIR --queries Q.npy [--k K] [--L L]
        [--beam-width W] [--io-budget N] [--threads N] [--cache-nodes N] [--io mmap|direct]
        [--gt GT.npy] --out IDS.npy

Build defaults are `IndexConfig`'s (memescale.config), search defaults `ServeConfig`'s;
`--help` shows them.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import numpy as np

from ..config import IndexConfig, ServeConfig
from .aio import DirectIOUnavailable
from .build import IndexParams, build_index
from .disk import IndexFormatError
from .eval import recall_at_k
from .search import IO_MODES, Index

log = logging.getLogger("memescale.index")


def _read_jsonl(path: Path) -> list[dict]:
    out = []
    with open(path, encoding="utf-8") as f:
        for no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise SystemExit(f"{path}:{no}: not JSON: {e}") from None
            if not isinstance(obj, dict):
                raise SystemExit(f"{path}:{no}: expected a JSON object")
            out.append(obj)
    return out


def _build(args: argparse.Namespace) -> int:
    vectors = np.load(args.vectors, mmap_mode="r")
    queries = np.load(args.queries) if args.queries else None
    metadata = _read_jsonl(args.metadata) if args.metadata else None
    params = IndexParams(R=args.R, L=args.L, alpha=args.alpha, pq_bytes=args.pq_bytes, seed=args.seed,
                         threads=args.threads, queries=queries)
    stats = build_index(vectors, metadata, args.out, params)
    print(json.dumps(stats.as_dict(), indent=2))
    return 0


def _search(args: argparse.Namespace) -> int:
    queries = np.load(args.queries)
    with Index.open(args.index, threads=args.threads, cache_nodes=args.cache_nodes, io=args.io) as index:
        t0 = time.perf_counter()
        ids, _, stats = index.search(queries, args.k, args.L, beam_width=args.beam_width, io_budget=args.io_budget)
        wall = time.perf_counter() - t0
    np.save(args.out, ids)
    s = stats.summary()
    print(f"queries {len(ids)}  k {args.k}  L {args.L}  beam_width {args.beam_width}  threads {index.threads}")
    for name in ("reads", "pq_comparisons", "ms"):
        print(f"{name:15s} mean {s[name + '_mean']:10.3f}  p50 {s[name + '_p50']:10.3f}  p99 {s[name + '_p99']:10.3f}")
    print(f"QPS {len(ids) / wall:.1f}")
    if args.gt:
        gt = np.load(args.gt)
        if gt.shape[0] != ids.shape[0] or gt.shape[1] < args.k:
            raise SystemExit(f"{args.gt}: ground truth shape {gt.shape} does not cover {ids.shape[0]} queries x k={args.k}")
        print(f"recall@{args.k} {recall_at_k(ids, gt, args.k):.4f}")
    return 0


def main(argv: list[str] | None = None) -> int:
    index, serve = IndexConfig(), ServeConfig()
    ap = argparse.ArgumentParser(prog="python -m memescale.index", description=__doc__.split("\n")[0])
    ap.add_argument("--log-level", default="INFO")
    sub = ap.add_subparsers(dest="cmd", required=True)

    b = sub.add_parser("build", help="build an index from an (N, d) .npy of vectors",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    b.add_argument("--vectors", type=Path, required=True)
    b.add_argument("--queries", type=Path, help="(nq, d) .npy query sample for query-aware PQ")
    b.add_argument("--metadata", type=Path, help="JSON lines, one object per vector")
    b.add_argument("--R", type=int, default=index.R, help="graph degree")
    b.add_argument("--L", type=int, default=index.L, help="construction search list size")
    b.add_argument("--alpha", type=float, default=index.alpha, help="second-pass prune slack")
    b.add_argument("--pq-bytes", type=int, default=index.pq_bytes, help="PQ bytes per vector")
    b.add_argument("--seed", type=int, default=index.seed, help="makes the build deterministic")
    b.add_argument("--threads", type=int, default=None, help="worker threads (None: all cores)")
    b.add_argument("--out", type=Path, required=True)
    b.set_defaults(func=_build)

    s = sub.add_parser("search", help="search an index with an (nq, d) .npy of queries",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    s.add_argument("--index", type=Path, required=True)
    s.add_argument("--queries", type=Path, required=True)
    s.add_argument("--k", type=int, default=10)
    s.add_argument("--L", type=int, default=serve.search_L, help="candidate list size")
    s.add_argument("--beam-width", type=int, default=serve.beam_width, help="records read per search step")
    s.add_argument("--io-budget", type=int, default=serve.io_budget, help="sector reads per query, 0: unbounded")
    s.add_argument("--threads", type=int, default=None)
    s.add_argument("--cache-nodes", type=int, default=1024)
    s.add_argument("--io", choices=IO_MODES, default=serve.index_io,
                   help="read records through the page cache (mmap) or O_DIRECT with native AIO (direct)")
    s.add_argument("--gt", type=Path, help="(nq, >= k) .npy of true neighbour ids: print recall@k")
    s.add_argument("--out", type=Path, required=True)
    s.set_defaults(func=_search)

    args = ap.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        stream=sys.stderr)
    try:
        return args.func(args)
    except (IndexFormatError, DirectIOUnavailable) as e:
        log.error("%s", e)
        return 2


if __name__ == "__main__":
    sys.exit(main())
