"""Against a Ray head started as a user starts one (`ray start --head`, dashboard on, a fixed
metrics export port): Ray's metrics export carries an ingest job's counts (what Prometheus
and the Grafana dashboard in configs/grafana/ read), and `serve deploy configs/serve.yaml`
(with the tiny config and a small index substituted) serves the API."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections import defaultdict
from pathlib import Path

import pytest
from conftest import ROOT, free_port, kill_ray_processes, venv_bin

from memescale.testing.sample_data import ImageServer, image_files, sample_records, write_sample_dump
from memescale.testing.sample_index import write_images

pytestmark = pytest.mark.slow

DASHBOARD = ROOT / "configs" / "grafana" / "memescale.json"
_LINE = re.compile(r"^(\w+)\{([^}]*)\} (\S+)$")


def scrape(port: int) -> dict[str, float]:
    """Sum of each metric over its series (workers), by name."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    out: dict[str, float] = defaultdict(float)
    for line in text.splitlines():
        m = _LINE.match(line)
        if m and m.group(1).startswith("ray_memescale_"):
            out[m.group(1)] += float(m.group(3))
    return out


def _blocking_head(tmp: Path, env: dict) -> tuple[subprocess.Popen, dict]:
    """`ray start --head --block` with every port that has a fixed default made explicit (other
    Ray instances of the suite run beside it); up once its metrics endpoint answers. Fails with
    the command's output and Ray's process-exit log when it exits or stays down."""
    gcs, metrics, dashboard = free_port(), free_port(), free_port()
    log = open(tmp / "ray-start.log", "wb")
    proc = subprocess.Popen([venv_bin("ray"), "start", "--head", "--block", f"--port={gcs}",
                             f"--metrics-export-port={metrics}", f"--dashboard-agent-listen-port={free_port()}",
                             f"--ray-client-server-port={free_port()}", "--num-cpus=2", "--include-dashboard=true",
                             f"--dashboard-port={dashboard}", "--dashboard-host=127.0.0.1",
                             "--node-ip-address=127.0.0.1", f"--temp-dir={tmp}"],
                            env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    log.close()
    deadline = time.monotonic() + 120  # a dashboard head starts slowly beside a busy suite
    while True:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{metrics}/metrics", timeout=2)
            return proc, {"address": f"127.0.0.1:{gcs}", "metrics": metrics, "env": env,
                          "dashboard": f"http://127.0.0.1:{dashboard}"}
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                exits = "".join(f.read_text(errors="replace") for f in tmp.glob("session_*/logs/ray_process_exit.log"))
                _stop(proc)
                raise RuntimeError(f"ray start --head did not come up (exit code {proc.poll()}):\n"
                                   f"{(tmp / 'ray-start.log').read_text(errors='replace')[-3000:]}\n{exits[-3000:]}") from None
            time.sleep(0.2)


def _stop(proc: subprocess.Popen) -> None:
    for sig, wait in ((signal.SIGTERM, 5), (signal.SIGKILL, 30)):
        try:  # a blocking `ray start` lingers for half a minute on SIGTERM; its processes are disposable
            os.killpg(proc.pid, sig)
            proc.wait(wait)
            return
        except ProcessLookupError:
            return
        except subprocess.TimeoutExpired:
            continue


@pytest.fixture(scope="module")
def head():
    # short path: Ray's unix sockets live under the temp dir and must fit in 107 bytes
    tmp = Path(tempfile.mkdtemp(prefix="rh", dir="/tmp"))
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0",
           "RAY_metrics_report_interval_ms": "500"}
    proc = None
    try:
        try:
            proc, info = _blocking_head(tmp, env)
        except RuntimeError as first:  # a port taken between free_port() and Ray's bind: once more
            kill_ray_processes(tmp)
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir()
            try:
                proc, info = _blocking_head(tmp, env)
            except RuntimeError as second:
                pytest.fail(f"{first}\n--- second try ---\n{second}")
        yield info
    finally:
        if proc is not None:
            _stop(proc)
        kill_ray_processes(tmp)
        shutil.rmtree(tmp, ignore_errors=True)


