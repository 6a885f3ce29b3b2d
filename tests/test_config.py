"""Config loading: fields with a closed set of values are checked when the config loads, and
the index build's parameters take their defaults from IndexConfig."""

from __future__ import annotations

import dataclasses

import pytest
from conftest import ROOT

from memescale.config import CHOICES, Config, ConfigError, IndexConfig, ServeConfig, load_config
from memescale.index import IndexParams

TINY = ROOT / "configs" / "tiny.toml"
BAD = {
    "model.precision": "bf16",
    "model.device": "gpu",
    "ingest.parquet_compression": "zip",
    "serve.index_io": "o_direct",
    "serve.log_level": "info",
    "index.merge": "union",
}


def test_every_choice_field_exists_and_defaults_to_an_allowed_value():
    cfg = Config()
    assert set(BAD) == set(CHOICES)
    for dotted, allowed in CHOICES.items():
        section, key = dotted.split(".")
        assert getattr(getattr(cfg, section), key) in allowed, dotted


@pytest.mark.parametrize("dotted", sorted(BAD))
def test_a_bad_value_fails_at_load_naming_field_value_and_choices(dotted, tmp_path):
    section, key = dotted.split(".")
    value = BAD[dotted]
    message = f"{dotted}: expected one of {', '.join(CHOICES[dotted])}, got {value!r}"
    with pytest.raises(ConfigError) as override:
        load_config(TINY, [f"{dotted}={value}"])
    assert str(override.value) == message
    path = tmp_path / "bad.toml"
    path.write_text(f'[{section}]\n{key} = "{value}"\n')
    with pytest.raises(ConfigError) as from_file:
        load_config(path)
    assert str(from_file.value) == message


@pytest.mark.parametrize("dotted", sorted(BAD))
def test_every_allowed_value_loads(dotted):
    section, key = dotted.split(".")
    for value in CHOICES[dotted]:
        if value == "cuda:N":
            value = "cuda:1"
        assert getattr(getattr(load_config(TINY, [f"{dotted}={value}"]), section), key) == value


def test_device_takes_an_indexed_cuda_device_only():
    assert load_config(None, ["model.device=cuda:0"]).model.device == "cuda:0"
    for bad in ("cuda:", "cuda:x", "cpu:0"):
        with pytest.raises(ConfigError, match="model.device"):
            load_config(None, [f"model.device={bad}"])


def test_index_params_defaults_are_index_config_defaults():
    params, ic = IndexParams(), IndexConfig()
    assert (params.R, params.L, params.alpha, params.pq_bytes, params.seed) == (ic.R, ic.L, ic.alpha, ic.pq_bytes,
                                                                              ic.seed)
    assert dataclasses.replace(IndexParams.from_config(ic), threads=None) == params


def test_cli_defaults_come_from_the_configs(monkeypatch, tmp_path):
    import memescale.index.__main__ as cli

    seen = {}
    monkeypatch.setattr(cli, "_build", lambda args: seen.setdefault("build", args) and 0)
    monkeypatch.setattr(cli, "_search", lambda args: seen.setdefault("search", args) and 0)
    cli.main(["build", "--vectors", "x.npy", "--out", str(tmp_path)])
    cli.main(["search", "--index", "i", "--queries", "q.npy", "--out", "o.npy"])
    b, s, ic, sc = seen["build"], seen["search"], IndexConfig(), ServeConfig()
    assert (b.R, b.L, b.alpha, b.pq_bytes, b.seed) == (ic.R, ic.L, ic.alpha, ic.pq_bytes, ic.seed)
    assert (s.L, s.beam_width, s.io_budget, s.io) == (sc.search_L, sc.beam_width, sc.io_budget, sc.index_io)


@pytest.mark.parametrize("name", ["tiny", "cpu", "gpu", "cluster"])
def test_every_shipped_config_loads_and_holds_together(name):
    """What each shipped config promises: its model, where it runs, and a build plan that
    fits its memory budget at the scale it is for."""
    from memescale.build.plan import plan_for_config
    from memescale.config import parse_bytes

    cfg = load_config(ROOT / "configs" / f"{name}.toml")
    assert cfg.serve.search_L >= cfg.serve.default_k and 0 < cfg.serve.dedup_threshold <= 1
    assert cfg.ingest.encoder_actors >= 1 and cfg.ingest.download_actors >= 1
    if name in ("cpu", "tiny"):
        assert cfg.model.device in ("cpu", "auto") and cfg.ingest.gpus_per_encoder == 0
        assert cfg.serve.encoder_gpus <= 0
    if name == "cpu":
        assert cfg.model.precision == "fp32" and cfg.model.name.startswith("ViT-SO400M")
        assert cfg.serve.text_int8 and cfg.serve.encoder_threads == 0  # every core on a text query
    if name in ("cpu", "tiny"):  # one small machine places the three deployments
        s = cfg.serve
        assert s.encoder_cpus * s.encoder_replicas + s.searcher_cpus * s.searcher_replicas + s.api_cpus * s.api_replicas <= 2
    if name in ("gpu", "cluster"):
        assert cfg.model.precision == "fp16" and cfg.ingest.gpus_per_encoder == 1.0
    if name == "cluster":
        assert cfg.ray.address == "auto" and cfg.ingest.encoder_actors > 1 and cfg.index.shards
    n = {"tiny": 10**5, "cpu": 10**7, "gpu": 230 * 10**6, "cluster": 230 * 10**6}[name]
    plan = plan_for_config(cfg, n, 1152 if name != "tiny" else 64, 0, threads=12)
    assert plan.peak_memory_bytes <= plan.budget_bytes
    if cfg.index.build_memory:
        assert plan.budget_bytes == parse_bytes(cfg.index.build_memory)


def test_encoder_threads_setting():
    import os

    from serve.app import encoder_threads

    assert encoder_threads(-1, 1.0) == 1 and encoder_threads(-1, 2.4) == 2 and encoder_threads(-1, 0.25) == 1
    assert encoder_threads(0, 1.0) == len(os.sched_getaffinity(0)) and encoder_threads(3, 1.0) == 3


def test_admission_limits_default_to_the_cores():
    import os

    from serve.app import admission_limits

    cores = len(os.sched_getaffinity(0))
    assert admission_limits(0, 0) == (8 * cores, 8 * cores)
    assert admission_limits(6, 0) == (6, 6) and admission_limits(1, 0) == (1, 1)
    assert admission_limits(3, -1) == (3, -1) and admission_limits(2, 5) == (2, 5)
