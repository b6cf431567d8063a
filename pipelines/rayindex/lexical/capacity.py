"""The lexical (BM25) index's share of a capacity plan (ivf/capacity.py plan_capacity): its bytes on disk,
what a serving node holds in RAM, and a query's cost, as pure functions of the number of passages.

The per-passage figures were measured on real builds by benchmarks/lexical_capacity_benchmark.py
(docs/benchmark-lexical-capacity.json, 2026-12-05): 400 English man pages built with default options
(`python benchmarks/passages_benchmark.py --docs 400`: 7,550 passages of 1,107 bytes), the corpus kind a large
index is made of (long documents cut into full passages); the embedded default (`rayindex build -o /tmp/x`,
3,670 short docstring passages) and the Jargon File (2,686 passages) are the range beside it. Bytes are the
layout's arithmetic (lexical/postings.py, lexical/counts.py). The cost of reading a posting comes from the
synthetic postings measure (benchmarks/lexical_serving_benchmark.py, docs/quality.md): summed whole, a
search's time grows with its terms' postings, hence with the corpus; MaxScore (lexical/postings.py
search_postings) skips the lists that cannot change the top k, by a factor measured on the same searches; its
working memory is bounded by the postings summed at once (CHUNK_POSTINGS).
"""

from __future__ import annotations

from typing import NamedTuple

LEXICAL_BENCH = "benchmarks/lexical_capacity_benchmark.py --json docs/benchmark-lexical-capacity.json, 2026-12-05"
MEASURED_PASSAGES = 7_550  # the man page build
MEASURED_TERMS = 35_864  # its distinct terms
# distinct terms grow as passages^beta (Heaps' law), fitted to the man page build's largest prefixes (1/8 to all
# of its passages in corpus order): 0.612 (0.69 over every prefix); the docstrings 0.75, the Jargon File 0.51
TERMS_GROWTH = 0.612
# postings (distinct terms of a passage) per KiB of passage text: man pages 66.0 (71.3 per 1,107-byte passage);
# the short docstrings 83.3, the Jargon File 91.2 (short texts repeat fewer words)
POSTINGS_PER_KIB = 65.96
# a query's postings read over the passages: the document frequencies of its terms summed, for queries shaped
# like users' (text/queries.py: sentence 1.56, title 0.31, phrase 0.31, question 0.69 on man pages, their mean);
# the docstrings 0.31, the Jargon File 0.34. A share of the corpus: it does not fall as the corpus grows
QUERY_POSTINGS_SHARE = 0.718
# ns per posting a search summing every posting reads (exhaustive_search, k = 100): 1,000 synthetic searches
# over 10M passages, 74.11 ms each reading 644,184 postings; at 1M 60.3 ns: the cost per posting grows
# with the postings read (fewer of them in cache), so the larger figure
NS_PER_POSTING = 115.0
# MaxScore's speed-up over summing every posting on the same 1,000 searches at 10M passages, k = 100 (k = 10:
# 3.56; k = 1,000: 1.10): the synthetic queries draw common terms often, users' rarer words prune more
MAXSCORE_SPEEDUP = 1.42
SEARCH_BYTES_PER_POSTING = 66.9  # a search's peak allocation per posting read, within one chunk (tracemalloc)
SEARCH_PEAK_BYTES = 21.07e6  # a search's peak allocation reading 6M postings: the chunks bound it (tracemalloc)

TERM_BYTES = 8 + 8 + 4  # terms.npy (uint64 hash) + starts.npy (int64 offset) + maxima.npy (float32): the dictionary
POSTING_BYTES = 8 + 4  # ids.npy (int64) + impacts.npy (float32)
COUNT_ROW_BYTES = 8 + 4  # a shard's lexical_counts.npz: a (passage, term) row's hash (uint64) and count (int32)
COUNT_PASSAGE_BYTES = 8 + 4 + 8  # and per passage: its id (int64), length (int32), offset (int64)


class LexicalSize(NamedTuple):
    terms: float  # distinct terms
    postings: float  # (passage, term) pairs
    dictionary_bytes: float  # terms.npy + starts.npy + maxima.npy
    postings_bytes: float  # ids.npy + impacts.npy
    counts_bytes: float  # the shards' lexical_counts.npz, kept for reindex


class LexicalQueryCost(NamedTuple):
    postings_read: float  # per query, over every serving shard: the postings of its terms
    cpu_s: float  # per query, over every serving shard
    latency_s: float  # the shards read their shares at once, a core each
    queries_per_s: float  # on `cores` cores
    working_bytes_per_shard: float  # per query a shard runs at once


def lexical_terms(passages: float) -> float:
    """Distinct terms of a corpus of this many passages: the man page build's, grown by Heaps' law."""
    return MEASURED_TERMS * (passages / MEASURED_PASSAGES) ** TERMS_GROWTH


def lexical_size(passages: float, passage_bytes: float) -> LexicalSize:
    """The lexical index of `passages` passages of `passage_bytes` bytes of text each on average."""
    terms = lexical_terms(passages)
    postings = passages * POSTINGS_PER_KIB * passage_bytes / 1024
    return LexicalSize(
        terms,
        postings,
        terms * TERM_BYTES,
        postings * POSTING_BYTES,
        postings * COUNT_ROW_BYTES + passages * COUNT_PASSAGE_BYTES,
    )


def lexical_query_cost(passages: float, serving_shards: int = 1, cores: int = 2) -> LexicalQueryCost:
    """A BM25 search over `passages` passages split over `serving_shards` shards: its terms hold
    QUERY_POSTINGS_SHARE x passages postings, summed at NS_PER_POSTING each over MAXSCORE_SPEEDUP, every shard
    its own share, in at most SEARCH_PEAK_BYTES of working memory."""
    read = QUERY_POSTINGS_SHARE * passages
    cpu_s = read * NS_PER_POSTING * 1e-9 / MAXSCORE_SPEEDUP
    return LexicalQueryCost(
        read,
        cpu_s,
        cpu_s / serving_shards,
        cores / cpu_s,
        min(read / serving_shards * SEARCH_BYTES_PER_POSTING, SEARCH_PEAK_BYTES),
    )
