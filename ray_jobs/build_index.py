"""Build the disk index from ingest (or curate) Parquet shards, sharded over Ray tasks.

    python ray_jobs/build_index.py --config configs/tiny.toml --embeddings DIR --out DIR
    ray job submit --working-dir . -- python ray_jobs/build_index.py --config ... --embeddings ... --out ...

Rerunning after a crash reuses the collected corpus, the partition and every shard graph whose
checksum is valid. `--work` (default OUT.work) must be on storage all nodes see on a cluster.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys

from memescale.config import ConfigError, load_config
from memescale.embed.encoder import WeightsUnavailableError, check_weights
from memescale.logs import setup_logging
from memescale.ray_runtime import init_ray
from memescale.shards.corpus import shard_dataset

log = logging.getLogger("memescale.build")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True)
    p.add_argument("--embeddings", required=True, help="directory or URI of part-*.parquet shards")
    p.add_argument("--out", required=True, help="index directory to write")
    p.add_argument("--work", default=None, help="scratch directory (default: OUT.work)")
    p.add_argument("--shards", type=int, default=None, help="number of shards (default: config index.shards)")
    p.add_argument("--threads-per-task", type=int, default=1)
    p.add_argument("--no-query-sample", action="store_true", help="plain PQ instead of query-aware PQ")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE")
    args = p.parse_args(argv)
    setup_logging()
    try:
        cfg = load_config(args.config, args.set)
        if args.shards is not None:
            cfg.index.shards = args.shards
        if not args.no_query_sample:
            check_weights(cfg.model)
        shard_dataset(args.embeddings)
    except (ConfigError, WeightsUnavailableError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    init_ray(cfg.ray)
    from memescale.build.pipeline import build_from_shards

    summary = build_from_shards(cfg, args.embeddings, args.out, args.work, args.threads_per_task,
                                query_sample=not args.no_query_sample)
    log.info("build finished", extra={"summary": summary})
    print(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
