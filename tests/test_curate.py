"""Curate: placeholder and NSFW filters, duplicate clusters (synthetic and re-encoded memes),
the per-file transform, and `ray_jobs/curate.py` end to end into the index build."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from conftest import ROOT, shared_path, start_local_ray

from memescale.config import load_config
from memescale.curate.decide import DECIDE_FIELDS, decide, file_offsets
from memescale.curate.dedup import cluster, dictionary_codes, keep_best, lsh_shape
from memescale.curate.screens import placeholder_masks, train_nsfw_probe
from memescale.shards.corpus import CURATE_FIELDS, collect_corpus
from memescale.shards.store import read_shards, shard_schema
from memescale.testing.sample_data import image_files, write_vector_shards

TINY = str(ROOT / "configs/tiny.toml")


def unit_rows(n: int, d: int, seed: int) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def near_copy(x: np.ndarray, cosine: float, seed: int) -> np.ndarray:
    """Unit vectors at exactly `cosine` to each row of `x`."""
    noise = unit_rows(len(x), x.shape[1], seed)
    noise -= (noise * x).sum(1, keepdims=True) * x
    noise /= np.linalg.norm(noise, axis=1, keepdims=True)
    return cosine * x + math.sqrt(1 - cosine**2) * noise


# ---- filters ---------------------------------------------------------------------------------

def test_placeholders_by_hash_and_by_embedding():
    x = unit_rows(200, 32, 0)
    ref = unit_rows(2, 32, 1)
    x[10], x[11] = near_copy(ref[:1], 0.99, 2)[0], near_copy(ref[1:], 0.9, 3)[0]
    hashes = np.array([f"h{i}" for i in range(200)], dtype=object)
    hashes[5] = hashes[10] = "bad"
    by_hash, by_emb = placeholder_masks(hashes, x.astype(np.float16), ["bad"], ref, 0.95, batch=64)
    assert np.flatnonzero(by_hash).tolist() == [5, 10]
    assert np.flatnonzero(by_emb).tolist() == []  # 10 is counted once, by hash; 11 is too far
    by_hash, by_emb = placeholder_masks(hashes, x.astype(np.float16), [], ref, 0.95)
    assert not by_hash.any() and np.flatnonzero(by_emb).tolist() == [10]


def test_nsfw_probe_finds_the_direction_and_reports_held_out_precision_recall():
    rng = np.random.default_rng(0)
    x = unit_rows(3000, 48, 4)
    nsfw = rng.random(3000) < 0.1
    direction = unit_rows(1, 48, 5)[0]
    x[nsfw] += 0.6 * direction
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    labels = nsfw & (rng.random(3000) < 0.8)  # a fifth of the NSFW posts are not flagged
    probe, rep = train_nsfw_probe(x, labels, np.arange(3000), holdout=0.25, threshold=0.9,
                                  min_positives=20, max_train=100_000)
    assert rep.trained and rep.test_rows == 750 and rep.positives == labels.sum()
    assert rep.auc > 0.95 and rep.precision > 0.75 and rep.recall > 0.6
    unflagged = nsfw & ~labels
    caught = (probe.predict(x[unflagged]) >= 0.9).mean()
    clean = (probe.predict(x[~nsfw]) >= 0.9).mean()
    assert caught > 0.6 and clean < 0.01, (caught, clean)
    probe, rep = train_nsfw_probe(x, labels & (np.arange(3000) < 100), np.arange(3000), holdout=0.25,
                                  threshold=0.9, min_positives=20, max_train=100_000)
    assert probe is None and "need 20" in rep.reason


# ---- dedup -----------------------------------------------------------------------------------

@pytest.mark.parametrize("cosine", [0.95, 0.998])
def test_lsh_shape_reaches_the_recall_asked(cosine):
    for n in (1000, 10**6, 10**9):
        shape = lsh_shape(cosine, 0.99, n)
        assert shape.collision(cosine) >= 0.99 and shape.bits <= 64
        assert shape.collision(0.5) < 0.1
        # unrelated (orthogonal) rows met per row stay bounded as n grows: ~8 per band
        assert n * shape.collision(0.0) <= 8 * shape.bands
    assert lsh_shape(0.95, 0.99, 10**9).bits > lsh_shape(0.95, 0.99, 1000).bits  # buckets stay small


def test_near_duplicates_found_without_false_joins_and_best_member_kept():
    n, d = 20_000, 64
    x = unit_rows(n, d, 6)
    src, dst = np.arange(0, 600, 2), np.arange(1, 600, 2)
    x[dst] = near_copy(x[src], 0.96, 7)
    x[600:700] = near_copy(x[700:800], 0.9, 8)  # below the threshold: must stay apart
    url = np.array([f"u{i}" for i in range(n)], dtype=object)
    url[900] = url[901] = "same"  # exact duplicate by URL though far apart in embedding
    parent, rep = cluster(x.astype(np.float16), np.arange(n), {"url": dictionary_codes(url)},
                          cosine=0.95, recall=0.99, max_bucket=2048)
    score = np.zeros(n, np.int64)
    score[dst] = 5  # the copies have the higher post score: they are kept
    dup = keep_best(parent, score, np.zeros(n), np.arange(n), rep)
    assert (dup[src] == dst).all() and (dup[dst] == -1).all()
    assert (dup[600:800] == -1).all()
    assert dup[901] == 900 and dup[900] == -1
    assert rep.exact_joins == {"url": 1} and rep.near_joins == 300
    assert rep.duplicates == 301 and rep.clusters == 301 and rep.largest_cluster == 2
    assert rep.compared < 0.01 * n * n / 2  # candidates only: under 1% of all pairs


def test_huge_bucket_is_verified_against_leaders():
    base = unit_rows(3, 32, 9)
    x = np.repeat(base, [500, 400, 1], axis=0)  # 900 identical copies in two groups
    parent, rep = cluster(x.astype(np.float16), np.arange(len(x)), {}, cosine=0.95, recall=0.99,
                          max_bucket=8)
    dup = keep_best(parent, np.zeros(len(x)), np.zeros(len(x)), np.arange(len(x)), rep)
    assert rep.buckets_over_cap > 0 and rep.unverified == 0
    assert rep.clusters == 2 and rep.duplicates == 499 + 399 and dup[900] == -1
    assert rep.compared < 900 * 8 * rep.bands


@pytest.mark.slow
def test_reencoded_memes_are_found_by_the_configured_model():
    """The shared memes, each with a JPEG q50, a half-size and a 5%-cropped copy, encoded by
    the tiny random-weight model at its configured threshold (see bench/dedup_memes.py for the
    full set and other thresholds)."""
    folder = shared_path("images", "memes")
    from bench.dedup_memes import encode_memes, pair_recall

    cfg = load_config(TINY)
    names = sorted(image_files(folder), key=lambda name: (folder / name).stat().st_size)[:40]
    emb, meme, kind = encode_memes(cfg, folder, names)
    r = pair_recall(emb, meme, kind, cfg.curate.near_dup_cosine, cfg.curate.lsh_recall, cfg.curate.lsh_max_bucket)
    assert r["recall_jpeg_q50"] == 1.0 and r["recall_resized"] >= 0.95
    assert r["memes_in_mixed_clusters"] <= 0.35 * (meme.max() + 1)


# ---- decide and the job ----------------------------------------------------------------------

def make_input(tmp_path: Path, n: int = 1200, d: int = 64,
               plant: dict[int, np.ndarray] | None = None) -> tuple[Path, dict]:
    """Ingest-style shards with planted placeholders, NSFW, exact and near duplicates;
    `plant` sets given rows' embeddings."""
    x = unit_rows(n, d, 10)
    ids = np.arange(n)
    over_18 = np.zeros(n, bool)
    over_18[::15] = True
    direction = unit_rows(1, d, 11)[0]
    x[over_18] = x[over_18] + 0.8 * direction
    x[1001] = x[1001] + 0.8 * direction  # unflagged NSFW the probe should catch
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    for i in range(101, 111):  # a chain of near copies: 100 ~ 101 ~ ... ~ 110, one cluster
        x[i] = near_copy(x[i - 1:i], 0.999, i)[0]
    content = np.array([f"h{i}" for i in ids], dtype=object)
    content[200] = content[201] = "samebytes"
    url = np.array([f"https://i.redd.it/{i}.jpg" for i in ids], dtype=object)
    url[301] = url[302] = "https://i.redd.it/crosspost.jpg"
    content[400] = "placeholder-hash"
    for row, v in (plant or {}).items():
        x[row] = v
    score = (ids * 7) % 100
    write_vector_shards(tmp_path / "in", x.astype(np.float16), per_file=250, overrides={
        "over_18": over_18, "content_hash": content, "url": url, "score": score})
    return tmp_path / "in", {"x": x, "over_18": over_18, "score": score}


