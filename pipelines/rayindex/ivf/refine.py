"""Searching an IVF index at a given nprobe, with optional second-stage re-ranking: the IVF-PQ search
proposes k x factor candidates, which are re-scored with exact distances computed from the stored
embeddings in fp16, memory-mapped from disk (what FAISS's IndexRefine does with vectors in RAM).
This lifts recall past what PQ codes allow while the index itself stays PQ-sized; only the
candidates' rows are read.
"""

from __future__ import annotations

from pathlib import Path

import faiss
import numpy as np

from rayindex.infra.files import atomic_file, load_embeddings
from rayindex.layout import FP16_FILE, VECTOR_IDS_FILE, document_rows, shard_dir

CHUNK = 65_536


def write_fp16_embeddings(version_dir: str | Path, manifest) -> list[str]:
    """Write each shard's embeddings as fp16 (streaming, skipped when present); returns the files (paths
    in the version) that now exist."""
    written = []
    for shard, state in zip(manifest.shards, manifest.shard_states):
        d = shard_dir(version_dir, shard.shard_id)
        written.append(f"{d.relative_to(version_dir)}/{FP16_FILE}")
        if (d / FP16_FILE).exists():
            continue
        source = load_embeddings(d, state.passages, manifest.dimension)
        with atomic_file(d / FP16_FILE) as tmp, open(tmp, "wb") as fh:
            for start in range(0, state.passages, CHUNK):
                fh.write(np.asarray(source[start : start + CHUNK], dtype="<f2").tobytes())
    return written


class Refiner:
    """Exact re-scoring of candidate vector ids from the memory-mapped fp16 embeddings."""

    def __init__(self, version_dir: str | Path, manifest):
        self.dim = manifest.dimension
        self.metric = manifest.metric
        self.starts = np.array([s.global_start for s in manifest.shards], dtype=np.int64)
        self.row_ids, self.vectors_f16 = [], []
        for shard, state in zip(manifest.shards, manifest.shard_states):
            d = shard_dir(version_dir, shard.shard_id)
            self.row_ids.append(np.load(d / VECTOR_IDS_FILE, mmap_mode="r"))
            self.vectors_f16.append(load_embeddings(d, state.passages, self.dim, FP16_FILE))

    def vectors(self, ids: np.ndarray) -> np.ndarray:
        """float32 vectors of the given vector ids (rows of zeros for -1)."""
        out = np.zeros((len(ids), self.dim), dtype=np.float32)
        shards = np.searchsorted(self.starts, document_rows(ids), side="right") - 1
        for s in np.unique(shards[ids >= 0]):
            pick = np.nonzero((shards == s) & (ids >= 0))[0]
            positions = np.searchsorted(self.row_ids[s], ids[pick])
            order = np.argsort(positions)  # read the memory map in file order
            out[pick[order]] = self.vectors_f16[s][positions[order]]
        return out

    def rerank(self, queries: np.ndarray, candidates: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Best k of each row of candidates by exact score; FAISS's conventions (inner product: larger first,
        l2: squared distance, smaller first; -1 ids where fewer than k candidates)."""
        nq, nc = candidates.shape
        x = self.vectors(candidates.reshape(-1)).reshape(nq, nc, self.dim)
        if self.metric != "l2":
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
        distances[missing] = np.inf if self.metric == "l2" else -np.inf
        return distances, ids


def search_ivf(
    index: faiss.Index,
    queries: np.ndarray,
    k: int,
    nprobe: int,
    refiner: Refiner | None = None,
    refine_factor: int | None = None,
    selector: faiss.IDSelector | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """(distances, ids) of the k best per query at this nprobe, among the ids the selector accepts (all
    without one); with a refiner and a factor above 1, k x factor candidates re-ranked exactly."""
    params = (
        faiss.SearchParametersIVF(nprobe=nprobe, sel=selector)
        if selector is not None
        else faiss.SearchParametersIVF(nprobe=nprobe)
    )
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    if refiner is None or not refine_factor or refine_factor <= 1:
        return index.search(queries, k, params=params)
    _, candidates = index.search(queries, k * refine_factor, params=params)
    return refiner.rerank(queries, candidates, k)
