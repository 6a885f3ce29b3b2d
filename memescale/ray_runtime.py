"""Attach to Ray: a running cluster when one is named (or when under `ray job submit`), else a
fresh local instance sized by the config. Also sets the environment Ray needs on these
machines (no auth token files, no usage stats) before Ray is imported."""

from __future__ import annotations

import logging
import os

from memescale.config import RayConfig

log = logging.getLogger(__name__)

RAY_ENV = {
    "RAY_AUTH_MODE": "disabled",
    "RAY_USAGE_STATS_ENABLED": "0",
    # Serve runs replicas' handlers and their handles' routers on the replica's own event
    # loop rather than one thread each: every handler here awaits or hands blocking work to a
    # thread pool, and the cross-thread hops cost about a tenth of a search request's CPU
    # (bench/serve_load.py: 47.6 -> 43.7 ms per request, p99 47 -> 33 ms at 15 QPS on 2 cores).
    # Read when Serve is imported, so they must be in the environment of every Ray process:
    # set here before a local Ray starts, and in configs/serve.yaml's runtime_env.
    "RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD": "0",
    "RAY_SERVE_RUN_ROUTER_IN_SEPARATE_LOOP": "0",
}
for _k, _v in RAY_ENV.items():
    os.environ.setdefault(_k, _v)


def init_ray(rc: RayConfig) -> str:
    """Idempotent. `rc.address` "" means: the job's RAY_ADDRESS if set, else start locally.
    Returns the dashboard URL of a Ray this call started ("" otherwise)."""
    import ray

    if ray.is_initialized():
        return ""
    address = rc.address or os.environ.get("RAY_ADDRESS", "")
    runtime_env = {"env_vars": dict(RAY_ENV)}
    if address:
        ray.init(address=address, runtime_env=runtime_env, log_to_driver=True)
        log.info("joined Ray cluster at %s: %s", address, ray.cluster_resources())
        return ""
    ctx = ray.init(
        address="local",
        num_cpus=rc.num_cpus or None,
        object_store_memory=rc.object_store_mb * 2**20 or None,
        include_dashboard=rc.include_dashboard,
        runtime_env=runtime_env,
    )
    log.info("started local Ray: %s, dashboard: %s", ray.cluster_resources(),
             ctx.dashboard_url or "off")
    return f"http://{ctx.dashboard_url}" if ctx.dashboard_url else ""


class MissingGPUs(RuntimeError):
    """The config asks for GPUs the Ray cluster does not have (Ray would wait for them forever)."""


def require_gpus(per_actor: float, actors: int, what: str, setting: str) -> None:
    """Raise MissingGPUs unless the attached cluster has `actors` x `per_actor` GPUs and a
    node with `per_actor` of them free to place one. Nothing to check when per_actor <= 0."""
    import ray

    if per_actor <= 0:
        return
    need = per_actor * max(1, actors)
    have = float(ray.cluster_resources().get("GPU", 0))
    if have + 1e-9 < need:
        raise MissingGPUs(
            f"{what} asks for {need:g} GPU(s) ({actors} x {setting}={per_actor:g}) but the Ray cluster has "
            f"{have:g}. Start Ray on a GPU machine (`ray start --head --num-gpus=N`), or set {setting}=0 "
            "to run on CPUs.")
