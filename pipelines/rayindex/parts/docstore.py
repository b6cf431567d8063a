"""Doc store: a vector's id -> its passage (text and character span in the document), the document's
corpus id and metadata; one Parquet file per shard, a row per passage, read by id without loading the
corpus (vector ids are memory-mapped, one row group is read per lookup).
"""

from __future__ import annotations

import contextlib
import json
from functools import lru_cache
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from rayindex.errors import DamagedIndex
from rayindex.layout import DOCS_FILE, PASSAGE_BITS, VECTOR_IDS_FILE, atomic_file, document_rows, save_npy

ROW_GROUP_ROWS = 256
# vector_id: the FAISS id (layout.passage_ids); doc_id: the corpus id as text, doc_id_int: it was an
# integer (1 and "1" are different ids); passage: its number in the document, [start, end): its span
# in the document's text (characters), text: the passage's text; metadata: the document's other
# columns as a JSON object
SCHEMA = pa.schema([("vector_id", pa.int64()), ("doc_id", pa.string()), ("doc_id_int", pa.bool_()), ("passage", pa.int32()),
                    ("start", pa.int64()), ("end", pa.int64()), ("text", pa.string()), ("metadata", pa.string())])


class DocWriter:
    """Streams one shard's passages into docs.parquet and their vector ids into vector_ids.npy; ids must
    arrive in increasing order. A context manager: both files appear when the block succeeds, neither when it fails."""

    def __init__(self, shard_dir: Path):
        self._files = contextlib.ExitStack()
        docs_tmp = self._files.enter_context(atomic_file(shard_dir / DOCS_FILE))
        self._ids_tmp = self._files.enter_context(atomic_file(shard_dir / VECTOR_IDS_FILE))
        self._writer = pq.ParquetWriter(docs_tmp, SCHEMA)
        self._vector_ids: list[np.ndarray] = []

    def write(self, vector_ids: np.ndarray, doc_ids: pa.Array, doc_id_is_int: pa.Array, passages: np.ndarray, starts: np.ndarray,
              ends: np.ndarray, texts: pa.Array, metadata: pa.Array) -> None:
        """Append passages, whole columns at a time (one value per passage in every column)."""
        table = pa.Table.from_arrays([pa.array(vector_ids, pa.int64()), doc_ids, doc_id_is_int, pa.array(passages, pa.int32()),
                                      pa.array(starts, pa.int64()), pa.array(ends, pa.int64()), texts, metadata], schema=SCHEMA)
        self._writer.write_table(table, row_group_size=ROW_GROUP_ROWS)
        self._vector_ids.append(np.asarray(vector_ids, dtype=np.int64))

    def __enter__(self) -> "DocWriter":
        return self

    def __exit__(self, *exc) -> None:
        self._writer.close()
        if exc[0] is None:
            save_npy(self._ids_tmp, np.concatenate(self._vector_ids) if self._vector_ids else np.zeros(0, np.int64))
        self._files.__exit__(*exc)


class DocStore:
    """Look passages up by vector id across all shards of a version. Every row returned is checked to be
    the one asked for: a doc store that disagrees with the index is refused, never served."""

    def __init__(self, shard_dirs: list[Path], shard_starts: list[int]):
        self.shard_dirs = shard_dirs
        self.shard_starts = np.asarray(shard_starts, dtype=np.int64)
        self._vector_ids, self._files = [], []
        for d in shard_dirs:
            try:
                self._vector_ids.append(np.load(d / VECTOR_IDS_FILE, mmap_mode="r"))
            except (OSError, ValueError) as exc:
                raise DamagedIndex(f"{d / VECTOR_IDS_FILE} is not a readable id file ({exc}); the version is damaged: rebuild it") from None
            try:
                self._files.append(pq.ParquetFile(d / DOCS_FILE))
            except (OSError, ValueError) as exc:
                raise DamagedIndex(f"{d / DOCS_FILE} is not a readable doc store ({exc}); the version is damaged: rebuild it") from None
        self._group_ends = [
            np.cumsum([f.metadata.row_group(g).num_rows for g in range(f.metadata.num_row_groups)]) for f in self._files
        ]
        self._read_group = lru_cache(maxsize=64)(self._read_group_uncached)

    def _read_group_uncached(self, shard: int, group: int) -> pa.Table:
        return self._files[shard].read_row_group(group)

    def column(self, name: str) -> list[tuple[np.ndarray, pa.ChunkedArray]]:
        """Per shard, (vector ids, this doc-store column): what a filter on metadata is built from."""
        return [(np.asarray(ids), f.read(columns=[name]).column(0)) for ids, f in zip(self._vector_ids, self._files)]

    def get(self, vector_id: int) -> dict:
        """{vector_id, row_id, id, passage, start, end, text, metadata} of the passage with this vector id
        (row_id: its document's global row)."""
        shard = int(np.searchsorted(self.shard_starts, int(document_rows(vector_id)), side="right")) - 1
        ids = self._vector_ids[shard] if shard >= 0 else np.zeros(0, np.int64)
        pos = int(np.searchsorted(ids, vector_id))
        where = self.shard_dirs[max(shard, 0)] / DOCS_FILE
        if pos >= len(ids) or ids[pos] != vector_id:
            raise DamagedIndex(f"id {vector_id} is in the index but not in {where.parent / VECTOR_IDS_FILE}; the version is damaged: rebuild it")
        group = int(np.searchsorted(self._group_ends[shard], pos, side="right"))
        group_start = 0 if group == 0 else int(self._group_ends[shard][group - 1])
        try:
            row = self._read_group(shard, group).slice(pos - group_start, 1).to_pylist()[0]
            doc = {"vector_id": row["vector_id"], "row_id": row["vector_id"] >> PASSAGE_BITS,
                   "id": int(row["doc_id"]) if row["doc_id_int"] else row["doc_id"], "passage": row["passage"], "start": row["start"],
                   "end": row["end"], "text": row["text"], "metadata": json.loads(row["metadata"])}
        except (OSError, ValueError, IndexError, KeyError, TypeError) as exc:
            raise DamagedIndex(f"{where} row {pos} cannot be read ({exc}); the version is damaged: rebuild it") from None
        if doc["vector_id"] != vector_id:
            raise DamagedIndex(f"{where} row {pos} holds passage {doc['vector_id']}, not {vector_id} as {VECTOR_IDS_FILE} says; "
                               "the version is damaged: rebuild it")
        return doc
