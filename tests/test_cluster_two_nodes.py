"""Scale-out: a two-node Ray cluster on this machine (`ray start --head` + `ray start --address`,
each node with its own resources) runs the build submitted with `ray job submit`; shard tasks
land on both nodes and the index equals the one a single-node run builds. The job is submitted
with absolute paths, as on nodes with the project installed (README: with `--working-dir`
every worker recompiles the numba kernels)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import ROOT, free_port, kill_ray_processes, shared_path, venv_bin

from memescale.index.disk import INDEX_FILES
from memescale.testing.sample_data import write_vector_shards

pytestmark = pytest.mark.slow  # Ray jobs end to end


@pytest.fixture(scope="module")
def cluster():
    # jobs run the `python` on the PATH the cluster was started with: the project's venv
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0",
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    env.pop("RAY_ADDRESS", None)
    gcs, dash = free_port(), free_port()
    # short paths: Ray's unix sockets live under the temp dir and must fit in 107 bytes
    temp, temp_b = Path(tempfile.mkdtemp(prefix="ra", dir="/tmp")), Path(tempfile.mkdtemp(prefix="rb", dir="/tmp"))
    # every port explicit where Ray has a fixed default: other Ray instances on the machine
    # (and the two nodes here) must not collide
    common = ["--num-cpus=1", "--node-ip-address=127.0.0.1", "--object-store-memory=200000000",
              "--disable-usage-stats"]
    subprocess.run([venv_bin("ray"), "start", "--head", f"--port={gcs}", f"--dashboard-port={dash}",
                    "--dashboard-host=127.0.0.1", "--resources={\"node_a\": 1}", f"--temp-dir={temp}",
                    f"--dashboard-agent-listen-port={free_port()}", f"--ray-client-server-port={free_port()}",
                    *common], check=True, env=env, capture_output=True, timeout=120)
    try:
        # its own temp dir: two nodes on one machine must not share (and GC) each other's files
        subprocess.run([venv_bin("ray"), "start", f"--address=127.0.0.1:{gcs}", "--resources={\"node_b\": 1}",
                        f"--temp-dir={temp_b}", f"--dashboard-agent-listen-port={free_port()}", *common],
                       check=True, env=env, capture_output=True, timeout=120)
        yield f"http://127.0.0.1:{dash}", env
    finally:
        kill_ray_processes(temp, temp_b)
        shutil.rmtree(temp, ignore_errors=True)
        shutil.rmtree(temp_b, ignore_errors=True)


def test_build_submitted_to_two_nodes_equals_single_node_build(cluster, tmp_path):
    dashboard, env = cluster
    base = np.load(shared_path("ann", "pypi-minilm", "base.npy"))[:4000]
    write_vector_shards(tmp_path / "emb", base, per_file=1000)
    args = ["--config", str(ROOT / "configs" / "tiny.toml"), "--embeddings", str(tmp_path / "emb"), "--shards", "2",
            "--no-query-sample", "--set", "index.R=16", "--set", "index.L=32"]
    deadline = time.monotonic() + 90
    while True:  # the head's job agent takes a few seconds to come up after `ray start`
        sub = subprocess.run(
            [venv_bin("ray"), "job", "submit", "--address", dashboard, "--",
             "python", str(ROOT / "ray_jobs" / "build_index.py"), *args, "--out", str(tmp_path / "cluster")],
            cwd=ROOT, env=env, capture_output=True, text=True, timeout=400)
        if "No available agent" not in sub.stdout + sub.stderr or time.monotonic() > deadline:
            break
        time.sleep(2)
    assert sub.returncode == 0, sub.stdout[-6000:]
    summary = json.loads((tmp_path / "cluster" / "build_summary.json").read_text())
    nodes = {s["node"] for s in summary["shards"]}
    assert len(nodes) == 2, f"shard tasks ran on {len(nodes)} node(s): {summary['shards']}"

    local_env = {k: v for k, v in env.items() if k != "RAY_ADDRESS"}
    single = subprocess.run([sys.executable, "ray_jobs/build_index.py", *args, "--out", str(tmp_path / "single"),
                             "--set", "ray.include_dashboard=false"],
                            cwd=ROOT, env=local_env, capture_output=True, text=True, timeout=400)
    assert single.returncode == 0, single.stderr[-3000:]
    for name in INDEX_FILES:
        assert (tmp_path / "cluster" / name).read_bytes() == (tmp_path / "single" / name).read_bytes(), name
