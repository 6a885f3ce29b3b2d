"""One typed configuration object, loaded from TOML, any field overridable from the command line.

A config file has one table per section (`[model]`, `[ingest]`, `[curate]`, `[index]`, `[ray]`,
`[serve]`); every
key is optional and defaults to the value below. Overrides use dotted paths:
``--set ingest.download_concurrency=128`` (the value is parsed as TOML, falling back to a
plain string), and the dedicated CLI flags of each job map onto fields the same way.

Unknown sections or keys are an error (a typo must not silently fall back to a default).
"""

from __future__ import annotations

import dataclasses
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_type_hints


class ConfigError(ValueError):
    """A config file or override names an unknown field, or has a value of the wrong type or
    outside the field's allowed values (`CHOICES`)."""


@dataclass
class ModelConfig:
    """Which open_clip model encodes images and texts, and where its weights come from."""

    name: str = "ViT-SO400M-14-SigLIP-384"
    # Path of an open_clip model config JSON to register under `name` (for the project's own
    # tiny test architecture); relative paths are resolved against the config file's folder.
    config_file: str = ""
    # A pretrained tag known to open_clip ("webli"), a local checkpoint file, or "" for seeded
    # random weights (allowed only when `random_weights` is true: tests and the demo).
    pretrained: str = "webli"
    random_weights: bool = False
    seed: int = 0
    precision: str = "fp32"  # "fp32" or "fp16" (fp16 only takes effect on a GPU)
    device: str = "auto"  # "auto" picks cuda when available, else cpu; or "cpu", "cuda", "cuda:N"


@dataclass
class IngestConfig:
    """Reading dumps, downloading, decoding and encoding images, writing shards."""

    chunk_posts: int = 2000  # posts per resume unit (one Parquet file + one manifest entry)
    # Downloader: limits are per downloader actor; the global limit is actors x concurrency.
    download_actors: int = 2
    download_concurrency: int = 64
    per_host_concurrency: int = 16
    download_batch: int = 64
    connect_timeout_s: float = 5.0
    read_timeout_s: float = 10.0
    total_timeout_s: float = 20.0
    retries: int = 2
    backoff_s: float = 0.5
    max_bytes: int = 16 * 1024 * 1024
    max_redirects: int = 5
    allow_private: bool = False
    user_agent: str = "memescale/0.1 (+image search research)"
    # Decoder
    max_pixels: int = 64_000_000  # decompression-bomb guard (width x height of the source)
    decode_batch: int = 32
    # Content hashes (blake2b-128 hex of the downloaded bytes) of known placeholder images.
    placeholder_hashes: list[str] = field(default_factory=list)
    # Encoder actor pool
    encoder_actors: int = 1
    encode_batch: int = 32
    gpus_per_encoder: float = 0.0
    # Output
    parquet_compression: str = "zstd"  # zstd, snappy, gzip, brotli, lz4 or none


@dataclass
class CurateConfig:
    """Filters, dedup and quality heads between ingest and build (ray_jobs/curate.py), and the
    labelling tool that trains the heads (memescale/quality/label_app.py). Relative paths in this section
    are resolved against the config file's folder."""

    # Placeholders ("image deleted"): rows whose content hash is in ingest.placeholder_hashes,
    # or whose embedding is within `placeholder_cosine` of a reference image's, are dropped.
    placeholder_images: list[str] = field(default_factory=list)
    placeholder_cosine: float = 0.95
    # NSFW: over_18 rows and rows the embedding probe scores >= `nsfw_threshold` are dropped,
    # or kept with `nsfw` = true when `keep_nsfw`. The probe trains on the data's own over_18
    # labels (held-out share `nsfw_holdout`) and is skipped below `nsfw_min_positives`.
    keep_nsfw: bool = False
    nsfw_probe: bool = True
    nsfw_threshold: float = 0.9
    nsfw_holdout: float = 0.2
    nsfw_min_positives: int = 20
    nsfw_max_train: int = 200_000  # rows sampled to train the probe
    # Near-duplicates: clusters of rows at cosine >= `near_dup_cosine`, found by SimHash LSH
    # tuned so a pair at the threshold collides in some band with probability `lsh_recall`.
    near_dup_cosine: float = 0.95
    lsh_recall: float = 0.99
    lsh_max_bucket: int = 2048  # larger buckets are verified against at most this many leaders
    # Quality heads (safetensors from `python -m memescale.quality train`); "" writes null scores.
    quality_heads: str = ""
    score_actors: int = 1  # Ray Data actors applying decisions and heads, one input file at a time
    heads_members: int = 5
    heads_hidden: int = 256
    heads_holdout: float = 0.15
    heads_max_epochs: int = 400
    heads_patience: int = 20
    # Labelling: share of random pairs (the rest by ensemble disagreement), labels between
    # retrains of the ensemble, candidate pairs scored per active choice.
    label_random_share: float = 0.25
    label_retrain_every: int = 20
    label_candidates: int = 512


