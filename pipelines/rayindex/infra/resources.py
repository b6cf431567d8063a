"""What a Ray task may use: CPU threads that match its reservation, the biggest node's cores, and
whether to use GPUs, decided through public APIs only: the --gpu/--cpu flag, else the RAYINDEX_GPU
environment variable (cluster.yaml sets it on clusters whose GPU workers autoscale from zero, where
no GPU is visible until one is asked for), else whether the cluster has GPUs now."""

from __future__ import annotations

import os

import faiss
import ray

from rayindex.errors import UsageError

GPU_ENV = "RAYINDEX_GPU"
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


def gpu_task_resources(nodes: list[dict], whole_node: bool) -> dict:
    """What a GPU task asks Ray for: one GPU and the CPUs that go with it on the smallest alive GPU node
    (the task must fit on whichever GPU node it gets): all of that node's (whole_node: training, whose
    OPQ, PQ codebooks, HNSW quantizer and coarse_mse run on FAISS's CPU threads while k-means runs on the
    GPU) or its CPUs per GPU (the add stage: one task per GPU). 1 CPU while no GPU node is up yet
    (GPU workers autoscaling from zero) to tell."""
    shapes = [
        (int(n["Resources"].get("CPU", 0)), int(n["Resources"]["GPU"]))
        for n in nodes
        if n.get("Alive") and n["Resources"].get("GPU", 0) >= 1
    ]
    if not shapes:
        return {"num_cpus": 1, "num_gpus": 1}
    cpus = min(c if whole_node else c // g for c, g in shapes)
    return {"num_cpus": max(1, cpus), "num_gpus": 1}


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


def use_gpus(flag: bool | None) -> bool:
    """--gpu/--cpu when given, else RAYINDEX_GPU, else whether the connected cluster has GPUs now."""
    if flag is not None:
        return flag
    from_env = gpu_from_environment()
    if from_env is not None:
        return from_env
    return ray.cluster_resources().get("GPU", 0) > 0
