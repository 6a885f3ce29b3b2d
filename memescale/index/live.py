"""`LiveIndex`: a disk index plus the inserts and deletes made since it was written.

FreshDiskANN's scheme (Singh et al., arXiv 2105.09613). An index folder has a current
generation (`disk.current_generation`: the files as built, or a consolidated
``gen-<g>/``), and on top of it the generation's update log (`wal.py`):

- inserted vectors form the *delta*: held in RAM (D x dim fp16 + their metadata blobs) with
  a small in-memory Vamana graph over them, extended insert by insert (`extend_delta_graph`,
  FreshDiskANN's insert: greedy search + robust prune + reverse edges), and their filter
  labels (`labels.LABEL_DTYPE`; a subreddit the generation has never seen gets an id after
  its vocabulary's, `LiveLabels`), so hard filters hold for fresh rows too. The graph is
  derived state: the insert command saves it to ``updates/delta-<g>.npz`` tagged with the
  log offset it covers, and an opener rebuilds whatever that checkpoint does not cover;
- deleted image ids are tombstones: an exclusion bitmap over the generation's nodes
  (N / 8 bytes) that the beam search traverses but never returns, and a mask over the delta.

Search runs the disk index (with the bitmap) and the delta (exact distances: the delta graph,
or under a label filter matching few delta rows, all of them) and merges the two top-k lists
by inner product. Node ids: the generation's nodes are 0..N-1,
delta rows N..N+D-1 in log order; both change at a consolidation, the ``image_id`` in the
metadata does not (`nodes_of` maps it back).

Consolidation (`memescale.index.update.consolidate`) folds the delta and the tombstones into
generation g+1 and switches ``CURRENT``; `refresh` follows the log and the switch, so a
long-lived `LiveIndex` (the Serve searcher) sees every committed update within one refresh
period. Each state it opens holds a shared `flock` on its generation's ``LEASE`` file, and
searches in flight keep their state alive: a retired generation is closed only after its
last search returns, and its files are deleted (`collect_garbage`) only when no process
holds its lease.

RAM: the disk index's (PQ codes, cache, labels) + N / 8 bytes of tombstones + the delta (D x
(2 dim + 4 R + 16) bytes + metadata) + the deleted image ids (8 B each).
"""

from __future__ import annotations

import fcntl
import logging
import os
import shutil
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import msgpack
import numpy as np
from numba import njit

from ..crashpoints import crash_point
from ..durable import fsync_dir
from .disk import CURRENT_FILE, IndexFormatError, current_generation, decode_metadata
from .kernels import parallel_for, resolve_threads, squared_norms
from .labels import LABEL_DTYPE, NO_FILTER, LabelFilter, NodeLabels, label_row
from .search import BEAM_WIDTH, Index, SearchStats, exclusion_bitmap, matching_nodes
from .vamana import VISIT_TABLE, build_vamana, greedy_search, refine_graph
from .wal import read_committed, wal_path

log = logging.getLogger(__name__)

UPDATES_DIR = "updates"
LEASE_FILE = "LEASE"
GEN_PREFIX = "gen-"
DELTA_R = 32  # out-degree of the delta graph
DELTA_L = 64  # its construction list size
DELTA_FILTER_SCAN = 20_000  # a filtered delta search scores all matching rows when at most this many
DELTA_FILTER_L_MAX = 2_000  # else its list size: L / (the filter's share of the delta), at most this


def delta_checkpoint_path(index_dir: str | os.PathLike, generation: int) -> Path:
    return Path(index_dir) / UPDATES_DIR / f"delta-{generation:06d}.npz"


def deleted_history_path(index_dir: str | os.PathLike, generation: int) -> Path:
    """updates/deleted-<g>.npy: sorted int64 image ids deleted before generation g was made."""
    return Path(index_dir) / UPDATES_DIR / f"deleted-{generation:06d}.npy"


def generation_dir_name(generation: int) -> str:
    return "." if generation == 0 else f"{GEN_PREFIX}{generation:06d}"


# ------------------------------------------------------------------------------ delta graph


