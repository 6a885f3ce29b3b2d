"""The curate job on Ray: collect -> decide on the driver -> one Ray Data pass that applies the
decisions and scores every row with the quality heads, writing one curated file per input
file (same name) into OUT.

    collect_corpus (driver, streaming)     WORK/vectors.npy + meta.parquet (DECIDE_FIELDS)
    decide (driver)                        placeholders, NSFW probe, duplicate clusters
    Ray Data: files -> CurateFiles actors  OUT/part-*.parquet (temp name, then renamed)
    OUT/curate_summary.json                counts, probe precision/recall, dedup figures

The decisions (11 bytes per row) go to the object store once and every actor maps them
zero-copy; each actor loads the heads once. A rerun recomputes everything and replaces OUT's
shards (stale ones from an earlier run are removed first), so a crashed run leaves no mix.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict
from pathlib import Path, PurePosixPath

import numpy as np
import pyarrow.parquet as pq
import ray

from memescale.config import Config
from memescale.crashpoints import crash_point
from memescale.curate.decide import DECIDE_FIELDS, DROP_REASONS, Decisions, curate_table, decide, file_offsets
from memescale.curate.screens import reference_embeddings
from memescale.durable import fsync_tree
from memescale.metrics import record
from memescale.shards.corpus import collect_corpus
from memescale.shards.store import ShardStore

log = logging.getLogger(__name__)

SUMMARY_FILE = "curate_summary.json"


class CurateFiles:
    """Ray Data actor: curates whole input files (batches of {path, first_row}) into OUT."""

    def __init__(self, decisions: dict, heads_path: str, embeddings: str, out: str):
        from memescale.quality.heads import QualityHeads

        self.decisions = Decisions(**{k: ray.get(v) for k, v in decisions.items()})
        self.heads = QualityHeads.load(heads_path) if heads_path else None
        self.in_fs = ShardStore(embeddings).fs
        self.store = ShardStore(out)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        written = np.zeros(len(batch["path"]), np.int64)
        for i, (path, first) in enumerate(zip(batch["path"], batch["first_row"])):
            t0 = time.perf_counter()
            table = pq.read_table(path, filesystem=self.in_fs)
            out = curate_table(table, int(first), self.decisions, self.heads)
            self.store.write_table(out, PurePosixPath(path).name)
            written[i] = out.num_rows
            record("memescale_curate_file_seconds", time.perf_counter() - t0)
            record("memescale_curate_rows_written", out.num_rows)
        return {"path": batch["path"], "written": written}


def run_curate(cfg: Config, embeddings: str, out: str, work: str | None = None) -> dict:
    """Curate the shards of `embeddings` into `out`; returns the summary (also written)."""
    t0 = time.perf_counter()
    work_dir = Path(work or f"{out.rstrip('/')}.work")
    paths, offsets, total = file_offsets(embeddings)
    corpus = collect_corpus(embeddings, work_dir, fields=DECIDE_FIELDS, skip_duplicates=False)
    crash_point("curate.collected")
    if len(corpus) != total:
        raise RuntimeError(f"collected {len(corpus)} rows, the shard footers say {total}")
    references = reference_embeddings(cfg, cfg.curate.placeholder_images)
    t_collect = time.perf_counter()
    decisions, report = decide(cfg, corpus, references)
    crash_point("curate.decided")
    t_decide = time.perf_counter()
    for outcome, n in report["counts"].items():
        if outcome != "rows":
            record("memescale_curate_rows", n, outcome=outcome)
    probe = report.get("nsfw_probe", {})
    log.info("nsfw probe", extra={"probe": probe})
    print(f"nsfw probe: {_probe_line(probe)}", flush=True)

    store = ShardStore(out)
    store.fs.create_dir(store.root, recursive=True)
    for stale in store.shard_paths():
        store.fs.delete_file(stale)
    crash_point("curate.stale_removed")
    refs = {k: ray.put(v) for k, v in asdict(decisions).items()}
    ds = ray.data.from_items([{"path": p, "first_row": o} for p, o in zip(paths, offsets)],
                             override_num_blocks=max(1, min(len(paths), 64)))
    written = 0
    for batch in ds.map_batches(CurateFiles, batch_size=1, concurrency=max(1, cfg.curate.score_actors),
                                fn_constructor_kwargs={"decisions": refs, "heads_path": cfg.curate.quality_heads,
                                                       "embeddings": embeddings, "out": out}).iter_batches(
                                                           batch_size=None, batch_format="numpy"):
        written += int(np.sum(batch["written"]))
        crash_point("curate.file_written")
    expected = report["counts"]["kept"]
    if written != expected:
        raise RuntimeError(f"wrote {written} rows, decided to keep {expected}")
    summary = {
        "input": embeddings, "output": out, "files": len(paths), "rows_written": written,
        "drop_reasons": list(DROP_REASONS), "quality_heads": cfg.curate.quality_heads or None,
        "placeholder_references": len(references), **report,
        "seconds": {"collect": round(t_collect - t0, 2), "decide": round(t_decide - t_collect, 2),
                    "write": round(time.perf_counter() - t_decide, 2)},
    }
    tmp = f"{store.root}/.{SUMMARY_FILE}.tmp"
    with store.fs.open_output_stream(tmp) as f:
        f.write(json.dumps(summary, indent=1, default=float).encode())
    crash_point("curate.summary_written")
    store.fs.move(tmp, f"{store.root}/{SUMMARY_FILE}")
    if store.local:
        fsync_tree(store.root)
    return summary


def _probe_line(p: dict) -> str:
    if not p:
        return "off"
    if not p.get("trained"):
        return f"not trained ({p.get('reason')})"
    return (f"precision {p['precision']:.3f} recall {p['recall']:.3f} AUC {p['auc']:.3f} at threshold "
            f"{p['threshold']} on {p['test_rows']} held-out rows ({p['positives']} over_18 rows)")
