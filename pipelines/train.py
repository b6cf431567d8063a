"""Train stage: a uniform random sample across all shards trains the index given by a FAISS
index_factory string; the trained, empty index is saved with its checksum.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import faiss
import numpy as np

from pipelines.encode import load_embeddings
from pipelines.errors import RayIndexError
from pipelines.resources import match_threads_to_ray_cpus
from pipelines.storage import Store, file_sha256
from pipelines.index_params import MIN_POINTS_PER_CENTROID, suggest_for_too_few_points

TRAINED_FILE = "trained.faiss"
METRICS = {"ip": faiss.METRIC_INNER_PRODUCT, "l2": faiss.METRIC_L2}
EXAMPLES = "e.g. IVF1024,PQ48, OPQ48,IVF1024,PQ48, IVF256,Flat or IVF1,Flat (exact)"


def make_index(index_string: str, dim: int, metric: str) -> faiss.Index:
    """index_factory with a clear error when FAISS rejects the string or it is not an IVF index."""
    try:
        index = faiss.index_factory(dim, index_string, METRICS[metric])
    except RuntimeError as exc:
        reason = str(exc).strip().splitlines()[-1] if str(exc).strip() else "rejected"
        raise RayIndexError(
            f"--index {index_string!r}: FAISS cannot build it for dimension {dim} ({reason}); {EXAMPLES}"
        ) from exc
    try:
        faiss.extract_index_ivf(index)
    except RuntimeError as exc:
        raise RayIndexError(
            f"--index {index_string!r} is not an IVF index: rayindex builds one index per shard and merges "
            f"their inverted lists, which needs IVF; {EXAMPLES}"
        ) from exc
    return index


def sample_rows(counts: list[int], size: int, seed: int) -> list[np.ndarray]:
    """Uniform sample of `size` of all rows without replacement, as sorted local row numbers per shard."""
    total = int(sum(counts))
    picks = np.sort(np.random.default_rng(seed).choice(total, size=min(size, total), replace=False))
    bounds = np.concatenate([[0], np.cumsum(counts)])
    return [picks[(picks >= lo) & (picks < hi)] - lo for lo, hi in zip(bounds[:-1], bounds[1:])]


def training_sample(shard_dirs: list[Path], counts: list[int], dim: int, size: int, seed: int) -> np.ndarray:
    """The sampled vectors, read from the memory-mapped shard embeddings."""
    parts = [
        np.asarray(load_embeddings(d, n, dim)[rows]) for d, n, rows in zip(shard_dirs, counts, sample_rows(counts, size, seed)) if len(rows)
    ]
    return np.ascontiguousarray(np.concatenate(parts).astype(np.float32))


def pre_transforms(index: faiss.Index) -> list:
    """The vector transforms (OPQ, PCA, ...) before the IVF index, if any."""
    index = faiss.downcast_index(index)
    if not isinstance(index, faiss.IndexPreTransform):
        return []
    return [faiss.downcast_VectorTransform(index.chain.at(i)) for i in range(index.chain.size())]


def coarse_mse(index: faiss.Index, vectors: np.ndarray) -> float:
    """Mean squared distance from each vector (after the index's pre-transforms) to its nearest coarse
    centroid: how well the quantizer fits these vectors. Measured on the training sample when training,
    and on the new corpus at reindex time; their ratio is the drift."""
    x = np.ascontiguousarray(vectors, dtype=np.float32)
    for transform in pre_transforms(index):
        x = transform.apply(x)
    quantizer = faiss.extract_index_ivf(index).quantizer
    centroids = quantizer.reconstruct_n(0, quantizer.ntotal)
    _, nearest = quantizer.search(x, 1)
    return float(((x - centroids[nearest[:, 0]]) ** 2).sum(axis=1).mean())


def check_trainable(index: faiss.Index, index_string: str, n_train: int) -> list[str]:
    """Refuse indexes the sample cannot train (with a suggestion); return warnings for weak ones.

    The build has already shrunk an --index the corpus is too small for (index_params.fit_index_to_corpus),
    so what is refused here is a --train-sample too small for it, or a string that function does not read."""
    ivf = faiss.extract_index_ivf(index)
    if n_train < ivf.nlist:
        raise RayIndexError(
            f"--index {index_string!r} has {ivf.nlist} centroids but only {n_train} vectors to train them; "
            f"use --index {suggest_for_too_few_points(n_train, index_string, ivf.nlist)!r} or a bigger --train-sample or corpus"
        )
    pq = getattr(faiss.downcast_index(ivf), "pq", None)
    if pq is not None and n_train < (1 << pq.nbits):
        raise RayIndexError(
            f"--index {index_string!r}: its PQ needs at least {1 << pq.nbits} training vectors, the sample has "
            f"{n_train}; use --index 'IVF{max(1, ivf.nlist)},Flat' or a bigger --train-sample or corpus"
        )
    for transform in pre_transforms(index):
        if isinstance(transform, faiss.OPQMatrix) and n_train < transform.d_in:
            # FAISS's OPQ training crashes the process (invalid free) below this; refuse instead
            raise RayIndexError(
                f"--index {index_string!r}: OPQ needs at least {transform.d_in} training vectors (the dimension), "
                f"the sample has {n_train}; drop the OPQ prefix or use a bigger --train-sample or corpus"
            )
    warnings = []
    if ivf.nlist > 1 and n_train < MIN_POINTS_PER_CENTROID * ivf.nlist:  # one list needs no clustering
        warnings.append(
            f"{n_train} training vectors for {ivf.nlist} centroids is under FAISS's {MIN_POINTS_PER_CENTROID} per "
            f"centroid; recall may suffer (consider --index {suggest_for_too_few_points(n_train, index_string, ivf.nlist)!r})"
        )
    return warnings


def train_index(index_string: str, dim: int, metric: str, sample: np.ndarray, seed: int, use_gpu: bool) -> faiss.Index:
    """Train an empty index on the sample; k-means of the coarse quantizer runs on GPU when asked and possible."""
    index = make_index(index_string, dim, metric)
    ivf = faiss.extract_index_ivf(index)
    ivf.cp.seed = seed
    if use_gpu and hasattr(faiss, "index_cpu_to_all_gpus") and faiss.get_num_gpus() > 0:
        # the FAISS-recommended way: run the coarse k-means assignment on GPU, keep the index on CPU
        ivf.clustering_index = faiss.index_cpu_to_all_gpus(faiss.IndexFlat(ivf.d, ivf.metric_type))
    try:
        index.train(sample)
    except RuntimeError as exc:
        raise RayIndexError(f"--index {index_string!r}: FAISS could not train it on {len(sample)} vectors ({exc})") from exc
    ivf.clustering_index = None
    return index


def trained_fingerprint(index: faiss.Index) -> str:
    """sha256 of the index serialized with empty inverted lists: equal exactly when two indexes share
    coarse centroids, PQ/SQ codebooks and pre-transforms (FAISS's own merge checks only centroids)."""
    ivf = faiss.extract_index_ivf(index)
    saved, owned, ntotal, ivf_ntotal = ivf.invlists, ivf.own_invlists, index.ntotal, ivf.ntotal
    ivf.own_invlists = False
    empty = faiss.ArrayInvertedLists(ivf.nlist, ivf.code_size)
    ivf.replace_invlists(empty, False)
    index.ntotal = ivf.ntotal = 0
    try:
        return hashlib.sha256(faiss.serialize_index(index).tobytes()).hexdigest()
    finally:
        ivf.replace_invlists(saved, owned)
        index.ntotal, ivf.ntotal = ntotal, ivf_ntotal


def train_quantizer(index_string: str, metric: str, version: Store, embeddings: dict[str, str], shard_rels: list[str],
                    counts: list[int], dim: int, sample_size: int, seed: int, use_gpu: bool) -> dict:
    """Sample (from the shards' embeddings, pulled into this node's mirror and checked), train, write
    and push trained.faiss; returns what the manifest records about training."""
    match_threads_to_ray_cpus()
    version.pull(embeddings)
    n_train = min(sample_size, int(sum(counts)))
    probe = make_index(index_string, dim, metric)
    warnings = check_trainable(probe, index_string, n_train)
    sample = training_sample([version.local(rel) for rel in shard_rels], counts, dim, n_train, seed)
    index = train_index(index_string, dim, metric, sample, seed, use_gpu)
    path = version.local(TRAINED_FILE)
    faiss.write_index(index, str(path) + ".tmp")
    Path(str(path) + ".tmp").rename(path)
    version.push([TRAINED_FILE])
    return {
        "sample_size": int(len(sample)),
        "trained_sha256": file_sha256(path),
        "trained_fingerprint": trained_fingerprint(index),
        "nlist": int(faiss.extract_index_ivf(index).nlist),
        "coarse_mse": coarse_mse(index, sample),  # the drift baseline of later reindex runs
        "warnings": warnings,
        "gpu": bool(use_gpu and faiss.get_num_gpus() > 0) if hasattr(faiss, "get_num_gpus") else False,
    }
