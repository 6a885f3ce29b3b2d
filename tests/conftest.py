"""Shared test fixtures: where the shared real-data folder is, and skipping when it is absent."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("MEMESCALE_SHARED_DATA", ROOT.parent / "shared" / "data"))

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def shared_path(*parts: str) -> Path:
    """Path under the shared data folder; skips the calling test with a reason when absent."""
    p = SHARED_DATA.joinpath(*parts)
    if not p.exists():
        pytest.skip(f"shared test data {p} is absent (set MEMESCALE_SHARED_DATA to its folder)")
    return p


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_local_ray() -> None:
    """A fresh local Ray for one test module (2 CPUs, 256 MiB object store, no dashboard);
    the caller shuts it down with ray.shutdown()."""
    import ray

    env = {k: os.environ[k] for k in ("RAY_AUTH_MODE", "RAY_USAGE_STATS_ENABLED", "HF_HUB_OFFLINE")}
    ray.init(address="local", num_cpus=2, object_store_memory=256 * 2**20, include_dashboard=False,
             _node_ip_address="127.0.0.1", runtime_env={"env_vars": env})
