"""What a Ray task may use: CPU threads that match its reservation, the biggest node's cores, and
whether to use GPUs, decided through public APIs only: the --gpu/--cpu flag, else the RAYINDEX_GPU
environment variable (cluster.yaml sets it on clusters whose GPU workers autoscale from zero, where
no GPU is visible until one is asked for), else whether the cluster has GPUs now; whether GPUs can come at
all when none is up (gpu_refusal: from the node types an autoscaler reported, else whether Ray's v1 monitor runs
an autoscaler at all); and how many GPUs or CPUs the autoscaler may add at most."""

from __future__ import annotations

import json
import os
from typing import NamedTuple

import faiss
import ray

from rayindex.errors import UsageError

GPU_ENV = "RAYINDEX_GPU"
# "the GPU resource is reserved but torch and FAISS run on the CPU": for Ray's fake multi-node clusters
# (tests/test_autoscaling.py), where a GPU is a resource a raylet declares and no device; never a default
GPU_ON_CPU_ENV = "RAYINDEX_GPU_ON_CPU"
TRUE, FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off")


def match_threads_to_ray_cpus() -> int:
    """Set FAISS's OpenMP threads to the CPUs Ray assigned to the running task.

    Ray sets OMP_NUM_THREADS only when it starts a worker process, and reuses workers across
    tasks of different sizes, so a 2-CPU train task can land in a worker started for a 1-CPU
    add task and run single-threaded (measured: 12.3 s instead of 7.5 s)."""
    if not ray.is_initialized() or ray.get_runtime_context().get_task_id() is None:
        return faiss.omp_get_max_threads()  # not inside a Ray task (e.g. the driver): leave FAISS as it is
    cpus = int(ray.get_runtime_context().get_assigned_resources().get("CPU", 1)) or 1
    faiss.omp_set_num_threads(cpus)
    return cpus


def max_node_cpus() -> int:
    """CPUs of the biggest alive node: training uses one whole node's cores."""
    return int(max((n["Resources"].get("CPU", 1) for n in ray.nodes() if n.get("Alive")), default=1))


class NodeGroup(NamedTuple):
    """A node type the autoscaler may start: its name, the resources of one node, at most how many (-1: no limit)."""

    name: str
    resources: dict[str, float]
    max_count: int


def alive_gpu_nodes(nodes: list[dict]) -> list[dict]:
    """The alive nodes with a GPU, of ray.nodes()."""
    return [n for n in nodes if n.get("Alive") and n["Resources"].get("GPU", 0) > 0]


def cpus_per_gpu(nodes: list[dict], groups: list[NodeGroup] | None = None) -> float | None:
    """CPUs per GPU of the alive GPU nodes (the smallest ratio: a task asking for it must fit on every GPU node),
    else of the GPU node types the autoscaler reported, or None when neither tells (GPU workers autoscaling from
    zero under an autoscaler that does not report its node types). What a GPU encoder and a GPU add task
    read, assemble and compute on: one GPU's share of its node's cores."""
    ratios = [n["Resources"].get("CPU", 0) / n["Resources"]["GPU"] for n in alive_gpu_nodes(nodes)] or [
        g.resources.get("CPU", 0) / g.resources["GPU"] for g in groups or () if g.resources.get("GPU", 0) > 0
    ]
    return min(ratios) if ratios else None


def gpu_task_resources(nodes: list[dict], whole_node: bool, groups: list[NodeGroup] | None = None) -> dict:
    """What a GPU task asks Ray for: one GPU and the CPUs that go with it on the smallest GPU node (the task
    must fit on whichever GPU node it gets): all of that node's (whole_node: training, whose OPQ, PQ codebooks,
    HNSW quantizer and coarse_mse run on FAISS's CPU threads while k-means runs on the GPU) or its CPUs per
    GPU (cpus_per_gpu, what an encoder takes too: an add task, one per GPU). 1 CPU while nothing tells (no GPU
    node up yet, GPU workers autoscaling from zero)."""
    if whole_node:
        cpus = min((n["Resources"].get("CPU", 0) for n in alive_gpu_nodes(nodes)), default=None)
    else:
        cpus = cpus_per_gpu(nodes, groups)
    return {"num_cpus": max(1, int(cpus or 1)), "num_gpus": 1}