@dataclass
class DeltaGraph:
    """The in-memory graph over the delta's vectors: neighbours (D, R) int32 (-1 padded),
    degrees (D,) int32, the start node, and `covered`: the log offset it is complete for."""

    neighbours: np.ndarray
    degrees: np.ndarray
    start: int
    covered: int

    def save(self, path: Path) -> None:
        tmp = path.with_name(path.name + ".tmp.npz")
        np.savez(tmp, neighbours=self.neighbours, degrees=self.degrees, start=np.int64(self.start),
                 covered=np.int64(self.covered))
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        crash_point("delta.saved_tmp")
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: Path) -> DeltaGraph | None:
        """The checkpoint at `path` if it is readable and consistent; else None."""
        try:
            with np.load(path) as z:
                g = cls(z["neighbours"], z["degrees"], int(z["start"]), int(z["covered"]))
        except (OSError, ValueError, KeyError):
            return None
        d = g.degrees.shape[0]
        if g.neighbours.shape[0] != d or (d and not 0 <= g.start < d):
            return None
        return g


def extend_delta_graph(vectors: np.ndarray, graph: DeltaGraph | None, covered: int, threads: int | None = None,
                       R: int = DELTA_R, L: int = DELTA_L, alpha: float = 1.2) -> DeltaGraph:
    """The delta graph over all of `vectors` (D, d) fp16: `graph` (over the first rows) with
    the rows it lacks inserted (greedy search, robust prune, reverse edges), or built from
    scratch when there is none. O(new rows * (L + R) * R * d)."""
    D = vectors.shape[0]
    have = 0 if graph is None else graph.degrees.shape[0]
    if D == 0:
        return DeltaGraph(np.zeros((0, R), np.int32), np.zeros(0, np.int32), 0, covered)
    if have == D and graph is not None:
        return DeltaGraph(graph.neighbours, graph.degrees, graph.start, covered)
    if graph is None or have < 2:
        nb, deg, start = build_vamana(vectors, R, L, alpha, seed=0, threads=threads, progress=False)
        return DeltaGraph(nb, deg, int(start), covered)
    nb = np.full((D, graph.neighbours.shape[1]), -1, np.int32)
    nb[:have] = graph.neighbours
    deg = np.zeros(D, np.int32)
    deg[:have] = graph.degrees
    nb, deg = refine_graph(vectors, nb, deg, graph.start, L=L, alpha=alpha, seed=have, threads=threads,
                           points=np.arange(have, D, dtype=np.int32), progress=False)
    return DeltaGraph(nb, deg, graph.start, covered)


@njit(nogil=True, cache=True)
def _delta_search(X, norms, graph, degrees, start, Q, L, deleted, out_ids, out_scores):
    """Top-k by inner product of each query over the delta graph: greedy_search with list
    size L, then the visited nodes not `deleted` ranked by exact score. Q: (nq, d) float32;
    writes out_ids (nq, k) int64 (-1 past the end) and out_scores (nq, k) float32."""
    k = out_ids.shape[1]
    vis = np.zeros(VISIT_TABLE, np.int64)
    for i in range(Q.shape[0]):
        q = Q[i]
        qn = np.float32(0.0)
        for j in range(q.shape[0]):
            qn += q[j] * q[j]
        ids, d, vis = greedy_search(X, norms, graph, degrees, start, q, qn, L, vis, i + 1)
        sc = np.empty(ids.shape[0], np.float32)
        for t in range(ids.shape[0]):
            sc[t] = -np.inf if deleted[ids[t]] else (qn + norms[ids[t]] - d[t]) * np.float32(0.5)
        order = np.argsort(-sc, kind="mergesort")
        for t in range(k):
            if t < order.shape[0] and sc[order[t]] > -np.inf:
                out_ids[i, t] = ids[order[t]]
                out_scores[i, t] = sc[order[t]]
            else:
                out_ids[i, t] = -1
                out_scores[i, t] = -np.inf


