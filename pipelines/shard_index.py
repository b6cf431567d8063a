"""Per-shard build: Ray tasks each load the trained index, check it is the one recorded in the
manifest, add_with_ids their shard's vectors with global ids, and write one index file per shard.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import faiss
import numpy as np
import ray

from pipelines.encode import file_sha256, load_embeddings
from pipelines.docstore import ROW_IDS_FILE
from pipelines.errors import RayIndexError
from pipelines.resources import match_threads_to_ray_cpus

SHARD_INDEX_FILE = "index.faiss"
ADD_CHUNK = 65_536  # vectors per add_with_ids call: bounds peak memory for any shard size


def add_shard(trained_path: str, trained_sha256: str, directory: str, count: int, dim: int) -> dict:
    """Build one shard's index; the file appears only when complete."""
    match_threads_to_ray_cpus()
    directory = Path(directory)
    data = Path(trained_path).read_bytes()
    if hashlib.sha256(data).hexdigest() != trained_sha256:
        raise RayIndexError(f"{trained_path} changed since training (checksum mismatch); re-run the train stage")
    index = faiss.deserialize_index(np.frombuffer(data, dtype=np.uint8))
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
    return {"index_sha256": file_sha256(out), "trained_sha256": trained_sha256, "ntotal": int(index.ntotal)}


def build_shard_indexes(trained_path: str, trained_sha256: str, jobs: list[tuple[int, str, int]], dim: int,
                        on_done=None) -> dict[int, dict]:
    """Run add_shard for each (shard_id, shard_dir, count) as Ray tasks; returns results by shard id."""
    task = ray.remote(num_cpus=1, max_retries=2)(add_shard)
    refs = {task.remote(trained_path, trained_sha256, d, n, dim): (sid, n) for sid, d, n in jobs}
    results = {}
    while refs:
        ready, _ = ray.wait(list(refs), num_returns=1)
        sid, n = refs.pop(ready[0])
        results[sid] = ray.get(ready[0])
        if on_done:
            on_done(n)
    return results
