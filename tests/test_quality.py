"""Quality heads: Bradley-Terry training recovers a known ranking (and not a shuffled one),
early stopping and determinism, the safetensors round trip and its errors, quantile scores,
ensemble disagreement, label-to-row mapping, and the training CLI end to end."""

from __future__ import annotations

import json

import numpy as np
import pytest
from safetensors.numpy import save_file
from scipy.stats import spearmanr

from memescale.quality.heads import CHANNELS, HeadsError, QualityHeads
from memescale.quality.labels import Label
from memescale.quality.train import PairSet, main, pairs_from_labels, train_heads
from memescale.testing.sample_data import write_vector_shards

N, D = 1000, 64


def unit_vectors(rng: np.random.Generator, n: int, d: int) -> np.ndarray:
    v = rng.standard_normal((n, d))
    return (v / np.linalg.norm(v, axis=1, keepdims=True)).astype(np.float16)


def true_scores(emb: np.ndarray, seed: int = 1) -> np.ndarray:
    """(n, 3) standardised true scores: a fixed linear map plus a mild nonlinearity."""
    rng = np.random.default_rng(seed)
    x = emb.astype(np.float64)
    A, B = rng.standard_normal((x.shape[1], 3)), rng.standard_normal((x.shape[1], 3))
    t = x @ A + 0.3 * np.tanh(2 * x @ B)
    return (t - t.mean(0)) / t.std(0)


def simulate_pairs(truth: np.ndarray, n: int, noise: float, seed: int = 2) -> PairSet:
    """Random pairs on random channels; the noisy score difference cut into five grades."""
    rng = np.random.default_rng(seed)
    left = rng.integers(0, len(truth), n)
    right = (left + rng.integers(1, len(truth), n)) % len(truth)
    ch = rng.integers(0, len(CHANNELS), n)
    diff = truth[left, ch] - truth[right, ch] + noise * rng.standard_normal(n)
    grade = np.digitize(diff, [-1.0, -0.25, 0.25, 1.0]) - 2
    return PairSet(left, right, ch, grade.astype(np.int64))


def spearman_per_channel(heads: QualityHeads, emb: np.ndarray, truth: np.ndarray) -> list[float]:
    m = heads.mean_raw(emb)
    return [float(spearmanr(m[:, c], truth[:, c])[0]) for c in range(len(CHANNELS))]


@pytest.fixture(scope="module")
def synthetic():
    emb = unit_vectors(np.random.default_rng(0), N, D)
    truth = true_scores(emb)
    pairs = simulate_pairs(truth, 2000, noise=0.5)
    heads, report = train_heads(emb, pairs, seed=0)
    return emb, truth, pairs, heads, report


def test_bradley_terry_recovers_a_known_ranking(synthetic):
    emb, truth, pairs, heads, report = synthetic
    assert (pairs.grade == 0).sum() > 100  # "equal" labels are part of the data
    rho = spearman_per_channel(heads, emb, truth)
    print("spearman per channel", dict(zip(CHANNELS, np.round(rho, 3))), "report", report)
    assert min(rho) >= 0.9, rho
    assert report["ensemble_val_accuracy"] > 0.8
    assert all(m["val_accuracy"] > 0.75 for m in report["members"])
    assert report["train_pairs"] + report["val_pairs"] == 2000 and report["val_pairs"] == 300
    # the same pairs with shuffled grades carry no signal: the ranking is not recovered
    shuffled = PairSet(pairs.left, pairs.right, pairs.channel,
                       np.random.default_rng(3).permutation(pairs.grade))
    noise_heads, noise_report = train_heads(emb, shuffled, members=2, seed=0)
    noise_rho = spearman_per_channel(noise_heads, emb, truth)
    print("spearman with shuffled labels", np.round(noise_rho, 3))
    assert max(abs(r) for r in noise_rho) < 0.3, noise_rho
    assert noise_report["ensemble_val_accuracy"] < 0.65


