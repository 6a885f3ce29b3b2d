"""In-process metrics of one Api replica, rendered in the Prometheus text format at /metrics.

Every observation is also forwarded to `memescale.metrics.record` (Ray's metrics, which the
cluster's Prometheus endpoint aggregates over all replicas); this registry is what the HTTP
`GET /metrics` of the replica that answers shows. Only metrics declared in
`memescale.metrics.METRICS` can be recorded. Thread-safe, O(buckets) per observation.
"""

from __future__ import annotations

import bisect
import math
import threading
from typing import Any

from memescale import metrics as ray_metrics
from memescale.metrics import METRICS


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _labels(pairs: tuple[tuple[str, str], ...], extra: str = "") -> str:
    parts = [f'{k}="{_escape(v)}"' for k, v in pairs]
    if extra:
        parts.append(extra)
    return "{" + ",".join(parts) + "}" if parts else ""


def _num(x: float) -> str:
    if math.isinf(x):
        return "+Inf" if x > 0 else "-Inf"
    return repr(float(x)) if not float(x).is_integer() else str(int(x))


class LocalMetrics:
    """Counters, gauges and histograms keyed by (name, tag values)."""

    def __init__(self, forward: bool = True):
        self._lock = threading.Lock()
        self._counters: dict[tuple[str, tuple], float] = {}
        self._hists: dict[tuple[str, tuple], list] = {}  # [bucket counts..., sum, count]
        self._forward = forward

    def record(self, name: str, value: float = 1, **tags: str) -> None:
        kind, _, keys, bounds = METRICS[name]
        key = (name, tuple((k, str(tags.get(k, ""))) for k in keys))
        with self._lock:
            if kind == "counter":
                self._counters[key] = self._counters.get(key, 0.0) + value
            elif kind == "gauge":
                self._counters[key] = value
            else:
                assert bounds is not None, f"histogram {name} declares no boundaries"
                h = self._hists.get(key)
                if h is None:
                    h = self._hists[key] = [0] * (len(bounds) + 1) + [0.0, 0]
                h[bisect.bisect_left(bounds, value)] += 1
                h[-2] += value
                h[-1] += 1
        if self._forward:
            try:
                ray_metrics.record(name, value, **tags)
            except Exception:  # metrics must never fail a request
                pass

    def render(self) -> str:
        """All recorded series in the Prometheus text exposition format (version 0.0.4)."""
        out: list[str] = []
        with self._lock:
            counters = dict(self._counters)
            hists = {k: list(v) for k, v in self._hists.items()}
        for name in sorted(METRICS):
            kind, desc, _, bounds = METRICS[name]
            recorded: dict[tuple[str, tuple], Any] = hists if kind == "histogram" else counters
            series = [(k, v) for k, v in recorded.items() if k[0] == name]
            if not series:
                continue
            exported = f"{name}_total" if kind == "counter" else name
            out.append(f"# HELP {exported} {desc}")
            out.append(f"# TYPE {exported} {kind}")
            for (_, pairs), v in sorted(series):
                if kind != "histogram":
                    out.append(f"{exported}{_labels(pairs)} {_num(v)}")
                    continue
                assert bounds is not None, f"histogram {name} declares no boundaries"
                cum = 0
                for b, c in zip(list(bounds) + [math.inf], v[:-2]):
                    cum += c
                    le = f'le="{_num(b)}"'
                    out.append(f"{name}_bucket{_labels(pairs, le)} {cum}")
                out.append(f"{name}_sum{_labels(pairs)} {_num(v[-2])}")
                out.append(f"{name}_count{_labels(pairs)} {v[-1]}")
        return "\n".join(out) + "\n"


# The replica-wide registry. Kept here, not in serve/app.py: Serve may hand a replica the
# FastAPI app and its middleware functions as pickled copies, whose module globals would then
# be copies too; a module imported by name is one object per process.
REGISTRY = LocalMetrics()
