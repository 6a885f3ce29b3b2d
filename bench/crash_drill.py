"""Crash drill: the ingest, curate and build jobs killed with SIGKILL at seeded points, rerun,
and compared with an uninterrupted run.

    .venv/bin/python bench/crash_drill.py                    # 5 kills per job, seed 1
    .venv/bin/python bench/crash_drill.py --jobs build --kills 3

Each job runs as a user runs it (`ray_jobs/*.py`, a local Ray, configs/tiny.toml) on the
shared memes: ingest from a dump served over loopback, curate of the ingest's output, build
of the curated output. A reference run of each job logs the crash points its driver passes
(`memescale.crashpoints`: after writes, before fsyncs, after renames, after each phase, shard
graph or curated file). Then, for each of --kills trials, the job runs into a fresh output
and its driver is killed with SIGKILL at a seeded point (its Ray processes with it), and the
same command is run again to the end. The trial passes when its output equals the
reference's:
- ingest: the same manifest entries and rows (embeddings within fp16 rounding: batches
  differ between runs), each image once;
- curate: the same rows and values;
- build: every index file byte for byte (build_summary.json, which holds timings, aside).

Results: stdout and bench/results/crash_drill.{json,md}. Needs ../shared/data (the memes).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
RESULTS = ROOT / "bench" / "results"
MEMES = ROOT.parent / "shared" / "data" / "images" / "memes"
CONFIG = str(ROOT / "configs" / "tiny.toml")


def run_job(cmd: list[str], env: dict[str, str] | None = None, timeout: float = 600) -> int:
    """Run one job command in its own session; afterwards kill whatever of its process group
    is left (a killed driver leaves its local Ray behind). Returns the driver's exit status
    (negative: killed by that signal)."""
    proc = subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, **(env or {})}, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        _, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        raise
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    if proc.returncode not in (0, -signal.SIGKILL):
        sys.stderr.write(err.decode(errors="replace")[-3000:])
    return proc.returncode


def commands(work: Path, out: Path) -> dict[str, list[str]]:
    py = sys.executable
    ref = work / "ref"
    return {
        "ingest": [py, str(ROOT / "ray_jobs" / "ingest.py"), "--config", CONFIG, "--dumps", str(work / "RS_2020-09.zst"),
                   "--out", str(out), "--allow-private", "--no-progress"],
        "curate": [py, str(ROOT / "ray_jobs" / "curate.py"), "--config", CONFIG, "--in", str(ref / "ingest"),
                   "--out", str(out), "--work", str(out) + ".work"],
        "build": [py, str(ROOT / "ray_jobs" / "build_index.py"), "--config", CONFIG, "--embeddings",
                  str(ref / "curate"), "--out", str(out), "--work", str(out) + ".work"],
    }


def _sorted_rows(folder: Path) -> pa.Table:
    from memescale.shards.store import read_shards

    return read_shards(str(folder)).sort_by("image_id")


def compare(job: str, ref: Path, got: Path) -> tuple[bool, str]:
    """Whether `got` equals the reference output `ref` of `job`, and how it differs."""
    if job == "ingest":
        from dataclasses import asdict

        from memescale.shards.store import ShardStore, embeddings_of

        a, b = ShardStore(str(ref)).done(), ShardStore(str(got)).done()
        if {k: asdict(v) for k, v in a.items()} != {k: asdict(v) for k, v in b.items()}:
            return False, "manifests differ"
        ta, tb = _sorted_rows(ref), _sorted_rows(got)
        ids = tb.column("image_id").to_pylist()
        if len(ids) != len(set(ids)):
            return False, "an image written twice"
        plain = [c for c in ta.column_names if c != "embedding"]
        if not ta.select(plain).equals(tb.select(plain)):
            return False, "rows differ"
        diff = float(np.abs(embeddings_of(ta).astype(np.float32) - embeddings_of(tb).astype(np.float32)).max())
        return diff <= 2e-3, f"{tb.num_rows} rows equal, embeddings within {diff:.1e}"
    if job == "curate":
        ta, tb = _sorted_rows(ref), _sorted_rows(got)
        same = ta.equals(tb)
        return same, f"{tb.num_rows} rows " + ("equal" if same else "differ")
    names = sorted(p.name for p in ref.iterdir() if p.is_file() and p.name != "build_summary.json")
    if names != sorted(p.name for p in got.iterdir() if p.is_file() and p.name != "build_summary.json"):
        return False, "different files"
    bad = [n for n in names if (ref / n).read_bytes() != (got / n).read_bytes()]
    return not bad, f"{len(names)} files byte-identical" if not bad else f"files differ: {bad}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--jobs", default="ingest,curate,build")
    ap.add_argument("--kills", type=int, default=5)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--images", type=int, default=72)
    ap.add_argument("--work", default="/tmp/memescale-crash-drill")
    a = ap.parse_args(argv)
    if not MEMES.is_dir():
        print(f"needs the shared memes at {MEMES}", file=sys.stderr)
        return 2
    from memescale.testing.sample_data import ImageServer, image_files, sample_records, write_sample_dump

    work = Path(a.work)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    rng = random.Random(a.seed)
    report: dict = {"seed": a.seed, "kills": a.kills, "jobs": {}}
    with ImageServer(MEMES, delay_s=0.01) as srv:
        write_sample_dump(work / "RS_2020-09.zst", sample_records(image_files(MEMES)[: a.images], srv.base_url))
        order = ["ingest", "curate", "build"]
        wanted = [j for j in order if j in a.jobs.split(",")]
        for job in order[: order.index(wanted[-1]) + 1]:  # each job reads the one before's reference
            ref = work / "ref" / job
            log = work / f"{job}.points"
            t0 = time.perf_counter()
            rc = run_job(commands(work, ref)[job], {"MEMESCALE_CRASH_LOG": str(log)})
            if rc != 0:
                print(f"{job}: the reference run failed ({rc})", file=sys.stderr)
                return 1
            points = log.read_text().split()
            ref_s = time.perf_counter() - t0
            if job not in a.jobs.split(","):
                continue  # a reference the next job reads
            picks = sorted(rng.sample(range(1, len(points) + 1), min(a.kills, len(points))))
            trials = []
            for at in picks:
                out = work / "trial" / job / f"at-{at}"
                cmd = commands(work, out)[job]
                killed = run_job(cmd, {"MEMESCALE_CRASH_AT": str(at)})
                rerun = run_job(cmd)
                ok, how = compare(job, ref, out) if rerun == 0 else (False, f"rerun failed ({rerun})")
                trials.append({"at": at, "point": points[at - 1], "killed": killed == -signal.SIGKILL,
                               "rerun_rc": rerun, "equal": ok, "detail": how})
                print(f"{job}: killed at point {at}/{len(points)} ({points[at - 1]}): "
                      f"{'killed' if killed == -signal.SIGKILL else f'exit {killed}'}; rerun {rerun}; "
                      f"{'EQUAL' if ok else 'DIFFERENT'} ({how})", flush=True)
            report["jobs"][job] = {"points": len(points), "point_names": sorted(set(points)),
                                   "reference_seconds": round(ref_s, 1), "trials": trials,
                                   "passed": all(t["killed"] and t["equal"] for t in trials) and bool(trials)}
    report["loadavg"] = os.getloadavg()
    lines = ["| job | crash points in a run | trials | killed | equal to the uninterrupted run | points hit |",
             "|---|---|---|---|---|---|"]
    for job, r in report["jobs"].items():
        t = r["trials"]
        lines.append(f"| {job} | {r['points']} | {len(t)} | {sum(x['killed'] for x in t)} | "
                     f"{sum(x['equal'] for x in t)} | {', '.join(sorted({x['point'] for x in t}))} |")
    text = "\n".join(lines)
    print(text)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "crash_drill.md").write_text(text + "\n")
    (RESULTS / "crash_drill.json").write_text(json.dumps(report, indent=1))
    return 0 if all(r["passed"] for r in report["jobs"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
