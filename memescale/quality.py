"""Quality heads: an ensemble of small MLPs that score image embeddings on each label channel.

Contract. A head maps an L2-normalised image embedding (d wide, fp16 or fp32) to one raw
score per channel of `CHANNELS` (meme, aesthetic, useful). The ensemble has E members, each
``Linear(d, h) - ReLU - dropout - Linear(h, C)``, trained with torch on CPU and exported as ONE
safetensors file (tensors W1 (E, d, h), b1 (E, h), W2 (E, h, C), b2 (E, C) and JSON metadata:
format version, dim, hidden, channels, members, quantile knots, model name). Inference is pure
numpy (`QualityHeads.raw`); `scores` maps the members' mean raw score to [0, 1] with the
quantile knots fitted over a reference set (the pool the heads score, see
`memescale.weighting.fit_quantiles`), so 0.5 is that pool's median.

Training (`train_heads`) uses Bradley-Terry on pairwise labels: on channel c,
``P(left beats right) = sigmoid(s_c(left) - s_c(right))``. The five-step grade is a *soft*
target of a binary cross-entropy on that difference: grade 2 -> 0.9, 1 -> 0.7, 0 -> 0.5,
-1 -> 0.3, -2 -> 0.1. Soft targets keep "much better" and "better" apart without an ordinal
model, treat "equal" as a real label (it pulls the two scores together instead of being
dropped), and bound the logits a single pair can demand, which regularises against rater noise.
A share of the pairs (seeded) is held out and shared by all members; each member starts from
its own seed and trains on its own bootstrap resample of the remaining pairs with mini-batch
AdamW, stops when the held-out loss has not improved for `patience` epochs and keeps its best
weights. The members train together as one batched model (independent parameters, so this
equals training them one by one) and the result is deterministic for a seed.

Complexity: one epoch costs O(E * n_train * d * h) (0.4-0.6 s for 2k pairs at d = 1152,
h = 256, E = 5 on one thread of a shared 2-core machine; 0.1 s at d = 64), and early stopping
runs `patience` epochs past the best one; inference O(E * N * d * h) in batches of bounded memory.

CLI::

    python -m memescale.quality train --data SHARDS --labels labels.jsonl --out heads.safetensors \
        [--config configs/tiny.toml] [--set curate.heads_members=3 ...]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from memescale.labelstore import CHANNELS, Label, LabelError
from memescale.weighting import DEFAULT_KNOTS, apply_quantiles, fit_quantiles

log = logging.getLogger("memescale.quality")

FORMAT = "memescale-quality-heads"
FORMAT_VERSION = 1
TENSORS = ("W1", "b1", "W2", "b2")
SOFT_TARGETS = {2: 0.9, 1: 0.7, 0: 0.5, -1: 0.3, -2: 0.1}  # grade -> P(left beats right)
QUANTILE_SAMPLE = 200_000  # rows of the shards the CLI fits the quantile knots on
INFER_BATCH_FLOATS = 1 << 23  # bound on the (E, batch, h) hidden activations of `raw` (32 MiB)

__all__ = ["CHANNELS", "HeadsError", "PairSet", "QualityHeads", "main", "pairs_from_labels",
           "train_heads"]


class HeadsError(ValueError):
    """A quality heads file that cannot be used: missing, not safetensors, another format or
    version, inconsistent tensors, or a dimension other than the embeddings'. Names the file."""


# -- pairs ------------------------------------------------------------------------------------
@dataclass
class PairSet:
    """Training pairs as row indices into an embedding matrix."""

    left: np.ndarray  # int64 (n,)
    right: np.ndarray  # int64 (n,)
    channel: np.ndarray  # int64 (n,), index into CHANNELS
    grade: np.ndarray  # int64 (n,), -2..2, positive: left better

    def __len__(self) -> int:
        return len(self.left)

    def subset(self, idx: np.ndarray) -> PairSet:
        return PairSet(self.left[idx], self.right[idx], self.channel[idx], self.grade[idx])


