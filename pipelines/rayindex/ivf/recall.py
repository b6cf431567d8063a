"""Recall of an index against exact search (as faiss/contrib/evaluation.py measures it): exact ground
truth block by block over the memory-mapped shard embeddings (faiss.contrib.exhaustive_search.knn_ground_truth,
so the vectors need not fit in RAM), recall@k for a sweep of nprobe with the time per query (batched, and of
one query searched alone), and the nprobe to use for a recall target within a latency budget.

Queries are stored vectors held out (eval: each query's own vector is removed from both the exact and the
approximate results, so it cannot count as a free hit), or texts made like users' queries from the corpus
(tune: corpus_queries), whose recall is counted over the documents returned (ranked_documents).
"""

from __future__ import annotations

import os
import platform
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import faiss
import numpy as np
from faiss.contrib.exhaustive_search import knn_ground_truth

from rayindex.docstore.reader import DocStore
from rayindex.infra.files import load_embeddings, sample_rows
from rayindex.infra.storage import Store
from rayindex.ivf.index import METRICS
from rayindex.layout import VECTOR_IDS_FILE, document_rows, shard_dir
from rayindex.manifest import Manifest, SweepPoint
from rayindex.text.queries import QUERY_SHAPES, user_query

BLOCK = 65_536  # vectors per ground-truth block
SearchFn = Callable[
    [np.ndarray, int, int, int], tuple[np.ndarray, np.ndarray]
]  # (queries, k, nprobe, refine) -> (D, I)


def corpus_blocks(version_dir: Path, manifest: Manifest, block: int = BLOCK) -> Iterator[np.ndarray]:
    """Every stored embedding, shard by shard, in blocks of at most `block` rows."""
    for shard, count in zip(manifest.shards, manifest.shard_counts()):
        vectors = load_embeddings(shard_dir(version_dir, shard.shard_id), count, manifest.dimension)
        for start in range(0, count, block):
            yield np.ascontiguousarray(vectors[start : start + block], dtype=np.float32)


def positions_to_ids(version_dir: Path, manifest: Manifest, positions: np.ndarray) -> np.ndarray:
    """Positions in corpus_blocks order -> vector ids, without loading all ids."""
    starts = np.concatenate([[0], np.cumsum(manifest.shard_counts())])
    ids = np.full(positions.shape, -1, dtype=np.int64)
    for k, shard in enumerate(manifest.shards):
        inside = (positions >= starts[k]) & (positions < starts[k + 1])
        if inside.any():
            row_ids = np.load(shard_dir(version_dir, shard.shard_id) / VECTOR_IDS_FILE, mmap_mode="r")
            ids[inside] = row_ids[positions[inside] - starts[k]]
    return ids


