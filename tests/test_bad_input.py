"""Bad input: a clear error naming the file/row/column/parameter, and CURRENT never moves to a broken version."""

import os
from pathlib import Path

import pytest

from pipelines.build import CURRENT, VERSIONS, build_index
from pipelines.errors import RayIndexError
from pipelines.manifest import Manifest

from conftest import build_config, write_jsonl, write_parquet


@pytest.fixture
def output(built):
    """The output of the good session build: failed builds land beside it and must not touch CURRENT."""
    out, manifest = built
    before = (Path(out) / CURRENT).read_text()
    versions_before = set(os.listdir(Path(out) / VERSIONS))
    yield out
    assert (Path(out) / CURRENT).read_text() == before
    for run_id in set(os.listdir(Path(out) / VERSIONS)) - versions_before:
        failed = Manifest.load(Path(out) / VERSIONS / run_id)
        assert failed.status == "failed" and failed.error


def fails(inputs, output, match, **overrides):
    with pytest.raises(RayIndexError, match=match):
        build_index(build_config(inputs, output, **overrides))


def test_missing_column_is_named_with_the_columns_there_are(corpus_dir, output):
    fails([corpus_dir], output, r"a\.parquet: no column 'summary'; its columns are: id, title, body, module, kind",
          template=None, text_columns=["summary"])


def test_missing_input(tmp_path, output):
    fails([tmp_path / "nope.parquet"], output, r"input path .*nope\.parquet does not exist")


def test_corrupt_parquet_names_the_file(tmp_path, output):
    (tmp_path / "bad.parquet").write_bytes(b"PAR1 this is not parquet")
    fails([tmp_path / "bad.parquet"], output, r"bad\.parquet: cannot read this parquet file")


def test_invalid_json_line_names_file_and_line(tmp_path, docs, output):
    write_jsonl(tmp_path / "x.jsonl", [docs[0], "{not json", docs[1]])
    fails([tmp_path / "x.jsonl"], output, r"x\.jsonl line 2: not valid JSON", index="IVF1,Flat")


def test_mixed_schemas(tmp_path, docs, output):
    write_parquet(tmp_path / "in" / "a.parquet", docs[:5])
    write_parquet(tmp_path / "in" / "b.parquet", [dict(d, extra=1) for d in docs[5:10]])
    fails([tmp_path / "in"], output, r"mixed schemas: .*a\.parquet has columns \[id, title, body, module, kind\] but .*b\.parquet")


def test_mixed_column_types(tmp_path, docs, output):
    write_parquet(tmp_path / "in" / "a.parquet", docs[:5])
    write_parquet(tmp_path / "in" / "b.parquet", [dict(d, kind=3) for d in docs[5:10]])
    fails([tmp_path / "in"], output, r"mixed schemas: column 'kind' is string in .*a\.parquet but int64 in .*b\.parquet")


def test_duplicate_ids_name_an_example_and_where(tmp_path, docs, output):
    write_parquet(tmp_path / "in" / "a.parquet", docs[:20])
    write_jsonl(tmp_path / "in" / "b.jsonl", docs[20:30] + [docs[3]])
    fails([tmp_path / "in"], output,
          rf"duplicate id '{docs[3]['id']}' in column 'id' .* at: .*a\.parquet row 3; .*b\.jsonl row 10", index="IVF1,Flat")


def test_index_string_faiss_rejects_fails_before_encoding(corpus_dir, output):
    fails([corpus_dir], output, r"--index 'IVF8,PQ7': FAISS cannot build it for dimension 384", index="IVF8,PQ7")


def test_non_ivf_index_is_refused_with_examples(corpus_dir, output):
    fails([corpus_dir], output, r"--index 'HNSW32' is not an IVF index.*IVF1,Flat", index="HNSW32")


def test_more_centroids_than_points_suggests_a_smaller_index(tmp_path, docs, output):
    write_parquet(tmp_path / "in" / "a.parquet", docs[:50])
    fails([tmp_path / "in"], output, r"has 4096 centroids but only 50 vectors to train them; use --index 'IVF1,Flat'",
          index="IVF4096,Flat")


def test_opq_with_too_few_points_is_refused_not_crashed(corpus_dir, output):
    fails([corpus_dir], output, r"OPQ needs at least 384 training vectors", index="OPQ16,IVF4,PQ16np")


def test_no_text_at_all(tmp_path, docs, output):
    write_parquet(tmp_path / "in" / "a.parquet", [dict(d, title=None, body="") for d in docs[:5]])
    fails([tmp_path / "in"], output, r"no documents to index: all 5 rows were skipped \(\{'empty_or_null_text': 5\}\)", index=None)


def test_output_not_writable(tmp_path, corpus_dir):
    (tmp_path / "a-file").write_text("x")
    with pytest.raises(RayIndexError, match=r"output .*a-file/out is not writable"):
        build_index(build_config([corpus_dir], tmp_path / "a-file" / "out"))


def test_index_memory_budget_too_small_for_the_corpus(tmp_path, docs, output):
    write_parquet(tmp_path / "in" / "a.parquet", docs[:50])
    fails([tmp_path / "in"], output, r"--max-index-memory: .*", index=None, max_index_bytes=1000)
