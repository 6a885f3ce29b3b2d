"""Resume planning and chunk assembly, without Ray: the exactness the ingest job relies on."""

from __future__ import annotations

import json
import random
from dataclasses import asdict

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from memescale.config import CHOICES, ConfigError, load_config
from memescale.index.search import IO_MODES
from memescale.ingest.assembler import ChunkAssembler
from memescale.ingest.chunks import PostFilter, parse_date, plan_chunks
from memescale.shards.store import ShardStore, read_shards
from memescale.testing.sample_data import sample_records, write_sample_dump

NAMES = [f"img{i:03d}.jpg" for i in range(60)]


@pytest.fixture
def dump(tmp_path):
    return str(write_sample_dump(tmp_path / "RS_2021-01.zst", sample_records(NAMES, "http://127.0.0.1:9")))


def _posts(chunks):
    return [r.post_id for _, refs in chunks for r in refs]


def test_plan_covers_every_image_once(dump):
    chunks = list(plan_chunks([dump], 7, {}))
    urls = [r.url for _, refs in chunks for r in refs]
    assert len({u.split("?")[0].rsplit("/", 1)[-1] for u in urls}) == len(NAMES) == len(urls)
    assert sum(c.bad_lines for c, _ in chunks) >= 1
    assert [c.index for c, _ in chunks] == list(range(len(chunks)))


def test_resume_skips_done_chunks_and_limit_stays_exact(dump):
    full = list(plan_chunks([dump], 7, {}, limit=38))
    assert sum(c.posts for c, _ in full) == 38
    assert not full[-1][0].complete
    done = {c.key: c for c, _ in full[:2]}
    done.update({full[3][0].key: full[3][0]})
    rest = list(plan_chunks([dump], 7, done, limit=38))
    assert [c.index for c, _ in rest] == [c.index for c, _ in full if c.key not in done]
    assert sorted(_posts(rest) + _posts([full[0], full[1], full[3]])) == sorted(_posts(full))
    # the chunk cut by the limit is redone with the same rows, never counted as done
    done_all = {c.key: c for c, _ in full}
    again = list(plan_chunks([dump], 7, done_all, limit=38))
    assert [c.key for c, _ in again] == [full[-1][0].key]
    assert _posts(again) == _posts([full[-1]])


def test_post_filter_dates_and_sample(dump):
    after = parse_date("2020-09-14")
    kept = list(plan_chunks([dump], 7, {}, PostFilter(after=after)))
    assert all(r.created_utc >= after for _, refs in kept for r in refs)
    assert 0 < len(_posts(kept)) < len(_posts(list(plan_chunks([dump], 7, {}))))
    half = _posts(list(plan_chunks([dump], 7, {}, PostFilter(sample=0.5))))
    assert half == _posts(list(plan_chunks([dump], 7, {}, PostFilter(sample=0.5))))
    assert 0.2 < len(set(half)) / len(set(_posts(list(plan_chunks([dump], 7, {}))))) < 0.8


def _rows(result, refs, dim=4, fail=None):
    """Pipeline output rows of one chunk: ref i failed for reason fail[i] (default: ref 0 timed
    out), the others encoded."""
    n = len(refs) + 1
    fail = {0: "timeout"} if fail is None and refs else (fail or {})
    status = ["failed" if i in fail else "ok" for i in range(len(refs))] + ["marker"]
    return {
        "chunk": np.array([result.key] * n, dtype=object), "chunk_total": np.full(n, n),
        "seq": np.arange(n), "status": np.array(status, dtype=object),
        "reason": np.array([fail.get(i, "") for i in range(n)], dtype=object),
        "chunk_info": np.array([""] * len(refs) + [json.dumps(asdict(result))], dtype=object),
        **{c: np.array([getattr(r, c) for r in refs] + [blank], dtype=object if isinstance(blank, str) else None)
           for c, blank in (("image_id", -1), ("post_id", ""), ("image_index", -1), ("url", ""),
                            ("subreddit", ""), ("title", ""), ("author", ""), ("created_utc", 0),
                            ("score", 0), ("over_18", False), ("permalink", ""))},
        "final_url": np.array([r.url for r in refs] + [""], dtype=object),
        "mime": np.array(["image/jpeg"] * n, dtype=object), "bytes": np.full(n, 10),
        "content_hash": np.array(["h"] * n, dtype=object), "width": np.full(n, 5, dtype=np.int32),
        "height": np.full(n, 6, dtype=np.int32),
        "embedding": np.ones((n, dim), dtype=np.float16) / 2, "model": np.array(["m"] * n, dtype=object),
    }


