"""bench/build_scale.py's extrapolation: which measured build prices which phase."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

import build_scale  # noqa: E402

from memescale.build.plan import COSTS, plan_build  # noqa: E402

GiB = 2**30


def _row(n: int, d: int, R: int, L: int, codes: int, speed: float, reused=()) -> dict:
    """A measured build whose every phase took `speed` x the plan's default estimate."""
    plan = plan_build(n, d, R=R, L=L, overlap=2, pq_bytes=48, budget_bytes=8 * GiB, threads=2, threads_per_task=2,
                      shards=4)
    seconds = {"corpus": plan.seconds["corpus"], "partition": plan.seconds["partition"],
               "graphs": plan.seconds["graphs"], "merge": plan.seconds["merge"], "refine": plan.seconds["refine"],
               "pq": plan.seconds["pq_train"] + plan.seconds["pq_encode"], "write": plan.seconds["write"]}
    seconds = {k: (1.0 if k in reused else v * speed) for k, v in seconds.items()}  # a reused phase: its check
    return {"n": n, "d": d, "plan": plan.to_dict(), "seconds": seconds, "reused": list(reused),
            "build_pq_bytes": codes, "partition": {"sizes": [plan.shard_vectors] * 4}}


def test_graph_phases_come_from_the_target_shape_and_streaming_phases_from_the_largest_set():
    big = _row(2_000_000, 384, 32, 64, 0, speed=3.0, reused=("corpus",))
    mid = _row(1_000_000, 384, 32, 64, 0, speed=5.0)
    shaped = _row(200_000, 1152, 64, 128, 72, speed=0.5)
    wide = _row(400_000, 1152, 32, 64, 0, speed=2.0, reused=("write",))
    ext = build_scale.extrapolate([big, mid, shaped], 230_000_000, 1152, "64GiB", 6, 64, 128, 64, 72)
    # the streaming phases too come from the target's width where a set has it
    assert ext["fitted_on"] == {"200,000 x 1152": ["corpus", "partition", "graphs", "merge", "refine", "pq", "write"]}
    wider = build_scale.extrapolate([big, mid, shaped, wide], 230_000_000, 1152, "64GiB", 6, 64, 128, 64, 72)
    assert wider["fitted_on"] == {"400,000 x 1152": ["corpus", "partition", "pq"],
                                  "200,000 x 1152": ["graphs", "merge", "refine", "write"]}
    assert wider["costs"]["corpus"] == pytest.approx(2.0 * COSTS["corpus"])
    assert wider["costs"]["write"] == pytest.approx(0.5 * COSTS["write"])  # the largest at 1152 reused it
    # without a set of the target's width, the streaming phases come from the largest sets that timed each
    narrow = _row(200_000, 384, 64, 128, 72, speed=0.5)
    ext = build_scale.extrapolate([big, mid, narrow], 230_000_000, 1152, "64GiB", 6, 64, 128, 64, 72)
    assert ext["fitted_on"] == {"1,000,000 x 384": ["corpus"], "2,000,000 x 384": ["graphs", "merge", "refine"],
                                "1,000,000 x 384 and 2,000,000 x 384": ["partition", "pq", "write"]}
    c = ext["costs"]
    assert c["corpus"] == pytest.approx(5.0 * COSTS["corpus"])  # the largest set reused it
    # 3x the plan at 2M and 5x at 1M: the slope between them is 1x the plan per added unit,
    # the rest a fixed part (PQ training takes it; elsewhere it is not priced per vector)
    assert c["write"] == pytest.approx(COSTS["write"], rel=1e-3)
    assert c["partition"] == pytest.approx(COSTS["partition"], rel=1e-2)
    assert c["pq_encode"] < 3.0 * COSTS["pq_encode"] and c["pq_train"] > 10 * COSTS["pq_train"]
    ext = build_scale.extrapolate([big, mid, shaped], 230_000_000, 1152, "64GiB", 6, 64, 128, 64, 72)
    c = ext["costs"]
    assert c["graphs"] == pytest.approx(0.5 * COSTS["graphs"]) and c["refine"] == pytest.approx(0.5 * COSTS["refine"])
    assert ext["graph_growth_factor"] == 1.0
    # a measured growth exponent scales the graphs by the ratio of the shard sizes
    grown = build_scale.extrapolate([big, mid, shaped], 230_000_000, 1152, "64GiB", 6, 64, 128, 64, 72,
                                    graph_growth=1.1)
    ratio = grown["plan"]["shard_vectors"] / shaped["partition"]["sizes"][0]
    assert grown["graph_growth_factor"] == pytest.approx(ratio ** 0.1)
    assert grown["plan"]["seconds"]["graphs"] == pytest.approx(ext["plan"]["seconds"]["graphs"] * ratio ** 0.1, rel=1e-3)
    # without a set of the target's shape, the graph phases come from the largest set
    only_384 = build_scale.extrapolate([big, mid], 230_000_000, 1152, "64GiB", 6, 64, 128, 64, 72)
    assert only_384["fitted_on"]["2,000,000 x 384"] == ["graphs", "merge", "refine"]
    assert only_384["off_shape"] == ["graphs", "merge", "refine"] and "NOT AT THE TARGET'S SHAPE" in only_384["text"]
    assert ext["off_shape"] == []
    # a rerun with another merge: the shard graphs still match the target, the merge does not
    other = dict(shaped, merge="interleave")
    mixed = build_scale.extrapolate([big, mid, other], 230_000_000, 1152, "64GiB", 6, 64, 128, 64, 72)
    assert mixed["off_shape"] == ["merge", "refine"] and "graphs" in mixed["fitted_on"]["200,000 x 1152"]
    # a resumed run that built only some of its shard graphs did not time the phase
    big["shards"] = [{"skipped": True}, {"skipped": False}]
    resumed = build_scale.extrapolate([big, mid], 230_000_000, 1152, "64GiB", 6, 64, 128, 64, 72)
    assert "graphs" in resumed["fitted_on"]["1,000,000 x 384"] and "graphs" not in resumed["fitted_on"]["2,000,000 x 384"]
    assert resumed["costs"]["graphs"] == pytest.approx(5.0 * COSTS["graphs"])


