"""Encoder speed of the configured model on this machine's device: text-query latency (fp32 and,
on a CPU, the int8 text tower), texts/s and images/s.

    .venv/bin/python bench/encode.py --config configs/cpu.toml     # SigLIP SO400M (random weights here)
    .venv/bin/python bench/encode.py --config configs/gpu.toml     # the same on a GPU, fp16
    .venv/bin/python bench/encode.py --config configs/tiny.toml --queries 50

The model is built with its configured weights when they can be had, else with seeded random
weights (timing only: the cost of a forward pass does not depend on the weights). Measured:
- one text query at a time, as the server's Encoder runs it (batch 1): p50 / p90 ms of the fp32
  text tower and, on a CPU, of the int8 one (`serve.text_int8`), and the cosine between the
  two embeddings of every text (min and mean; the int8 path must keep it >= 0.995);
- texts/s in batches of --text-batch, images/s in batches of --image-batch (--no-images: skip).
Texts: the shared meme set's template names and example captions (../shared/data/images/memes/
manifest.jsonl), else generated phrases. Tokens: the model's tokenizer; SigLIP's needs the
Hugging Face hub, so without it the texts go through open_clip's built-in BPE tokenizer at the
model's context length, ids folded into its vocabulary (a text tower's cost is fixed by the
context length; the cosines are then between embeddings of those stand-in tokens).
Writes bench/results/encode.json.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
sys.path.insert(0, str(ROOT))

from memescale.config import load_config  # noqa: E402
from memescale.embed.encoder import ImageTextEncoder, WeightsUnavailableError, check_weights  # noqa: E402

MANIFEST = ROOT.parent / "shared" / "data" / "images" / "memes" / "manifest.jsonl"


def texts(n: int) -> list[str]:
    out: list[str] = []
    if MANIFEST.exists():
        for line in MANIFEST.read_text().splitlines():
            rec = json.loads(line)
            out.append(str(rec.get("name") or ""))
            out += [str(e) for e in rec.get("example") or [] if e]
    out = [t for t in out if t.strip()]
    words = ["cat", "dog", "when the code compiles", "monday", "boss", "coffee", "finally", "nobody"]
    i = 0
    while len(out) < n:
        out.append(f"{words[i % len(words)]} {words[(i * 3 + 1) % len(words)]} {i}")
        i += 1
    return out[:n]


def tokens_for(enc: ImageTextEncoder, cfg, items: list[str]) -> tuple[np.ndarray, str]:
    """(n, context) int64 model tokens and how they were made."""
    from memescale.embed.encoder import StandInTokenizer

    try:
        how = "stand-in tokens (encoder.StandInTokenizer)" if isinstance(enc.tokenizer, StandInTokenizer) else \
            "model tokenizer"
        return np.stack([enc.tokenizer([t])[0].numpy() for t in items]).astype(np.int64), how
    except WeightsUnavailableError:
        import open_clip

        text_cfg = open_clip.get_model_config(cfg.name)["text_cfg"]
        ctx, vocab = int(text_cfg.get("context_length", 77)), int(text_cfg.get("vocab_size", 49408))
        bpe = open_clip.get_tokenizer("ViT-B-32", context_length=ctx)
        return (bpe(items).numpy() % vocab).astype(np.int64), f"built-in BPE at context {ctx}, ids mod {vocab}"


def latency(enc: ImageTextEncoder, toks: np.ndarray) -> dict:
    for i in range(min(3, len(toks))):
        enc.encode_tokens(toks[i: i + 1])
    ms = []
    for i in range(len(toks)):
        t0 = time.perf_counter()
        enc.encode_tokens(toks[i: i + 1])
        ms.append((time.perf_counter() - t0) * 1000)
    return {"p50_ms": float(np.percentile(ms, 50)), "p90_ms": float(np.percentile(ms, 90)), "n": len(ms)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=str(ROOT / "configs" / "cpu.toml"))
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE")
    p.add_argument("--queries", type=int, default=100, help="texts timed one at a time")
    p.add_argument("--text-batch", type=int, default=32)
    p.add_argument("--image-batch", type=int, default=8)
    p.add_argument("--image-batches", type=int, default=2)
    p.add_argument("--no-images", action="store_true")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: all cores)")
    args = p.parse_args()
    import torch

    torch.set_num_threads(args.threads or os.cpu_count() or 1)
    cfg = load_config(args.config, args.set)
    weights = cfg.model.pretrained or "random"
    try:
        check_weights(cfg.model)
    except WeightsUnavailableError:
        cfg.model.pretrained, cfg.model.random_weights, weights = "", True, "random (configured weights unavailable)"
    print(f"load average at start: {os.getloadavg()}", flush=True)
    t0 = time.perf_counter()
    enc = ImageTextEncoder(cfg.model, text_only=args.no_images)
    report: dict = {"model": cfg.model.name, "weights": weights, "device": enc.device, "dim": enc.dim,
                    "threads": torch.get_num_threads(), "load_s": time.perf_counter() - t0}
    items = texts(max(args.queries, args.text_batch))
    toks, how = tokens_for(enc, cfg.model, items)
    report["tokens"] = how
    report["text_fp32"] = latency(enc, toks[: args.queries])
    print(json.dumps(report), flush=True)
    ref = enc.encode_tokens(toks).astype(np.float32)
    t0 = time.perf_counter()
    enc.encode_tokens(toks[: args.text_batch])
    report["texts_per_s"] = args.text_batch / (time.perf_counter() - t0)
    if not enc.device.startswith("cuda"):
        q = ImageTextEncoder(cfg.model, text_only=True, text_int8=True)
        report["text_int8"] = latency(q, toks[: args.queries])
        cos = np.sum(q.encode_tokens(toks).astype(np.float32) * ref, axis=1)
        report["int8_cosine"] = {"min": float(cos.min()), "mean": float(cos.mean()), "texts": len(cos)}
        del q
    if not args.no_images:
        px = np.random.default_rng(0).integers(0, 256, (args.image_batch, enc.image_size, enc.image_size, 3),
                                               dtype=np.uint8)
        enc.encode_images(px[:1])
        t0 = time.perf_counter()
        for _ in range(args.image_batches):
            enc.encode_images(px)
        report["images_per_s"] = args.image_batch * args.image_batches / (time.perf_counter() - t0)
    report["load_average_end"] = os.getloadavg()
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "encode.json").write_text(json.dumps(report, indent=1))
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
