"""Plain functions on FAISS IVF indexes, shared by the stages and the query side: build one from a
factory string with clear errors, what identifies a trained index, how well its quantizer fits a
set of vectors, the ids it holds, its default nprobe, and reading and writing index files."""

from __future__ import annotations

import contextlib
import hashlib
import os
import sys
from pathlib import Path

import faiss
import numpy as np

from rayindex.errors import DamagedIndex, RayIndexError
from rayindex.infra.files import atomic_file
from rayindex.layout import IVFDATA_FILE, MERGED_FILE

METRICS = {"cosine": faiss.METRIC_INNER_PRODUCT, "dot": faiss.METRIC_INNER_PRODUCT, "l2": faiss.METRIC_L2}
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


def gpus_usable() -> bool:
    """Whether this FAISS build has GPU support and sees a GPU (faiss-cpu: never)."""
    return hasattr(faiss, "index_cpu_to_all_gpus") and faiss.get_num_gpus() > 0


def flat_assigner(index: faiss.Index) -> faiss.Index:
    """An exact (flat) index over the coarse centroids: which list each vector belongs to, computed as
    matrix products, the form a GPU runs fast (an HNSW quantizer's graph walk is CPU-only; the flat
    answer is the exact nearest list, which the graph approximates)."""
    ivf = faiss.extract_index_ivf(index)
    flat = faiss.IndexFlat(ivf.d, ivf.metric_type)
    flat.add(ivf.quantizer.reconstruct_n(0, ivf.nlist))
    return flat


def gpu_assigner(index: faiss.Index) -> faiss.Index | None:
    """flat_assigner on every GPU FAISS sees, or None when it sees none (add on CPU as usual)."""
    return faiss.index_cpu_to_all_gpus(flat_assigner(index)) if gpus_usable() else None


def add_assigned(index: faiss.Index, vectors: np.ndarray, ids: np.ndarray, assigner: faiss.Index | None) -> None:
    """index.add_with_ids, with the coarse assignment (the nearest list of each vector) done by `assigner`
    (gpu_assigner: on a GPU) instead of the index's quantizer; the codes and residuals are computed on the
    CPU as add_with_ids computes them, so with an exact quantizer the index is the same, byte for byte."""
    x = np.ascontiguousarray(vectors, dtype=np.float32)
    ids = np.ascontiguousarray(ids, dtype=np.int64)
    if assigner is None:
        index.add_with_ids(x, ids)
        return
    for transform in pre_transforms(index):
        x = np.ascontiguousarray(transform.apply(x))
    ivf = faiss.extract_index_ivf(index)
    _, lists = assigner.search(x, 1)
    lists = np.ascontiguousarray(lists[:, 0], dtype=np.int64)
    ivf.add_core(len(x), faiss.swig_ptr(x), faiss.swig_ptr(ids), faiss.swig_ptr(lists))
    index.ntotal = ivf.ntotal  # an IndexPreTransform counts what its IVF holds


def trained_fingerprint(index: faiss.Index) -> str:
    """sha256 of the index serialized with empty inverted lists (and nprobe 1): equal exactly when two
    indexes share coarse centroids, PQ/SQ codebooks and pre-transforms (FAISS's own merge checks only
    centroids)."""
    ivf = faiss.extract_index_ivf(index)
    saved, owned, ntotal, ivf_ntotal, nprobe = ivf.invlists, ivf.own_invlists, index.ntotal, ivf.ntotal, ivf.nprobe
    ivf.own_invlists = False
    empty = faiss.ArrayInvertedLists(ivf.nlist, ivf.code_size)
    ivf.replace_invlists(empty, False)
    index.ntotal = ivf.ntotal = 0
    ivf.nprobe = 1
    try:
        return hashlib.sha256(faiss.serialize_index(index).tobytes()).hexdigest()
    finally:
        ivf.replace_invlists(saved, owned)
        index.ntotal, ivf.ntotal, ivf.nprobe = ntotal, ivf_ntotal, nprobe


def index_ids(index: faiss.Index) -> np.ndarray:
    """All ids stored in an IVF index's inverted lists (works on memory-mapped lists)."""
    invlists = faiss.extract_index_ivf(index).invlists
    parts = []
    for list_no in range(invlists.nlist):
        size = invlists.list_size(list_no)
        if size:
            parts.append(faiss.rev_swig_ptr(invlists.get_ids(list_no), size).copy())
    return np.concatenate(parts) if parts else np.zeros(0, np.int64)


def set_nprobe(index: faiss.Index, nprobe: int) -> None:
    """The nprobe a plain index.search uses: stored in the index file by write_index."""
    faiss.extract_index_ivf(index).nprobe = int(nprobe)


def write_index(index: faiss.Index, path: str | Path) -> None:
    """faiss.write_index, atomically (the file appears whole or not at all)."""
    with atomic_file(path) as tmp:
        faiss.write_index(index, str(tmp))


def read_index(path: str | Path, flags: int = 0) -> faiss.Index:
    """faiss.read_index with the file named in the error when it is not a readable index."""
    try:
        with c_stdout_to_stderr():  # FAISS printf()s a note about an .ivfdata path, which would corrupt --json output
            return faiss.read_index(str(path), flags)
    except RuntimeError as exc:
        reason = str(exc).strip().splitlines()[-1] if str(exc).strip() else "unreadable"
        raise DamagedIndex(
            f"{path} is not a readable FAISS index ({reason}); the version is damaged: rebuild it"
        ) from None


def read_merged(version_dir: str | Path) -> faiss.Index:
    """Open a merged index memory-mapped: on-disk lists from the .ivfdata beside it (wherever the folder
    now is), in-RAM lists mapped from the index file itself, so neither is read into RAM up front."""
    version_dir = Path(version_dir)
    on_disk = (version_dir / IVFDATA_FILE).exists()
    return read_index(version_dir / MERGED_FILE, faiss.IO_FLAG_ONDISK_SAME_DIR if on_disk else faiss.IO_FLAG_MMAP)


@contextlib.contextmanager
def c_stdout_to_stderr():
    """Send what C code writes to file descriptor 1 to stderr for the duration."""
    sys.stdout.flush()
    saved = os.dup(1)
    os.dup2(2, 1)
    try:
        yield
    finally:
        os.dup2(saved, 1)
        os.close(saved)
