"""Writing a build shard's doc store: its passages into docs.parquet (format.py) and their vector ids
into vector_ids.npy, both atomically, by the encoder."""

from __future__ import annotations

import contextlib
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from rayindex.docstore.format import ROW_GROUP_ROWS, SCHEMA
from rayindex.infra.files import atomic_file, save_npy
from rayindex.layout import DOCS_FILE, VECTOR_IDS_FILE


class DocWriter:
    """Streams one shard's passages into docs.parquet and their vector ids into vector_ids.npy; ids must
    arrive in increasing order. A context manager: both files appear when the block succeeds, neither when it fails."""

    def __init__(self, shard_dir: Path):
        self._files = contextlib.ExitStack()
        docs_tmp = self._files.enter_context(atomic_file(shard_dir / DOCS_FILE))
        self._ids_tmp = self._files.enter_context(atomic_file(shard_dir / VECTOR_IDS_FILE))
        # a CRC32 per page, so a reader refuses a damaged page instead of serving it; statistics of the
        # vector_id column only: readers find an id's row group from them, and min/max texts would only
        # grow the footer every reader fetches
        self._writer = pq.ParquetWriter(docs_tmp, SCHEMA, write_page_checksum=True, write_statistics=["vector_id"])
        self._vector_ids: list[np.ndarray] = []

    def write(
        self,
        vector_ids: np.ndarray,
        doc_ids: pa.Array,
        doc_id_is_int: pa.Array,
        passages: np.ndarray,
        starts: np.ndarray,
        ends: np.ndarray,
        texts: pa.Array,
        metadata: pa.Array,
    ) -> None:
        """Append passages, whole columns at a time (one value per passage in every column)."""
        table = pa.Table.from_arrays(
            [
                pa.array(vector_ids, pa.int64()),
                doc_ids,
                doc_id_is_int,
                pa.array(passages, pa.int32()),
                pa.array(starts, pa.int64()),
                pa.array(ends, pa.int64()),
                texts,
                metadata,
            ],
            schema=SCHEMA,
        )
        self._writer.write_table(table, row_group_size=ROW_GROUP_ROWS)
        self._vector_ids.append(np.asarray(vector_ids, dtype=np.int64))

    def __enter__(self) -> DocWriter:
        return self

    def __exit__(self, *exc) -> None:
        self._writer.close()
        if exc[0] is None:
            save_npy(self._ids_tmp, np.concatenate(self._vector_ids) if self._vector_ids else np.zeros(0, np.int64))
        self._files.__exit__(*exc)
