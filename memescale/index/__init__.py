"""Disk-resident ANN index: Vamana graph + query-aware PQ, inner-product search.

Build with `build_index` (or from parts: `build_vamana`, `prune_lists`, `train_pq`,
`write_index`), search with `Index.open(dir).search(queries, k, L)`, measure with
`memescale.index.eval` (recall@k, exact ground truth). The README's "The index" section
describes the algorithms and the format.
"""

from .build import BuildStats, IndexParams, build_index
from .disk import FORMAT_VERSION, IndexFormatError, WriteStats, write_index
from .kernels import exact_topk
from .pq import PQCodec, query_weighted_error, train_pq
from .search import Index, SearchStats
from .vamana import build_vamana, find_medoid, greedy_search, prune_lists, robust_prune

__all__ = [
    "FORMAT_VERSION",
    "BuildStats",
    "Index",
    "IndexFormatError",
    "IndexParams",
    "PQCodec",
    "SearchStats",
    "WriteStats",
    "build_index",
    "build_vamana",
    "exact_topk",
    "find_medoid",
    "greedy_search",
    "prune_lists",
    "query_weighted_error",
    "robust_prune",
    "train_pq",
    "write_index",
]