def test_ingest_counters_in_rays_metrics_export_match_the_jobs_summary(head, tmp_path):
    write_images(tmp_path / "img", 12)
    with ImageServer(tmp_path / "img") as srv:
        dump = write_sample_dump(tmp_path / "RS_2020-01.zst", sample_records(image_files(tmp_path / "img"),
                                                                             srv.base_url))
        proc = subprocess.run(
            [sys.executable, str(ROOT / "ray_jobs" / "ingest.py"), "--config", str(ROOT / "configs" / "tiny.toml"),
             "--dumps", str(dump), "--out", str(tmp_path / "out"), "--allow-private", "--no-progress"],
            env={**head["env"], "RAY_ADDRESS": head["address"]}, capture_output=True, text=True, timeout=240,
            cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(proc.stdout[proc.stdout.index("{"):])
    want = {"ray_memescale_ingest_posts_read_total": summary["posts"],
            "ray_memescale_ingest_images_found_total": summary["refs"],
            "ray_memescale_ingest_images_encoded_total": summary["encoded"],
            "ray_memescale_ingest_bytes_total": summary["bytes"],
            "ray_memescale_ingest_bad_lines_total": summary["bad_lines"]}
    assert summary["encoded"] == 12 and summary["bad_lines"] >= 0
    deadline = time.monotonic() + 60
    got = scrape(head["metrics"])
    while any(got.get(k, 0) != v for k, v in want.items()) and time.monotonic() < deadline:
        time.sleep(0.5)  # workers report every RAY_metrics_report_interval_ms
        got = scrape(head["metrics"])
    assert {k: got.get(k, 0) for k in want} == {k: float(v) for k, v in want.items()}
    assert got["ray_memescale_ingest_fetch_seconds_count"] == summary["encoded"]


def test_serve_deploy_of_the_shipped_serve_yaml(head, tmp_path):
    import requests
    import yaml

    from memescale.testing.sample_index import build_sample_index, sample_corpus

    x, md = sample_corpus(200, 64, seed=2)
    build_sample_index(tmp_path / "index", x, md)
    spec = yaml.safe_load((ROOT / "configs" / "serve.yaml").read_text())
    port = free_port()
    spec["http_options"].update(host="127.0.0.1", port=port)
    app = spec["applications"][0]
    assert app["import_path"] == "serve.app:build_app" and app["args"]["config"] == "configs/gpu.toml"
    app["args"].update(index=str(tmp_path / "index"), config=str(ROOT / "configs" / "tiny.toml"))
    (tmp_path / "serve.yaml").write_text(yaml.safe_dump(spec))
    serve_cli = [venv_bin("serve")]
    env = {**head["env"], "RAY_ADDRESS": head["address"]}
    proc = subprocess.run([*serve_cli, "deploy", str(tmp_path / "serve.yaml"), "-a", head["dashboard"]],
                          env=env, capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 240
        while True:  # serve deploy returns at once; the app comes up in the background
            try:
                if requests.get(base + "/api/health", timeout=5).status_code == 200:
                    break
            except requests.RequestException:
                pass
            assert time.monotonic() < deadline, "the deployed app never answered /api/health"
            time.sleep(1)
        r = requests.post(base + "/api/search", json={"embedding": x[5].tolist(), "k": 3, "dedup": False,
                                                      "filters": {"nsfw": True}}, timeout=60)
        assert r.status_code == 200, r.text
        assert r.json()["results"][0]["id"] == 5
        assert requests.get(base + "/api/info", timeout=10).json()["size"] == 200
    finally:
        subprocess.run([*serve_cli, "shutdown", "-y", "-a", head["dashboard"]], env=env, capture_output=True,
                       timeout=120)


def test_the_dashboard_queries_name_metrics_the_project_emits():
    """Every metric a panel of configs/grafana/memescale.json queries is declared in
    memescale.metrics (with Ray's prefix and Prometheus' suffixes)."""
    from memescale.metrics import METRICS

    board = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in board["panels"] for t in p.get("targets", [])]
    assert len(exprs) >= 12
    names = set(re.findall(r"\bray_memescale_\w+", " ".join(exprs)))
    declared = set()
    for name, (kind, *_rest) in METRICS.items():
        base = "ray_" + name
        declared |= {base + "_total"} if kind == "counter" else (
            {base} if kind == "gauge" else {base + "_bucket", base + "_sum", base + "_count"})
    assert names and names <= declared, names - declared
    stages = {p["title"].split(":")[0] for p in board["panels"] if p.get("type") != "row"}
    assert {"Ingest", "Build", "Serve"} <= stages