def test_save_load_round_trip_and_quantile_scores(synthetic, tmp_path):
    emb, _, _, heads, _ = synthetic
    heads.fit_quantiles(emb)
    heads.model = "test-model"
    path = tmp_path / "heads.safetensors"
    heads.save(path)
    loaded = QualityHeads.load(path, dim=D)
    assert (loaded.members, loaded.dim, loaded.hidden, loaded.channels) == (5, D, 256, CHANNELS)
    assert loaded.model == "test-model" and loaded.quantiles == heads.quantiles
    assert np.array_equal(loaded.raw(emb), heads.raw(emb))
    s, s2 = heads.scores(emb), loaded.scores(emb)
    for c in CHANNELS:
        assert np.array_equal(s[c], s2[c])
        assert s[c].dtype == np.float32 and s[c].shape == (N,)
        assert s[c].min() >= 0 and s[c].max() <= 1
        deciles = np.histogram(s[c], bins=10, range=(0, 1))[0] / N
        assert np.all(np.abs(deciles - 0.1) < 0.02), (c, deciles)
    # fp16 and fp32 inputs agree; the raw scores have the documented shape
    raw32 = heads.raw(emb.astype(np.float32))
    assert raw32.shape == (5, N, 3) and raw32.dtype == np.float32
    assert np.allclose(raw32, heads.raw(emb), atol=1e-5)


def test_load_errors_name_the_file(synthetic, tmp_path):
    _, _, _, heads, _ = synthetic
    missing = tmp_path / "missing.safetensors"
    with pytest.raises(HeadsError, match="missing.safetensors.*does not exist"):
        QualityHeads.load(missing)
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x00\x01 not a safetensors file" * 10)
    with pytest.raises(HeadsError, match="garbage.safetensors"):
        QualityHeads.load(garbage)
    foreign = tmp_path / "foreign.safetensors"
    save_file({"w": np.zeros((2, 2), np.float32)}, foreign)
    with pytest.raises(HeadsError, match="foreign.safetensors is not a quality heads file"):
        QualityHeads.load(foreign)
    good = tmp_path / "good.safetensors"
    heads.save(good)
    with pytest.raises(HeadsError, match=r"good.safetensors.*64-d.*1152-d"):
        QualityHeads.load(good, dim=1152)
    future = tmp_path / "future.safetensors"
    tensors = {k: getattr(heads, k) for k in ("W1", "b1", "W2", "b2")}
    save_file(tensors, future, metadata={"format": "memescale-quality-heads", "format_version": "99"})
    with pytest.raises(HeadsError, match="future.safetensors.*version '99'"):
        QualityHeads.load(future)
    with pytest.raises(HeadsError, match="64"):
        heads.raw(np.zeros((3, 32), np.float32))


def test_early_stopping_stops_and_training_is_deterministic():
    emb = unit_vectors(np.random.default_rng(5), 400, 32)
    pairs = simulate_pairs(true_scores(emb), 600, noise=1.5)
    kw = dict(members=2, hidden=64, max_epochs=300, patience=5)
    a, rep = train_heads(emb, pairs, seed=7, **kw)
    for m in rep["members"]:
        assert 1 <= m["best_epoch"] < m["epochs"] < 300
        assert m["epochs"] == m["best_epoch"] + 5  # stopped exactly `patience` epochs later
    b, rep_b = train_heads(emb, pairs, seed=7, **kw)
    for k in ("W1", "b1", "W2", "b2"):
        assert np.array_equal(getattr(a, k), getattr(b, k))
    assert rep_b["members"] == rep["members"]
    c, _ = train_heads(emb, pairs, seed=8, **kw)
    assert not np.array_equal(a.W1, c.W1)


