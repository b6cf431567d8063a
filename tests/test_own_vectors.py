"""Vectors brought by the corpus (--vector-column; docs/build.md, "Vectors brought by the corpus"): a table whose
column holds each row's vector builds without running the model, its rows' text and metadata in the doc store; a
text search over vectors the real model made equals a normal build's; a stored vector finds its own row first;
search by vector in the API and over HTTP (/search with "vector"), with its refusals; an index whose model is not
here refuses text and answers vectors (the MCP server's search tool too); --encode-dtype does not apply; each bad
vector refused naming the file and row; reindex reads changed vectors."""

import json
import sys
from concurrent.futures import ThreadPoolExecutor

import anyio
import httpx
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from mcp import Client, StdioServerParameters
from pydantic import ValidationError
from ray import serve
from typer.testing import CliRunner

import rayindex
from rayindex.builder import build
from rayindex.cli import app
from rayindex.config import BuildConfig
from rayindex.errors import RayIndexError
from rayindex.infra.files import load_embeddings
from rayindex.layout import PASSAGE_BITS, VECTOR_IDS_FILE, shard_dir
from rayindex.manifest import Manifest, Piece
from rayindex.query.client import ServerIndex
from rayindex.query.requests import SearchRequest
from rayindex.query.search import open_index
from rayindex.stages import plan
from rayindex.stages.encode import given_chunk
from rayindex.text.corpus import read_piece
from rayindex.text.vectors import NULL_VECTOR

from helpers import build_config, client_env, free_port, write_jsonl

N_ROWS = 120
QUERIES = ["parse a JSON document", "compress a file with gzip", "open a network socket", "format a date"]
ELSEWHERE = "example-org/vectors-made-elsewhere"  # a model that is not on this machine
DIM = 8


def unit(rng: np.random.Generator, n: int, dim: int = DIM) -> np.ndarray:
    vectors = rng.normal(size=(n, dim))
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


def table_rows(docs: list[dict]) -> list[dict]:
    return [{"id": d["id"], "title": d["title"], "body": d["body"], "kind": d["kind"]} for d in docs[:N_ROWS]]


def with_vectors(rows: list[dict], vectors: np.ndarray) -> pa.Table:
    """The rows and a fixed_size_list<float32> column of their vectors, as an embedding pipeline writes it."""
    table = pa.Table.from_pylist(rows)
    flat = pa.array(vectors.astype(np.float32).ravel(), pa.float32())
    return table.append_column("emb", pa.FixedSizeListArray.from_arrays(flat, vectors.shape[1]))


def stored_vectors(output) -> np.ndarray:
    """A --no-passages build's vectors by row: what the real model made of each row's text."""
    index = open_index(output)
    manifest = index.manifest
    by_row = np.zeros((manifest.counts.docs_encoded, manifest.dimension), np.float32)
    for shard, count in zip(manifest.shards, manifest.shard_counts()):
        folder = shard_dir(index.version_dir, shard.shard_id)
        by_row[np.load(folder / VECTOR_IDS_FILE) >> PASSAGE_BITS] = load_embeddings(folder, count, manifest.dimension)
    return by_row


# --- refusals on the data path, read from real files (fast) ---


def chunk_of(path, config: BuildConfig, dimension: int = DIM, metric: str = "cosine"):
    rows = sum(1 for _ in open(path))
    piece = Piece(path=str(path), row_start=0, num_rows=rows, global_start=0)
    batch = next(read_piece(piece, id_column=config.id_column))
    return given_chunk(batch, batch.where(piece), config, dimension, metric)


def jsonl_config(path, **options) -> BuildConfig:
    return BuildConfig(inputs=[str(path)], id_column="id", vector_column="vec", **options)


