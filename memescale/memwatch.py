"""Measured memory: a process's anonymous resident memory (RssAnon), sampled from /proc.

Anonymous memory is what a process holds itself (heap, arrays, interpreter); pages of
memory-mapped files (vectors, graphs, Parquet) are the kernel's page cache, counted under
RssFile and reclaimable, so a build's memory budget is stated and checked in RssAnon.

    with PeakRssAnon() as peak:
        work()
    peak.peak_bytes, peak.growth_bytes   # highest RssAnon seen, and that minus the start
    peak.take_stage_peak()               # the highest since the previous call (per-phase peaks)

`release_free_memory()` hands memory freed by the allocators back to the OS (glibc keeps
freed blocks below its adaptive mmap threshold, up to tens of MiB per arena, and Arrow's pool
keeps its own): a long driver calls it between phases so that one phase's temporaries do not
stay resident through the next.

Linux only; elsewhere the readings are 0.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import threading
from pathlib import Path


def rss_anon(pid: int | str = "self") -> int:
    """RssAnon of process `pid` in bytes; 0 when it cannot be read (gone, or not Linux)."""
    try:
        with open(Path("/proc") / str(pid) / "status") as f:
            for line in f:
                if line.startswith("RssAnon:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def release_free_memory() -> None:
    """Return freed heap memory to the OS: Arrow's memory pool, then glibc's malloc_trim(0)
    over every arena (a no-op where there is no glibc)."""
    try:
        import pyarrow as pa

        pa.default_memory_pool().release_unused()
    except ImportError:
        pass
    if _LIBC is not None:
        _LIBC.malloc_trim(0)


def _load_libc() -> ctypes.CDLL | None:
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.malloc_trim.argtypes = [ctypes.c_size_t]
        return libc
    except (OSError, AttributeError):
        return None


_LIBC = _load_libc()


class PeakRssAnon:
    """Samples `rss_anon(pid)` every `interval_s` on a daemon thread between enter and exit
    (and once at each end). `start_bytes`, `peak_bytes`, `growth_bytes` = peak - start."""

    def __init__(self, pid: int | str = "self", interval_s: float = 0.005) -> None:
        self.pid, self.interval_s = pid, interval_s
        self.start_bytes = self.peak_bytes = self._stage_peak = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def sample(self) -> int:
        value = rss_anon(self.pid)
        self.peak_bytes = max(self.peak_bytes, value)
        self._stage_peak = max(self._stage_peak, value)
        return value

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.sample()

    def __enter__(self) -> PeakRssAnon:
        self.start_bytes = self.peak_bytes = self._stage_peak = rss_anon(self.pid)
        self._thread = threading.Thread(target=self._run, name="rss-anon", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.sample()
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    @property
    def growth_bytes(self) -> int:
        return self.peak_bytes - self.start_bytes

    def take_stage_peak(self) -> int:
        """The highest RssAnon seen since the previous call (or since enter), then start the
        next stage's peak from the current reading: per-phase peaks of one long process."""
        now = self.sample()
        peak = max(self._stage_peak, now)
        self._stage_peak = now
        return peak
