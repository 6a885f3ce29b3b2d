"""The work corpus: streaming collection from shards of any row-group size, its fingerprinted
phase folder (reuse and re-collection), metadata reads by node id, the index-vector phase,
the title sample, and the driver's memory while collecting and weighting."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import types

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from memescale.build import stages
from memescale.build.fingerprint import Phase, input_fingerprint, phase_fingerprint
from memescale.index.weighting import fit_weighting
from memescale.shards import corpus as corpus_mod
from memescale.shards.corpus import NODE_FIELDS, collect_corpus
from memescale.shards.store import ShardStore, read_shards
from memescale.testing.sample_data import write_vector_shards


def _add_columns(emb, columns: dict[str, np.ndarray]) -> None:
    """Append columns (N values over all shards, in order) to the shards, as curate does."""
    lo = 0
    for path in ShardStore(str(emb)).shard_paths():
        t = pq.read_table(path)
        for name, values in columns.items():
            t = t.append_column(name, pa.array(values)[lo:lo + t.num_rows])
        lo += t.num_rows
        pq.write_table(t, path)


def _vectors(n: int, d: int, seed: int = 0) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal((n, d)).astype(np.float32)
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float16)


def test_any_row_group_size_gives_the_vectors_in_order(tmp_path):
    """A shard with one row group larger than `batch_rows` (the batches are slices of it,
    whose FixedSizeList `.values` is the whole row group's buffer) is collected exactly."""
    x = _vectors(5000, 24)
    write_vector_shards(tmp_path / "emb", x[:2500], per_file=2500)
    write_vector_shards(tmp_path / "emb", x[2500:], per_file=2500, first_row=2500)
    paths = ShardStore(str(tmp_path / "emb")).shard_paths()
    assert [pq.ParquetFile(p).metadata.num_row_groups for p in paths] == [1, 1]
    corpus = collect_corpus(str(tmp_path / "emb"), tmp_path / "work", batch_rows=700)
    assert corpus.vectors.dtype == np.float16 and corpus.vectors.shape == (5000, 24)
    np.testing.assert_array_equal(np.asarray(corpus.vectors), x)
    ids = corpus.column("image_id").to_numpy()
    np.testing.assert_array_equal(ids, 10**12 + np.arange(5000))
    assert corpus.schema.names == NODE_FIELDS


def test_shards_keep_dictionaries_off_the_embeddings_only(tmp_path):
    """The embedding column's pages are plain (a dictionary of near-unique vectors overflows
    and makes reads several times slower); the string columns keep theirs."""
    write_vector_shards(tmp_path / "emb", _vectors(3000, 24), per_file=3000)
    meta = pq.ParquetFile(ShardStore(str(tmp_path / "emb")).shard_paths()[0]).metadata.row_group(0)
    enc = {meta.column(c).path_in_schema: meta.column(c).encodings for c in range(meta.num_columns)}
    assert not any("DICTIONARY" in e for e in enc["embedding.list.element"]), enc
    assert any("DICTIONARY" in e for e in enc["subreddit"]), enc


def test_collect_is_reused_and_redone_when_inputs_or_fields_change(tmp_path, monkeypatch):
    monkeypatch.setattr(corpus_mod, "META_ROW_GROUP", 1000)
    emb, work = tmp_path / "emb", tmp_path / "work"
    x = _vectors(6000, 16)
    write_vector_shards(emb, x[:4000], per_file=2000)
    first = collect_corpus(str(emb), work, batch_rows=512)
    assert not first.reused and len(first) == 4000 and first.meta_path == work / "corpus" / "meta.parquet"
    md = pq.ParquetFile(first.meta_path).metadata
    assert [md.row_group(g).num_rows for g in range(md.num_row_groups)] == [1000] * 4
    again = collect_corpus(str(emb), work, batch_rows=512)
    assert again.reused and again.fingerprint == first.fingerprint and len(again) == 4000

    write_vector_shards(emb, x[4000:], per_file=2000, first_row=4000)  # a new month's shard
    grown = collect_corpus(str(emb), work)
    assert not grown.reused and grown.fingerprint != first.fingerprint and len(grown) == 6000
    np.testing.assert_array_equal(np.asarray(grown.vectors), x)
    assert grown.metadata([5999])[0]["image_id"] == 10**12 + 5999

    fewer = collect_corpus(str(emb), work, fields=["image_id", "score"])
    assert not fewer.reused and fewer.schema.names == ["image_id", "score"] and len(fewer) == 6000
    assert collect_corpus(str(emb), work, fields=["image_id", "score"]).reused

    # a shard rewritten with other rows (another size) is collected again
    path = ShardStore(str(emb)).shard_paths()[0]
    t = pq.read_table(path).slice(0, 1500)
    pq.write_table(t, path)
    changed = collect_corpus(str(emb), work, fields=["image_id", "score"])
    assert not changed.reused and len(changed) == 5500
    np.testing.assert_array_equal(np.asarray(changed.vectors), np.concatenate([x[:1500], x[2000:]]))


def test_skip_duplicates_and_missing_optional_fields(tmp_path):
    x = _vectors(300, 8)
    dup = np.full(300, None, dtype=object)
    dup[[3, 150, 299]] = 10**12
    write_vector_shards(tmp_path / "emb", x, per_file=150)
    _add_columns(tmp_path / "emb", {"dup_of": pa.array(dup, pa.int64()), "meme": np.linspace(0, 1, 300)})
    second = ShardStore(str(tmp_path / "emb")).shard_paths()[1]
    pq.write_table(pq.read_table(second).drop_columns(["meme"]), second)  # a shard without the field
    c = collect_corpus(str(tmp_path / "emb"), tmp_path / "w")
    keep = np.setdiff1d(np.arange(300), [3, 150, 299])
    np.testing.assert_array_equal(np.asarray(c.vectors), x[keep])
    assert "meme" in c.schema.names and c.column("image_id").to_pylist() == list(10**12 + keep)
    meme = c.column("meme").to_pylist()
    assert meme[:149] == list(np.linspace(0, 1, 300)[keep[:149]]) and meme[149:] == [None] * 148
    every = collect_corpus(str(tmp_path / "emb"), tmp_path / "w", skip_duplicates=False)
    assert not every.reused and len(every) == 300


def test_metadata_reads_the_rows_asked_for(tmp_path, monkeypatch):
    monkeypatch.setattr(corpus_mod, "META_ROW_GROUP", 700)
    write_vector_shards(tmp_path / "emb", _vectors(5000, 8), per_file=1200)
    c = collect_corpus(str(tmp_path / "emb"), tmp_path / "work", batch_rows=300)
    assert pq.ParquetFile(c.meta_path).metadata.num_row_groups == 8
    want = read_shards(str(tmp_path / "emb"), columns=NODE_FIELDS).to_pylist()
    for ids in ([0], [4999], [699, 700, 701], [4000, 3, 3, 2500, 699], list(range(0, 5000, 97))):
        assert c.metadata(np.array(ids)) == [want[i] for i in ids], ids
    assert c.metadata([]) == [] and c.rows([], ["title"]).column_names == ["title"]
    assert c.metadata([12, 1], columns=["title", "score"]) == [{"title": "post 12", "score": 12},
                                                               {"title": "post 1", "score": 1}]
    assert c.column("title", [4999, 0]).to_pylist() == ["post 4999", "post 0"]
    batches = list(c.metadata_batches(1000, columns=["image_id"]))
    assert all(b.num_rows <= 1000 for b in batches) and sum(b.num_rows for b in batches) == 5000
    assert pa.Table.from_batches(batches).column("image_id").to_pylist() == [r["image_id"] for r in want]
    with pytest.raises(IndexError):
        c.metadata([5000])


def test_phase_folder_and_fingerprints(tmp_path):
    write_vector_shards(tmp_path / "emb", _vectors(100, 4), per_file=50)
    fp = input_fingerprint(str(tmp_path / "emb"))
    assert fp == input_fingerprint(str(tmp_path / "emb")) and len(fp) == 64
    assert phase_fingerprint(fp, a=1, b=[1, 2]) == phase_fingerprint(fp, b=[1, 2], a=1)
    assert phase_fingerprint(fp, a=1) != phase_fingerprint(fp, a=2) != phase_fingerprint("x", a=2)
    p = Phase(tmp_path / "work", "thing", phase_fingerprint(fp, a=1))
    assert not p.is_complete()
    p.start()
    (p.dir / "out.bin").write_bytes(b"x")
    assert not p.is_complete()  # interrupted before finish: redone
    p.finish(rows=3)
    assert p.is_complete() and p.info() == {"rows": 3}
    q = Phase(tmp_path / "work", "thing", phase_fingerprint(fp, a=2))
    assert not q.is_complete() and q.info() == {}
    q.start()
    assert list(q.dir.iterdir()) == []  # the stale output is gone
    write_vector_shards(tmp_path / "emb", _vectors(50, 4), per_file=50, first_row=100)
    assert input_fingerprint(str(tmp_path / "emb")) != fp


def test_index_vectors_phase(tmp_path):
    n, d = 3000, 8
    x = _vectors(n, d)
    rng = np.random.default_rng(1)
    write_vector_shards(tmp_path / "emb", x, per_file=1000)
    _add_columns(tmp_path / "emb", {"meme": rng.random(n)})
    c = collect_corpus(str(tmp_path / "emb"), tmp_path / "work")
    w = stages.fit_weights(c, 0.2, seed=0)
    assert w.names == ("meme", "recency")
    all_meta = c.metadata()
    np.testing.assert_array_equal(w.quantiles["meme"][0], fit_weighting(all_meta, d, 0.2).quantiles["meme"][0])

    phase = Phase(c.work_dir, "index_vectors", phase_fingerprint(c.fingerprint, weight_beta=0.2, seed=0))
    out = stages.write_index_vectors(c, w, phase, block=700)
    assert phase.is_complete() and out.shape == (n, w.dim) and out.dtype == np.float16
    np.testing.assert_array_equal(out, w.extend_base(np.asarray(c.vectors), all_meta).astype(np.float16))
    mtime = os.stat(phase.dir / stages.INDEX_VECTORS).st_mtime_ns
    stages.write_index_vectors(c, w, phase)  # complete: reused as it is
    assert os.stat(phase.dir / stages.INDEX_VECTORS).st_mtime_ns == mtime

    w2 = stages.fit_weights(c, 0.4, seed=0)
    other = Phase(c.work_dir, "index_vectors", phase_fingerprint(c.fingerprint, weight_beta=0.4, seed=0))
    assert not other.is_complete()
    out2 = stages.write_index_vectors(c, w2, other)
    np.testing.assert_array_equal(out2, w2.extend_base(np.asarray(c.vectors), all_meta).astype(np.float16))


def test_query_sample_reads_only_drawn_titles(tmp_path, monkeypatch):
    n = 1000
    titles = np.array([f"post {i}" if i % 3 == 0 else "" for i in range(n)], dtype=object)
    write_vector_shards(tmp_path / "emb", _vectors(n, 8), per_file=500, overrides={"title": titles})
    c = collect_corpus(str(tmp_path / "emb"), tmp_path / "work")
    seen: list[str] = []

    class FakeEncoder:
        def __init__(self, model):
            pass

        def encode_texts(self, texts):
            seen.extend(texts)
            return np.ones((len(texts), 8), np.float32) / np.sqrt(8)

    monkeypatch.setitem(sys.modules, "memescale.embed.encoder", types.SimpleNamespace(ImageTextEncoder=FakeEncoder))
    w = stages.fit_weights(c, 0.0, 0)
    q = stages.query_sample(None, c, w, n=100, seed=3)
    assert q is not None and q.shape == (len(seen), w.dim)
    assert len(seen) == 100 and len(set(seen)) == 100 and all(t.startswith("post ") for t in seen)
    assert seen == [t for t in seen if int(t.split()[1]) % 3 == 0]
    seen.clear()
    assert stages.query_sample(None, c, w, n=10, seed=3) is not None and len(seen) == 10


MEMORY_CHILD = r"""
import json, sys
from memescale.build import stages
from memescale.build.fingerprint import Phase, phase_fingerprint
from memescale.memwatch import PeakRssAnon

emb, work = sys.argv[1], sys.argv[2]
with PeakRssAnon(interval_s=0.002) as peak:
    corpus = stages.collect_corpus(emb, work)
    weighting = stages.fit_weights(corpus, 0.2, 0)
    phase = Phase(work, "index_vectors", phase_fingerprint(corpus.fingerprint, weight_beta=0.2, seed=0))
    out = stages.write_index_vectors(corpus, weighting, phase)
print(json.dumps({"growth": peak.growth_bytes, "n": len(corpus), "dim": out.shape[1]}))
"""


def test_collect_and_weighting_memory_is_bounded(tmp_path):
    """RssAnon growth of collect_corpus + fit_weights + write_index_vectors over N rows stays
    within a fixed 64 MiB plus 24 bytes per row (all metadata in one table, or one dict per
    row at once, would exceed it)."""
    n, d = 300_000, 64
    x = _vectors(n, d)
    write_vector_shards(tmp_path / "emb", x, per_file=50_000)
    env = {**os.environ, "ARROW_DEFAULT_MEMORY_POOL": "system"}
    out = subprocess.run([sys.executable, "-c", MEMORY_CHILD, str(tmp_path / "emb"), str(tmp_path / "work")],
                         capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stderr
    res = json.loads(out.stdout.strip().splitlines()[-1])
    print(res)
    assert res["n"] == n and res["dim"] == d + 2
    assert res["growth"] < (64 << 20) + 24 * n, res
    vectors = np.load(tmp_path / "work" / "corpus" / "vectors.npy", mmap_mode="r")
    np.testing.assert_array_equal(vectors[::1000], x[::1000])