def test_jsonl_arrays_become_vectors_and_null_vectors_are_skipped_rows(tmp_path):
    vectors = unit(np.random.default_rng(1), 4)
    rows = [{"id": f"r{i}", "text": f"row {i}", "vec": v.tolist(), "lang": "en"} for i, v in enumerate(vectors)]
    rows[2]["vec"] = None
    rows[3]["text"] = None  # a vector without text is a document: its text is empty
    chunk = chunk_of(write_jsonl(tmp_path / "v.jsonl", rows), jsonl_config(tmp_path))
    docs = chunk.documents
    assert docs.doc_ids.to_pylist() == ["r0", "r1", "r3"] and docs.texts.to_pylist() == ["row 0", "row 1", ""]
    assert docs.skipped == {NULL_VECTOR: 1}
    assert [json.loads(m) for m in docs.metadata.to_pylist()] == [{"lang": "en"}] * 3  # the vector is no metadata
    np.testing.assert_array_equal(chunk.given, vectors[[0, 1, 3]].astype(np.float32))
    assert chunk.char_ends.tolist() == [5, 5, 0] and chunk.passages.tolist() == [1, 1, 1]


@pytest.mark.parametrize(
    "bad, message",
    [
        ([0.5] * 7, "line 3: vector column 'vec' has 7 values, the corpus's vectors have 8"),
        ("NaN", "line 3: vector column 'vec' holds NaN or infinite values"),
        ([1e39] + [0.0] * 7, "line 3: vector column 'vec' holds NaN or infinite values"),  # past float32
        (
            [2.0] + [0.0] * 7,
            "line 3: vector column 'vec' has a vector of norm 2 .*normalize them, or build with "
            "--metric dot or --metric l2",
        ),
        ("text", "line 3: vector column 'vec' holds string values, not a list of numbers"),
        ([1.0, None] + [0.0] * 6, "line 3: vector column 'vec' has a null value inside the vector"),
    ],
)
def test_a_bad_vector_is_refused_naming_the_file_and_line(tmp_path, bad, message):
    good = unit(np.random.default_rng(2), 3)
    rows = [{"id": i, "vec": v.tolist()} for i, v in enumerate(good)]
    if bad == "NaN":
        bad = [float("nan")] + good[2].tolist()[1:]
    rows[2]["vec"] = bad
    path = write_jsonl(tmp_path / "v.jsonl", rows)
    with pytest.raises(RayIndexError, match=f"{path} {message}"):
        chunk_of(path, jsonl_config(tmp_path))


def test_vectors_off_norm_1_are_kept_with_metric_dot(tmp_path):
    rows = [{"id": i, "vec": [float(i + 1)] * DIM} for i in range(3)]
    chunk = chunk_of(write_jsonl(tmp_path / "v.jsonl", rows), jsonl_config(tmp_path, metric="dot"), metric="dot")
    assert chunk.given[:, 0].tolist() == [1.0, 2.0, 3.0]


def test_the_plan_refuses_a_missing_or_wrong_vector_column_and_another_dimension_than_the_models(tmp_path):
    rows = [{"id": i, "text": f"row {i}", "vec": v.tolist()} for i, v in enumerate(unit(np.random.default_rng(3), 3))]
    path = tmp_path / "t.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path)
    with pytest.raises(RayIndexError, match=f"{path}: no vector column 'nope'; its columns are: id, text, vec"):
        plan.plan(BuildConfig(inputs=[str(path)], vector_column="nope"), 1)
    with pytest.raises(RayIndexError, match=f"{path}: vector column 'text' holds string values, not a list"):
        plan.plan(BuildConfig(inputs=[str(path)], vector_column="text", text_columns=["id"], template="{id}"), 1)
    with pytest.raises(RayIndexError, match="a pdf file has no vector column"):
        (tmp_path / "docs").mkdir()
        (tmp_path / "docs" / "a.pdf").write_bytes(b"%PDF-1.4")
        plan.plan(BuildConfig(inputs=[str(path), str(tmp_path / "docs")], vector_column="vec"), 1)
    config = BuildConfig(inputs=[str(path)], output=str(tmp_path / "out"), vector_column="vec")
    manifest = Manifest(
        run_id="20260101-000000-aaaaaa", created_at="", config=config, config_fingerprint=config.fingerprint()
    )
    with pytest.raises(
        RayIndexError, match="vectors have 8 values, but --model .*all-MiniLM-L6-v2 makes vectors of 384"
    ):
        plan.run(config, manifest)  # the packaged model is here: its dimension is read


