"""Add stage: one Ray task per shard loads the trained index, checks it is the one recorded in the
manifest, adds the shard's vectors with their global ids, and writes the shard's index. On a GPU build
where a GPU node is up when the stage starts, each task takes a GPU and a GPU node's CPUs per GPU, and the
coarse assignment (a k=1 search over nlist centroids per vector, the add's cost at large nlist:
benchmarks/coarse_assign_benchmark.py) runs on it; where none is up (the GPU workers scaled down after
the encode), the tasks assign on the CPU nodes there are rather than wait for GPU workers to be launched
again (add_task_resources); the codes are computed on the CPU threads either way (ivf/index.py add_assigned)."""

from __future__ import annotations

import numpy as np
import ray

from rayindex.config import BuildConfig
from rayindex.errors import RayIndexError
from rayindex.infra.faults import checkpoint
from rayindex.infra.files import load_embeddings
from rayindex.infra.progress import StageProgress
from rayindex.infra.ray_session import connect
from rayindex.infra.resources import alive_gpu_nodes, gpu_task_resources, match_threads_to_ray_cpus
from rayindex.infra.storage import Store, written_sha256
from rayindex.ivf.index import add_assigned, gpu_assigner, read_index, write_index
from rayindex.layout import EMBEDDINGS_FILE, SHARD_INDEX_FILE, TRAINED_FILE, VECTOR_IDS_FILE, shard_rel
from rayindex.manifest import Manifest, ShardState
from rayindex.versions import done_shards, save_manifest

ADD_CHUNK = 65_536  # vectors per add_with_ids call: bounds peak memory for any shard size


def add_shard(
    version: Store,
    trained_sha256: str,
    shard_id: int,
    count: int,
    inputs: dict[str, str],
    dim: int,
    use_gpu: bool = False,
) -> str:
    """Build one shard's index from the trained index and the shard's embeddings and ids (pulled into this
    node's mirror and checked against their sha256: a changed trained.faiss is refused), assigning lists
    on a GPU when asked and FAISS sees one; the file appears only when complete, and is pushed to the
    output store. Returns its sha256."""
    match_threads_to_ray_cpus()
    version.pull({TRAINED_FILE: trained_sha256, **inputs}, verify=True)
    directory = version.local(shard_rel(shard_id))
    index = read_index(version.local(TRAINED_FILE))
    vectors = load_embeddings(directory, count, dim)
    row_ids = np.load(directory / VECTOR_IDS_FILE, mmap_mode="r")
    if len(row_ids) != count:
        raise RayIndexError(f"{directory}: {len(row_ids)} ids for {count} vectors; re-encode this shard")
    assigner = gpu_assigner(index) if use_gpu else None
    for start in range(0, count, ADD_CHUNK):
        stop = min(count, start + ADD_CHUNK)
        add_assigned(index, vectors[start:stop], row_ids[start:stop], assigner)
    write_index(index, directory / SHARD_INDEX_FILE)
    sha256 = written_sha256(directory / SHARD_INDEX_FILE)
    version.push([shard_rel(shard_id, SHARD_INDEX_FILE)], keep=False)  # on S3: the merge pulls it
    del vectors, row_ids  # memory maps of the inputs, closed before their files go
    version.drop_local(list(inputs))
    return sha256


def add_task_resources(gpu_build: bool, nodes: list[dict]) -> dict:
    """What each add task asks Ray for: on a GPU build with a GPU node alive now, a GPU and its node's CPUs per
    GPU (the coarse assignment runs on the GPU); otherwise 1 CPU, the assignment on the CPU. A GPU build whose
    GPU workers scaled down after the encode (the autoscaler's idle timeout) does not wait for new ones: a
    launch takes minutes, while adding is a single pass over the vectors that the CPUs already up can do
    (the assignment's cost on CPU: benchmarks/coarse_assign_benchmark.py)."""
    if gpu_build and alive_gpu_nodes(nodes):
        return gpu_task_resources(nodes, whole_node=False)
    return {"num_cpus": 1}


def add_shards(
    version: Store,
    trained_sha256: str,
    jobs: list[tuple[int, int, dict[str, str]]],
    dim: int,
    on_done=None,
    resources: dict | None = None,
) -> dict[int, str]:
    """Run add_shard for each (shard_id, count, input files -> sha256) as Ray tasks, each asking for
    `resources` (add_task_resources; 1 CPU by default), the lists assigned on the GPU when they hold one;
    returns each shard's index sha256. on_done(shard_id, count, sha256) as each finishes."""
    resources = resources or {"num_cpus": 1}
    on_gpu = resources.get("num_gpus", 0) > 0
    task = ray.remote(max_retries=2, **resources)(add_shard)
    refs = {task.remote(version, trained_sha256, sid, n, files, dim, on_gpu): (sid, n) for sid, n, files in jobs}
    results = {}
    while refs:
        ready, _ = ray.wait(list(refs), num_returns=1)
        sid, n = refs.pop(ready[0])
        results[sid] = ray.get(ready[0])
        if on_done:
            on_done(sid, n, results[sid])
    return results


def run(config: BuildConfig, manifest: Manifest, version: Store, progress: StageProgress) -> list[ShardState]:
    """Shard indexes for every shard not already built from this trained index (each saved in the manifest
    as it finishes: a killed driver loses no added shard); returns the shard states."""
    trained_sha = manifest.training.trained_sha256
    done = {
        sid
        for sid in done_shards(manifest, version, "index_sha256", (SHARD_INDEX_FILE,))
        if manifest.shard_states[sid].trained_sha256 == trained_sha
    }
    manifest.reused.add = sorted(done)
    jobs = [
        (s.shard_id, st.passages, manifest.shard_files((EMBEDDINGS_FILE, VECTOR_IDS_FILE), [s.shard_id]))
        for s, st in zip(manifest.shards, manifest.shard_states)
        if s.shard_id not in done
    ]
    if jobs:
        connect(config.ray_address, config.s3_endpoint)
        with progress.stage("add", sum(n for _, n, _ in jobs), "vectors") as update:
            added = [0]

            def record(sid: int, n: int, index_sha256: str) -> None:
                state = manifest.shard_states[sid]
                state.index_sha256, state.trained_sha256 = index_sha256, trained_sha
                manifest.files_sha256[shard_rel(sid, SHARD_INDEX_FILE)] = index_sha256
                save_manifest(version, manifest)
                checkpoint("add", sum(1 for s in manifest.shard_states if s.index_sha256))
                added[0] += n
                update(added[0])

            gpu_build = manifest.model.device == "cuda"  # as training: where the encoders ran
            resources = add_task_resources(gpu_build, ray.nodes())
            if gpu_build and not resources.get("num_gpus"):
                progress.note("add: no GPU node is up (the GPU workers scaled down): the lists are assigned on CPUs")
            add_shards(version, trained_sha, jobs, manifest.dimension, on_done=record, resources=resources)
    return manifest.shard_states
