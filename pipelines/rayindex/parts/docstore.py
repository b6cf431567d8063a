"""Doc store: id -> original id, text and metadata, one Parquet file per shard, read by id
without loading the corpus (row ids are memory-mapped, one row group is read per lookup).
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
from rayindex.layout import DOCS_FILE, ROW_IDS_FILE, atomic_file, save_npy

ROW_GROUP_ROWS = 256
# doc_id: the corpus id as text, doc_id_int: it was an integer (1 and "1" are different ids);
# metadata: the row's other columns as a JSON object
SCHEMA = pa.schema([("row_id", pa.int64()), ("doc_id", pa.string()), ("doc_id_int", pa.bool_()), ("text", pa.string()),
                    ("metadata", pa.string())])


class DocWriter:
    """Streams one shard's documents into docs.parquet and their ids into row_ids.npy; ids must arrive
    in increasing order. A context manager: both files appear when the block succeeds, neither when it fails."""

    def __init__(self, shard_dir: Path):
        self._files = contextlib.ExitStack()
        docs_tmp = self._files.enter_context(atomic_file(shard_dir / DOCS_FILE))
        self._row_ids_tmp = self._files.enter_context(atomic_file(shard_dir / ROW_IDS_FILE))
        self._writer = pq.ParquetWriter(docs_tmp, SCHEMA)
        self._row_ids: list[np.ndarray] = []

    def write(self, row_ids: np.ndarray, doc_ids: pa.Array, doc_id_is_int: pa.Array, texts: pa.Array, metadata: pa.Array) -> None:
        """Append documents, whole columns at a time."""
        table = pa.Table.from_arrays([pa.array(row_ids, pa.int64()), doc_ids, doc_id_is_int, texts, metadata], schema=SCHEMA)
        self._writer.write_table(table, row_group_size=ROW_GROUP_ROWS)
        self._row_ids.append(np.asarray(row_ids, dtype=np.int64))

    def __enter__(self) -> "DocWriter":
        return self

    def __exit__(self, *exc) -> None:
        self._writer.close()
        if exc[0] is None:
            save_npy(self._row_ids_tmp, np.concatenate(self._row_ids) if self._row_ids else np.zeros(0, np.int64))
        self._files.__exit__(*exc)


class DocStore:
    """Look documents up by global row id across all shards of a version. Every row returned is checked to
    be the one asked for: a doc store that disagrees with the index is refused, never served."""

    def __init__(self, shard_dirs: list[Path], shard_starts: list[int]):
        self.shard_dirs = shard_dirs
        self.shard_starts = np.asarray(shard_starts, dtype=np.int64)
        self._row_ids, self._files = [], []
        for d in shard_dirs:
            try:
                self._row_ids.append(np.load(d / ROW_IDS_FILE, mmap_mode="r"))
            except (OSError, ValueError) as exc:
                raise DamagedIndex(f"{d / ROW_IDS_FILE} is not a readable id file ({exc}); the version is damaged: rebuild it") from None
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

    def get(self, row_id: int) -> dict:
        """{row_id, id, text, metadata} of the document with this global id."""
        shard = int(np.searchsorted(self.shard_starts, row_id, side="right")) - 1
        ids = self._row_ids[shard] if shard >= 0 else np.zeros(0, np.int64)
        pos = int(np.searchsorted(ids, row_id))
        where = self.shard_dirs[max(shard, 0)] / DOCS_FILE
        if pos >= len(ids) or ids[pos] != row_id:
            raise DamagedIndex(f"id {row_id} is in the index but not in {where.parent / ROW_IDS_FILE}; the version is damaged: rebuild it")
        group = int(np.searchsorted(self._group_ends[shard], pos, side="right"))
        group_start = 0 if group == 0 else int(self._group_ends[shard][group - 1])
        try:
            row = self._read_group(shard, group).slice(pos - group_start, 1).to_pylist()[0]
            doc = {"row_id": row["row_id"], "id": int(row["doc_id"]) if row["doc_id_int"] else row["doc_id"], "text": row["text"],
                   "metadata": json.loads(row["metadata"])}
        except (OSError, ValueError, IndexError, KeyError, TypeError) as exc:
            raise DamagedIndex(f"{where} row {pos} cannot be read ({exc}); the version is damaged: rebuild it") from None
        if doc["row_id"] != row_id:
            raise DamagedIndex(f"{where} row {pos} holds document {doc['row_id']}, not {row_id} as {ROW_IDS_FILE} says; "
                               "the version is damaged: rebuild it")
        return doc
