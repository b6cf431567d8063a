"""The Ray session a build, a reindex or a server runs in."""

from __future__ import annotations

import os

import ray


def ensure_ray(address: str | None, env: dict[str, str] | None = None) -> None:
    """Connect to the given cluster, the one in RAY_ADDRESS, or start a local one. env: variables the
    workers need too (e.g. the S3 endpoint), passed in the job's runtime environment."""
    if ray.is_initialized():
        return
    ray.init(address=address, log_to_driver=False, include_dashboard=False if address is None and "RAY_ADDRESS" not in os.environ else None,
             ignore_reinit_error=True, runtime_env={"env_vars": env} if env else None)


def connect(ray_address: str | None, s3_endpoint: str | None) -> None:
    """ensure_ray, with the S3 endpoint passed on to the workers."""
    ensure_ray(ray_address, {"AWS_ENDPOINT_URL": s3_endpoint} if s3_endpoint else None)
