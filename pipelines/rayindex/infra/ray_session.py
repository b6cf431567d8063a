"""The Ray session a build, a reindex or a server runs in."""

from __future__ import annotations

import os

import ray


def ray_address(address: str | None) -> str:
    """The address given, else RAY_ADDRESS (set by `ray job submit` for its drivers), else "local": a new
    local Ray, as documented. Never Ray's own default of joining the cluster named in
    /tmp/ray/ray_current_cluster, which a head killed without `ray stop` leaves behind (a build then
    hung forever on the dead address); `--ray-address auto` asks for that explicitly."""
    return address or os.environ.get("RAY_ADDRESS") or "local"


def ensure_ray(address: str | None, env: dict[str, str] | None = None) -> None:
    """Connect to (or start) the Ray that ray_address names. env: variables the workers need too (e.g. the
    S3 endpoint), passed in the job's runtime environment."""
    if ray.is_initialized():
        return
    address = ray_address(address)
    ray.init(
        address=address,
        log_to_driver=False,
        include_dashboard=False if address == "local" else None,
        ignore_reinit_error=True,
        runtime_env={"env_vars": env} if env else None,
    )


def connect(ray_address: str | None, s3_endpoint: str | None) -> None:
    """ensure_ray, with the S3 endpoint passed on to the workers."""
    ensure_ray(ray_address, {"AWS_ENDPOINT_URL": s3_endpoint} if s3_endpoint else None)
