"""Reading the doc store: a vector's id -> its passage (text and character span in the document), the document's
corpus id and metadata; one Parquet file per build shard, a row per passage in vector-id order.

Written once by the encoder (DocWriter) with a CRC32 in every page and min/max statistics of the
vector_id column; the manifest records each file's footer sha256 (footer_sha256). Read on demand
where the version lives, never copied whole to a serving node (a local output in place, a remote one
by byte ranges: Store.random_access): a shard's file is opened on the first lookup that needs it and
its footer checked against the manifest; the footer's vector_id statistics say which row group
holds an id; that one row group is read (its pages' CRCs checked) and kept in a bounded LRU cache.
Opening a version costs nothing per shard, and a lookup at most one row group read, whatever the
doc store's size (docs/storage.md, benchmarks/docstore_benchmark.py).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import threading
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from typing import BinaryIO, TypeVar

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from rayindex.docstore.format import DAMAGED, PARQUET_MAGIC, SCHEMA, read_footer, vector_id_ranges
from rayindex.errors import DamagedIndex
from rayindex.infra.storage import Store
from rayindex.layout import DOCS_FILE, PASSAGE_BITS, document_rows, shard_rel
from rayindex.manifest import Manifest

T = TypeVar("T")
# decoded row groups kept, least recently used dropped first: bounds a replica's memory whatever the
# doc store's size (a 256-row group of 1-2 KB passages decodes to ~0.5 MB, so ~100 hot groups) while
# repeated and neighbouring hits are served without a read
CACHE_BYTES = 64 << 20
# file reads in flight at once per doc store: each remote one is an HTTP connection and a row group in
# memory; past this, requests queue here instead of piling connections onto the store
READS_AT_ONCE = 16


@dataclass(frozen=True)
class ShardDocs:
    """One build shard's docs.parquet as the manifest knows it: its name in messages (path or URL), how
    to open it for random reads, its first global row and its footer's sha256."""

    name: str
    open: Callable[[], BinaryIO]
    global_start: int
    footer_sha256: str | None


@dataclass(frozen=True)
class OpenedShard:
    """A shard's file once opened and checked, and each row group's least and greatest vector id."""

    file: pq.ParquetFile
    group_mins: np.ndarray
    group_maxs: np.ndarray


class RowGroupCache:
    """Decoded row groups by (shard, row group), the least recently used dropped past `limit` bytes."""

    def __init__(self, limit: int):
        self.limit = limit
        self._items: OrderedDict = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    def get(self, key: tuple[int, int]):
        with self._lock:
            item = self._items.get(key)
            if item is None:
                return None
            self._items.move_to_end(key)
            return item[0]

    def put(self, key: tuple[int, int], value, size: int) -> None:
        with self._lock:
            if key in self._items:
                return
            self._items[key] = (value, size)
            self._bytes += size
            while self._bytes > self.limit and len(self._items) > 1:
                _, (_, dropped) = self._items.popitem(last=False)
                self._bytes -= dropped


