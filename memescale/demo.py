"""`make demo`: the whole product on one machine in a few minutes.

Starts a local Ray (dashboard on), serves sample images from a loopback HTTP server, writes a
sample dump whose posts link to them, ingests it (the real Ray Data job), curates it (NSFW
and placeholder filters, duplicate clusters), builds the index (the real sharded build),
starts the Serve app, runs one text query, prints the results and the page's URL, and keeps
serving until Ctrl-C.

Images: the shared meme templates (../shared/data/images/memes, with their names as titles)
when present, else images the demo draws itself. Output goes to `demo-out/` (reused: a second
`make demo` resumes the ingest and reuses the index).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import time
import urllib.parse
import urllib.request
from pathlib import Path

from PIL import Image, ImageDraw

from memescale.config import load_config
from memescale.logs import setup_logging
from memescale.ray_runtime import init_ray
from memescale.testing.sample_data import ImageServer, image_files, sample_records, write_sample_dump

log = logging.getLogger("memescale.demo")
ROOT = Path(__file__).resolve().parents[1]
SHARED_MEMES = Path(os.environ.get("MEMESCALE_SHARED_DATA", ROOT.parent / "shared" / "data")) / "images" / "memes"
COLOURS = ["#e6194b", "#3cb44b", "#ffe119", "#4363d8", "#f58231", "#911eb4", "#46f0f0", "#f032e6"]


def _index_usable(index_dir: Path) -> bool:
    """An index from an earlier `make demo` that this code can open (a format change, or a
    half-written folder, means building it again)."""
    from memescale.index import Index, IndexFormatError

    if not (index_dir / "build_summary.json").exists():
        return False
    try:
        Index.open(index_dir, threads=1).close()
    except IndexFormatError as e:
        print(f"index: rebuilding ({e})")
        return False
    return True


def draw_images(folder: Path, n: int = 120) -> dict[str, str]:
    """Draw `n` small captioned images (shapes on coloured grounds); returns name -> title."""
    folder.mkdir(parents=True, exist_ok=True)
    shapes = ["circle", "square", "triangle", "stripes"]
    titles = {}
    for i in range(n):
        name = f"drawn-{i:03d}.png"
        bg, fg = COLOURS[i % len(COLOURS)], COLOURS[(i * 3 + 1) % len(COLOURS)]
        shape = shapes[(i // len(COLOURS)) % len(shapes)]
        w, h = 320 + 40 * (i % 5), 240 + 60 * (i % 4)
        img = Image.new("RGB", (w, h), bg)
        d = ImageDraw.Draw(img)
        if shape == "circle":
            d.ellipse((w // 4, h // 4, 3 * w // 4, 3 * h // 4), fill=fg)
        elif shape == "square":
            d.rectangle((w // 4, h // 4, 3 * w // 4, 3 * h // 4), fill=fg)
        elif shape == "triangle":
            d.polygon([(w // 2, h // 6), (w // 6, 5 * h // 6), (5 * w // 6, 5 * h // 6)], fill=fg)
        else:
            for x in range(0, w, 24):
                d.rectangle((x, 0, x + 10, h), fill=fg)
        d.text((10, 10), f"{shape} #{i}", fill="white")
        if not (folder / name).exists():
            img.save(folder / name)
        titles[name] = f"a {shape} on {bg} ({i})"
    return titles


def meme_titles(folder: Path) -> dict[str, str]:
    """File name -> template name from the memes manifest (empty when it has none)."""
    manifest = folder / "manifest.jsonl"
    if not manifest.exists():
        return {}
    rows = [json.loads(line) for line in manifest.read_text().splitlines() if line.strip()]
    return {r["file"]: r.get("name") or r.get("template", "") for r in rows}


def post_json(url: str, body: dict) -> dict:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=60) as r:
        return json.loads(r.read())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="demo-out")
    p.add_argument("--config", default=str(ROOT / "configs" / "tiny.toml"))
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--query", default="success kid")
    p.add_argument("--no-wait", action="store_true", help="exit after the query instead of serving")
    args = p.parse_args(argv)
    setup_logging()
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    cfg = load_config(args.config, ["ray.include_dashboard=true"])

    if SHARED_MEMES.is_dir():
        folder, titles = SHARED_MEMES, meme_titles(SHARED_MEMES)
    else:
        folder = out / "images"
        titles = draw_images(folder)
    names = image_files(folder)
    dashboard = init_ray(cfg.ray)
    print(f"Ray dashboard: {dashboard or 'off'}")
    from memescale.build.pipeline import build_from_shards
    from memescale.curate.pipeline import run_curate
    from memescale.ingest.pipeline import run_ingest

    with ImageServer(folder, port=0) as images:
        dump = write_sample_dump(out / "RS_demo.zst", sample_records(names, images.base_url, titles))
        cfg.ingest.allow_private = True  # the demo's images live on loopback
        t0 = time.perf_counter()
        summary = run_ingest(cfg, [str(dump)], str(out / "shards"))
        print(f"ingest: {summary['encoded']} images encoded from {summary['posts']} posts "
              f"({summary['bad_lines']} bad lines skipped) in {time.perf_counter() - t0:.1f} s")
        index_dir = out / "index"
        if not _index_usable(index_dir):
            t0 = time.perf_counter()
            c = run_curate(cfg, str(out / "shards"), str(out / "curated"))
            print(f"curate: {c['rows_written']} of {c['counts']['rows']} images kept, "
                  f"{c['counts']['duplicate']} marked as duplicates, in {time.perf_counter() - t0:.1f} s "
                  f"(counts: {c['counts']})")
            t0 = time.perf_counter()
            b = build_from_shards(cfg, str(out / "curated"), str(index_dir))
            print(f"index: {b['vectors']} vectors, mean degree {b['mean_degree']:.1f}, "
                  f"built in {time.perf_counter() - t0:.1f} s")
        from serve.app import start

        base = start(index_dir, args.config, port=args.port, overrides=["serve.allow_private=true"])
        res = post_json(f"{base}/api/search", {"text": args.query, "k": 5})
        print(f"\nquery {args.query!r}: {res['stats']}")
        for r in res["results"]:
            print(f"  {r['similarity']:.3f}  r/{r['subreddit']:<14} {r['title'][:60]!s:<60} {r['url']}")
        print(f"\nThe page: {base}/?q={urllib.parse.quote(args.query)}   (API docs: {base}/docs)")
        print(f"Label pairs for the quality heads: python -m memescale.label --data {out / 'shards'} "
              f"--db {out / 'labels.sqlite'} --heads {out / 'heads.safetensors'}")
        if args.no_wait:
            return 0
        print("Serving until Ctrl-C ...")
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            return 0


if __name__ == "__main__":
    raise SystemExit(main())
