"""Shared test fixtures: where the shared real-data folder is, and skipping when it is absent."""

from __future__ import annotations

import os
import socket
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("MEMESCALE_SHARED_DATA", ROOT.parent / "shared" / "data"))
CHROMIUM = Path(os.environ.get("MEMESCALE_CHROMIUM", "/usr/bin/chromium"))
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]

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


def venv_bin(name: str) -> str:
    """A console script of the environment running the tests (ray, serve, ...)."""
    return str(Path(sys.executable).with_name(name))


def start_local_ray() -> None:
    """A fresh local Ray for one test module (2 CPUs, 256 MiB object store, no dashboard);
    the caller shuts it down with ray.shutdown()."""
    import ray

    env = {k: os.environ[k] for k in ("RAY_AUTH_MODE", "RAY_USAGE_STATS_ENABLED", "HF_HUB_OFFLINE")}
    ray.init(address="local", num_cpus=2, object_store_memory=256 * 2**20, include_dashboard=False,
             _node_ip_address="127.0.0.1", runtime_env={"env_vars": env})


def require_chromium() -> None:
    """Skip the calling test or fixture with a reason when Debian's chromium is absent."""
    if not CHROMIUM.exists():
        pytest.skip(f"{CHROMIUM} is absent: apt-get install chromium (make test does)")


@contextmanager
def chromium_browser() -> Iterator:
    """Headless Debian chromium driven by Playwright (no browser is downloaded); skips when
    chromium is absent."""
    require_chromium()
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS)
        try:
            yield b
        finally:
            b.close()
