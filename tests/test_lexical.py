"""The lexical index's parts on real text (Python's docstrings): the analyzer keeps identifiers findable,
BM25 scores from sharded counts with global statistics equal one BM25 over the whole corpus (bm25s), and
postings split, merged, filtered and memory-mapped give the same answers."""

import random

import numpy as np
import pytest

from rayindex.layout import LEXICAL_ARRAYS
from rayindex.lexical import postings as postings_module
from rayindex.lexical.analyzer import Analyzer, AnalyzerSettings
from rayindex.lexical.counts import corpus_terms, count_terms, shard_terms, term_hashes
from rayindex.lexical.postings import (
    BM25Params,
    bm25_ceiling,
    exhaustive_search,
    from_rows,
    merge_top,
    open_postings,
    search_postings,
    shard_postings,
    term_doc_freqs,
    term_rows,
    write_merged_postings,
    write_postings,
    write_split_postings,
)
from rayindex.text.stdlib_corpus import stdlib_docstrings

N_PASSAGES = 3000


@pytest.fixture(scope="module")
def passages() -> list[str]:
    return [f"{d['title']}: {d['body']}" for d in stdlib_docstrings()[:N_PASSAGES]]


@pytest.fixture(scope="module")
def analyzed(passages) -> list[list[str]]:
    analyzer = Analyzer()
    return [analyzer.analyze(p) for p in passages]


def sharded_postings(analyzed, bounds, params=None):
    """Counts per shard (ids = row numbers), global statistics from every shard, impacts per shard."""
    counts = [count_terms(np.arange(a, b), analyzed[a:b]) for a, b in zip(bounds, bounds[1:])]
    corpus = corpus_terms(shard_terms(c) for c in counts)
    return [shard_postings(c, corpus, params) for c in counts], corpus


def shard_counts(analyzed, bounds):
    return [count_terms(np.arange(a, b), analyzed[a:b]) for a, b in zip(bounds, bounds[1:])]


def merged_postings(analyzed, bounds, folder, params=None):
    """The shards' postings merged on disk by the build's way (write_merged_postings), memory-mapped."""
    counts = shard_counts(analyzed, bounds)
    corpus = corpus_terms(shard_terms(c) for c in counts)
    write_merged_postings(counts, corpus, folder, params)
    return open_postings(folder)


def split_postings(whole, parts, folder, chunk=1 << 24):
    """Each part's postings split on disk by the build's way (write_split_postings), memory-mapped."""
    if not isinstance(whole.ids, np.memmap):
        write_postings(whole, folder / "whole")
        whole = open_postings(folder / "whole")
    folders = [folder / f"part{i}" for i in range(len(parts))]
    sizes = write_split_postings(whole, parts, folders, chunk)
    split = [open_postings(f) for f in folders]
    assert sizes == [len(s.ids) for s in split]
    return split


def in_memory_merge(parts):
    """The reference: every shard's postings concatenated and sorted by (term, id) in memory."""
    terms = np.concatenate([np.repeat(p.terms, np.diff(p.starts)) for p in parts])
    ids = np.concatenate([p.ids for p in parts])
    impacts = np.concatenate([p.impacts for p in parts])
    order = np.lexsort((ids, terms))
    return from_rows(terms[order], ids[order], impacts[order])


def in_memory_split(postings, parts):
    """The reference: each part's postings picked from the whole in memory."""
    owner = np.full(int(postings.ids.max()) + 1, -1)
    for part, ids in enumerate(parts):
        owner[ids] = part
    terms = np.repeat(postings.terms, np.diff(postings.starts))
    of = owner[postings.ids]
    return [
        from_rows(terms[of == part], postings.ids[of == part], postings.impacts[of == part])
        for part in range(len(parts))
    ]


def queries(analyzed, n=100, seed=3) -> list[list[str]]:
    """Terms from passages: 1 to 4 of a random passage's terms, a rare term now and then."""
    rng = random.Random(seed)
    out = []
    while len(out) < n:
        terms = analyzed[rng.randrange(len(analyzed))]
        if terms:
            out.append(rng.sample(terms, min(len(terms), rng.randint(1, 4))))
    return out