def test_a_search_request_takes_a_query_or_a_vector():
    assert SearchRequest(vector=[0.5, 1]).vector == [0.5, 1.0]
    for body, problem in [
        ({"query": "x", "vector": [1.0]}, "exactly one of query"),
        ({}, "exactly one of query"),
        ({"vector": [1.0, float("nan")]}, "vector.1"),
        ({"vector": [1.0], "mode": "hybrid"}, "mode hybrid needs query text"),
    ]:
        with pytest.raises(ValidationError, match=problem):
            SearchRequest(**body)


# --- real builds (slow) ---


@pytest.fixture(scope="module")
def normal(ray_address, docs, tmp_path_factory):
    """A normal --no-passages build of the rows: the model encodes their text."""
    root = tmp_path_factory.mktemp("own-vectors")
    rows = table_rows(docs)
    path = root / "normal" / "rows.parquet"
    path.parent.mkdir()
    pq.write_table(pa.Table.from_pylist(rows), path)
    build(build_config([path], root / "normal-out", passages=False, index=None, shards=2))
    return root, rows, stored_vectors(root / "normal-out")


@pytest.fixture(scope="module")
def own(normal):
    """The same rows with the vectors the model made for them, built from --vector-column."""
    root, rows, vectors = normal
    path = root / "own" / "rows.parquet"
    path.parent.mkdir()
    pq.write_table(with_vectors(rows, vectors), path)
    manifest = build(build_config([path], root / "own-out", vector_column="emb", index=None, shards=2))
    return path, root / "own-out", manifest


@pytest.mark.slow
def test_text_search_over_the_models_vectors_equals_a_normal_build(normal, own):
    root, rows, vectors = normal
    _, output, manifest = own
    assert manifest.counts.docs_encoded == N_ROWS and manifest.counts.tokens_encoded == 0
    assert (manifest.metric, manifest.dimension, manifest.passages) == ("cosine", 384, None)
    assert manifest.model.name == BuildConfig.model_fields["model"].default and manifest.model.normalized
    ours, theirs = open_index(output), open_index(root / "normal-out")
    for query in QUERIES:
        for mode in ("dense", "hybrid"):
            expected = theirs.search(query, k=10, mode=mode)
            found = ours.search(query, k=10, mode=mode)
            assert [h["id"] for h in found] == [h["id"] for h in expected], (query, mode)
            assert [h["text"] for h in found] == [h["text"] for h in expected]
            assert [h["metadata"] for h in found] == [h["metadata"] for h in expected]  # kind, and no vector
    texts = [f"{r['title']}: {r['body']}" for r in rows[:8]]
    model_made = ours.model.encode(texts, normalize_embeddings=True)  # the model, as a user runs it
    np.testing.assert_allclose(model_made, vectors[:8], atol=1e-4)


@pytest.mark.slow
def test_a_stored_vector_finds_its_row_first_and_a_filter_holds(normal, own):
    _, rows, vectors = normal
    index = open_index(own[1])
    for row in range(0, N_ROWS, 11):
        best = index.search_vector(vectors[row], k=3)[0]
        assert best["id"] == rows[row]["id"] and best["score"] == pytest.approx(1.0, abs=1e-5)
    classes = [i for i, r in enumerate(rows) if r["kind"] == "class"]
    assert len(classes) >= 5
    query = vectors[0] + vectors[1]
    scores = vectors[classes] @ (query / np.linalg.norm(query))
    expected = [rows[classes[i]]["id"] for i in np.argsort(-scores)[:5]]
    hits = index.search_vector(query.tolist(), k=5, filter={"kind": "class"})
    assert [h["id"] for h in hits] == expected
    with pytest.raises(RayIndexError, match="vector: has 3 values, this index's vectors have 384"):
        index.search_vector([1.0, 2.0, 3.0])