def test_decide_marks_every_planted_case(tmp_path):
    inp, truth = make_input(tmp_path)
    cfg = load_config(TINY, ["ingest.placeholder_hashes=['placeholder-hash']", "curate.near_dup_cosine=0.99",
                             "curate.nsfw_threshold=0.5"])
    paths, offsets, total = file_offsets(str(inp))
    assert offsets == [0, 250, 500, 750, 1000] and total == 1200
    corpus = collect_corpus(str(inp), tmp_path / "work", fields=DECIDE_FIELDS, skip_duplicates=False)
    refs = np.asarray(truth["x"][[500]], np.float32)  # row 500 looks like a known placeholder
    dec, report = decide(cfg, corpus, refs)
    c = report["counts"]
    assert c["dropped_placeholder_hash"] == 1 and dec.drop[400] == 1
    assert c["dropped_placeholder_embedding"] == 1 and dec.drop[500] == 2
    assert c["dropped_over_18"] == truth["over_18"].sum() - (truth["over_18"][[400, 500]]).sum()
    assert dec.drop[1001] == 4 and report["nsfw_probe"]["trained"]
    assert report["nsfw_probe"]["precision"] > 0.8 and report["nsfw_probe"]["recall"] > 0.8
    ids = 10**12 + np.arange(1200)
    assert dec.has_dup[201] != dec.has_dup[200]  # exact content hash
    assert dec.has_dup[[301, 302]].sum() == 1 and set(dec.dup_of[[301, 302]]) & {ids[301], ids[302]}
    chain = np.arange(100, 111)
    chain = chain[dec.drop[chain] == 0]
    best = chain[np.argmax(truth["score"][chain])]
    assert (dec.dup_of[chain[chain != best]] == ids[best]).all() and not dec.has_dup[best]
    assert c["kept"] == 1200 - sum(c[k] for k in c if k.startswith("dropped_"))


