"""Merge stage: all shard indexes into one, in RAM or into on-disk inverted lists
(faiss.contrib.ondisk.merge_ondisk) that serving memory-maps.

FAISS's merge checks only the coarse centroids and keeps ids as they are, so before merging
we check that every shard carries the one trained index (same fingerprint: centroids, codebooks,
pre-transforms) and that its ids are exactly its planned global rows.
"""

from __future__ import annotations

import contextlib
import os
import sys
from pathlib import Path

import faiss
import numpy as np
from faiss.contrib.ondisk import merge_ondisk

from pipelines.errors import RayIndexError
from pipelines.faults import checkpoint
from pipelines.train import trained_fingerprint

MERGED_FILE = "index.faiss"
IVFDATA_FILE = "index.ivfdata"


def index_ids(index: faiss.Index) -> np.ndarray:
    """All ids stored in an IVF index's inverted lists (works on memory-mapped lists)."""
    invlists = faiss.extract_index_ivf(index).invlists
    parts = []
    for list_no in range(invlists.nlist):
        size = invlists.list_size(list_no)
        if size:
            parts.append(faiss.rev_swig_ptr(invlists.get_ids(list_no), size).copy())
    return np.concatenate(parts) if parts else np.zeros(0, np.int64)


def check_shard(path: str, expected_fingerprint: str, expected_ids: np.ndarray) -> None:
    """Refuse a shard built from another trained index or holding ids other than its own rows."""
    index = faiss.read_index(path, faiss.IO_FLAG_MMAP)
    if trained_fingerprint(index) != expected_fingerprint:
        raise RayIndexError(
            f"{path} was not built from this run's trained index (its centroids, codebooks or transforms differ); "
            "rebuild that shard from trained.faiss"
        )
    ids = np.sort(index_ids(index))
    if len(ids) != len(expected_ids) or not np.array_equal(ids, expected_ids):
        dup = ids[1:][ids[1:] == ids[:-1]]
        detail = f"id {dup[0]} appears twice" if len(dup) else "its ids are not the shard's global row ids"
        raise RayIndexError(f"{path}: {detail}; ids must be global and unique, rebuild that shard")


def merge_shards(trained_path: str, shard_paths: list[str], out_dir: str, on_disk: bool) -> dict:
    """Merge the (already checked) shard indexes into out_dir/index.faiss (+ index.ivfdata on disk)."""
    out_dir = Path(out_dir)
    index = faiss.read_index(trained_path)
    if on_disk:
        merge_ondisk(index, shard_paths, str(out_dir / IVFDATA_FILE))
    else:
        ivf = faiss.extract_index_ivf(index)
        for done, path in enumerate(shard_paths, 1):
            # merge_from moves the shard's lists, so only one shard is in RAM besides the result
            shard = faiss.read_index(path)
            ivf.merge_from(faiss.extract_index_ivf(shard), 0)
            checkpoint("merge", done)
        index.ntotal = ivf.ntotal
    tmp = str(out_dir / MERGED_FILE) + ".tmp"
    faiss.write_index(index, tmp)
    os.replace(tmp, out_dir / MERGED_FILE)
    return {"on_disk": on_disk, "ntotal": int(index.ntotal), "files": [MERGED_FILE] + ([IVFDATA_FILE] if on_disk else [])}


def read_merged(version_dir: str | Path) -> faiss.Index:
    """Open a merged index memory-mapped: on-disk lists from the .ivfdata beside it (wherever the folder
    now is), in-RAM lists mapped from the index file itself, so neither is read into RAM up front."""
    version_dir = Path(version_dir)
    on_disk = (version_dir / IVFDATA_FILE).exists()
    flags = faiss.IO_FLAG_ONDISK_SAME_DIR if on_disk else faiss.IO_FLAG_MMAP
    with c_stdout_to_stderr():  # FAISS printf()s a note about the .ivfdata path, which would corrupt --json output
        return faiss.read_index(str(version_dir / MERGED_FILE), flags)


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
