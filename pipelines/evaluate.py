"""Quality of a built index: recall@k against exact search over the stored embeddings, latency per
query, for a sweep of nprobe; hit@k / MRR of the whole pipeline on labelled queries; and the
smallest nprobe that reaches a recall target (tuning).

Ground truth comes from faiss.contrib.exhaustive_search.knn_ground_truth over the shards'
memory-mapped embeddings in blocks, so it works when the vectors do not fit in RAM. Queries are
sampled from the corpus and held out: each query's own document is removed from both the exact
and the approximate results, so it cannot count as a free hit.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Iterator

import faiss
import numpy as np
from faiss.contrib.exhaustive_search import knn_ground_truth

from pipelines.docstore import ROW_IDS_FILE
from pipelines.encode import load_embeddings, shard_dir
from pipelines.errors import RayIndexError
from pipelines.search import PublishedIndex
from pipelines.train import METRICS, sample_rows

EVAL_FILE = "eval.json"
BLOCK = 65_536  # vectors per ground-truth block


def shard_counts(published: PublishedIndex) -> list[int]:
    return [s.docs_encoded for s in published.manifest.shard_states]


def corpus_blocks(published: PublishedIndex, block: int = BLOCK) -> Iterator[np.ndarray]:
    """Every stored embedding, shard by shard, in blocks of at most `block` rows."""
    m = published.manifest
    for shard, count in zip(m.shards, shard_counts(published)):
        vectors = load_embeddings(shard_dir(published.version_dir, shard.shard_id), count, m.dimension)
        for start in range(0, count, block):
            yield np.ascontiguousarray(vectors[start:start + block], dtype=np.float32)


def positions_to_ids(published: PublishedIndex, positions: np.ndarray) -> np.ndarray:
    """Positions in corpus_blocks order -> global row ids, without loading all ids."""
    counts = shard_counts(published)
    starts = np.concatenate([[0], np.cumsum(counts)])
    ids = np.full(positions.shape, -1, dtype=np.int64)
    for k, shard in enumerate(published.manifest.shards):
        inside = (positions >= starts[k]) & (positions < starts[k + 1])
        if inside.any():
            row_ids = np.load(shard_dir(published.version_dir, shard.shard_id) / ROW_IDS_FILE, mmap_mode="r")
            ids[inside] = row_ids[positions[inside] - starts[k]]
    return ids


def sample_queries(published: PublishedIndex, n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """n stored embeddings drawn uniformly across shards, and their row ids."""
    m = published.manifest
    vectors, ids = [], []
    for shard, count, rows in zip(m.shards, shard_counts(published), sample_rows(shard_counts(published), n, seed)):
        if len(rows):
            d = shard_dir(published.version_dir, shard.shard_id)
            vectors.append(np.asarray(load_embeddings(d, count, m.dimension)[rows]))
            ids.append(np.load(d / ROW_IDS_FILE, mmap_mode="r")[rows])
    return np.ascontiguousarray(np.concatenate(vectors), dtype=np.float32), np.concatenate(ids)


def drop_self(found: np.ndarray, self_ids: np.ndarray, k: int) -> np.ndarray:
    """Each row without the query's own id (and padding), cut to k columns (-1 where fewer remain)."""
    out = np.full((len(found), k), -1, dtype=np.int64)
    for i, (row, own) in enumerate(zip(found, self_ids)):
        kept = row[(row != own) & (row >= 0)][:k]
        out[i, : len(kept)] = kept
    return out


def recall_at(found: np.ndarray, truth: np.ndarray, k: int) -> float:
    """Mean fraction of the true k nearest neighbours that are among the k results."""
    return float(np.mean([len(set(f[:k]) & set(t[:k]) - {-1}) / k for f, t in zip(found, truth)]))


def nprobe_sweep(nlist: int) -> list[int]:
    """1, 2, 4, ... up to nlist (nlist itself included)."""
    values = [1 << i for i in range(int(np.log2(max(1, nlist))) + 1)]
    return values if values[-1] == nlist else values + [nlist]


