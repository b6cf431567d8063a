"""Second-stage re-ranking: the IVF-PQ search proposes k x factor candidates, which are re-scored
with exact distances computed from the stored embeddings in fp16, memory-mapped from disk (what
FAISS's IndexRefine does with vectors in RAM). This lifts recall past what PQ codes allow while
the index itself stays PQ-sized; only the candidates' rows are read.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from pipelines.docstore import ROW_IDS_FILE
from pipelines.encode import load_embeddings, shard_dir

FP16_FILE = "embeddings.f16"  # raw little-endian float16, same rows and order as embeddings.f32
CHUNK = 65_536


def write_fp16_embeddings(version_dir: str | Path, manifest) -> int:
    """Write each shard's embeddings as fp16 (streaming, skipped when present); returns bytes written."""
    written = 0
    for shard, state in zip(manifest.shards, manifest.shard_states):
        d = shard_dir(version_dir, shard.shard_id)
        if (d / FP16_FILE).exists():
            continue
        source = load_embeddings(d, state.docs_encoded, manifest.dimension)
        tmp = d / (FP16_FILE + ".tmp")
        with open(tmp, "wb") as fh:
            for start in range(0, state.docs_encoded, CHUNK):
                block = np.asarray(source[start:start + CHUNK], dtype="<f2")
                fh.write(block.tobytes())
                written += block.nbytes
        os.replace(tmp, d / FP16_FILE)
    return written


class Refiner:
    """Exact re-scoring of candidate row ids from the memory-mapped fp16 embeddings."""

    def __init__(self, version_dir: str | Path, manifest):
        self.dim = manifest.dimension
        self.metric = manifest.metric
        self.starts = np.array([s.global_start for s in manifest.shards], dtype=np.int64)
        self.row_ids, self.vectors_f16 = [], []
        for shard, state in zip(manifest.shards, manifest.shard_states):
            d = shard_dir(version_dir, shard.shard_id)
            self.row_ids.append(np.load(d / ROW_IDS_FILE, mmap_mode="r"))
            count = state.docs_encoded
            self.vectors_f16.append(np.memmap(d / FP16_FILE, dtype="<f2", mode="r", shape=(count, self.dim))
                                    if count else np.zeros((0, self.dim), "<f2"))

    def vectors(self, ids: np.ndarray) -> np.ndarray:
        """float32 vectors of the given row ids (rows of zeros for -1)."""
        out = np.zeros((len(ids), self.dim), dtype=np.float32)
        shards = np.searchsorted(self.starts, ids, side="right") - 1
        for s in np.unique(shards[ids >= 0]):
            pick = np.nonzero((shards == s) & (ids >= 0))[0]
            positions = np.searchsorted(self.row_ids[s], ids[pick])
            order = np.argsort(positions)  # read the memory map in file order
            out[pick[order]] = self.vectors_f16[s][positions[order]]
        return out

    def rerank(self, queries: np.ndarray, candidates: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Best k of each row of candidates by exact score; FAISS's conventions (ip: larger first,
        l2: squared distance, smaller first; -1 ids where fewer than k candidates)."""
        nq, nc = candidates.shape
        x = self.vectors(candidates.reshape(-1)).reshape(nq, nc, self.dim)
        if self.metric == "ip":
            scores = np.einsum("qcd,qd->qc", x, queries)
            ranking = -scores
        else:
            scores = ((x - queries[:, None, :]) ** 2).sum(axis=2)
            ranking = scores.copy()
        ranking[candidates < 0] = np.inf
        order = np.argsort(ranking, axis=1, kind="stable")[:, :k]
        ids = np.take_along_axis(candidates, order, axis=1)
        distances = np.take_along_axis(scores, order, axis=1).astype(np.float32)
        missing = np.take_along_axis(ranking, order, axis=1) == np.inf
        ids[missing] = -1
        distances[missing] = -np.inf if self.metric == "ip" else np.inf
        return distances, ids
