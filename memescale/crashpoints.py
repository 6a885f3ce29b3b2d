"""Named points where a crash-safety test has the process killed with SIGKILL.

``MEMESCALE_CRASH_AT=N``: the N-th point reached (1-based, counted per process) kills the
process on the spot, as a power cut or the OOM killer would. ``MEMESCALE_CRASH_LOG=PATH``:
each point reached appends its name to PATH (a test counts them, then picks seeded N).
Neither set: `crash_point` is a no-op. Points sit between the steps of an operation whose
durable state changes (after a write, before its fsync, after a rename).

A job's driver calls `arm_from_env()` first thing: it takes both variables out of the
environment, so the Ray workers the driver starts (which inherit it) never crash and the
drill kills the driver alone, at the N-th point it reaches.
"""

from __future__ import annotations

import os
import signal

_reached = 0
_armed: tuple[str | None, str | None] | None = None


def arm_from_env() -> None:
    """Take ``MEMESCALE_CRASH_AT`` / ``MEMESCALE_CRASH_LOG`` out of os.environ into this process
    (module doc); a no-op when neither is set (a later fork may still set them). Idempotent."""
    global _armed
    if _armed is None and ("MEMESCALE_CRASH_AT" in os.environ or "MEMESCALE_CRASH_LOG" in os.environ):
        _armed = (os.environ.pop("MEMESCALE_CRASH_AT", None), os.environ.pop("MEMESCALE_CRASH_LOG", None))


def crash_point(name: str) -> None:
    """Count this point; die here when it is the one ``MEMESCALE_CRASH_AT`` names."""
    if _armed is not None:
        at, path = _armed
    else:
        at, path = os.environ.get("MEMESCALE_CRASH_AT"), os.environ.get("MEMESCALE_CRASH_LOG")
    if at is None and path is None:
        return
    global _reached
    _reached += 1
    if path:
        with open(path, "a", encoding="utf-8") as f:
            f.write(name + "\n")
    if at is not None and _reached == int(at):
        os.kill(os.getpid(), signal.SIGKILL)
