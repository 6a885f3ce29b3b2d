"""The ingest pipeline on Ray Data: dumps -> refs -> download -> decode -> encode -> shards.

    DumpSource (one streaming read task, input order)        rows: one per image ref + one
      -> map_batches(FetchStage, actor pool, async)            marker row per chunk
      -> map_batches(decode_stage, tasks)
      -> map_batches(EncodeStage, actor pool, GPU when asked)
      -> driver: ChunkAssembler -> ShardStore (Parquet + manifest per completed chunk)

Every ref yields exactly one row at the end (ok, failed or discarded), so the driver knows
when a chunk is complete. Backpressure is Ray Data's streaming executor's: the read task and
the downloaders run only as fast as the blocks they produce are consumed downstream, with
bounded object-store memory.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterator
from dataclasses import asdict

import numpy as np
import pyarrow as pa
import ray
from ray.data.block import BlockMetadata
from ray.data.datasource import Datasource, ReadTask

from memescale.config import Config, IngestConfig, ModelConfig
from memescale.ingest.assembler import ChunkAssembler
from memescale.ingest.chunks import PostFilter, plan_chunks, plan_retries
from memescale.metrics import record
from memescale.shards.store import ChunkResult, ShardStore, summarize

log = logging.getLogger(__name__)

REF_COLUMNS = ["image_id", "post_id", "image_index", "url", "subreddit", "title", "author",
               "created_utc", "score", "over_18", "permalink"]


def _chunk_block(result: ChunkResult, refs) -> pa.Table:
    """One chunk as rows: its refs (status "pending") then one marker row carrying its counts."""
    n = len(refs)
    cols: dict[str, list] = {c: [getattr(r, c) for r in refs] for c in REF_COLUMNS}
    for c, blank in (("image_id", -1), ("post_id", ""), ("image_index", -1), ("url", ""),
                     ("subreddit", ""), ("title", ""), ("author", ""), ("created_utc", 0),
                     ("score", 0), ("over_18", False), ("permalink", "")):
        cols[c].append(blank)
    cols["chunk"] = [result.key] * (n + 1)
    cols["seq"] = list(range(n + 1))
    cols["chunk_total"] = [n + 1] * (n + 1)
    cols["status"] = ["pending"] * n + ["marker"]
    cols["chunk_info"] = [""] * n + [json.dumps(asdict(result))]
    return pa.table(cols)


class DumpSource(Datasource):
    """Ray Data source over dump files: one read task streaming one block per chunk, in order.

    One reader keeps `--limit` exact and the order deterministic; decompression and JSON
    parsing run at tens of thousands of posts/s, far above what downloads consume.
    """

    def __init__(self, dumps: list[str], chunk_posts: int, done: dict[str, ChunkResult],
                 post_filter: PostFilter, limit: int | None, retry_from: str | None = None):
        super().__init__()
        self._args = (dumps, chunk_posts, done, post_filter, limit)
        self._retry_from = retry_from  # the output whose transient failures get a retry pass

    def estimate_inmemory_data_size(self) -> int | None:
        return None

    def get_read_tasks(self, parallelism: int, per_task_row_limit=None, data_context=None) -> list[ReadTask]:
        args, retry_from = self._args, self._retry_from

        def read() -> Iterator[pa.Table]:
            for result, refs in plan_chunks(*args):
                record("memescale_ingest_posts_read", result.posts)
                record("memescale_ingest_bad_lines", result.bad_lines)
                record("memescale_ingest_images_found", len(refs))
                yield _chunk_block(result, refs)
            if retry_from is not None:
                for result, retry_refs in plan_retries(args[2], ShardStore(retry_from).read_failures):
                    record("memescale_ingest_images_retried", len(retry_refs))
                    yield _chunk_block(result, retry_refs)

        meta = BlockMetadata(num_rows=None, size_bytes=None, input_files=None, exec_stats=None)
        return [ReadTask(read, meta)]


class FetchStage:
    """Async downloader actor: fetches the batch's pending URLs concurrently on one session.

    Adds columns data (bytes), final_url, mime, bytes; failures set status "failed" and reason.
    The session is opened by the first batch, on the event loop Ray Data runs async batch
    functions on, and closed when Ray Data drops the stage at actor shutdown (`__del__`) or
    by `close()`.
    """

    def __init__(self, cfg: IngestConfig):
        from memescale.ingest.download import SharedDownloader

        self.cfg = cfg
        self.downloads = SharedDownloader(cfg)

    def close(self) -> None:
        """Close the HTTP session (from any thread but the batches' event loop, where the close
        is only scheduled). Idempotent."""
        self.downloads.close()

    def __del__(self) -> None:
        downloads = getattr(self, "downloads", None)
        if downloads is not None and downloads.is_open:
            try:
                downloads.close()
            except Exception:  # at interpreter exit the loop may be gone: nothing left to close on
                log.warning("FetchStage: the download session could not be closed", exc_info=True)

    async def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        n = len(batch["status"])
        todo = [i for i in range(n) if batch["status"][i] == "pending"]
        results = await self.downloads.fetch_many([str(batch["url"][i]) for i in todo])
        data = np.empty(n, dtype=object)
        data[:] = b""
        final_url = batch["url"].astype(object).copy()
        mime = np.full(n, "", dtype=object)
        size = np.zeros(n, dtype=np.int64)
        status = batch["status"].astype(object).copy()
        reason = np.full(n, "", dtype=object)
        for i, r in zip(todo, results):
            record("memescale_ingest_fetch_seconds", r.elapsed_s)
            if r.ok:
                assert r.data is not None  # an ok FetchResult holds the body
                data[i], final_url[i], mime[i], size[i] = r.data, r.final_url, r.mime, len(r.data)
                status[i] = "fetched"
                record("memescale_ingest_images_downloaded")
                record("memescale_ingest_bytes", len(r.data))
            else:
                assert r.reason is not None  # a failed FetchResult names its reason
                status[i], reason[i] = "failed", r.reason
                record("memescale_ingest_images_failed", reason=r.reason)
        batch.update(data=data, final_url=final_url, mime=mime, bytes=size, status=status, reason=reason)
        return batch


def decode_stage(batch: dict[str, np.ndarray], size: int, max_pixels: int,
                 placeholder_hashes: list[str]) -> dict[str, np.ndarray]:
    """Decode and resize fetched images to (size, size, 3) uint8 bytes; drop known placeholders.

    Replaces `data` with `pixels` (raw bytes, empty for rows that are not ok) and adds
    width, height, content_hash. Cost: one Pillow decode per fetched row.
    """
    from memescale.decode.image import ImageDecodeError, content_hash, decode_image

    placeholders = set(placeholder_hashes)
    n = len(batch["status"])
    pixels = np.empty(n, dtype=object)
    pixels[:] = b""
    width = np.zeros(n, dtype=np.int32)
    height = np.zeros(n, dtype=np.int32)
    hashes = np.full(n, "", dtype=object)
    status = batch["status"].astype(object).copy()
    reason = batch["reason"].astype(object).copy()
    for i in range(n):
        if status[i] != "fetched":
            continue
        data = batch["data"][i]
        hashes[i] = content_hash(data)
        if hashes[i] in placeholders:
            status[i], reason[i] = "discarded", "placeholder"
            record("memescale_ingest_images_discarded", reason="placeholder")
            continue
        t0 = time.perf_counter()
        try:
            img = decode_image(data, size, max_pixels)
        except ImageDecodeError as e:
            status[i], reason[i] = "failed", f"decode_{e.reason}"
            record("memescale_ingest_images_failed", reason=reason[i])
            continue
        record("memescale_ingest_decode_seconds", time.perf_counter() - t0)
        pixels[i] = img.pixels.tobytes()
        width[i], height[i] = img.width, img.height
        status[i] = "decoded"
    del batch["data"]
    batch.update(pixels=pixels, width=width, height=height, content_hash=hashes,
                 status=status, reason=reason)
    return batch


class EncodeStage:
    """Encoder actor: one model per actor (one GPU each when configured), batches of pixels in,
    `embedding` (float16, L2-normalised; zeros for rows that are not ok) and `model` out."""

    def __init__(self, cfg: ModelConfig):
        from memescale.embed.encoder import ImageTextEncoder

        self.encoder = ImageTextEncoder(cfg)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        enc = self.encoder
        n = len(batch["status"])
        emb = np.zeros((n, enc.dim), dtype=np.float16)
        status = batch["status"].astype(object).copy()
        ok = [i for i in range(n) if status[i] == "decoded"]
        if ok:
            s = enc.image_size
            pix = np.stack([np.frombuffer(batch["pixels"][i], np.uint8).reshape(s, s, 3) for i in ok])
            t0 = time.perf_counter()
            emb[ok] = enc.encode_images(pix)
            record("memescale_ingest_encode_seconds", time.perf_counter() - t0)
            record("memescale_ingest_images_encoded", len(ok))
            status[ok] = "ok"
        del batch["pixels"]
        batch.update(embedding=emb, status=status, model=np.full(n, enc.model_tag, dtype=object))
        return batch


def build_dataset(cfg: Config, image_size: int, dumps: list[str], done: dict[str, ChunkResult],
                  post_filter: PostFilter, limit: int | None, retry_from: str | None = None) -> ray.data.Dataset:
    """Wire the stages into one lazy streaming Dataset (nothing runs until it is iterated).
    retry_from: an output directory whose transient failures get one retry pass, after the
    dumps' chunks still to do."""
    ic = cfg.ingest
    ds = ray.data.read_datasource(DumpSource(dumps, ic.chunk_posts, done, post_filter, limit, retry_from))
    ds = ds.map_batches(
        FetchStage, fn_constructor_args=(ic,), batch_size=ic.download_batch, batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=ic.download_actors, max_tasks_in_flight_per_actor=4,
                                           max_concurrent_calls_per_actor=4),
        num_cpus=0.5,
    )
    ds = ds.map_batches(
        decode_stage, fn_kwargs=dict(size=image_size, max_pixels=ic.max_pixels,
                                     placeholder_hashes=list(ic.placeholder_hashes)),
        batch_size=ic.decode_batch, batch_format="numpy", num_cpus=1,
    )
    return ds.map_batches(
        EncodeStage, fn_constructor_args=(cfg.model,), batch_size=ic.encode_batch, batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=ic.encoder_actors),
        num_gpus=ic.gpus_per_encoder or None, num_cpus=0 if ic.gpus_per_encoder else 0.5,
    )


