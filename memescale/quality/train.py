"""Training the quality heads (`memescale.quality.heads.QualityHeads`) on pairwise labels.

Contract. A head maps an L2-normalised image embedding (d wide, fp16 or fp32) to one raw
score per channel of `CHANNELS` (meme, aesthetic, useful). The ensemble has E members, each
``Linear(d, h) - ReLU - dropout - Linear(h, C)``, trained with torch on CPU and exported as ONE
safetensors file (tensors W1 (E, d, h), b1 (E, h), W2 (E, h, C), b2 (E, C) and JSON metadata:
format version, dim, hidden, channels, members, quantile knots, model name). Inference is pure
numpy (`QualityHeads.raw`); `scores` maps the members' mean raw score to [0, 1] with the
quantile knots fitted over a reference set (the pool the heads score, see
`memescale.index.weighting.fit_quantiles`), so 0.5 is that pool's median.

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

Complexity: one epoch costs O(E * n_train * d * h), and early stopping runs `patience`
epochs past the best one; inference O(E * N * d * h) in batches of bounded memory.

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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from memescale.quality.heads import TENSORS, QualityHeads
from memescale.quality.labels import CHANNELS, Label, LabelError

log = logging.getLogger("memescale.quality")

SOFT_TARGETS = {2: 0.9, 1: 0.7, 0: 0.5, -1: 0.3, -2: 0.1}  # grade -> P(left beats right)
QUANTILE_SAMPLE = 200_000  # rows of the shards the CLI fits the quantile knots on

__all__ = ["PairSet", "main", "pairs_from_labels", "train_heads"]


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
    barriers degrade badly on shared cores.

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
    from memescale.quality.labels import read_labels
    from memescale.shards.corpus import shard_dataset
    from memescale.shards.store import embeddings_of

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
