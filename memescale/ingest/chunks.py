"""Which posts an ingest run takes, cut into resume chunks: dumps -> (ChunkResult, image refs).

Pure and deterministic: the same dumps, filters and limit give the same chunks with the same
refs, whether the run starts fresh or resumes after a crash. Chunks already in the manifest
are skipped without parsing their JSON; their recorded `posts` still count towards `limit`,
so a resumed run stops at exactly the post where the uninterrupted run stopped.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from types import SimpleNamespace

import pyarrow as pa

from memescale.ingest.dumps import iter_chunks
from memescale.ingest.urls import BadRecord, ImageRef, extract_image_refs, parse_created_utc
from memescale.shards.store import ChunkResult, chunk_key

log = logging.getLogger(__name__)


def parse_date(text: str) -> int:
    """'YYYY-MM-DD' (or full ISO 8601; naive means UTC) -> Unix seconds."""
    dt = datetime.fromisoformat(text)
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=UTC)
    return int(dt.timestamp())


@dataclass(frozen=True)
class PostFilter:
    """Posts kept: created in [after, before) and inside the deterministic `sample` fraction."""

    after: int | None = None
    before: int | None = None
    sample: float = 1.0

    def keep(self, post_id: str, created_utc: int) -> bool:
        if self.after is not None and created_utc < self.after:
            return False
        if self.before is not None and created_utc >= self.before:
            return False
        if self.sample < 1.0:
            h = int.from_bytes(hashlib.blake2b(post_id.encode(), digest_size=8).digest(), "big")
            return h < self.sample * 2**64
        return True


def plan_chunks(
    dumps: list[str],
    chunk_posts: int,
    done: dict[str, ChunkResult],
    post_filter: PostFilter = PostFilter(),
    limit: int | None = None,
) -> Iterator[tuple[ChunkResult, list[ImageRef]]]:
    """Yield every chunk still to do, in input order, with its image refs.

    `done` maps chunk keys to manifest entries. `limit` caps the number of posts taken (after
    filtering) over all dumps; the chunk where it is reached is marked incomplete and is
    redone (same rows, same file) by every later run.
    Cost: one pass of decompression over the dumps, JSON parsing only for chunks to do.
    """
    remaining = limit
    for dump in dumps:
        skip = {r.index for r in done.values() if r.dump == os.path.basename(dump) and r.complete and not r.retry}
        pending = sorted(skip)
        for chunk in iter_chunks(dump, chunk_posts, skip):
            if chunk.skipped:  # the final error chunk of a dump, already done
                continue
            while pending and pending[0] < chunk.index:
                remaining = _take(remaining, done[chunk_key(chunk.dump, pending.pop(0))].posts)
            if remaining is not None and remaining <= 0:
                return
            result = ChunkResult(dump=chunk.dump, index=chunk.index, first_line=chunk.first_line,
                                 lines=chunk.n_lines, bad_lines=chunk.bad_lines, error=chunk.error)
            refs: list[ImageRef] = []
            for record in chunk.records:
                if remaining is not None and result.posts >= remaining:
                    result.complete = False
                    break
                try:
                    created = parse_created_utc(record.get("created_utc"))
                    if not post_filter.keep(str(record["id"]), created):
                        continue
                    post_refs = extract_image_refs(record)
                except BadRecord as e:
                    result.bad_lines += 1
                    log.debug("bad record in %s: %s", dump, e)
                    continue
                result.posts += 1
                refs.extend(post_refs)
            result.refs = len(refs)
            remaining = _take(remaining, result.posts)
            yield result, refs
        for index in pending:
            remaining = _take(remaining, done[chunk_key(os.path.basename(dump), index)].posts)


def plan_retries(done: dict[str, ChunkResult], read_failures: Callable[[ChunkResult], pa.Table],
                 ) -> Iterator[tuple[ChunkResult, list[SimpleNamespace]]]:
    """Yield one retry pass for every chunk whose latest completed pass left transient
    failures (`ChunkResult.retry_file`), with those refs, in chunk order.

    Pass n + 1 of a chunk takes exactly pass n's failures, so a rerun after a crash redoes
    the same pass (same key, same file) and an image is never encoded twice; each call
    plans at most one pass per chunk ("once per run"). `read_failures(result)` returns the
    `FAILURE_SCHEMA` table a manifest entry names. Cost: one read of each failures file."""
    latest: dict[tuple[str, int], ChunkResult] = {}
    for r in done.values():
        if r.complete and r.retry >= latest.get((r.dump, r.index), r).retry:
            latest[(r.dump, r.index)] = r
    for (_, _), last in sorted(latest.items()):
        if not last.retry_file:
            continue
        failures = read_failures(last)
        refs = [SimpleNamespace(**row) for row in failures.drop_columns(["reason"]).to_pylist()]
        if not refs:
            continue
        retried = Counter(failures.column("reason").to_pylist())
        yield ChunkResult(dump=last.dump, index=last.index, first_line=last.first_line, lines=0,
                          refs=len(refs), retry=last.retry + 1, retried=dict(retried)), refs


def _take(remaining: int | None, n: int) -> int | None:
    return None if remaining is None else remaining - n