def run_ingest(cfg: Config, dumps: list[str], out: str, post_filter: PostFilter | None = None,
               limit: int | None = None, progress: bool = True, retry_failed: bool = False) -> dict:
    """Run (or resume) an ingest into `out`; returns the summary over all completed chunks.
    retry_failed: also give the refs that failed for transient reasons in chunks completed
    by earlier runs one more try (`chunks.plan_retries`)."""
    from tqdm import tqdm

    from memescale.embed.encoder import model_image_size

    store = ShardStore(out)
    done = store.done()
    log.info("resuming: %d chunks already complete in %s", sum(r.complete for r in done.values()), out)
    ds = build_dataset(cfg, model_image_size(cfg.model), dumps, done, post_filter or PostFilter(), limit,
                       (store.root if store.local else out) if retry_failed else None)  # read on a worker: absolute
    assembler = ChunkAssembler()
    bar = tqdm(desc="chunks written", unit="chunk", disable=not progress)
    written = 0
    for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
        for result, table, failures in assembler.add(batch):
            store.write_chunk(result, table, cfg.ingest.parquet_compression, failures)
            written += 1
            bar.update(1)
            bar.set_postfix(encoded=result.encoded, failed=sum(result.failed.values()))
    bar.close()
    if assembler.pending():
        raise RuntimeError(f"pipeline ended with incomplete chunks: {assembler.pending()[:5]}")
    summary = summarize(list(store.done().values()))
    summary["written_this_run"] = written
    return summary
