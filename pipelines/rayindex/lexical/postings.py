"""BM25 postings: for each term, the passages containing it and each one's BM25 impact, computed with the
corpus-wide statistics (counts.CorpusTerms), so that a query's score is a sum of impacts and equals what
one BM25 over the whole corpus gives (Lucene's formula, as bm25s's `lucene` method and Elasticsearch:
idf = ln(1 + (N - df + 0.5) / (df + 0.5)), tf part = tf / (tf + k1 (1 - b + b len / avg_len))).

On disk a `Postings` is four .npy files in a folder (`terms`, `starts`, `ids`, `impacts`), opened
memory-mapped: a search touches the dictionary (a binary search in a sorted uint64 array) and the slices
of the query's terms, so a serving node's memory does not grow with the corpus.
"""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

import numpy as np

from rayindex.infra.files import atomic_file, save_npy
from rayindex.layout import LEXICAL_ARRAYS
from rayindex.lexical.counts import CorpusTerms, TermCounts


class BM25Params(NamedTuple):
    k1: float = 1.2  # Lucene's and Elasticsearch's defaults
    b: float = 0.75


class Postings(NamedTuple):
    """terms: sorted uint64 term hashes; the postings of terms[i] are ids/impacts[starts[i]:starts[i+1]],
    ids ascending."""

    terms: np.ndarray
    starts: np.ndarray  # int64, len(terms) + 1
    ids: np.ndarray  # int64, vector ids
    impacts: np.ndarray  # float32


def idf(doc_freqs: np.ndarray, passages: int) -> np.ndarray:
    return np.log1p((passages - doc_freqs + 0.5) / (doc_freqs + 0.5))


def bm25_ceiling(doc_freqs: np.ndarray, passages: int) -> float:
    """The most a passage can score for a query whose terms have these document frequencies (0: a term no
    passage holds): the sum of their idf, as a term's tf part tends to 1 with its frequency. Hybrid search
    scales BM25 scores by it (query/fusion.py by_score)."""
    return float(idf(np.asarray(doc_freqs, np.float64), passages).sum())


def term_doc_freqs(postings: Postings, query_terms: np.ndarray) -> np.ndarray:
    """Each query term's document frequency in these postings (the length of its posting list; 0 when absent).
    Summed over the postings of a split (serving shards own disjoint passages), the corpus' frequencies."""
    where, found = term_rows(postings, query_terms)
    freqs = np.zeros(len(query_terms), np.int64)
    freqs[found] = postings.starts[where[found] + 1] - postings.starts[where[found]]
    return freqs


