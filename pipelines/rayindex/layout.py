"""The output layout, in one place: every file name, where a version and a shard keep their files,
how vector ids encode documents and passages, and the checks on names read from the store. No file
I/O here: reading and writing files is infra/files.py's job.

    <output>/CURRENT                          the published run id (replaced atomically, last)
    <output>/LOCK/<generation>                held by the run in progress (infra/lock.py)
    <output>/versions/<run-id>/manifest.json  the run's complete state (manifest.py)
    <output>/versions/<run-id>/trained.faiss  the trained, empty index
    <output>/versions/<run-id>/index.faiss    the merged index (+ index.ivfdata when merged on disk)
    <output>/versions/<run-id>/index_infos.json  what the index is, for whoever opens it with FAISS alone
    <output>/versions/<run-id>/shards/NNNNN/  one shard: embeddings, ids, doc store, hashes, its index
    <output>/versions/<run-id>/parts/<N>/PPP.faiss (+ .ivfdata)  the merged lists split for N serving shards
    <output>/versions/<run-id>/parts/<N>/PPP-lexical/  the BM25 postings of part PPP's passages
"""

from __future__ import annotations

import re
from pathlib import Path, PurePosixPath

import numpy as np

CURRENT = "CURRENT"
LOCK_DIR = "LOCK"  # LOCK/<generation>: infra/lock.py
VERSIONS = "versions"
MANIFEST = "manifest.json"
TRAINED_FILE = "trained.faiss"
MERGED_FILE = "index.faiss"
IVFDATA_FILE = "index.ivfdata"
INDEX_INFOS_FILE = "index_infos.json"
EVAL_FILE = "eval.json"

EMBEDDINGS_FILE = "embeddings.f32"  # raw little-endian float32, rows x dim, in row_ids order
FP16_FILE = "embeddings.f16"  # the same rows as float16, written when re-ranking is on
VECTOR_IDS_FILE = "vector_ids.npy"  # int64, increasing: the FAISS ids of the shard's vectors (passage_ids)
DOCS_FILE = "docs.parquet"  # the doc store, a row per passage: vector_id, doc_id, passage, span, text, metadata
DOC_HASHES_FILE = "doc_hashes.npy"  # 64-bit hashes of the corpus ids, one per document (duplicate check)
CONTENT_HASHES_FILE = "content_hashes.npy"  # 64-bit hashes of id + text + metadata, one per document (reindex)
SHARD_INDEX_FILE = "index.faiss"  # the shard's own index, before the merge
LEXICAL_COUNTS_FILE = "lexical_counts.npz"  # a shard's term counts (lexical/counts.py TermCounts)
LEXICAL_DIR = "lexical"  # the version's BM25 postings (lexical/postings.py): one .npy file per array
LEXICAL_ARRAYS = ("terms", "starts", "ids", "impacts", "maxima")
LEXICAL_FILES = tuple(f"{LEXICAL_DIR}/{name}.npy" for name in LEXICAL_ARRAYS)
SHARD_ENCODE_FILES = (EMBEDDINGS_FILE, VECTOR_IDS_FILE, DOCS_FILE, DOC_HASHES_FILE, CONTENT_HASHES_FILE)


# A vector's FAISS id: its document's global row shifted left, or'ed with its passage number in the
# document. Unique int64 ids for 2^43 documents of up to 2^20 passages; id >> PASSAGE_BITS is the row.
PASSAGE_BITS = 20
MAX_PASSAGES = 1 << PASSAGE_BITS


def numbered(counts: np.ndarray) -> np.ndarray:
    """0..counts[0]-1, 0..counts[1]-1, ... end to end: each item's number within its group."""
    counts = np.asarray(counts, np.int64)
    return np.arange(int(counts.sum())) - np.repeat(np.cumsum(counts) - counts, counts)


def passage_ids(rows: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """The ids of every passage of these documents (global rows, passages per document), in order."""
    return (np.repeat(np.asarray(rows, np.int64), counts) << PASSAGE_BITS) | numbered(counts)


def document_rows(ids: np.ndarray) -> np.ndarray:
    """The global row of the document each vector id belongs to."""
    return np.asarray(ids, np.int64) >> PASSAGE_BITS


def document_row(vector_id: int) -> int:
    """document_rows of one vector id, as a Python int (a dictionary key in hybrid fusion, query/fusion.py)."""
    return vector_id >> PASSAGE_BITS


def document_starts(ids: np.ndarray) -> np.ndarray:
    """Where each document's passages start in a shard's increasing vector ids (its passage 0)."""
    return np.flatnonzero((np.asarray(ids, np.int64) & (MAX_PASSAGES - 1)) == 0)


RUN_ID = re.compile(r"\d{8}-\d{6}-[0-9a-f]{6}")  # UTC time and 3 random bytes: versions.new_run_id
SAFE_NAME = re.compile(r"[A-Za-z0-9._-]+")


def check_run_id(run_id: str, where: str) -> str:
    """A run id read from the store (CURRENT, a manifest, a folder name), or a clear refusal naming where."""
    if not isinstance(run_id, str) or not RUN_ID.fullmatch(run_id):
        raise ValueError(f"{where}: {str(run_id)[:60]!r} is not a run id (like 20261129-041502-3fa2c1)")
    return run_id


def safe_rel(rel: str, where: str = "a path") -> str:
    """A path read from the store (a manifest's file keys) that stays inside its folder: relative,
    made of plain names (no '..', no absolute path, no backslash); refused otherwise."""
    parts = PurePosixPath(rel).parts if isinstance(rel, str) else ()
    if (
        not parts
        or rel.startswith("/")
        or "\\" in rel
        or any(p in (".", "..") or not SAFE_NAME.fullmatch(p) for p in parts)
    ):
        raise ValueError(f"{where}: {str(rel)[:80]!r} is not a relative path inside its version")
    return rel


def version_rel(run_id: str) -> str:
    """A version's folder inside the output."""
    return f"{VERSIONS}/{check_run_id(run_id, 'run id')}"


def shard_rel(shard_id: int, name: str | None = None) -> str:
    """A shard's folder (or one of its files) inside its version."""
    folder = f"shards/{shard_id:05d}"
    return f"{folder}/{name}" if name else folder


def shard_dir(version_dir: str | Path, shard_id: int) -> Path:
    return Path(version_dir) / shard_rel(shard_id)


def serving_part_files(shards: int, part: int) -> tuple[str, str]:
    """A serving part's index file and on-disk lists (paths in the version) when the merged lists are split
    for `shards` serving shards: read the index with faiss.IO_FLAG_ONDISK_SAME_DIR, the lists are beside it."""
    return f"parts/{shards}/{part:03d}.faiss", f"parts/{shards}/{part:03d}.ivfdata"


def serving_lexical_files(shards: int, part: int) -> tuple[str, ...]:
    """A serving part's BM25 postings (lexical/postings.py, one .npy file per array): those of the passages whose
    vectors are in the part's lists."""
    return tuple(f"parts/{shards}/{part:03d}-lexical/{name}.npy" for name in LEXICAL_ARRAYS)


def is_serving_file(rel: str) -> bool:
    """What a replica holds whole before it answers: the merged index and its description, and the lexical
    postings (memory-mapped). The doc store is read on demand where the version lives (docstore/reader.py),
    and the fp16 vectors and ids that re-ranking reads are wanted only by a version that re-ranks
    (versions.open_current)."""
    return rel in (MERGED_FILE, IVFDATA_FILE, INDEX_INFOS_FILE, *LEXICAL_FILES)
