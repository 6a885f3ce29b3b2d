"""Usage telemetry from the page: small JSON events appended to a bounded JSON Lines file.

Privacy: nothing identifying is stored (no IP address, no user agent, no cookie): only the
event's type, its small `props` and the time it was received. Opt-out is honoured three
ways: the page sends nothing when the user switched telemetry off; a request carrying
``DNT: 1`` or ``Sec-GPC: 1`` is accepted and discarded; `serve.telemetry_enabled = false`
discards everything.

Size bound: when appending would grow the file past `max_bytes`, the file is renamed to
``<path>.1`` (replacing the previous one) and a new file is started, so the two never hold
more than 2 x max_bytes. Appends and rotation hold an exclusive `flock` on a lock file, so
several Api replicas on one machine can share the path.
"""

from __future__ import annotations

import fcntl
import json
import os
import threading
import time
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

MAX_EVENTS = 20
MAX_PROPS = 16


class TelemetryEvent(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    type: str = Field(pattern=r"^[a-z][a-z0-9_.-]{0,39}$", description="e.g. search, click, page")
    props: dict[str, str | int | float | bool | None] = Field(default_factory=dict, max_length=MAX_PROPS)
    ts: float | None = Field(default=None, description="client time, unix seconds", allow_inf_nan=False)


class TelemetryBatch(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    events: list[TelemetryEvent] = Field(min_length=1, max_length=MAX_EVENTS)


class EventTooLarge(ValueError):
    pass


def opted_out(headers: Any) -> bool:
    """True when the request carries Do-Not-Track or Global Privacy Control."""
    return headers.get("dnt", "").strip() == "1" or headers.get("sec-gpc", "").strip() == "1"


class TelemetryLog:
    """Appends events to `path` (JSON Lines), rotating at `max_bytes`."""

    def __init__(self, path: str | os.PathLike, max_bytes: int, event_max_bytes: int, enabled: bool = True):
        self.path = Path(path)
        self.max_bytes = max(1024, int(max_bytes))
        self.event_max_bytes = int(event_max_bytes)
        self.enabled = enabled
        self._lock = threading.Lock()

    def lines(self, batch: TelemetryBatch) -> list[bytes]:
        """The lines `batch` would append; EventTooLarge if one is over `event_max_bytes`."""
        now = round(time.time(), 3)
        out = []
        for ev in batch.events:
            rec = {"received": now, "type": ev.type, "props": ev.props}
            if ev.ts is not None:
                rec["ts"] = ev.ts
            line = (json.dumps(rec, ensure_ascii=False, separators=(",", ":")) + "\n").encode()
            if len(line) > self.event_max_bytes:
                raise EventTooLarge(f"a telemetry event is {len(line)} bytes; the limit is {self.event_max_bytes}")
            out.append(line)
        return out

    def append(self, lines: list[bytes]) -> int:
        """Append `lines`; returns how many were written (0 when disabled)."""
        if not self.enabled or not lines:
            return 0
        data = b"".join(lines)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        lock_path = self.path.with_name(self.path.name + ".lock")
        with self._lock, open(lock_path, "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                size = self.path.stat().st_size if self.path.exists() else 0
                if size and size + len(data) > self.max_bytes:
                    os.replace(self.path, self.path.with_name(self.path.name + ".1"))
                with open(self.path, "ab") as f:
                    f.write(data)
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)
        return len(lines)