def term_rows(postings: Postings, query_terms: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each query term's row in the dictionary, and whether the dictionary holds it."""
    where = np.searchsorted(postings.terms, query_terms)
    found = where < len(postings.terms)
    found[found] = postings.terms[where[found]] == query_terms[found]
    return where, found


def shard_postings(counts: TermCounts, corpus: CorpusTerms, params: BM25Params | None = None) -> Postings:
    """A shard's postings, its impacts computed with the whole corpus' statistics."""
    params = params or BM25Params()
    rows_per_passage = np.diff(counts.starts)
    ids = np.repeat(counts.ids, rows_per_passage)
    lengths = np.repeat(counts.lengths, rows_per_passage).astype(np.float64)
    where = np.searchsorted(corpus.terms, counts.terms)
    if len(counts.terms) and (
        where.max(initial=0) >= len(corpus.terms) or not np.array_equal(corpus.terms[where], counts.terms)
    ):
        raise ValueError("the corpus statistics do not cover this shard's terms: recompute them with every shard")
    tf = counts.counts.astype(np.float64)
    norm = params.k1 * (1 - params.b + params.b * lengths / corpus.avg_length) if corpus.avg_length else params.k1
    impacts = idf(corpus.doc_freqs[where].astype(np.float64), corpus.passages) * tf / (tf + norm)
    order = np.lexsort((ids, counts.terms))
    return from_rows(counts.terms[order], ids[order], impacts[order].astype(np.float32))


def from_rows(terms: np.ndarray, ids: np.ndarray, impacts: np.ndarray) -> Postings:
    """Postings of rows already sorted by (term, id)."""
    distinct, first = np.unique(terms, return_index=True)
    starts = np.append(first, len(terms)).astype(np.int64)
    return Postings(distinct.astype(np.uint64), starts, ids.astype(np.int64), impacts.astype(np.float32))


def merge_postings(parts: list[Postings]) -> Postings:
    """One Postings of several (shards' postings computed with the same corpus statistics)."""
    if not parts:
        return from_rows(np.zeros(0, np.uint64), np.zeros(0, np.int64), np.zeros(0, np.float32))
    terms = np.concatenate([np.repeat(p.terms, np.diff(p.starts)) for p in parts])
    ids = np.concatenate([p.ids for p in parts])
    impacts = np.concatenate([p.impacts for p in parts])
    order = np.lexsort((ids, terms))
    return from_rows(terms[order], ids[order], impacts[order])


def split_postings(postings: Postings, parts: list[np.ndarray]) -> list[Postings]:
    """The postings of each part's passages (parts[i]: the ids serving shard i owns, disjoint), for sharded
    serving. Every posting's passage must belong to a part (ValueError otherwise: the split does not cover
    the index). Within a term, ids keep their ascending order, so a part's search sums its passages'
    impacts in the order the whole postings would."""
    owned = np.concatenate([np.asarray(ids, np.int64) for ids in parts]) if parts else np.zeros(0, np.int64)
    part_of = np.repeat(np.arange(len(parts), dtype=np.int32), [len(ids) for ids in parts])
    order = np.argsort(owned, kind="stable")
    owned, part_of = owned[order], part_of[order]
    where = np.minimum(np.searchsorted(owned, postings.ids), max(len(owned) - 1, 0))
    if len(postings.ids) and (not len(owned) or not np.array_equal(owned[where], postings.ids)):
        missing = postings.ids[owned[where] != postings.ids][0] if len(owned) else postings.ids[0]
        raise ValueError(f"passage {int(missing)} has postings but no part owns it")
    owner = part_of[where]
    terms = np.repeat(postings.terms, np.diff(postings.starts))
    split = []
    for part in range(len(parts)):
        mine = owner == part
        split.append(from_rows(terms[mine], postings.ids[mine], postings.impacts[mine]))
    return split


def merge_top(results: list[tuple[np.ndarray, np.ndarray]], k: int) -> tuple[np.ndarray, np.ndarray]:
    """The k best (ids, scores) of several parts' search_postings results, best first, ties to the lower id:
    what search_postings over the parts' union gives, since each part returns every one of its passages that
    can be among the k best (its own k best, ties kept to the lower id)."""
    if not results:
        return np.zeros(0, np.int64), np.zeros(0, np.float32)
    ids = np.concatenate([np.asarray(i, np.int64) for i, _ in results])
    scores = np.concatenate([np.asarray(s, np.float32) for _, s in results])
    order = np.lexsort((ids, -scores))[:k]
    return ids[order], scores[order]


def write_postings(postings: Postings, folder: Path) -> list[Path]:
    """One .npy file per array, each whole or not at all."""
    paths = []
    for name, array in zip(LEXICAL_ARRAYS, postings):
        with atomic_file(folder / f"{name}.npy") as tmp:
            save_npy(tmp, array)
        paths.append(folder / f"{name}.npy")
    return paths


def open_postings(folder: Path) -> Postings:
    """Memory-mapped: nothing is read until a search slices it. ValueError naming the folder when the arrays
    do not fit together."""
    postings = Postings(*(np.load(folder / f"{name}.npy", mmap_mode="r") for name in LEXICAL_ARRAYS))
    if len(postings.starts) != len(postings.terms) + 1 or len(postings.ids) != len(postings.impacts):
        raise ValueError(f"{folder}: the lexical postings' arrays disagree in length")
    if len(postings.starts) and (postings.starts[0] != 0 or postings.starts[-1] != len(postings.ids)):
        raise ValueError(f"{folder}: the lexical postings' offsets do not cover its postings")
    return postings


def search_postings(postings: Postings, query_terms: np.ndarray, k: int, allowed=None) -> tuple[np.ndarray, np.ndarray]:
    """The k best (ids, scores) for a query given as term hashes (a term repeated counts again, as in
    bm25s and Lucene's boolean query), best first, ties by id. allowed(ids) -> bool mask: filtered
    inside the scoring, so k passing passages come back whenever that many match."""
    where, found = term_rows(postings, query_terms)
    slices = [(postings.starts[i], postings.starts[i + 1]) for i in where[found]]
    if not slices:
        return np.zeros(0, np.int64), np.zeros(0, np.float32)
    ids = np.concatenate([postings.ids[a:b] for a, b in slices])
    impacts = np.concatenate([postings.impacts[a:b] for a, b in slices])
    if allowed is not None:
        mask = allowed(ids)
        ids, impacts = ids[mask], impacts[mask]
    distinct, inverse = np.unique(ids, return_inverse=True)
    scores = np.bincount(inverse, weights=impacts, minlength=len(distinct)).astype(np.float32)
    if k < len(distinct):  # keep every passage tied with the k-th, so that ties go to the lower id
        kth_best = -np.partition(-scores, k - 1)[k - 1]
        contenders = np.flatnonzero(scores >= kth_best)
        distinct, scores = distinct[contenders], scores[contenders]
    order = np.lexsort((distinct, -scores))[:k]
    return distinct[order], scores[order]
