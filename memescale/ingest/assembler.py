"""Collect the pipeline's output rows by chunk and emit each chunk once all its rows are in.

Rows arrive in any order and in any grouping; each carries its chunk key, the chunk's row
count (`chunk_total`: refs + one marker) and its position `seq`. A chunk is emitted exactly
once, as (ChunkResult with final counts, shard table of its encoded rows in input order,
table of its refs that failed for a transient reason (`FAILURE_SCHEMA`), or None for none).
Memory: the rows of chunks in flight. O(rows) overall.
"""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pyarrow as pa

from memescale.ingest.download import TRANSIENT_REASONS
from memescale.shards.store import FAILURE_SCHEMA, ChunkResult, rows_to_shard_table

Finished = tuple[ChunkResult, pa.Table | None, pa.Table | None]


class ChunkAssembler:
    def __init__(self) -> None:
        self._parts: dict[str, list[dict[str, np.ndarray]]] = {}
        self._seen: Counter[str] = Counter()

    def add(self, batch: dict[str, np.ndarray]) -> list[Finished]:
        """Take one batch of rows; return the chunks it completed."""
        done = []
        chunks = np.asarray(batch["chunk"]).astype(str)
        for key in np.unique(chunks):
            mask = chunks == key
            part = {c: np.asarray(v)[mask] for c, v in batch.items()}
            self._parts.setdefault(key, []).append(part)
            self._seen[key] += int(mask.sum())
            total = int(part["chunk_total"][0])
            if self._seen[key] > total:
                raise RuntimeError(f"chunk {key}: {self._seen[key]} rows seen, {total} expected")
            if self._seen[key] == total:
                done.append(self._finish(key))
        return done

    def pending(self) -> list[str]:
        """Keys of chunks with rows still missing."""
        return sorted(self._parts)

    def _finish(self, key: str) -> Finished:
        parts = self._parts.pop(key)
        del self._seen[key]
        cols = {c: np.concatenate([p[c] for p in parts]) for c in parts[0]}
        order = np.argsort(cols["seq"], kind="stable")
        cols = {c: v[order] for c, v in cols.items()}
        status = cols["status"].astype(str)
        result = ChunkResult(**json.loads(str(cols["chunk_info"][status == "marker"][0])))
        for s, reason in zip(status, cols["reason"].astype(str)):
            if s == "failed":
                result.failed[reason] = result.failed.get(reason, 0) + 1
            elif s == "discarded":
                result.discarded[reason] = result.discarded.get(reason, 0) + 1
        ok = status == "ok"
        # an image the chunk holds twice (a repeated post): its first encoded copy is kept
        ids = cols["image_id"]
        _, first = np.unique(ids[ok], return_index=True)
        unique = np.zeros(len(ok), dtype=bool)
        unique[np.flatnonzero(ok)[first]] = True
        if (ok & ~unique).any():
            result.discarded["duplicate"] = int((ok & ~unique).sum())
        ok &= unique
        result.encoded = int(ok.sum())
        result.bytes = int(cols["bytes"][ok].sum())
        table = rows_to_shard_table({c: v[ok] for c, v in cols.items()}) if ok.any() else None
        reasons = cols["reason"].astype(str)
        # worth a retry: failed for a transient reason, not encoded from another copy, once each
        again = (status == "failed") & np.isin(reasons, sorted(TRANSIENT_REASONS)) & ~np.isin(ids, ids[ok])
        _, once = np.unique(ids[again], return_index=True)
        keep = np.zeros(len(again), dtype=bool)
        keep[np.flatnonzero(again)[once]] = True
        again = keep
        failures = None
        if again.any():
            failures = pa.Table.from_arrays([pa.array(cols[f.name][again], type=f.type) for f in FAILURE_SCHEMA],
                                            schema=FAILURE_SCHEMA)
        return result, table, failures
