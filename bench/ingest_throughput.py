"""Ingest CPU-path throughput: memescale (Downloader + decode_image) against img2dataset.

A loopback HTTP server (its own process, files held in memory) serves the shared meme
images; N URLs cycle over them, each with a unique query string. Both tools get the same
URLs, the same server, the same number of processes (one per core by default), the same
output size (centre crop to --size) and both write JPEG (quality 95) into tar shards:

- memescale: one process per core, each an asyncio Downloader (uvloop when installed) whose
  finished downloads go in batches (all that finished while the decode thread was busy) to
  a small thread pool that runs decode_image, the content hash and the JPEG encode, as the
  ingest's decode stage does per batch (Pillow and the kernels release the GIL); the
  encoder is a no-op.
  `--memescale-output none` skips the JPEG encode and the tar (the real pipeline hands the
  arrays to the encoder instead).
- img2dataset: its CLI in .venv-img2dataset (created by bench/setup_peers.sh when missing),
  webdataset output, resize_mode center_crop, processes_count = --procs, thread_count =
  --threads, EXIF extraction and robots-header checks off (memescale does neither); it
  decodes in full with OpenCV and resizes with INTER_AREA (its defaults), where memescale
  decodes JPEGs DCT-scaled and resizes bicubic.

Reported per run, from successful images only: end-to-end rate (process launch to exit,
interpreter start and imports included), work rate (first worker ready to last worker done),
and CPU milliseconds per image of the tool's processes (start-up included; the server's CPU
is shown apart), with the 1-minute load average before and after the run. On a machine
shared with other jobs the wall-clock rates move with the load; the CPU per image does not,
and `--repeat` alternates the tools, keeps each one's best run, and also gives the ratio of
each repeat's two back-to-back runs.

    .venv/bin/python bench/ingest_throughput.py [--n 8000] [--size 384] [--procs 2] [--repeat 3]
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import io
import json
import math
import mimetypes
import multiprocessing as mp
import os
import resource
import shutil
import socket
import statistics
import subprocess
import sys
import tarfile
import time
import urllib.request
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import asdict, dataclass, replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".gif", ".webp"})
JPEG_QUALITY = 95


@dataclass
class RunStats:
    """One tool's run: images written, failures, the two wall-clock windows, CPU seconds of
    the tool's processes (start-up included) and of the shared image server during the run,
    and the machine's 1-minute load average just before and just after it."""

    tool: str
    ok: int
    failed: int
    end_to_end_s: float
    work_s: float
    cpu_s: float = 0.0
    server_cpu_s: float = 0.0
    load_before: float = 0.0
    load_after: float = 0.0

    @property
    def end_to_end_rate(self) -> float:
        return self.ok / self.end_to_end_s

    @property
    def work_rate(self) -> float:
        return self.ok / self.work_s

    @property
    def cpu_ms_per_image(self) -> float:
        return 1000 * self.cpu_s / self.ok


# ---------------------------------------------------------------------------- image server


def _serve(images_dir: str, port_conn) -> None:  # noqa: ANN001 - a multiprocessing Connection
    """Serve every image file of `images_dir` from memory on 127.0.0.1 until terminated."""
    from aiohttp import web

    bodies = {}
    for p in sorted(Path(images_dir).iterdir()):
        if p.suffix.lower() in IMAGE_SUFFIXES:
            bodies[p.name] = (p.read_bytes(), mimetypes.guess_type(p.name)[0] or "application/octet-stream")

    async def handler(request: web.Request) -> web.Response:
        body, ctype = bodies[request.match_info["name"]]
        return web.Response(body=body, content_type=ctype)

    async def cpu(request: web.Request) -> web.Response:
        return web.Response(text=repr(time.process_time()))

    async def main() -> None:
        app = web.Application()
        app.router.add_get("/_cpu", cpu)
        app.router.add_get("/{name}", handler)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.bind(("127.0.0.1", 0))
        await web.SockSite(runner, sock, backlog=1024).start()
        port_conn.send((sock.getsockname()[1], sorted(bodies)))
        await asyncio.Event().wait()

    _run_loop(main())