def select_nprobe(rows: list[dict], target: float, k: int = 10) -> dict | None:
    """The sweep row with the smallest nprobe whose recall@k reaches target, or None."""
    reaching = [r for r in rows if r[f"recall@{k}"] >= target]
    return min(reaching, key=lambda r: r["nprobe"]) if reaching else None


def exact_truth(published: PublishedIndex, queries: np.ndarray, self_ids: np.ndarray, k: int) -> np.ndarray:
    """Row ids of the exact k nearest neighbours of each query, its own document left out."""
    _, positions = knn_ground_truth(queries, corpus_blocks(published), k + 1, METRICS[published.manifest.metric])
    return drop_self(positions_to_ids(published, positions), self_ids, k)


def measure_sweep(published: PublishedIndex, queries: np.ndarray, self_ids: np.ndarray, truth: np.ndarray,
                  ks: list[int], nprobes: list[int], refine: int | None = None) -> list[dict]:
    """recall@k for each nprobe, and milliseconds per query (batch search time / queries).
    refine: re-rank factor (None: the manifest's, 1: none)."""
    kmax = max(ks)
    rows = []
    for nprobe in nprobes:
        start = time.perf_counter()
        _, found = published.search_vectors(queries, kmax + 1, nprobe, refine)
        elapsed = time.perf_counter() - start
        found = drop_self(found, self_ids, kmax)
        row = {"nprobe": nprobe, "refine": refine or published.manifest.refine_factor or 1,
               "ms_per_query": 1000 * elapsed / len(queries)}
        row.update({f"recall@{k}": recall_at(found, truth, k) for k in ks})
        rows.append(row)
    return rows


def labelled_metrics(published: PublishedIndex, labelled: list[dict], ks: list[int], nprobe: int | None) -> dict:
    """hit@k and MRR of the whole pipeline (encode, search, doc store) on {query, id} pairs."""
    vectors = published.encode([item["query"] for item in labelled])
    _, found = published.search_vectors(vectors, max(ks), nprobe)
    ranks = []
    for item, row in zip(labelled, found):
        corpus_ids = [published.docs.get(int(r))["id"] if r >= 0 else None for r in row]
        ranks.append(corpus_ids.index(item["id"]) + 1 if item["id"] in corpus_ids else None)
    result = {f"hit@{k}": float(np.mean([r is not None and r <= k for r in ranks])) for k in ks}
    result["mrr"] = float(np.mean([1.0 / r if r else 0.0 for r in ranks]))
    result["queries"] = len(labelled)
    return result


def read_labelled(path: str | Path) -> list[dict]:
    """A JSONL file of {"query": str, "id": corpus id} objects."""
    items = []
    for line_no, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except json.JSONDecodeError as exc:
            raise RayIndexError(f"{path} line {line_no}: not valid JSON ({exc.msg})") from exc
        if not isinstance(item, dict) or "query" not in item or "id" not in item:
            raise RayIndexError(f"{path} line {line_no}: expected {{\"query\": ..., \"id\": ...}}")
        items.append(item)
    if not items:
        raise RayIndexError(f"{path}: no labelled queries")
    return items


def evaluate(published: PublishedIndex, n_queries: int = 500, ks: tuple[int, ...] = (1, 10, 100),
             labelled_path: str | None = None, seed: int = 7) -> dict:
    """The sweep, optional labelled metrics, written to eval.json and PNG plots in the version folder."""
    n_queries = min(n_queries, int(published.index.ntotal))
    ks = sorted(k for k in ks if k < published.index.ntotal) or [1]
    queries, self_ids = sample_queries(published, n_queries, seed)
    truth = exact_truth(published, queries, self_ids, max(ks))
    rows = measure_sweep(published, queries, self_ids, truth, ks, nprobe_sweep(published.manifest.nlist))
    result = {"version": published.manifest.run_id, "index_string": published.manifest.index_string,
              "documents": int(published.index.ntotal), "queries": len(queries), "held_out": "own document removed",
              "ks": ks, "threads": faiss.omp_get_max_threads(), "sweep": rows, "default_nprobe": published.manifest.nprobe}
    if labelled_path:
        result["labelled"] = labelled_metrics(published, read_labelled(labelled_path), ks, published.manifest.nprobe)
    (published.version_dir / EVAL_FILE).write_text(json.dumps(result, indent=2))
    result["plots"] = plot_sweep(rows, ks, published.version_dir, published.manifest.index_string)
    return result