def test_streaming_phases_fitted_on_two_sets_price_the_fixed_part_once():
    """Two sets of the target's width whose streaming phases took 40 s of fixed work plus 2x
    the plan per unit: the fitted cost per unit is 2x the default (not inflated by the fixed
    part, as a single set's ratio would be), and a phase that does not grow keeps the rest."""
    rows = []
    for n in (200_000, 500_000):
        r = _row(n, 1152, 64, 128, 72, speed=1.0)
        planned = r["plan"]["seconds"]
        for name, phases in (("partition", ("partition",)), ("pq", ("pq_train", "pq_encode")),
                             ("corpus", ("corpus",)), ("write", ("write",))):
            grows = [p for p in phases if p != "pq_train"]
            r["seconds"][name] = 40.0 + 2.0 * sum(planned[p] for p in grows) + (
                planned["pq_train"] if name == "pq" else 0.0)
        rows.append(r)
    ext = build_scale.extrapolate(rows, 230_000_000, 1152, "64GiB", 6, 64, 128, 64, 72)
    c = ext["costs"]
    for p in ("partition", "pq_encode", "corpus", "write"):
        assert c[p] == pytest.approx(2.0 * COSTS[p], rel=1e-3), p
    assert ext["fitted_on"]["200,000 x 1152 and 500,000 x 1152"] == ["corpus", "partition", "pq", "write"]
    single = build_scale.extrapolate(rows[1:], 230_000_000, 1152, "64GiB", 6, 64, 128, 64, 72)
    assert single["costs"]["partition"] > 2.0 * COSTS["partition"]  # one set: the fixed part priced per vector
