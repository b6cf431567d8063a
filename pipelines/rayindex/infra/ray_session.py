"""The Ray session a build, a reindex or a server runs in, and whether every node of it sees a local
output folder."""

from __future__ import annotations

import os
import secrets
from pathlib import Path

import ray

from rayindex.errors import RayIndexError

PROBE_TIMEOUT_S = 60.0  # a node that has not answered by then is not waited for (it may be starting workers)


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


def read_probe(path: str) -> str | None:
    """The probe file's text as this node sees it; None when it is not there."""
    try:
        return Path(path).read_text()
    except OSError:
        return None


def nodes_not_seeing(token: str, answers: dict[str, str | None]) -> list[str]:
    """The nodes (address -> what each read from the probe) that did not read the token written there."""
    return sorted(node for node, seen in answers.items() if seen != token)


def worker_nodes() -> list[dict]:
    """The alive nodes that can run tasks (a head started with --num-cpus 0 and no GPU runs none)."""
    return [
        n
        for n in ray.nodes()
        if n.get("Alive") and (n["Resources"].get("CPU", 0) > 0 or n["Resources"].get("GPU", 0) > 0)
    ]


def probe_nodes(path: str, nodes: list[dict]) -> dict[str, str | None]:
    """What each node reads at path: one zero-CPU task pinned to each (NodeAffinitySchedulingStrategy), so a
    node whose CPUs are all busy still answers. A node silent for PROBE_TIMEOUT_S is left out."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    task = ray.remote(num_cpus=0, max_retries=0)(read_probe)
    refs = {
        task.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False)).remote(path): (
            n["NodeManagerAddress"]
        )
        for n in nodes
    }
    ready, _ = ray.wait(list(refs), num_returns=len(refs), timeout=PROBE_TIMEOUT_S)
    answers = {}
    for ref in ready:
        try:
            answers[refs[ref]] = ray.get(ref)
        except ray.exceptions.RayError:
            pass  # the node died meanwhile: the scheduler will not use it either
    return answers


def check_shared_folder(folder: Path) -> None:
    """Refuse, before any work, a local output folder that a node of the cluster does not see: its encoders
    and add tasks would write their files where the driver never finds them (the whole encode ran, then
    "doc_hashes.npy is missing"). The driver writes a random token into the folder and every node that can
    run tasks reads it back."""
    token = secrets.token_hex(16)
    probe = folder / f".shared-probe-{token}"
    probe.write_text(token)
    try:
        missing = nodes_not_seeing(token, probe_nodes(str(probe), worker_nodes()))
    finally:
        probe.unlink(missing_ok=True)
    if missing:
        raise RayIndexError(
            f"the output {folder} is local to this machine: node(s) {', '.join(missing)} of the cluster do not see "
            "it, and their encoders would write files the build never finds. Put --output on a filesystem every "
            "node mounts at the same path (NFS, EFS, a shared disk), or on s3://"
        )
