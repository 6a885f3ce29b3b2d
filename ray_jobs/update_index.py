"""Update a built index in place: insert new shards, delete images, consolidate.

    python ray_jobs/update_index.py --config configs/tiny.toml --index DIR --embeddings NEW_SHARDS
    python ray_jobs/update_index.py --index DIR --delete IDS_FILE
    python ray_jobs/update_index.py --index DIR --consolidate
    ray job submit --working-dir . -- python ray_jobs/update_index.py --config ... --index ... --embeddings ...

--embeddings inserts every row whose image_id is not in the index yet (rerunning it, or
giving overlapping shards, inserts nothing twice; deleted images stay deleted), with the
index's weighting and PQ codec. --delete takes a file of image ids or post ids, one per
line (an all-digit line is an image id; a post id is base 36, optionally t3_-prefixed).
Both are durable when the command returns (an fsync'd update log) and visible to a
running server within its refresh period; an insert or delete that takes the live
inserted rows past index.delta_max, or the deleted ones past index.tombstones_max,
consolidates as well. --consolidate folds the updates into a new on-disk generation and
switches to it atomically; old generations are removed once no searcher holds them.

Killed at any point, rerunning the same command completes it: nothing inserted is lost,
nothing deleted comes back, nothing is doubled (memescale/index/update.py). Prints one
JSON line with what it did.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

from memescale.config import ConfigError, load_config
from memescale.index.disk import IndexFormatError
from memescale.index.update import UpdateLimits, consolidate, delete_ids, insert_shards, parse_ids
from memescale.logs import setup_logging

log = logging.getLogger("memescale.update")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=None, help="config file (index.delta_max, index.tombstones_max)")
    p.add_argument("--index", required=True, help="the index folder (as written by build_index.py --out)")
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--embeddings", help="directory or URI of new part-*.parquet shards to insert")
    what.add_argument("--delete", metavar="IDS_FILE", help="file of image ids or post ids to delete, one per line")
    what.add_argument("--consolidate", action="store_true", help="fold the updates into a new generation")
    p.add_argument("--threads", type=int, default=0, help="worker threads (0: all cores)")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE")
    args = p.parse_args(argv)
    setup_logging()
    if os.environ.get("RAY_ADDRESS"):  # under `ray job submit`: record the update metrics in the cluster's
        import ray

        ray.init(address=os.environ["RAY_ADDRESS"], log_to_driver=False)
    try:
        cfg = load_config(args.config, args.set)
        limits = UpdateLimits(cfg.index.delta_max, cfg.index.tombstones_max, cfg.index.build_memory)
        threads = args.threads or None
        if not (Path(args.index) / "records.bin").exists() and not (Path(args.index) / "CURRENT").exists():
            raise FileNotFoundError(f"{args.index} is not an index folder (no records.bin or CURRENT)")
        if args.embeddings:
            out = insert_shards(args.index, args.embeddings, limits, threads)
        elif args.delete:
            with open(args.delete, encoding="utf-8") as f:
                ids, posts = parse_ids(f.read().splitlines())
            out = {"posts": posts, **delete_ids(args.index, ids, limits, threads)}
        else:
            out = consolidate(args.index, threads, cfg.index.build_memory)
    except (ConfigError, FileNotFoundError, IndexFormatError, ValueError, KeyError, MemoryError) as e:
        log.error("update failed: %s", e)
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(out, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
