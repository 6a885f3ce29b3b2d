"""Build the disk index from ingest (or curate) Parquet shards, sharded over Ray tasks.

    python ray_jobs/build_index.py --config configs/tiny.toml --embeddings DIR --out DIR
    ray job submit --working-dir . -- python ray_jobs/build_index.py --config ... --embeddings ... --out ...
    python ray_jobs/build_index.py --config configs/gpu.toml --plan-only --assume-vectors 230000000 \
        --assume-dim 1152 --set ray.num_cpus=12

`--plan-only` prints the build plan (memescale/build/plan.py: shards, tasks at once, memory
per task and of the driver within `index.build_memory`, scratch and index disk, estimated
time) as a table and one JSON line, and exits without building. N and d come from the
embeddings' Parquet footers and schema (no data is read), or from --assume-vectors and
--assume-dim for a corpus not yet ingested. The time is priced with the plan's default
per-phase costs, or with measured ones (`--costs bench/results/build_scale.json`: the costs
`bench/build_scale.py` fitted on the builds it timed). A build whose plan does not fit exits
with status 2 before starting Ray.

Rerunning after a crash reuses the collected corpus, the partition and every shard graph whose
checksum is valid. `--work` (default OUT.work) must be on storage all nodes see on a cluster.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys

from memescale.build.plan import BuildPlanError, format_plan, load_costs, plan_for_config
from memescale.config import ConfigError, load_config
from memescale.crashpoints import arm_from_env
from memescale.embed.encoder import WeightsUnavailableError, check_weights
from memescale.logs import setup_logging
from memescale.ray_runtime import init_ray
from memescale.shards.corpus import shard_dataset

log = logging.getLogger("memescale.build")


def corpus_shape(embeddings: str | None, assume_vectors: int | None = None,
                 assume_dim: int | None = None) -> tuple[int, int]:
    """(N, d) of the corpus: the given values, else the embeddings' row count from the
    Parquet footers (all rows: duplicates a curate step marked are counted, so N is an upper
    bound) and the embedding column's width from the schema. Reads no data."""
    n, d = assume_vectors, assume_dim
    if n is None or d is None:
        if embeddings is None:
            raise FileNotFoundError("no --embeddings to read the corpus size from")
        ds = shard_dataset(embeddings)
        if n is None:
            n = ds.count_rows()
        if d is None:
            d = ds.schema.field("embedding").type.list_size
    if n < 1 or d < 1:
        raise ConfigError(f"the corpus must have >= 1 vector of >= 1 dimension (got N={n}, d={d})")
    return int(n), int(d)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True)
    p.add_argument("--embeddings", help="directory or URI of part-*.parquet shards (required unless "
                   "--assume-vectors and --assume-dim are both given)")
    p.add_argument("--out", help="index directory to write (required unless --plan-only)")
    p.add_argument("--work", default=None, help="scratch directory (default: OUT.work)")
    p.add_argument("--shards", type=int, default=None, help="number of shards (default: config index.shards)")
    p.add_argument("--threads-per-task", type=int, default=0,
                   help="threads of each shard task (default 0: all threads over the tasks that fit at once)")
    p.add_argument("--no-query-sample", action="store_true", help="plain PQ instead of query-aware PQ")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE")
    p.add_argument("--plan-only", action="store_true", help="print the build plan and exit without building")
    p.add_argument("--assume-vectors", type=int, default=None, metavar="N", help="plan for N vectors")
    p.add_argument("--assume-dim", type=int, default=None, metavar="D", help="plan for D-dimensional embeddings")
    p.add_argument("--costs", default=None, metavar="JSON",
                   help="price the plan's phases with measured costs: a JSON file with \"costs\", or "
                        "bench/build_scale.py's results (the costs it fitted on the builds it measured)")
    args = p.parse_args(argv)
    if args.embeddings is None and (args.assume_vectors is None or args.assume_dim is None):
        p.error("--embeddings is required unless --assume-vectors and --assume-dim are both given")
    if args.out is None and not args.plan_only:
        p.error("--out is required unless --plan-only")
    setup_logging()
    arm_from_env()  # crash drills kill this driver, never its Ray workers
    try:
        cfg = load_config(args.config, args.set)
        if args.shards is not None:
            cfg.index.shards = args.shards
        if not args.no_query_sample and not args.plan_only:
            check_weights(cfg.model)
        n, d = corpus_shape(args.embeddings, args.assume_vectors, args.assume_dim)
        costs, shape = load_costs(args.costs) if args.costs else (None, None)
        plan = plan_for_config(cfg, n, d, args.threads_per_task, costs=costs)
    except (ConfigError, WeightsUnavailableError, FileNotFoundError, BuildPlanError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if shape:
        ours = {"d": d, "R": cfg.index.R, "L": cfg.index.L, "build_pq_bytes": cfg.index.build_pq_bytes,
                "merge": cfg.index.merge}
        if any(shape.get(k, "prune" if k == "merge" else None) != v for k, v in ours.items()):
            print(f"warning: the costs in {args.costs} were fitted for {shape}, this build is {ours}: the graph "
                  f"phases' estimate may be far off", file=sys.stderr)
    if args.plan_only:
        print(format_plan(plan))
        print(json.dumps(plan.to_dict()))
        return 0
    log.info("build plan", extra={"plan": plan.to_dict()})
    init_ray(cfg.ray)
    from memescale.build.pipeline import build_from_shards

    summary = build_from_shards(cfg, args.embeddings, args.out, args.work, plan.threads_per_task,
                                query_sample=not args.no_query_sample)
    log.info("build finished", extra={"summary": summary})
    print(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