def test_assembler_emits_each_chunk_once_in_input_order(dump, tmp_path):
    chunks = list(plan_chunks([dump], 7, {}))
    rows = [_rows(c, refs) for c, refs in chunks]
    pieces = []
    for b in rows:  # cut every chunk into pieces and shuffle the pieces across chunks
        cut = sorted(random.Random(1).sample(range(1, len(b["seq"])), min(2, len(b["seq"]) - 1)))
        for lo, hi in zip([0] + cut, cut + [len(b["seq"])]):
            pieces.append({k: v[lo:hi] for k, v in b.items()})
    random.Random(2).shuffle(pieces)
    asm = ChunkAssembler()
    store = ShardStore(str(tmp_path / "out"))
    emitted = []
    for p in pieces:
        for result, table, failures in asm.add(p):
            store.write_chunk(result, table, failures=failures)
            emitted.append(result.key)
    assert sorted(emitted) == sorted(c.key for c, _ in chunks) and not asm.pending()
    done = store.done()
    assert sum(r.failed.get("timeout", 0) for r in done.values()) == sum(1 for _, refs in chunks if refs)
    t = read_shards(str(tmp_path / "out"))
    expect = [r.image_id for _, refs in chunks for r in refs[1:]]
    assert sorted(t.column("image_id").to_pylist()) == sorted(expect)
    first = [r.image_id for r in chunks[0][1][1:]]
    assert t.column("image_id").to_pylist()[: len(first)] == first


def test_retry_passes_take_transient_failures_once_and_never_double(dump, tmp_path):
    """A chunk's transient failures (timeout, 5xx, ...) go to its failures file, permanent ones
    (404) do not; `plan_retries` plans one pass per chunk from the latest pass's failures (the
    same pass again after a crash), and the summary replaces retried failures by the pass's own."""
    from memescale.ingest.chunks import plan_retries
    from memescale.shards.store import summarize

    chunks = [(c, refs) for c, refs in plan_chunks([dump], 7, {}) if len(refs) >= 2]
    assert len(chunks) >= 3
    store = ShardStore(str(tmp_path / "out"))
    asm = ChunkAssembler()
    for c, refs in chunks:
        for result, table, failures in asm.add(_rows(c, refs, fail={0: "timeout", 1: "http_4xx"})):
            store.write_chunk(result, table, failures=failures)
    done = store.done()
    assert all(r.retry_file == f"_failed/{r.key}.parquet" for r in done.values())
    planned = list(plan_retries(done, store.read_failures))
    assert [(r.key, r.retry, r.retried, [x.image_id for x in rr]) for r, rr in planned] == [
        (f"{c.key}-r1", 1, {"timeout": 1}, [refs[0].image_id]) for c, refs in chunks]
    assert [r.key for r, _ in plan_retries(done, store.read_failures)] == [r.key for r, _ in planned]  # same again

    # the retry pass: the first chunk's image times out again, the others' arrive
    for j, (result, rr) in enumerate(planned):
        for res, table, failures in asm.add(_rows(result, rr, fail={0: "timeout"} if j == 0 else {})):
            store.write_chunk(res, table, failures=failures)
    done = store.done()
    total = summarize(list(done.values()))
    assert total["chunks"] == len(chunks) and total["refs"] == sum(len(refs) for _, refs in chunks)
    assert total["failed"] == {"timeout": 1, "http_4xx": len(chunks)}
    assert (total["retried"], total["recovered"]) == (len(chunks), len(chunks) - 1)
    ids = read_shards(str(tmp_path / "out"), columns=["image_id"]).column("image_id").to_pylist()
    assert len(ids) == len(set(ids)) == total["encoded"]
    assert set(ids) == {r.image_id for _, refs in chunks for r in refs[2:]} | {refs[0].image_id for _, refs in chunks[1:]}
    again = list(plan_retries(done, store.read_failures))
    assert [(r.key, [x.image_id for x in rr]) for r, rr in again] == [(f"{chunks[0][0].key}-r2", [chunks[0][1][0].image_id])]
    # a pass with nothing left to retry removes no data and plans nothing more
    assert not (tmp_path / "out" / "_failed" / f"{chunks[1][0].key}-r1.parquet").exists()


