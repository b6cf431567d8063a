"""What a Ray task may use: CPU threads that match its reservation, and the biggest node's cores."""

from __future__ import annotations

import faiss
import ray


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