def _exact_top(vectors: np.ndarray, rows: np.ndarray, Q: np.ndarray, out_ids: np.ndarray, out_scores: np.ndarray,
               block: int = 4096) -> None:
    """Exact top-k by inner product of queries Q (nq, d) float32 among `rows` of `vectors`
    (D, d) fp16, in blocks of `block` rows (memory O(block d + nq block)). Writes out_ids
    (nq, k) int64 (-1 past the end) and out_scores (nq, k) float32."""
    k = out_ids.shape[1]
    out_ids[:] = -1
    out_scores[:] = -np.inf
    for lo in range(0, rows.size, block):
        r = rows[lo:lo + block]
        sc = Q @ vectors[r].astype(np.float32).T
        all_ids = np.concatenate([out_ids, np.broadcast_to(r, sc.shape)], axis=1)
        all_sc = np.concatenate([out_scores, sc], axis=1)
        top = np.argsort(-all_sc, axis=1, kind="stable")[:, :k]
        out_ids[:] = np.take_along_axis(all_ids, top, 1)
        out_scores[:] = np.take_along_axis(all_sc, top, 1)


def _merge(ids, scores, did, dsc, n_base: int, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The top k of the generation's results and the delta's (rows -> node ids n_base + row)."""
    did = np.where(did >= 0, did + n_base, -1)
    all_ids = np.concatenate([ids, did], axis=1)
    all_sc = np.concatenate([scores, dsc], axis=1)
    order = np.argsort(-all_sc, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(all_ids, order, 1), np.take_along_axis(all_sc, order, 1)


class LiveLabels:
    """A generation's `NodeLabels` as the planner sees it while a delta serves: subreddit
    names only the delta has get ids after the generation's (they match no generation node,
    no members); everything else is the generation's."""

    def __init__(self, base: NodeLabels, new_subs: dict[str, int]):
        self.base = base
        self.new_subs = new_subs
        self.sub_counts = (np.concatenate([base.sub_counts, np.zeros(len(new_subs), np.int64)]) if new_subs
                           else base.sub_counts)

    def __getattr__(self, name):
        return getattr(self.base, name)

    def filter(self, allow_nsfw: bool = True, after: int | None = None, before: int | None = None,
               include: frozenset[str] | None = None, exclude: frozenset[str] | None = None,
               min_score: int | None = None) -> LabelFilter:
        """`NodeLabels.filter`, knowing the delta's subreddit names too."""
        flt = self.base.filter(allow_nsfw, after, before, include, exclude, min_score)
        names = include if include is not None else exclude
        extra = [self.new_subs[s] for s in names or () if s in self.new_subs]
        if not extra or not flt.active:
            return flt
        return flt._replace(sub_ids=np.union1d(flt.sub_ids, np.asarray(extra, np.int32)).astype(np.int32))

    def selectivity(self, flt: LabelFilter) -> float:
        """The generation's share of nodes meeting `flt`."""
        n = len(self.base.sub_counts)
        return self.base.selectivity(flt._replace(sub_ids=flt.sub_ids[flt.sub_ids < n]) if flt.active else flt)

    def members(self, sub: int) -> np.ndarray:
        """The generation's nodes of subreddit id `sub` (none for a name only the delta has)."""
        return self.base.members(sub) if sub < len(self.base.sub_counts) else np.zeros(0, np.int32)


# ------------------------------------------------------------------------------ state


@dataclass
class Delta:
    """The rows inserted since the generation was written, in log order."""

    vectors: np.ndarray  # (D, d) float16
    image_ids: np.ndarray  # (D,) int64
    meta: list[bytes]  # D msgpack blobs
    graph: DeltaGraph
    norms: np.ndarray  # (D,) float32 squared norms
    labels: np.ndarray  # (D,) LABEL_DTYPE filter labels
    new_subs: dict[str, int]  # subreddits not in the generation's vocabulary -> their ids (after it)
    id_order: np.ndarray = field(init=False)  # (D,) int64: rows by ascending image id (ties in log order)

    def __post_init__(self) -> None:
        # sorted once per state, not per lookup (`like` and every insert batch look ids up)
        self.id_order = np.argsort(self.image_ids, kind="stable")

    def rows_of(self, image_ids: np.ndarray) -> np.ndarray:
        """Delta rows (n,) int64 of `image_ids` (the first row where one is in it twice); -1 where absent."""
        keys = self.image_ids[self.id_order]
        pos = np.searchsorted(keys, image_ids)
        ok = pos < keys.size
        ok[ok] = keys[pos[ok]] == image_ids[ok]
        out = np.full(image_ids.shape[0], -1, np.int64)
        out[ok] = self.id_order[pos[ok]]
        return out

    @classmethod
    def empty(cls, dim: int, covered: int) -> Delta:
        return cls(np.zeros((0, dim), np.float16), np.zeros(0, np.int64), [],
                   DeltaGraph(np.zeros((0, DELTA_R), np.int32), np.zeros(0, np.int32), 0, covered),
                   np.zeros(0, np.float32), np.zeros(0, LABEL_DTYPE), {})


