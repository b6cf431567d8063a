"""The doc store read on demand (docstore/reader.py): every lookup equals what was written, by vector id and by
document id (1 and "1" different ids, a second lookup reading only its document's row groups), nothing is
opened before a lookup needs it, a tampered footer and a flipped byte in a page are refused naming the
file, a doc store on S3 answers by byte ranges without landing in the node-local cache, and opening a
version on S3 pulls no doc store."""

import io
import json
import shutil
import uuid
from concurrent.futures import ThreadPoolExecutor
from functools import partial

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from rayindex.docstore.format import footer_sha256, read_footer
from rayindex.docstore.reader import DocStore, ShardDocs
from rayindex.docstore.writer import DocWriter
from rayindex.errors import DamagedIndex, NotFound
from rayindex.infra.storage import Store
from rayindex.layout import DOCS_FILE, PASSAGE_BITS, shard_dir, shard_rel
from rayindex.query.search import open_version
from rayindex.versions import open_current

pytestmark = pytest.mark.slow  # the doc store on S3 (about 25 s)

SHARD_DOCUMENTS = (700, 1, 300)  # documents per shard: several row groups, a single row, a last group cut short


def written_rows(rng: np.random.Generator, first_row: int, documents: int) -> list[dict]:
    """A shard's passages as DocStore.get returns them: 1-3 passages per document, ids int or text,
    texts of varied length and alphabet, metadata of a few kinds."""
    rows = []
    for row in range(first_row, first_row + documents):
        doc_id = row if row % 2 else f"doc-{row}-é"
        metadata = {"kind": ["function", "class", "module"][row % 3], "n": row, "tags": ["a", "b"][: row % 3]}
        start = 0
        for passage in range(int(rng.integers(1, 4))):
            text = " ".join(
                rng.choice(["alpha", "βeta", "gamma", "データ", "x" * 40], size=int(rng.integers(1, 60))).tolist()
            )
            rows.append(
                {
                    "vector_id": (row << PASSAGE_BITS) | passage,
                    "row_id": row,
                    "id": doc_id,
                    "passage": passage,
                    "start": start,
                    "end": start + len(text),
                    "text": text,
                    "metadata": metadata,
                }
            )
            start += len(text) // 2
    return rows


def write_shard(folder, rows: list[dict], batch: int = 500) -> None:
    """rows through DocWriter, in batches as the encoder writes them."""
    with DocWriter(folder) as writer:
        for at in range(0, len(rows), batch):
            part = rows[at : at + batch]
            writer.write(
                np.array([r["vector_id"] for r in part], np.int64),
                pa.array([str(r["id"]) for r in part]),
                pa.array([isinstance(r["id"], int) for r in part]),
                np.array([r["passage"] for r in part]),
                np.array([r["start"] for r in part]),
                np.array([r["end"] for r in part]),
                pa.array([r["text"] for r in part]),
                pa.array([json.dumps(r["metadata"]) for r in part]),
            )


@pytest.fixture(scope="module")
def written(tmp_path_factory) -> tuple:
    """A version folder of three shards written with DocWriter: (folder, expected rows by vector id, shard starts)."""
    folder = tmp_path_factory.mktemp("docstore")
    rng = np.random.default_rng(3)
    expected, starts, first_row = {}, [], 0
    for shard, documents in enumerate(SHARD_DOCUMENTS):
        rows = written_rows(rng, first_row, documents)
        write_shard(shard_dir(folder, shard), rows)
        expected.update((r["vector_id"], r) for r in rows)
        starts.append(first_row)
        first_row += documents
    return folder, expected, starts


def local_shards(folder, starts: list[int], opened: list | None = None) -> list[ShardDocs]:
    """The shards' ShardDocs as DocStore.of_version makes them for a local output (opened: every open is logged
    there)."""

    def open_logged(path):
        if opened is not None:
            opened.append(path)
        return open(path, "rb")

    paths = [shard_dir(folder, shard) / DOCS_FILE for shard in range(len(starts))]
    return [
        ShardDocs(str(p), partial(open_logged, p), start, footer_sha256(p) if p.exists() else None)
        for p, start in zip(paths, starts)
    ]


