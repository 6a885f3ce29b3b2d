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


# Files whose tests take longest, longest first: `make test` hands whole files to two workers
# in collection order (--dist loadfile --no-loadscope-reorder), so these start first and the
# short ones fill in around them. Every other file keeps pytest's order after them.
LONGEST_FIRST = ["test_cluster_two_nodes.py", "test_ingest_e2e.py", "test_build_out_of_core.py",
                 "test_running_cluster.py", "test_build_sharded.py", "test_curate.py", "test_serve_api.py",
                 "test_serve_browser.py", "test_serve_fuzz.py", "test_index_core.py", "test_index_pq.py",
                 "test_index_updates.py", "test_index_search.py"]


def pytest_collection_modifyitems(config, items) -> None:
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    order = {id(item): i for i, item in enumerate(items)}
    items.sort(key=lambda item: (rank.get(item.path.name, len(rank)), order[id(item)]))


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


def kill_ray_processes(*temp_dirs: Path) -> None:
    """Kill the processes of the Ray nodes started with these temp dirs (each names its node's
    temp dir on its command line); `ray stop` would end every Ray on the machine."""
    import psutil

    for proc in psutil.process_iter(["cmdline"]):
        cmd = " ".join(proc.info["cmdline"] or [])
        if any(str(t) in cmd for t in temp_dirs):
            try:
                proc.kill()
            except psutil.NoSuchProcess:
                pass


@contextmanager
def ray_head(*args: str) -> Iterator[str]:
    """A Ray head started as a user starts one (`ray start --head`, no dashboard, every port
    free), up when this yields its address; killed afterwards. Jobs join it with RAY_ADDRESS
    instead of each starting and stopping a Ray of their own."""
    import shutil
    import subprocess
    import tempfile

    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}
    env.pop("RAY_ADDRESS", None)
    # short path: Ray's unix sockets live under the temp dir and must fit in 107 bytes
    temp = Path(tempfile.mkdtemp(prefix="rt", dir="/tmp"))
    gcs = free_port()
    try:
        subprocess.run([venv_bin("ray"), "start", "--head", f"--port={gcs}", "--include-dashboard=false",
                        f"--dashboard-agent-listen-port={free_port()}", f"--ray-client-server-port={free_port()}",
                        "--node-ip-address=127.0.0.1", f"--temp-dir={temp}", "--disable-usage-stats", *args],
                       check=True, env=env, capture_output=True, timeout=120)
        yield f"127.0.0.1:{gcs}"
    finally:
        kill_ray_processes(temp)
        shutil.rmtree(temp, ignore_errors=True)


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