class DocStore:
    """Look passages up by vector id across all shards of a version, reading each shard's file on demand
    (safe from several threads). Every row returned is checked to be the one asked for: a doc store that
    disagrees with the index, its manifest or its page checksums is refused, never served."""

    def __init__(self, shards: list[ShardDocs]):
        self.shards = shards
        self.shard_starts = np.asarray([s.global_start for s in shards], dtype=np.int64)
        self._opened: list[OpenedShard | None] = [None] * len(shards)
        self._locks = [threading.Lock() for _ in shards]  # a shard's file: opened once, read by one thread at a time
        self._reads = threading.BoundedSemaphore(READS_AT_ONCE)
        self._cache = RowGroupCache(CACHE_BYTES)

    @classmethod
    def of_version(cls, version: Store, manifest: Manifest) -> DocStore:
        """The doc store of a version, each shard's docs.parquet read where the version lives and named in
        messages relative to it ("shards/00001/docs.parquet in version <run id>": messages reach clients, the
        server's folders must not)."""
        open_file, shards = version.random_access(), []
        for shard, state in zip(manifest.shards, manifest.shard_states):
            rel = shard_rel(shard.shard_id, DOCS_FILE)
            shards.append(
                ShardDocs(
                    f"{rel} in version {manifest.run_id}",
                    partial(open_file, rel),
                    shard.global_start,
                    state.docs_footer_sha256,
                )
            )
        return cls(shards)

    def open_all(self) -> None:
        """Open and check every shard's file now (its footer against the manifest's sha256), READS_AT_ONCE at a
        time: what a server does before it takes traffic with a version, so that a truncated or replaced file
        is refused then, not met by searches. One footer read per shard (3 shards on local disk: 3.8 ms, measured;
        one ranged GET each on S3)."""
        with ThreadPoolExecutor(READS_AT_ONCE) as pool:
            list(pool.map(self._shard, range(len(self.shards))))

    def _shard(self, shard: int) -> OpenedShard:
        """The shard's file, opened and checked once, by whichever thread needs it first."""
        opened = self._opened[shard]
        if opened is None:
            with self._locks[shard]:
                opened = self._opened[shard]
                if opened is None:
                    opened = self._opened[shard] = self._open(self.shards[shard])
        return opened

    def _open(self, docs: ShardDocs) -> OpenedShard:
        """The shard's file opened, its footer checked against the manifest's sha256 and parsed from those
        same bytes, its pages' CRCs checked on every read."""
        with contextlib.ExitStack() as on_failure:
            try:
                with self._reads:
                    file = docs.open()
                    on_failure.callback(file.close)
                    footer = read_footer(file)
            except FileNotFoundError:
                raise DamagedIndex(f"{docs.name} is missing; {DAMAGED}") from None
            except (OSError, ValueError) as exc:  # an OSError's text would name the file by its server path
                why = (exc.strerror or type(exc).__name__) if isinstance(exc, OSError) else exc
                raise DamagedIndex(f"{docs.name} is not a readable doc store ({why}); {DAMAGED}") from None
            if hashlib.sha256(footer).hexdigest() != docs.footer_sha256:
                raise DamagedIndex(
                    f"{docs.name}: its Parquet footer does not match its sha256 in the manifest; {DAMAGED}"
                )
            try:
                metadata = pq.read_metadata(pa.BufferReader(PARQUET_MAGIC + footer))
                parquet = pq.ParquetFile(file, metadata=metadata, page_checksum_verification=True)
            except (OSError, ValueError) as exc:
                raise DamagedIndex(f"{docs.name} is not a readable doc store ({exc}); {DAMAGED}") from None
            if not metadata.schema.to_arrow_schema().equals(SCHEMA):
                raise DamagedIndex(f"{docs.name} does not have the doc store's columns; {DAMAGED}")
            mins, maxs = vector_id_ranges(metadata, docs.name)
            on_failure.pop_all()
        return OpenedShard(parquet, mins, maxs)

    def _read(self, shard: int, what: str, read: Callable[[pq.ParquetFile], T]) -> T:
        """read(the shard's file), one reader of the file at a time and at most READS_AT_ONCE in all; a page
        failing its CRC, or anything else unreadable, is refused naming the file and what was read. A store
        that stops answering is not the data's fault: its StorageUnavailable passes through."""
        file = self._shard(shard).file
        try:
            with self._locks[shard], self._reads:
                return read(file)
        except (OSError, ValueError, pa.ArrowException) as exc:
            raise DamagedIndex(f"{self.shards[shard].name} {what} cannot be read ({exc}); {DAMAGED}") from None

    def _row_group(self, shard: int, group: int) -> tuple[np.ndarray, pa.Table]:
        """(vector ids, rows) of a row group, from the cache or read once."""
        cached = self._cache.get((shard, group))
        if cached is None:
            rows = self._read(shard, f"row group {group}", lambda file: file.read_row_group(group))
            cached = (rows.column("vector_id").to_numpy(), rows)
            self._cache.put((shard, group), cached, rows.nbytes)
        return cached

    def column(self, name: str) -> list[tuple[np.ndarray, pa.ChunkedArray]]:
        """Per shard, (vector ids, this doc-store column), those two columns read whole from its file: what a
        filter on metadata is built from."""
        tables = [
            self._read(shard, f"columns vector_id, {name}", lambda file: file.read(columns=["vector_id", name]))
            for shard in range(len(self.shards))
        ]
        return [(t.column(0).to_numpy(), t.column(1)) for t in tables]

    def get(self, vector_id: int) -> dict:
        """{vector_id, row_id, id, passage, start, end, text, metadata} of the passage with this vector id
        (row_id: its document's global row)."""
        shard = int(np.searchsorted(self.shard_starts, int(document_rows(vector_id)), side="right")) - 1
        if shard < 0:
            raise DamagedIndex(f"id {vector_id} is in the index but in no shard of the manifest; {DAMAGED}")
        name, opened = self.shards[shard].name, self._shard(shard)
        group = int(np.searchsorted(opened.group_mins, vector_id, side="right")) - 1
        if group < 0 or vector_id > opened.group_maxs[group]:
            raise DamagedIndex(f"id {vector_id} is in the index but not in {name}; {DAMAGED}")
        ids, rows = self._row_group(shard, group)
        pos = int(np.searchsorted(ids, vector_id))
        if pos >= len(ids) or ids[pos] != vector_id:
            raise DamagedIndex(
                f"{name} row group {group} does not hold passage {vector_id}, which its statistics include; {DAMAGED}"
            )
        try:
            row = rows.slice(pos, 1).to_pylist()[0]
            return {
                "vector_id": row["vector_id"],
                "row_id": row["vector_id"] >> PASSAGE_BITS,
                "id": int(row["doc_id"]) if row["doc_id_int"] else row["doc_id"],
                "passage": row["passage"],
                "start": row["start"],
                "end": row["end"],
                "text": row["text"],
                "metadata": json.loads(row["metadata"]),
            }
        except (ValueError, TypeError) as exc:
            raise DamagedIndex(f"{name} row group {group} row {pos} cannot be read ({exc}); {DAMAGED}") from None