def test_identifiers_are_found_as_written_and_by_their_parts():
    terms = Analyzer().analyze("Call ray.init() with --no-tune; EINVAL from IndexIVFPQ on x86_64.")
    for written in ("ray.init", "--no-tune", "einval", "indexivfpq", "x86_64"):
        assert written in terms
    for part in ("ray", "init", "tune", "index", "ivfpq", "x86", "64"):
        assert part in terms
    assert "with" not in terms and "no" not in terms and "on" not in terms  # Lucene's English stopwords
    assert Analyzer().analyze("Running runs") == ["run", "run"]  # Snowball
    assert Analyzer().analyze("getHTTPResponse") == ["gethttpresponse", "get", "http", "respons"]


def test_no_language_means_no_stemming_and_no_stopwords():
    assert Analyzer(AnalyzerSettings(language=None)).analyze("The Running dogs") == ["the", "running", "dogs"]
    with pytest.raises(ValueError, match="klingon"):
        Analyzer(AnalyzerSettings(language="klingon"))


def test_query_analysis_matches_passage_analysis_for_stopwords_only_queries():
    assert Analyzer().analyze("the, of... is it?!") == []


def test_sharded_scores_equal_one_bm25_over_the_whole_corpus(analyzed, tmp_path):
    import bm25s

    params = BM25Params(k1=1.2, b=0.75)
    merged = merged_postings(analyzed, [0, 700, 1900, len(analyzed)], tmp_path, params)  # uneven shards
    reference = bm25s.BM25(k1=params.k1, b=params.b, method="lucene")
    reference.index(analyzed, show_progress=False)
    worst = 0.0
    for query in queries(analyzed):
        ids, scores = search_postings(merged, term_hashes(query), k=len(analyzed))
        expected = reference.get_scores(query)
        assert set(ids) == set(np.flatnonzero(expected > 0))
        worst = max(worst, float(np.abs(scores - expected[ids]).max()))
    assert worst <= 1e-4, worst


def test_results_do_not_depend_on_how_the_corpus_was_sharded(analyzed, tmp_path):
    one, _ = sharded_postings(analyzed, [0, len(analyzed)])
    merged = merged_postings(analyzed, [0, 1000, 2000, len(analyzed)], tmp_path)
    for query in queries(analyzed, n=30):
        hashes = term_hashes(query)
        a_ids, a_scores = search_postings(one[0], hashes, k=10)
        b_ids, b_scores = search_postings(merged, hashes, k=10)
        assert np.array_equal(a_ids, b_ids)
        np.testing.assert_allclose(a_scores, b_scores, rtol=0, atol=1e-6)


def test_serving_shards_merged_by_score_equal_the_whole(analyzed, tmp_path):
    """Each serving shard owns the postings of its passages (an arbitrary, uneven split, as by inverted list);
    the merged top k of the shards' top ks is the whole postings' top k, scores exactly, with a filter too."""
    (whole,), _ = sharded_postings(analyzed, [0, len(analyzed)])
    owner = np.random.default_rng(2).choice(3, size=len(analyzed), p=[0.6, 0.3, 0.1])
    shards = split_postings(whole, [np.flatnonzero(owner == part) for part in range(3)], tmp_path)
    assert sum(len(s.ids) for s in shards) == len(whole.ids)
    assert all(set(s.ids.tolist()) <= set(np.flatnonzero(owner == part).tolist()) for part, s in enumerate(shards))

    def even(ids):
        return ids % 2 == 0

    for query in queries(analyzed, n=30, seed=5):
        hashes = term_hashes(query)
        for k, allowed in ((10, None), (1, None), (40, even)):
            ids, scores = search_postings(whole, hashes, k=k, allowed=allowed)
            got_ids, got_scores = merge_top([search_postings(s, hashes, k=k, allowed=allowed) for s in shards], k)
            assert np.array_equal(got_ids, ids)
            assert np.array_equal(got_scores, scores)


def test_ties_across_serving_shards_go_to_the_lower_id(tmp_path):
    analyzed = [["alpha"], ["beta"], ["alpha"], ["alpha"], ["alpha"]]
    (whole,), _ = sharded_postings(analyzed, [0, 5])
    shards = split_postings(whole, [np.array([3, 4]), np.array([0, 1, 2])], tmp_path)
    query = term_hashes(["alpha"])
    for k in (1, 2, 3):
        ids, _ = merge_top([search_postings(s, query, k=k) for s in shards], k)
        assert list(ids) == [0, 2, 3][:k]
    with pytest.raises(ValueError, match="passage 4 has postings but no part owns it"):
        split_postings(whole, [np.array([0, 1, 2, 3])], tmp_path / "again")