def test_an_image_twice_in_a_chunk_is_kept_once_and_not_retried_once_encoded(dump):
    """A repeated post: the copy that failed first does not hide the encoded one, and an image
    encoded from one copy is not put up for a retry by its failed other copy."""
    c, refs = next((c, refs) for c, refs in plan_chunks([dump], 7, {}) if len(refs) >= 3)
    twice = [refs[0], refs[0], refs[1], refs[2], refs[2]]
    c.refs = len(twice)
    [(result, table, failures)] = ChunkAssembler().add(_rows(c, twice, fail={0: "timeout", 3: "timeout",
                                                                                4: "http_5xx"}))
    assert sorted(table.column("image_id").to_pylist()) == sorted([refs[0].image_id, refs[1].image_id])
    assert result.encoded == 2 and "duplicate" not in result.discarded
    assert failures.column("image_id").to_pylist() == [refs[2].image_id]  # once, though it failed twice


def test_config_overrides_and_errors(tmp_path):
    cfg = load_config("configs/tiny.toml", ["ingest.download_concurrency=7", "model.precision=fp16"])
    assert cfg.ingest.download_concurrency == 7 and cfg.model.precision == "fp16"
    assert cfg.model.config_file.endswith("configs/models/memescale-tiny-vit.json")
    with pytest.raises(ConfigError, match="unknown config key ingest.nope"):
        load_config("configs/tiny.toml", ["ingest.nope=1"])
    with pytest.raises(ConfigError, match="expected int"):
        load_config("configs/tiny.toml", ["ingest.retries=many"])
    assert load_config("configs/tiny.toml", ["serve.index_io=direct"]).serve.index_io == "direct"
    with pytest.raises(ConfigError, match="serve.index_io: expected one of mmap, direct, got 'o_direct'"):
        load_config("configs/tiny.toml", ["serve.index_io=o_direct"])
    assert CHOICES["serve.index_io"] == IO_MODES  # the index opens exactly these
    bad = tmp_path / "bad.toml"
    bad.write_text("[modle]\nname='x'\n")
    with pytest.raises(ConfigError, match="unknown config section"):
        load_config(bad)
    for name in ("tiny", "cpu", "gpu", "cluster"):
        load_config(f"configs/{name}.toml")


def test_chunk_commits_are_durable_and_a_redone_empty_chunk_removes_its_stale_file(tmp_path, monkeypatch):
    """Rows are fsync'd before their rename and the manifest entry after them (file, then
    directory); a chunk redone after a crash that now yields no rows deletes the Parquet file
    the first attempt left, so the manifest and the files agree."""
    import os

    import memescale.shards.store as store_mod
    from memescale.shards.store import ChunkResult, shard_schema

    events: list[tuple[str, str]] = []
    real_file, real_dir = store_mod.fsync_file, store_mod.fsync_dir

    monkeypatch.setattr(store_mod, "fsync_file", lambda p: (events.append(("fsync", os.path.basename(p))),
                                                            real_file(p)))
    monkeypatch.setattr(store_mod, "fsync_dir", lambda p: (events.append(("fsync_dir", os.path.basename(p))),
                                                           real_dir(p)))
    store = ShardStore(str(tmp_path / "out"))
    schema = shard_schema(4)
    row = {f.name: [None] for f in schema}
    row.update(image_id=[7], post_id=["p7"], url=["https://i.example/7.jpg"], embedding=[[0.5, 0.5, 0.5, 0.5]])
    table = pa.Table.from_pydict(row, schema=schema)
    first = ChunkResult(dump="RS_2020-01.zst", index=3, first_line=0, lines=10, posts=1, encoded=1)
    store.write_chunk(first, table)
    part, entry = "part-RS_2020-01-000003.parquet", "RS_2020-01-000003.json"
    assert events == [("fsync", f".{part}.tmp"), ("fsync_dir", "out"),
                      ("fsync", f"{entry}.tmp"), ("fsync_dir", "_manifest")]
    assert (tmp_path / "out" / part).exists() and read_shards(str(tmp_path / "out")).num_rows == 1
    # the same chunk redone (a crash before its manifest entry, a source that changed): no rows now
    events.clear()
    again = ChunkResult(dump="RS_2020-01.zst", index=3, first_line=0, lines=10, posts=0, failed={"timeout": 1})
    store.write_chunk(again, None)
    assert not (tmp_path / "out" / part).exists()
    assert read_shards(str(tmp_path / "out")).num_rows == 0
    assert store.done()["RS_2020-01-000003"].file == "" and events[0] == ("fsync_dir", "out")
    assert not list((tmp_path / "out").rglob("*.tmp"))