def test_disagreement(synthetic):
    emb, _, pairs, heads, _ = synthetic
    n = 200
    d = heads.disagreement(emb[pairs.left[:n]], emb[pairs.right[:n]])
    assert d.shape == (n,) and d.dtype == np.float32 and np.all(d >= 0)
    # members extrapolate differently far from the training data (off the unit sphere)
    far = heads.disagreement(4 * emb[pairs.left[:n]].astype(np.float32),
                             4 * emb[pairs.right[:n]].astype(np.float32))
    assert far.mean() > 2 * d.mean()
    # identical members never disagree
    same = QualityHeads(*(np.repeat(getattr(heads, k)[:1], 3, axis=0) for k in ("W1", "b1", "W2", "b2")))
    assert np.all(same.disagreement(emb[:50], emb[50:100]) == 0)
    with pytest.raises(ValueError):
        heads.disagreement(emb[:5], emb[:6])


def test_pairs_from_labels_maps_ids_and_counts_skips():
    ids = np.array([10, 30, 20, 30])  # 30 repeats: its first row (1) is used
    labels = [Label(10, 20, "meme", 2), Label(30, 99, "aesthetic", -1), Label(5, 10, "useful", 0),
              Label(20, 30, "useful", -2), Label(30, 10, "aesthetic", 1)]
    pairs, skipped = pairs_from_labels(labels, ids)
    assert skipped == 2
    assert pairs.left.tolist() == [0, 2, 1] and pairs.right.tolist() == [2, 1, 0]
    assert pairs.channel.tolist() == [0, 2, 1] and pairs.grade.tolist() == [2, -2, 1]
    assert all(a.dtype == np.int64 for a in (pairs.left, pairs.right, pairs.channel, pairs.grade))
    none, skipped = pairs_from_labels(labels, np.array([], np.int64))
    assert len(none) == 0 and skipped == len(labels)


def test_cli_trains_saves_and_reports(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("memescale.logs.setup_logging", lambda *a, **k: None)
    emb = unit_vectors(np.random.default_rng(9), 240, 32)
    write_vector_shards(tmp_path / "shards", emb, per_file=100)  # image_id = row + 10**12
    pairs = simulate_pairs(true_scores(emb), 300, noise=0.3)
    labels = [Label(int(a) + 10**12, int(b) + 10**12, CHANNELS[c], int(g), "t", "test", 1.0)
              for a, b, c, g in zip(pairs.left, pairs.right, pairs.channel, pairs.grade)]
    labels += [Label(1, 2, "meme", 1), Label(10**12, 5, "useful", -1)]  # unknown ids
    label_file = tmp_path / "labels.jsonl"
    label_file.write_text("".join(json.dumps(lb.to_json()) + "\n" for lb in labels))
    out = tmp_path / "heads.safetensors"
    common = ["--data", str(tmp_path / "shards"), "--out", str(out), "--config", "configs/tiny.toml",
              "--set", "curate.heads_members=2", "--set", "curate.heads_hidden=32"]
    assert main(["train", "--labels", str(label_file), *common]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["pairs"] == 300 and report["skipped"] == 2 and report["rows"] == 240
    assert len(report["members"]) == 2 and report["ensemble_val_accuracy"] > 0.7
    heads = QualityHeads.load(out, dim=32)
    assert heads.members == 2 and heads.hidden == 32 and heads.model == "m"
    scores = heads.scores(emb)
    assert all(abs(float(np.median(scores[c])) - 0.5) < 0.05 for c in CHANNELS)

    def fails(labels_path: str) -> str:
        assert main(["train", "--labels", labels_path, *common]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and "\n" not in err
        return err

    assert "does not exist" in fails(str(tmp_path / "nope.jsonl"))
    (tmp_path / "unknown.jsonl").write_text(json.dumps(Label(1, 2, "meme", 1).to_json()) + "\n")
    assert "no usable pairs" in fails(str(tmp_path / "unknown.jsonl"))
    (tmp_path / "bad.jsonl").write_text('{"left": 1, "right": 2, "channel": "cute", "label": "equal"}\n')
    assert "bad.jsonl:1" in fails(str(tmp_path / "bad.jsonl"))