def _norms(X: np.ndarray) -> np.ndarray:
    out = np.empty(X.shape[0], np.float32)
    if X.shape[0]:
        squared_norms(X.view(np.uint16), 0, X.shape[0], out)
    return out


@dataclass
class State:
    """One consistent view: a generation plus its log up to `wal_end`. Immutable once
    published; `users` counts the searches running on it."""

    index_dir: Path
    generation: int
    base: Index
    lease: int  # fd holding the generation's LEASE shared
    wal_end: int
    delta: Delta
    base_deleted: np.ndarray  # (ceil(N / 8),) uint8 exclusion bitmap
    n_base_deleted: int
    delta_deleted: np.ndarray  # (D,) bool
    deleted_ids: np.ndarray  # sorted int64: every image id deleted (history + this log)
    users: int = 0
    retired: bool = False
    lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def n_base(self) -> int:
        return len(self.base)

    def close(self) -> None:
        self.base.close()
        if self.lease >= 0:
            os.close(self.lease)
            self.lease = -1


def _take_lease(gen_dir: Path) -> int:
    """A shared flock on the generation's LEASE (-1 where the folder is read-only and has
    none: nothing there can be collected anyway). FileNotFoundError when the folder is gone."""
    if not gen_dir.is_dir():
        raise FileNotFoundError(gen_dir)
    try:
        fd = os.open(gen_dir / LEASE_FILE, os.O_RDONLY | os.O_CREAT, 0o644)
    except PermissionError:
        try:
            fd = os.open(gen_dir / LEASE_FILE, os.O_RDONLY)
        except FileNotFoundError:
            return -1
    fcntl.flock(fd, fcntl.LOCK_SH)
    return fd


def _drop_lease(fd: int) -> None:
    if fd >= 0:
        os.close(fd)


def _delta_labels(index_dir: Path, blobs: list[bytes], base: NodeLabels, new_subs: dict[str, int]) -> np.ndarray:
    """(n,) LABEL_DTYPE labels of inserted rows from their metadata blobs; subreddits the
    generation does not know are added to `new_subs` with ids after its vocabulary's."""
    known = base.subreddits

    def sub_id(name: str) -> int:
        i = known.get(name)
        if i is None:
            i = new_subs.get(name)
            if i is None:
                i = new_subs[name] = len(known) + len(new_subs)
        return i

    return np.array([label_row(decode_metadata(index_dir, b), sub_id) for b in blobs], dtype=LABEL_DTYPE)


