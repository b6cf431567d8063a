"""Per-shard build: Ray tasks each load the trained index, check it is the one recorded in the
manifest, add_with_ids their shard's vectors with global ids, and write one index file per shard.
"""

from __future__ import annotations

import os

import faiss
import numpy as np
import ray

from pipelines.docstore import ROW_IDS_FILE
from pipelines.encode import load_embeddings, shard_rel
from pipelines.errors import RayIndexError
from pipelines.resources import match_threads_to_ray_cpus
from pipelines.storage import Store, file_sha256
from pipelines.train import TRAINED_FILE

SHARD_INDEX_FILE = "index.faiss"
ADD_CHUNK = 65_536  # vectors per add_with_ids call: bounds peak memory for any shard size


def add_shard(version: Store, trained_sha256: str, shard_id: int, count: int, inputs: dict[str, str], dim: int) -> dict:
    """Build one shard's index from the trained index and the shard's embeddings and ids (pulled into this
    node's mirror and checked against their sha256: a changed trained.faiss is refused); the file appears
    only when complete, and is pushed to the output store."""
    match_threads_to_ray_cpus()
    version.pull({TRAINED_FILE: trained_sha256, **inputs}, verify=True)
    directory = version.local(shard_rel(shard_id))
    index = faiss.read_index(str(version.local(TRAINED_FILE)))
    vectors = load_embeddings(directory, count, dim)
    row_ids = np.load(directory / ROW_IDS_FILE, mmap_mode="r")
    if len(row_ids) != count:
        raise RayIndexError(f"{directory}: {len(row_ids)} ids for {count} vectors; re-encode this shard")
    for start in range(0, count, ADD_CHUNK):
        stop = min(count, start + ADD_CHUNK)
        index.add_with_ids(np.ascontiguousarray(vectors[start:stop], dtype=np.float32), np.ascontiguousarray(row_ids[start:stop]))
    out = directory / SHARD_INDEX_FILE
    faiss.write_index(index, str(out) + ".tmp")
    os.replace(str(out) + ".tmp", out)
    version.push([f"{shard_rel(shard_id)}/{SHARD_INDEX_FILE}"])
    return {"index_sha256": file_sha256(out), "trained_sha256": trained_sha256, "ntotal": int(index.ntotal)}


def build_shard_indexes(version: Store, trained_sha256: str, jobs: list[tuple[int, int, dict[str, str]]], dim: int,
                        on_done=None) -> dict[int, dict]:
    """Run add_shard for each (shard_id, count, input files -> sha256) as Ray tasks; returns results by
    shard id, and calls on_done(shard_id, count, result) as each finishes."""
    task = ray.remote(num_cpus=1, max_retries=2)(add_shard)
    refs = {task.remote(version, trained_sha256, sid, n, files, dim): (sid, n) for sid, n, files in jobs}
    results = {}
    while refs:
        ready, _ = ray.wait(list(refs), num_returns=1)
        sid, n = refs.pop(ready[0])
        results[sid] = ray.get(ready[0])
        if on_done:
            on_done(sid, n, results[sid])
    return results
