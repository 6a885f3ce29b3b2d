"""Updating a built index in place: insert new shards, delete images, consolidate.

Every operation takes the index folder's update lock (``updates/lock``, an exclusive
`flock`: one writer at a time; searchers never wait for it) and is safe to kill at any
point and rerun:

- `insert_shards`: rows of new embedding shards whose ``image_id`` is neither in the index,
  nor deleted ever, nor earlier in the same input, get the index's weighting columns and go
  to the update log as one transaction (`wal.py`), fsync'd before the call returns; then
  the delta graph checkpoint is extended. Rerunning inserts nothing twice.
- `delete_ids`: image ids, or post ids expanded to their images' ids, go to the log as one
  transaction; from then on no search returns them, and no later insert brings them back.
- `consolidate`: generation g + its log -> generation g+1, written beside it
  (``gen-<g+1>.tmp/``, renamed when complete) and made current by replacing ``CURRENT``.
  Steps, each streaming over node-id blocks with memory-mapped scratch files under
  ``updates/work-<g+1>/``: (1) the surviving vectors then the live delta vectors, in that
  order, into one fp16 file (new ids: survivors keep their order); (2) FreshDiskANN's delete
  rule for every surviving node: its out-list minus the deleted nodes, plus the out-lists of
  its deleted neighbours, robust-pruned back to R when longer; (3) the delta rows inserted
  into that graph (greedy search from the medoid, robust prune, reverse edges:
  `vamana.refine_graph` on those points); (4) PQ codes: the survivors' as they were, the
  delta's encoded with the same query-aware codec; (5) records written with the metadata
  streamed in node order. A kill before the switch leaves generation g and its log as they
  were (the rerun starts over); after it, the rerun only collects garbage.
  Memory: `consolidation_memory` (about 26 bytes per node for the id maps, norms and
  degrees, plus the PQ codes the open index holds, the delta, and one block), checked
  against `index.build_memory` before anything is written; scratch disk: (2 dim + 4
  ceil(1.3 R) + 5 R) bytes per node.
"""

from __future__ import annotations

import fcntl
import logging
import os
import re
import shutil
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
from numba import njit

from .. import metrics
from ..crashpoints import crash_point
from ..durable import fsync_dir, fsync_tree
from ..ingest.urls import image_id as post_image_id
from ..memwatch import PeakRssAnon
from .build import IndexParams, build_info, write_built_index
from .disk import CURRENT_FILE, decode_metadata, write_durably
from .kernels import resolve_threads
from .live import (
    UPDATES_DIR,
    DeltaGraph,
    LiveIndex,
    collect_garbage,
    deleted_history_path,
    delta_checkpoint_path,
    generation_dir_name,
    pack_meta,
)
from .search import _record_offset
from .vamana import find_medoid, prune_rows, refine_graph, vector_norms
from .wal import UpdateLog, wal_path

log = logging.getLogger(__name__)

LOCK_FILE = "lock"
INSERT_FRAME_BYTES = 64 << 20  # vectors per log frame of an insert (one transaction)
POST_IMAGES = 100  # images per post a post-id delete covers (gallery items 0..99)
INSERT_BATCHES = 50  # inserts run in about this many batches (a batch searches the graph as it was before it)
INSERT_BATCH_MIN = 64
INSERT_L_FACTOR = 1.5  # inserts search with this x the build's L (measured: +0.003 to +0.005 recall@10 at L 20)
REPAIR_EXPAND = 4  # a repaired candidate list holds at most this x R ids
REPAIR_TAKE = 4  # the delete rule takes the first R / REPAIR_TAKE out-neighbours of each deleted neighbour
_POST_ID = re.compile(r"^(?:t3_)?([0-9a-z]{1,16})$")


