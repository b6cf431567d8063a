"""Term counts of passages, and the statistics of the whole corpus that BM25 needs.

A shard's encode step writes its `TermCounts`; one pass over every shard's counts gives `CorpusTerms`
(each term's document frequency, the passage count and the average length). Those global figures are
what each shard's BM25 impacts are computed with, so a passage's score does not depend on how the
corpus was sharded (most engines score with per-shard statistics and rare terms suffer for it).

Terms are stored as 64-bit hashes (blake2b of the UTF-8 term): fixed width, so the dictionary of a
shard or of the whole index is one sorted uint64 array searched with numpy, memory-mapped, with no
strings to load. Two terms sharing a hash would share postings; among 100 million distinct terms the
chance that any two do is about 3e-4 (V^2 / 2^65).
"""

from __future__ import annotations

import hashlib
from collections import Counter
from collections.abc import Iterable
from typing import NamedTuple

import numpy as np

from rayindex.infra.files import atomic_file


def term_hash(term: str) -> int:
    return int.from_bytes(hashlib.blake2b(term.encode("utf-8"), digest_size=8).digest(), "little")


def term_hashes(terms: Iterable[str]) -> np.ndarray:
    return np.fromiter((term_hash(t) for t in terms), dtype=np.uint64)


class TermCounts(NamedTuple):
    """The term counts of some passages, one row per (passage, term): a passage's rows are contiguous
    (`starts[i]:starts[i+1]`), its terms as hashes, with their counts; `lengths` are the passages' term
    counts in all (BM25's document length)."""

    ids: np.ndarray  # int64, the passages' vector ids
    lengths: np.ndarray  # int32
    starts: np.ndarray  # int64, len(ids) + 1
    terms: np.ndarray  # uint64
    counts: np.ndarray  # int32


def save_counts(counts: TermCounts, path) -> None:
    """One .npz file, whole or not at all."""
    with atomic_file(path) as tmp, open(tmp, "wb") as fh:
        np.savez(fh, **counts._asdict())


def load_counts(path) -> TermCounts:
    """ValueError naming the file when it is not a shard's term counts."""
    try:
        with np.load(path) as arrays:
            counts = TermCounts(*(arrays[name] for name in TermCounts._fields))
    except (OSError, KeyError, ValueError) as exc:
        raise ValueError(f"{path} is not a shard's term counts ({exc})") from exc
    if len(counts.starts) != len(counts.ids) + 1 or len(counts.terms) != len(counts.counts):
        raise ValueError(f"{path}: its arrays disagree in length")
    return counts


def count_terms(ids: np.ndarray, analyzed: Iterable[list[str]]) -> TermCounts:
    """TermCounts of passages given as their analyzed terms (Analyzer.analyze), in the order of ids."""
    hashes: dict[str, int] = {}
    lengths, starts, terms, counts = [], [0], [], []
    for passage_terms in analyzed:
        tally = Counter(passage_terms)
        for term, count in tally.items():
            h = hashes.get(term)
            if h is None:
                h = hashes[term] = term_hash(term)
            terms.append(h)
            counts.append(count)
        lengths.append(len(passage_terms))
        starts.append(len(terms))
    if len(lengths) != len(ids):
        raise ValueError(f"{len(ids)} ids for {len(lengths)} analyzed passages")
    return TermCounts(
        np.asarray(ids, dtype=np.int64),
        np.asarray(lengths, dtype=np.int32),
        np.asarray(starts, dtype=np.int64),
        np.asarray(terms, dtype=np.uint64),
        np.asarray(counts, dtype=np.int32),
    )


class ShardTerms(NamedTuple):
    """A shard's contribution to the corpus statistics: its distinct terms (sorted) with the number of its
    passages containing each, its passage count and the sum of their lengths."""

    terms: np.ndarray  # uint64, sorted, unique
    doc_freqs: np.ndarray  # int64
    passages: int
    total_length: int


def shard_terms(counts: TermCounts) -> ShardTerms:
    terms, doc_freqs = np.unique(counts.terms, return_counts=True)  # a term appears once per passage in counts
    return ShardTerms(terms, doc_freqs.astype(np.int64), len(counts.ids), int(counts.lengths.sum()))


class CorpusTerms(NamedTuple):
    """The statistics of the whole corpus: every term (sorted) and its document frequency, the passage
    count and the average passage length."""

    terms: np.ndarray  # uint64, sorted, unique
    doc_freqs: np.ndarray  # int64
    passages: int
    avg_length: float


def corpus_terms(shards: Iterable[ShardTerms]) -> CorpusTerms:
    """The statistics of the shards' passages together. Shards are folded in as they come, a batch at a time
    once the batch holds as many terms as the running dictionary, so memory stays within a few times the
    corpus' dictionary (plus one shard's) for any number of shards."""
    terms, doc_freqs = np.zeros(0, np.uint64), np.zeros(0, np.int64)
    batch: list[ShardTerms] = []
    passages = total_length = 0
    for shard in shards:
        passages += shard.passages
        total_length += shard.total_length
        batch.append(shard)
        if sum(len(s.terms) for s in batch) >= len(terms):
            terms, doc_freqs = summed_terms(
                [terms, *(s.terms for s in batch)], [doc_freqs, *(s.doc_freqs for s in batch)]
            )
            batch = []
    terms, doc_freqs = summed_terms([terms, *(s.terms for s in batch)], [doc_freqs, *(s.doc_freqs for s in batch)])
    return CorpusTerms(terms, doc_freqs, passages, total_length / passages if passages else 0.0)


def summed_terms(terms: list[np.ndarray], doc_freqs: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """The distinct terms of several (terms, document frequencies) and each one's frequencies summed."""
    distinct, inverse = np.unique(np.concatenate(terms), return_inverse=True)
    summed = np.bincount(inverse, weights=np.concatenate(doc_freqs), minlength=len(distinct))
    return distinct.astype(np.uint64), summed.astype(np.int64)
