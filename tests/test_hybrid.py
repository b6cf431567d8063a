"""Hybrid retrieval on the session's real build (3 shards): the build's BM25 index scores every passage
with the whole corpus' statistics (equal to one bm25s index over all passages), and search in each mode:
lexical finds identifiers as written, hybrid fuses both sides, filters apply in every mode, a query of
stopwords only falls back to the dense side, and a version built with --no-lexical refuses the lexical
modes naming why."""

import json
import random
import subprocess
import sys

import numpy as np
import pyarrow.parquet as pq
import pytest

from rayindex.errors import UsageError
from rayindex.layout import DOCS_FILE, LEXICAL_COUNTS_FILE, LEXICAL_FILES, shard_rel, version_rel
from rayindex.lexical.analyzer import Analyzer
from rayindex.lexical.counts import term_hashes
from rayindex.lexical.postings import search_postings
from rayindex.query.fusion import by_rank, by_score, fuse_documents
from rayindex.query.search import open_index

from helpers import build_args, client_env


def test_fusion_ranks_documents_not_passages():
    """Document 1 is first on both sides by different passages (10 and 11): it stays first. Passages are
    ids; the document is id // 10."""
    dense = [(0.9, 10), (0.8, 20), (0.7, 30)]
    lexical = [(40.0, 11), (30.0, 30), (20.0, 20)]
    doc = lambda p: p // 10  # noqa: E731

    fused = fuse_documents([by_rank(dense, doc), by_rank(lexical, doc)], doc, per_document=1, k=3)
    assert [p for _, p in fused] == [10, 20, 30]  # 20 and 30 tie (ranks 2+3): the lower document first
    assert fused[0][0] == pytest.approx(2 / 61) and fused[1][0] == fused[2][0] == pytest.approx(1 / 62 + 1 / 63)
    two = fuse_documents([by_rank(dense, doc), by_rank(lexical, doc)], doc, per_document=2, k=1)
    assert [p for _, p in two] == [10, 11]  # both passages of the document, each side's best
    weighted = fuse_documents([by_rank(dense, doc, weight=0.0), by_rank(lexical, doc)], doc, per_document=1, k=3)
    assert [p for _, p in weighted] == [11, 30, 20]  # BM25's order alone, by BM25's passages

    # by score, each side's lists full at depth 3: what each document scores above the side's last, over its
    # ceiling (1 for the cosines, 50 for BM25); the document's passage from the side that added most first
    full = fuse_documents([by_score(dense, doc, 1.0, 3), by_score(lexical, doc, 50.0, 3)], doc, per_document=1, k=3)
    assert [p for _, p in full] == [11, 30, 20]
    assert [s for s, _ in full] == pytest.approx([0.2 + 20 / 50, 10 / 50, 0.1])
    # lists shorter than the depth hold every match: a document either lacks scores 0 there
    short = fuse_documents([by_score(dense, doc, 1.0, 5), by_score(lexical, doc, 50.0, 5)], doc, per_document=1, k=3)
    assert [p for _, p in short] == [10, 30, 20]
    assert [s for s, _ in short] == pytest.approx([0.9 + 0.8, 0.7 + 0.6, 0.8 + 0.4])


def test_fusion_by_score_follows_the_side_that_is_sure():
    """A sentence quoted word for word: BM25 finds its document near the query's ceiling, far above the rest,
    and the vectors miss it (ten documents at close cosines): it comes first. A question in other words:
    BM25 matches a few common words, a small share of the ceiling, and the vectors' order stands."""
    doc = lambda p: p  # noqa: E731
    dense = [(0.60 - 0.01 * i, i) for i in range(10)]
    quoted = [(27.0, 99)] + [(6.0 - 0.1 * i, i) for i in range(1, 10)]
    fused = fuse_documents([by_score(dense, doc, 1.0, 10), by_score(quoted, doc, 30.0, 10)], doc, 1, 10)
    assert fused[0][1] == 99
    loose = [(4.0 - 0.1 * i, 9 - i) for i in range(10)]  # BM25 ranks the vectors' order backwards
    fused = fuse_documents([by_score(dense, doc, 1.0, 10), by_score(loose, doc, 60.0, 10)], doc, 1, 10)
    assert [p for _, p in fused] == list(range(10))
    nothing = fuse_documents([by_score(dense, doc, 1.0, 10), by_score([], doc, 0.0, 10)], doc, 1, 10)
    assert [p for _, p in nothing] == list(range(10))  # a query of stopwords: the vectors alone


@pytest.fixture(scope="module")
def index(built):
    return open_index(built[0])


@pytest.fixture(scope="module")
def passages(built) -> tuple[np.ndarray, list[str]]:
    """Every passage of the build (vector id, text), read from the shards' doc stores."""
    output, manifest = built
    ids, texts = [], []
    for shard in manifest.shards:
        table = pq.read_table(output / version_rel(manifest.run_id) / shard_rel(shard.shard_id, DOCS_FILE))
        ids.extend(table.column("vector_id").to_pylist())
        texts.extend(table.column("text").to_pylist())
    return np.asarray(ids), texts