@contextmanager
def update_lock(index_dir: str | os.PathLike) -> Iterator[None]:
    """Hold the index folder's update lock (blocks while another update runs)."""
    d = Path(index_dir) / UPDATES_DIR
    d.mkdir(parents=True, exist_ok=True)
    fd = os.open(d / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


@dataclass
class UpdateLimits:
    """When an insert or delete triggers a consolidation (`IndexConfig.delta_max`,
    `tombstones_max`; 0: never), and the RAM a consolidation may use (`build_memory`; 0:
    unchecked)."""

    delta_max: int = 0
    tombstones_max: int = 0
    memory: int = 0


CONSOLIDATE_FIXED = 256 << 20  # interpreter, libraries, the open index's small arrays and cache
CONSOLIDATE_PER_NODE = 26  # old->new ids (4), survivor list (4), alive and tombstone bits (~1), norms and
# degrees (8), refine_graph's norms and degree copy (8), slack (1)


CONSOLIDATE_BLOCK = 16384  # nodes per block of the repair
ROW_BLOCK_BYTES = 16 << 20  # vectors gathered or encoded per block (their index arithmetic is 8 B/element)


def _row_block(dim: int) -> int:
    return max(256, ROW_BLOCK_BYTES // (8 * dim))


def consolidation_memory(nodes: int, pq_bytes: int, delta_bytes: int, dim: int, R: int,
                         block: int = CONSOLIDATE_BLOCK) -> int:
    """Peak RAM of a consolidation in bytes: fixed + per node + the PQ codes (held by the open
    index) + the delta (vectors, graph, metadata) + one block of repaired lists + the row
    blocks of vectors being gathered and encoded."""
    return (CONSOLIDATE_FIXED + nodes * (CONSOLIDATE_PER_NODE + pq_bytes) + delta_bytes
            + block * (4 * REPAIR_EXPAND * R + 8) + 4 * ROW_BLOCK_BYTES)


def _needs_consolidation(live: LiveIndex, limits: UpdateLimits) -> bool:
    c = live.counts()
    delta = c["delta"] - c["delta_deleted"]
    tombs = c["base_deleted"] + c["delta_deleted"]
    return bool((limits.delta_max and delta > limits.delta_max) or (limits.tombstones_max and tombs > limits.tombstones_max))


# ------------------------------------------------------------------------------ insert


def _new_rows(live: LiveIndex, vecs: np.ndarray, table: pa.Table, seen: np.ndarray
              ) -> tuple[np.ndarray, pa.Table, int, np.ndarray]:
    """The rows of one input batch to insert, how many were skipped as already present, and
    `seen` (sorted int64 image ids taken earlier in this input) with the batch's added."""
    st = live.state
    ids = np.asarray(table.column("image_id").to_numpy(zero_copy_only=False))
    if ids.dtype.kind != "i":
        raise ValueError("the shards' image_id column has nulls: every inserted row needs a stable image_id")
    ids = ids.astype(np.int64)
    keep = st.base.nodes_of(ids) < 0
    if st.delta.image_ids.size:
        keep &= st.delta.rows_of(ids) < 0
    if st.deleted_ids.size:
        keep &= ~np.isin(ids, st.deleted_ids)
    if seen.size:
        keep &= ~np.isin(ids, seen)
    # duplicates within the batch: keep the first
    _, first = np.unique(ids, return_index=True)
    uniq = np.zeros(ids.size, bool)
    uniq[first] = True
    keep &= uniq
    idx = np.flatnonzero(keep)
    return vecs[idx], table.take(pa.array(idx)), int(ids.size - idx.size), np.union1d(seen, ids[idx])


def insert_shards(index_dir: str | os.PathLike, embeddings: str, limits: UpdateLimits | None = None,
                  threads: int | None = None, batch_rows: int = 16384) -> dict[str, Any]:
    """Insert the rows of the Parquet shards under `embeddings` not yet in the index (module
    doc). Returns counts: inserted, skipped (already present or deleted), delta, and whether
    a consolidation ran. Memory: the new rows (they go to the log as one transaction)."""
    from ..shards.corpus import node_batches

    t0 = time.perf_counter()
    index_dir = Path(index_dir)
    with update_lock(index_dir):
        live = LiveIndex.open(index_dir, threads=threads)
        try:
            st = live.state
            weighting = live.weighting
            batches = node_batches(embeddings, batch_rows)
            next(batches)
            ops: list[dict[str, Any]] = []
            seen = np.zeros(0, np.int64)
            inserted = skipped = 0
            pend_v: list[np.ndarray] = []
            pend_i: list[np.ndarray] = []
            pend_m: list[bytes] = []
            pend_bytes = 0

            def flush() -> None:
                nonlocal pend_v, pend_i, pend_m, pend_bytes
                if pend_v:
                    v = np.concatenate(pend_v)
                    ops.append({"op": "insert", "dim": int(v.shape[1]), "vectors": v.astype("<f2").tobytes(),
                                "image_ids": np.concatenate(pend_i).astype("<i8").tobytes(), "meta": pend_m})
                pend_v, pend_i, pend_m, pend_bytes = [], [], [], 0

            for vecs, table in batches:
                v, t, skip, seen = _new_rows(live, vecs, table, seen)
                skipped += skip
                if t.num_rows == 0:
                    continue
                rows = t.to_pylist()
                if v.shape[1] != weighting.base_dim:
                    raise ValueError(f"the new shards hold {v.shape[1]}-d embeddings, the index {weighting.base_dim}-d")
                x = weighting.extend_base(np.asarray(v, np.float32), rows).astype(np.float16)
                pend_v.append(x)
                pend_i.append(np.asarray(t.column("image_id").to_numpy(), np.int64))
                pend_m.extend(pack_meta(rows))
                pend_bytes += x.nbytes
                inserted += t.num_rows
                if pend_bytes >= INSERT_FRAME_BYTES:
                    flush()
            flush()
            if ops:
                with UpdateLog.open(wal_path(index_dir, st.generation), st.generation) as wal:
                    end = wal.append(ops)
                del ops
                crash_point("insert.logged")
                live.refresh()  # applies the new rows, extending the delta graph
                assert live.state.wal_end == end
            # the checkpoint: also after a rerun that found the rows logged by a killed run
            g = live.state.delta.graph
            cp_path = delta_checkpoint_path(index_dir, st.generation)
            cp = DeltaGraph.load(cp_path)
            if g.degrees.size and (cp is None or cp.degrees.shape[0] != g.degrees.shape[0]):
                g.save(cp_path)
                crash_point("insert.checkpoint")
            counts = live.counts()
            need = limits is not None and _needs_consolidation(live, limits)
        finally:
            live.close()
        out: dict[str, Any] = {"inserted": inserted, "skipped": skipped, **counts,
                               "seconds": round(time.perf_counter() - t0, 3)}
        memory = limits.memory if limits else 0
        log.info("insert", extra={k: v for k, v in out.items() if k != "seconds"})
        metrics.record("memescale_update_rows", inserted, outcome="inserted")
        metrics.record("memescale_update_rows", skipped, outcome="skipped")
        metrics.record("memescale_update_seconds", out["seconds"], op="insert")
        if need:
            out["consolidation"] = _consolidate_locked(index_dir, threads, memory)
        return out


# ------------------------------------------------------------------------------ delete


def parse_ids(lines: Sequence[str]) -> tuple[np.ndarray, int]:
    """Image ids to delete from lines of a file: an all-digit line is an image id; a post id
    (base 36, optionally ``t3_``-prefixed; write an all-digit post id as ``t3_<id>``) stands
    for its images 0..POST_IMAGES-1. Blank lines and ``#`` comments are skipped. Returns
    (sorted distinct int64 image ids, number of post ids). ValueError names a bad line."""
    ids: list[int] = []
    posts = 0
    for no, raw in enumerate(lines, 1):
        s = raw.strip()
        if not s or s.startswith("#"):
            continue
        if s.isdigit():
            v = int(s)
            if v >= 2**63:
                raise ValueError(f"line {no}: image id {s} is out of range")
            ids.append(v)
            continue
        m = _POST_ID.match(s.lower())
        if not m:
            raise ValueError(f"line {no}: {s!r} is neither an image id nor a post id")
        posts += 1
        ids.extend(post_image_id(m.group(1), i) for i in range(POST_IMAGES))
    return np.unique(np.asarray(ids, np.int64)), posts


def delete_ids(index_dir: str | os.PathLike, image_ids: np.ndarray, limits: UpdateLimits | None = None,
               threads: int | None = None) -> dict[str, Any]:
    """Delete images by id (see `parse_ids`): one logged transaction, durable on return.
    Returns counts: requested, found (live images removed now), delta, and whether a
    consolidation ran. Ids not in the index are remembered too: a later insert skips them."""
    t0 = time.perf_counter()
    index_dir = Path(index_dir)
    ids = np.unique(np.asarray(image_ids, np.int64))
    with update_lock(index_dir):
        live = LiveIndex.open(index_dir, threads=threads)
        try:
            gen = live.generation
            found = int((live.nodes_of(ids) >= 0).sum()) if ids.size else 0
            new = ids[~np.isin(ids, live.state.deleted_ids)]
            if new.size:
                with UpdateLog.open(wal_path(index_dir, gen), gen) as wal:
                    wal.append([{"op": "delete", "image_ids": new.astype("<i8").tobytes()}])
                crash_point("delete.logged")
                live.refresh()
            counts = live.counts()
            need = limits is not None and _needs_consolidation(live, limits)
        finally:
            live.close()
        out: dict[str, Any] = {"requested": int(ids.size), "found": found, **counts,
                               "seconds": round(time.perf_counter() - t0, 3)}
        memory = limits.memory if limits else 0
        log.info("delete", extra={k: v for k, v in out.items() if k != "seconds"})
        metrics.record("memescale_update_rows", found, outcome="deleted")
        metrics.record("memescale_update_seconds", out["seconds"], op="delete")
        if need:
            out["consolidation"] = _consolidate_locked(index_dir, threads, memory)
        return out


# ------------------------------------------------------------------------------ consolidate


@njit(nogil=True, cache=True)
def _repair_block(r32, lay, lo, hi, deleted, newid, take, lists, counts):
    """FreshDiskANN's delete rule for the surviving nodes u in [lo, hi) of the old graph
    (read from the record file's int32 view r32 with layout vector lay): the new ids of u's
    surviving out-neighbours, then of the surviving out-neighbours (other than u) of its
    deleted ones (the first `take` of each deleted one's list: the closest, as robust_prune
    orders them), into lists[row] (row = u's rank among the block's survivors; at most
    lists.shape[1] ids, duplicates allowed); counts[row] = how many."""
    W = lists.shape[1]
    n = newid.shape[0]
    deg_off, nbr_off, R = lay[5], lay[6], lay[9]
    row = 0
    for u in range(lo, hi):
        if (deleted[u >> 3] >> (u & 7)) & 1:
            continue
        off = _record_offset(u, lay)
        deg = min(r32[(off + deg_off) >> 2], R)
        nb0 = (off + nbr_off) >> 2
        c = 0
        for t in range(deg):
            v = r32[nb0 + t]
            if v < 0 or v >= n:  # a damaged list (the survivors' records passed their CRC)
                continue
            if not (deleted[v >> 3] >> (v & 7)) & 1 and c < W:
                lists[row, c] = newid[v]
                c += 1
        for t in range(deg):
            v = r32[nb0 + t]
            if v < 0 or v >= n or not (deleted[v >> 3] >> (v & 7)) & 1:
                continue
            voff = _record_offset(v, lay)
            vdeg = min(r32[(voff + deg_off) >> 2], R, take)
            vb = (voff + nbr_off) >> 2
            for s in range(vdeg):
                w = r32[vb + s]
                if w < 0 or w >= n:  # a deleted node's record is never checked: guard its ids
                    continue
                if w != u and not (deleted[w >> 3] >> (w & 7)) & 1 and c < W:
                    lists[row, c] = newid[w]
                    c += 1
        counts[row] = c
        row += 1


class _MergedMetadata(Sequence):
    """The new generation's metadata in node order, decoded a slice at a time: the surviving
    nodes' (from the old records), then the live delta rows'."""

    def __init__(self, live: LiveIndex, survivors: np.ndarray, delta_rows: np.ndarray):
        self.live, self.survivors, self.delta_rows = live, survivors, delta_rows

    def __len__(self) -> int:
        return int(self.survivors.size + self.delta_rows.size)

    def __getitem__(self, item):
        if not isinstance(item, slice):
            return self[item:item + 1][0]
        lo, hi, _ = item.indices(len(self))
        ns = self.survivors.size
        out = self.live.state.base.metadata(self.survivors[lo:min(hi, ns)]) if lo < ns else []
        st = self.live.state
        for r in self.delta_rows[max(lo, ns) - ns:max(hi, ns) - ns].tolist():
            out.append(decode_metadata(self.live.index_dir, st.delta.meta[r]))
        return out


def consolidate(index_dir: str | os.PathLike, threads: int | None = None, memory: int = 0) -> dict[str, Any]:
    """Fold the log into a new generation and switch to it (module doc); a no-op (apart
    from collecting garbage) when the log holds nothing. `memory`: the RAM it may use (0:
    unchecked); MemoryError before anything is written when `consolidation_memory` is over
    it. Returns what it did, with the declared memory (`consolidation_memory`) and the
    measured peak anonymous memory of the process and its growth during the call."""
    with update_lock(index_dir):
        return _consolidate_locked(Path(index_dir), threads, memory)


def _consolidate_locked(index_dir: Path, threads: int | None, memory: int = 0,
                        block: int = CONSOLIDATE_BLOCK) -> dict[str, Any]:
    with PeakRssAnon() as rss:
        out = _consolidate(index_dir, threads, memory, block)
    out.update(peak_rss_anon=rss.peak_bytes, rss_anon_growth=rss.peak_bytes - rss.start_bytes)
    log.info("consolidated" if out["consolidated"] else "nothing to consolidate", extra=out)
    if out["consolidated"]:
        metrics.record("memescale_update_seconds", out["seconds"], op="consolidate")
    return out


def _consolidate(index_dir: Path, threads: int | None, memory: int, block: int) -> dict[str, Any]:
    t0 = time.perf_counter()
    threads = resolve_threads(threads)
    live = LiveIndex.open(index_dir, threads=threads)
    try:
        st = live.state
        base = st.base
        gen = st.generation
        if st.delta.vectors.shape[0] == 0 and st.n_base_deleted == 0:
            removed = collect_garbage(index_dir)
            return {"consolidated": False, "generation": gen, "garbage_removed": len(removed)}
        new_gen = gen + 1
        name = generation_dir_name(new_gen)
        out_dir = index_dir / name
        tmp_dir = index_dir / (name + ".tmp")
        work = index_dir / UPDATES_DIR / f"work-{new_gen:06d}"
        for p in (tmp_dir, out_dir, work):  # leftovers of a killed attempt
            shutil.rmtree(p, ignore_errors=True)
        work.mkdir(parents=True)
        info = dict(base.info)
        R, L, alpha = base.layout.R, int(info.get("L", 100)), float(info.get("alpha", 1.2))
        n, dim = st.n_base, base.dim
        delta_bytes = st.delta.vectors.nbytes + st.delta.graph.neighbours.nbytes + sum(map(len, st.delta.meta))
        need = consolidation_memory(n + st.delta.vectors.shape[0], base.codec.M, delta_bytes, dim, R, block)
        if memory and need > memory:
            raise MemoryError(f"consolidating {n + st.delta.vectors.shape[0]:,} nodes needs about {need / 2**30:.1f} "
                              f"GiB of RAM, over index.build_memory = {memory / 2**30:.1f} GiB")
        bits = np.unpackbits(st.base_deleted, bitorder="little")[:n].astype(bool)
        alive = ~bits
        del bits
        newid = (np.cumsum(alive, dtype=np.int64) - 1).astype(np.int32)  # valid where alive
        n_surv = int(alive.sum())
        delta_rows = np.flatnonzero(~st.delta_deleted)
        n_new = n_surv + delta_rows.size
        if n_new == 0:
            raise ValueError("the consolidation would leave an empty index: every image is deleted")
        log.info("consolidating", extra={"generation": new_gen, "survivors": n_surv, "inserted": int(delta_rows.size),
                                         "deleted": n - n_surv})

        # (1) vectors in new order
        X = np.lib.format.open_memmap(work / "vectors.npy", mode="w+", dtype=np.float16, shape=(n_new, dim))
        survivors = np.flatnonzero(alive).astype(np.int32)
        rows = _row_block(dim)
        for lo in range(0, n_surv, rows):
            X[lo:min(n_surv, lo + rows)] = base.vectors(survivors[lo:lo + rows])
        X[n_surv:] = st.delta.vectors[delta_rows]
        X.flush()
        crash_point("consolidate.vectors")
        Xu = X.view(np.uint16)
        norms = vector_norms(Xu, threads)
        t_vectors = time.perf_counter()

        # (2) delete repair, blockwise over old ids, into the new graph
        graph = np.lib.format.open_memmap(work / "graph.npy", mode="w+", dtype=np.int32, shape=(n_new, R))
        degrees = np.zeros(n_new, np.int32)
        width = REPAIR_EXPAND * R
        lay = base.layout.as_array()
        from concurrent.futures import ThreadPoolExecutor
        with ThreadPoolExecutor(threads) as pool:
            for lo in range(0, n, block):
                hi = min(n, lo + block)
                m = int(alive[lo:hi].sum())
                if m == 0:
                    continue
                lists = np.full((m, width), -1, np.int32)
                counts = np.zeros(m, np.int32)
                _repair_block(base._r32, lay, lo, hi, st.base_deleted, newid, max(1, R // REPAIR_TAKE), lists,
                              counts)
                row0 = int(newid[lo:hi][alive[lo:hi]][0])
                prune_rows(Xu, norms, lists, counts, row0, R, alpha, graph[row0:row0 + m], degrees[row0:row0 + m],
                           threads, pool)
            graph[n_surv:] = -1
        crash_point("consolidate.repaired")
        t_repair = time.perf_counter()

        # (3) inserts: search the repaired graph from the medoid for each delta row
        # the start (and entry point) among the survivors: an inserted node has no out-list yet
        medoid = find_medoid(X[:n_surv] if n_surv else X)
        if delta_rows.size:
            refine_graph(X, graph, degrees, medoid, L=int(L * INSERT_L_FACTOR), alpha=alpha, seed=new_gen, threads=threads,
                         points=np.arange(n_surv, n_new, dtype=np.int32), overwrite=True,
                         max_batch=max(INSERT_BATCH_MIN, int(delta_rows.size) // INSERT_BATCHES),
                         work_graph=work / "work_graph.npy", progress=False)
        graph.flush()
        crash_point("consolidate.inserted")
        t_insert = time.perf_counter()

        # (4) PQ codes
        codes = np.lib.format.open_memmap(work / "codes.npy", mode="w+", dtype=np.uint8, shape=(n_new, base.codec.M))
        for lo in range(0, n_surv, rows):
            codes[lo:min(n_surv, lo + rows)] = base.codes[survivors[lo:lo + rows]]
        if delta_rows.size:
            base.codec.encode(X[n_surv:], threads=threads, block=rows, out=codes[n_surv:])
        codes.flush()
        crash_point("consolidate.codes")

        # (5) the generation's files, then the switch
        meta = _MergedMetadata(live, survivors, delta_rows)
        params = IndexParams(R=R, L=L, alpha=alpha, pq_bytes=base.codec.M, seed=int(info.get("seed", 0)))
        extra = {k: v for k, v in info.items() if k not in build_info(params, base.codec)}  # written anew
        extra.update(generation=new_gen, medoid=int(medoid))
        ws = write_built_index(tmp_dir, X, (graph, degrees), base.codec, codes, meta, np.array([medoid]), params,
                               **extra)
        base.weighting.save(tmp_dir)
        crash_point("consolidate.written")
        fsync_tree(tmp_dir)
        os.replace(tmp_dir, out_dir)
        fsync_dir(index_dir)
        crash_point("consolidate.renamed")
        history = st.deleted_ids
        write_hist = deleted_history_path(index_dir, new_gen)
        tmp_hist = write_hist.with_name(write_hist.name + ".tmp.npy")
        np.save(tmp_hist, history)
        with open(tmp_hist, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp_hist, write_hist)
        crash_point("consolidate.history")
        import json
        write_durably(index_dir / CURRENT_FILE, json.dumps({"generation": new_gen, "dir": name}).encode())
        crash_point("consolidate.switched")
        t_switch = time.perf_counter()
    finally:
        live.close()
    del X, graph, codes
    shutil.rmtree(work, ignore_errors=True)
    removed = collect_garbage(index_dir)
    out = {"consolidated": True, "generation": new_gen, "nodes": n_new, "removed": n - n_surv,
           "inserted": int(delta_rows.size), "vectors_s": round(t_vectors - t0, 3), "repair_s": round(t_repair - t_vectors, 3),
           "insert_s": round(t_insert - t_repair, 3), "write_s": round(t_switch - t_insert, 3),
           "seconds": round(time.perf_counter() - t0, 3), "bytes": ws.bytes_written,
           "garbage_removed": len(removed), "declared_memory": need}
    return out

