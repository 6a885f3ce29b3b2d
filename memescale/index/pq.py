"""Product quantisation for inner-product search: k-means codebooks, OPQ, query-aware training.

A `PQCodec` maps a vector x (d,) to M bytes. Encoding works in a transformed space
``y = x @ A`` (A: (d, D), D = M * dsub >= d), split into M subvectors of dsub dims, each
replaced by the nearest of K = 256 centroids. A query is mapped with ``q @ B`` so that
``(q @ B) . (x @ A) = q . x`` exactly; the ADC score of a code is then
``sum_m table[m, code[m]]`` with ``table[m, c] = (q @ B)_m . centroid[m, c]``.

Query-aware training (`train_pq` with `queries`) adapts two things to a query sample.

1. The codebooks: for inner-product search the error that matters is
``E_q[(q . (x - x_hat))^2] = (x - x_hat)^T S (x - x_hat)``, S the second moment of the queries. With ``A = [S_r^(1/2) | 0] @ Rot`` and ``B = [S_r^(-1/2) | 0] @ Rot`` the
squared quantisation error in y space is exactly ``(x - x_hat)^T S_r (x - x_hat)``, so
k-means there minimises the (regularised) query-weighted error. ``S_r = S + eps *
trace(S) / d * I`` with S estimated as the covariance of a query sample: the mean query
direction adds a rank-one term to the second moment that, on real sentence embeddings,
lowered the squared error further but not recall. Rot is an orthogonal rotation learned as
in OPQ (Ge et al., non-parametric: alternate codebook training and the orthogonal
Procrustes solution). Without queries S_r = I (OPQ, or plain PQ with opq_iters=0).
The regulariser matters: on the MiniLM set eps = 0.3 cut the query-weighted error most
(-30%) but lost OOD recall at 8 of 9 search L; with eps = 3 (the default) and 2. the codec
cuts it by 9% and gains recall.

2. The score-aware direction (below): a vector x matters to the queries that rank it high,
and out-of-distribution queries do not lie along x itself. A linear query predictor
``h(x) = x P + b`` is fitted by ridge regression on the pairs (x, q) where x is one of query
q's exact top-10 among (a sample of) the base vectors, and codes are chosen score-aware along
h(x) instead of x. On the 100k MiniLM set with 1000 training queries (the same graph) the
query-aware codec reaches OOD recall@10 0.866 / 0.917 / 0.956 / 0.985 at L = 20 / 30 / 50 /
100, plain OPQ 0.859 / 0.911 / 0.954 / 0.984 (the mean of three seeds, which spread by up
to 0.006).

Score-aware encoding (`PQCodec.encode`, after Guo et al., "Accelerating Large-Scale Inference
with Anisotropic Vector Quantization", ICML 2020): a vector matters most to the queries that
score it high, and those lie close to its own direction, so the part of the residual along x
costs more than the orthogonal part. In y space the ADC error for a query q is
``(q B) . (y - y_hat)`` and for q ~ x the relevant direction is z = x B (z = h(x) B with a
query predictor); codes are chosen to
minimise ``|r|^2 + (eta - 1) (r . z)^2 / |z|^2`` (r = y - y_hat) by coordinate descent over
the subspaces, starting from the nearest-centroid codes. eta = 1 is plain nearest-centroid
assignment. On the 100k MiniLM set (R=64 graph, 48 bytes, eta = 4) it raised recall@10 at
search L = 20 / 30 / 50 by 0.024 / 0.012 / 0.005 (OOD) and 0.038 / 0.020 / 0.008 (ID).

3. The weight eta itself is chosen by measurement (`choose_eta`). The predictor is a (d, d)
regression fitted on a few thousand queries; at 1152 dimensions it can fit its own training
queries and not the next ones, and codes along its direction then rank new queries worse
than codes with a milder weight. So `train_pq` holds out a quarter of the query sample
(`ETA_HOLDOUT`): whitening, rotation and predictor see the rest, and eta is the one of
`ETA_CHOICES` whose codes rank the held-out queries' exact top-k highest among a sample of the
base vectors, by at least ETA_MARGIN over SCORE_AWARE_ETA (a few hundred held-out queries
measure it to about that). The predictor is then refitted on the whole sample. The codec
keeps eta (`PQCodec.eta`), so every later `encode` (inserts included) codes the same way.
"""

