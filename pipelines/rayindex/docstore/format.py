"""The doc store's file format: one Parquet file per build shard (docs.parquet), a row per passage in
vector-id order, a CRC32 in every page and min/max statistics of the vector_id column; its footer (whose
sha256 the manifest records) and the per-row-group vector-id ranges readers find an id's row group from.
Written by writer.py, read by reader.py."""

from __future__ import annotations

import contextlib
import hashlib
import io
from pathlib import Path
from typing import BinaryIO

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from rayindex.errors import DamagedIndex

ROW_GROUP_ROWS = 256
# vector_id: the FAISS id (layout.passage_ids); doc_id: the corpus id as text, doc_id_int: it was an
# integer (1 and "1" are different ids); passage: its number in the document, [start, end): its span
# in the document's text (characters), text: the passage's text; metadata: the document's other
# columns as a JSON object
SCHEMA = pa.schema(
    [
        ("vector_id", pa.int64()),
        ("doc_id", pa.string()),
        ("doc_id_int", pa.bool_()),
        ("passage", pa.int32()),
        ("start", pa.int64()),
        ("end", pa.int64()),
        ("text", pa.string()),
        ("metadata", pa.string()),
    ]
)
PARQUET_MAGIC = b"PAR1"
# bytes read at once from the end of a file: the whole footer in one request for a shard of up to ~100
# row groups (~600 footer bytes each, measured), the rest of a larger one in a second request
FOOTER_READ = 64 << 10
DAMAGED = "the version is damaged: rebuild it"


def read_footer(file: BinaryIO) -> bytes:
    """A Parquet file's footer as stored: its last 8 + footer-length bytes (metadata, length, b"PAR1"),
    in one read when it fits in FOOTER_READ bytes. ValueError when the file does not end like Parquet."""
    size = file.seek(0, io.SEEK_END)
    file.seek(size - min(size, FOOTER_READ))
    tail = file.read(min(size, FOOTER_READ))
    if len(tail) < 12 or tail[-4:] != PARQUET_MAGIC:
        raise ValueError("it does not end with a Parquet footer")
    length = int.from_bytes(tail[-8:-4], "little")
    if length + 12 > size:
        raise ValueError(f"its footer length {length} is past its size {size}")
    if length + 8 <= len(tail):
        return tail[-(length + 8) :]
    file.seek(size - length - 8)
    return file.read(length + 8 - len(tail)) + tail


def footer_sha256(source: str | Path | BinaryIO) -> str:
    """sha256 of a Parquet file's footer (read_footer): what the manifest records of each docs.parquet."""
    with open(source, "rb") if isinstance(source, (str, Path)) else contextlib.nullcontext(source) as file:
        return hashlib.sha256(read_footer(file)).hexdigest()


def vector_id_ranges(metadata: pq.FileMetaData, name: str) -> tuple[np.ndarray, np.ndarray]:
    """Per row group, its least and greatest vector id from the footer's statistics; refused unless every
    row group has them and they increase from one group to the next (the order DocWriter writes)."""
    mins, maxs = np.zeros(metadata.num_row_groups, np.int64), np.zeros(metadata.num_row_groups, np.int64)
    for group in range(metadata.num_row_groups):
        stats = metadata.row_group(group).column(0).statistics
        if stats is None or not stats.has_min_max:
            raise DamagedIndex(f"{name} row group {group} has no vector_id statistics; {DAMAGED}")
        mins[group], maxs[group] = stats.min, stats.max
    disordered = np.flatnonzero((mins > maxs) | np.append(False, mins[1:] <= maxs[:-1]))
    if len(disordered):
        raise DamagedIndex(
            f"{name}: the vector ids of row group {disordered[0]} do not increase from those before it; {DAMAGED}"
        )
    return mins, maxs
