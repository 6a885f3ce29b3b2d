"""Ingest Reddit submission dumps into Parquet shards of image embeddings.

    python ray_jobs/ingest.py --config configs/tiny.toml --dumps 'RS_2024-*.zst' --out DIR
    ray job submit --working-dir . -- python ray_jobs/ingest.py --config ... --dumps ... --out ...

Rerunning with the same arguments resumes: completed chunks are skipped, nothing is lost or
written twice. `--retry-failed` also gives the images that failed for transient reasons in
earlier runs one more try each (a retry pass per chunk, recorded like a chunk). Exit status: 0 done, 2 bad arguments/config or model weights unavailable.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys

from memescale.config import ConfigError, load_config
from memescale.crashpoints import arm_from_env
from memescale.embed.encoder import WeightsUnavailableError, check_weights
from memescale.ingest.chunks import PostFilter, parse_date
from memescale.ingest.dumps import expand_dump_paths
from memescale.logs import setup_logging
from memescale.ray_runtime import MissingGPUs, init_ray, require_gpus

log = logging.getLogger("memescale.ingest")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="TOML config (configs/tiny.toml, gpu.toml, ...)")
    p.add_argument("--dumps", nargs="+", required=True, help="dump files or globs (.zst, .ndjson)")
    p.add_argument("--out", required=True, help="output directory or URI (s3://...)")
    p.add_argument("--sample", type=float, default=1.0, help="keep this fraction of posts (by post id hash)")
    p.add_argument("--limit", type=int, default=None, help="take at most N posts (after filters)")
    p.add_argument("--after", default=None, help="only posts created on/after DATE (YYYY-MM-DD, UTC)")
    p.add_argument("--before", default=None, help="only posts created before DATE (YYYY-MM-DD, UTC)")
    p.add_argument("--allow-private", action="store_true", help="allow private/loopback image hosts")
    p.add_argument("--retry-failed", action="store_true",
                   help="also try once more the images that failed for transient reasons (timeout, 429, 5xx, "
                        "connection, DNS) in chunks completed by earlier runs")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override any config field")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    setup_logging()
    arm_from_env()  # crash drills kill this driver, never its Ray workers
    try:
        cfg = load_config(args.config, args.set)
        if args.allow_private:
            cfg.ingest.allow_private = True
        dumps = expand_dump_paths(args.dumps)
        post_filter = PostFilter(
            after=parse_date(args.after) if args.after else None,
            before=parse_date(args.before) if args.before else None,
            sample=args.sample,
        )
        if not 0 < args.sample <= 1:
            raise ConfigError("--sample must be in (0, 1]")
        check_weights(cfg.model)
    except (ConfigError, ValueError, FileNotFoundError, WeightsUnavailableError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    init_ray(cfg.ray)
    try:
        require_gpus(cfg.ingest.gpus_per_encoder, cfg.ingest.encoder_actors, "ingest's encoder",
                     "ingest.gpus_per_encoder")
    except MissingGPUs as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    from memescale.ingest.pipeline import run_ingest

    summary = run_ingest(cfg, dumps, args.out, post_filter, args.limit, progress=not args.no_progress,
                         retry_failed=args.retry_failed)
    log.info("ingest finished", extra={"summary": summary})
    print(json.dumps(summary, indent=1, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
