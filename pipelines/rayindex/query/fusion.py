"""Reciprocal rank fusion: one ranking of passages from several (dense and BM25), by rank alone.

Dense similarities and BM25 scores are not on one scale (a cosine near 0.6, a BM25 sum near 20), so they
are combined by rank, as Elasticsearch's rrf retriever, OpenSearch, Milvus and Qdrant do:
fused(p) = sum over rankings of weight / (RRF_K + rank of p), rank from 1; a passage a ranking lacks adds
nothing. RRF_K = 60, the constant of Cormack et al. (2009) and those engines' default.
"""

from __future__ import annotations

RRF_K = 60


def reciprocal_rank_fusion(
    rankings: list[list[tuple[float, int]]], weights: list[float] | None = None, rrf_k: int = RRF_K
) -> list[tuple[float, int]]:
    """(fused score, id) of every id in any ranking (each a list of (score, id), best first), best first,
    ties to the lower id."""
    weights = weights or [1.0] * len(rankings)
    fused: dict[int, float] = {}
    for ranking, weight in zip(rankings, weights):
        for rank, (_, vector_id) in enumerate(ranking, 1):
            fused[vector_id] = fused.get(vector_id, 0.0) + weight / (rrf_k + rank)
    return sorted(((score, vector_id) for vector_id, score in fused.items()), key=lambda p: (-p[0], p[1]))
