"""The build plan (memescale/build/plan.py): a 230M x 1152 build fits 64 GiB, a budget too
small fails naming the smallest budget that works (and that one does), `--plan-only` prints
the plan and builds nothing, and `index.build_memory` parses sizes at load."""

from __future__ import annotations

import json
import re
import sys

import pytest
from conftest import ROOT

from memescale.build import stages
from memescale.build.plan import (
    COSTS,
    DRIVER_BYTES_PER_VECTOR,
    BuildPlanError,
    driver_fixed_bytes,
    format_plan,
    plan_build,
    plan_for_config,
    shard_vectors,
)
from memescale.config import ConfigError, load_config
from memescale.index.vamana import nav_dsub_for

GiB = 2**30
TINY = ROOT / "configs" / "tiny.toml"
BIG = dict(R=64, L=128, overlap=2, pq_bytes=64, threads=12)


def _fits(plan) -> None:
    assert plan.driver_memory_bytes <= plan.budget_bytes
    assert plan.driver_idle_bytes + plan.tasks_at_once * plan.task_memory_bytes <= plan.budget_bytes
    assert plan.peak_memory_bytes == max(plan.driver_memory_bytes,
                                         plan.driver_idle_bytes + plan.tasks_at_once * plan.task_memory_bytes)
    assert plan.driver_idle_bytes <= plan.driver_memory_bytes
    assert plan.driver_memory_bytes <= plan.driver_fixed_bytes + 24 * plan.n
    assert plan.tasks_at_once >= 1


@pytest.mark.parametrize("threads_per_task", [1, 12])
def test_230m_by_1152_fits_64_gib_on_12_threads(threads_per_task):
    n = 230_000_000
    plan = plan_build(n, 1152, **BIG, budget_bytes=64 * GiB, threads_per_task=threads_per_task)
    _fits(plan)
    assert DRIVER_BYTES_PER_VECTOR <= 24 and plan.driver_fixed_bytes == driver_fixed_bytes(1157)
    assert plan.index_dim == 1157 and plan.shards_derived
    # every vector is in `overlap` shards of at most shard_vectors each, and the declared memory
    # is stages.shard_memory_bytes of the largest one
    assert plan.shards * plan.shard_vectors >= 2 * n
    assert plan.task_memory_bytes == stages.shard_memory_bytes(plan.shard_vectors, 1157, 64, threads_per_task)
    # the smallest shard count that fits: one fewer would not
    fewer = stages.shard_memory_bytes(shard_vectors(n, plan.shards - 1, 2), 1157, 64, threads_per_task)
    assert plan.driver_idle_bytes + fewer > plan.budget_bytes
    assert plan.tasks_at_once <= 12 // threads_per_task
    assert plan.scratch["vectors_fp16"] == n * 1152 * 2 and plan.scratch["pq_codes"] == n * 64
    assert plan.index_disk["records"] >= n * (1157 * 2 + 64 * 4) and plan.index_disk["codes"] >= n * 64
    assert plan.seconds["total"] == pytest.approx(sum(v for k, v in plan.seconds.items() if k != "total"), abs=1)
    assert plan.seconds["graphs"] > 0 and json.loads(json.dumps(plan.to_dict()))["shards"] == plan.shards
    assert re.search(rf"shards\s+{plan.shards} \(derived\)", format_plan(plan))


