"""Bad input (docs/build.md, "Bad data"): a clear error naming the file/row/column/parameter, or a
skip or repair counted in the manifest; and CURRENT never moves to a broken version."""

import json
import os
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from rayindex.builder import build
from rayindex.cli import app
from rayindex.errors import RayIndexError
from rayindex.ivf.index import make_index
from rayindex.layout import CURRENT, DOCS_FILE, MANIFEST, VERSIONS
from rayindex.manifest import Counts, Manifest
from rayindex.query.search import open_index
from rayindex.stages import encode
from rayindex.stages import plan as plan_stage
from rayindex.stages.train import check_trainable
from rayindex.text.corpus import check_id
from rayindex.text.documents import CUT

from helpers import build_args, build_config, write_jsonl, write_parquet


@pytest.fixture
def output(built):
    """The output of the good session build: failed builds land beside it and must not touch CURRENT."""
    out, manifest = built
    before = (Path(out) / CURRENT).read_text()
    versions_before = set(os.listdir(Path(out) / VERSIONS))
    yield out
    assert (Path(out) / CURRENT).read_text() == before
    for run_id in set(os.listdir(Path(out) / VERSIONS)) - versions_before:
        failed = Manifest.from_json((Path(out) / VERSIONS / run_id / MANIFEST).read_text(), run_id)
        assert failed.status == "failed" and failed.error


def fails(inputs, output, match, **overrides):
    with pytest.raises(RayIndexError, match=match):
        build(build_config(inputs, output, **overrides))


def test_missing_column_is_named_with_the_columns_there_are(corpus_dir, output):
    fails(
        [corpus_dir],
        output,
        r"a\.parquet: no column 'summary'; its columns are: id, title, body, module, kind",
        template=None,
        text_columns=["summary"],
    )


def test_missing_input(tmp_path, output):
    fails([tmp_path / "nope.parquet"], output, r"input path .*nope\.parquet does not exist")