def pairs_from_labels(labels: list[Label], image_ids: np.ndarray) -> tuple[PairSet, int]:
    """Map each label's image ids to rows of `image_ids` (first occurrence of a repeated id).

    Returns (pairs, skipped): labels naming an id absent from `image_ids` are skipped and
    counted. O((N + L) log N).
    """
    ids = np.asarray(image_ids, np.int64)
    order = np.argsort(ids, kind="stable")
    sorted_ids = ids[order]

    def rows(values: list[int]) -> tuple[np.ndarray, np.ndarray]:
        """(row of each id, whether it was found)."""
        v = np.asarray(values, np.int64)
        if len(ids) == 0:
            return np.zeros(len(v), np.int64), np.zeros(len(v), bool)
        pos = np.minimum(np.searchsorted(sorted_ids, v), len(ids) - 1)
        return order[pos], sorted_ids[pos] == v

    left, left_ok = rows([lb.left for lb in labels])
    right, right_ok = rows([lb.right for lb in labels])
    ok = left_ok & right_ok
    channel = np.asarray([CHANNELS.index(lb.channel) for lb in labels], np.int64)
    grade = np.asarray([lb.grade for lb in labels], np.int64)
    pairs = PairSet(left[ok], right[ok], channel[ok], grade[ok])
    return pairs, int((~ok).sum())


# -- the exported ensemble --------------------------------------------------------------------
@dataclass
class QualityHeads:
    """The members' weights (numpy float32) and the quantile knots of each channel."""

    W1: np.ndarray  # (E, d, h)
    b1: np.ndarray  # (E, h)
    W2: np.ndarray  # (E, h, C)
    b2: np.ndarray  # (E, C)
    channels: tuple[str, ...] = CHANNELS
    # channel -> (xs, levels) of `weighting.fit_quantiles`; empty until `fit_quantiles`
    quantiles: dict[str, tuple[list[float], list[float]]] = field(default_factory=dict)
    model: str = ""  # the embedding model the heads were trained on, when known

    @property
    def members(self) -> int:
        return self.W1.shape[0]

    @property
    def dim(self) -> int:
        return self.W1.shape[1]

    @property
    def hidden(self) -> int:
        return self.W1.shape[2]

    def _check_emb(self, emb: np.ndarray) -> np.ndarray:
        x = np.asarray(emb)
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise HeadsError(f"quality heads expect (n, {self.dim}) embeddings, got {x.shape}")
        return x

    def raw(self, emb: np.ndarray) -> np.ndarray:
        """(E, N, C) float32 raw scores of every member; O(E N d h), memory bounded by batching."""
        x = self._check_emb(emb)
        out = np.empty((self.members, len(x), len(self.channels)), np.float32)
        step = max(1, INFER_BATCH_FLOATS // (self.members * self.hidden))
        for lo in range(0, len(x), step):
            xb = x[lo:lo + step].astype(np.float32)
            h = np.maximum(np.matmul(xb[None], self.W1) + self.b1[:, None, :], 0.0)
            out[:, lo:lo + step] = np.matmul(h, self.W2) + self.b2[:, None, :]
        return out

    def mean_raw(self, emb: np.ndarray) -> np.ndarray:
        """(N, C) float32: the members' mean raw score."""
        return self.raw(emb).mean(axis=0)

    def fit_quantiles(self, emb: np.ndarray, n_knots: int = DEFAULT_KNOTS) -> None:
        """Fit each channel's normalisation on `mean_raw` over a reference set (the pool)."""
        m = self.mean_raw(emb)
        self.quantiles = {c: fit_quantiles(m[:, j], n_knots) for j, c in enumerate(self.channels)}

    def scores(self, emb: np.ndarray) -> dict[str, np.ndarray]:
        """Channel -> (N,) float32 in [0, 1], the quantile level of the mean raw score (0.5 for
        every item while no quantiles are fitted, as `weighting.apply_quantiles` does)."""
        m = self.mean_raw(emb)
        return {c: apply_quantiles(m[:, j], *self.quantiles.get(c, ([], [])))
                for j, c in enumerate(self.channels)}

    def disagreement(self, emb_left: np.ndarray, emb_right: np.ndarray) -> np.ndarray:
        """(n,) float32: sum over channels of the members' std of raw(left) - raw(right).

        High where the members disagree on the pair's order: the pairs worth labelling next.
        """
        if np.shape(emb_left) != np.shape(emb_right):
            raise ValueError(f"left {np.shape(emb_left)} and right {np.shape(emb_right)} differ")
        # in float64, so that equal members give exactly 0 (a float32 mean can round)
        diff = self.raw(emb_left).astype(np.float64) - self.raw(emb_right)
        return diff.std(axis=0).sum(axis=1).astype(np.float32)

    # -- persistence ------------------------------------------------------------------------
    def save(self, path: str | os.PathLike) -> None:
        """Write one safetensors file (atomically: a temporary name, then a rename)."""
        from safetensors.numpy import save_file

        meta = {"format": FORMAT, "format_version": str(FORMAT_VERSION), "dim": str(self.dim),
                "hidden": str(self.hidden), "members": str(self.members),
                "channels": json.dumps(list(self.channels)), "model": self.model,
                "quantiles": json.dumps({c: {"x": xs, "level": lv}
                                         for c, (xs, lv) in self.quantiles.items()})}
        tensors = {k: np.ascontiguousarray(getattr(self, k), np.float32) for k in TENSORS}
        p = Path(path)
        tmp = p.with_name(f".{p.name}.tmp")
        save_file(tensors, tmp, metadata=meta)
        os.replace(tmp, p)

    @classmethod
    def load(cls, path: str | os.PathLike, dim: int | None = None) -> QualityHeads:
        """Read a file written by `save`; HeadsError naming `path` for anything unusable,
        including a stored dimension other than `dim` (when given)."""
        p = Path(path)
        if not p.is_file():
            raise HeadsError(f"quality heads file {p} does not exist")
        meta, tensors = _read_safetensors(p)
        if meta.get("format") != FORMAT:
            raise HeadsError(f"{p} is not a quality heads file (format {meta.get('format')!r})")
        if meta.get("format_version") != str(FORMAT_VERSION):
            raise HeadsError(f"{p}: unsupported quality heads format version "
                             f"{meta.get('format_version')!r} (this code reads {FORMAT_VERSION})")
        try:
            channels = tuple(json.loads(meta["channels"]))
            quantiles = {c: (list(v["x"]), list(v["level"]))
                         for c, v in json.loads(meta["quantiles"]).items()}
            weights = (np.asarray(tensors[k], np.float32) for k in TENSORS)
            heads = cls(*weights, channels, quantiles, meta.get("model", ""))
        except (KeyError, TypeError, ValueError) as e:
            raise HeadsError(f"{p}: corrupt quality heads metadata or tensors: {e!r}") from e
        _check_shapes(heads, meta, p)
        if dim is not None and heads.dim != dim:
            raise HeadsError(f"{p}: quality heads take {heads.dim}-d embeddings, these are {dim}-d"
                             f" (model {heads.model or 'unknown'!s})")
        return heads


def _read_safetensors(p: Path) -> tuple[dict[str, str], dict[str, np.ndarray]]:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(p), framework="np") as f:
            return f.metadata() or {}, {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError) as e:
        raise HeadsError(f"{p} is not a readable safetensors file: {e}") from e


