"""Row filters of the curate step: "image deleted" placeholders and NSFW.

Placeholders are caught twice: by content hash (the exact bytes of a known placeholder, also
checked at ingest) and by embedding, for re-encoded or resized copies whose bytes differ: a
row within `cosine` of any reference placeholder's embedding is one. The references are
embeddings of reference images (listed in the config) computed by the same encoder.

NSFW: the post's own `over_18` flag, plus a linear probe (logistic regression on the
embedding) trained on the data's own `over_18` labels, which finds unflagged NSFW images in
subreddits that do not tag their posts. Its precision and recall on held-out rows are
reported so the threshold can be chosen knowingly.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from memescale.config import Config

log = logging.getLogger(__name__)


class PlaceholderImageError(ValueError):
    """A reference placeholder image listed in the config cannot be read or decoded."""


def reference_embeddings(cfg: Config, paths: list[str]) -> np.ndarray:
    """(m, d) float32 embeddings of the reference placeholder images, by the configured encoder.

    Decoded exactly as ingest decodes downloads. Raises PlaceholderImageError naming the file
    that is missing or not an image. Cost: one encoder forward pass over m images.
    """
    from memescale.decode.image import ImageDecodeError, decode_image
    from memescale.embed.encoder import ImageTextEncoder

    if not paths:
        return np.zeros((0, 0), np.float32)
    enc = ImageTextEncoder(cfg.model)
    pixels = []
    for p in paths:
        try:
            pixels.append(decode_image(Path(p).read_bytes(), enc.image_size, cfg.ingest.max_pixels).pixels)
        except (OSError, ImageDecodeError) as e:
            raise PlaceholderImageError(f"placeholder image {p}: {e}") from e
    return enc.encode_images(np.stack(pixels)).astype(np.float32)


def placeholder_masks(hashes: np.ndarray, vectors: np.ndarray, bad_hashes: list[str],
                      references: np.ndarray, cosine: float,
                      batch: int = 65536) -> tuple[np.ndarray, np.ndarray]:
    """(by_hash, by_embedding) boolean masks over the rows.

    `hashes`: (N,) content hashes (None allowed); `vectors`: (N, d) L2-normalised (fp16 or
    fp32, may be a memmap); `references`: (m, d). A row is by_embedding when its cosine to
    some reference is >= `cosine` and it is not already by_hash. O(N (m d)), batched.
    """
    bad = set(bad_hashes)
    by_hash = np.fromiter((h in bad for h in hashes), bool, len(hashes)) if bad else np.zeros(len(hashes), bool)
    by_emb = np.zeros(len(vectors), bool)
    if len(references):
        refs = np.asarray(references, np.float32)
        for lo in range(0, len(vectors), batch):
            sims = np.asarray(vectors[lo:lo + batch], np.float32) @ refs.T
            by_emb[lo:lo + batch] = sims.max(axis=1) >= cosine
    return by_hash, by_emb & ~by_hash


@dataclass
class NsfwProbe:
    """Logistic regression on embeddings: P(nsfw | x) = sigmoid(x . w + b)."""

    w: np.ndarray  # (d,) float32
    b: float

    def predict(self, vectors: np.ndarray, batch: int = 65536) -> np.ndarray:
        """(N,) float32 probabilities; O(N d), batched (works on memmaps)."""
        out = np.empty(len(vectors), np.float32)
        for lo in range(0, len(vectors), batch):
            z = np.asarray(vectors[lo:lo + batch], np.float32) @ self.w + self.b
            out[lo:lo + batch] = 1.0 / (1.0 + np.exp(-z))
        return out


@dataclass
class ProbeReport:
    """Held-out quality of the probe at the configured threshold."""

    trained: bool
    reason: str = ""  # why it was not trained
    train_rows: int = 0
    test_rows: int = 0
    positives: int = 0  # over_18 rows among all rows
    threshold: float = 0.0
    precision: float = float("nan")
    recall: float = float("nan")
    auc: float = float("nan")


def train_nsfw_probe(vectors: np.ndarray, over_18: np.ndarray, eligible: np.ndarray, *, holdout: float,
                     threshold: float, min_positives: int, max_train: int,
                     seed: int = 0) -> tuple[NsfwProbe | None, ProbeReport]:
    """Fit the probe on a seeded sample of at most `max_train` of the `eligible` rows (indices
    into `vectors` / `over_18`), stratified split into train and held-out (`holdout` share);
    report precision/recall at `threshold` and ROC AUC on the held-out rows. Balanced class
    weights (NSFW is rare). Returns (None, report) when the eligible rows hold fewer than
    `min_positives` of either class. Time O(max_train d x iterations).
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import precision_score, recall_score, roc_auc_score
    from sklearn.model_selection import train_test_split

    y_all = np.asarray(over_18, bool)[eligible]
    pos = int(y_all.sum())
    report = ProbeReport(trained=False, positives=pos, threshold=threshold)
    if min(pos, len(y_all) - pos) < min_positives:
        report.reason = f"{pos} over_18 rows of {len(y_all)}: need {min_positives} of each class"
        return None, report
    rng = np.random.default_rng(seed)
    pick = np.sort(rng.choice(len(eligible), size=min(max_train, len(eligible)), replace=False))
    x, y = np.asarray(vectors[np.asarray(eligible)[pick]], np.float32), y_all[pick]
    if min(int(y.sum()), len(y) - int(y.sum())) < 2:
        report.reason = "the sample holds too few rows of one class"
        return None, report
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=holdout, stratify=y, random_state=seed)
    model = LogisticRegression(C=1.0, class_weight="balanced", max_iter=1000)
    model.fit(x_tr, y_tr)
    probe = NsfwProbe(model.coef_[0].astype(np.float32), float(model.intercept_[0]))
    p = probe.predict(x_te)
    pred = p >= threshold
    report.trained = True
    report.train_rows, report.test_rows = len(y_tr), len(y_te)
    report.precision = float(precision_score(y_te, pred, zero_division=0.0))
    report.recall = float(recall_score(y_te, pred, zero_division=0.0))
    report.auc = float(roc_auc_score(y_te, p))
    return probe, report