def test_filters_apply_inside_scoring(analyzed):
    (whole,), _ = sharded_postings(analyzed, [0, len(analyzed)])
    query = term_hashes(["return", "valu"])
    everything, _ = search_postings(whole, query, k=len(analyzed))
    even, _ = search_postings(whole, query, k=10, allowed=lambda ids: ids % 2 == 0)
    assert len(even) == 10 and np.array_equal(even, everything[everything % 2 == 0][:10])


def test_ties_go_to_the_lower_id():
    analyzed = [["alpha"], ["beta"], ["alpha"], ["alpha"]]
    (postings,), _ = sharded_postings(analyzed, [0, 4])
    ids, scores = search_postings(postings, term_hashes(["alpha"]), k=2)
    assert list(ids) == [0, 2] and scores[0] == scores[1]


def test_memory_mapped_postings_answer_the_same(analyzed, tmp_path):
    (whole,), _ = sharded_postings(analyzed, [0, len(analyzed)])
    write_postings(whole, tmp_path / "lexical")
    mapped = open_postings(tmp_path / "lexical")
    assert isinstance(mapped.ids, np.memmap)
    for query in queries(analyzed, n=20, seed=9):
        hashes = term_hashes(query)
        for a, b in zip(search_postings(whole, hashes, k=10), search_postings(mapped, hashes, k=10)):
            assert np.array_equal(a, b)


def test_pruned_search_equals_summing_every_posting_and_skips_common_lists(analyzed, monkeypatch):
    """MaxScore (prune_from=0: pruned whatever the size) gives exactly the passages and float32 scores of
    summing every posting of the query's terms, for k 1 to 40, with a filter, repeated terms and common ones,
    and so do both when the lists are summed in chunks of 64 postings (CHUNK_POSTINGS); a query of a rare and
    a common term does not read the common term's list (the filter sees what is read)."""
    (whole,), _ = sharded_postings(analyzed, [0, len(analyzed)])
    rng = random.Random(11)
    common = ["return", "object", "use", "valu", "default"]
    asked = [q + rng.sample(common, rng.randint(0, 2)) for q in queries(analyzed, n=60, seed=13)]
    cases = [(k, allowed) for k in (1, 10, 40) for allowed in (None, lambda ids: ids % 3 != 0)]
    expected = {}
    for i, query in enumerate(asked + [["return", "return", "fnmatch"]]):
        hashes = term_hashes(query)
        where, found = term_rows(whole, hashes)
        for j, (k, allowed) in enumerate(cases):
            expected[i, j] = summed = exhaustive_search(whole, where[found], k, allowed)
            pruned = search_postings(whole, hashes, k=k, allowed=allowed, prune_from=0)
            assert np.array_equal(pruned[0], summed[0]) and np.array_equal(pruned[1], summed[1])
    monkeypatch.setattr(postings_module, "CHUNK_POSTINGS", 64)
    for i, query in enumerate(asked + [["return", "return", "fnmatch"]]):
        hashes = term_hashes(query)
        where, found = term_rows(whole, hashes)
        for j, (k, allowed) in enumerate(cases):
            for got in (
                exhaustive_search(whole, where[found], k, allowed),
                search_postings(whole, hashes, k=k, allowed=allowed, prune_from=0),
            ):
                assert np.array_equal(got[0], expected[i, j][0]) and np.array_equal(got[1], expected[i, j][1])
    monkeypatch.undo()

    seen = []

    def everything(ids):
        seen.append(len(ids))
        return np.ones(len(ids), bool)

    hashes = term_hashes(["fnmatch", "return"])
    lengths = np.diff(whole.starts)[term_rows(whole, hashes)[0]]
    assert lengths[1] > 20 * lengths[0]
    pruned = search_postings(whole, hashes, k=1, allowed=everything, prune_from=0)
    assert np.array_equal(pruned[0], exhaustive_search(whole, term_rows(whole, hashes)[0], 1)[0])
    assert sum(seen) < lengths[1]


def test_postings_written_before_the_maxima_are_searched_whole(analyzed, tmp_path):
    (whole,), _ = sharded_postings(analyzed, [0, len(analyzed)])
    write_postings(whole, tmp_path / "lexical")
    (tmp_path / "lexical" / "maxima.npy").unlink()
    older = open_postings(tmp_path / "lexical")
    assert older.maxima is None
    for query in queries(analyzed, n=10, seed=4):
        hashes = term_hashes(query)
        for a, b in zip(search_postings(whole, hashes, k=10, prune_from=0), search_postings(older, hashes, k=10)):
            assert np.array_equal(a, b)