def sample_queries(version_dir: Path, manifest: Manifest, n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """n stored embeddings drawn uniformly across shards, and their vector ids."""
    counts = manifest.shard_counts()
    vectors, ids = [], []
    for shard, count, rows in zip(manifest.shards, counts, sample_rows(counts, n, seed)):
        if len(rows):
            d = shard_dir(version_dir, shard.shard_id)
            vectors.append(np.asarray(load_embeddings(d, count, manifest.dimension)[rows]))
            ids.append(np.load(d / VECTOR_IDS_FILE, mmap_mode="r")[rows])
    return np.ascontiguousarray(np.concatenate(vectors), dtype=np.float32), np.concatenate(ids)


def corpus_queries(version_dir: Path, manifest: Manifest, n: int, seed: int) -> list[str]:
    """n queries that look like a user's, not like a stored vector: from n passages drawn uniformly, one query
    each, the shapes of text/queries.py in turn (a sentence, a title or heading, a key phrase, a short
    question). A stored vector as query sits next to itself and its overlapping neighbours, which flatters a
    low nprobe (measured on 400 man pages, nprobe 8 of 128 lists reached recall@10 0.96 on stored vectors
    but 0.80 by document on sentences from the documents); a sentence flatters it too, against the short
    questions users send (11,489 GCIDE entries: 0.916 at the nprobe sentences chose, issue #24)."""
    rng = np.random.default_rng(seed)
    docs = DocStore.of_version(Store.of_folder(version_dir), manifest)
    texts: list[str] = []
    for shard, rows in zip(manifest.shards, sample_rows(manifest.shard_counts(), n, seed)):
        if len(rows):
            ids = np.load(shard_dir(version_dir, shard.shard_id) / VECTOR_IDS_FILE, mmap_mode="r")[rows]
            for vector_id in ids.tolist():
                shape = QUERY_SHAPES[len(texts) % len(QUERY_SHAPES)]
                texts.append(user_query(docs.get(vector_id)["text"], shape, rng))
    return texts


def drop_self(found: np.ndarray, self_ids: np.ndarray, k: int) -> np.ndarray:
    """Each row without the query's own id (and padding), cut to k columns (-1 where fewer remain)."""
    out = np.full((len(found), k), -1, dtype=np.int64)
    for i, (row, own) in enumerate(zip(found, self_ids)):
        kept = row[(row != own) & (row >= 0)][:k]
        out[i, : len(kept)] = kept
    return out


def recall_at(found: np.ndarray, truth: np.ndarray, k: int) -> float:
    """Mean fraction of the true k nearest neighbours that are among the k results (of the true ones there
    are: fewer than k when the index holds fewer)."""
    return float(
        np.mean([len(set(f[:k]) & set(t[:k]) - {-1}) / max(1, int((t[:k] >= 0).sum())) for f, t in zip(found, truth)])
    )


def ranked_documents(found: np.ndarray, k: int) -> np.ndarray:
    """Each row's first k distinct documents (rows: vector id >> PASSAGE_BITS) in rank order, -1 where fewer:
    what a user sees of a ranked list of passages (search returns a document by its best passage)."""
    out = np.full((len(found), k), -1, dtype=np.int64)
    for i, row in enumerate(found):
        documents = list(dict.fromkeys(document_rows(row[row >= 0]).tolist()))[:k]
        out[i, : len(documents)] = documents
    return out


def nprobe_sweep(nlist: int) -> list[int]:
    """1, 2, 4, ... up to nlist (nlist itself included)."""
    values = [1 << i for i in range(int(np.log2(max(1, nlist))) + 1)]
    return values if values[-1] == nlist else values + [nlist]


def select_nprobe(
    points: list[SweepPoint], target: float, k: int = 10, max_search_ms: float = 0.0
) -> SweepPoint | None:
    """The sweep point to use: of those whose recall@k reaches target, the largest nprobe whose query searched
    alone (p50_ms) takes at most max_search_ms, since more lists cost nothing a user notices there and find
    what the tuning queries did not ask for; when none fits the budget (or it is 0), the smallest nprobe
    that reaches target. None when none does."""
    reaching = [p for p in points if p.recall[k] >= target]
    if not reaching:
        return None
    fitting = [p for p in reaching if p.p50_ms is not None and p.p50_ms <= max_search_ms]
    return max(fitting, key=lambda p: p.nprobe) if fitting else min(reaching, key=lambda p: p.nprobe)


def this_machine() -> str:
    """The machine latencies are measured on: host, CPU model, CPUs, FAISS threads."""
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
            model = next((line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name")), model)
    except OSError:
        pass
    return f"{platform.node()}: {model}, {os.cpu_count()} CPUs, FAISS {faiss.omp_get_max_threads()} threads"


def exact_truth(version_dir: Path, manifest: Manifest, queries: np.ndarray, self_ids: np.ndarray, k: int) -> np.ndarray:
    """Vector ids of the exact k nearest neighbours of each query, its own vector left out (-1: none)."""
    _, positions = knn_ground_truth(queries, corpus_blocks(version_dir, manifest), k + 1, METRICS[manifest.metric])
    return drop_self(positions_to_ids(version_dir, manifest, positions), self_ids, k)


def document_truth(version_dir: Path, manifest: Manifest, queries: np.ndarray, k: int, fetch: int) -> np.ndarray:
    """The k documents exhaustive search returns for each query: its `fetch` exact nearest passages, ranked
    into documents (ranked_documents), as search ranks an index's `fetch` passages."""
    passages = exact_truth(version_dir, manifest, queries, np.full(len(queries), -1, np.int64), fetch)
    return ranked_documents(passages, k)


def single_query_ms(search: SearchFn, queries: np.ndarray, k: int, nprobe: int, refine: int) -> float:
    """Median milliseconds of one query searched alone (as a user's request is), over these queries."""
    times = []
    for row in range(len(queries)):
        start = time.perf_counter()
        search(queries[row : row + 1], k, nprobe, refine)
        times.append(time.perf_counter() - start)
    return 1000 * float(np.median(times))


def measure_sweep(
    search: SearchFn,
    queries: np.ndarray,
    self_ids: np.ndarray,
    truth: np.ndarray,
    ks: list[int],
    nprobes: list[int],
    refine: int = 1,
    fetch: int | None = None,
    latency_queries: int = 0,
) -> list[SweepPoint]:
    """recall@k for each nprobe, and milliseconds per query (batch search time / queries), at this
    re-rank factor (1: none). fetch: search that many passages per query and count recall over the
    documents they rank into (truth: document_truth's); latency_queries: also time that many queries
    searched one at a time (SweepPoint.p50_ms)."""
    kmax = max(ks)
    points = []
    for nprobe in nprobes:
        start = time.perf_counter()
        _, found = search(queries, fetch or kmax + 1, nprobe, refine)
        elapsed = time.perf_counter() - start
        found = ranked_documents(found, kmax) if fetch else drop_self(found, self_ids, kmax)
        timed = queries[:latency_queries]
        points.append(
            SweepPoint(
                nprobe=nprobe,
                refine=refine,
                ms_per_query=1000 * elapsed / len(queries),
                recall={k: recall_at(found, truth, k) for k in ks},
                p50_ms=single_query_ms(search, timed, fetch or kmax + 1, nprobe, refine) if len(timed) else None,
            )
        )
    return points