def plot_sweep(rows: list[dict], ks: list[int], out_dir: Path, title: str) -> list[str]:
    """recall@k vs nprobe, and latency vs recall@10 (or the largest k under 10)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    nprobes = [r["nprobe"] for r in rows]
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for k in ks:
        ax.plot(nprobes, [r[f"recall@{k}"] for r in rows], "o-", label=f"recall@{k}")
    ax.set(xscale="log", xlabel="nprobe", ylabel="recall vs exact", ylim=(0, 1.02), title=title)
    ax.legend()
    fig.tight_layout()
    recall_png = out_dir / "recall_vs_nprobe.png"
    fig.savefig(recall_png, dpi=110)
    plt.close(fig)
    k = max([k for k in ks if k <= 10] or ks)
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.plot([r[f"recall@{k}"] for r in rows], [r["ms_per_query"] for r in rows], "o-")
    for r in rows:
        ax.annotate(str(r["nprobe"]), (r[f"recall@{k}"], r["ms_per_query"]), fontsize=7)
    ax.set(xlabel=f"recall@{k}", ylabel="ms / query (batched)", title=f"{title}: latency vs recall (labels: nprobe)")
    fig.tight_layout()
    latency_png = out_dir / "latency_vs_recall.png"
    fig.savefig(latency_png, dpi=110)
    plt.close(fig)
    return [str(recall_png), str(latency_png)]


REFINE_FACTORS = (2, 4, 8, 16)


def tune_nprobe(published: PublishedIndex, target_recall: float, k: int = 10, n_queries: int = 500, seed: int = 11) -> dict:
    """Pick the smallest nprobe reaching target recall@k on held-out corpus queries; when no nprobe
    does (PQ codes cap recall), turn on re-ranking with the smallest factor that does. Recorded in
    the manifest, so search and serve use it by default."""
    if not 0 < target_recall <= 1:
        raise RayIndexError(f"--target-recall {target_recall}: must be in (0, 1]")
    n_queries = min(n_queries, int(published.index.ntotal))
    k = min(k, int(published.index.ntotal) - 1) or 1
    queries, self_ids = sample_queries(published, n_queries, seed)
    truth = exact_truth(published, queries, self_ids, k)
    nprobes = nprobe_sweep(published.manifest.nlist)
    rows = measure_sweep(published, queries, self_ids, truth, [k], nprobes, refine=1)
    chosen = select_nprobe(rows, target_recall, k)
    if chosen is None:
        from pipelines.refine import write_fp16_embeddings

        write_fp16_embeddings(published.version_dir, published.manifest)
        for factor in REFINE_FACTORS:
            refined = measure_sweep(published, queries, self_ids, truth, [k], nprobes, refine=factor)
            rows += refined
            chosen = select_nprobe(refined, target_recall, k)
            if chosen:
                break
    best = max(rows, key=lambda r: (r[f"recall@{k}"], -r["ms_per_query"]))
    pick = chosen or best
    tuning = {"target": target_recall, "k": k, "queries": n_queries, "sweep": rows, "reached": chosen is not None,
              "nprobe": pick["nprobe"], "refine_factor": pick["refine"], "recall": pick[f"recall@{k}"]}
    if chosen is None:
        tuning["note"] = (f"recall@{k} {best[f'recall@{k}']:.3f} at nprobe {best['nprobe']} (re-rank x{best['refine']}) is the best "
                          "this index reaches; a finer index (more PQ bytes, or Flat/SQ8) is needed for the target")
    published.manifest.tuning = tuning
    published.manifest.nprobe = tuning["nprobe"]
    published.manifest.refine_factor = tuning["refine_factor"] if tuning["refine_factor"] > 1 else None
    published.manifest.save(published.version_dir)
    return tuning