from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from numba import njit
from tqdm.auto import tqdm

from .disk import MAGIC_CODEC, pack_arrays, read_small_file, unpack_arrays, write_small_file
from .kernels import exact_topk, gram, matmul_rows, parallel_for, resolve_threads, single_threaded_blas

log = logging.getLogger(__name__)

K = 256  # centroids per subspace: one byte per subvector
SCORE_AWARE_ETA = 4.0  # weight of the residual along the vector's query direction (1: isotropic)
SCORE_AWARE_SWEEPS = 2  # coordinate-descent passes over the subspaces per vector
QUERY_EPS = 3.0  # regulariser of the query covariance (module doc, 1.)
PREDICTOR_NEIGHBOURS = 10  # (x, q) training pairs of the query predictor: q's top-k vectors
PREDICTOR_SAMPLE = 200_000  # base vectors the training queries' neighbours are taken from
PREDICTOR_RIDGE = 0.5  # ridge towards h(x) = x + b, relative to the mean variance of the x's
# the score-aware weights `choose_eta` tries, the default first; eta 1 (nearest centroid) ranked
# held-out texts well by codes alone but navigated worse than 2 for images and texts alike
ETA_CHOICES = (SCORE_AWARE_ETA, 2.0)
ETA_HOLDOUT = 0.25  # share of a query sample held out to choose eta (module doc, 3.)
ETA_MIN_HOLDOUT = 50  # with fewer held-out queries than this, no choice: SCORE_AWARE_ETA
ETA_SAMPLE = 10_000  # base vectors the held-out queries' exact top-k are taken from
ETA_MARGIN = 0.01  # how much better another choice must rank the held-out queries than the first