def gpu_from_environment() -> bool | None:
    """RAYINDEX_GPU as a decision: True, False, or None when it is not set."""
    value = os.environ.get(GPU_ENV, "").strip().lower()
    if not value:
        return None
    if value in TRUE + FALSE:
        return value in TRUE
    raise UsageError(
        f"{GPU_ENV}={os.environ[GPU_ENV]!r}: use 1 (encode and train on GPUs) or 0 (on CPUs), or leave it unset"
    )


def gpu_on_cpu() -> bool:
    """RAYINDEX_GPU_ON_CPU=1: encoders reserve GPUs but run on the CPU (fake clusters); recorded in the manifest."""
    value = os.environ.get(GPU_ON_CPU_ENV, "").strip().lower()
    if value and value not in TRUE + FALSE:
        raise UsageError(
            f"{GPU_ON_CPU_ENV}={os.environ[GPU_ON_CPU_ENV]!r}: use 1 (reserve GPUs, run on the CPU: fake clusters "
            "only) or 0, or leave it unset"
        )
    return value in TRUE


def autoscaler_node_groups() -> list[NodeGroup] | None:
    """The node types the cluster's autoscaler reported to the GCS, or None when none reported them (no
    autoscaler, or one that does not report: Ray's v1 autoscaler started by `ray up` or `ray start
    --autoscaling-config`). Read as Ray Train and Ray Data read it (ray._private.state.get_cluster_config:
    no public API says what an autoscaler may add); a Ray that moves it gives None, never a failure."""
    try:
        from ray._private.state import state

        config = state.get_cluster_config()
    except Exception:
        return None
    if config is None or not config.node_group_configs:
        return None
    return [NodeGroup(g.name, dict(g.resources), int(g.max_count)) for g in config.node_group_configs]


def max_resource(groups: list[NodeGroup], resource: str) -> float:
    """The most of a resource the node groups can add up to (inf when a group has no node limit)."""
    total = 0.0
    for group in groups:
        per_node = group.resources.get(resource, 0)
        if per_node and group.max_count:
            total += float("inf") if group.max_count < 0 else per_node * group.max_count
    return total


def autoscaler_status() -> dict | None:
    """The status Ray's v1 monitor last wrote to the GCS (what `ray status` prints), or None when none is there (a
    v2 autoscaler, a head without a monitor, or a Ray that moved it: never a failure). Read as `ray status`
    reads it: no public API says whether a v1 monitor runs an autoscaler."""
    try:
        from ray._private.ray_constants import DEBUG_AUTOSCALING_STATUS
        from ray.experimental.internal_kv import _internal_kv_get

        raw = _internal_kv_get(DEBUG_AUTOSCALING_STATUS, namespace=None)
        return json.loads(raw) if raw else None
    except Exception:
        return None


def autoscaler_adds_nodes(status: dict | None, node_ids: list[str]) -> bool | None:
    """Whether the v1 monitor whose status this is (autoscaler_status) can add nodes: False for the monitor of a
    Ray started without an autoscaling config (`ray start --head`, `ray.init()`, a KubeRay cluster without
    autoscaling), which mirrors the nodes there are read-only, each its own node type named after the node's
    id (Ray's format_readonly_node_type; node_ids: every node's hex id); True for an autoscaler with node types
    of its own (`ray up`, `ray start --autoscaling-config`, KubeRay's v1 autoscaler); None when the status tells
    neither (none written yet, no node listed)."""
    report = (status or {}).get("autoscaler_report") or {}
    types = {*(report.get("active_nodes") or {}), *(report.get("idle_nodes") or {})}
    # pending nodes are (id, ip, type, status) in Ray 2.60, (ip, type, status) before: the type second to last
    types |= {entry[-2] for entry in report.get("pending_nodes") or () if len(entry) >= 3}
    if not types:
        return None
    try:
        from ray.autoscaler._private.util import format_readonly_node_type
    except ImportError:
        return None
    return not types <= {format_readonly_node_type(node_id) for node_id in node_ids}