@pytest.mark.slow
def test_reindex_reads_the_changed_vectors(normal, own):
    _, rows, vectors = normal
    path, output, _ = own
    changed = vectors.copy()
    changed[3] = (vectors[3] + vectors[50]) / np.linalg.norm(vectors[3] + vectors[50])
    pq.write_table(with_vectors(rows, changed), path)
    manifest = rayindex.reindex(str(output), str(path))
    counted = manifest.reindex.model_dump(include={"added", "changed", "deleted", "unchanged", "encoded"})
    assert counted == {"added": 0, "changed": 1, "deleted": 0, "unchanged": N_ROWS - 1, "encoded": 1}
    best = open_index(output).search_vector(changed[3], k=1)[0]
    assert best["id"] == rows[3]["id"] and best["score"] == pytest.approx(1.0, abs=1e-5)


@pytest.fixture(scope="module")
def elsewhere(ray_address, tmp_path_factory):
    """JSONL arrays made by a model that is not here, without a text column; one row has no vector. Built with
    --encode-dtype fp16, which does not apply (nothing is encoded) and so is not refused on CPU."""
    root = tmp_path_factory.mktemp("elsewhere")
    vectors = unit(np.random.default_rng(4), 40)
    rows = [{"id": f"v{i}", "vec": v.tolist(), "lang": "fr" if i % 3 else "en"} for i, v in enumerate(vectors)]
    rows[5]["vec"] = None
    path = write_jsonl(root / "vectors.jsonl", rows)
    config = dict(id_column="id", template=None, text_columns=["text"], vector_column="vec", model=ELSEWHERE)
    manifest = build(build_config([path], root / "out", index=None, shards=2, tune=None, encode_dtype="fp16", **config))
    return root / "out", manifest, rows, vectors


@pytest.mark.slow
def test_vectors_from_a_model_not_here_search_by_vector_only(elsewhere):
    output, manifest, rows, vectors = elsewhere
    assert manifest.counts.docs_encoded == 39 and manifest.counts.skipped == {NULL_VECTOR: 1}
    assert manifest.model.name == ELSEWHERE and manifest.dimension == DIM
    assert any("no text column ('text')" in w for w in manifest.warnings)
    assert "--encode-dtype fp16 does not apply: the corpus brings its vectors (--vector-column vec)" in " ".join(
        manifest.warnings
    )
    assert {s.encoded_with for s in manifest.shard_states} == {"cpu/fp32"} and manifest.model.dtype == "fp32"
    assert manifest.tuning.queries_from.startswith("stored vectors (the model that made them")
    index = open_index(output)
    best = index.search_vector(vectors[7], k=2)[0]
    assert (best["id"], best["text"], best["metadata"]) == ("v7", "", {"lang": "fr"})
    with pytest.raises(
        RayIndexError,
        match=f"text search needs the model that made this index's vectors, {ELSEWHERE}.*search by vector instead",
    ):
        index.search("anything")


@pytest.mark.slow
def test_the_cli_searches_a_vector_file_and_refuses_text_in_one_line(elsewhere, tmp_path):
    output, _, _, vectors = elsewhere
    np.save(tmp_path / "q.npy", vectors[11])
    (tmp_path / "q.json").write_text(json.dumps(vectors[12].tolist()))
    for name, row in (("q.npy", 11), ("q.json", 12)):
        result = CliRunner().invoke(
            app, ["search", "--index", str(output), "--vector-file", str(tmp_path / name), "-k", "1", "--json"]
        )
        assert result.exit_code == 0, result.output
        assert json.loads(result.stdout)[0]["id"] == f"v{row}"
    text = CliRunner().invoke(app, ["search", "--index", str(output), "anything"])
    assert text.exit_code == 1 and "search by vector instead" in text.output and "Traceback" not in text.output
    both = CliRunner().invoke(app, ["search", "--index", str(output), "x", "--vector-file", str(tmp_path / "q.npy")])
    assert both.exit_code == 2 and "exactly one" in both.output