def _apply(state: State, ops: list[dict], end: int, threads: int | None, checkpoint: DeltaGraph | None) -> State:
    """A new state: `state` with the committed `ops` (read up to log offset `end`) applied."""
    n, dim = state.n_base, state.base.dim
    delta = state.delta
    new_vecs, new_ids, new_meta, dels = [], [], [], []
    for op in ops:
        ids = np.frombuffer(op["image_ids"], "<i8").astype(np.int64)
        if op["op"] == "insert":
            if int(op["dim"]) != dim:
                raise IndexFormatError(wal_path(state.index_dir, state.generation),
                                       f"insert of {op['dim']}-d vectors into a {dim}-d index")
            new_vecs.append(np.frombuffer(op["vectors"], "<f2").reshape(-1, dim))
            new_ids.append(ids)
            new_meta.extend(op["meta"])
        else:
            dels.append(ids)
    if new_vecs:
        vecs = np.concatenate([delta.vectors, *new_vecs])
        image_ids = np.concatenate([delta.image_ids, *new_ids])
        meta = delta.meta + new_meta
        graph = checkpoint if checkpoint is not None and checkpoint.degrees.shape[0] == vecs.shape[0] else None
        if graph is None:
            base_graph = checkpoint if checkpoint is not None and checkpoint.degrees.shape[0] > delta.vectors.shape[0] \
                else delta.graph
            graph = extend_delta_graph(vecs, base_graph, end, threads)
        graph.covered = end
        new_subs = dict(delta.new_subs)
        labels = _delta_labels(state.index_dir, new_meta, state.base.labels, new_subs)
        delta = Delta(vecs, image_ids, meta, graph, np.concatenate([delta.norms, _norms(np.concatenate(new_vecs))]),
                      np.concatenate([delta.labels, labels]), new_subs)
    base_deleted, n_del = state.base_deleted, state.n_base_deleted
    delta_deleted = np.concatenate([state.delta_deleted, np.zeros(delta.vectors.shape[0] - state.delta_deleted.shape[0],
                                                                   bool)])
    deleted_ids = state.deleted_ids
    if dels:
        d = np.unique(np.concatenate(dels))
        deleted_ids = np.union1d(deleted_ids, d)
        nodes = state.base.nodes_of(d)
        nodes = nodes[nodes >= 0]
        if nodes.size:
            base_deleted = base_deleted.copy()
            np.bitwise_or.at(base_deleted, nodes >> 3, (1 << (nodes & 7)).astype(np.uint8))
            n_del = int(np.unpackbits(base_deleted, bitorder="little")[:n].sum())
    if delta.image_ids.size and deleted_ids.size:
        delta_deleted = delta_deleted | np.isin(delta.image_ids, deleted_ids)
    return State(state.index_dir, state.generation, state.base, state.lease, end, delta, base_deleted, n_del,
                 delta_deleted, deleted_ids)


def open_state(index_dir: Path, threads: int | None, io: str, cache_nodes: int) -> State:
    """The current generation with its whole committed log applied."""
    for _ in range(5):  # a consolidation may switch generations between reading CURRENT and opening
        gen, gen_dir = current_generation(index_dir)
        try:
            lease = _take_lease(gen_dir)
        except FileNotFoundError:
            continue
        try:
            base = _open_base(gen_dir, threads, io, cache_nodes)
        except IndexFormatError:
            _drop_lease(lease)
            if current_generation(index_dir)[0] != gen:
                continue
            raise
        except BaseException:
            _drop_lease(lease)
            raise
        break
    else:
        raise IndexFormatError(index_dir / CURRENT_FILE, "the generation kept changing while opening")
    try:
        hist_path = deleted_history_path(index_dir, gen)
        history = np.load(hist_path) if hist_path.exists() else np.zeros(0, np.int64)
        n = len(base)
        state = State(index_dir, gen, base, lease, 0, Delta.empty(base.dim, 0), exclusion_bitmap(n), 0,
                      np.zeros(0, bool), np.asarray(history, np.int64))
        committed = read_committed(wal_path(index_dir, gen), 0, gen)
        checkpoint = DeltaGraph.load(delta_checkpoint_path(index_dir, gen))
        if checkpoint is not None and checkpoint.covered > committed.end:
            checkpoint = None
        return _apply(state, committed.ops, committed.end, threads, checkpoint)
    except BaseException:
        base.close()
        _drop_lease(lease)
        raise


def _open_base(gen_dir: Path, threads: int | None, io: str, cache_nodes: int) -> Index:
    # Index.open follows CURRENT; a generation folder is opened as it is
    return Index(gen_dir, threads, cache_nodes, True, None, io)


# ------------------------------------------------------------------------------ LiveIndex