def test_the_build_records_its_lexical_index(built):
    _, manifest = built
    lexical = manifest.lexical
    assert lexical.language == "english" and lexical.stopwords and (lexical.k1, lexical.b) == (1.2, 0.75)
    assert lexical.passages == manifest.counts.passages and lexical.terms > 1000
    assert all(rel in manifest.files_sha256 for rel in LEXICAL_FILES)
    for state in manifest.shard_states:
        assert shard_rel(state.shard_id, LEXICAL_COUNTS_FILE) in manifest.files_sha256
        assert state.lexical_of_docs == manifest.files_sha256[shard_rel(state.shard_id, DOCS_FILE)]


def test_sharded_bm25_scores_equal_one_bm25_over_every_passage(index, passages):
    """The 3 shards' postings, scored with global statistics, against bm25s over the union (100 queries)."""
    import bm25s

    ids, texts = passages
    analyzer = Analyzer()
    analyzed = [analyzer.analyze(t) for t in texts]
    reference = bm25s.BM25(k1=1.2, b=0.75, method="lucene")
    reference.index(analyzed, show_progress=False)
    rng, worst, compared = random.Random(11), 0.0, 0
    while compared < 100:
        terms = analyzed[rng.randrange(len(analyzed))]
        if not terms:
            continue
        query = rng.sample(terms, min(len(terms), rng.randint(1, 4)))
        found, scores = search_postings(index.lexical, term_hashes(query), k=len(ids))
        expected = reference.get_scores(query)
        by_id = dict(zip(ids.tolist(), expected.tolist()))
        assert set(found.tolist()) == {i for i, s in by_id.items() if s > 0}
        worst = max(worst, max(abs(s - by_id[i]) for i, s in zip(found.tolist(), scores.tolist())))
        compared += 1
    assert worst <= 1e-4, worst


def test_lexical_mode_finds_an_identifier_as_written(index, docs):
    """A name that occurs in exactly one document's text comes first in lexical and hybrid modes."""
    analyzer = Analyzer()
    counts: dict[str, set] = {}
    for d in docs:
        for term in set(analyzer.analyze(f"{d['title']}: {d['body']}")):
            counts.setdefault(term, set()).add(d["id"])
    unique = sorted(t for t, owners in counts.items() if len(owners) == 1 and "_" in t and len(t) > 8)
    assert len(unique) >= 5
    for term in unique[:5]:
        (owner,) = counts[term]
        assert index.search(term, k=5, mode="lexical")[0]["id"] == owner
        assert owner in [h["id"] for h in index.search(term, k=5, mode="hybrid")]


def test_hybrid_is_the_default_and_fuses_both_sides(index, docs):
    query = "compare two sequences and report their differences"
    default = index.search(query, k=10)
    assert [h["id"] for h in default] == [h["id"] for h in index.search(query, k=10, mode="hybrid")]
    dense = {h["id"] for h in index.search(query, k=10, mode="dense")}
    lexical = {h["id"] for h in index.search(query, k=10, mode="lexical")}
    assert {h["id"] for h in default} <= dense | lexical | {h["id"] for h in index.search(query, k=50, mode="dense")}
    # fused by score: each side's share above its last listed document, a cosine (at most 1) and a BM25
    # score over the query's ceiling (below 1)
    assert all(0 <= h["score"] < 2 for h in default)


def test_a_query_of_stopwords_only(index):
    assert index.search("the of and is", k=5, mode="lexical") == []
    dense = [h["id"] for h in index.search("the of and is", k=5, mode="dense")]
    assert [h["id"] for h in index.search("the of and is", k=5, mode="hybrid")] == dense


def test_filters_apply_in_every_mode(index):
    for mode in ("dense", "lexical", "hybrid"):
        hits = index.search("return the value of an attribute", k=5, filter={"kind": "class"}, mode=mode)
        assert hits and all(h["metadata"]["kind"] == "class" for h in hits), mode


@pytest.mark.slow
def test_a_version_without_lexical_index_refuses_the_lexical_modes(ray_address, corpus_dir, tmp_path):
    out = tmp_path / "dense-only"
    args = build_args(corpus_dir, out, "--no-lexical", "--shards", "2", "--ray-address", ray_address)
    run = subprocess.run([sys.executable, "-m", "rayindex", *args, "--quiet"], env=client_env(), capture_output=True)
    assert run.returncode == 0, run.stderr.decode()[-2000:]
    index = open_index(out)
    assert index.manifest.lexical is None and index.search("format a string", k=3)  # dense by default
    with pytest.raises(UsageError, match="built with --no-lexical"):
        index.search("format a string", mode="hybrid")
    cli = subprocess.run(
        [sys.executable, "-m", "rayindex", "search", "format a string", "-i", str(out), "--mode", "lexical", "--json"],
        env=client_env(),
        capture_output=True,
        text=True,
    )
    assert cli.returncode == 2 and "built with --no-lexical" in cli.stderr and "Traceback" not in cli.stderr
    hits = subprocess.run(
        [sys.executable, "-m", "rayindex", "search", "format a string", "-i", str(out), "--json"],
        env=client_env(),
        capture_output=True,
        text=True,
    )
    assert hits.returncode == 0 and json.loads(hits.stdout)
