"""What a Ray task may use: CPU threads that match its reservation, and the biggest node's cores;
and whether the cluster can have GPUs (now, or once its autoscaler adds GPU nodes)."""

from __future__ import annotations

import json
import os

import faiss
import psutil
import ray
import yaml
from ray.experimental.internal_kv import _internal_kv_get, _internal_kv_initialized
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy


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


AUTOSCALING_STATUS_KEY = "__autoscaling_status"  # ray_constants.DEBUG_AUTOSCALING_STATUS: the v1 monitor's report


def gpu_node_types(autoscaling_config: dict) -> list[str]:
    """Worker node types of an autoscaler config (the cluster launcher's YAML) that advertise GPUs
    and may be started.

    The head type is left out (a running head's GPUs are in ray.cluster_resources() already), and
    so are types the config never starts (max_workers 0, or a global max_workers of 0); a type
    without max_workers gets the global one, as the launcher fills it in."""
    limit = int(autoscaling_config.get("max_workers", 2))  # 2: the launcher's default
    head = autoscaling_config.get("head_node_type")
    return [
        name for name, node_type in (autoscaling_config.get("available_node_types") or {}).items()
        if name != head and (node_type.get("resources") or {}).get("GPU", 0) > 0
        and min(int(node_type.get("max_workers", limit)), limit) > 0
    ]


def monitor_autoscaling_config(monitor_pid: int) -> dict | None:
    """The YAML the autoscaler (v1) monitor with this pid was started with, or None.

    `ray start --head --autoscaling-config=PATH` (`ray up` passes ~/ray_bootstrap_config.yaml, with
    the resources of every instance type filled in) hands the file to the monitor process and nowhere
    else: Ray 2.60's v1 autoscaler reports no node types to the GCS. So this must run on the head node,
    where the monitor runs."""
    try:
        args = psutil.Process(monitor_pid).cmdline()
    except psutil.Error:
        return None
    if not any(arg.endswith("monitor.py") for arg in args):
        return None  # the pid is not (or no longer) the monitor
    path = None
    for i, arg in enumerate(args):
        if arg.startswith("--autoscaling-config="):
            path = arg.split("=", 1)[1]
        elif arg == "--autoscaling-config" and i + 1 < len(args):
            path = args[i + 1]
    if not path:
        return None  # e.g. KubeRay's autoscaler, which reads the RayCluster resource instead
    try:
        with open(os.path.expanduser(path)) as fh:
            config = yaml.safe_load(fh)
    except (OSError, yaml.YAMLError):
        return None
    return config if isinstance(config, dict) else None


def reported_gpu_node_types() -> list[str] | None:
    """GPU node groups of the cluster config an autoscaler reported to the GCS, or None when none
    was reported (Ray 2.60's v1 autoscaler, the one `ray up` runs, reports none)."""
    try:
        config = ray._private.state.state.get_cluster_config()
    except Exception:  # a private API: absent or changed in another Ray
        return None
    if config is None or not config.node_group_configs:
        return None
    return [group.name for group in config.node_group_configs if group.resources.get("GPU", 0) > 0 and group.max_count != 0]


def autoscaler_gpu_node_types() -> list[str]:
    """Node types with GPUs that the connected cluster's autoscaler may start, running or not.

    Empty when the cluster has no autoscaler (a plain `ray start` or `ray.init()` cluster)."""
    reported = reported_gpu_node_types()
    if reported is not None:
        return reported
    status = _internal_kv_get(AUTOSCALING_STATUS_KEY) if _internal_kv_initialized() else None
    if not status:
        return []
    try:
        monitor_pid = int(json.loads(status)["monitor_pid"])
    except (ValueError, KeyError, TypeError):
        return []
    head = next((n["NodeID"] for n in ray.nodes() if n.get("Alive") and "node:__internal_head__" in n["Resources"]), None)
    if head is None:
        return []
    if head == ray.get_runtime_context().get_node_id():  # the usual case: `ray job submit` runs drivers on the head
        config = monitor_autoscaling_config(monitor_pid)
    else:  # read the file where it is: a zero-CPU task pinned to the head
        read = ray.remote(num_cpus=0, scheduling_strategy=NodeAffinitySchedulingStrategy(head, soft=False))(monitor_autoscaling_config)
        try:
            config = ray.get(read.remote(monitor_pid), timeout=60)
        except Exception:
            return []
    return gpu_node_types(config) if config else []


def cluster_can_have_gpus() -> bool:
    """Whether GPU work can run on the connected cluster: it has GPUs now, or its autoscaler may add
    GPU nodes (a node type advertising GPU, even with none running).

    ray.cluster_resources() alone answers no on an autoscaling cluster whose GPU workers start at 0
    (cluster.yaml's gpu_worker), so a build would encode on CPUs and never ask for the GPU nodes."""
    return ray.cluster_resources().get("GPU", 0) > 0 or bool(autoscaler_gpu_node_types())