@pytest.mark.parametrize("damage", ["garbage", "cut in half", "empty file"])
def test_corrupt_parquet_names_the_file(tmp_path, docs, output, damage):
    good = write_parquet(tmp_path / "good.parquet", docs[:20]).read_bytes()
    data = {"garbage": b"PAR1 this is not parquet", "cut in half": good[: len(good) // 2], "empty file": b""}[damage]
    (tmp_path / "bad.parquet").write_bytes(data)
    fails([tmp_path / "bad.parquet"], output, r"bad\.parquet: cannot read this parquet file .*; fix or remove it")


def test_invalid_json_line_names_file_and_line(tmp_path, docs, output):
    write_jsonl(tmp_path / "x.jsonl", [docs[0], "{not json", docs[1]])
    fails(
        [tmp_path / "x.jsonl"],
        output,
        r"x\.jsonl line 2: not valid JSON .*; fix or remove that line",
        index="IVF1,Flat",
    )


def test_jsonl_cut_short_is_refused_before_encoding(tmp_path, docs, output):
    path = write_jsonl(tmp_path / "x.jsonl", docs[:3])
    path.write_bytes(
        path.read_bytes() + json.dumps(docs[3]).encode()[:40]
    )  # an interrupted copy: no newline at the end
    fails(
        [path],
        output,
        r"x\.jsonl line 4: not valid JSON \(.*\); the file ends there without a newline, so it looks cut "
        r"short \(an interrupted copy or upload\?\): copy it again",
    )


def test_mixed_schemas(tmp_path, docs, output):
    write_parquet(tmp_path / "in" / "a.parquet", docs[:5])
    write_parquet(tmp_path / "in" / "b.parquet", [dict(d, extra=1) for d in docs[5:10]])
    fails(
        [tmp_path / "in"],
        output,
        r"mixed schemas: .*a\.parquet has columns \[id, title, body, module, kind\] but .*b\.parquet",
    )


@pytest.mark.parametrize("column", ["kind", "id"])
def test_mixed_column_types(tmp_path, docs, output, column):
    write_parquet(tmp_path / "in" / "a.parquet", docs[:5])
    write_parquet(tmp_path / "in" / "b.parquet", [dict(d, **{column: i}) for i, d in enumerate(docs[5:10])])
    fails(
        [tmp_path / "in"],
        output,
        rf"mixed schemas: column '{column}' is string in .*a\.parquet but int64 in .*b\.parquet",
    )


def test_duplicate_ids_name_an_example_and_where(tmp_path, docs, output):
    write_parquet(tmp_path / "in" / "a.parquet", docs[:20])
    write_jsonl(tmp_path / "in" / "b.jsonl", docs[20:30] + [docs[3]])
    fails(
        [tmp_path / "in"],
        output,
        rf"duplicate id '{docs[3]['id']}' in column 'id' .* at: .*a\.parquet row 3; .*b\.jsonl row 10",
        index="IVF1,Flat",
    )


def no_ray(monkeypatch) -> None:
    """Make starting or joining Ray for the encode stage fail the test: what it checks happens before."""

    def refuse(*_):
        raise AssertionError("the encode stage started: Ray was needed")

    monkeypatch.setattr(encode, "connect", refuse)


def test_duplicate_ids_of_a_small_local_corpus_are_refused_before_ray_starts(tmp_path, docs, monkeypatch):
    """Read without the model (ids and text columns): the same message, before any encoder exists; a row
    without text is no document, so its id repeats nothing (as in the encode stage's check)."""
    no_ray(monkeypatch)
    write_parquet(tmp_path / "in" / "a.parquet", docs[:20] + [dict(docs[5], title=None, body=None)])
    write_jsonl(tmp_path / "in" / "b.jsonl", docs[20:30] + [docs[3], docs[4], docs[3]])
    with pytest.raises(
        RayIndexError,
        match=rf"^duplicate id '{docs[3]['id']}' in column 'id' \(3 duplicate\(s\) in all\), at: "
        rf"\S*a\.parquet row 3; \S*b\.jsonl row 10\. Ids must be unique",
    ):
        build(build_config([tmp_path / "in"], tmp_path / "out", index="IVF1,Flat"))


@pytest.mark.slow  # a build's encode (about 15 s)
def test_duplicate_ids_past_the_early_check_are_found_by_the_encode_stage(tmp_path, docs, output, monkeypatch):
    """A corpus too big (or remote) for the early check: the encode stage's hashes find the duplicate, and
    name it the same way."""
    monkeypatch.setattr(plan_stage, "EARLY_ID_CHECK_BYTES", 0)
    write_parquet(tmp_path / "in" / "a.parquet", [dict(d, body=d["body"][:100]) for d in docs[:20]])
    write_jsonl(tmp_path / "in" / "b.jsonl", [dict(d, body=d["body"][:100]) for d in docs[20:30] + [docs[3]]])
    fails(
        [tmp_path / "in"],
        output,
        rf"duplicate id '{docs[3]['id']}' in column 'id' \(1 duplicate\(s\) in all\), at: .*a\.parquet row 3; "
        r".*b\.jsonl row 10\. Ids must be unique",
        index="IVF1,Flat",
    )


def test_a_parquet_text_column_of_numbers_is_refused_before_ray_starts(tmp_path, docs, monkeypatch):
    """Its type is in the file's schema: refused at the plan, naming the file, the column and its type; the
    CLI says the run folder it made is kept."""
    no_ray(monkeypatch)
    corpus = write_parquet(tmp_path / "n.parquet", [{"id": d["id"], "body": i} for i, d in enumerate(docs[:5])])
    result = CliRunner().invoke(app, ["build", str(corpus), "-o", str(tmp_path / "out"), "--text-column", "body"])
    message = " ".join(result.output.split())
    assert result.exit_code == 1 and "Traceback" not in message
    assert f"error: {corpus}: text column 'body' holds int64 values, not text; give --text-column the column" in message
    (version,) = (tmp_path / "out" / VERSIONS).iterdir()
    assert f"(run folder {version} kept for inspection; CURRENT was not changed)" in message


@pytest.mark.slow  # a build's encode (about 20 s)
def test_a_jsonl_text_column_of_numbers_is_refused_naming_the_line(tmp_path, output, monkeypatch):
    """JSONL declares no types: the values tell, batch by batch (before Ray starts for a corpus small enough
    for the early id check; here, as for a bigger one, in the encoder)."""
    monkeypatch.setattr(plan_stage, "EARLY_ID_CHECK_BYTES", 0)
    write_jsonl(tmp_path / "x.jsonl", [{"id": str(i), "body": i * 7} for i in range(5)])
    fails(
        [tmp_path / "x.jsonl"],
        output,
        r"x\.jsonl line 1: text column 'body' holds int64 values, not text",
        template=None,
        text_columns=["body"],
        index="IVF1,Flat",
        shards=1,
    )


@pytest.mark.slow  # a build with a 3 MB document (about 20 s)
def test_a_big_document_is_cut_at_max_doc_chars_recorded_and_warned(ray_address, tmp_path, docs):
    """A 3 MB document among small ones: its first --max-doc-chars characters are indexed (found by
    search), the rest left out of the index and the doc store, the cut recorded in the manifest (id, where,
    its size, what was kept) and printed as a warning; the build publishes."""
    words = [w for d in docs for w in d["body"].split() if w.isalpha()]
    big = " ".join(f"{words[(i * 7919) % len(words)]}" for i in range(500_000))  # varied text, ~3 MB
    head = big[:400]
    tail = big[-400:]
    rows = [dict(d) for d in docs[:39]] + [{"id": "big", "title": "Big", "body": big, "module": "x", "kind": "x"}]
    corpus = write_parquet(tmp_path / "docs.parquet", rows)
    out = tmp_path / "out"
    options = ["--index", "IVF1,Flat", "--shards", "1", "--no-tune", "--max-doc-chars", "20000", "--quiet"]
    result = CliRunner().invoke(app, [*build_args(corpus, out), *options])
    assert result.exit_code == 0, result.output
    published = open_index(out)
    (shard,) = published.manifest.shard_states
    (cut,) = shard.cut_documents
    text = f"Big: {big}"
    assert cut.id == "big" and cut.where == f"{corpus} row 39" and cut.chars == len(text)
    assert 19_900 <= cut.kept_chars <= 20_000 and published.manifest.counts.skipped == {CUT: 1}
    warning = published.manifest.warnings[0]
    assert warning.startswith("1 document(s) longer than --max-doc-chars 20,000 were cut")
    assert f"warning: {warning}" in " ".join(result.output.split())
    hit = published.search(f"Big: {head}", k=1)[0]
    assert hit["id"] == "big" and hit["start"] == 0
    stored = pq.read_table(out / VERSIONS / published.manifest.run_id / "shards" / "00000" / DOCS_FILE)
    kept = [t for d, t in zip(stored["doc_id"].to_pylist(), stored["text"].to_pylist()) if d == "big"]
    assert max(stored["end"].to_pylist()) <= cut.kept_chars and 10 < len(kept) < 100
    assert tail not in "".join(kept)


def test_index_string_faiss_rejects_fails_before_encoding(corpus_dir, output):
    fails([corpus_dir], output, r"--index 'IVF8,PQ7': FAISS cannot build it for dimension 384", index="IVF8,PQ7")


def test_non_ivf_index_is_refused_with_examples(corpus_dir, output):
    fails([corpus_dir], output, r"--index 'HNSW32' is not an IVF index.*IVF1,Flat", index="HNSW32")


def test_a_single_document_gets_a_smaller_index_and_the_cli_says_so(ray_address, tmp_path, docs):
    """Too few documents for --index: the build shrinks it (index_params.fit_index_to_corpus), records
    why in manifest.warnings and the CLI prints it; the one document is found."""
    write_parquet(tmp_path / "one.parquet", docs[:1])
    out = tmp_path / "out"
    result = CliRunner().invoke(
        app,
        [
            *build_args(tmp_path / "one.parquet", out),
            "--index",
            "IVF256,PQ16",
            "--quiet",
        ],
    )
    assert result.exit_code == 0, result.output
    published = open_index(out)
    vectors = published.manifest.counts.passages  # the document's passages
    why = (
        f"--index 'IVF256,PQ16' needs more vectors to train than the {vectors} there are, so the build uses "
        f"'IVF1,Flat' "
        "(IVF256 needs at least 256 vectors (39 per list to train well): IVF1; PQ16's codebooks need at least 256 "
        "vectors: Flat)"
    )
    assert f"warning: {why}" in " ".join(result.output.split())  # rich wraps lines
    assert published.manifest.index_string == "IVF1,Flat" and published.manifest.warnings[0].startswith(why)
    hits = published.search(f"{docs[0]['title']}: {docs[0]['body']}", k=3)
    assert [h["id"] for h in hits] == [docs[0]["id"]]


def test_a_sample_too_small_for_opq_is_refused_not_crashed():
    """FAISS 1.15's OPQ training crashes the process under d points; the build shrinks an --index the
    corpus cannot train, and check_trainable stays the guard for a too-small --train-sample."""
    with pytest.raises(
        RayIndexError, match=r"OPQ needs at least 384 training vectors .* the sample has 300; .*--train-sample"
    ):
        check_trainable(make_index("OPQ16,IVF4,PQ16np", 384, "cosine"), "OPQ16,IVF4,PQ16np", 300)
    with pytest.raises(
        RayIndexError, match=r"has 64 centroids but only 50 vectors to train them; use --index 'IVF1,Flat'"
    ):
        check_trainable(make_index("IVF64,Flat", 384, "cosine"), "IVF64,Flat", 50)


def test_no_text_at_all(tmp_path, docs, output):
    write_parquet(tmp_path / "in" / "a.parquet", [dict(d, title=None, body="") for d in docs[:5]])
    fails(
        [tmp_path / "in"],
        output,
        r"no documents to index: all 5 rows were skipped \(\{'empty_or_null_text': 5\}\)",
        index=None,
    )


def test_no_rows_at_all(tmp_path, output):
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.jsonl").write_bytes(b"")
    pq.write_table(
        pa.table({"id": pa.array([], pa.string()), "title": pa.array([], pa.string())}), tmp_path / "in" / "b.parquet"
    )
    fails([tmp_path / "in"], output, r"the input \(.*in\) has no rows; nothing to index")


@pytest.mark.parametrize(
    "value, message",
    [
        (None, "is null; every document needs an id"),
        (float("nan"), r"holds a float \(nan\); ids must be strings or integers"),
        (3.0, r"holds a float \(3\.0\)"),
        (True, r"holds a bool \(True\)"),
        ([1, 2], r"holds a list \(\[1, 2\]\)"),
    ],
)
def test_ids_are_strings_or_integers(value, message):
    assert check_id("a", "id", "a.parquet row 0") == "a" and check_id(7, "id", "a.parquet row 0") == 7
    with pytest.raises(RayIndexError, match=rf"a\.parquet row 4: id column 'id' {message}"):
        check_id(value, "id", "a.parquet row 4")


def test_wrong_id_type_names_file_line_and_column(tmp_path, docs, output):
    write_jsonl(tmp_path / "x.jsonl", [docs[0], docs[1], dict(docs[2], id={"n": 2})])
    fails(
        [tmp_path / "x.jsonl"],
        output,
        r"x\.jsonl line 3: id column 'id' holds a dict \(\{'n': 2\}\); ids must be strings or "
        r"integers: fix or cast that column, or leave out --id-column",
        index="IVF1,Flat",
    )


def test_messy_rows_are_kept_or_skipped_and_every_one_is_counted(ray_address, tmp_path):
    """Rows that are repaired (non-UTF-8 bytes, unpaired surrogates), truncated (a 10 MB document, with
    --no-passages: cut at --max-doc-chars, then the model reads its first 256 tokens) or skipped
    (blank line, null/empty text, text keys missing) all land in counts["skipped"]."""
    huge = " ".join(f"word{i % 997} and more" for i in range(700_000))  # 10 MB: the model reads its first 256 tokens
    assert len(huge) > 10_000_000
    write_parquet(
        tmp_path / "in" / "a.parquet", [{"id": i, "title": f"parquet doc {i}", "body": "int ids"} for i in (1, 2)]
    )
    lines = [
        b'{"id": "latin-1", "title": "caf\xe9", "body": "cr\xe8me br\xfbl\xe9e"}',  # Latin-1, not UTF-8: replaced, kept
        b'{"id": "1", "title": "a string id", "body": "not the same id as the integer 1"}',
        b"",
        b'{"id": "null-text", "title": null, "body": null}',
        b'{"id": "empty-text", "title": "", "body": "   "}',
        b'{"id": "no-text-keys"}',
        b'{"id": "surrogate", "title": "half a pair \\ud800", "body": "kept"}',
        json.dumps({"id": "huge", "title": "huge", "body": huge}).encode(),
    ]
    (tmp_path / "in" / "b.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    manifest = build(build_config([tmp_path / "in"], tmp_path / "out", index=None, passages=False))
    assert manifest.counts.model_dump(exclude={"tokens_encoded"}) == Counts(
        rows_read=10,
        docs_encoded=6,
        passages=6,
        skipped={
            "non_utf8_replaced (kept)": 2,
            "blank_line": 1,
            "empty_or_null_text": 3,
            "truncated_to_max_seq_length (kept)": 1,
            CUT: 1,
        },
    ).model_dump(exclude={"tokens_encoded"})
    published = open_index(tmp_path / "out")
    assert published.search("caf\ufffd: cr\ufffdme br\ufffdl\ufffde", k=1)[0]["id"] == "latin-1"
    assert published.search("half a pair \ufffd: kept", k=1)[0]["id"] == "surrogate"
    assert [h["id"] for h in published.search("parquet doc 1: int ids", k=1)] == [1]
    assert [h["id"] for h in published.search("a string id: not the same id as the integer 1", k=1)] == ["1"]
    hit = published.search(f"huge: {huge[:5000]}", k=1, mode="dense")[0]  # the query is truncated like the document was
    assert hit["id"] == "huge" and hit["score"] > 0.999  # the doc store keeps what was indexed:
    assert f"huge: {huge}".startswith(hit["text"]) and 499_000 < len(hit["text"]) <= 500_000  # the default cap


def test_output_not_writable(tmp_path, corpus_dir):
    (tmp_path / "a-file").write_text("x")
    with pytest.raises(RayIndexError, match=r"output .*a-file/out is not writable"):
        build(build_config([corpus_dir], tmp_path / "a-file" / "out"))


def test_index_memory_budget_too_small_for_the_corpus(tmp_path, docs, output):
    write_parquet(tmp_path / "in" / "a.parquet", docs[:50])
    fails([tmp_path / "in"], output, r"--max-index-memory: .*", index=None, max_index_memory=1000)
