"""Merge stage: check that every shard index belongs to this run, then merge them all into one,
in RAM or into on-disk inverted lists (faiss.contrib.ondisk.merge_ondisk) that serving memory-maps.
The merged index carries the run's default nprobe, so a plain faiss.read_index + search uses it.

FAISS's merge checks only the coarse centroids and keeps ids as they are, so before merging we
check that every shard carries the one trained index (same fingerprint: centroids, codebooks,
pre-transforms) and that its ids are exactly its planned global rows.
"""

from __future__ import annotations

import os

import faiss
import numpy as np
import psutil
from faiss.contrib.ondisk import merge_ondisk

from rayindex.config import BuildConfig
from rayindex.errors import RayIndexError
from rayindex.infra.faults import checkpoint
from rayindex.infra.progress import StageProgress
from rayindex.infra.storage import Store, written_sha256
from rayindex.ivf.index import index_ids, read_index, set_nprobe, trained_fingerprint, write_index
from rayindex.layout import IVFDATA_FILE, MERGED_FILE, SHARD_INDEX_FILE, TRAINED_FILE, VECTOR_IDS_FILE, shard_dir
from rayindex.manifest import Manifest, MergedIndex


def check_shard(path: str, expected_fingerprint: str, expected_ids: np.ndarray) -> None:
    """Refuse a shard built from another trained index or holding ids other than its own vectors' (vector_ids.npy)."""
    index = read_index(path, faiss.IO_FLAG_MMAP)
    if trained_fingerprint(index) != expected_fingerprint:
        raise RayIndexError(
            f"{path} was not built from this run's trained index (its centroids, codebooks or transforms differ); "
            "rebuild that shard from trained.faiss"
        )
    ids = np.sort(index_ids(index))
    if len(ids) != len(expected_ids) or not np.array_equal(ids, expected_ids):
        dup = ids[1:][ids[1:] == ids[:-1]]
        detail = f"id {dup[0]} appears twice" if len(dup) else "its ids are not the shard's vector ids"
        raise RayIndexError(f"{path}: {detail}; ids must be global and unique, rebuild that shard")


def merge_shards(trained_path: str, shard_paths: list[str], out_dir: str, on_disk: bool, nprobe: int) -> MergedIndex:
    """Merge the (already checked) shard indexes into out_dir/index.faiss (+ index.ivfdata on disk)."""
    index = read_index(trained_path)
    if on_disk:
        merge_ondisk(index, shard_paths, os.path.join(out_dir, IVFDATA_FILE))
    else:
        ivf = faiss.extract_index_ivf(index)
        for done, path in enumerate(shard_paths, 1):
            # merge_from moves the shard's lists, so only one shard is in RAM besides the result
            shard = read_index(path)
            ivf.merge_from(faiss.extract_index_ivf(shard), 0)
            checkpoint("merge", done)
        index.ntotal = ivf.ntotal
    set_nprobe(index, nprobe)
    write_index(index, os.path.join(out_dir, MERGED_FILE))
    return MergedIndex(
        on_disk=on_disk, ntotal=int(index.ntotal), files=[MERGED_FILE] + ([IVFDATA_FILE] if on_disk else [])
    )


def choose_on_disk(config: BuildConfig, shard_bytes: int) -> bool:
    """--on-disk/--in-ram, else on disk when the shard indexes exceed --memory-budget (default: half the RAM)."""
    if config.on_disk is not None:
        return config.on_disk
    budget = config.memory_budget or psutil.virtual_memory().total // 2
    return shard_bytes > budget


def run(config: BuildConfig, manifest: Manifest, version: Store, progress: StageProgress) -> MergedIndex:
    """The merged index, kept when its recorded files still verify."""
    if manifest.merge and version.verified({f: manifest.files_sha256.get(f, "") for f in manifest.merge.files}):
        manifest.reused.merge = True
        return manifest.merge
    version.pull(
        {TRAINED_FILE: manifest.training.trained_sha256} | manifest.shard_files((SHARD_INDEX_FILE, VECTOR_IDS_FILE))
    )
    version_dir = version.local_root
    shard_dirs = [shard_dir(version_dir, s.shard_id) for s in manifest.shards]
    shard_paths = [str(d / SHARD_INDEX_FILE) for d in shard_dirs]
    with progress.stage("merge", manifest.counts.passages, "vectors"):
        for d, path in zip(shard_dirs, shard_paths):
            check_shard(path, manifest.training.trained_fingerprint, np.load(d / VECTOR_IDS_FILE))
        on_disk = choose_on_disk(config, sum(os.path.getsize(p) for p in shard_paths))
        merged = merge_shards(str(version_dir / TRAINED_FILE), shard_paths, str(version_dir), on_disk, manifest.nprobe)
        for name in merged.files:
            manifest.files_sha256[name] = written_sha256(version_dir / name)
        version.push(merged.files)
    manifest.merge = merged
    return merged