def test_unknown_terms_and_empty_queries_find_nothing(analyzed):
    (whole,), _ = sharded_postings(analyzed, [0, len(analyzed)])
    for query in ([], ["zzzznotaword"]):
        ids, scores = search_postings(whole, term_hashes(query), k=10)
        assert len(ids) == 0 and len(scores) == 0


def test_the_bm25_ceiling_bounds_every_score_and_sums_over_a_split(analyzed, tmp_path):
    """A query's ceiling is the sum of its terms' idf from their document frequencies (counted here from the
    passages; a term no passage holds counts 0), above every passage's score; the frequencies summed over
    disjoint shards' postings are the corpus'."""
    parts, corpus = sharded_postings(analyzed, [0, 1000, 2200, len(analyzed)])
    merged = merged_postings(analyzed, [0, 1000, 2200, len(analyzed)], tmp_path)
    holders: dict[str, int] = {}
    for terms in analyzed:
        for term in set(terms):
            holders[term] = holders.get(term, 0) + 1
    for query in [*queries(analyzed, n=50), ["zzyzx", "functools"]]:
        hashes = term_hashes(query)
        freqs = term_doc_freqs(merged, hashes)
        assert freqs.tolist() == [holders.get(term, 0) for term in query]
        assert sum(term_doc_freqs(part, hashes) for part in parts).tolist() == freqs.tolist()
        n = corpus.passages
        ceiling = bm25_ceiling(freqs, n)
        assert ceiling == pytest.approx(sum(np.log1p((n - f + 0.5) / (f + 0.5)) for f in freqs.tolist()))
        _, scores = search_postings(merged, hashes, k=1)
        assert not len(scores) or scores[0] < ceiling


def same_files(a, b) -> bool:
    return all((a / f"{n}.npy").read_bytes() == (b / f"{n}.npy").read_bytes() for n in LEXICAL_ARRAYS)


def test_merged_on_disk_equals_the_in_memory_merge_byte_for_byte(analyzed, tmp_path, monkeypatch):
    """Shards merged out of core (one shard's postings in memory, the files written through small windows)
    give the five files of the in-memory merge byte for byte; an empty shard, or one whose passages hold no
    term, changes nothing; shards whose
    ids do not come in ascending ranges, and statistics that miss a shard, are refused."""
    monkeypatch.setattr(postings_module, "MERGE_WINDOW", 4_096)  # many windows per shard
    analyzed = [*analyzed[:1000], [], [], *analyzed[1000:]]  # two passages without terms (stopwords only)
    bounds = [0, 500, 500, 1000, 1002, 1700, 2900, len(analyzed)]  # uneven, one shard empty, one without terms
    parts, corpus = sharded_postings(analyzed, bounds)
    write_postings(in_memory_merge(parts), tmp_path / "memory")
    counts = shard_counts(analyzed, bounds)
    assert write_merged_postings(counts, corpus, tmp_path / "disk") == sum(len(p.ids) for p in parts)
    assert same_files(tmp_path / "memory", tmp_path / "disk")
    reference, merged = open_postings(tmp_path / "memory"), open_postings(tmp_path / "disk")
    for a, b in zip(reference, merged):
        assert a.dtype == b.dtype and np.array_equal(a, b)

    with pytest.raises(ValueError, match="ascending order of their vector ids"):
        write_merged_postings(counts[::-1], corpus, tmp_path / "reversed")
    interleaved = [count_terms(np.arange(0, len(analyzed), 2), analyzed[::2])]
    interleaved.append(count_terms(np.arange(1, len(analyzed), 2), analyzed[1::2]))
    with pytest.raises(ValueError, match="ascending order of their vector ids"):
        write_merged_postings(interleaved, corpus, tmp_path / "interleaved")
    with pytest.raises(ValueError, match="count more postings than the shards hold"):
        write_merged_postings(counts[:-1], corpus, tmp_path / "missing")
    assert not any(
        (tmp_path / name).exists() and any((tmp_path / name).iterdir())
        for name in ("reversed", "interleaved", "missing")
    )


