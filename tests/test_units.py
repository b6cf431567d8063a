"""Work units sized by cost (docs/build.md, "Shard plan"): a small corpus of long documents is cut into one unit
per encoder the session's Ray (2 CPUs) runs at once, and one Parquet row group of texts of unequal lengths at
equal text bytes; the index each builds answers exactly as a one-shard build of the same files: the same ids (row
numbers, whatever the plan), the same vectors within float tolerance, the same hits."""

import numpy as np
import pytest

from rayindex.builder import build
from rayindex.query.search import open_index
from rayindex.text import shard_plan

from helpers import build_config, stored_vectors, write_parquet

QUERIES = ["parse a JSON document", "compress a file", "random numbers", "format a date", "read a CSV file"]


@pytest.fixture(scope="module")
def long_documents(docs, tmp_path_factory):
    """A folder of text files, one per standard-library module: its docstrings joined (a few KB each), the first
    modules up to 64 KB in all."""
    folder = tmp_path_factory.mktemp("long") / "in"
    folder.mkdir()
    modules: dict[str, list[str]] = {}
    for d in docs:
        modules.setdefault(d["module"], []).append(f"{d['title']}\n\n{d['body']}")
    size = 0
    for module, parts in sorted(modules.items()):
        text = "\n\n".join(parts)
        (folder / f"{module}.txt").write_text(text, encoding="utf-8")
        size += len(text)
        if size >= 64_000:
            break
    return folder


@pytest.fixture(scope="module")
def unequal_row_group(docs, tmp_path_factory):
    """One Parquet row group: the 30 longest docstrings (50 KB), then 60 one-line ones; its rows' text bytes."""
    long = sorted(docs, key=lambda d: -len(d["body"]))[:30]
    rows = [{"id": d["id"], "body": d["body"]} for d in long]
    rows += [{"id": f"{d['id']}/title", "body": d["title"]} for d in docs[:60]]
    path = write_parquet(tmp_path_factory.mktemp("group") / "p.parquet", rows, row_group_size=len(rows))
    return path, [len(r["body"].encode()) for r in rows]


@pytest.mark.slow
def test_long_documents_fill_both_cpus_and_answer_as_one_shard(ray_address, long_documents, tmp_path, monkeypatch):
    # the floor scaled down with the corpus (64 KB here, as much as one unit by default): what is tested is
    # the cut by cost for the encoders Ray has, not the size of the floor (test_stage_plan.py tests that)
    monkeypatch.setattr(shard_plan, "MIN_UNIT_BYTES", 16 << 10)
    options = dict(template=None, id_column=None, index="IVF1,Flat", lexical=False, ray_address=ray_address)
    units = build(build_config([long_documents], tmp_path / "units", shards=None, **options))
    one = build(build_config([long_documents], tmp_path / "one", shards=1, **options))
    assert units.encoder_slots == 2 and len(units.shards) == 2  # one unit per CPU of the session's Ray
    assert sum(s.cost for s in units.shards) == sum(f.size + 1 for f in units.files)  # a file's bytes and its row
    assert len(one.shards) == 1
    assert_same_answers(tmp_path / "units", tmp_path / "one", units, one)


def assert_same_answers(split_output, whole_output, split, whole) -> None:
    """Two builds of the same corpus: the same counts, ids, vectors (float tolerance) and hits."""
    assert split.counts == whole.counts
    ids, vectors = stored_vectors(split_output)
    one_ids, one_vectors = stored_vectors(whole_output)
    assert np.array_equal(ids, one_ids)
    np.testing.assert_allclose(vectors, one_vectors, atol=1e-5)
    split_index, whole_index = open_index(split_output), open_index(whole_output)
    for query in QUERIES:
        hits, expected = split_index.search(query, k=5), whole_index.search(query, k=5)
        assert [(h["id"], h["passage"]) for h in hits] == [(h["id"], h["passage"]) for h in expected]
        assert [h["score"] for h in hits] == pytest.approx([h["score"] for h in expected], abs=1e-5)


@pytest.mark.slow
def test_a_row_group_of_unequal_texts_is_cut_at_equal_text_bytes(ray_address, unequal_row_group, tmp_path, monkeypatch):
    monkeypatch.setattr(shard_plan, "MIN_UNIT_BYTES", 16 << 10)  # as above: 2 units of this 50 KB corpus
    path, text = unequal_row_group
    options = dict(template=None, text_columns=["body"], index="IVF1,Flat", lexical=False, ray_address=ray_address)
    units = build(build_config([path], tmp_path / "units", shards=None, **options))
    one = build(build_config([path], tmp_path / "one", shards=1, **options))
    assert len(units.shards) == 2 and len(one.shards) == 1
    cut = units.shards[0].global_end
    # equal rows would cut at row 45, 50 KB against 1 KB; the rows' text bytes cut where they are equal
    assert abs(sum(text[:cut]) - sum(text[cut:])) <= max(text)
    assert_same_answers(tmp_path / "units", tmp_path / "one", units, one)