def _run_loop(coro):  # noqa: ANN001, ANN202
    """Run `coro` to completion on uvloop when it is installed, else on asyncio's loop."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro)
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(coro)


class ImageServer:
    """The loopback image server process; `urls(n)` cycles over its files."""

    def __init__(self, images_dir: Path) -> None:
        ctx = mp.get_context("spawn")
        parent, child = ctx.Pipe()
        self._proc = ctx.Process(target=_serve, args=(str(images_dir), child), daemon=True)
        self._proc.start()
        self.port, self.names = parent.recv()

    def cpu_s(self) -> float:
        """CPU seconds the server process has used so far."""
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/_cpu") as resp:
            return float(resp.read())

    def urls(self, n: int) -> list[str]:
        names = self.names
        return [f"http://127.0.0.1:{self.port}/{names[i % len(names)]}?i={i}" for i in range(n)]

    def close(self) -> None:
        self._proc.terminate()
        self._proc.join()


# ---------------------------------------------------------------------------- memescale


@dataclass
class WorkerArgs:
    urls: list[str]
    shard: Path | None  # tar to write JPEGs into; None: decode only
    size: int
    decode_threads: int
    concurrency: int


def _decode_batch(batch: list[tuple[int, bytes]], size: int, max_pixels: int,
                  encode: bool) -> list[tuple[int, bytes | None] | None]:
    """The CPU work of a batch of downloaded images, as the ingest's decode stage does it per
    batch: decode_image and the content hash (the placeholder filter's key) for each, then
    the JPEG encode when `encode`. Per image (key, JPEG or None), or None where the decode
    failed. Thread-safe."""
    from PIL import Image

    from memescale.decode.image import ImageDecodeError, content_hash, decode_image

    out: list[tuple[int, bytes | None] | None] = []
    for key, data in batch:
        try:
            decoded = decode_image(data, size, max_pixels)
        except ImageDecodeError:
            out.append(None)
            continue
        content_hash(data)
        jpeg = None
        if encode:
            buf = io.BytesIO()
            Image.fromarray(decoded.pixels).save(buf, format="JPEG", quality=JPEG_QUALITY)
            jpeg = buf.getvalue()
        out.append((key, jpeg))
    return out


async def _ingest(args: WorkerArgs, tar: tarfile.TarFile | None) -> tuple[int, int]:
    """Download, decode and write `args.urls`; returns (ok, failed).

    Finished downloads queue up while the decode threads are busy; a free thread takes all
    that are queued as one batch, so the loop and the threads meet once per batch, not once
    per image. A download slot is released only when its image is decoded, so at most
    `args.concurrency` bodies are held at once."""
    from memescale.config import IngestConfig
    from memescale.ingest.download import Downloader

    cfg = replace(IngestConfig(), allow_private=True, download_concurrency=args.concurrency,
                  per_host_concurrency=args.concurrency, retries=0)
    loop = asyncio.get_running_loop()
    in_flight = asyncio.Semaphore(args.concurrency)
    counts = {"ok": 0, "failed": 0}
    queued: list[tuple[int, bytes]] = []
    batches: set[asyncio.Future] = set()
    errors: list[BaseException] = []  # unexpected, raised once the run is over

    def decode_queued(pool: ThreadPoolExecutor) -> None:
        while queued and len(batches) < args.decode_threads:
            batch = queued[:]
            queued.clear()
            future = loop.run_in_executor(pool, _decode_batch, batch, args.size, cfg.max_pixels,
                                          tar is not None)
            batches.add(future)
            future.add_done_callback(functools.partial(decoded, pool, n=len(batch)))

    def decoded(pool: ThreadPoolExecutor, future: asyncio.Future, n: int) -> None:
        batches.discard(future)
        error = future.exception()
        if error is not None:
            errors.append(error)
        for outcome in future.result() if error is None else []:
            counts["ok" if outcome else "failed"] += 1
            if outcome and tar is not None:
                key, jpeg = outcome
                info = tarfile.TarInfo(f"{key:09d}.jpg")
                info.size = len(jpeg)
                tar.addfile(info, io.BytesIO(jpeg))
        for _ in range(n):
            in_flight.release()
        decode_queued(pool)

    async def one(d: Downloader, pool: ThreadPoolExecutor, key: int, url: str) -> None:
        await in_flight.acquire()
        result = await d.fetch(url)
        if not result.ok:
            counts["failed"] += 1
            in_flight.release()
            return
        queued.append((key, result.data))
        decode_queued(pool)

    with ThreadPoolExecutor(args.decode_threads) as pool:
        async with Downloader(cfg) as d:
            await asyncio.gather(*(one(d, pool, i, u) for i, u in enumerate(args.urls)))
        while batches:
            await asyncio.wait(batches)
    if errors:
        raise errors[0]
    return counts["ok"], counts["failed"]


def _memescale_worker(args: WorkerArgs) -> tuple[int, int, float, float]:
    """One process: returns (ok, failed, start, end) with wall-clock times after imports."""
    import memescale.decode.image  # noqa: F401
    import memescale.ingest.download  # noqa: F401 - imports before the work window opens

    start = time.time()
    if args.shard is None:
        ok, failed = _run_loop(_ingest(args, None))
    else:
        with tarfile.open(args.shard, "w") as tar:
            ok, failed = _run_loop(_ingest(args, tar))
    return ok, failed, start, time.time()


def run_memescale(urls: list[str], out: Path, opts: argparse.Namespace) -> RunStats:
    """Split `urls` into --procs contiguous parts and ingest each in its own process."""
    out.mkdir(parents=True)
    per = math.ceil(len(urls) / opts.procs)
    jobs = [
        WorkerArgs(
            urls=urls[i : i + per],
            shard=None if opts.memescale_output == "none" else out / f"{i // per:05d}.tar",
            size=opts.size,
            decode_threads=opts.decode_threads,
            concurrency=opts.concurrency,
        )
        for i in range(0, len(urls), per)
    ]
    t0 = time.time()
    with ProcessPoolExecutor(len(jobs), mp_context=mp.get_context("spawn")) as ex:
        parts = list(ex.map(_memescale_worker, jobs))
    t1 = time.time()
    ok, failed = sum(p[0] for p in parts), sum(p[1] for p in parts)
    work = max(p[3] for p in parts) - min(p[2] for p in parts)
    return RunStats("memescale", ok, failed, t1 - t0, work)


# ---------------------------------------------------------------------------- img2dataset


def _img2dataset_bin() -> Path:
    """The img2dataset CLI of .venv-img2dataset, set up by bench/setup_peers.sh if missing."""
    exe = ROOT / ".venv-img2dataset" / "bin" / "img2dataset"
    if not exe.exists():
        subprocess.run(["bash", str(ROOT / "bench" / "setup_peers.sh"), "ingest"], check=True)
    return exe


def run_img2dataset(urls: list[str], out: Path, opts: argparse.Namespace) -> RunStats:
    """img2dataset on the same URLs, shards of ceil(N / procs) so every process gets one."""
    exe = _img2dataset_bin()
    out.mkdir(parents=True)
    url_list = out.parent / "urls.txt"
    url_list.write_text("\n".join(urls) + "\n")
    cmd = [
        str(exe), f"--url_list={url_list}", "--input_format=txt", f"--output_folder={out / 'shards'}",
        "--output_format=webdataset", f"--image_size={opts.size}", "--resize_mode=center_crop",
        f"--processes_count={opts.procs}", f"--thread_count={opts.threads}",
        f"--number_sample_per_shard={math.ceil(len(urls) / opts.procs)}",
        f"--encode_quality={JPEG_QUALITY}", "--encode_format=jpg", "--timeout=10", "--retries=0",
        "--extract_exif=False", "--disallowed_header_directives=[]", "--enable_wandb=False",
    ]
    env = dict(os.environ, NO_ALBUMENTATIONS_UPDATE="1")
    t0 = time.time()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    t1 = time.time()
    if proc.returncode != 0:
        raise RuntimeError(f"img2dataset failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    stats = [json.loads(p.read_text()) for p in sorted((out / "shards").glob("*_stats.json"))]
    ok = sum(s["successes"] for s in stats)
    work = max(s["end_time"] for s in stats) - min(s["start_time"] for s in stats)
    return RunStats("img2dataset", ok, len(urls) - ok, t1 - t0, work)


# ---------------------------------------------------------------------------- main

RUNNERS = {"memescale": run_memescale, "img2dataset": run_img2dataset}


def _children_cpu_s() -> float:
    """CPU seconds of every reaped descendant process so far (their pools' workers included)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def measure(tool: str, urls: list[str], out: Path, opts: argparse.Namespace, server: ImageServer) -> RunStats:
    """Run one tool and add the CPU its processes and the image server spent meanwhile, and
    the load average around the run."""
    load0, cpu0, server0 = os.getloadavg()[0], _children_cpu_s(), server.cpu_s()
    stats = RUNNERS[tool](urls, out, opts)
    stats.cpu_s = _children_cpu_s() - cpu0
    stats.server_cpu_s = server.cpu_s() - server0
    stats.load_before, stats.load_after = load0, os.getloadavg()[0]
    return stats


def _line(r: RunStats) -> str:
    return (f"{r.tool:12s} ok={r.ok:5d} failed={r.failed:4d}  end-to-end {r.end_to_end_s:6.2f} s "
            f"{r.end_to_end_rate:6.1f} img/s  work {r.work_s:6.2f} s {r.work_rate:6.1f} img/s  "
            f"cpu {r.cpu_ms_per_image:5.1f} ms/img (+server {1000 * r.server_cpu_s / r.ok:4.1f})  "
            f"load {r.load_before:.1f}->{r.load_after:.1f}")


def summarize(results: list[RunStats]) -> list[str]:
    """Best run of each tool (by work rate) and, with both tools, the ratios of the bests and
    of each repeat's two back-to-back runs (less exposed to the load changing between runs)."""
    best: dict[str, RunStats] = {}
    for r in results:
        if r.tool not in best or r.work_rate > best[r.tool].work_rate:
            best[r.tool] = r
    loads = [x for r in results for x in (r.load_before, r.load_after)]
    lines = ["best of each:"] + [_line(r) for r in best.values()]
    lines.append(f"load average (1 min) during the runs: {min(loads):.1f}-{max(loads):.1f}")
    if len(best) == 2:
        m, i = best["memescale"], best["img2dataset"]
        lines.append(
            f"ratio memescale/img2dataset: end-to-end {m.end_to_end_rate / i.end_to_end_rate:.2f}x, "
            f"work {m.work_rate / i.work_rate:.2f}x, cpu per image {i.cpu_ms_per_image / m.cpu_ms_per_image:.2f}x"
        )
        pairs = list(zip(*([r for r in results if r.tool == t] for t in ("memescale", "img2dataset"))))
        e2e = [m.end_to_end_rate / i.end_to_end_rate for m, i in pairs]
        cpu = [i.cpu_ms_per_image / m.cpu_ms_per_image for m, i in pairs]

        def listed(xs: list[float]) -> str:
            return f"{' '.join(f'{x:.2f}' for x in xs)} (median {statistics.median(xs):.2f}x)"

        lines.append(f"ratio per repeat: end-to-end {listed(e2e)}, cpu per image {listed(cpu)}")
    return lines


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    cores = os.cpu_count() or 1
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=Path, default=ROOT.parent / "shared" / "data" / "images" / "memes")
    p.add_argument("--n", type=int, default=8000, help="URLs to ingest")
    p.add_argument("--size", type=int, default=384, help="output side in pixels")
    p.add_argument("--procs", type=int, default=cores, help="processes per tool")
    p.add_argument("--threads", type=int, default=32, help="img2dataset download threads per process")
    p.add_argument("--concurrency", type=int, default=32, help="memescale downloads in flight per process")
    p.add_argument("--decode-threads", type=int, default=1, help="memescale decode threads per process")
    p.add_argument("--memescale-output", choices=("jpeg", "none"), default="jpeg")
    p.add_argument("--tools", default="memescale,img2dataset", help="comma-separated subset to run")
    p.add_argument("--repeat", type=int, default=1, help="alternating runs of each tool; the best counts")
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "ingest_throughput")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    opts = parse_args(argv)
    if not opts.images.is_dir():
        sys.exit(f"no image folder {opts.images} (pass --images)")
    shutil.rmtree(opts.out, ignore_errors=True)
    tools = opts.tools.split(",")
    server = ImageServer(opts.images)
    print(f"N={opts.n} size={opts.size} procs={opts.procs} files={len(server.names)} cores={os.cpu_count()}")
    results = []
    try:
        urls = server.urls(opts.n)
        for rep in range(opts.repeat):
            for tool in tools:
                results.append(measure(tool, urls, opts.out / f"{tool}-{rep}", opts, server))
                print(_line(results[-1]), flush=True)
    finally:
        server.close()
    summary = summarize(results)
    print("\n".join(summary))
    report = {
        "options": {k: str(v) for k, v in vars(opts).items()},
        "runs": [asdict(r) | {"end_to_end_rate": r.end_to_end_rate, "work_rate": r.work_rate} for r in results],
        "summary": summary,
    }
    (opts.out / "results.json").write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