@pytest.fixture(scope="module")
def ray_session():
    import ray

    start_local_ray()
    yield
    ray.shutdown()


@pytest.mark.slow
def test_curate_job_then_build_indexes_the_kept_rows(tmp_path, ray_session):
    from ray_jobs.build_index import main as build_main
    from ray_jobs.curate import main as curate_main

    ref = placeholder_image(tmp_path / "removed.png")
    inp, truth = make_input(tmp_path, plant={700: encode_file(ref)})
    heads = tmp_path / "heads.safetensors"
    train_random_heads(inp, heads)
    args = ["--config", TINY, "--in", str(inp), "--out", str(tmp_path / "cur"), "--heads", str(heads),
            "--set", "ingest.placeholder_hashes=['placeholder-hash']", "--set", "curate.near_dup_cosine=0.99",
            "--set", "curate.keep_nsfw=true", "--set", f"curate.placeholder_images=['{ref}']"]
    assert curate_main(args) == 0
    summary = json.loads((tmp_path / "cur" / "curate_summary.json").read_text())
    out = read_shards(str(tmp_path / "cur"))
    assert sorted(p.name for p in (tmp_path / "cur").glob("part-*.parquet")) == \
        sorted(p.name for p in inp.glob("part-*.parquet"))
    assert out.schema.names == shard_schema(64).names + CURATE_FIELDS
    assert out.num_rows == summary["rows_written"] == 1198  # only the two placeholders dropped
    assert summary["counts"]["dropped_placeholder_embedding"] == 1 and summary["placeholder_references"] == 1
    assert 10**12 + 700 not in set(out.column("image_id").to_pylist())
    nsfw = out.column("nsfw").to_numpy(zero_copy_only=False)
    assert nsfw.sum() >= truth["over_18"].sum() - 1
    assert summary["counts"]["duplicate"] == out.column("dup_of").is_valid().to_numpy(zero_copy_only=False).sum() > 0
    for name in ("meme", "aesthetic", "useful"):
        s = out.column(name).to_numpy()
        assert s.min() >= 0.0 and s.max() <= 1.0 and 0.3 < np.median(s) < 0.7
    assert curate_main(args) == 0  # a rerun replaces the output with identical rows
    assert read_shards(str(tmp_path / "cur")).equals(out)
    assert build_main(["--config", TINY, "--embeddings", str(tmp_path / "cur"), "--out", str(tmp_path / "idx"),
                       "--no-query-sample"]) == 0
    from memescale.index import Index

    index = Index.open(tmp_path / "idx")
    assert len(index) == 1198 - summary["counts"]["duplicate"]
    md = index.metadata(np.arange(len(index)))
    assert {"meme", "aesthetic", "useful", "nsfw"} <= md[0].keys()
    from memescale.index.weighting import Weighting

    assert {"meme", "aesthetic", "useful"} <= set(Weighting.load(tmp_path / "idx").names)  # search weights


