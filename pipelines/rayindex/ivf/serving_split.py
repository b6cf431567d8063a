"""IVF-sharded search, as plain functions on FAISS objects: the inverted lists of one merged index
split into parts by list number (balanced by list size), each part an index of its own (the trained
index holding only its lists, on disk in a file of its own) that a serving shard memory-maps. A
router keeps the coarse quantizer and the pre-transforms: it assigns each query its nprobe lists
once (coarse_assign), sends it only to the parts that own one of them, each part scans only its own
lists with FAISS's search_preassigned (search_part), and the parts' top-k are merged
(merge_part_results). The lists scanned and the coarse distances are the merged index's, so the
result is the merged index's: same ids, same distances.

FAISS leaves distributed search to the user (IndexShards splits by vector, so every shard scans
nprobe lists of its own: nprobe x shards lists per query); splitting by list keeps the work of one
query what it is on one index, spread over the shards that hold its lists.
"""

from __future__ import annotations

import heapq
from pathlib import Path

import faiss
import numpy as np

from rayindex.errors import RayIndexError
from rayindex.infra.files import atomic_file
from rayindex.ivf.index import c_stdout_to_stderr, pre_transforms, set_nprobe, write_index


def list_sizes(index: faiss.Index) -> np.ndarray:
    """Vectors in each inverted list of an IVF index (works on memory-mapped lists)."""
    invlists = faiss.extract_index_ivf(index).invlists
    return np.array([invlists.list_size(list_no) for list_no in range(invlists.nlist)], dtype=np.int64)


def list_ids(index: faiss.Index, lists: np.ndarray) -> np.ndarray:
    """The ids of the vectors in these inverted lists of an IVF index (works on memory-mapped lists), sorted:
    the passages a part of them holds."""
    invlists = faiss.extract_index_ivf(index).invlists
    held = []
    for list_no in np.asarray(lists, np.int64).tolist():
        n = invlists.list_size(list_no)
        if n:
            ids = invlists.get_ids(list_no)
            held.append(faiss.rev_swig_ptr(ids, n).copy())
            invlists.release_ids(list_no, ids)
    return np.sort(np.concatenate(held)) if held else np.zeros(0, np.int64)


def plan_parts(sizes: np.ndarray, parts: int) -> np.ndarray:
    """owner[list_no] = the part that holds the list: lists taken largest first, each to the part with
    the fewest vectors so far (LPT; the largest part is within 4/3 of the best split, and within one
    list of the mean when lists are many and small, as they are at nlist ~ sqrt(ntotal)). Pure and
    deterministic: the same sizes always give the same plan."""
    sizes = np.asarray(sizes, dtype=np.int64)
    nonempty = int((sizes > 0).sum())
    if parts < 1 or parts > max(nonempty, 1):
        raise RayIndexError(
            f"{parts} serving shards for an index with {nonempty} non-empty inverted lists: choose 1.."
            f"{max(nonempty, 1)} (a shard owns whole lists)"
        )
    owner = np.zeros(len(sizes), dtype=np.int32)
    loads = [(0, part) for part in range(parts)]
    for list_no in np.argsort(-sizes, kind="stable"):
        load, part = heapq.heappop(loads)
        owner[list_no] = part
        heapq.heappush(loads, (load + int(sizes[list_no]), part))
    return owner


def write_part(
    trained: faiss.Index,
    merged: faiss.Index,
    lists: np.ndarray,
    nprobe: int,
    index_path: str | Path,
    ivfdata_path: str | Path,
) -> int:
    """Write one part: the trained (empty) index with the merged index's lists `lists` copied into
    on-disk lists of their own (ivfdata_path, packed), every other list empty; returns its vectors.
    Read it back with faiss.IO_FLAG_ONDISK_SAME_DIR. Both files appear whole or not at all."""
    source = faiss.extract_index_ivf(merged).invlists
    sizes = np.zeros(source.nlist, dtype=np.uint64)
    sizes[lists] = [source.list_size(int(list_no)) for list_no in lists]
    part = faiss.clone_index(trained)
    ivf = faiss.extract_index_ivf(part)
    index_path, ivfdata_path = Path(index_path), Path(ivfdata_path)
    with atomic_file(ivfdata_path) as tmp:
        invlists = faiss.OnDiskInvertedLists(source.nlist, source.code_size, str(tmp))
        with c_stdout_to_stderr():  # FAISS printf()s "resizing ...": not on a --json stdout
            invlists.update_totsize(int(sizes.sum()) * (source.code_size + 8))  # one allocation (codes + int64 ids)
        invlists.set_all_lists_sizes(faiss.swig_ptr(sizes))  # lists packed in list order
        for list_no in lists:
            n = int(sizes[list_no])
            if n:
                ids, codes = source.get_ids(int(list_no)), source.get_codes(int(list_no))
                invlists.update_entries(int(list_no), 0, n, ids, codes)
                source.release_ids(int(list_no), ids)
                source.release_codes(int(list_no), codes)
        invlists.filename = str(ivfdata_path)  # what the index file records: its final name (read back from beside it)
        ivf.replace_invlists(invlists, True)
        invlists.this.disown()  # the index owns (and frees) the lists now
        part.ntotal = ivf.ntotal = int(sizes.sum())
        set_nprobe(part, nprobe)
        write_index(part, index_path)
        del part, ivf, invlists  # unmaps the lists: their bytes are in tmp before atomic_file fsyncs and renames it
    return int(sizes.sum())