@njit(nogil=True, cache=True, fastmath=True)
def _assign(Y, lo, hi, cb_t, cnorm, codes, err):
    """Nearest centroid per subspace for rows [lo, hi) of Y (n, M * dsub) float32.

    cb_t: (M, dsub, K) float32 codebooks, transposed so the loop over centroids vectorises;
    cnorm: (M, K) float32 squared centroid norms. Writes codes (n, M) uint8 and err (n,)
    float32 squared quantisation error. O((hi - lo) * K * D).
    """
    M, dsub, k = cb_t.shape
    dist = np.empty(k, np.float32)
    block_min = np.empty(k // 16, np.float32)
    for i in range(lo, hi):
        e = np.float32(0.0)
        for m in range(M):
            cm = cb_t[m]
            cn = cnorm[m]
            for t in range(k):
                dist[t] = cn[t]
            y2 = np.float32(0.0)
            for j in range(dsub):
                v = Y[i, m * dsub + j]
                y2 += v * v
                v *= np.float32(-2.0)
                for t in range(k):
                    dist[t] += v * cm[j, t]
            for b in range(k // 16):
                mn = dist[b * 16]
                for t in range(1, 16):
                    mn = min(mn, dist[b * 16 + t])
                block_min[b] = mn
            bb = 0
            for b in range(1, k // 16):
                if block_min[b] < block_min[bb]:
                    bb = b
            mn = block_min[bb]
            best = bb * 16
            while dist[best] != mn:
                best += 1
            codes[i, m] = best
            e += max(mn + y2, np.float32(0.0))
        err[i] = e


@njit(nogil=True, cache=True)
def _centroid_sums(Y, codes, M, dsub, k):
    """Per-subspace sums (M, k, dsub) float64 and counts (M, k) int64 of Y rows by code."""
    sums = np.zeros((M, k, dsub), np.float64)
    counts = np.zeros((M, k), np.int64)
    for i in range(Y.shape[0]):
        for m in range(M):
            c = codes[i, m]
            counts[m, c] += 1
            for j in range(dsub):
                sums[m, c, j] += Y[i, m * dsub + j]
    return sums, counts


@njit(nogil=True, cache=True, fastmath=True, inline="always")
def adc_score(table, codes, u):
    """sum_m table[m, codes[u, m]]: the ADC estimate for node u. table: (M, K) float32;
    codes: (N, M) uint8. Four independent sums hide the lookups' latency, and the 2-D
    indexing by an unsigned code keeps the index arithmetic free of sign checks (a flat
    table indexed by m * K + code, or a row view per node, runs at less than half the speed).
    O(M)."""
    M = codes.shape[1]
    s0 = np.float32(0.0)
    s1 = np.float32(0.0)
    s2 = np.float32(0.0)
    s3 = np.float32(0.0)
    m = 0
    while m + 4 <= M:
        s0 += table[m, codes[u, m]]
        s1 += table[m + 1, codes[u, m + 1]]
        s2 += table[m + 2, codes[u, m + 2]]
        s3 += table[m + 3, codes[u, m + 3]]
        m += 4
    while m < M:
        s0 += table[m, codes[u, m]]
        m += 1
    return (s0 + s1) + (s2 + s3)


SCORE_AWARE_ROWS = 64  # rows per `_score_aware` call: its y.c and z.c products as two GEMMs
_BIG = np.float32(np.finfo(np.float32).max)  # "no candidate": finite, as fastmath assumes


@njit(nogil=True, cache=True, fastmath=True)
def _min8(x):
    """min(x) for len(x) a multiple of 8, on eight independent running minima (one chain
    would wait on each compare's latency)."""
    m0 = m1 = m2 = m3 = m4 = m5 = m6 = m7 = _BIG
    for t in range(0, len(x), 8):
        m0 = min(m0, x[t])
        m1 = min(m1, x[t + 1])
        m2 = min(m2, x[t + 2])
        m3 = min(m3, x[t + 3])
        m4 = min(m4, x[t + 4])
        m5 = min(m5, x[t + 5])
        m6 = min(m6, x[t + 6])
        m7 = min(m7, x[t + 7])
    return min(min(min(m0, m1), min(m2, m3)), min(min(m4, m5), min(m6, m7)))


@njit(nogil=True, cache=True, fastmath=True)
def _score_aware(Y, Z, YC, ZC, lo, cnorm, centroids, codes, eta, sweeps):
    """Codes of rows [lo, lo + YC.shape[1]) that minimise |r|^2 + (eta - 1) (r . z)^2 / |z|^2
    with r = y - y_hat: each subspace's nearest centroid first, then `sweeps`
    coordinate-descent passes over the M subspaces (strict improvements only, so an exact
    code stays). Y, Z: (n, D) float32; YC, ZC: (M, rows, K) float32, the rows' subvectors'
    dot products with every centroid (y.c and z.c; a candidate's loss needs only them and
    running sums: |y - c|^2 = |y|^2 - 2 y.c + |c|^2, (y - c).z = y.z - c.z); cnorm (M, K)
    the centroids' squared norms; centroids (M, K, dsub). Writes codes (n, M) uint8.
    O(rows * (sweeps + 1) * K * M + rows * sweeps * D)."""
    M, k, dsub = centroids.shape
    D = M * dsub
    r = np.empty(D, np.float32)
    loss = np.empty(k, np.float32)
    yy = np.empty(M, np.float32)  # |y_m|^2 and y_m . z_m per subspace: the same in every sweep
    yz = np.empty(M, np.float32)
    for i in range(lo, lo + YC.shape[1]):
        row = i - lo
        zz = np.float32(0.0)
        for j in range(D):
            zz += Z[i, j] * Z[i, j]
        w = np.float32(eta - 1.0) / max(zz, np.float32(1e-20))
        for m in range(M):
            cn = cnorm[m]
            a = YC[m, row]
            for t in range(k):
                loss[t] = cn[t] - np.float32(2.0) * a[t]
            mn = _min8(loss)
            best = 0
            while best < k - 1 and loss[best] != mn:  # bounded: a NaN row matches nothing
                best += 1
            codes[i, m] = best
        rr = np.float32(0.0)
        rz = np.float32(0.0)
        for m in range(M):
            s_yy = np.float32(0.0)
            s_yz = np.float32(0.0)
            for j in range(dsub):
                y = Y[i, m * dsub + j]
                e = y - centroids[m, codes[i, m], j]
                r[m * dsub + j] = e
                rr += e * e
                rz += e * Z[i, m * dsub + j]
                s_yy += y * y
                s_yz += y * Z[i, m * dsub + j]
            yy[m] = s_yy
            yz[m] = s_yz
        for _ in range(sweeps):
            for m in range(M):
                o = m * dsub
                rm2 = np.float32(0.0)
                rmz = np.float32(0.0)
                for j in range(dsub):
                    rm2 += r[o + j] * r[o + j]
                    rmz += r[o + j] * Z[i, o + j]
                cur = codes[i, m]
                base = rr - rm2 + yy[m]
                base_z = rz - rmz + yz[m]
                cn = cnorm[m]
                a = YC[m, row]
                b = ZC[m, row]
                for t in range(k):
                    nz = base_z - b[t]
                    loss[t] = base - np.float32(2.0) * a[t] + cn[t] + w * nz * nz
                cur_loss = loss[cur]  # the same expanded form as its rivals', so a tie never switches
                loss[cur] = _BIG
                mn = _min8(loss)
                if mn < cur_loss:  # the first centroid at the minimum (not cur: its loss is _BIG)
                    best = 0
                    while loss[best] != mn:
                        best += 1
                    codes[i, m] = best
                    sa = np.float32(0.0)
                    sb = np.float32(0.0)
                    for j in range(dsub):
                        e = Y[i, o + j] - centroids[m, best, j]
                        r[o + j] = e
                        sa += e * e
                        sb += e * Z[i, o + j]
                    rr = rr - rm2 + sa
                    rz = rz - rmz + sb


def score_aware_codes(Y: np.ndarray, Z: np.ndarray, centroids: np.ndarray, eta: float, sweeps: int,
                      pool: ThreadPoolExecutor | None = None) -> np.ndarray:
    """`_score_aware` codes (n, M) uint8 of rows Y (n, D) float32 with query directions Z
    (n, D) float32 against centroids (M, K, dsub) float32, over fixed slices of
    SCORE_AWARE_ROWS rows (run on `pool`; the slices, not the threads, fix BLAS's shapes,
    so the codes do not depend on the thread count). O(n * K * D) multiply-adds in BLAS plus
    O(n * sweeps * K * M)."""
    n = len(Y)
    M, k, dsub = centroids.shape
    if k % 8:
        raise ValueError(f"score-aware codes need a multiple of 8 centroids per subspace, got {k}")
    cent = np.ascontiguousarray(centroids, np.float32)
    cb_t = np.ascontiguousarray(cent.transpose(0, 2, 1))
    cnorm = np.einsum("mkj,mkj->mk", cent, cent).astype(np.float32)
    codes = np.empty((n, M), np.uint8)

    def part(lo: int) -> None:
        hi = min(n, lo + SCORE_AWARE_ROWS)
        YC = np.matmul(Y[lo:hi].reshape(hi - lo, M, dsub).transpose(1, 0, 2), cb_t)
        ZC = np.matmul(Z[lo:hi].reshape(hi - lo, M, dsub).transpose(1, 0, 2), cb_t)
        _score_aware(Y, Z, YC, ZC, lo, cnorm, cent, codes, eta, sweeps)

    starts = range(0, n, SCORE_AWARE_ROWS)
    if pool is None:
        for lo in starts:
            part(lo)
    else:
        list(pool.map(part, starts))
    return codes


def assign_subspaces(Y: np.ndarray, centroids: np.ndarray, threads: int, pool=None) -> tuple[np.ndarray, np.ndarray]:
    """Nearest-centroid codes (n, M) uint8 of rows Y (n, M * dsub) float32 against
    centroids (M, K, dsub) float32, and each row's squared error (n,) float32.
    O(n * K * M * dsub)."""
    cb_t = np.ascontiguousarray(centroids.transpose(0, 2, 1))
    cnorm = np.einsum("mkj,mkj->mk", centroids, centroids).astype(np.float32)
    codes = np.empty((Y.shape[0], centroids.shape[0]), np.uint8)
    err = np.empty(Y.shape[0], np.float32)
    parallel_for(lambda lo, hi: _assign(Y, lo, hi, cb_t, cnorm, codes, err), Y.shape[0], threads, pool)
    return codes, err


def _update_centroids(Y: np.ndarray, codes: np.ndarray, centroids: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Lloyd update: each centroid becomes the mean of its rows; empty ones are re-seeded
    from random training rows. Y: (n, M * dsub); codes: (n, M); centroids: (M, K, dsub)."""
    M, k, dsub = centroids.shape
    sums, counts = _centroid_sums(Y, codes, M, dsub, k)
    c = centroids.copy()
    filled = counts > 0
    c[filled] = (sums[filled] / counts[filled][:, None]).astype(np.float32)
    for m, t in zip(*np.nonzero(~filled)):
        c[m, t] = Y[rng.integers(Y.shape[0]), m * dsub : (m + 1) * dsub]
    return c


def kmeans_subspaces(
    Y: np.ndarray, centroids: np.ndarray, iters: int, rng: np.random.Generator, threads: int, pool=None
) -> np.ndarray:
    """Lloyd iterations of M independent k-means (K centroids each) on the subvectors of Y.

    Y: (n, M * dsub) float32; centroids: (M, K, dsub) float32 starting point. Returns new
    centroids. O(iters * n * K * D).
    """
    for _ in range(iters):
        codes, _ = assign_subspaces(Y, centroids, threads, pool)
        centroids = _update_centroids(Y, codes, centroids, rng)
    return centroids


def _pad(x: np.ndarray, D: int) -> np.ndarray:
    return x if x.shape[1] == D else np.pad(x, ((0, 0), (0, D - x.shape[1])))


@dataclass
class PQCodec:
    """Trained PQ codec (see module doc).

    centroids: (M, K, dsub) float32; base_transform A: (d, D) float32;
    query_transform B: (d, D) float32, with D = M * dsub and A @ B.T = I_d;
    query_predictor: None, or (d + 1, d) float32 [P; b] of a query-aware codec (module doc);
    eta: the score-aware weight `encode` codes with (module doc, 3.).
    """

    centroids: np.ndarray
    base_transform: np.ndarray
    query_transform: np.ndarray
    query_predictor: np.ndarray | None = None
    eta: float = SCORE_AWARE_ETA

    @property
    def M(self) -> int:
        return self.centroids.shape[0]

    @property
    def dsub(self) -> int:
        return self.centroids.shape[2]

    @property
    def dim(self) -> int:
        return self.base_transform.shape[0]

    def _transform(self, x: np.ndarray, T: np.ndarray, pool=None) -> np.ndarray:
        x = np.asarray(x)
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise ValueError(f"expected (n, {self.dim}) vectors, got shape {x.shape}")
        return matmul_rows(x, T, pool)

    def encode(self, vectors: np.ndarray, threads: int | None = None, block: int = 65536,
               eta: float | None = None, out: np.ndarray | None = None) -> np.ndarray:
        """PQ codes (N, M) uint8 of vectors (N, d) float16/float32 (a memmap is read `block`
        rows at a time), score-aware with weight `eta` along each vector's predicted query
        direction (module doc; 1: nearest centroid; None: the codec's own `eta`). `out`: an
        (N, M) uint8 array (e.g. a memmap) the codes are written into and returned as; None: a
        new array.
        Time O(N * d * D) for the transforms plus O(N * K * D) multiply-adds for the codes
        (twice that with eta != 1); memory O(block * (d + D)) besides the codes."""
        threads = resolve_threads(threads)
        eta = self.eta if eta is None else float(eta)
        n = vectors.shape[0]
        if out is not None and (out.shape != (n, self.M) or out.dtype != np.uint8):
            raise ValueError(f"out must be ({n}, {self.M}) uint8, got {out.shape} {out.dtype}")
        codes = np.empty((n, self.M), np.uint8) if out is None else out
        # the query directions' transform folded into one matrix: h(x) B = x (P B) + b B
        d = self.dim
        if self.query_predictor is None:
            PB, bB = self.query_transform, np.zeros(self.query_transform.shape[1], np.float32)
        else:
            PB = self.query_predictor[:d].astype(np.float64) @ self.query_transform
            bB = (self.query_predictor[d].astype(np.float64) @ self.query_transform).astype(np.float32)
        with ThreadPoolExecutor(threads) as pool, single_threaded_blas():
            for lo in range(0, n, block):
                x = vectors[lo : lo + block]
                Y = self._transform(x, self.base_transform, pool)
                if eta == 1.0:
                    c = assign_subspaces(Y, self.centroids, threads, pool)[0]
                else:
                    Z = self._transform(x, PB, pool) + bB
                    c = score_aware_codes(Y, Z, self.centroids, eta, SCORE_AWARE_SWEEPS, pool)
                codes[lo : lo + len(c)] = c
        return codes

    def predict_queries(self, x: np.ndarray, pool=None) -> np.ndarray:
        """The direction of the queries expected to rank each vector high: h(x) = x P + b
        with the query predictor, x itself without one. (n, d) float32."""
        if self.query_predictor is None:
            return np.asarray(x, np.float32)
        d = self.dim
        return self._transform(x, self.query_predictor[:d], pool) + self.query_predictor[d]

    def decode(self, codes: np.ndarray) -> np.ndarray:
        """Reconstructions x_hat (N, d) float32 of codes (N, M) uint8; q . x_hat = ADC score."""
        codes = np.asarray(codes)
        Yhat = self.centroids[np.arange(self.M)[None, :], codes].reshape(codes.shape[0], -1)
        return Yhat @ self.query_transform.T

    def lookup_tables(self, queries: np.ndarray) -> np.ndarray:
        """ADC tables (nq, M, K) float32 of queries (nq, d): table[m, c] = (q B)_m . centroid[m, c]."""
        qt = self._transform(queries, self.query_transform).reshape(-1, self.M, self.dsub)
        return np.einsum("nmj,mkj->nmk", qt, self.centroids, optimize=True).astype(np.float32)

    def scores(self, queries: np.ndarray, codes: np.ndarray) -> np.ndarray:
        """ADC inner-product estimates (nq, N) float32 of every query against every code."""
        tables = self.lookup_tables(queries)
        out = np.zeros((tables.shape[0], codes.shape[0]), np.float32)
        for m in range(self.M):
            out += tables[:, m, codes[:, m]]
        return out

    def to_arrays(self) -> dict[str, np.ndarray]:
        out = {"centroids": self.centroids, "base_transform": self.base_transform, "query_transform": self.query_transform}
        if self.query_predictor is not None:
            out["query_predictor"] = self.query_predictor
        out["eta"] = np.array([self.eta], np.float32)  # absent from older files: SCORE_AWARE_ETA
        return out

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray]) -> PQCodec:
        predictor = arrays.get("query_predictor")
        eta = arrays.get("eta")
        return cls(
            np.ascontiguousarray(arrays["centroids"], np.float32),
            np.ascontiguousarray(arrays["base_transform"], np.float32),
            np.ascontiguousarray(arrays["query_transform"], np.float32),
            None if predictor is None else np.ascontiguousarray(predictor, np.float32),
            SCORE_AWARE_ETA if eta is None else float(np.asarray(eta).reshape(-1)[0]),
        )

    def save(self, path: str | Path) -> None:
        """Write the codec to one checksummed file."""
        write_small_file(Path(path), MAGIC_CODEC, pack_arrays(self.to_arrays(), {"K": K}))

    @classmethod
    def load(cls, path: str | Path) -> PQCodec:
        """Read a codec written by `save`; raises IndexFormatError on a bad file."""
        payload, _, _ = read_small_file(Path(path), MAGIC_CODEC)
        arrays, _ = unpack_arrays(Path(path), payload)
        return cls.from_arrays(arrays)


def query_whitening(queries: np.ndarray, eps: float) -> tuple[np.ndarray, np.ndarray]:
    """(S_r^(1/2), S_r^(-1/2)), both (d, d) float64, for S_r = S + eps * trace(S) / d * I and
    S the covariance of a query sample Q (n, d). O(n d^2 + d^3)."""
    Q = np.asarray(queries, dtype=np.float64)
    d = Q.shape[1]
    Q = Q - Q.mean(axis=0)
    S = Q.T @ Q / Q.shape[0]
    S += eps * np.trace(S) / d * np.eye(d)
    w, V = np.linalg.eigh(S)
    w = np.maximum(w, w.max() * 1e-12)
    return (V * np.sqrt(w)) @ V.T, (V / np.sqrt(w)) @ V.T


def fit_query_predictor(vectors: np.ndarray, queries: np.ndarray, rng: np.random.Generator,
                        sample: int = PREDICTOR_SAMPLE, k: int = PREDICTOR_NEIGHBOURS,
                        ridge: float = PREDICTOR_RIDGE) -> np.ndarray:
    """[P; b] (d + 1, d) float32 of the ridge regression h(x) = x P + b from a vector x to the
    queries that rank it among their top k (module doc, 2.), fitted on the pairs of each
    query in `queries` (nq, d) with its exact top-k among `sample` rows of `vectors` (N, d).
    P is shrunk towards the identity with weight ridge x the mean variance of the x's.
    Time O(nq * sample * d + nq * k * d^2 + d^3)."""
    n, d = vectors.shape
    rows = np.sort(rng.choice(n, size=min(n, sample), replace=False))
    base = np.asarray(vectors[rows], np.float32)
    Q = np.asarray(queries, np.float32)
    top, _ = exact_topk(Q, base, min(k, len(rows)))
    xs = base[top.reshape(-1)].astype(np.float64)
    qs = np.repeat(Q, top.shape[1], axis=0).astype(np.float64)
    xm, qm = xs.mean(axis=0), qs.mean(axis=0)
    xc, qc = xs - xm, qs - qm
    cxx = xc.T @ xc
    lam = ridge * np.trace(cxx) / d
    P = np.linalg.solve(cxx + lam * np.eye(d), xc.T @ qc + lam * np.eye(d))
    return np.vstack([P, qm - xm @ P]).astype(np.float32)


def train_pq(
    vectors: np.ndarray,
    M: int,
    queries: np.ndarray | None = None,
    eps: float = QUERY_EPS,
    opq_iters: int = 16,
    kmeans_iters: int = 12,
    train_size: int = 25_000,
    seed: int = 0,
    threads: int | None = None,
    progress: bool | None = None,
) -> PQCodec:
    """Train a PQ codec with M bytes per vector on (a sample of) `vectors` (N, d).

    queries: optional (nq, d) query sample for query-aware training (module doc: whitened
    codebooks and a query predictor, fitted on the sample less the ETA_HOLDOUT share that
    `choose_eta` sets the codec's eta on; with fewer than ETA_MIN_HOLDOUT held out, all fit
    and eta stays SCORE_AWARE_ETA); eps: the covariance regulariser; opq_iters: OPQ rotation
    updates (0: no rotation, plain PQ on S^(1/2) x);
    kmeans_iters: Lloyd iterations of the final codebooks (each OPQ step runs one more);
    train_size: rows sampled for training. Deterministic for a seed.
    Time O((opq_iters + kmeans_iters) * train_size * K * D + opq_iters * D^3), plus
    `fit_query_predictor` and `choose_eta` with queries.
    """
    threads = resolve_threads(threads)
    n, d = vectors.shape
    if M < 1 or M > d:
        raise ValueError(f"need 1 <= M <= d (got M={M}, d={d})")
    dsub = -(-d // M)
    D = M * dsub
    rng = np.random.default_rng(seed)
    rows = np.sort(rng.choice(n, size=min(n, train_size), replace=False))
    bar = tqdm(total=opq_iters + 1, desc="pq training", unit="step", disable=None if progress is None else not progress)
    aware = queries is not None and len(queries) > 0
    held = None
    if aware:
        assert queries is not None
        queries, held = split_queries(queries, rng)
    with ThreadPoolExecutor(threads) as pool, single_threaded_blas():
        if aware:
            assert queries is not None
            s_half, s_inv_half = query_whitening(queries, eps)
        else:
            s_half = s_inv_half = np.eye(d)
        A0 = _pad(s_half, D)
        B0 = _pad(s_inv_half, D)
        Xs = matmul_rows(vectors[rows], A0, pool)
        seeds = Xs[rng.choice(Xs.shape[0], size=K, replace=Xs.shape[0] < K)]
        centroids = np.ascontiguousarray(seeds.reshape(K, M, dsub).transpose(1, 0, 2))
        rot = np.eye(D, dtype=np.float32)
        for it in range(opq_iters):
            Y = matmul_rows(Xs, rot, pool)
            codes, err = assign_subspaces(Y, centroids, threads, pool)
            centroids = _update_centroids(Y, codes, centroids, rng)
            Yhat = centroids[np.arange(M)[None, :], codes].reshape(len(Y), D)
            U, _, Vt = np.linalg.svd(gram(Xs, Yhat, pool))
            rot = (U @ Vt).astype(np.float32)
            log.debug("opq step %d: mean squared error %.6f", it + 1, float(err.mean()))
            bar.update(1)
        Y = matmul_rows(Xs, rot, pool)
        centroids = kmeans_subspaces(Y, centroids, kmeans_iters, rng, threads, pool)
        del Xs, Y  # the training rows: choose_eta below reads a sample of its own
        bar.update(1)
    bar.close()
    A = (A0 @ rot).astype(np.float32)
    B = (B0 @ rot).astype(np.float32)
    predictor = fit_query_predictor(vectors, queries, rng) if aware and queries is not None else None
    codec = PQCodec(centroids.astype(np.float32), A, B, predictor)
    if held is not None:
        codec.eta, ranked = choose_eta(codec, vectors, held, rng, threads=threads)
        codec.query_predictor = fit_query_predictor(vectors, np.concatenate([queries, held]), rng)
        log.info("score-aware eta %.1f chosen on %d held-out queries (share of their top-%d ranked in the codes' "
                 "top k / 4k, by eta: %s)", codec.eta, len(held), PREDICTOR_NEIGHBOURS,
                 ", ".join(f"{e:g}: {r:.3f}" for e, r in ranked.items()))
    return codec


def split_queries(queries: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray | None]:
    """(fitted, held out): a seeded ETA_HOLDOUT share of the (nq, d) queries held out for
    `choose_eta`, both in sample order; (queries, None) when that share is under
    ETA_MIN_HOLDOUT queries."""
    nq = len(queries)
    n_held = int(nq * ETA_HOLDOUT)
    if n_held < ETA_MIN_HOLDOUT:
        return queries, None
    out = np.zeros(nq, np.bool_)
    out[rng.choice(nq, size=n_held, replace=False)] = True
    return queries[~out], queries[out]


def choose_eta(codec: PQCodec, vectors: np.ndarray, queries: np.ndarray, rng: np.random.Generator,
               choices: tuple[float, ...] = ETA_CHOICES, sample: int = ETA_SAMPLE, k: int = PREDICTOR_NEIGHBOURS,
               margin: float = ETA_MARGIN, threads: int | None = None) -> tuple[float, dict[float, float]]:
    """The score-aware weight of `choices` whose codes rank held-out queries best (module doc, 3.).

    queries: (nq, d) not seen in training; the exact top-k of each among `sample` rows of
    `vectors` (N, d), drawn with rng and read in file order. A choice's measure is the share
    of those top-k found among the k and among the 4k best ADC scores of the rows coded with
    it, the two averaged over queries. Returns (the first of `choices` unless another
    measures at least `margin` more, then the best of those; {choice: measure}).
    Time O(|choices| * sample * K * D) for the codes + O(nq * sample * d); memory
    O(sample * (d + D) + nq * sample) (float32 rows, the queries' ADC scores).
    """
    n = vectors.shape[0]
    rows = np.sort(rng.choice(n, size=min(n, sample), replace=False))
    X = np.asarray(vectors[rows], np.float32)
    Q = np.asarray(queries, np.float32)
    k = min(k, len(rows))
    top, _ = exact_topk(Q, X, k)
    truth = np.zeros((len(Q), len(rows)), np.bool_)
    np.put_along_axis(truth, top, True, axis=1)
    ranked: dict[float, float] = {}
    for eta in choices:
        est = codec.scores(Q, codec.encode(X, threads=threads, eta=eta))
        found = []
        for width in (k, min(4 * k, len(rows))):
            pick = np.argpartition(-est, width - 1, axis=1)[:, :width] if width < len(rows) else np.argsort(-est, 1)
            found.append(float(np.take_along_axis(truth, pick, axis=1).sum(1).mean()) / k)
        ranked[float(eta)] = float(np.mean(found))
    first = float(choices[0])
    top_measure = max(ranked.values())
    if top_measure < ranked[first] + margin:
        return first, ranked
    return next(e for e in ranked if ranked[e] == top_measure), ranked


def query_weighted_error(codec: PQCodec, vectors: np.ndarray, queries: np.ndarray, codes: np.ndarray | None = None) -> float:
    """Mean over queries q and vectors x of (q . (x - x_hat))^2: the error ADC scores make."""
    X = np.asarray(vectors, dtype=np.float32)
    codes = codec.encode(X) if codes is None else codes
    E = X - codec.decode(codes)
    Q = np.asarray(queries, dtype=np.float32)
    S = Q.T.astype(np.float64) @ Q / Q.shape[0]
    return float(np.sum((E @ S) * E) / E.shape[0])