def placeholder_image(path: Path) -> Path:
    """An "image removed" style placeholder: grey, a dark frame, a light bar."""
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (161, 81), (200, 200, 200))
    draw = ImageDraw.Draw(img)
    draw.rectangle((0, 0, 160, 80), outline=(60, 60, 60), width=6)
    draw.rectangle((30, 35, 130, 45), fill=(250, 250, 250))
    img.save(path)
    return path


def encode_file(path: Path) -> np.ndarray:
    """The tiny model's embedding of an image file, decoded as ingest decodes it (unit fp32)."""
    from memescale.curate.screens import reference_embeddings

    return reference_embeddings(load_config(TINY), [str(path)])[0]


def train_random_heads(inp: Path, out: Path) -> None:
    from memescale.quality.labels import Label
    from memescale.quality.train import pairs_from_labels, train_heads
    from memescale.shards.store import embeddings_of

    t = read_shards(str(inp), ["image_id", "embedding"])
    ids, emb = t.column("image_id").to_numpy(), embeddings_of(t)
    rng = np.random.default_rng(0)
    labels = [Label(int(ids[a]), int(ids[b]), ch, int(g)) for a, b, ch, g in zip(
        rng.integers(0, 600, 300), rng.integers(600, 1200, 300), rng.choice(["meme", "aesthetic", "useful"], 300),
        rng.integers(-2, 3, 300))]
    pairs, _ = pairs_from_labels(labels, ids)
    heads, _ = train_heads(emb, pairs, members=2, hidden=16, max_epochs=20, patience=5)
    heads.fit_quantiles(emb)
    heads.save(out)


@pytest.mark.slow
def test_curate_errors_are_clear(tmp_path, capsys):
    from ray_jobs.curate import main as curate_main

    assert curate_main(["--config", TINY, "--in", str(tmp_path / "none"), "--out", str(tmp_path / "o")]) == 2
    assert "no part-*.parquet" in capsys.readouterr().err
    inp, _ = make_input(tmp_path)
    assert curate_main(["--config", TINY, "--in", str(inp), "--out", str(inp)]) == 2
    assert curate_main(["--config", TINY, "--in", str(inp), "--out", str(tmp_path / "o"),
                        "--heads", str(tmp_path / "missing.safetensors")]) == 2
    assert "missing.safetensors" in capsys.readouterr().err
    (tmp_path / "bad.safetensors").write_bytes(b"not a heads file")
    assert curate_main(["--config", TINY, "--in", str(inp), "--out", str(tmp_path / "o"),
                        "--heads", str(tmp_path / "bad.safetensors")]) == 2
    assert "bad.safetensors" in capsys.readouterr().err
