"""Ray metrics (ray.util.metrics) for ingest, build and serve, exported to Prometheus/the dashboard.

Every metric the project emits is declared once in `METRICS`; `record(name, value, **tags)`
creates it on first use in the calling process and is a no-op outside a Ray worker or driver,
so library code stays testable without Ray. O(1) per call.
"""

from __future__ import annotations

import threading
from typing import Any

# name -> (kind, description, tag keys, histogram boundaries)
METRICS: dict[str, tuple[str, str, tuple[str, ...], list[float] | None]] = {
    "memescale_ingest_posts_read": ("counter", "Dump records read and kept by the filters", (), None),
    "memescale_ingest_bad_lines": ("counter", "Dump lines skipped as malformed", (), None),
    "memescale_ingest_images_found": ("counter", "Image references extracted from posts", (), None),
    "memescale_ingest_images_downloaded": ("counter", "Images downloaded successfully", (), None),
    "memescale_ingest_images_failed": ("counter", "Images that failed, by reason", ("reason",), None),
    "memescale_ingest_images_discarded": ("counter", "Images discarded, by reason", ("reason",), None),
    "memescale_ingest_images_encoded": ("counter", "Images encoded to vectors", (), None),
    "memescale_ingest_images_retried": ("counter", "Images given a retry pass after a transient failure", (), None),
    "memescale_ingest_bytes": ("counter", "Image bytes downloaded", (), None),
    "memescale_ingest_fetch_seconds": (
        "histogram", "Per-image download latency", (), [0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30]),
    "memescale_ingest_decode_seconds": (
        "histogram", "Per-image decode+resize latency", (), [0.001, 0.003, 0.01, 0.03, 0.1, 0.3, 1, 5]),
    "memescale_ingest_encode_seconds": (
        "histogram", "Per-batch encoder latency", (), [0.01, 0.03, 0.1, 0.3, 1, 3, 10, 30]),
    "memescale_serve_requests": ("counter", "HTTP API requests, by route and status", ("route", "status"), None),
    "memescale_serve_latency_seconds": (
        "histogram", "Search latency by stage (encode, search, metadata, total)", ("stage",),
        [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5]),
    "memescale_serve_index_reads": (
        "histogram", "Index sector reads per search request", (), [4, 8, 16, 32, 64, 128, 256, 512, 1024, 4096]),
    "memescale_serve_encode_batch_size": (
        "histogram", "Encoder batch sizes, by input kind", ("kind",), [1, 2, 4, 8, 16, 32, 64, 128, 256]),
    "memescale_serve_text_cache": ("counter", "Encoder text embedding cache lookups, by outcome", ("outcome",), None),
    "memescale_serve_telemetry_events": ("counter", "Telemetry events, by outcome", ("outcome",), None),
    "memescale_curate_rows": ("counter", "Curate decisions per row, by outcome", ("outcome",), None),
    "memescale_curate_rows_written": ("counter", "Curated rows written", (), None),
    "memescale_curate_file_seconds": (
        "histogram", "Seconds to curate one input file", (), [0.1, 0.3, 1, 3, 10, 30, 100]),
    "memescale_build_shards_built": ("counter", "Shard graphs built by the index build", (), None),
    "memescale_build_shard_seconds": (
        "histogram", "Seconds per shard graph build", (), [1, 3, 10, 30, 100, 300, 1000, 3000]),
    "memescale_update_rows": ("counter", "Index update rows, by outcome (inserted, skipped, deleted)",
                              ("outcome",), None),
    "memescale_update_seconds": (
        "histogram", "Seconds per index update command, by operation", ("op",), [0.1, 0.3, 1, 3, 10, 30, 100, 300,
                                                                                1000, 3000]),
    "memescale_serve_index_refreshes": ("counter", "Committed index updates a Searcher took in", (), None),
    "memescale_serve_corrupt_records": ("counter", "Damaged index records met by searches (failed their checksum), "
                                        "skipped, never returned", (), None),
    "memescale_build_phase_seconds": ("gauge", "Wall seconds of each finished build phase", ("phase",), None),
    "memescale_build_shard_peak_bytes": ("gauge", "Peak anonymous memory of each shard graph task, and what it "
                                         "declared", ("shard", "kind"), None),
    "memescale_build_driver_rss_bytes": ("gauge", "Anonymous memory of the build driver at the end of each phase",
                                         (), None),
}

_made: dict[str, Any] = {}
_lock = threading.Lock()


def _metric(name: str):
    with _lock:
        if name not in _made:
            import ray

            if not ray.is_initialized():
                _made[name] = None
            else:
                from ray.util import metrics

                kind, desc, tags, bounds = METRICS[name]
                if kind == "counter":
                    _made[name] = metrics.Counter(name, description=desc, tag_keys=tags)
                elif kind == "gauge":
                    _made[name] = metrics.Gauge(name, description=desc, tag_keys=tags)
                else:
                    assert bounds is not None, f"histogram {name} declares no boundaries"
                    _made[name] = metrics.Histogram(name, description=desc, boundaries=bounds, tag_keys=tags)
        return _made[name]


def record(name: str, value: float = 1, **tags: str) -> None:
    """Add `value` to a counter, set a gauge to it, or observe it on a histogram, declared in METRICS."""
    m = _metric(name)
    if m is None or value == 0 and METRICS[name][0] == "counter":
        return
    if METRICS[name][0] == "counter":
        m.inc(value, tags=tags or None)
    elif METRICS[name][0] == "gauge":
        m.set(value, tags=tags or None)
    else:
        m.observe(value, tags=tags or None)