def encoder_slots(
    use_gpu: bool,
    cluster: dict[str, float],
    groups: list[NodeGroup] | None,
    encoders: int | None,
    encoder_cpus: float | None,
) -> int:
    """How many encoders can run at once, what the shard plan cuts units for: --encoders; else one per GPU
    (use_gpu) or per core (per --encoder-cpus) that the cluster has now, or that its autoscaler's node types
    hold at their maximum when it reported them and they are bounded; at least 1."""
    if encoders:
        return encoders
    name, need = ("GPU", 1.0) if use_gpu else ("CPU", float(encoder_cpus or 1))
    most = max_resource(groups, name) if groups else 0.0
    return max(1, int(cluster.get(name, 0) // need), int(most // need) if most != float("inf") else 0)


def gpu_refusal(
    gpus_now: float, groups: list[NodeGroup] | None, gpus_declared: bool, address: str, adds_nodes: bool | None = None
) -> str | None:
    """Why GPUs asked for cannot come, or None when they are here or may come (the caller then waits up to
    --gpu-wait for the first). GPUs may come when the autoscaler reported a node type with GPUs, or, where no
    autoscaler reported its node types (Ray's v1 autoscaler reports none), when RAYINDEX_GPU=1 says so
    (cluster.yaml and the KubeRay RayJob set it where GPU workers autoscale from zero) and Ray does not tell
    that it has no autoscaler at all (adds_nodes False: autoscaler_adds_nodes)."""
    if gpus_now > 0:
        return None
    if groups is not None:
        if max_resource(groups, "GPU") > 0:
            return None
        names = ", ".join(f"{g.name} {g.resources}" for g in groups)
        return (
            f"GPUs asked for (--gpu or {GPU_ENV}=1) but the Ray cluster at {address} has no GPU and none of its "
            f"autoscaler's node types offers one ({names}): add a node type with GPUs, or build with --cpu"
        )
    if adds_nodes is False:
        return (
            f"GPUs asked for (--gpu or {GPU_ENV}=1) but the Ray cluster at {address} has no GPU node and no "
            "autoscaler to add one (it was started without an autoscaling config: Ray's monitor only mirrors the "
            "nodes there are). Start it with GPU nodes, or with an autoscaler that has a GPU node type (`ray up`, "
            "KubeRay), or build with --cpu"
        )
    if gpus_declared:
        return None
    return (
        f"GPUs asked for (--gpu) but the Ray cluster at {address} has no GPU node, and nothing says one can come: "
        f"no autoscaler reported node types with GPUs, and {GPU_ENV}=1 (set where GPU workers autoscale from "
        "zero) is not set. Add GPU nodes, set it where an autoscaler adds GPU workers, or build with --cpu"
    )


def gpu_wait_reason(groups: list[NodeGroup] | None) -> str:
    """Why the build waits for a GPU node (gpu_refusal let it), for its waiting line."""
    if groups is not None:
        offering = ", ".join(g.name for g in groups if g.resources.get("GPU", 0) > 0 and g.max_count)
        return f"the autoscaler's node type(s) {offering} offer GPUs"
    return (
        f"{GPU_ENV}=1 says GPU workers autoscale; this autoscaler (Ray's v1) does not report its node types, so "
        "whether one has GPUs is known only when a GPU node joins: if none has, this waits all of --gpu-wait"
    )


def use_gpus(flag: bool | None) -> bool:
    """--gpu/--cpu when given, else RAYINDEX_GPU, else whether the connected cluster has GPUs now."""
    if flag is not None:
        return flag
    from_env = gpu_from_environment()
    if from_env is not None:
        return from_env
    return ray.cluster_resources().get("GPU", 0) > 0


def encoders_use_gpus(flag: bool | None, vectors_given: bool) -> bool:
    """Whether the encoders run on GPUs (use_gpus): never where the corpus brings its vectors (--vector-column),
    which has no forward pass to run."""
    return use_gpus(flag) and not vectors_given
