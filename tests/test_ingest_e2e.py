"""End to end: a dump whose URLs point at a loopback server of real memes -> Parquet shards.

Runs the real job script (`ray_jobs/ingest.py`) in a subprocess with a local Ray, the tiny
model and `--allow-private`: every image appears exactly once, a rerun is a no-op, and a run
killed with SIGKILL in the middle then rerun yields exactly the uninterrupted run's image ids.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from urllib.parse import quote, unquote

import numpy as np
import pyarrow.parquet as pq
import pytest
from conftest import ROOT, ray_head, shared_path

from memescale.config import load_config
from memescale.decode.image import decode_image
from memescale.embed.encoder import ImageTextEncoder
from memescale.index import Index
from memescale.index.weighting import Weighting
from memescale.ingest.urls import extract_image_refs
from memescale.shards.store import ShardStore, embeddings_of, read_shards
from memescale.testing.sample_data import ImageServer, image_files, sample_records, write_sample_dump

pytestmark = pytest.mark.slow  # Ray jobs end to end

N_IMAGES = 72
SERVERS: dict[Path, ImageServer] = {}  # the corpus's image server, by dump


def _ingest_cmd(dump: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, str(ROOT / "ray_jobs" / "ingest.py"), "--config", str(ROOT / "configs" / "tiny.toml"),
            "--dumps", str(dump), "--out", str(out), "--allow-private", "--no-progress", *extra]


def _run(cmd: list[str], timeout: float = 240, ray_address: str = "") -> dict:
    env = {**os.environ, "RAY_ADDRESS": ray_address} if ray_address else None
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT, env=env)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout[proc.stdout.index("{"):])


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    memes = shared_path("images", "memes")
    names = image_files(memes)[:N_IMAGES]
    tmp = tmp_path_factory.mktemp("ingest")
    with ImageServer(memes, delay_s=0.02) as srv:
        records = sample_records(names, srv.base_url)
        dump = write_sample_dump(tmp / "RS_2020-09.zst", records)
        expected = {r.image_id: r for rec in records for r in extract_image_refs(rec)}
        SERVERS[dump] = srv
        yield tmp, dump, expected


@pytest.fixture(scope="module")
def head():
    """One Ray head the module's later jobs join (the first, `full_ingest`, starts its own
    local Ray as a job without RAY_ADDRESS does)."""
    with ray_head("--num-cpus=2", f"--object-store-memory={512 * 2**20}") as address:
        yield address


@pytest.fixture(scope="module")
def full_ingest(corpus):
    tmp, dump, _ = corpus
    out = tmp / "full"
    return out, _run(_ingest_cmd(dump, out))


def test_every_image_exactly_once_and_rerun_is_noop(corpus, full_ingest, head):
    tmp, dump, expected = corpus
    out, summary = full_ingest
    table = read_shards(str(out))
    ids = table.column("image_id").to_pylist()
    assert len(ids) == len(set(ids)), "an image was written twice"
    assert set(ids) == set(expected), (set(expected) - set(ids), set(ids) - set(expected))
    assert summary["encoded"] == len(expected) and summary["refs"] == len(expected)
    assert summary["bad_lines"] >= 1 and summary["failed"] == {}
    emb = embeddings_of(table).astype(np.float32)
    assert emb.shape == (len(expected), 64)
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=2e-3)
    urls = dict(zip(ids, table.column("url").to_pylist()))
    assert all(urls[i] == expected[i].url for i in ids)
    assert "&amp;" not in "".join(urls.values())
    assert set(table.column("model").to_pylist()) == {"memescale-tiny-vit/random-seed0"}
    assert pq.ParquetFile(ShardStore(str(out)).shard_paths()[0]).metadata.row_group(0).column(0).compression == "ZSTD"

    before = {p: os.stat(p).st_mtime_ns for p in ShardStore(str(out)).shard_paths()}
    again = _run(_ingest_cmd(dump, out), ray_address=head)
    assert again["written_this_run"] == 0
    assert {p: os.stat(p).st_mtime_ns for p in ShardStore(str(out)).shard_paths()} == before


def test_kill_9_then_resume_with_retry_failed_gives_the_same_images(corpus, head):
    """The first run meets a host down (503) for one image of every chunk and is killed (at a
    crash point) after its first chunk; the rerun, with --retry-failed and the host back,
    redoes the rest and gives the failed images of the finished chunks their retry: every
    image exactly once."""
    tmp, dump, expected = corpus
    out = tmp / "killed"
    srv = SERVERS[dump]
    down = {r.url.split("?")[0].rsplit("/", 1)[-1] for _, refs in _run_plan_chunks(dump) for r in refs[:1]}
    srv.failing.update(unquote(name) for name in down)
    # SIGKILL at the 10th crash point the driver reaches: a chunk with rows and a failure
    # commits through 9 (its Parquet file, its failures file and its manifest entry, each
    # written, synced and renamed), so the kill lands as the second chunk is being written
    proc = subprocess.Popen(_ingest_cmd(dump, out), cwd=ROOT, start_new_session=True,
                            env={**os.environ, "MEMESCALE_CRASH_AT": "10", "RAY_ADDRESS": head},
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, err = proc.communicate(timeout=240)
    assert proc.returncode == -signal.SIGKILL, err.decode()[-3000:]
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # whatever the driver had started
    except ProcessLookupError:
        pass
    srv.failing.clear()
    finished = ShardStore(str(out)).done()
    total_chunks = len(_run_plan_chunks(dump))
    assert 0 < len(finished) < total_chunks, "the kill did not land in the middle of the run"
    failed = sum(r.failed.get("http_5xx", 0) for r in finished.values())
    assert failed == len(finished), "one image of each finished chunk failed"

    summary = _run(_ingest_cmd(dump, out, "--retry-failed"), ray_address=head)
    assert (summary["retried"], summary["recovered"], summary["failed"]) == (failed, failed, {})
    ids = read_shards(str(out), columns=["image_id"]).column("image_id").to_pylist()
    assert len(ids) == len(set(ids))
    assert set(ids) == set(expected)


def test_limit_and_date_filters_are_exact(corpus, head):
    tmp, dump, expected = corpus
    out = tmp / "limited"
    summary = _run(_ingest_cmd(dump, out, "--limit", "9", "--after", "2020-09-13"), ray_address=head)
    assert summary["posts"] == 9
    t = read_shards(str(out), columns=["created_utc", "post_id"])
    assert min(t.column("created_utc").to_pylist()) >= 1_599_955_200
    assert len(set(t.column("post_id").to_pylist())) <= 9


def test_build_then_search_finds_the_right_posts(corpus, full_ingest):
    tmp, _, expected = corpus
    out, _ = full_ingest
    proc = subprocess.run([sys.executable, str(ROOT / "ray_jobs" / "build_index.py"), "--config",
                           str(ROOT / "configs" / "tiny.toml"), "--embeddings", str(out), "--out", str(tmp / "index")],
                          capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((tmp / "index" / "build_summary.json").read_text())
    assert summary["vectors"] == len(expected)

    cfg = load_config(ROOT / "configs" / "tiny.toml")
    enc = ImageTextEncoder(cfg.model)
    memes = shared_path("images", "memes")
    names = image_files(memes)[:N_IMAGES:9]
    pixels = np.stack([decode_image((memes / n).read_bytes(), enc.image_size, cfg.ingest.max_pixels).pixels
                       for n in names])
    index = Index.open(tmp / "index")
    weighting = Weighting.load(tmp / "index")
    assert set(weighting.names) == {"recency"} and index.dim == weighting.dim == 64 + 2
    ids, _, _ = index.search(weighting.extend_queries(enc.encode_images(pixels)), 3, 64)
    by_file = {r.url.split("?")[0].rsplit("/", 1)[-1]: r for r in expected.values()}
    for name, row in zip(names, ids):
        meta = index.metadata(row[:1])[0]
        want = by_file[quote(name)]
        assert meta["image_id"] == want.image_id and meta["title"] == want.title, (name, meta)
        assert meta["permalink"] == want.permalink and meta["url"] == want.url
        assert index.vectors(row[:1])[0, :64].astype(np.float32) @ enc.encode_images(pixels[names.index(name)][None])[0] > 0.99


def test_missing_weights_exit_with_instructions(tmp_path, corpus):
    _, dump, _ = corpus
    proc = subprocess.run(
        [sys.executable, str(ROOT / "ray_jobs" / "ingest.py"), "--config", str(ROOT / "configs" / "gpu.toml"),
         "--dumps", str(dump), "--out", str(tmp_path / "o")],
        capture_output=True, text=True, timeout=120, cwd=ROOT, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 2
    assert "model.pretrained" in proc.stderr and "Hugging Face cache" in proc.stderr


def _run_plan_chunks(dump: Path) -> list:
    from memescale.config import load_config
    from memescale.ingest.chunks import plan_chunks

    cfg = load_config(ROOT / "configs" / "tiny.toml")
    return list(plan_chunks([str(dump)], cfg.ingest.chunk_posts, {}))


def test_a_config_asking_for_gpus_the_cluster_lacks_exits_with_a_message(tmp_path, head):
    """Ray would wait forever for the encoder's GPU; the job says so and exits instead."""
    dump = write_sample_dump(tmp_path / "RS_2020-01.zst", [])
    proc = subprocess.run(_ingest_cmd(dump, tmp_path / "o", "--set", "ingest.gpus_per_encoder=1",
                                      "--set", "ingest.encoder_actors=2"),
                          capture_output=True, text=True, timeout=120, cwd=ROOT, env={**os.environ, "RAY_ADDRESS": head})
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "ingest's encoder asks for 2 GPU(s) (2 x ingest.gpus_per_encoder=1) but the Ray cluster has 0" in proc.stderr
    assert not (tmp_path / "o").exists()

