"""The curate step between ingest and build: what to drop, what duplicates what, and the
per-file transform that writes curated shards (same schema plus CURATE_FIELDS).

    collect (corpus.collect_corpus)    vectors + image_id, url, content_hash, score, ... in row order
    decide (driver)                    placeholders, NSFW flag and probe, duplicate clusters
    curate_table (per input file)      drop, add nsfw / dup_of / meme / aesthetic / useful

Row r is the r-th row of the input shards in path order (files sorted, rows in file order);
`file_offsets` gives each file's first row, so any worker can apply the decisions to one file
on its own. Dropped rows (placeholders; NSFW unless `curate.keep_nsfw`) are not written;
duplicates are written with `dup_of` = the kept member's image_id (the build skips them).
Quality scores are null without a heads file. Pure functions; the Ray pass is in curate_ray.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from memescale.config import Config
from memescale.curate.dedup import cluster, dictionary_codes, keep_best
from memescale.curate.screens import placeholder_masks, train_nsfw_probe
from memescale.shards.corpus import CURATE_FIELDS, QUALITY_FIELDS, Corpus
from memescale.shards.store import ShardStore, embeddings_of

log = logging.getLogger(__name__)

# Columns `decide` reads besides the embedding.
DECIDE_FIELDS = ["image_id", "url", "content_hash", "score", "created_utc", "over_18"]
DROP_REASONS = ("placeholder_hash", "placeholder_embedding", "over_18", "nsfw_probe")


@dataclass
class Decisions:
    """Per input row: `drop` 0 = keep, else 1 + index into DROP_REASONS; `nsfw` flag;
    `dup_of` the kept member's image_id where `has_dup`. 11 bytes per row."""

    drop: np.ndarray  # (N,) uint8
    nsfw: np.ndarray  # (N,) bool
    has_dup: np.ndarray  # (N,) bool
    dup_of: np.ndarray  # (N,) int64

    def counts(self) -> dict[str, int]:
        """Rows by outcome: kept (incl. duplicates), duplicate, and each drop reason."""
        out = {"rows": int(len(self.drop)), "kept": int((self.drop == 0).sum()),
               "duplicate": int(self.has_dup.sum()), "nsfw_kept": int((self.nsfw & (self.drop == 0)).sum())}
        for i, reason in enumerate(DROP_REASONS):
            out[f"dropped_{reason}"] = int((self.drop == i + 1).sum())
        return out


def _bool_column(column: pa.ChunkedArray) -> np.ndarray:
    return pc.fill_null(column, False).to_numpy(zero_copy_only=False).astype(bool)


def decide(cfg: Config, corpus: Corpus, references: np.ndarray) -> tuple[Decisions, dict]:
    """Placeholder, NSFW and duplicate decisions for every corpus row, and a report
    (counts, the probe's held-out precision/recall, the dedup figures). Cost: the filters are
    O(N d); dedup as in memescale/curate/dedup.py."""
    cc = cfg.curate
    vectors = corpus.vectors
    n = len(corpus)
    by_hash, by_emb = placeholder_masks(corpus.column("content_hash").to_numpy(),
                                        vectors, cfg.ingest.placeholder_hashes, references,
                                        cc.placeholder_cosine)
    placeholder = by_hash | by_emb
    over_18 = _bool_column(corpus.column("over_18"))
    probe_flag = np.zeros(n, bool)
    report: dict = {}
    if cc.nsfw_probe:
        probe, probe_report = train_nsfw_probe(
            vectors, over_18, np.flatnonzero(~placeholder), holdout=cc.nsfw_holdout, threshold=cc.nsfw_threshold,
            min_positives=cc.nsfw_min_positives, max_train=cc.nsfw_max_train, seed=cfg.index.seed)
        report["nsfw_probe"] = asdict(probe_report)
        if probe is not None:
            probe_flag = probe.predict(vectors) >= cc.nsfw_threshold
    nsfw = over_18 | probe_flag
    drop = np.zeros(n, np.uint8)
    if not cc.keep_nsfw:
        drop[probe_flag] = 1 + DROP_REASONS.index("nsfw_probe")
        drop[over_18] = 1 + DROP_REASONS.index("over_18")
    drop[by_emb] = 1 + DROP_REASONS.index("placeholder_embedding")
    drop[by_hash] = 1 + DROP_REASONS.index("placeholder_hash")

    rows = np.flatnonzero(drop == 0)
    kept = corpus.rows(rows, ["url", "content_hash", "image_id", "score", "created_utc"])
    parent, dedup_report = cluster(
        vectors, rows, {"url": dictionary_codes(kept.column("url")),
                        "content_hash": dictionary_codes(kept.column("content_hash"))},
        cosine=cc.near_dup_cosine, recall=cc.lsh_recall, max_bucket=cc.lsh_max_bucket,
        seed=cfg.index.seed)
    image_id = kept.column("image_id").to_numpy()
    best = keep_best(parent, pc.fill_null(kept.column("score"), 0).to_numpy(),
                     pc.fill_null(kept.column("created_utc"), 0).to_numpy(), image_id, dedup_report)
    has_dup = np.zeros(n, bool)
    dup_of = np.zeros(n, np.int64)
    is_dup = best >= 0
    has_dup[rows[is_dup]] = True
    dup_of[rows[is_dup]] = image_id[best[is_dup]]
    decisions = Decisions(drop, nsfw, has_dup, dup_of)
    report["dedup"] = asdict(dedup_report)
    report["counts"] = decisions.counts()
    return decisions, report


def file_offsets(embeddings: str) -> tuple[list[str], list[int], int]:
    """The input shard paths in row order, each one's first row, and the total row count
    (from the Parquet footers). O(files)."""
    store = ShardStore(embeddings)
    paths = store.shard_paths()
    offsets, row = [], 0
    for p in paths:
        offsets.append(row)
        with store.fs.open_input_file(p) as f:
            row += pq.ParquetFile(f).metadata.num_rows
    return paths, offsets, row


def curate_table(table: pa.Table, first_row: int, decisions: Decisions, heads=None) -> pa.Table:
    """One input file's rows (starting at global row `first_row`) -> its curated rows.

    `heads`: a memescale.quality.heads.QualityHeads or None (null scores). O(rows x heads cost).
    """
    rows = first_row + np.arange(table.num_rows)
    keep = decisions.drop[rows] == 0
    t = table.drop_columns([c for c in CURATE_FIELDS if c in table.column_names]).filter(pa.array(keep))
    rows = rows[keep]
    t = t.append_column("nsfw", pa.array(decisions.nsfw[rows]))
    t = t.append_column("dup_of", pa.array(decisions.dup_of[rows], pa.int64(),
                                           mask=~decisions.has_dup[rows]))
    scores = heads.scores(embeddings_of(t)) if heads is not None and t.num_rows else {}
    for name in QUALITY_FIELDS:
        col = scores.get(name)
        t = t.append_column(name, pa.array(col, pa.float32()) if col is not None
                            else pa.nulls(t.num_rows, pa.float32()))
    return t
