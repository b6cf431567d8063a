"""Work units sized by cost (docs/build.md, "Shard plan"): a small corpus of long documents is cut into one unit
per encoder the session's Ray (2 CPUs) runs at once, and the index it builds answers exactly as a one-shard
build of the same files: the same ids (row numbers, whatever the plan), the same vectors within float
tolerance, the same hits."""

import numpy as np
import pytest

from rayindex.builder import build
from rayindex.infra.files import load_embeddings
from rayindex.layout import VECTOR_IDS_FILE, shard_dir
from rayindex.query.search import open_index
from rayindex.text import shard_plan

from helpers import build_config

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


def stored_vectors(output, manifest) -> tuple[np.ndarray, np.ndarray]:
    """Every vector of a build and its id, in id order."""
    index = open_index(output)
    ids = np.concatenate([np.load(shard_dir(index.version_dir, s.shard_id) / VECTOR_IDS_FILE) for s in manifest.shards])
    vectors = np.concatenate(
        [
            load_embeddings(shard_dir(index.version_dir, s.shard_id), st.passages, manifest.dimension)
            for s, st in zip(manifest.shards, manifest.shard_states)
        ]
    )
    order = np.argsort(ids)
    return ids[order], vectors[order]


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
    assert units.counts == one.counts
    ids, vectors = stored_vectors(tmp_path / "units", units)
    one_ids, one_vectors = stored_vectors(tmp_path / "one", one)
    assert np.array_equal(ids, one_ids)
    np.testing.assert_allclose(vectors, one_vectors, atol=1e-5)
    split, whole = open_index(tmp_path / "units"), open_index(tmp_path / "one")
    for query in QUERIES:
        hits, expected = split.search(query, k=5), whole.search(query, k=5)
        assert [(h["id"], h["passage"]) for h in hits] == [(h["id"], h["passage"]) for h in expected]
        assert [h["score"] for h in hits] == pytest.approx([h["score"] for h in expected], abs=1e-5)
