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
import re
import threading
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from typing import BinaryIO, TypeVar

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from rayindex.docstore.format import DAMAGED, PARQUET_MAGIC, SCHEMA, read_footer, vector_id_ranges
from rayindex.errors import DamagedIndex, NotFound, RayIndexError, quoted
from rayindex.infra.storage import Store
from rayindex.layout import DOCS_FILE, PASSAGE_BITS, document_rows, document_starts, shard_rel
from rayindex.manifest import Manifest
from rayindex.text.documents import typed

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


@dataclass(frozen=True)
class ShardDocuments:
    """A shard's documents in vector-id order: each one's corpus id typed as text/documents.typed writes it
    ("i1" the integer 1, "s1" the string "1": different ids), its first vector id and its number of passages."""

    typed_ids: pa.StringArray
    firsts: np.ndarray
    counts: np.ndarray


INTEGER = re.compile(r"-?(0|[1-9][0-9]*)")  # an integer id as the doc store writes it (Arrow's cast to text)


def shown_id(doc_id: str | int) -> str:
    """An id in a message, its type said: "integer id 1", "string id '1'" (quoted, bounded)."""
    return f"integer id {doc_id}" if isinstance(doc_id, int) else f"string id {quoted(doc_id)}"


def typed_id(doc_id: str | int) -> str:
    """A corpus id as ShardDocuments.typed_ids holds it; anything but a string or an integer is refused."""
    if isinstance(doc_id, bool) or not isinstance(doc_id, (str, int)):
        raise RayIndexError(f"a document id is a string or an integer, not {type(doc_id).__name__} {quoted(doc_id)}")
    return f"i{doc_id}" if isinstance(doc_id, int) else f"s{doc_id}"


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
        self._documents: list[ShardDocuments | None] = [None] * len(shards)
        self._documents_locks = [threading.Lock() for _ in shards]  # a shard's ids: read once

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
        return passage_of(rows.slice(pos, 1).to_pylist()[0], f"{name} row group {group} row {pos}")

    def document(self, doc_id: str | int) -> list[dict]:
        """The passages of the document with this corpus id, in order, as `get` returns them; NotFound when no
        document has it (1 and "1" are different ids). The first call reads each shard's vector_id, doc_id and
        doc_id_int columns once, until the shard that has the id (ShardDocuments: an Arrow string array and two
        int64 arrays, kept); each call then scans those ids in C (pyarrow.compute.index) and reads only the row
        groups holding the document's passages, from the cache when they are in it."""
        wanted = typed_id(doc_id)
        for shard in range(len(self.shards)):
            documents = self._shard_documents(shard)
            position = pc.index(documents.typed_ids, wanted).as_py()
            if position >= 0:
                return self._passages(shard, int(documents.firsts[position]), int(documents.counts[position]))
        raise NotFound(f"no document has the {shown_id(doc_id)}{self._twin_found(doc_id)}")

    def _twin_found(self, doc_id: str | int) -> str:
        """ " (a document has the string id '1': ids keep their type)" when the id of the other type is a document's."""
        twin = str(doc_id) if isinstance(doc_id, int) else int(doc_id) if INTEGER.fullmatch(doc_id) else None
        if twin is None:
            return ""
        key = typed_id(twin)
        if all(pc.index(self._shard_documents(s).typed_ids, key).as_py() < 0 for s in range(len(self.shards))):
            return ""
        return f" (a document has the {shown_id(twin)}: ids keep their type)"

    def _shard_documents(self, shard: int) -> ShardDocuments:
        """The shard's documents (ShardDocuments), read from its file once, by whichever thread needs them first."""
        documents = self._documents[shard]
        if documents is None:
            with self._documents_locks[shard]:
                documents = self._documents[shard]
                if documents is None:
                    columns = ["vector_id", "doc_id", "doc_id_int"]
                    table = self._read(shard, f"columns {', '.join(columns)}", lambda file: file.read(columns=columns))
                    vector_ids = table.column(0).to_numpy()
                    starts = document_starts(vector_ids)
                    at = pa.array(starts)
                    typed_ids = typed(
                        table.column(1).combine_chunks().take(at), table.column(2).combine_chunks().take(at)
                    )
                    counts = np.diff(np.append(starts, len(vector_ids)))
                    documents = self._documents[shard] = ShardDocuments(typed_ids, vector_ids[starts], counts)
        return documents

    def _passages(self, shard: int, first: int, count: int) -> list[dict]:
        """The `count` passages from vector id `first` on (one document's), from the row groups that hold them."""
        name, opened = self.shards[shard].name, self._shard(shard)
        last = first + count - 1
        groups = range(
            int(np.searchsorted(opened.group_maxs, first, side="left")),
            int(np.searchsorted(opened.group_mins, last, side="right")),
        )
        passages = []
        for group in groups:
            ids, rows = self._row_group(shard, group)
            lo, hi = np.searchsorted(ids, [first, last + 1])
            where = f"{name} row group {group}"
            passages += [passage_of(row, where) for row in rows.slice(int(lo), int(hi - lo)).to_pylist()]
        if [p["vector_id"] for p in passages] != list(range(first, first + count)):
            raise DamagedIndex(
                f"{name} does not hold the {count} passages of the document at vector id {first} in order; {DAMAGED}"
            )
        return passages


def passage_of(row: dict, where: str) -> dict:
    """A doc-store row as `DocStore.get` returns it (where: the row's place, for the message when it is damaged)."""
    try:
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
        raise DamagedIndex(f"{where} cannot be read ({exc}); {DAMAGED}") from None