@dataclass
class IndexConfig:
    """Index build parameters (see memescale.index)."""

    R: int = 64
    L: int = 100
    alpha: float = 1.2
    pq_bytes: int = 48
    # Construction searches rank candidates by PQ codes of this many bytes per vector and score
    # only the nodes they expand exactly (memescale/index/vamana.py, "Navigation on PQ codes"):
    # a faster build at slightly different recall (bench/README.md). 0: exact distances.
    build_pq_bytes: int = 0
    # RAM the whole build may use on a node (driver plus the shard tasks running at once), in
    # bytes; a file or override may give a size such as "48GiB", "512MiB" or "64GB". 0 (or ""):
    # not set, the build plan (memescale/build/plan.py) takes the node's total RAM minus a margin.
    build_memory: int = 0
    # Number of shard graphs; 0: derived from build_memory by the build plan (the smallest
    # number whose largest shard fits next to the driver). Set it to override the plan.
    shards: int = 0
    shard_overlap: int = 2
    # How a sharded build merges each node's lists from its shards (memescale/index/merge.py):
    # "prune" re-prunes their union with robust_prune, reading every candidate's row;
    # "interleave" takes the lists' entries in turn (robust_prune's choices first) and reads no
    # row (for vectors that do not fit in RAM; bench/README.md measures the difference).
    merge: str = "prune"
    # A sharded build's refinement pass over the merged graph (memescale/build/stages.py): its
    # search list size (0: no pass) and the share of nodes, those nearest a shard border, it
    # re-searches.
    refine_L: int = 32
    refine_fraction: float = 0.3
    # Quality scores and recency as extra vector dimensions (memescale/index/weighting.py) so that
    # search weights steer the traversal; `weight_beta` is their scale (0 disables them).
    weight_beta: float = 0.2
    seed: int = 0
    # Live updates (ray_jobs/update_index.py, memescale/index/update.py): an insert or delete
    # consolidates the index into a new generation once the live inserted rows exceed
    # delta_max or the deleted ones tombstones_max (0: only on --consolidate).
    delta_max: int = 1_000_000
    tombstones_max: int = 1_000_000


@dataclass
class RayConfig:
    """How jobs attach to Ray: "" starts a local instance, "auto" joins a running cluster."""

    address: str = ""
    num_cpus: int = 0  # 0: let Ray detect
    object_store_mb: int = 0  # 0: Ray's default
    include_dashboard: bool = True