def test_navigation_codes_are_declared_in_each_shard_task():
    n = 230_000_000
    exact = plan_build(n, 1152, **BIG, budget_bytes=64 * GiB, threads_per_task=12)
    nav = plan_build(n, 1152, **BIG, budget_bytes=64 * GiB, threads_per_task=12, build_pq_bytes=144)
    _fits(nav)
    assert nav.task_memory_bytes == stages.shard_memory_bytes(nav.shard_vectors, 1157, 64, 12, build_pq_bytes=144)
    # a code byte per nav_dsub dimensions for every node, and the codebooks' training scratch on top
    code_bytes = -(-1157 // nav_dsub_for(1157, 144))
    assert 129 <= code_bytes <= 144
    per_shard = stages.shard_memory_bytes(exact.shard_vectors, 1157, 64, 12, build_pq_bytes=144)
    assert per_shard - exact.task_memory_bytes >= 1.25 * exact.shard_vectors * code_bytes
    assert nav.shards >= exact.shards


def test_many_small_tasks_run_at_once_when_they_fit():
    plan = plan_build(2_000_000, 384, R=32, L=64, overlap=2, pq_bytes=48, budget_bytes=64 * GiB, threads=8,
                      shards=64)
    _fits(plan)
    assert not plan.shards_derived and plan.tasks_at_once == 8  # capped by the threads
    one = plan_build(50_000, 384, R=32, L=64, overlap=2, pq_bytes=48, budget_bytes=64 * GiB, threads=8)
    assert one.shards == 1 and one.shard_vectors == 50_000 and one.scratch["shard_graphs"] == 50_000 * (4 * 32 + 4)


def test_a_budget_too_small_names_the_smallest_budget_that_works():
    n = 230_000_000
    with pytest.raises(BuildPlanError) as e:
        plan_build(n, 1152, **BIG, budget_bytes=4 * GiB)
    assert isinstance(e.value, ValueError)
    need = int(re.search(r"the smallest budget that works is [\d.]+ \w+ \((\d+) bytes\)", str(e.value)).group(1))
    assert need > 4 * GiB
    _fits(plan_build(n, 1152, **BIG, budget_bytes=need))  # the named budget works ...
    with pytest.raises(BuildPlanError):  # ... and is the smallest
        plan_build(n, 1152, **BIG, budget_bytes=need - 1)
    # a fixed shard count that does not fit names the budget it needs
    with pytest.raises(BuildPlanError, match=r"index.shards=2: .* the smallest budget that works with 2 shards"):
        plan_build(n, 1152, **BIG, budget_bytes=64 * GiB, shards=2)


def test_plan_for_config_takes_the_config_and_its_overrides():
    cfg = load_config(ROOT / "configs" / "gpu.toml", ["ray.num_cpus=12"])
    assert cfg.index.build_memory == 48 * GiB and cfg.index.shards == 0
    plan = plan_for_config(cfg, 100_000_000, 1152)
    _fits(plan)
    assert (plan.budget_bytes, plan.threads, plan.R, plan.L, plan.index_dim) == (48 * GiB, 12, 64, 128, 1157)
    cfg.index.weight_beta = 0.0
    cfg.index.shards = 300
    plan = plan_for_config(cfg, 100_000_000, 1152)
    assert plan.index_dim == 1152 and plan.shards == 300 and not plan.shards_derived
    cfg.index.build_memory = 0  # unset: the machine's RAM minus a margin
    assert plan_for_config(cfg, 1000, 64).budget_source == "machine"


def _build_job():
    sys.path.insert(0, str(ROOT / "ray_jobs"))
    try:
        import build_index
    finally:
        sys.path.pop(0)
    return build_index


def test_plan_only_prints_the_plan_and_builds_nothing(tmp_path, capsys):
    job = _build_job()
    out = tmp_path / "index"
    rc = job.main(["--config", str(ROOT / "configs" / "gpu.toml"), "--out", str(out), "--plan-only",
                   "--assume-vectors", "230000000", "--assume-dim", "1152", "--set", "ray.num_cpus=12"])
    assert rc == 0
    printed = capsys.readouterr().out.strip().splitlines()
    plan = json.loads(printed[-1])
    assert (plan["n"], plan["d"], plan["budget_bytes"], plan["threads"]) == (230_000_000, 1152, 48 * GiB, 12)
    assert plan["driver_idle_bytes"] + plan["tasks_at_once"] * plan["task_memory_bytes"] <= 48 * GiB
    assert any(line.startswith("tasks at once") for line in printed)
    assert not out.exists() and not (tmp_path / "index.work").exists()
    assert plan["costs_source"] == "default" and any("(default costs)" in line for line in printed)
    # measured costs, as bench/build_scale.py writes them: its phases priced with them
    measured = tmp_path / "build_scale.json"
    measured.write_text(json.dumps({"sets": [], "extrapolation": {
        "costs": {"graphs": COSTS["graphs"] / 4}, "fitted_shape": {"d": 384, "R": 32, "L": 64, "build_pq_bytes": 0}}}))
    rc = job.main(["--config", str(ROOT / "configs" / "gpu.toml"), "--plan-only", "--assume-vectors", "230000000",
                   "--assume-dim", "1152", "--set", "ray.num_cpus=12", "--costs", str(measured)])
    assert rc == 0
    captured = capsys.readouterr()
    assert "were fitted for" in captured.err  # another shape than the build's: said
    printed = captured.out.strip().splitlines()
    priced = json.loads(printed[-1])
    assert priced["costs_source"] == "given" and any("(measured costs)" in line for line in printed)
    assert priced["seconds"]["graphs"] == pytest.approx(plan["seconds"]["graphs"] / 4, rel=1e-3)
    assert priced["seconds"]["merge"] == plan["seconds"]["merge"]
    for bad, why in (({"costs": {"graph": 1e-9}}, "unknown phases"), ({"costs": {"graphs": -1}}, "positive"),
                     ({"costs": {"graphs": float("inf")}}, "finite"), ({"sets": []}, "no \"costs\""),
                     ({"extrapolation": None}, "no \"costs\""), ([1, 2], "no \"costs\"")):
        measured.write_text(json.dumps(bad))
        rc = job.main(["--config", str(ROOT / "configs" / "gpu.toml"), "--plan-only", "--assume-vectors", "1000000",
                       "--assume-dim", "1152", "--costs", str(measured)])
        assert rc == 2 and why in capsys.readouterr().err
    # a budget too small: status 2 and the smallest budget that works
    rc = job.main(["--config", str(TINY), "--plan-only", "--assume-vectors", "230000000", "--assume-dim", "1152"])
    assert rc == 2 and "the smallest budget that works is" in capsys.readouterr().err
    # --embeddings may be left out only with both --assume-vectors and --assume-dim
    with pytest.raises(SystemExit):
        job.main(["--config", str(TINY), "--plan-only", "--assume-vectors", "1000"])


def test_plan_only_reads_n_and_d_from_the_parquet_footers(tmp_path, capsys):
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    emb = tmp_path / "emb"
    emb.mkdir()
    for part, rows in enumerate((300, 200)):
        flat = pa.array(np.zeros(rows * 16, np.float16))
        table = pa.table({"image_id": pa.array(np.arange(rows, dtype=np.int64)),
                          "embedding": pa.FixedSizeListArray.from_arrays(flat, 16)})
        pq.write_table(table, emb / f"part-{part:03d}.parquet")
    rc = _build_job().main(["--config", str(TINY), "--embeddings", str(emb), "--plan-only"])
    assert rc == 0
    plan = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert (plan["n"], plan["d"], plan["shards"]) == (500, 16, 1)


@pytest.mark.parametrize(("value", "expect"), [
    ('"48GiB"', 48 * GiB), ('"1GiB"', GiB), ('"512MiB"', 512 * 2**20), ('"64GB"', 64 * 10**9),
    ('"1.5gib"', 3 * GiB // 2), ("1073741824", GiB), ('"2048"', 2048), ('""', 0), ("0", 0)])
def test_build_memory_parses_sizes(value, expect, tmp_path):
    assert load_config(TINY, [f"index.build_memory={value}"]).index.build_memory == expect
    path = tmp_path / "c.toml"
    path.write_text(f"[index]\nbuild_memory = {value}\n")
    assert load_config(path).index.build_memory == expect


@pytest.mark.parametrize("value", ['"48 gigs"', '"GiB"', "-1", "true", '"-5GiB"', "1.5", '"12 XB"'])
def test_build_memory_rejects_what_is_not_a_size(value, tmp_path):
    path = tmp_path / "c.toml"
    path.write_text(f"[index]\nbuild_memory = {value}\n")
    with pytest.raises(ConfigError, match=r"index.build_memory: expected a size"):
        load_config(path)


def test_every_config_sets_a_build_memory():
    assert load_config(TINY).index.build_memory == GiB
    for name in ("gpu", "cpu", "cluster"):
        assert load_config(ROOT / "configs" / f"{name}.toml").index.build_memory >= 8 * GiB


def test_the_plan_counts_the_rows_the_merge_and_refinement_read_at_random():
    """At 230M x 1152 the index vectors (about 496 GiB) do not fit in RAM: the plan states the
    rows the merge and the refinement fetch at random and prints them; an interleaved merge
    reads none, a refinement on navigation codes R times fewer."""
    n = 230_000_000
    plain = plan_build(n, 1152, **BIG, budget_bytes=64 * GiB, threads_per_task=6)
    rr = plain.random_reads
    assert rr["merge_rows"] == n * 2 * 64 and rr["refine_rows"] == int(0.3 * n) * (32 + 64) * 64
    assert rr["vectors_bytes"] == n * 1157 * 2 == plain.scratch["index_vectors"] and rr["row_bytes"] == 2314
    text = format_plan(plain)
    assert rr["refine_prune_rows"] == n * 84  # every list overfilled once, ceil(1.3 * 64) rows each
    assert re.search(r"random reads\s+up to 472\.\d G rows", text) and "TiB of disk reads" in text
    fast = plan_build(n, 1152, **BIG, budget_bytes=64 * GiB, threads_per_task=6, build_pq_bytes=72,
                      merge="interleave")
    assert fast.random_reads["merge_rows"] == 0 and fast.random_reads["refine_rows"] == rr["refine_rows"] // 64
    assert fast.random_reads["codes_bytes"] == n * 69  # 69 bytes of 17 dimensions at 1157
    assert fast.seconds["merge"] < plain.seconds["merge"] / 100
    one = plan_build(1_000_000, 384, **BIG, budget_bytes=64 * GiB, shards=1)
    assert one.random_reads["merge_rows"] == one.random_reads["refine_rows"] == 0
    assert "random reads" not in format_plan(one)
    gpu = load_config(ROOT / "configs" / "gpu.toml")
    assert gpu.index.merge == "interleave" and load_config(TINY).index.merge == "prune"
    with pytest.raises(ConfigError, match="index.merge"):
        load_config(TINY, ["index.merge=union"])
