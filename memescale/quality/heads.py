"""Quality heads: an ensemble of small MLPs that score image embeddings on each label channel.

Training and its CLI: `memescale.quality.train`.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from memescale.index.weighting import DEFAULT_KNOTS, apply_quantiles, fit_quantiles
from memescale.quality.labels import CHANNELS

log = logging.getLogger("memescale.quality")

FORMAT = "memescale-quality-heads"
FORMAT_VERSION = 1
TENSORS = ("W1", "b1", "W2", "b2")
INFER_BATCH_FLOATS = 1 << 23  # bound on the (E, batch, h) hidden activations of `raw` (32 MiB)

__all__ = ["CHANNELS", "HeadsError", "QualityHeads"]


class HeadsError(ValueError):
    """A quality heads file that cannot be used: missing, not safetensors, another format or
    version, inconsistent tensors, or a dimension other than the embeddings'. Names the file."""


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
            W1, b1, W2, b2 = (np.asarray(tensors[k], np.float32) for k in TENSORS)
            heads = cls(W1, b1, W2, b2, channels, quantiles, meta.get("model", ""))
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