def test_every_lookup_equals_what_was_written_from_several_threads(written):
    folder, expected, starts = written
    store = DocStore(local_shards(folder, starts))
    ids = list(expected)
    with ThreadPoolExecutor(8) as pool:
        found = list(pool.map(store.get, ids))
    assert found == [expected[i] for i in ids]
    assert (
        pq.ParquetFile(shard_dir(folder, 0) / DOCS_FILE).metadata.num_row_groups > 4
    )  # lookups went to several row groups
    by_id = {int(i): json.loads(m) for ids, column in store.column("metadata") for i, m in zip(ids, column.to_pylist())}
    assert by_id == {i: r["metadata"] for i, r in expected.items()}


def test_every_document_by_id_is_its_passages_in_order(written):
    folder, expected, starts = written
    store = DocStore(local_shards(folder, starts))
    by_document: dict = {}
    for vector_id in sorted(expected):
        by_document.setdefault(expected[vector_id]["id"], []).append(expected[vector_id])
    assert {type(i) for i in by_document} == {int, str} and len(by_document) == sum(SHARD_DOCUMENTS)
    with ThreadPoolExecutor(8) as pool:
        found = list(pool.map(store.document, by_document))
    assert found == list(by_document.values())


class CountedFile(io.FileIO):
    """A file whose bytes read are added up in `read_bytes` (a list of one int, shared by its opener)."""

    def __init__(self, path, read_bytes: list):
        super().__init__(path, "rb")
        self.read_bytes = read_bytes

    def read(self, size=-1):
        data = super().read(size)
        self.read_bytes[0] += len(data)
        return data

    def readinto(self, buffer):
        n = super().readinto(buffer)
        self.read_bytes[0] += n or 0
        return n


def test_the_integer_1_and_the_string_1_are_different_documents_and_a_lookup_reads_its_row_groups(tmp_path):
    """One shard: the integer id 1 (300 passages: over two row groups of 256), the string "1" (2 passages),
    300 one-passage documents and the integer 7 after them. A lookup after the first reads its document's row
    groups, not the file; an unknown id is NotFound, naming the id of the other type when there is one."""
    rows, row = [], 0
    for doc_id, passages in [(1, 300), ("1", 2), *((f"doc-{n}", 1) for n in range(300)), (7, 1)]:
        for passage in range(passages):
            text = f"{doc_id!r} passage {passage}"
            rows.append(
                {
                    "vector_id": (row << PASSAGE_BITS) | passage,
                    "row_id": row,
                    "id": doc_id,
                    "passage": passage,
                    "start": 10 * passage,
                    "end": 10 * passage + len(text),
                    "text": text,
                    "metadata": {"n": row},
                }
            )
        row += 1
    write_shard(shard_dir(tmp_path, 0), rows)
    path = shard_dir(tmp_path, 0) / DOCS_FILE
    read_bytes = [0]
    store = DocStore([ShardDocs(str(path), partial(CountedFile, path, read_bytes), 0, footer_sha256(path))])
    integer_one = store.document(1)
    assert integer_one == [r for r in rows if r["id"] == 1] and len(integer_one) == 300
    assert store.document("1") == [r for r in rows if r["id"] == "1"]
    before = read_bytes[0]
    assert store.document("doc-250") == [r for r in rows if r["id"] == "doc-250"]
    assert 0 < read_bytes[0] - before < path.stat().st_size / 3  # one row group (91 rows) of the file's 603 rows
    with pytest.raises(NotFound, match=r"^no document has the string id '7' \(a document has the integer id 7: ids"):
        store.document("7")
    with pytest.raises(NotFound, match=r"^no document has the integer id 2$"):
        store.document(2)
    with pytest.raises(NotFound, match=r"^no document has the string id 'x{80}'\.\.\. \(1,000 characters\)$"):
        store.document("x" * 1000)


def test_nothing_is_opened_before_a_lookup_needs_it(written, tmp_path):
    folder, expected, starts = written
    opened: list = []
    store = DocStore(local_shards(folder, starts, opened))
    assert opened == []
    store.get(5 << PASSAGE_BITS)
    store.get(6 << PASSAGE_BITS)
    assert opened == [shard_dir(folder, 0) / DOCS_FILE]  # the one shard asked for, once

    missing = DocStore(local_shards(tmp_path / "nothing-here", starts))  # constructing over missing files reads nothing
    with pytest.raises(
        DamagedIndex, match=rf"{tmp_path / 'nothing-here' / shard_rel(0, DOCS_FILE)} is missing; .* rebuild it"
    ):
        missing.get(5 << PASSAGE_BITS)


