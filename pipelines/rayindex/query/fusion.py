"""Fusion of document rankings (dense and BM25) into one: by score where each side's scores have a scale
of their own (a cosine index), by reciprocal rank otherwise.

By score (`by_score`): each side adds, for each document it lists, how far the document's best passage
scores above the most a document the side does not list can score (its last listed score; 0 when it lists
fewer documents than asked, every match), over the most any passage can score on that side: 1 for a
cosine, the query's BM25 ceiling for BM25 (lexical/postings.py `bm25_ceiling`: the sum of its terms' idf,
a passage holding every term, unmatched ones included). So a side that is sure counts for more: a sentence
quoted word for word scores near its ceiling on BM25 and far above the next passage, while a question asked
in other words matches a few common words, a small fraction of its ceiling, and the vectors decide.
Measured on real text (benchmarks/hybrid_benchmark.py, docs/quality.md): reciprocal rank fusion at k = 60
landed between the sides, 0.05 below BM25 on quoted sentences and 0.04 below the vectors on definitions
in other words (a document first on one side only scores 1/61, below any document both sides list within
60); score fusion is within 0.01 of the better side on both, and above both on "What is TERM?" questions.

By rank (`by_rank`, for dot and l2 indexes, whose scores have no fixed scale): fused(d) = sum over rankings
of weight / (RRF_K + rank of d), rank from 1; a document a ranking lacks adds nothing. RRF_K = 60, the
constant of Cormack et al. (2009) and the default of Elasticsearch's rrf retriever, OpenSearch, Milvus and
Qdrant.

Documents are fused, not passages: the two sides often find a document by different passages (the
vectors by its opening, BM25 by the passage holding the rare word), and fused as passages such a document
gets two half scores and falls behind documents both sides rank lower (seen on the test corpus: a
document first on both sides dropped out of the fused top 20).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

RRF_K = 60


class Side(NamedTuple):
    """One side's ranking of passages, (score, passage id) best first, and what each document it lists adds
    to the fused score."""

    ranking: list[tuple[float, int]]
    added: dict[int, float]


def by_rank(
    ranking: list[tuple[float, int]], document_of: Callable[[int], int], weight: float = 1.0, rrf_k: int = RRF_K
) -> Side:
    """Reciprocal rank: each document adds weight / (rrf_k + its rank), ranked by first appearance from 1."""
    added: dict[int, float] = {}
    for _, passage_id in ranking:
        document = document_of(passage_id)
        if document not in added:
            added[document] = weight / (rrf_k + len(added) + 1)
    return Side(ranking, added)


def by_score(
    ranking: list[tuple[float, int]],
    document_of: Callable[[int], int],
    ceiling: float,
    depth: int,
    weight: float = 1.0,
) -> Side:
    """Each document adds weight x (its best score - floor) / ceiling. floor: the last listed score when the
    ranking lists depth documents (a document it lacks scores at most that), else 0 (it lists every match).
    A ceiling <= 0 (a query whose terms the side cannot score) adds nothing."""
    added: dict[int, float] = {}
    if not ranking or ceiling <= 0:
        return Side(ranking, added)
    best: dict[int, float] = {}
    for score, passage_id in ranking:
        best.setdefault(document_of(passage_id), score)
    floor = min(best.values()) if len(best) >= depth else 0.0
    for document, score in best.items():
        added[document] = weight * (score - floor) / ceiling
    return Side(ranking, added)


def fuse_documents(
    sides: list[Side], document_of: Callable[[int], int], per_document: int, k: int
) -> list[tuple[float, int]]:
    """The k best documents by the sum of what the sides add for them. Returns (fused score, passage id):
    each document's passages (at most per_document) from the side that added most to its score first, then
    the others', best first. Ties go to the document a side lists higher (a side's own order among equal
    scores stands), then to the lower document."""
    fused: dict[int, float] = {}
    passages: dict[int, list[tuple[float, int, int]]] = {}  # document -> (-what that side adds, position, passage)
    for side in sides:
        for position, (_, passage_id) in enumerate(side.ranking):
            document = document_of(passage_id)
            fused.setdefault(document, 0.0)
            passages.setdefault(document, []).append((-side.added.get(document, 0.0), position, passage_id))
        for document, added in side.added.items():
            fused[document] = fused.get(document, 0.0) + added
    first_seen = {document: min(position for _, position, _ in seen) for document, seen in passages.items()}
    best = sorted(fused, key=lambda d: (-fused[d], first_seen[d], d))[:k]
    out = []
    for document in best:
        seen: list[int] = []
        for _, _, passage_id in sorted(passages[document]):
            if passage_id not in seen and len(seen) < per_document:
                seen.append(passage_id)
        out.extend((fused[document], passage_id) for passage_id in seen)
    return out