@dataclass
class ServeConfig:
    """The Ray Serve app (serve/app.py): deployments, search defaults, input limits, telemetry."""

    # Deployments: replicas and the resources each replica reserves.
    encoder_replicas: int = 1
    searcher_replicas: int = 1
    api_replicas: int = 1
    encoder_cpus: float = 0.5
    searcher_cpus: float = 0.5
    api_cpus: float = 0.25
    encoder_gpus: float = -1.0  # -1: one GPU per encoder replica when the cluster has GPUs
    # torch threads of a CPU Encoder replica: -1: round(encoder_cpus); 0: every core (a text
    # query is latency-bound, and a request's search waits for its vector anyway); N: N
    encoder_threads: int = -1
    encode_batch: int = 32  # @serve.batch max_batch_size (texts and images alike)
    image_queries: bool = True  # false: the Encoder loads the text tower alone; image queries are 422
    text_int8: bool = False  # the text tower in int8 dynamic quantisation (CPU encoders; bench/encode.py)
    text_cache_size: int = 4096  # text embeddings each Encoder replica keeps (LRU; dim x 4 bytes each)
    encode_batch_wait_s: float = 0.002
    search_threads: int = 2  # Index.search calls in flight at once per Searcher replica
    index_io: str = "mmap"  # record reads: "mmap" (page cache) or "direct" (O_DIRECT + native AIO)
    # How often a Searcher looks for committed index updates and new generations (seconds)
    refresh_s: float = 1.0
    max_ongoing_requests: int = 64  # calls an Encoder or Searcher replica takes at once
    # Admission (overload): an Api replica works on at most api_max_ongoing_requests HTTP
    # requests at once (0: eight times the CPU count) and up to max_queued_requests more wait
    # at each Serve proxy (0: as many; -1: no limit); the rest are refused at the proxy at once
    # with 503 and Retry-After: retry_after_s. The limit covers every route, the page's own
    # files too: set tighter, a browser's parallel requests under load can be refused (at 4 / 2
    # on 2 cores the page's tests failed), set looser, admitted requests wait longer under
    # overload. bench/serve_load.py --overload measures it.
    api_max_ongoing_requests: int = 0
    max_queued_requests: int = 0
    retry_after_s: float = 1.0
    access_log: bool = True  # Api replicas log one line per HTTP request (Encoder/Searcher: never)
    log_level: str = "INFO"  # DEBUG, INFO, WARNING, ERROR or CRITICAL
    # Search
    default_k: int = 24  # results per page when a request gives no k
    search_L: int = 64  # candidate list size of an unfiltered search (raised to k when smaller)
    beam_width: int = 4
    io_budget: int = 0  # sector reads per query, 0: unbounded
    filter_L_multiplier: int = 4  # a filtered search that comes up short retries with L x this
    # Hard filters run inside the graph search with L / share ** 0.6 (share: the estimated
    # share of matching nodes; engine.FILTER_L_EXPONENT), at most filter_L_max, ranking a
    # non-matching candidate filter_mismatch (inner product) lower; a filter whose candidate
    # set (subreddits, months, score range) is at most filter_scan_max nodes and cheaper to
    # score than the traversal scans it instead (PQ scores, exact re-rank). Values measured
    # with bench/filters.py.
    filter_L_max: int = 2000
    filter_scan_max: int = 200_000
    filter_mismatch: float = 0.05
    max_depth: int = 1000  # deepest result (cursor offset + k) a query can page to
    dedup_threshold: float = 0.95  # cosine at or above which a result is a duplicate (per model)
    extra_dim_scale: float = 1.0  # query-side multiplier on the weights' extra dimensions
    # Inputs
    max_body_bytes: int = 8 * 1024 * 1024
    max_image_pixels: int = 40_000_000
    allow_private: bool = False  # image_url may reach loopback/private addresses (tests, demo)
    image_url_timeout_s: float = 10.0
    # Telemetry: relative paths are resolved against the working directory of the app builder.
    telemetry_enabled: bool = True
    telemetry_path: str = "~/.cache/memescale/telemetry/events.jsonl"
    telemetry_max_bytes: int = 16 * 1024 * 1024  # then the file is rotated once (.1)
    telemetry_event_max_bytes: int = 2048


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    ingest: IngestConfig = field(default_factory=IngestConfig)
    curate: CurateConfig = field(default_factory=CurateConfig)
    index: IndexConfig = field(default_factory=IndexConfig)
    ray: RayConfig = field(default_factory=RayConfig)
    serve: ServeConfig = field(default_factory=ServeConfig)
    source: str = ""  # the file this config was loaded from ("" for defaults)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _check_type(path: str, value: Any, typ: Any) -> Any:
    if typ is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    origin = getattr(typ, "__origin__", None)
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{path}: expected a list, got {value!r}")
        return value
    if typ in (int, float, str, bool) and (
        not isinstance(value, typ) or (typ is int and isinstance(value, bool))
    ):
        raise ConfigError(f"{path}: expected {typ.__name__}, got {value!r}")
    return value


# Fields that take one of a few names, checked whenever a value is set (file or override).
# "cuda:N" stands for any indexed CUDA device (cuda:0, cuda:1, ...).
CHOICES: dict[str, tuple[str, ...]] = {
    "index.merge": ("prune", "interleave"),
    "model.precision": ("fp32", "fp16"),
    "model.device": ("auto", "cpu", "cuda", "cuda:N"),
    "ingest.parquet_compression": ("zstd", "snappy", "gzip", "brotli", "lz4", "none"),
    "serve.index_io": ("mmap", "direct"),
    "serve.log_level": ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"),
}