class LiveIndex:
    """A searchable index folder with its updates (module doc). Thread-safe: searches may
    run from several threads while another calls `refresh`."""

    def __init__(self, index_dir: Path, threads: int | None, io: str, cache_nodes: int):
        self.index_dir = index_dir
        self.threads = resolve_threads(threads)
        self.io = io
        self.cache_nodes = cache_nodes
        self._lock = threading.Lock()
        self._refresh_lock = threading.Lock()
        self._state = open_state(index_dir, threads, io, cache_nodes)
        self._retired: list[State] = []
        self._pool: ThreadPoolExecutor | None = None  # delta searches of large batches

    @classmethod
    def open(cls, index_dir: str | os.PathLike, threads: int | None = None, io: str = "mmap",
             cache_nodes: int = 1024) -> LiveIndex:
        """Open the index folder's current generation and apply its committed updates."""
        return cls(Path(index_dir), threads, io, cache_nodes)

    # -- state handling

    def _acquire(self) -> State:
        with self._lock:
            st = self._state
            st.users += 1
            return st

    def _release(self, st: State) -> None:
        with self._lock:
            st.users -= 1
            close = st.retired and st.users == 0 and st is not self._state
            if close:
                self._retired.remove(st)
        if close:
            st.close()

    def _publish(self, new: State) -> None:
        with self._lock:
            old = self._state
            self._state = new
            if old.base is not new.base:
                old.retired = True
                if old.users == 0:
                    old.close()
                else:
                    self._retired.append(old)

    def refresh(self) -> bool:
        """Take in what was committed since the last look: a new generation, log entries.
        True when something changed. Searches keep running meanwhile."""
        with self._refresh_lock:
            st = self._state
            gen, _ = current_generation(self.index_dir)
            if gen != st.generation:
                self._publish(open_state(self.index_dir, self.threads, self.io, self.cache_nodes))
                return True
            committed = read_committed(wal_path(self.index_dir, gen), st.wal_end, gen)
            if committed.end == st.wal_end:
                return False
            checkpoint = None
            if any(op["op"] == "insert" for op in committed.ops):
                checkpoint = DeltaGraph.load(delta_checkpoint_path(self.index_dir, gen))
                if checkpoint is not None and checkpoint.covered != committed.end:
                    checkpoint = None
            self._publish(_apply(st, committed.ops, committed.end, self.threads, checkpoint))
            return True

    @property
    def state(self) -> State:
        """The current state (do not keep it across a `refresh`)."""
        return self._state

    @contextmanager
    def snapshot(self) -> Iterator[LiveView]:
        """A `LiveView` of the current state, kept alive (not closed by a switch) until the
        block ends: node ids from its `search` mean the same in its `metadata`, `vectors`."""
        st = self._acquire()
        try:
            yield LiveView(self, st)
        finally:
            self._release(st)

    # -- the IndexLike surface, each call on the state current when it starts

    @property
    def dim(self) -> int:
        return self._state.base.dim

    @property
    def weighting(self):
        return self._state.base.weighting

    @property
    def generation(self) -> int:
        return self._state.generation

    def __len__(self) -> int:
        return len(LiveView(self, self._state))

    @property
    def live_count(self) -> int:
        return LiveView(self, self._state).live_count

    def counts(self) -> dict[str, int]:
        return LiveView(self, self._state).counts()

    def search(self, queries: np.ndarray, k: int, L: int, beam_width: int = BEAM_WIDTH,
               io_budget: int | None = None) -> tuple[np.ndarray, np.ndarray, SearchStats]:
        """`LiveView.search` on the current state. Its ids are only meaningful until the
        next `refresh`: use `snapshot` to search and read results consistently."""
        with self.snapshot() as v:
            return v.search(queries, k, L, beam_width, io_budget)

    def vectors(self, ids) -> np.ndarray:
        with self.snapshot() as v:
            return v.vectors(ids)

    def metadata(self, ids) -> list[dict]:
        with self.snapshot() as v:
            return v.metadata(ids)

    def nodes_of(self, image_ids) -> np.ndarray:
        with self.snapshot() as v:
            return v.nodes_of(image_ids)

    def _delta_pool(self) -> ThreadPoolExecutor:
        with self._lock:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(self.threads, thread_name_prefix="delta-search")
            return self._pool

    def close(self) -> None:
        with self._lock:
            states = [self._state, *self._retired]
            self._retired = []
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown()
        for st in states:
            st.close()

    def __enter__(self) -> LiveIndex:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class LiveView:
    """One state of a `LiveIndex` (`LiveIndex.snapshot`): the index as it was at one moment,
    with the IndexLike surface the search engine uses."""

    def __init__(self, owner: LiveIndex, st: State):
        self.owner = owner
        self.st = st

    @property
    def dim(self) -> int:
        return self.st.base.dim

    @property
    def weighting(self):
        return self.st.base.weighting

    def __len__(self) -> int:
        """Size of the node id space (deleted nodes included): N + D."""
        return self.st.n_base + self.st.delta.vectors.shape[0]

    @property
    def live_count(self) -> int:
        """Searchable nodes: not deleted."""
        st = self.st
        return st.n_base - st.n_base_deleted + int((~st.delta_deleted).sum())

    def counts(self) -> dict[str, int]:
        st = self.st
        return {"generation": st.generation, "base": st.n_base, "base_deleted": st.n_base_deleted,
                "delta": int(st.delta.vectors.shape[0]), "delta_deleted": int(st.delta_deleted.sum()),
                "live": self.live_count, "deleted_ids": int(st.deleted_ids.size)}

    @property
    def degree(self) -> int:
        return self.st.base.layout.R

    @property
    def labels(self) -> LiveLabels:
        """The generation's labels, with the subreddit names only the delta has."""
        return LiveLabels(self.st.base.labels, self.st.delta.new_subs)

    def scan(self, queries: np.ndarray, members: np.ndarray, k: int, flt: LabelFilter = NO_FILTER,
             rerank: int = 0, member_flt: LabelFilter | None = None) -> tuple[np.ndarray, np.ndarray, SearchStats]:
        """`Index.scan` over the generation's live members (`member_flt` as there), merged with
        a delta search under the whole of `flt`."""
        st = self.st
        m = np.asarray(members, np.int64)
        if st.n_base_deleted and m.size:
            m = m[((st.base_deleted[m >> 3] >> (m & 7)) & 1) == 0]
        return self._with_delta(st.base.scan(queries, m, k, flt, rerank, member_flt), queries, k, 2 * k, flt)

    def search(self, queries: np.ndarray, k: int, L: int, beam_width: int = BEAM_WIDTH,
               io_budget: int | None = None, flt: LabelFilter = NO_FILTER, starts: np.ndarray | None = None,
               mismatch: float = 0.0) -> tuple[np.ndarray, np.ndarray, SearchStats]:
        """`Index.search` over the generation (deleted nodes excluded, `flt`, `starts` and `mismatch` as there) and the
        delta, merged: ids (nq, k) int64 in this state's id space (module doc), scores (nq, k)
        float32. The delta's rows meet `flt` too (module doc)."""
        st = self.st
        exclude = st.base_deleted if st.n_base_deleted else None
        return self._with_delta(st.base.search(queries, k, L, beam_width, io_budget, exclude=exclude, flt=flt,
                                               starts=starts, mismatch=mismatch),
                                queries, k, L, flt)

    def _with_delta(self, found, queries, k, L, flt: LabelFilter = NO_FILTER):
        st = self.st
        ids, scores, stats = found
        D = st.delta.vectors.shape[0]
        if D == 0 or st.delta_deleted.all():
            return ids, scores, stats
        Q = np.ascontiguousarray(st.base.weighting.index_queries(queries), np.float32)
        did = np.empty((Q.shape[0], k), np.int64)
        dsc = np.empty((Q.shape[0], k), np.float32)
        hidden, L = st.delta_deleted, max(int(L), k)
        if flt.active:
            rows = matching_nodes(np.flatnonzero(~st.delta_deleted), flt, st.delta.labels)
            if rows.size <= DELTA_FILTER_SCAN:
                _exact_top(st.delta.vectors, rows, Q, did, dsc)
                return _merge(ids, scores, did, dsc, st.n_base, k) + (stats,)
            hidden = np.ones(D, bool)
            hidden[rows] = False
            L = min(max(L, int(np.ceil(L * D / rows.size))), max(DELTA_FILTER_L_MAX, L))
        g = st.delta.graph
        X = st.delta.vectors.view(np.uint16)

        def part(lo: int, hi: int) -> None:
            _delta_search(X, st.delta.norms, g.neighbours, g.degrees, g.start, Q[lo:hi], L, hidden, did[lo:hi],
                          dsc[lo:hi])

        threads = max(1, min(self.owner.threads, Q.shape[0] // 8))
        parallel_for(part, Q.shape[0], threads, self.owner._delta_pool() if threads > 1 else None)
        return _merge(ids, scores, did, dsc, st.n_base, k) + (stats,)

    def _split(self, ids) -> tuple[np.ndarray, np.ndarray]:
        a = np.asarray(ids, np.int64).ravel()
        if a.size and (a.min() < 0 or a.max() >= len(self)):
            raise IndexError(f"node ids must be in [0, {len(self)})")
        return a, a < self.st.n_base

    def vectors(self, ids) -> np.ndarray:
        """fp16 vectors (n, d) of node ids (n,)."""
        st = self.st
        a, in_base = self._split(ids)
        out = np.empty((a.size, st.base.dim), np.float16)
        if in_base.any():
            out[in_base] = st.base.vectors(a[in_base])
        if (~in_base).any():
            out[~in_base] = st.delta.vectors[a[~in_base] - st.n_base]
        return out

    def metadata(self, ids) -> list[dict]:
        """Metadata dicts of node ids ({} where none was given)."""
        st = self.st
        a, in_base = self._split(ids)
        base = iter(st.base.metadata(a[in_base])) if in_base.any() else iter(())
        return [next(base) if b else decode_metadata(st.index_dir, st.delta.meta[u - st.n_base])
                for u, b in zip(a.tolist(), in_base.tolist())]

    def nodes_of(self, image_ids) -> np.ndarray:
        """Node ids (n,) int64 of live (not deleted) images by `image_id`; -1 where none."""
        st = self.st
        q = np.asarray(image_ids, np.int64).ravel()
        out = st.base.nodes_of(q)
        hit = np.flatnonzero(out >= 0)
        if st.n_base_deleted and hit.size:
            u = out[hit]
            out[hit[((st.base_deleted[u >> 3] >> (u & 7)) & 1).astype(bool)]] = -1
        miss = np.flatnonzero(out < 0)
        if miss.size and st.delta.image_ids.size:
            rows = st.delta.rows_of(q[miss])
            found = rows >= 0
            live = found.copy()
            live[found] = ~st.delta_deleted[rows[found]]
            out[miss[live]] = rows[live] + st.n_base
        return out


# ------------------------------------------------------------------------------ garbage


def collect_garbage(index_dir: str | os.PathLike) -> list[str]:
    """Delete the files of generations other than the current one that no process holds
    (their LEASE can be locked exclusively), and the logs, checkpoints and histories of
    earlier generations. Returns what was removed."""
    root = Path(index_dir)
    gen, gen_dir = current_generation(root)
    removed: list[str] = []
    candidates: list[tuple[int, Path]] = []
    for p in root.glob(f"{GEN_PREFIX}*"):
        name = p.name
        if p.is_dir() and name[len(GEN_PREFIX):].isdigit() and p != gen_dir:
            candidates.append((int(name[len(GEN_PREFIX):]), p))
        elif p.is_dir() and name.endswith(".tmp"):
            continue  # a consolidation in progress or crashed: it cleans up after itself
    if gen != 0 and (root / "records.bin").exists():
        candidates.append((0, root))
    for g, p in candidates:
        if g > gen:
            continue  # written by a consolidation that has not switched yet
        lease = p / LEASE_FILE
        try:
            fd = os.open(lease, os.O_RDONLY | os.O_CREAT, 0o644)
        except OSError:
            continue
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                continue
            if p == root:
                from .disk import INDEX_FILES
                from .weighting import WEIGHTING_FILE
                for name in (*INDEX_FILES, WEIGHTING_FILE, LEASE_FILE):
                    (root / name).unlink(missing_ok=True)
            else:
                shutil.rmtree(p, ignore_errors=True)
            removed.append(str(p))
            crash_point("gc.generation")
        finally:
            os.close(fd)
    upd = root / UPDATES_DIR
    if upd.is_dir():
        for p in upd.iterdir():
            stem = p.name.split(".")[0]
            kind, _, num = stem.partition("-")
            if kind in ("wal", "delta", "deleted", "work") and num.isdigit() and int(num) < gen:
                if p.is_dir():
                    shutil.rmtree(p, ignore_errors=True)
                else:
                    p.unlink(missing_ok=True)
                removed.append(str(p))
    if removed:
        fsync_dir(root)
    return removed


def pack_meta(rows: list[dict]) -> list[bytes]:
    """msgpack blobs of metadata dicts, as the records store them."""
    packer = msgpack.Packer(use_bin_type=True)
    return [packer.pack(m) if m else b"" for m in rows]