@pytest.mark.slow
def test_http_search_by_vector_and_its_refusals(elsewhere):
    output, _, rows, vectors = elsewhere
    settings = rayindex.serve(output, port=free_port(), replica_cpus=0)  # starts although the model is not here
    url = f"http://127.0.0.1:{settings.port}"
    try:
        index = open_index(output)
        with httpx.Client(base_url=url, timeout=60) as client:
            for row in (0, 7, 20):
                r = client.post("/search", json={"vector": vectors[row].tolist(), "k": 5, "filter": {"lang": "fr"}})
                assert r.status_code == 200, r.text
                expected = index.search_vector(vectors[row], k=5, filter={"lang": "fr"})
                assert [h["id"] for h in r.json()["hits"]] == [h["id"] for h in expected]
            # 16 clients at once: their vectors batched (a FAISS call per group of the same parameters), each
            # answered as alone
            asks = [(row, {"lang": "fr"} if row % 2 else None) for row in range(16)]
            with ThreadPoolExecutor(16) as pool:
                answers = list(
                    pool.map(
                        lambda ask: client.post(
                            "/search", json={"vector": vectors[ask[0]].tolist(), "k": 4, "filter": ask[1]}
                        ),
                        asks,
                    )
                )
            for (row, only), r in zip(asks, answers, strict=True):
                assert r.status_code == 200, r.text
                expected = index.search_vector(vectors[row], k=4, filter=only)
                assert [h["id"] for h in r.json()["hits"]] == [h["id"] for h in expected]
                assert [h["score"] for h in r.json()["hits"]] == pytest.approx([h["score"] for h in expected], abs=1e-5)
            assert [h["id"] for h in ServerIndex(url).search_vector(vectors[9], k=3)] == [
                h["id"] for h in index.search_vector(vectors[9], k=3)
            ]
            for body, detail in [
                ({"vector": [1.0, 2.0, 3.0]}, "vector: has 3 values, this index's vectors have 8"),
                ({"vector": [1.0] * 7 + [float("nan")]}, "vector.7: Input should be a finite number"),
                ({"query": "x", "vector": vectors[0].tolist()}, "exactly one of query (text) and vector"),
                ({"k": 3}, "exactly one of query (text) and vector"),
                ({"vector": vectors[0].tolist(), "mode": "lexical"}, "mode lexical needs query text"),
                ({"query": "a question"}, f"text search needs the model that made this index's vectors, {ELSEWHERE}"),
            ]:
                r = client.post("/search", content=json.dumps(body), headers={"content-type": "application/json"})
                assert r.status_code == 422 and detail in r.json()["detail"], (body, r.text)
    finally:
        serve.shutdown()


@pytest.mark.slow
def test_the_mcp_server_searches_by_vector_when_the_model_is_not_here(elsewhere):
    """`rayindex mcp` over stdio starts although the model that made the vectors is not here (as the Serve app
    does): its search tool answers a vector as search_vector does, and refuses text saying to search by vector."""
    output, _, _, vectors = elsewhere
    index = open_index(output)
    server = StdioServerParameters(
        command=sys.executable, args=["-m", "rayindex", "mcp", "--index", str(output)], env=client_env()
    )

    async def main():
        with anyio.fail_after(180):
            async with Client(server, mode="legacy") as client:
                found = await client.call_tool("search", {"vector": vectors[7].tolist(), "k": 3})
                assert not found.is_error, found.content
                hits = found.structured_content["hits"]
                assert [h["id"] for h in hits] == [h["id"] for h in index.search_vector(vectors[7], k=3)]
                assert hits[0]["id"] == "v7"
                text = await client.call_tool("search", {"query": "anything"})
                assert text.is_error and "search by vector instead" in text.content[0].text

    anyio.run(main)


@pytest.mark.slow
def test_a_build_refuses_a_row_of_another_dimension_naming_it(ray_address, tmp_path):
    rows = [{"id": i, "vec": v.tolist()} for i, v in enumerate(unit(np.random.default_rng(5), 30))]
    rows[24]["vec"] = rows[24]["vec"][:5]
    path = write_jsonl(tmp_path / "v.jsonl", rows)
    config = build_config(
        [path], tmp_path / "out", template=None, vector_column="vec", model=ELSEWHERE, shards=2, index=None
    )
    with pytest.raises(RayIndexError, match=f"{path} line 25: vector column 'vec' has 5 values, the corpus's vectors"):
        build(config)