_SIZE_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9,
               "t": 10**12, "tb": 10**12, "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_bytes(value: Any, name: str = "value") -> int:
    """A size in bytes from an int (>= 0) or a string such as "48GiB", "1.5GiB", "512MiB",
    "64GB" or "1073741824" (binary units KiB..TiB, decimal KB..TB, case-insensitive; "" is 0).
    Raises ConfigError naming `name` and the accepted forms."""
    if isinstance(value, int) and not isinstance(value, bool):
        if value < 0:
            raise ConfigError(f"{name}: expected a size >= 0, got {value!r}")
        return value
    if isinstance(value, str):
        if not value.strip():
            return 0
        m = re.fullmatch(r"\s*(\d+(?:\.\d*)?)\s*([a-zA-Z]*)\s*", value)
        if m and m.group(2).lower() in _SIZE_UNITS:
            return int(float(m.group(1)) * _SIZE_UNITS[m.group(2).lower()])
    raise ConfigError(f'{name}: expected a size in bytes (an int, or a string such as "48GiB", "512MiB", '
                      f'"64GB"), got {value!r}')


# Fields given as sizes ("48GiB"), stored as int bytes.
SIZES: tuple[str, ...] = ("index.build_memory",)


def _is_choice(value: Any, allowed: tuple[str, ...]) -> bool:
    if value in allowed:
        return True
    return "cuda:N" in allowed and isinstance(value, str) and re.fullmatch(r"cuda:\d+", value) is not None


def _apply(section_obj: Any, section: str, values: dict[str, Any]) -> None:
    hints = get_type_hints(type(section_obj))
    for key, value in values.items():
        if key not in hints:
            raise ConfigError(f"unknown config key {section}.{key}")
        if f"{section}.{key}" in SIZES:
            value = parse_bytes(value, f"{section}.{key}")
        value = _check_type(f"{section}.{key}", value, hints[key])
        allowed = CHOICES.get(f"{section}.{key}")
        if allowed and not _is_choice(value, allowed):
            raise ConfigError(f"{section}.{key}: expected one of {', '.join(allowed)}, got {value!r}")
        setattr(section_obj, key, value)


def _sections(cfg: Config) -> dict[str, Any]:
    return {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg) if f.name != "source"}


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Load `path` (TOML) over the defaults, then apply ``section.key=value`` overrides.

    Raises ConfigError for unknown keys, wrong types, a value outside a field's CHOICES
    (naming the field, the value and the allowed values), a size field (`SIZES`) that is not a
    size, or an unreadable file. Size fields are stored as int bytes.
    """
    cfg = Config()
    sections = _sections(cfg)
    if path:
        p = Path(path)
        try:
            data = tomllib.loads(p.read_text())
        except (OSError, tomllib.TOMLDecodeError) as e:
            raise ConfigError(f"cannot read config {p}: {e}") from e
        for name, values in data.items():
            if name not in sections or not isinstance(values, dict):
                raise ConfigError(f"{p}: unknown config section [{name}]")
            _apply(sections[name], name, values)
        cfg.source = str(p.resolve())
        if cfg.model.config_file and not Path(cfg.model.config_file).is_absolute():
            cfg.model.config_file = str((p.parent / cfg.model.config_file).resolve())
        cfg.curate.placeholder_images = [str((p.parent / f).resolve())
                                         for f in cfg.curate.placeholder_images]
        if cfg.curate.quality_heads:
            cfg.curate.quality_heads = str((p.parent / cfg.curate.quality_heads).resolve())
    for item in overrides or []:
        set_field(cfg, item)
    return cfg


def set_field(cfg: Config, item: str) -> None:
    """Apply one ``section.key=value`` override; the value is parsed as TOML when it can be."""
    if "=" not in item or "." not in item.split("=", 1)[0]:
        raise ConfigError(f"override {item!r} is not of the form section.key=value")
    dotted, raw = item.split("=", 1)
    section, key = dotted.strip().split(".", 1)
    sections = _sections(cfg)
    if section not in sections:
        raise ConfigError(f"unknown config section {section!r} in override {item!r}")
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw
    _apply(sections[section], section, {key: value})