def _check_shapes(h: QualityHeads, meta: dict[str, str], p: Path) -> None:
    E, d, hid = h.W1.shape if h.W1.ndim == 3 else (-1, -1, -1)
    C = len(h.channels)
    want = {"W1": (E, d, hid), "b1": (E, hid), "W2": (E, hid, C), "b2": (E, C)}
    got = {k: getattr(h, k).shape for k in TENSORS}
    declared = (meta.get("members"), meta.get("dim"), meta.get("hidden"))
    if E < 1 or got != want or declared != (str(E), str(d), str(hid)):
        raise HeadsError(f"{p}: inconsistent quality heads tensors {got} for "
                         f"members/dim/hidden {declared} and channels {h.channels}")


# -- training ---------------------------------------------------------------------------------
def _split(n: int, holdout: float, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(train, val) indices of n pairs, val a seeded `holdout` share (none when 0)."""
    if not 0.0 <= holdout < 1.0:
        raise ValueError(f"holdout must be in [0, 1), got {holdout}")
    perm = rng.permutation(n)
    n_val = min(int(round(holdout * n)), n - 1)
    return np.sort(perm[n_val:]), np.sort(perm[:n_val])


class _Ensemble:
    """E independent MLPs as batched tensors (torch), trained together."""

    def __init__(self, members: int, d: int, hidden: int, C: int, seed: int, dropout: float):
        import torch

        def uniform(g: torch.Generator, shape: tuple[int, ...], fan_in: int) -> torch.Tensor:
            return (torch.rand(shape, generator=g) * 2 - 1) / fan_in ** 0.5  # nn.Linear's init

        parts: dict[str, list[torch.Tensor]] = {k: [] for k in TENSORS}
        for e in range(members):
            g = torch.Generator().manual_seed(seed * 1_000_003 + e)
            parts["W1"].append(uniform(g, (d, hidden), d))
            parts["b1"].append(uniform(g, (hidden,), d))
            parts["W2"].append(uniform(g, (hidden, C), hidden))
            parts["b2"].append(uniform(g, (C,), hidden))
        self.params = {k: torch.stack(v).requires_grad_() for k, v in parts.items()}
        self.dropout = dropout

    def forward(self, x, train: bool, g=None):
        """x (E, B, d) -> (E, B, C)."""
        import torch

        p = self.params
        h = torch.relu(torch.baddbmm(p["b1"][:, None, :], x, p["W1"]))
        if train and self.dropout > 0:
            keep = torch.rand(h.shape, generator=g) >= self.dropout
            h = h * keep / (1.0 - self.dropout)
        return torch.baddbmm(p["b2"][:, None, :], h, p["W2"])

    def pair_logits(self, X, pairs: dict, idx, train: bool, g=None):
        """(E, B) logits s_c(left) - s_c(right) of the pairs `idx` (E, B) per member."""
        import torch

        rows = torch.cat([pairs["left"][idx], pairs["right"][idx]], dim=1)  # (E, 2B)
        s = self.forward(X[rows], train, g)
        ch = pairs["channel"][idx]
        s = s.gather(2, torch.cat([ch, ch], dim=1)[..., None])[..., 0]
        B = idx.shape[1]
        return s[:, :B] - s[:, B:]

    def snapshot(self) -> dict[str, np.ndarray]:
        return {k: v.detach().numpy().copy() for k, v in self.params.items()}


def _pair_tensors(pairs: PairSet, row_of: np.ndarray) -> dict[str, Any]:
    import torch

    return {"left": torch.from_numpy(row_of[pairs.left]), "right": torch.from_numpy(row_of[pairs.right]),
            "channel": torch.from_numpy(pairs.channel.astype(np.int64)),
            "target": torch.tensor([SOFT_TARGETS[int(v)] for v in pairs.grade], dtype=torch.float32),
            "sign": torch.from_numpy(np.sign(pairs.grade))}


def _val_metrics(net: _Ensemble, X, val: dict) -> tuple[np.ndarray, np.ndarray]:
    """Per member: held-out BCE (E,) and accuracy on its non-equal pairs (E,)."""
    import torch
    import torch.nn.functional as F

    E, n = net.params["W1"].shape[0], len(val["target"])
    with torch.no_grad():
        z = net.pair_logits(X, val, torch.arange(n).expand(E, n), train=False)
        loss = F.binary_cross_entropy_with_logits(z, val["target"].expand(E, n), reduction="none")
        decided = val["sign"] != 0
        correct = (torch.sign(z) == val["sign"]) & decided
        acc = correct.sum(1) / decided.sum().clamp(min=1)
    return loss.mean(1).numpy(), acc.numpy()


def _train_epoch(net: _Ensemble, opt, X, tr: dict, boot, batch_size: int, g) -> np.ndarray:
    """One pass over each member's bootstrap sample in a fresh order; (E,) mean batch loss."""
    import torch
    import torch.nn.functional as F

    order = boot.gather(1, torch.argsort(torch.rand(boot.shape, generator=g), dim=1))
    total = np.zeros(order.shape[0])
    for lo in range(0, order.shape[1], batch_size):
        idx = order[:, lo:lo + batch_size]
        z = net.pair_logits(X, tr, idx, train=True, g=g)
        loss = F.binary_cross_entropy_with_logits(z, tr["target"][idx], reduction="none").mean(1)
        opt.zero_grad()
        loss.sum().backward()  # members are independent: the sum trains each on its own
        opt.step()
        total += loss.detach().numpy() * idx.shape[1]
    return total / order.shape[1]


class _EarlyStopping:
    """Per member: the best held-out loss so far, its epoch, metrics and weights; a member
    stops once `patience` epochs have passed without improvement."""

    def __init__(self, net: _Ensemble, patience: int):
        E = net.params["W1"].shape[0]
        self.patience, self.weights = patience, net.snapshot()
        self.val_loss, self.train_loss, self.val_acc = (np.full(E, np.nan) for _ in range(3))
        self.best_epoch, self.stopped = np.zeros(E, np.int64), np.zeros(E, np.int64)

    def update(self, net: _Ensemble, epoch: int, train_loss, val_loss, val_acc) -> bool:
        """Record an epoch; True when every member has stopped."""
        active = self.stopped == 0
        better = active & ~(val_loss >= self.val_loss)  # NaN (no epoch yet) counts as worse
        if better.any():
            snap = net.snapshot()
            for k in TENSORS:
                self.weights[k][better] = snap[k][better]
            self.best_epoch[better] = epoch
            for mine, new in ((self.val_loss, val_loss), (self.train_loss, train_loss),
                              (self.val_acc, val_acc)):
                mine[better] = new[better]
        self.stopped[active & (epoch - self.best_epoch >= self.patience)] = epoch
        return bool((self.stopped > 0).all())


def train_heads(emb: np.ndarray, pairs: PairSet, *, members: int = 5, hidden: int = 256,
                holdout: float = 0.15, max_epochs: int = 400, patience: int = 20, seed: int = 0,
                lr: float = 2e-3, weight_decay: float = 1e-2, dropout: float = 0.1,
                batch_size: int = 128, threads: int = 1) -> tuple[QualityHeads, dict]:
    """Train an ensemble on `pairs` (row indices into `emb`, (N, d) fp16/fp32); see the module
    docstring. Without held-out pairs (holdout 0 or a single pair) every member trains
    `max_epochs` epochs and keeps its last weights. `threads`: torch intra-op threads while
    training (restored after); 1 by default because the batched matmuls are small and OpenMP
    barriers degrade badly on shared cores (2k pairs, d = 64 on a busy 2-core machine: 3 s
    with 1 thread, 7-11 s with 2).

    Returns (heads without quantiles, report): the report has the pair counts and, per member,
    best epoch, epochs run, mean mini-batch train loss of the best epoch, held-out BCE and
    held-out accuracy on non-equal pairs (None without held-out pairs); the ensemble's held-out
    accuracy; seconds. Deterministic for a seed.
    """
    import torch

    x = np.asarray(emb)
    if x.ndim != 2 or len(pairs) == 0:
        raise ValueError(f"need (N, d) embeddings and at least one pair, got {x.shape} and {len(pairs)}")
    if min(members, hidden, max_epochs, patience, batch_size, threads) < 1:
        raise ValueError("members, hidden, max_epochs, patience, batch_size, threads must be >= 1")
    used = np.unique(np.concatenate([pairs.left, pairs.right]))
    if used[0] < 0 or used[-1] >= len(x):
        raise ValueError(f"pair rows must be in [0, {len(x)}), got {used[0]}..{used[-1]}")
    t0 = time.perf_counter()
    rng = np.random.default_rng(seed)
    train_idx, val_idx = _split(len(pairs), holdout, rng)
    row_of = np.zeros(len(x), np.int64)
    row_of[used] = np.arange(len(used))
    X = torch.from_numpy(x[used].astype(np.float32))
    tr, va = _pair_tensors(pairs.subset(train_idx), row_of), _pair_tensors(pairs.subset(val_idx), row_of)
    boot = torch.from_numpy(rng.integers(0, len(train_idx), (members, len(train_idx))))
    g = torch.Generator().manual_seed(seed)
    saved_threads = torch.get_num_threads()
    torch.set_num_threads(min(threads, os.cpu_count() or 1))
    try:
        net = _Ensemble(members, x.shape[1], hidden, len(CHANNELS), seed, dropout)
        opt = torch.optim.AdamW(net.params.values(), lr=lr, weight_decay=weight_decay)
        stop = _EarlyStopping(net, patience)
        for epoch in range(1, max_epochs + 1):
            train_loss = _train_epoch(net, opt, X, tr, boot, batch_size, g)
            if len(val_idx) and stop.update(net, epoch, train_loss, *_val_metrics(net, X, va)):
                break
        if not len(val_idx):
            stop.weights, stop.train_loss, stop.best_epoch[:] = net.snapshot(), train_loss, epoch
        stop.stopped[stop.stopped == 0] = epoch
    finally:
        torch.set_num_threads(saved_threads)
    w = stop.weights
    heads = QualityHeads(w["W1"], w["b1"], w["W2"], w["b2"], CHANNELS)
    report = _report(heads, x, pairs, train_idx, val_idx, seed, stop)
    report["seconds"] = round(time.perf_counter() - t0, 3)
    return heads, report


def _num(v: float) -> float | None:
    return None if not np.isfinite(v) else round(float(v), 5)


def _report(heads: QualityHeads, x: np.ndarray, pairs: PairSet, train_idx: np.ndarray,
            val_idx: np.ndarray, seed: int, stop: _EarlyStopping) -> dict:
    val = pairs.subset(val_idx)
    decided = val.grade != 0
    ensemble_acc = None
    if decided.any():
        m = heads.mean_raw(x[np.concatenate([val.left, val.right])])
        n = len(val)
        z = m[np.arange(n), val.channel] - m[n + np.arange(n), val.channel]
        ensemble_acc = _num(np.mean(np.sign(z[decided]) == np.sign(val.grade[decided])))
    return {
        "pairs": len(pairs), "train_pairs": len(train_idx), "val_pairs": len(val_idx),
        "val_pairs_nonequal": int(decided.sum()), "seed": seed,
        "members": [{"best_epoch": int(stop.best_epoch[e]), "epochs": int(stop.stopped[e]),
                     "train_loss": _num(stop.train_loss[e]), "val_loss": _num(stop.val_loss[e]),
                     "val_accuracy": _num(stop.val_acc[e]) if decided.any() else None}
                    for e in range(heads.members)],
        "ensemble_val_accuracy": ensemble_acc,
    }


# -- CLI --------------------------------------------------------------------------------------
def _train_cli(args: argparse.Namespace) -> dict:
    """Read only the labelled rows (to train) and a seeded sample of QUANTILE_SAMPLE rows (for
    the quantile knots) of the shards, so memory is O((labelled + sample) x dim)."""
    import pyarrow as pa
    import pyarrow.dataset as pads

    from memescale.config import load_config
    from memescale.corpus import shard_dataset
    from memescale.labelstore import read_labels
    from memescale.store import embeddings_of

    cfg = load_config(args.config, args.set).curate
    if not Path(args.data).is_dir():
        raise FileNotFoundError(f"shard directory {args.data} does not exist")
    labels = read_labels(args.labels)
    dataset = shard_dataset(args.data)
    columns = ["image_id", "embedding", "model"]
    named = sorted({lb.left for lb in labels} | {lb.right for lb in labels})
    table = dataset.to_table(columns=columns, filter=pads.field("image_id").isin(pa.array(named, pa.int64())))
    total = dataset.count_rows()
    rng = np.random.default_rng(args.seed)
    sample = dataset.take(pa.array(np.sort(rng.choice(total, min(total, QUANTILE_SAMPLE), replace=False))),
                          columns=columns)
    models = sorted((set(table.column("model").to_pylist()) | set(sample.column("model").to_pylist())) - {None})
    if len(models) > 1:
        raise ValueError(f"{args.data} mixes embeddings of several models: {models}")
    pairs, skipped = pairs_from_labels(labels, table.column("image_id").to_numpy())
    if len(pairs) == 0:
        raise ValueError(f"no usable pairs in {args.labels}: {skipped} labels name images "
                         f"absent from {args.data}")
    heads, report = train_heads(embeddings_of(table), pairs, members=cfg.heads_members, hidden=cfg.heads_hidden,
                                holdout=cfg.heads_holdout, max_epochs=cfg.heads_max_epochs,
                                patience=cfg.heads_patience, seed=args.seed)
    heads.model = models[0] if models else ""
    heads.fit_quantiles(embeddings_of(sample))
    heads.save(args.out)
    return {"out": str(args.out), "dim": heads.dim, "model": heads.model, "rows": total,
            "labelled_rows": table.num_rows, "quantile_rows": sample.num_rows, "skipped": skipped, **report}


def main(argv: list[str] | None = None) -> int:
    from memescale.config import ConfigError
    from memescale.logs import setup_logging

    p = argparse.ArgumentParser(prog="python -m memescale.quality", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="train quality heads on labelled pairs of a shard directory")
    t.add_argument("--data", required=True, help="embedding shard directory (ingest output)")
    t.add_argument("--labels", required=True, help="labels: .sqlite store or .jsonl export")
    t.add_argument("--out", required=True, help="the safetensors file to write")
    t.add_argument("--config", default=None, help="TOML config (curate.heads_* are used)")
    t.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE")
    t.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    setup_logging()
    try:
        report = _train_cli(args)
    except (FileNotFoundError, LabelError, ConfigError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    log.info("quality heads written", extra={"out": report["out"], "pairs": report["pairs"]})
    print(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
