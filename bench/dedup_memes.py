"""Near-duplicate recall on the shared memes with synthetic re-encodes.

    python bench/dedup_memes.py [--config configs/tiny.toml] [--memes ../shared/data/images/memes] [--limit N]

Every meme gets three copies (JPEG quality 50, half size, 5% cropped; see
memescale.testing.sample_data.reencode_variants). All originals and copies are encoded with the
configured model, decoded exactly as ingest decodes, and clustered by memescale.curate.dedup at the
config's `curate.near_dup_cosine`. Prints, per kind of copy, the share of (original, copy)
pairs that ended in one cluster, and how many clusters mix different memes (false merges),
then the same at a few other thresholds. Writes bench/results/dedup_memes.json.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from memescale.config import load_config
from memescale.curate.dedup import cluster, keep_best
from memescale.decode.image import decode_image
from memescale.embed.encoder import ImageTextEncoder
from memescale.testing.sample_data import REENCODE_KINDS, image_files, reencode_variants

ROOT = Path(__file__).resolve().parents[1]


def encode_memes(cfg, folder: Path, names: list[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(embeddings fp16, meme index per row, kind per row: 0 original, 1.. REENCODE_KINDS)
    for the images `names` of `folder`."""
    enc = ImageTextEncoder(cfg.model)
    pixels, meme, kind = [], [], []
    for i, name in enumerate(names):
        data = (folder / name).read_bytes()
        for k, blob in enumerate([data] + [reencode_variants(data)[c] for c in REENCODE_KINDS]):
            pixels.append(decode_image(blob, enc.image_size, cfg.ingest.max_pixels).pixels)
            meme.append(i)
            kind.append(k)
    emb = np.concatenate([enc.encode_images(np.stack(pixels[lo:lo + 64])) for lo in range(0, len(pixels), 64)])
    return emb, np.array(meme), np.array(kind)


def pair_recall(emb: np.ndarray, meme: np.ndarray, kind: np.ndarray, cosine: float, recall: float,
                max_bucket: int) -> dict:
    """Cluster all rows; per copy kind the share of copies in their original's cluster, and
    the number of clusters holding more than one meme."""
    parent, rep = cluster(emb, np.arange(len(emb)), {}, cosine=cosine, recall=recall, max_bucket=max_bucket)
    dup_of = keep_best(parent, np.zeros(len(emb)), np.zeros(len(emb)), np.arange(len(emb)), rep)
    root = np.where(dup_of >= 0, dup_of, np.arange(len(emb)))
    orig = {m: r for m, r, k in zip(meme, root, kind) if k == 0}
    out = {"cosine": cosine, "rows": len(emb), "clusters": rep.clusters, "compared": rep.compared}
    for k, name in enumerate(REENCODE_KINDS, 1):
        sel = kind == k
        out[f"recall_{name}"] = float(np.mean([root[i] == orig[meme[i]] for i in np.flatnonzero(sel)]))
    memes_per_cluster = {}
    for r, m in zip(root, meme):
        memes_per_cluster.setdefault(r, set()).add(m)
    out["mixed_clusters"] = sum(len(s) > 1 for s in memes_per_cluster.values())
    out["memes_in_mixed_clusters"] = sum(len(s) for s in memes_per_cluster.values() if len(s) > 1)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=str(ROOT / "configs/tiny.toml"))
    p.add_argument("--memes", default=str(ROOT.parent / "shared/data/images/memes"))
    p.add_argument("--limit", type=int, default=None)
    args = p.parse_args()
    cfg = load_config(args.config)
    t0 = time.perf_counter()
    emb, meme, kind = encode_memes(cfg, Path(args.memes), image_files(args.memes)[:args.limit])
    print(f"encoded {len(emb)} images ({meme.max() + 1} memes x 4) with {cfg.model.name} "
          f"in {time.perf_counter() - t0:.1f} s")
    cc = cfg.curate
    rows = []
    for t in sorted({cc.near_dup_cosine, 0.95, 0.99, 0.995, 0.998, 0.999}):
        r = pair_recall(emb, meme, kind, t, cc.lsh_recall, cc.lsh_max_bucket)
        rows.append(r)
        mark = "  <- config" if t == cc.near_dup_cosine else ""
        print(f"cosine {t:.4f}: " + "  ".join(f"{k} {r[f'recall_{k}']:.3f}" for k in REENCODE_KINDS)
              + f"  mixed clusters {r['mixed_clusters']} ({r['memes_in_mixed_clusters']} memes){mark}")
    out = ROOT / "bench/results/dedup_memes.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"config": args.config, "model": cfg.model.name, "results": rows}, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