def coarse_assign(index: faiss.Index, queries: np.ndarray, nprobe: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(transformed queries, distances to their nprobe nearest lists, those lists): what IndexIVF.search
    computes before it scans lists, done once by the router for every part."""
    x = np.ascontiguousarray(queries, dtype=np.float32)
    for transform in pre_transforms(index):
        x = transform.apply(x)
    coarse_distances, coarse_lists = faiss.extract_index_ivf(index).quantizer.search(x, nprobe)
    return np.ascontiguousarray(x), coarse_distances, coarse_lists


def parts_needed(owner: np.ndarray, coarse_lists: np.ndarray) -> list[int]:
    """The parts that own at least one of the lists the queries probe."""
    return np.unique(owner[coarse_lists[coarse_lists >= 0]]).tolist()


def search_part(
    part: faiss.Index,
    owned: np.ndarray,
    x: np.ndarray,
    coarse_distances: np.ndarray,
    coarse_lists: np.ndarray,
    k: int,
    selector: faiss.IDSelector | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """The k best among this part's lists of those probed (owned: a boolean per list), FAISS's
    (distances, ids) with -1 past what the lists hold. Lists of other parts are given as -1, which
    search_preassigned skips (FAISS's "not enough centroids" marker)."""
    ivf = faiss.extract_index_ivf(part)
    lists = np.ascontiguousarray(
        np.where(owned[np.maximum(coarse_lists, 0)] & (coarse_lists >= 0), coarse_lists, -1), dtype=np.int64
    )
    n = len(x)
    distances, ids = np.empty((n, k), dtype=np.float32), np.empty((n, k), dtype=np.int64)
    params = (
        faiss.SearchParametersIVF(nprobe=lists.shape[1], sel=selector)
        if selector is not None
        else faiss.SearchParametersIVF(nprobe=lists.shape[1])
    )
    # the C++ method: FAISS's Python wrapper of search_preassigned refuses search parameters (a selector)
    ivf.search_preassigned_c(
        n,
        faiss.swig_ptr(np.ascontiguousarray(x, dtype=np.float32)),
        k,
        faiss.swig_ptr(lists),
        faiss.swig_ptr(np.ascontiguousarray(coarse_distances, dtype=np.float32)),
        faiss.swig_ptr(distances),
        faiss.swig_ptr(ids),
        False,
        params,
    )
    return distances, ids


def merge_part_results(
    results: list[tuple[np.ndarray, np.ndarray]], k: int, larger_is_better: bool
) -> tuple[np.ndarray, np.ndarray]:
    """The k best of the parts' sorted results (FAISS's merge_knn_results: a heap over the parts)."""
    if len(results) == 1:
        return results[0]
    distances = np.stack([d[:, :k] for d, _ in results])
    ids = np.stack([i[:, :k] for _, i in results])
    return faiss.merge_knn_results(
        np.ascontiguousarray(distances), np.ascontiguousarray(ids), keep_max=larger_is_better
    )


def empty_results(n: int, k: int, larger_is_better: bool) -> tuple[np.ndarray, np.ndarray]:
    """FAISS's answer when nothing is found: -1 ids, the worst distance."""
    return np.full((n, k), -np.inf if larger_is_better else np.inf, dtype=np.float32), np.full(
        (n, k), -1, dtype=np.int64
    )


def larger_is_better(index: faiss.Index) -> bool:
    return index.metric_type == faiss.METRIC_INNER_PRODUCT
