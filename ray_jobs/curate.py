"""Curate embedding shards between ingest and build: drop placeholders and NSFW, mark
duplicates, add quality scores.

    python ray_jobs/curate.py --config configs/tiny.toml --in DIR --out DIR
    ray job submit --working-dir . -- python ray_jobs/curate.py --config ... --in ... --out ...

OUT gets one curated part-*.parquet per input file (the ingest schema plus nsfw, dup_of,
meme, aesthetic, useful) and curate_summary.json; build_index.py then indexes OUT. The
quality heads come from `curate.quality_heads` (python -m memescale.quality train).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from memescale.config import ConfigError, load_config
from memescale.crashpoints import arm_from_env
from memescale.embed.encoder import WeightsUnavailableError, check_weights
from memescale.logs import setup_logging
from memescale.quality.heads import HeadsError, QualityHeads
from memescale.ray_runtime import init_ray
from memescale.shards.corpus import shard_dataset

log = logging.getLogger("memescale.curate.decide")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True)
    p.add_argument("--in", dest="inp", required=True, help="directory or URI of ingest part-*.parquet shards")
    p.add_argument("--out", required=True, help="directory for the curated shards")
    p.add_argument("--work", default=None, help="scratch directory (default: OUT.work)")
    p.add_argument("--heads", default=None, help="quality heads file (overrides curate.quality_heads)")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE")
    args = p.parse_args(argv)
    setup_logging()
    arm_from_env()  # crash drills kill this driver, never its Ray workers
    try:
        cfg = load_config(args.config, args.set)
        if args.heads is not None:
            cfg.curate.quality_heads = str(Path(args.heads).resolve()) if args.heads else ""
        if cfg.curate.placeholder_images:
            check_weights(cfg.model)
        for f in cfg.curate.placeholder_images:
            if not Path(f).is_file():
                raise FileNotFoundError(f"placeholder image {f} (named in the config) does not exist")
        if Path(args.inp).resolve() == Path(args.out).resolve():
            raise ConfigError("--out must differ from --in (curated shards replace OUT's shards)")
        dim = shard_dataset(args.inp).schema.field("embedding").type.list_size
        if cfg.curate.quality_heads:
            QualityHeads.load(cfg.curate.quality_heads, dim=dim)
    except (ConfigError, WeightsUnavailableError, FileNotFoundError, HeadsError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    init_ray(cfg.ray)
    from memescale.curate.pipeline import run_curate

    summary = run_curate(cfg, args.inp, args.out, args.work)
    log.info("curate finished", extra={"summary": summary})
    print(json.dumps(summary, indent=1, default=float))
    return 0


if __name__ == "__main__":
    sys.exit(main())