@pytest.mark.parametrize("bucket", [1, 64, 20_000])
def test_merge_through_many_buckets_gives_the_same_bytes(analyzed, tmp_path, monkeypatch, bucket):
    """Terms cut into buckets of one term each, of 64 postings (a term longer than that alone) or of 20,000
    postings: the shards' postings, spilled to the buckets and each bucket sorted, give the in-memory merge's
    five files byte for byte, and the buckets' temporary folder is gone after, also after a refusal."""
    monkeypatch.setattr(postings_module, "MERGE_WINDOW", bucket)
    bounds = [0, 300, 1100, 1101, 2400, len(analyzed)]
    parts, corpus = sharded_postings(analyzed, bounds)
    starts = np.concatenate([[0], np.cumsum(corpus.doc_freqs)])
    assert len(list(postings_module.term_chunks(starts, bucket))) > 1
    write_postings(in_memory_merge(parts), tmp_path / "memory")
    counts = shard_counts(analyzed, bounds)
    assert write_merged_postings(counts, corpus, tmp_path / "disk") == len(np.concatenate([p.ids for p in parts]))
    assert same_files(tmp_path / "memory", tmp_path / "disk")
    assert sorted(f.name for f in (tmp_path / "disk").iterdir()) == sorted(f"{n}.npy" for n in LEXICAL_ARRAYS)
    fewer = corpus._replace(doc_freqs=corpus.doc_freqs - (np.arange(len(corpus.terms)) == len(corpus.terms) // 2))
    with pytest.raises(ValueError, match="count fewer postings than the shards hold"):
        write_merged_postings(counts, fewer, tmp_path / "fewer")
    assert not any((tmp_path / "fewer").iterdir())


def test_split_on_disk_equals_the_in_memory_split_byte_for_byte(analyzed, tmp_path):
    """Each part's postings split out of core, in chunks of a few terms (and of one term longer than a chunk),
    give the files of the in-memory split byte for byte; a part that owns no passage gets empty postings."""
    merged = merged_postings(analyzed, [0, 1500, len(analyzed)], tmp_path / "whole")
    owner = np.random.default_rng(7).choice(3, size=len(analyzed), p=[0.5, 0.3, 0.2])
    parts = [np.flatnonzero(owner == part) for part in range(3)] + [np.zeros(0, np.int64)]
    for chunk in (64, 1 << 24):
        split = split_postings(merged, parts, tmp_path / f"chunk{chunk}", chunk)
        for part, expected in enumerate(in_memory_split(merged, parts)):
            write_postings(expected, tmp_path / f"memory{part}")
            assert same_files(tmp_path / f"memory{part}", tmp_path / f"chunk{chunk}" / f"part{part}")
        assert len(split[3].ids) == 0 and len(split[3].starts) == 1


def test_corpus_statistics_folded_shard_by_shard_equal_counting_every_passage(analyzed):
    """Shards folded in batches as they come (60 small shards and one large) give every term's document
    frequency, the passage count and the average length of the passages counted all at once."""
    bounds = [*range(0, 600, 10), len(analyzed)]
    corpus = corpus_terms(shard_terms(c) for c in shard_counts(analyzed, bounds))
    (whole,) = shard_counts(analyzed, [0, len(analyzed)])
    terms, doc_freqs = np.unique(whole.terms, return_counts=True)
    assert np.array_equal(corpus.terms, terms) and np.array_equal(corpus.doc_freqs, doc_freqs)
    assert corpus.passages == len(analyzed) and corpus.avg_length == whole.lengths.sum() / len(analyzed)


def test_a_killed_merges_buckets_are_removed_before_publishing(tmp_path):
    """A merge killed in its first pass leaves its bucket folder (tempfile's .buckets.*.tmp) with .bucketN.tmp
    files in the lexical folder; remove_temp_files, which runs before a version is published, removes both."""
    from rayindex.infra.files import remove_temp_files

    buckets = tmp_path / "lexical" / ".buckets.abc123.tmp"
    buckets.mkdir(parents=True)
    (buckets / ".bucket000001.tmp").write_bytes(b"\0" * 16)
    (tmp_path / "lexical" / "terms.npy").write_bytes(b"kept")
    removed = remove_temp_files(tmp_path)
    assert set(removed) == {buckets / ".bucket000001.tmp", buckets}
    assert [p.name for p in (tmp_path / "lexical").iterdir()] == ["terms.npy"]