def damaged_copy(written, tmp_path, offset_in) -> tuple[DocStore, str, dict]:
    """A copy of the written folder whose shard 0 has one byte flipped at offset_in(parquet metadata, file size),
    opened with the manifest's (the undamaged file's) footer sha256: (store, the file's name, expected rows)."""
    folder, expected, starts = written
    shutil.copytree(folder, tmp_path / "copy")
    shards = local_shards(tmp_path / "copy", starts)
    path = shard_dir(tmp_path / "copy", 0) / DOCS_FILE
    data = bytearray(path.read_bytes())
    data[offset_in(pq.read_metadata(path), len(data))] ^= 0x01
    path.write_bytes(bytes(data))
    return DocStore(shards), str(path), expected


def test_a_tampered_footer_is_refused_naming_the_file(written, tmp_path):
    def in_the_footer(metadata, size):
        return size - 8 - metadata.serialized_size // 2

    store, name, expected = damaged_copy(written, tmp_path, in_the_footer)
    with pytest.raises(
        DamagedIndex, match=rf"{name}: its Parquet footer does not match its sha256 in the manifest; .* rebuild it"
    ):
        store.get(5 << PASSAGE_BITS)
    assert store.get(900 << PASSAGE_BITS) == expected[900 << PASSAGE_BITS]  # the other shards are intact


def test_a_flipped_byte_in_a_page_is_refused_by_its_checksum(written, tmp_path):
    group = 2

    def inside_a_text_page(metadata, size):
        chunk = metadata.row_group(group).column(metadata.schema.names.index("text"))
        start = chunk.dictionary_page_offset or chunk.data_page_offset
        return start + chunk.total_compressed_size // 2  # past the page header: the page's compressed bytes

    store, name, expected = damaged_copy(written, tmp_path, inside_a_text_page)
    ids = [i for i in sorted(expected) if i >> PASSAGE_BITS < SHARD_DOCUMENTS[0]]
    metadata = pq.read_metadata(written[0] / shard_rel(0, DOCS_FILE))
    in_group = ids[sum(metadata.row_group(g).num_rows for g in range(group))]  # the group's first row
    with pytest.raises(
        DamagedIndex, match=rf"{name} row group {group} cannot be read \(.*CRC checksum verification failed.*rebuild it"
    ):
        store.get(in_group)
    assert store.get(ids[0]) == expected[ids[0]]  # the file's other row groups are served


def test_a_doc_store_on_s3_is_read_by_byte_ranges_not_cached_locally(written, s3_server, tmp_path, monkeypatch):
    folder, expected, starts = written
    monkeypatch.setenv("RAYINDEX_CACHE", str(tmp_path / "cache"))
    version = Store(f"s3://{s3_server.bucket}/docstore-{uuid.uuid4().hex[:6]}")
    rels = [shard_rel(shard, DOCS_FILE) for shard in range(len(starts))]
    for rel in rels:
        s3_server.fs.put_file(str(folder / rel), version.url(rel))
    open_file = version.random_access()
    store = DocStore(
        [
            ShardDocs(version.url(rel), partial(open_file, rel), start, footer_sha256(folder / rel))
            for rel, start in zip(rels, starts)
        ]
    )
    ids = list(expected)[::7]
    with ThreadPoolExecutor(8) as pool:
        assert list(pool.map(store.get, ids)) == [expected[i] for i in ids]
    assert not list(version.local_root.rglob("*.parquet")) and not list((tmp_path / "cache").rglob("*.parquet"))
    with open_file(rels[0]) as remote:
        assert read_footer(remote) == read_footer(open(folder / rels[0], "rb"))


def test_opening_a_version_on_s3_pulls_no_doc_store(s3_build, s3_docs, tmp_path, monkeypatch):
    output, manifest = s3_build
    monkeypatch.setenv("RAYINDEX_CACHE", str(tmp_path / "cache"))
    version_dir, opened = open_current(output)
    assert all(state.docs_footer_sha256 for state in opened.shard_states)
    index = open_version(version_dir, opened)
    passage = index.docs.get(42 << PASSAGE_BITS)  # read from S3
    assert passage["id"] == s3_docs[42]["id"] and passage["text"] == f"{s3_docs[42]['title']}: {s3_docs[42]['body']}"
    cached = {p.name for p in (tmp_path / "cache").rglob("*") if p.is_file()}
    assert {"index.faiss", "index_infos.json", "manifest.json"} <= cached
    assert not cached & {"docs.parquet", "vector_ids.npy", "embeddings.f32"}
