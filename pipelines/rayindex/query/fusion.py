"""Reciprocal rank fusion of document rankings (dense and BM25), by rank alone.

Dense similarities and BM25 scores are not on one scale (a cosine near 0.6, a BM25 sum near 20), so they
are combined by rank, as Elasticsearch's rrf retriever, OpenSearch, Milvus and Qdrant do:
fused(d) = sum over rankings of weight / (RRF_K + rank of d), rank from 1; a document a ranking lacks adds
nothing. RRF_K = 60, the constant of Cormack et al. (2009) and those engines' default.

Documents are fused, not passages: the two sides often find a document by different passages (the
vectors by its opening, BM25 by the passage holding the rare word), and fused as passages such a document
gets two half scores and falls behind documents both sides rank lower (seen on the test corpus: a
document first on both sides dropped out of the fused top 20).
"""

from __future__ import annotations

from collections.abc import Callable

RRF_K = 60


def fuse_documents(
    rankings: list[list[tuple[float, int]]],
    document_of: Callable[[int], int],
    per_document: int,
    k: int,
    weights: list[float] | None = None,
    rrf_k: int = RRF_K,
) -> list[tuple[float, int]]:
    """The k best documents of several rankings, each a list of (score, passage id), best first, whose
    documents (document_of(passage id)) ranked by first appearance. Returns (fused score, passage id):
    each document's passages (at most per_document) from the ranking that added most to its score first,
    then the others', best first, ties to the lower document."""
    weights = weights or [1.0] * len(rankings)
    fused: dict[int, float] = {}
    passages: dict[int, list[tuple[float, int, int]]] = {}  # document -> (-what that side adds, position, passage)
    for ranking, weight in zip(rankings, weights):
        ranks: dict[int, int] = {}
        for position, (_, passage_id) in enumerate(ranking):
            document = document_of(passage_id)
            if document not in ranks:
                ranks[document] = len(ranks) + 1
                fused[document] = fused.get(document, 0.0) + weight / (rrf_k + ranks[document])
            passages.setdefault(document, []).append((-weight / (rrf_k + ranks[document]), position, passage_id))
    best = sorted(fused, key=lambda d: (-fused[d], d))[:k]
    out = []
    for document in best:
        seen: list[int] = []
        for _, _, passage_id in sorted(passages[document]):
            if passage_id not in seen and len(seen) < per_document:
                seen.append(passage_id)
        out.extend((fused[document], passage_id) for passage_id in seen)
    return out