WRITER = r'''
import json, sys
from dataclasses import asdict
import numpy as np
from memescale.ingest.assembler import ChunkAssembler
from memescale.ingest.chunks import PostFilter, plan_chunks
from memescale.shards.store import ShardStore

dump, out = sys.argv[1], sys.argv[2]
store = ShardStore(out)
asm = ChunkAssembler()
for result, refs in plan_chunks([dump], 7, store.done(), PostFilter(), None):  # resumes: done chunks skipped
    n = len(refs) + 1
    status = ["ok" if r.image_index % 3 else "failed" for r in refs] + ["marker"]
    rows = {
        "chunk": np.array([result.key] * n, dtype=object), "chunk_total": np.full(n, n), "seq": np.arange(n),
        "status": np.array(status, dtype=object),
        "reason": np.array(["timeout" if s == "failed" else "" for s in status], dtype=object),
        "chunk_info": np.array([""] * len(refs) + [json.dumps(asdict(result))], dtype=object),
        **{c: np.array([getattr(r, c) for r in refs] + [blank], dtype=object if isinstance(blank, str) else None)
           for c, blank in (("image_id", -1), ("post_id", ""), ("image_index", -1), ("url", ""),
                            ("subreddit", ""), ("title", ""), ("author", ""), ("created_utc", 0),
                            ("score", 0), ("over_18", False), ("permalink", ""))},
        "final_url": np.array([r.url for r in refs] + [""], dtype=object),
        "mime": np.array(["image/jpeg"] * n, dtype=object), "bytes": np.full(n, 10),
        "content_hash": np.array(["h"] * n, dtype=object), "width": np.full(n, 5, dtype=np.int32),
        "height": np.full(n, 6, dtype=np.int32),
        "embedding": (np.arange(n * 4).reshape(n, 4) % 7).astype(np.float16), "model": np.array(["m"] * n, dtype=object),
    }
    for done, table, failures in asm.add(rows):
        store.write_chunk(done, table, failures=failures)
'''


def test_shard_writes_killed_at_seeded_points_lose_and_double_nothing(dump, tmp_path):
    """The ingest driver's commit path (assembler -> shard -> manifest), run as a process and
    killed with SIGKILL at 5 seeded points among the store's crash points, rerun after each
    kill, then to the end: the same manifest, the same rows, no duplicates and no leftovers
    as one uninterrupted run."""
    import os
    import subprocess
    import sys

    script = tmp_path / "writer.py"
    script.write_text(WRITER)

    def run(out, **env) -> int:
        return subprocess.run([sys.executable, str(script), dump, str(out)], env={**os.environ, **env},
                              capture_output=True, timeout=300).returncode

    log = tmp_path / "points.log"
    assert run(tmp_path / "ref", MEMESCALE_CRASH_LOG=str(log)) == 0
    points = log.read_text().split()
    assert {"store.tmp_written", "store.renamed", "store.manifest_tmp_written"} <= set(points)
    rng = random.Random(19)
    out, kills = tmp_path / "out", 0
    for _ in range(5):
        log.write_text("")
        rc = run(out, MEMESCALE_CRASH_AT=str(rng.randint(1, max(1, len(points) // 2))), MEMESCALE_CRASH_LOG=str(log))
        kills += rc == -9
        assert rc in (0, -9)
    assert kills >= 4
    assert run(out) == 0
    ref, got = ShardStore(str(tmp_path / "ref")), ShardStore(str(out))
    assert {k: asdict(v) for k, v in got.done().items()} == {k: asdict(v) for k, v in ref.done().items()}
    a, b = read_shards(str(tmp_path / "ref")), read_shards(str(out))
    assert b.num_rows == a.num_rows > 0 and len(set(b.column("image_id").to_pylist())) == b.num_rows
    assert b.sort_by("image_id").equals(a.sort_by("image_id"))
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in (tmp_path / "ref").iterdir())
    fails = sorted(p.name for p in (out / "_failed").iterdir())
    assert fails == sorted(p.name for p in (tmp_path / "ref" / "_failed").iterdir()) and fails
    for name in fails:
        assert pq.read_table(out / "_failed" / name).equals(pq.read_table(tmp_path / "ref" / "_failed" / name))
